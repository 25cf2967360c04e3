"""Worker for the multi-process test: trains a tiny LoRA with the lorakit Trainer under torchrun
(gloo, CPU) and writes each rank's adapter tensors so the test can compare them."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import lorakit
from lorakit.models import tiny_llama
from lorakit.train import TrainConfig, Trainer


def main(out: str, batch_size: int) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(3, 128, (10,), generator=g) for _ in range(48)]
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}), seed=0)

    def loss_fn(m, batch):
        return m(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    trainer = Trainer(model, data, lambda items: {"input_ids": torch.stack(items)}, loss_fn,
                      TrainConfig(steps=6, batch_size=batch_size, lr=1e-2, progress=False, seed=0))
    result = trainer.train(resume=False)
    rank = trainer.accelerator.process_index
    state = lorakit.extract_state(model)
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(state.tensors, str(Path(out) / f"rank{rank}.safetensors"))
    (Path(out) / f"rank{rank}.loss").write_text(repr(result.losses))
    (Path(out) / f"world{trainer.accelerator.num_processes}").write_text("")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
