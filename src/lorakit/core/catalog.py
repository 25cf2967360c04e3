"""THE registry of methods: one line per method.

Each line is (axis, name, "module:Object", paper, arXiv id). Adding a method = one file in its axis
folder plus one line here. `lorakit methods` reads this table without importing the methods.
"""

from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
    axis: str
    name: str
    target: str  # "module:Object", imported lazily
    paper: str
    arxiv: str


AXES = ("form", "init", "strategy", "merge", "route", "retrieve", "federated", "serving", "generate")

CATALOG: tuple[Entry, ...] = (
    Entry("form", "lora", "lorakit.forms.lora:LoRA", "LoRA: Low-Rank Adaptation of LLMs (Hu et al., 2021); rsLoRA (Kalajdzievski, 2023)", "2106.09685, 2312.03732"),
    Entry("form", "ffa", "lorakit.forms.lora:FFALoRA", "FFA-LoRA: Improving LoRA in Privacy-preserving Federated Fine-tuning (Sun et al., ICLR 2024)", "2403.12313"),
    # forms-group-A (dora, lora_xs, slora, nlora, inttune)
    # forms-group-B (dylora, loldu, block_lora)
    # forms-group-C (bone, miss, shira)
    # forms-group-D (flylora, smora, nola)
    # forms-group-E (randlora)
    Entry("init", "default", "lorakit.inits.basic:DefaultInit", "The form's own paper initialization", "-"),
    Entry("init", "kaiming", "lorakit.inits.basic:KaimingInit", "LoRA default: A ~ Kaiming-uniform, B = 0 (Hu et al., 2021)", "2106.09685"),
    Entry("init", "gaussian", "lorakit.inits.basic:GaussianInit", "LoRA with A ~ N(0, 1/r), B = 0 (Hu et al., 2021)", "2106.09685"),
)  # fmt: skip
