"""Slow load test of the real HTTP server (issue 13, must show): uvicorn on 127.0.0.1 (an ephemeral port, in a
thread) over a tiny Llama with several PEFT adapters and a byte-level BPE tokenizer whose tokens split multi-byte
characters. 16 client threads (httpx, bounded timeouts, loopback only) send 1,200 requests: streaming and not,
completions and chat, non-ASCII prompts, three adapters and the base, greedy and seeded sampling.

Asserts: 0 errors; every output byte-exact against decoding the generated ids directly (each request gets a
unique seed, by which the server's submitted ``Request`` is found; its ``tokens`` are decoded with a separate
tokenizer instance); streamed chunks never end in a partial character; flat memory: after a warm-up, the RSS of
the process running the server grows less than 20 MB over the second half, and no Python object type grows by
more than n/8 in both halves (a per-request leak of one object grows a type by n/2 in each).
"""

from __future__ import annotations

import collections
import copy
import gc
import json
import os
import random
import threading
import time

import pytest
from serving_helpers import BPE_CORPUS, byte_bpe_tokenizer, write_peft_adapters

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from lorakit.serving import AdapterBank, ServingEngine  # noqa: E402
from lorakit.serving.engine import Request  # noqa: E402
from lorakit.serving.load import ServerThread  # noqa: E402
from lorakit.serving.server import create_app  # noqa: E402

CLIENTS, WARMUP, REQUESTS = 16, 160, 1200
DEADLINE_S = 150.0  # the whole measured run; each request has its own timeout too
KEEP_ALIVE = 0.3
MODELS = ["a", "b", "c", "base"]
PROMPTS = [BPE_CORPUS, "日本語", "naïve café 🎉", "Ωμέγα ü wörld", "héllo", "🎉🎉 日本 ö", "plain ascii text"]


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def type_counts() -> collections.Counter:
    gc.collect()
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


def live(cls) -> int:
    gc.collect()
    return sum(isinstance(o, cls) for o in gc.get_objects())


class Recorder:
    """Wraps the runner's submit: the server's ``Request`` of each HTTP request, keyed by its (unique) seed."""

    def __init__(self, runner) -> None:
        self.lock, self.by_seed, self._submit = threading.Lock(), {}, runner.submit
        runner.submit = self.submit

    def submit(self, req: Request):
        with self.lock:
            self.by_seed[req.seed] = req
        return self._submit(req)

    def pop(self, seed: int) -> Request | None:
        with self.lock:
            return self.by_seed.pop(seed, None)


def body_for(i: int, seed: int) -> tuple[str, dict]:
    rng = random.Random(seed)
    prompt = PROMPTS[i % len(PROMPTS)][rng.randrange(3):]
    body = {"model": MODELS[i % len(MODELS)], "max_tokens": rng.randrange(1, 13), "seed": seed,
            "temperature": 0.0 if i % 4 == 0 else 1.0, "stream": (i // 2) % 2 == 1}
    if i % 3 == 2:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


def one(client, url: str, path: str, body: dict, recorder: Recorder, checker) -> str | None:
    """Sends one request; returns None if it answered correctly, else what went wrong."""
    chat = path.endswith("chat/completions")
    if body["stream"]:
        with client.stream("POST", url + path, json=body) as resp:
            if resp.status_code != 200:
                return f"status {resp.status_code}: {resp.read()[:200]!r}"
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"stream did not end with [DONE]: {events[-2:]}"
        chunks = []
        for e in events[:-1]:
            data = json.loads(e)
            if "error" in data:
                return f"error event {data['error']}"
            c = data["choices"][0]
            chunks.append(c["delta"]["content"] if chat else c["text"])
        if any(c.endswith("\ufffd") for c in chunks[:-1]):
            return f"a streamed chunk ends in a partial character: {chunks}"
        text = "".join(chunks)
    else:
        resp = client.post(url + path, json=body)
        if resp.status_code != 200:
            return f"status {resp.status_code}: {resp.text[:200]}"
        c = resp.json()["choices"][0]
        text = c["message"]["content"] if chat else c["text"]
    req = recorder.pop(body["seed"])
    if req is None:
        return "no submitted request with this seed"
    if not 1 <= len(req.tokens) <= body["max_tokens"]:
        return f"{len(req.tokens)} tokens generated for max_tokens={body['max_tokens']}"
    expected = checker.decode(req.tokens)
    if text.encode() != expected.encode():
        return f"text {text!r} != direct decoding {expected!r} of {req.tokens}"
    return None


def run_clients(url: str, start: int, count: int, recorder: Recorder, checker, stats: dict) -> None:
    """``count`` requests (numbered from ``start``) from CLIENTS threads, each with its own httpx client."""
    counter = iter(range(start, start + count))
    lock, deadline = threading.Lock(), time.monotonic() + DEADLINE_S

    def worker() -> None:
        with httpx.Client(timeout=httpx.Timeout(30.0), limits=httpx.Limits(max_connections=1)) as client:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                path, body = body_for(i, seed=1000 + i)
                try:
                    err = one(client, url, path, body, recorder, checker)
                except Exception as e:  # noqa: BLE001 - a load test counts errors
                    err = f"{type(e).__name__}: {e}"
                with lock:
                    stats["sent"] += 1
                    stats["stream" if body["stream"] else "plain"] += 1
                    stats["chat" if "chat" in path else "completion"] += 1
                    if err is not None:
                        stats["errors"].append((i, err))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DEADLINE_S + 60)
    assert not any(t.is_alive() for t in threads), "client threads did not finish"


@pytest.mark.slow
def test_server_load_1200_requests_16_clients_byte_exact_flat_memory(tmp_path):
    bpe = byte_bpe_tokenizer()
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    # the checker decodes with its own instance (the server's is in use on other threads)
    checker = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe.backend_tokenizer.to_str()),
                                      eos_token="<eos>")
    from lorakit.models import tiny_llama

    base = tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=len(bpe), seed=0)
    dirs = write_peft_adapters(base, tmp_path, configs={
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=2, lora_alpha=4, target_modules=["o_proj"]),
        "c": dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                  rank_pattern={"o_proj": 2})})
    model = copy.deepcopy(base)
    bank = AdapterBank.for_model(model, budget_bytes=1 << 20)
    for n, d in dirs.items():
        bank.add(n, d)
    engine = ServingEngine(model, bank, max_batch=16, max_queue=256, max_context=128)
    app = create_app(engine, bpe, adapter_root=tmp_path)
    recorder = Recorder(app.state.runner)
    stats: dict = {"sent": 0, "stream": 0, "plain": 0, "chat": 0, "completion": 0, "errors": []}

    with ServerThread(app, keep_alive=KEEP_ALIVE) as srv:
        assert srv.host == "127.0.0.1"
        run_clients(srv.url, 0, WARMUP, recorder, checker, stats)
        assert not stats["errors"], stats["errors"][:5]
        time.sleep(KEEP_ALIVE + 0.7)  # closed connections' keep-alive timers expire before counting
        counts0, rss0, t0 = type_counts(), rss_bytes(), time.perf_counter()
        counts, rss = [], []
        half = REQUESTS // 2
        for k in range(2):
            run_clients(srv.url, WARMUP + k * half, half, recorder, checker, stats)
            time.sleep(KEEP_ALIVE + 0.7)
            assert engine.idle and not app.state.runner.listeners
            counts.append(type_counts())
            rss.append(rss_bytes())
        seconds = time.perf_counter() - t0
    first = {k: counts[0][k] - counts0[k] for k in counts[0]}
    second = {k: counts[1][k] - counts[0][k] for k in counts[1]}
    grew = {k: (first.get(k, 0), v) for k, v in second.items() if v > REQUESTS // 8 and first.get(k, 0) > REQUESTS // 8}
    out = {"requests": stats["sent"] - WARMUP, "warmup": WARMUP, "clients": CLIENTS, "seconds": round(seconds, 1),
           "req_per_s": round((stats["sent"] - WARMUP) / seconds, 1),
           "stream": stats["stream"], "plain": stats["plain"], "chat": stats["chat"],
           "completion": stats["completion"], "errors": len(stats["errors"]),
           "rss_start_mb": round(rss0 / 2 ** 20, 1), "rss_growth_first_half_mb": round((rss[0] - rss0) / 2 ** 20, 2),
           "rss_growth_second_half_mb": round((rss[1] - rss[0]) / 2 ** 20, 2),
           "grew_second_half": {k: v for k, v in second.items() if v > 8}, "grew_both": grew,
           "pending_records": len(recorder.by_seed)}
    print("server load run:", out)
    assert not stats["errors"], stats["errors"][:5]
    assert out["requests"] == REQUESTS, out
    assert out["pending_records"] == 0 and live(Request) == 0, out
    assert out["rss_growth_second_half_mb"] < 20, out
    assert not grew, out
