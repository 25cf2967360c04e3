"""FSDP2 on CPU: two gloo processes (torchrun) train a tiny LoRA with ``TrainConfig(fsdp=True)``; the gathered
adapter equals the one-process run on the same global batch (FSDP averages gradients over ranks as DDP does)
and both ranks hold the same tensors. Run as a script, this file is the worker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER_STEPS = 4


def main(out: str, batch_size: int, fsdp: bool) -> None:
    from safetensors.torch import save_file

    import lorakit
    from lorakit.models import tiny_llama
    from lorakit.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(3, 128, (10,), generator=g) for _ in range(48)]
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(targets="all-linear", form_args={"r": 4, "alpha": 8}), seed=0)

    def loss_fn(m, batch):
        return m(input_ids=batch, labels=batch).loss

    trainer = Trainer(model, data, torch.stack, loss_fn,
                      TrainConfig(steps=WORKER_STEPS, batch_size=batch_size, lr=1e-2, progress=False, seed=0,
                                  eval_at_start=False, fsdp=fsdp, device="cpu"))
    trainer.train(resume=False)
    state = {k: v.contiguous() for k, v in trainer.full_trainable_state().items()}
    rank = trainer.accelerator.process_index
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(state, str(Path(out) / f"rank{rank}.safetensors"))
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
    (Path(out) / f"world{trainer.accelerator.num_processes}-sharded{int(sharded)}").write_text("")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp_two_cpu_processes_equal_one_process(tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, str(tmp_path / "fsdp"), "4", "1"]
    run = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    subprocess.run([sys.executable, __file__, str(tmp_path / "one"), "8", "0"], check=True, env=env, timeout=300,
                   capture_output=True)
    assert (tmp_path / "fsdp" / "world2-sharded1").exists()  # really sharded, not DDP
    r0, r1 = (load_file(str(tmp_path / "fsdp" / f"rank{r}.safetensors")) for r in (0, 1))
    single = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    assert set(r0) == set(single) and len(r0) == 28
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], single[k], rtol=1e-3, atol=1e-5)  # Adam on reduce-scattered grads
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in r0.items() if "lora_B" in k)


def test_fsdp_refuses_checkpoints():
    from lorakit.train import TrainConfig

    with pytest.raises(ValueError, match="fsdp"):
        TrainConfig(fsdp=True, save_every=2)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), bool(int(sys.argv[3])))
