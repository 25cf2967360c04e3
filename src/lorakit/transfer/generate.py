"""Candidate inputs for Trans-LoRA: a model continues a few-shot list of the seed inputs.

Trans-LoRA (Wang et al., NeurIPS 2024, arXiv 2405.17258, Fig. 1/2): the target model M_t, "prompted with
a few real seeds", synthesises task inputs; at source-training time the source model does the same to
give the discriminator its fake class. The prompt (LATER-ROWS §1.5, lorakit's choice) is

    "{input_name}: {seed_1}\\n ... {input_name}: {seed_k}\\n{input_name}:"

with the k seeds shuffled per candidate; sampling (temperature, top-p) follows TiTok's
``generate_synthetic_queries.py`` (temperature 1.0, top-p 0.9) with lorakit's top-p 0.95 default; the
continuation is cut at the first newline (single-line inputs, as TiTok's format validation).
Generation is batched through lorakit's serving engine (continuous batching, dense KV cache).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorakit.core.state import AdapterState
from lorakit.data.collate import _encode


class GenerationError(ValueError):
    """Generation that cannot start (no seeds, a prompt longer than the context)."""


_NEWLINE_IDS: dict[tuple[int, int], frozenset[int]] = {}


def newline_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of every token whose text holds a newline (decoding stops there); cached per tokenizer."""
    size = len(tokenizer)
    key = (id(tokenizer), size)
    if key not in _NEWLINE_IDS:
        texts = tokenizer.batch_decode([[i] for i in range(size)])
        _NEWLINE_IDS[key] = frozenset(i for i, t in enumerate(texts) if "\n" in t)
    return _NEWLINE_IDS[key]


def few_shot_prompt(seeds: Sequence[str], input_name: str = "Text") -> str:
    """The few-shot list whose next line the model writes."""
    return "".join(f"{input_name}: {' '.join(s.split())}\n" for s in seeds) + f"{input_name}:"


def clean_candidate(text: str) -> str:
    """The first line of a continuation, whitespace-normalised."""
    return " ".join(text.split("\n", 1)[0].split())


def generate_candidates(model: nn.Module, tokenizer: Any, seeds: Sequence[str], n: int, *,
                        temperature: float = 1.0, top_p: float = 0.95, max_new_tokens: int = 40,
                        shots: int | None = None, input_name: str = "Text", seed: int = 0, max_batch: int = 32,
                        adapter: AdapterState | None = None, targets: Sequence[str] = ("q_proj", "v_proj"),
                        dedupe: bool = True, max_rounds: int = 3, progress: Any = None,
                        continuous: bool = False) -> list[str]:
    """``n`` single-line candidate inputs sampled from ``model`` (plus ``adapter`` if given, served by the
    engine's adapter bank; adapters already attached to ``model`` apply as they are).

    Empty lines, seed copies and (with ``dedupe``) repeats are dropped; up to ``max_rounds`` rounds of
    sampling top the list up to ``n``. ``progress(done, total)`` is called after each round.

    ``continuous=False`` (default) submits waves of ``max_batch`` requests, each run until its rows have
    all finished: with Gemma-3 (sliding-window layers) a request JOINING a running batch of the dense-cache
    engine fails with an attention-mask/key-length mismatch (lorakit 0.x, transformers 5.25); rows leaving
    are fine. ``continuous=True`` lets requests join as rows finish (faster where the engine supports it).
    """
    from lorakit.serving.bank import AdapterBank
    from lorakit.serving.engine import Request, ServingEngine, unserve_model

    if not seeds:
        raise GenerationError("few-shot generation needs at least one seed input")
    if n < 1:
        raise GenerationError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    shots = min(shots or len(seeds), len(seeds))
    bos = [int(tokenizer.bos_token_id)] if getattr(tokenizer, "bos_token_id", None) is not None else []
    stop = sorted(newline_token_ids(tokenizer))
    eos = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    bank = AdapterBank.for_model(model, targets=targets, budget_bytes=_bank_bytes(model, targets, adapter))
    name = None
    if adapter is not None:
        name = "source"
        bank.add(name, adapter)
    seen = {" ".join(s.split()) for s in seeds}
    out: list[str] = []
    engine = ServingEngine(model, bank, max_batch=max_batch, eos_token_id=eos,
                           pad_token_id=int(tokenizer.pad_token_id or 0),
                           max_context=getattr(model.config, "max_position_embeddings", 2048))
    try:
        for round_ in range(max_rounds):
            want = n - len(out)
            if want <= 0:
                break
            ask = want if round_ == 0 else int(want * 1.5) + 1
            reqs = []
            for _ in range(ask):
                shown = rng.sample(list(seeds), shots)
                prompt = bos + _encode(tokenizer, [few_shot_prompt(shown, input_name)])[0]
                reqs.append(Request(prompt=prompt, adapter=name, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p, seed=rng.randrange(1 << 31),
                                    stop_token_ids=stop))
            with torch.no_grad():
                if continuous:
                    engine.generate(reqs)
                else:  # waves of max_batch requests: rows leave early, none join a running batch
                    for start in range(0, len(reqs), max_batch):
                        engine.generate(reqs[start:start + max_batch])
            for r in reqs:
                if r.error:
                    raise GenerationError(f"generation failed: {r.error}")
                text = clean_candidate(tokenizer.decode(r.tokens, skip_special_tokens=True))
                if not text or text in seen:
                    continue
                if dedupe:
                    seen.add(text)
                out.append(text)
                if len(out) >= n:
                    break
            if progress is not None:
                progress(len(out), n)
    finally:
        unserve_model(model)
    return out[:n]


def _bank_bytes(model: nn.Module, targets: Sequence[str], adapter: AdapterState | None) -> int:
    # room for one adapter of the given rank (at least 16) in every target layer, fp32
    rank = 16
    if adapter is not None:
        rank = max([rank, *(min(t.shape) for t in adapter.tensors.values() if t.dim() == 2)])
    total = 0
    for p, m in model.named_modules():
        base = getattr(m, "base_layer", m)
        if isinstance(base, nn.Linear) and p.rpartition(".")[2] in targets:
            total += (base.in_features + base.out_features) * (rank + 4) * 4
    return max(total, 1 << 16)
