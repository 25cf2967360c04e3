"""Server hardening (issue 13, items 7-15): incremental detokenization (byte-exact with a byte-level BPE
tokenizer), stop strings, SSE error events and status codes, one JSON error format, unload refused
while requests are queued, body/prompt/stop limits and tokenization off the event loop, cancel on
disconnect, strict field types and unsupported fields, API key / content type / Origin / Host checks
and runtime loading off by default. In-process only (TestClient or direct ASGI calls)."""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time

import pytest
from serving_helpers import BPE_CORPUS, byte_bpe_tokenizer, write_peft_adapters

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from lorakit.serving import AdapterBank, ServingEngine  # noqa: E402
from lorakit.serving.detok import IncrementalDecoder, StopMatcher  # noqa: E402
from lorakit.serving.engine import Request  # noqa: E402
from lorakit.serving.server import ServerLimits, create_app, scrub_paths  # noqa: E402

CORPUS = BPE_CORPUS


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer trained offline on non-ASCII text: its tokens split multi-byte characters."""
    return byte_bpe_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def world(bpe, tmp_path_factory):
    """A tiny Llama over the BPE vocabulary and two PEFT adapters in an adapter root."""
    from lorakit.models import tiny_llama

    base = tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=len(bpe), seed=0)
    root = tmp_path_factory.mktemp("adapters")
    dirs = write_peft_adapters(base, root, configs={"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                                    "b": dict(r=2, lora_alpha=4, target_modules=["o_proj"])})
    return base, root, dirs


def make_app(world, tokenizer, *, names=("a", "b"), engine_kwargs=None, **app_kwargs):
    base, root, dirs = world
    model = copy.deepcopy(base)
    bank = AdapterBank.for_model(model, budget_bytes=1 << 20)
    for n in names:
        bank.add(n, dirs[n])
    engine = ServingEngine(model, bank, **{"max_batch": 4, "max_context": 96, **(engine_kwargs or {})})
    return create_app(engine, tokenizer, adapter_root=root, **app_kwargs), engine


def capture_requests(app) -> list[Request]:
    """Record every Request the server submits (their generated ids are checked against direct decoding)."""
    runner, seen = app.state.runner, []
    submit = runner.submit

    def recording(req):
        seen.append(req)
        return submit(req)

    runner.submit = recording
    return seen


def sse_events(resp) -> list[str]:
    return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


def slow_forward(engine, seconds: float = 0.01, fail_after: int | None = None):
    """Make each model forward take ``seconds`` (and raise after ``fail_after`` calls)."""
    forward, calls = engine.model.forward, [0]

    def slow(*args, **kwargs):
        calls[0] += 1
        if fail_after is not None and calls[0] > fail_after:
            raise RuntimeError("simulated device failure")
        time.sleep(seconds)
        return forward(*args, **kwargs)

    engine.model.forward = slow
    return calls


# -- 7: incremental detokenization --------------------------------------------------------------------------

def test_incremental_decoder_is_byte_exact_and_never_sends_a_partial_character(bpe):
    ids = bpe.encode(CORPUS)
    assert any("\ufffd" in bpe.decode(ids[:k]) for k in range(len(ids)))  # the tokens do split characters
    rng = random.Random(0)
    sequences = [ids] + [[rng.randrange(len(bpe)) for _ in range(rng.randrange(1, 40))] for _ in range(200)]
    for seq in sequences:
        dec, deltas = IncrementalDecoder(bpe), []
        for t in seq:
            deltas.append(dec.push(t))
        deltas.append(dec.flush())
        assert "".join(deltas) == bpe.decode(seq), seq
        assert all(not d.endswith("\ufffd") for d in deltas[:-1])  # only the final flush may end in U+FFFD
    dec = IncrementalDecoder(bpe)
    assert "".join(dec.push(t) for t in ids) + dec.flush() == CORPUS
    assert all("\ufffd" not in d for d in (IncrementalDecoder(bpe).push(t) for t in ids))


def test_stop_matcher_holds_back_partial_stop_strings():
    m = StopMatcher(["lo w", "zz"])
    out = [m.feed("he"), m.feed("llo wor"), m.feed("ld")]
    assert out == [("he", False), ("l", True), ("", True)]
    m = StopMatcher(["abc"])
    assert m.feed("xab") == ("x", False)  # "ab" might become "abc": held
    assert m.flush() == "ab"  # it never did
    m = StopMatcher(["ab"])
    assert m.feed("a") == ("", False) and m.feed("b") == ("", True)  # split over two tokens
    assert StopMatcher([]).feed("anything") == ("anything", False)


def test_server_text_equals_direct_decoding_stream_and_not(world, bpe):
    app, _ = make_app(world, bpe)
    seen = capture_requests(app)
    split = 0
    with TestClient(app) as client:
        for i in range(24):
            body = {"model": ["a", "b", "base"][i % 3], "prompt": CORPUS[i % 7:], "max_tokens": 12,
                    "temperature": 1.0, "seed": i}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            ids = seen[-1].tokens
            assert r.json()["choices"][0]["text"] == bpe.decode(ids)  # byte-exact
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                events = sse_events(resp)
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
            assert "".join(chunks) == bpe.decode(seen[-1].tokens) == bpe.decode(ids)
            assert all(not c.endswith("\ufffd") for c in chunks[:-1])
            split += any(bpe.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
            r = client.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "user",
                                                                                      "content": CORPUS}],
                                                          "max_tokens": 6, "temperature": 1.0, "seed": i})
            assert r.json()["choices"][0]["message"]["content"] == bpe.decode(seen[-1].tokens)
    assert split >= 3  # characters spanning several generated tokens were exercised


def test_stop_strings_cut_stream_and_non_stream_alike(world, bpe):
    app, _ = make_app(world, bpe)
    seen = capture_requests(app)
    with TestClient(app) as client:
        body = {"model": "a", "prompt": CORPUS, "max_tokens": 20, "temperature": 1.0, "seed": 3}
        full = bpe.decode(client.post("/v1/completions", json=body).json() and seen[-1].tokens)
        stop = full[5:7]
        assert stop and stop not in full[:6]
        r = client.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
        assert r["finish_reason"] == "stop" and r["text"] == full[:full.index(stop)]
        with client.stream("POST", "/v1/completions", json={**body, "stop": stop, "stream": True}) as resp:
            events = sse_events(resp)
        chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
        assert "".join(c["text"] for c in chunks) == r["text"] and chunks[-1]["finish_reason"] == "stop"


# -- 10: errors after a stream started, status codes ------------------------------------------------------

def test_error_after_stream_start_is_an_sse_error_event_then_done(world, bpe):
    app, engine = make_app(world, bpe)
    with TestClient(app) as client:
        slow_forward(engine, 0.0, fail_after=3)  # prefill + 2 decodes, then the device "fails"
        with client.stream("POST", "/v1/completions", json={"prompt": "héllo", "max_tokens": 30, "stream": True,
                                                            "temperature": 0}) as resp:
            assert resp.status_code == 200
            events = sse_events(resp)
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] == 500 and err["type"] == "server_error" and "engine error" in err["message"]
        assert all("choices" in json.loads(e) for e in events[:-2])
        r = client.post("/v1/completions", json={"prompt": "héllo", "max_tokens": 5})  # fails at once now
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"  # not 503: no retry helps


def test_request_larger_than_the_kv_budget_is_400_stream_or_not(world, bpe):
    app, engine = make_app(world, bpe, engine_kwargs={"kv_budget_bytes": 1})
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert r.status_code == 400 and "KV-cache" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stream": True})
        assert r.status_code == 400 and r.json()["error"]["code"] == 400  # before the first token: a status
    assert engine.idle


# -- 11: one JSON error format ------------------------------------------------------------------------------

class RaisingTemplate:
    chat_template = "{{ raise_exception('roles must alternate') }}"

    def __init__(self, inner):
        self.inner = inner

    def encode(self, text):
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids)

    def apply_chat_template(self, *args, **kwargs):
        raise ValueError("roles must alternate user/assistant")


def assert_json_error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code"} and err["code"] == status
    return err


def test_every_failure_is_a_json_error(world, bpe, tmp_path):
    from lorakit.models import tiny_llama

    base, root, _ = world
    other = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, vocab=len(bpe), seed=1)  # other shapes
    write_peft_adapters(other, root, configs={"wide": dict(r=2, lora_alpha=4, target_modules=["q_proj"])})
    app, engine = make_app(world, RaisingTemplate(bpe), enable_lora_loading=True)
    with TestClient(app) as client:
        raw = b'{"prompt": "ab\\ud800cd", "max_tokens": 2}'
        err = assert_json_error(client.post("/v1/completions", content=raw,
                                            headers={"content-type": "application/json"}), 400)
        assert "surrogate" in err["message"]
        err = assert_json_error(client.post("/v1/chat/completions",
                                            json={"messages": [{"role": "user", "content": "x"}]}), 400)
        assert "chat template" in err["message"] and "alternate" in err["message"]
        err = assert_json_error(client.post("/v1/load_lora_adapter", json={"lora_name": "n", "lora_path": "a\x00b"}),
                                400)
        assert "NUL" in err["message"]
        err = assert_json_error(client.post("/v1/load_lora_adapter", json={"lora_name": "w", "lora_path": "wide"}),
                                400)
        assert "cannot load adapter" in err["message"] and str(root) not in err["message"]
        assert "w" not in engine.bank.adapters
        assert_json_error(client.get("/v1/nothing-here"), 404)
        assert_json_error(client.get("/v1/completions"), 405)
        assert_json_error(client.post("/v1/completions", content=b"[" * 100_000,
                                      headers={"content-type": "application/json"}), 400)

    class Broken:  # a route that raises something unexpected: still the JSON format, 500
        @property
        def adapters(self):
            raise RuntimeError("/secret/server/path/state broke")

    app2, engine2 = make_app(world, bpe)
    with TestClient(app2, raise_server_exceptions=False) as client:
        engine2.bank, real = Broken(), engine2.bank
        try:
            err = assert_json_error(client.get("/v1/models"), 500)
        finally:
            engine2.bank = real
        assert "/secret" not in err["message"]


def test_scrub_paths_hides_absolute_paths(tmp_path):
    assert scrub_paths(f"{tmp_path}/x/adapter_model.safetensors: bad", tmp_path) == "x/adapter_model.safetensors: bad"
    assert scrub_paths("open /usr/lib/python3/x.py failed") == "open …/x.py failed"
    assert scrub_paths("in [0, 1] / 2") == "in [0, 1] / 2"


# -- direct ASGI calls: concurrency and disconnects -------------------------------------------------------

async def asgi_post(app, path: str, body: dict, *, disconnect: asyncio.Event | None = None) -> dict:
    """POST ``body`` straight into the ASGI app; the client "hangs up" when ``disconnect`` is set."""
    raw = json.dumps(body).encode()
    sent: list[dict] = []
    first = [True]
    gone = disconnect or asyncio.Event()

    async def receive():
        if first[0]:
            first[0] = False
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    await app(scope, receive, send)
    start = next((m for m in sent if m["type"] == "http.response.start"), {})
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return {"status": start.get("status"), "body": data}


def wait_until(cond, timeout: float = 10.0) -> None:
    t0 = time.perf_counter()
    while not cond():
        assert time.perf_counter() - t0 < timeout, "timed out"
        time.sleep(0.01)


# -- 12: unload while requests are queued ------------------------------------------------------------------

def test_engine_refuses_to_unload_an_adapter_with_queued_requests(world):
    base, _, dirs = world
    model = copy.deepcopy(base)
    bank = AdapterBank.for_model(model, budget_bytes=1 << 20)
    bank.add("a", dirs["a"])
    app_runner_free = ServingEngine(model, bank, max_batch=1)  # no runner thread: stepped by hand
    rid = app_runner_free.submit(Request(prompt=[5, 6], adapter="a", max_new_tokens=2))
    with pytest.raises(Exception, match=r"0 running and 1 queued"):
        app_runner_free.remove_adapter("a")
    app_runner_free.step()
    with pytest.raises(Exception, match=r"1 running and 0 queued"):
        app_runner_free.remove_adapter("a")
    while not app_runner_free.idle:
        app_runner_free.step()
    assert rid not in app_runner_free.requests
    app_runner_free.remove_adapter("a")
    assert "a" not in bank.adapters


def test_server_unload_is_409_while_a_request_for_it_waits_in_the_queue(world, bpe):
    app, engine = make_app(world, bpe, engine_kwargs={"max_batch": 1}, enable_lora_loading=True)

    async def scenario():
        slow_forward(engine, 0.01)
        running = asyncio.create_task(asgi_post(app, "/v1/completions",
                                                {"model": "b", "prompt": "hé", "max_tokens": 40, "temperature": 0}))
        await asyncio.to_thread(wait_until, lambda: engine.rows)
        queued = asyncio.create_task(asgi_post(app, "/v1/completions",
                                               {"model": "a", "prompt": "hé", "max_tokens": 3, "temperature": 0}))
        await asyncio.to_thread(wait_until, lambda: engine.queue)
        refused = await asgi_post(app, "/v1/unload_lora_adapter", {"lora_name": "a"})
        done = await asyncio.gather(running, queued)
        after = await asgi_post(app, "/v1/unload_lora_adapter", {"lora_name": "a"})
        return refused, done, after

    refused, (running, queued), after = asyncio.run(scenario())
    assert refused["status"] == 409 and b"1 queued" in refused["body"]
    assert running["status"] == 200 and queued["status"] == 200  # the queued request was served
    assert after["status"] == 200 and "a" not in engine.bank.adapters
    app.state.runner.stop()


# -- 9: cancel on disconnect (non-streaming) ---------------------------------------------------------------

def test_non_streaming_request_is_cancelled_when_its_client_disconnects(world, bpe):
    app, engine = make_app(world, bpe)
    seen = capture_requests(app)

    async def scenario():
        slow_forward(engine, 0.02)
        hang_up = asyncio.Event()
        task = asyncio.create_task(asgi_post(app, "/v1/completions", {"model": "a", "prompt": "hé",
                                                                      "max_tokens": 90, "temperature": 0},
                                             disconnect=hang_up))
        await asyncio.to_thread(wait_until, lambda: engine.rows and len(engine.rows[0].tokens) >= 3)
        hang_up.set()
        return await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    wait_until(lambda: engine.idle)
    req = seen[-1]
    assert req.finish_reason == "cancelled" and len(req.tokens) < 60  # stopped early, not run to the end
    assert engine.bank.adapters["a"].in_use == 0 and not engine.requests and not app.state.runner.listeners
    app.state.runner.stop()


# -- 8: limits before work; tokenization off the event loop ------------------------------------------------

class CountingTokenizer:
    chat_template = None

    def __init__(self, inner):
        self.inner, self.calls, self.on_loop = inner, 0, []

    def encode(self, text):
        self.calls += 1
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids)


def test_limits_are_checked_before_tokenization_which_runs_off_the_loop(world, bpe):
    tok = CountingTokenizer(bpe)
    app, engine = make_app(world, tok, limits=ServerLimits(max_body_bytes=20_000, max_stop=4, max_stop_chars=8))
    with TestClient(app) as client:
        assert_json_error(client.post("/v1/completions", json={"prompt": "x" * 30_000}), 413)
        err = assert_json_error(client.post("/v1/completions", json={"prompt": "x" * 19_000}), 400)
        assert "too long" in err["message"]  # 96-token context: at most 3072 characters
        err = assert_json_error(client.post("/v1/completions", json={"prompt": "x", "stop": ["a"] * 5}), 400)
        assert "too many stop strings" in err["message"]
        err = assert_json_error(client.post("/v1/completions", json={"prompt": "x", "stop": "y" * 9}), 400)
        assert "too long" in err["message"]
        assert_json_error(client.post("/v1/completions", json={"prompt": list(range(3, 200))}), 400)
        assert_json_error(client.post("/v1/chat/completions",
                                      json={"messages": [{"role": "user", "content": "x" * 4000}]}), 400)
        assert tok.calls == 0  # nothing above was tokenized
        r = client.post("/v1/completions", json={"prompt": "héllo", "max_tokens": 2})
        assert r.status_code == 200 and tok.calls == 1 and tok.on_loop == [False]


# -- 15: unsupported fields, strict types, paths ------------------------------------------------------------

@pytest.mark.parametrize("field,value,needle", [
    ("n", 2, "'n'"), ("best_of", 3, "'best_of'"), ("logprobs", 1, "'logprobs'"), ("logprobs", True, "'logprobs'"),
    ("echo", True, "'echo'"), ("stream", "no", "'stream' must be true or false"), ("seed", "5", "'seed'"),
    ("seed", 2 ** 64, "[0, 18446744073709551615]"), ("seed", -1, "'seed'"), ("n", "1", "'n'"),
    ("presence_penalty", 0.5, "'presence_penalty'"), ("max_tokens", 2.5, "'max_tokens'"),
])
def test_unsupported_or_mistyped_fields_are_400(world, bpe, field, value, needle):
    app, engine = make_app(world, bpe)
    with TestClient(app) as client:
        err = assert_json_error(client.post("/v1/completions", json={"prompt": "hé", field: value}), 400)
        assert needle in err["message"]
        assert client.post("/v1/completions", json={"prompt": "hé", "n": 1, "logprobs": None, "echo": False,
                                                    "seed": 2 ** 64 - 1, "stream": False,
                                                    "max_tokens": 2}).status_code == 200
    assert engine.idle


def test_relative_lora_path_resolves_against_the_root_and_errors_hide_server_paths(world, bpe):
    base, root, dirs = world
    app, engine = make_app(world, bpe, names=("a",), enable_lora_loading=True)
    broken = root / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text("{not json")
    with TestClient(app) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "b2", "lora_path": "b"})
        assert r.status_code == 200, r.text
        assert "b2" in engine.bank.adapters
        for path, status in (("broken", 400), ("missing", 404), ("../..", 403), (str(root.parent), 403)):
            err = assert_json_error(client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path}),
                                    status)
            assert str(root) not in err["message"] and str(root.parent) not in err["message"], err


# -- 14: API key, content type, runtime loading flag, Origin and Host -------------------------------------

def test_api_key_content_type_origin_host_and_loading_flag(world, bpe):
    base, root, dirs = world
    limits = ServerLimits(api_key="s3cret", allowed_origins=("http://localhost:3000",),
                          allowed_hosts=("127.0.0.1", "localhost", "testserver"))
    app, engine = make_app(world, bpe, limits=limits)
    ok = {"authorization": "Bearer s3cret"}
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200  # health needs no key
        assert_json_error(client.get("/v1/models"), 401)
        assert_json_error(client.get("/v1/models", headers={"authorization": "Bearer nope"}), 401)
        assert client.get("/v1/models", headers=ok).status_code == 200
        body = json.dumps({"prompt": "hé", "max_tokens": 2})
        assert_json_error(client.post("/v1/completions", content=body, headers={**ok, "content-type": "text/plain"}),
                          415)
        assert client.post("/v1/completions", content=body,
                           headers={**ok, "content-type": "application/json; charset=utf-8"}).status_code == 200
        assert_json_error(client.post("/v1/completions", json={"prompt": "x"},
                                      headers={**ok, "origin": "https://evil.example"}), 403)
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                        headers={**ok, "origin": "http://localhost:3000"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = client.options("/v1/completions", headers={"origin": "http://localhost:3000",
                                                       "access-control-request-method": "POST"})
        assert r.status_code == 204 and "authorization" in r.headers["access-control-allow-headers"]
        assert_json_error(client.options("/v1/completions", headers={"origin": "https://evil.example"}), 403)
        assert_json_error(client.get("/v1/models", headers={**ok, "host": "evil.example"}), 400)
        assert client.get("/v1/models", headers={**ok, "host": "localhost:8000"}).status_code == 200
        err = assert_json_error(client.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "b"},
                                            headers=ok), 403)
        assert "--enable-lora-loading" in err["message"]
        assert_json_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "a"}, headers=ok), 403)
        assert "a" in engine.bank.adapters


def test_max_loras_caps_runtime_loads_and_unload_returns_memory(world, bpe):
    import gc
    import weakref

    app, engine = make_app(world, bpe, names=(), limits=ServerLimits(enable_lora_loading=True, max_loras=2))
    bank = engine.bank
    with TestClient(app) as client:
        refs = []
        for i in range(30):
            r = client.post("/v1/load_lora_adapter", json={"lora_name": f"x{i}", "lora_path": "a"})
            assert r.status_code == 200, r.text
            r = client.post("/v1/completions", json={"model": f"x{i}", "prompt": "hé", "max_tokens": 1})
            assert r.status_code == 200, r.text
            refs.append(weakref.ref(bank.adapters[f"x{i}"]))
            assert client.post("/v1/unload_lora_adapter", json={"lora_name": f"x{i}"}).status_code == 200
        for n in ("p", "q"):
            assert client.post("/v1/load_lora_adapter", json={"lora_name": n, "lora_path": "a"}).status_code == 200
        err = assert_json_error(client.post("/v1/load_lora_adapter", json={"lora_name": "r", "lora_path": "b"}), 409)
        assert "--max-loras 2" in err["message"]
        for n in ("p", "q"):
            assert client.post("/v1/unload_lora_adapter", json={"lora_name": n}).status_code == 200
    gc.collect()
    assert all(r() is None for r in refs)  # unloaded adapters' host tensors are freed
    assert bank.used_bytes == 0 and not bank.adapters and not bank.export_errors
    assert len(bank._free_slots) == bank.max_slots and not bank._slot_owner


def test_hang_ups_over_real_sockets_free_the_rows_and_adapter(world, bpe):
    """The same through uvicorn on 127.0.0.1: clients that send a request and close the socket."""
    import socket

    from lorakit.serving.load import ServerThread

    app, engine = make_app(world, bpe)
    seen = capture_requests(app)
    slow_forward(engine, 0.01)
    body = json.dumps({"model": "a", "prompt": "hé", "max_tokens": 90, "temperature": 0}).encode()
    with ServerThread(app, keep_alive=0.3) as srv:
        for _ in range(8):
            s = socket.create_connection((srv.host, srv.port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: engine.rows)
            s.close()
        # seen gets a request just before the engine does: wait for all eight to finish, not only for idle
        wait_until(lambda: len(seen) == 8 and all(r.finish_reason for r in seen) and engine.idle)
        assert all(r.finish_reason == "cancelled" and len(r.tokens) < 60 for r in seen), repr([
            (r.finish_reason, len(r.tokens)) for r in seen])
        assert engine.bank.adapters["a"].in_use == 0 and not app.state.runner.listeners


def test_decoder_never_loses_text_when_a_tokenizer_rewrites_earlier_text():
    class Cleanup:  # like clean_up_tokenization_spaces: " ." becomes "."
        words = {1: "x", 2: " ", 3: ".", 4: "y"}

        def decode(self, ids):
            return "".join(self.words[i] for i in ids).replace(" .", ".")

    dec = IncrementalDecoder(Cleanup())
    out = "".join(dec.push(t) for t in (1, 2, 3, 4)) + dec.flush()
    assert out.startswith("x") and out.endswith("y") and len(out) >= 3
