"""OpenAI-compatible server: routes, greedy answers equal PEFT's, streaming, adapter load/unload with
the allowed-directory check, 4xx/429 errors, and no leaked requests after a burst."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from serving_helpers import peft_reference, tiny_base, write_peft_adapters

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from lorakit.serving import AdapterBank, ServingEngine  # noqa: E402
from lorakit.serving.server import create_app  # noqa: E402


class ByteTokenizer:
    """Deterministic toy tokenizer for a 128-token vocabulary (no downloads)."""

    chat_template = None

    def encode(self, text):
        return [ord(c) % 120 + 3 for c in text]

    def decode(self, ids):
        return "".join(chr(33 + i % 90) for i in ids)


@pytest.fixture(scope="module", params=["dense", "paged"])
def served(request, tmp_path_factory):
    """The server over the padded-batch KV cache, and over the paged one with a unified budget (S-LoRA)."""
    base = tiny_base()
    root = tmp_path_factory.mktemp("srv")
    dirs = write_peft_adapters(base, root)
    model = copy.deepcopy(base)
    bank = AdapterBank.for_model(model, budget_bytes=1 << 20)
    for n in ("a", "b"):
        bank.add(n, dirs[n])
    paged = request.param == "paged"
    engine = ServingEngine(model, bank, max_batch=4, max_context=64, kv=request.param,
                           unified_budget_bytes=(2 << 20) if paged else None)
    app = create_app(engine, ByteTokenizer(), adapter_root=root, enable_lora_loading=True)
    with TestClient(app) as client:
        yield client, engine, base, dirs, root


def greedy_peft(base, d, prompt, n):
    ref = peft_reference(base, d)
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_models_and_greedy_completion(served):
    client, engine, base, dirs, _ = served
    ids = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in ids] == ["base", "a", "b"]
    prompt = [5, 6, 7, 8]
    r = client.post("/v1/completions", json={"model": "a", "prompt": prompt, "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"] == ByteTokenizer().decode(greedy_peft(base, dirs["a"], prompt, 5))


def test_chat_streaming_matches_non_streaming(served):
    client = served[0]
    req = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    full = client.post("/v1/chat/completions", json=req).json()["choices"][0]["message"]["content"]
    chunks = []
    with client.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    text = "".join(json.loads(c)["choices"][0]["delta"]["content"] for c in chunks[:-1])
    assert text == full and len(full) == 6
    assert json.loads(chunks[-2])["choices"][0]["finish_reason"] == "length"


def test_errors(served):
    client, engine, *_ = served
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": "zzz", "prompt": "x"})
    assert r.status_code == 404 and "unknown model" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": "a", "prompt": "x" * 80})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": -1})
    assert r.status_code == 400
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": "/etc"})
    assert r.status_code == 403 and "outside the allowed" in r.json()["error"]["message"]
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "nope"})
    assert r.status_code == 404


def test_load_unload_and_stop_strings(served):
    client, engine, base, dirs, root = served
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(dirs["c"])})
    assert r.status_code == 200, r.text
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(dirs["c"])}).status_code == 409
    prompt = [9, 10, 11]
    want = ByteTokenizer().decode(greedy_peft(base, dirs["c"], prompt, 6))
    r = client.post("/v1/completions", json={"model": "c", "prompt": prompt, "max_tokens": 6, "temperature": 0,
                                             "stop": [want[3:5]]})
    got = r.json()["choices"][0]
    assert got["finish_reason"] == "stop" and want.startswith(got["text"]) and want[3:5] not in got["text"]
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 200
    assert client.post("/v1/completions", json={"model": "c", "prompt": "x"}).status_code == 404


def test_burst_leaves_nothing_behind(served):
    client, engine, *_ = served
    for i in range(24):
        r = client.post("/v1/completions", json={"model": ["a", "b", "base"][i % 3], "prompt": [3 + i, 4, 5],
                                                 "max_tokens": 2, "temperature": 0.7, "seed": i})
        assert r.status_code == 200
    runner = client.app.state.runner
    assert engine.idle and not engine.requests and not runner.listeners
    assert all(h.in_use == 0 for h in engine.bank.adapters.values())


def test_queue_full_is_429():
    base = tiny_base()
    model = copy.deepcopy(base)
    engine = ServingEngine(model, AdapterBank.for_model(model, budget_bytes=1 << 20), max_queue=0)
    with TestClient(create_app(engine, ByteTokenizer())) as client:
        r = client.post("/v1/completions", json={"prompt": [3, 4]})
        assert r.status_code == 429 and "queue full" in r.json()["error"]["message"]
