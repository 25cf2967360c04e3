"""Shared builders for the serving tests: PEFT adapters with random weights on a tiny Llama."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
# mixed ranks, rsLoRA, different target sets, per-module ranks (rank_pattern)
CONFIGS = {
    "a": dict(r=4, lora_alpha=8, target_modules=QKVO),
    "b": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    "c": dict(r=6, lora_alpha=3, target_modules=["k_proj", "o_proj"], rank_pattern={"o_proj": 2}),
    "d": dict(r=1, lora_alpha=2, target_modules=["o_proj"]),
}


BPE_CORPUS = "héllo wörld 日本語 🎉 naïve café Ωμέγα ü "


def byte_bpe_tokenizer(corpus: str = BPE_CORPUS, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained offline on non-ASCII text: its tokens split multi-byte characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator([corpus * 20], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_base():
    from lorakit.models import tiny_llama

    return tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)


def write_peft_adapters(base, root: Path, configs=None, seed: int = 0) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    configs = configs or CONFIGS
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, cfg in configs.items():
        m = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **cfg))
        with torch.no_grad():
            for pname, p in m.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        m.save_pretrained(str(root / name))
        out[name] = root / name
    return out


def peft_reference(base, adapter_dir: Path | None):
    from peft import PeftModel

    model = copy.deepcopy(base)
    return model if adapter_dir is None else PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def reference_logits(ref, prompt, tokens) -> torch.Tensor:
    """Logits of ``ref`` at the positions that produced each generated token."""
    full = torch.tensor([list(prompt) + list(tokens[:-1])])
    with torch.no_grad():
        return ref(full).logits[0, len(prompt) - 1:]


def base_dirs_refs(root: Path):
    """(tiny base, PEFT adapter dirs, PEFT reference model per adapter name; None = the base alone)."""
    base = tiny_base()
    dirs = write_peft_adapters(base, root)
    refs = {name: peft_reference(base, d) for name, d in dirs.items()}
    refs[None] = copy.deepcopy(base)
    return base, dirs, refs


def make_engine(base, dirs: dict[str, Path], budget: int = 1 << 20, names=None, page_rows: int = 4, **kwargs):
    """A ServingEngine over a copy of ``base`` with the adapters ``names`` (default: all of ``dirs``) in its bank."""
    from lorakit.serving import AdapterBank, ServingEngine

    model = copy.deepcopy(base)
    bank = AdapterBank.for_model(model, budget_bytes=budget, page_rows=page_rows)
    for name in names or dirs:
        bank.add(name, dirs[name])
    return ServingEngine(model, bank, **kwargs)
