"""``lorakit serve`` (the real command, a subprocess on loopback) on the embedded SmolLM2-135M with two
PEFT adapters (rank 8 on q,v; rank 4 rsLoRA on q,k,v,o): one greedy chat completion per adapter over
HTTP; the completion's tokens equal the in-process engine's greedy tokens for that adapter, and equal
PEFT's merged model (``merge_and_unload``) greedy tokens, and the two adapters answer differently."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

ADAPTERS = {
    "qv8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "qkvo4rs": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
}
MESSAGES = [{"role": "user", "content": "Name a colour."}]
MAX_TOKENS = 8


def write_adapters(base, root: Path) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(0)
    out = {}
    for name, cfg in ADAPTERS.items():
        m = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
        with torch.no_grad():
            for pname, p in m.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        m.save_pretrained(str(root / name))
        out[name] = root / name
    return out


def chat_ids(tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.slow
def test_lorakit_serve_two_adapters_match_engine_and_peft(tmp_path):
    from peft import PeftModel

    from lorakit.models import load_model
    from lorakit.serving import AdapterBank, Request, ServingEngine
    from lorakit.serving.load import free_port

    base, tokenizer = load_model(progress=False)
    dirs = write_adapters(base, tmp_path / "adapters")
    port = free_port()
    exe = Path(sys.executable).with_name("lorakit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from lorakit.cli import main; main()"]
    cmd += ["serve", "--port", str(port), "--budget-mb", "64", *sum((["--adapters", str(d)] for d in dirs.values()),
                                                                    [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = tmp_path / "server.log"  # a file, not a pipe nobody reads (a full pipe would block the server)
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - t0 < 300, "server did not come up in 300 s"
            time.sleep(0.5)
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert models == ["base", *ADAPTERS], models
        served = {}
        for name in ADAPTERS:
            r = httpx.post(url + "/v1/chat/completions", timeout=300,
                           json={"model": name, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0})
            assert r.status_code == 200, (r.text, log.read_text(errors="replace")[-3000:])
            body = r.json()
            served[name] = (body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)

    prompt = chat_ids(tokenizer)
    model = copy.deepcopy(base)
    bank = AdapterBank.for_model(model, budget_bytes=64 << 20)
    for name, d in dirs.items():
        bank.add(name, d)
    engine = ServingEngine(model, bank)
    for name, d in dirs.items():
        req = engine.generate([Request(prompt, name, max_new_tokens=MAX_TOKENS)])[0]
        text, n = served[name]
        assert n == len(req.tokens) and text == tokenizer.decode(req.tokens), (name, text, req.tokens)
        merged = PeftModel.from_pretrained(copy.deepcopy(base), str(d)).merge_and_unload().eval()
        with torch.no_grad():
            ref = merged.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):]
        assert req.tokens == ref.tolist()[:len(req.tokens)], (name, req.tokens, ref.tolist())
        del merged
    assert served["qv8"][0] != served["qkvo4rs"][0]
