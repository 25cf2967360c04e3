"""Server memory caps and security flags (issue 13, items 13 and 14): --max-model-len, the KV budget's
safe default, --max-loras, and the `lorakit serve` flags reaching the server's limits."""

from __future__ import annotations

import pytest
from serving_helpers import write_peft_adapters

pytest.importorskip("fastapi")

from conftest import save_tiny_model_dir  # noqa: E402
from lorakit.serving import server  # noqa: E402


@pytest.fixture(scope="module")
def model_and_adapters(tmp_path_factory):
    from lorakit.models import tiny_llama

    root = tmp_path_factory.mktemp("flags")
    d = save_tiny_model_dir(root / "model", ["good", "bad"])
    adapters = root / "adapters"
    write_peft_adapters(tiny_llama(vocab=128, seed=0), adapters,
                        configs={"a": dict(r=2, lora_alpha=4, target_modules=["q_proj"]),
                                 "b": dict(r=2, lora_alpha=4, target_modules=["v_proj"])})
    return d, adapters


def test_build_server_caps_context_kv_and_adapters(model_and_adapters):
    d, adapters = model_and_adapters
    app, engine = server.build_server(str(d), [str(adapters)], budget_bytes=1 << 20, max_model_len=64)
    assert engine.max_context == 64 and engine.kv_budget_bytes == server.KV_BUDGET_MB_DEFAULT << 20
    assert app.state.limits.enable_lora_loading is False  # runtime loading off unless asked for
    app.state.runner.stop()
    with pytest.raises(ValueError, match="max_model_len"):
        server.build_server(str(d), [str(adapters)], budget_bytes=1 << 20, max_model_len=10 ** 9)
    with pytest.raises(ValueError, match="max_loras=1"):
        server.build_server(str(d), [str(adapters)], budget_bytes=1 << 20, limits=server.ServerLimits(max_loras=1))
    _, paged = server.build_server(str(d), [], budget_bytes=1 << 20, kv="paged", unified_budget_bytes=4 << 20)
    assert paged.kv_budget_bytes is None and paged.unified_budget_bytes == 4 << 20  # one budget covers KV


def test_limits_from_flags(monkeypatch):
    monkeypatch.delenv("LORAKIT_API_KEY", raising=False)
    args = server.server_parser().parse_args([])
    lim = server.limits_from_args(args)
    assert lim.allowed_hosts == server.LOOPBACK and lim.api_key is None and not lim.enable_lora_loading
    assert lim.allowed_origins == () and lim.max_body_bytes == 2 << 20
    monkeypatch.setenv("LORAKIT_API_KEY", "k1")
    args = server.server_parser().parse_args(["--host", "0.0.0.0", "--enable-lora-loading", "--max-loras", "3",
                                              "--allowed-origin", "http://a.example", "--max-body-mb", "0.5"])
    lim = server.limits_from_args(args)
    assert lim.allowed_hosts is None and lim.api_key == "k1" and lim.enable_lora_loading and lim.max_loras == 3
    assert lim.allowed_origins == ("http://a.example",) and lim.max_body_bytes == 1 << 19


def test_lorakit_serve_passes_the_flags(monkeypatch):
    from typer.testing import CliRunner

    from lorakit.cli import app

    seen = {}
    monkeypatch.setattr(server, "main", lambda argv: seen.setdefault("argv", argv))
    r = CliRunner().invoke(app, ["serve", "--api-key", "k", "--enable-lora-loading", "--max-loras", "4",
                                 "--max-model-len", "512", "--kv-budget-mb", "256", "--allowed-origin", "http://x",
                                 "--allowed-host", "h.example"])
    assert r.exit_code == 0, r.output
    args = server.server_parser().parse_args(seen["argv"])
    assert (args.api_key, args.enable_lora_loading, args.max_loras, args.max_model_len, args.kv_budget_mb) == (
        "k", True, 4, 512, 256)
    assert args.allowed_origin == ["http://x"] and args.allowed_host == ["h.example"]
