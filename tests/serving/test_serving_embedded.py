"""The server on the embedded default model (SmolLM2-135M), from the same entry point as
``python -m lorakit.serving.server``: chat with the base and with a LoRA adapter, runtime load."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")


@pytest.mark.slow
def test_server_on_embedded_model(tmp_path):
    from fastapi.testclient import TestClient

    import lorakit
    from lorakit.models import load_model
    from lorakit.serving.server import build_server

    model, _ = load_model()
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 8, "alpha": 16}, targets=["q_proj", "v_proj"]),
                   seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # 0.05 left greedy text unchanged
    lorakit.save(model, tmp_path / "adapters" / "demo")
    app, engine = build_server(None, [str(tmp_path / "adapters")], budget_bytes=64 << 20)
    with TestClient(app) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "demo"]
        req = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0}
        base = client.post("/v1/chat/completions", json={**req, "model": "base"})
        tuned = client.post("/v1/chat/completions", json={**req, "model": "demo"})
        assert base.status_code == 200 and tuned.status_code == 200, (base.text, tuned.text)
        assert base.json()["choices"][0]["message"]["content"] != tuned.json()["choices"][0]["message"]["content"]
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "again",
                                                       "lora_path": str(tmp_path / "adapters" / "demo")})
        assert r.status_code == 200
        again = client.post("/v1/chat/completions", json={**req, "model": "again"})
        assert again.json()["choices"][0]["message"]["content"] == tuned.json()["choices"][0]["message"]["content"]
