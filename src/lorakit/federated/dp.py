"""DP-SGD for federated clients with opacus: per-sample clipping, Gaussian noise, RDP accounting.

Sample-level (local) DP as federated LoRA papers use it (Sun et al., ICLR 2024, arXiv 2403.12313):
each step the client samples a Poisson batch (rate q = B/n_k), clips every example's gradient to
norm C, adds N(0, σ²C²) to the sum and divides by the expected batch size B (Abadi et al., CCS 2016,
arXiv 1607.00133). ε at δ comes from opacus' RDP accountant. Flower's own DP wrappers are
client-level DP, a different guarantee.

opacus computes per-sample gradients with hooks on the modules it knows (nn.Linear, ...). A lorakit
adapter runs inside :class:`~lorakit.core.layer.AdaptedLayer` through ``form.apply``, which opacus
cannot see, so for the duration of DP training :func:`dp_view` swaps each adapted layer for a
module made of plain ``nn.Linear`` layers that *share* the form's parameters:
``base(x) + s·lora_B(lora_A(dropout(x)))`` — the same function as the LoRA form's ``apply``. Frozen
tensors (a seeded, frozen A) stay frozen, so opacus clips and noises B only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.inject import _set_submodule, adapted_layers


class DPLoRALinear(nn.Module):
    """base(x) + s·(B(A(dropout(x))) + bias): a LoRA form as plain Linears opacus can hook."""

    def __init__(self, base: nn.Module, form: nn.Module) -> None:
        super().__init__()
        self.base = base
        r = form.lora_A.shape[0]
        self.lora_A = nn.Linear(form.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, form.out_features, bias=form.lora_bias is not None)
        del self.lora_A.weight, self.lora_B.weight
        self.lora_A.weight = form.lora_A  # the same Parameter objects: training updates the form
        self.lora_B.weight = form.lora_B
        if form.lora_bias is not None:
            del self.lora_B.bias
            self.lora_B.bias = form.lora_bias
        self.dropout = form.dropout
        self.scaling = form.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


@contextlib.contextmanager
def dp_view(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Swap every layer adapted by ``name`` for a :class:`DPLoRALinear` for the duration."""
    swapped = []
    try:
        for path, layer in list(adapted_layers(model)):
            if name not in layer.adapters:
                continue
            form = layer.adapters[name]
            if Cap.FACTORED_AB not in form.caps or len(layer.adapters) != 1 or layer.merged:
                raise ValueError(f"DP-SGD supports one unmerged B·A factored adapter per layer; {path} has "
                                 f"{list(layer.adapters)} (form {form.name!r})")
            _set_submodule(model, path, DPLoRALinear(layer.base_layer, form).train(layer.training))
            swapped.append((path, layer))
        yield model
    finally:
        for path, layer in swapped:
            _set_submodule(model, path, layer)


class PrivateStep:
    """opacus' GradSampleModule + DPOptimizer around a model in :func:`dp_view`.

    ``loss = step.model(...)`` computes per-sample gradients on backward; :meth:`step` clips,
    adds noise (from the seeded ``generator``) and steps; :meth:`empty_step` is the noise-only step
    of an empty Poisson batch.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, generator: torch.Generator | None = None) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        model.train()  # opacus records activations in training mode only
        self.model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                     expected_batch_size=expected_batch_size, loss_reduction="mean",
                                     generator=generator)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def empty_step(self) -> None:
        for p in self.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.step()

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model._close()  # removes the hooks and the grad_sample attributes
        for p in self.params:
            for attr in ("grad_sample", "summed_grad", "_processed"):
                if hasattr(p, attr):
                    delattr(p, attr)


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps (opacus' RDP accountant)."""
    if noise_multiplier <= 0:
        return float("inf")
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise_multiplier, min(1.0, sample_rate), steps)]
    return float(acc.get_epsilon(delta=delta))
