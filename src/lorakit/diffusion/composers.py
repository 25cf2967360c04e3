"""Multi-LoRA composition for text-to-image sampling behind one per-step interface, and the baselines.

A :class:`Composer` is called by the sampling loop once per denoising step (``prepare`` may first move the
latents, for methods that optimise them): given the latents z_t, the
timestep t, the step index and the prompt embeddings (conditional, unconditional), it returns the guided
noise prediction ε̂ and counts its UNet passes (one pass = one UNet evaluation of the CFG pair
[uncond; cond] with one adapter configuration, the papers' cost unit). The LoRAs are adapters installed
on the UNet (``lorakit.attach``/``load``/``apply_state``, e.g. from kohya files via ``lora_files``).

Classifier-free guidance (Ho & Salimans, arXiv 2207.12598): ε̂ = ε_u + g·(ε_c − ε_u).

Baselines (``METHODS.md`` §10; Multi-LoRA-Composition, Zhong et al., arXiv 2402.16843, official code
maszhongming/Multi-LoRA-Composition):

- ``merge``: every step one pass with ΔW = Σ_i w_i·s_i·B_i·A_i (the exact weighted sum, as diffusers'
  ``set_adapters(names, weights)``), built by ``compose.merge.linear`` (task arithmetic, arXiv 2212.04089)
  when all LoRAs adapt Linear layers; with Conv2d targets the runtime adds the same weighted ΔW·x at
  forward time (``lorakit.mixing``; exact, since each layer is linear in ΔW).
- ``switch`` (LoRA Switch): one active LoRA, rotated every ``k`` = 5 steps. Official code (``callbacks.py``,
  ``callback_on_step_end``): the switch happens at the end of step i when i > 0 and i % k == 0, so LoRA
  0 runs steps 0..k, then each LoRA k steps: active(i) = ⌊(i − 1)/k⌋ mod N (i ≥ 1), 0 at i = 0.
- ``composite`` (LoRA Composite): every step one pass per LoRA (only that LoRA active);
  ε_u = mean_i ε_u^(i), ε_c = mean_i ε_c^(i), then CFG (``pipeline_0.26.3.py``): N passes per step.
- ``lorahub`` (Huang et al., arXiv 2307.13269): weights w searched gradient-free on a few-shot objective
  (``compose.merge.lorahub``: Â = Σ w_i A_i, B̂ = Σ w_i B_i, L1 0.05, w ∈ [−1.5, 1.5]); here the objective is
  the diffusion ε-MSE on few-shot (latent, caption) examples at fixed noise and timesteps (lorakit's
  choice: the paper's tasks are text). Then sampled as one merged adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.core.spec import NoArgs, build_args

Cond = torch.Tensor | Sequence[torch.Tensor]


class ComposeError(ValueError):
    """Bad composition input (unknown LoRA names, weights that do not match, ...)."""


def cfg(eps_u: torch.Tensor, eps_c: torch.Tensor, guidance: float) -> torch.Tensor:
    """ε̂ = ε_u + g·(ε_c − ε_u)."""
    return eps_u + guidance * (eps_c - eps_u)


class Composer:
    """Base class: ``Composer(unet, loras, weights, **args)``; the loop calls :meth:`setup` once, then
    :meth:`noise` per step, then :meth:`teardown`. ``passes`` counts UNet passes, ``calls`` UNet calls."""

    name: ClassVar[str] = ""
    Args: ClassVar[type] = NoArgs

    def __init__(self, unet: nn.Module, loras: Sequence[str], weights: Sequence[float] | None = None,
                 **args: Any) -> None:
        self.args = build_args(self.Args, args, owner=f"composer {self.name!r}")
        self.unet = unet
        self.loras = list(loras)
        known = lorakit.specs(unet)
        missing = [n for n in self.loras if n not in known]
        if not self.loras or missing:
            raise ComposeError(f"composer {self.name!r}: LoRAs {missing or '(none given)'} are not adapters of the "
                               f"UNet (installed: {sorted(known)})")
        self.weights = [1.0] * len(self.loras) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.loras):
            raise ComposeError(f"{len(self.weights)} weight(s) for {len(self.loras)} LoRA(s)")
        self.passes = 0
        self.calls = 0
        self.total_steps: int | None = None  # set by the sampling loop before setup()

    def setup(self) -> None:
        """Before the first step (build merged adapters, search weights, ...)."""

    def teardown(self) -> None:
        """After the last step (remove what setup added; leave the UNet as it was)."""

    def prepare(self, latents: torch.Tensor, t: torch.Tensor, step: int, cond: Cond,
                uncond: torch.Tensor) -> torch.Tensor:
        """The latents this step denoises: unchanged, or moved by a latent-optimising method (CLoRA)."""
        return latents

    def noise(self, latents: torch.Tensor, t: torch.Tensor, step: int, cond: Cond, uncond: torch.Tensor,
              guidance: float) -> torch.Tensor:
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------------
    def cond_for(self, cond: Cond, i: int) -> torch.Tensor:
        """The conditional embedding of LoRA ``i`` (one tensor for all, or one per LoRA)."""
        return cond if isinstance(cond, torch.Tensor) else cond[i]

    def run_pair(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                 passes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε_u, ε_c) from one UNet call on [uncond; cond] with the adapters active now."""
        n = latents.shape[0]
        x = torch.cat([latents, latents])
        emb = torch.cat([uncond.expand(n, *uncond.shape[1:]), cond.expand(n, *cond.shape[1:])])
        out = self.unet(x, t, encoder_hidden_states=emb).sample
        self.passes += passes
        self.calls += 1
        return out[:n], out[n:]


class MergeComposer(Composer):
    """One pass per step with the exact weighted ΔW sum of the LoRAs (see the module docstring)."""

    name = "merge"
    MERGED = "__merge__"

    def setup(self) -> None:
        from lorakit.compose.merge import merge
        from lorakit.compose.merge.parts import MergeInputError
        from lorakit.core.factors import FactorError

        self._previous = lorakit.active_adapters(self.unet)
        self._runtime = False
        try:
            state = merge([lorakit.extract_state(self.unet, n) for n in self.loras], "linear", self.weights)
        except (FactorError, MergeInputError) as e:
            if "conv2d" not in str(e):
                raise
            self._runtime = True  # Conv2d factors: the same weighted sum, added at forward time
            return
        lorakit.apply_state(self.unet, state, self.MERGED)
        lorakit.set_active(self.unet, [self.MERGED])

    def teardown(self) -> None:
        if not self._runtime:
            lorakit.delete(self.unet, self.MERGED)
        lorakit.set_active(self.unet, [a for a in self._previous if a in lorakit.specs(self.unet)])

    def noise(self, latents, t, step, cond, uncond, guidance):
        if self._runtime:
            with lorakit.mixing(self.loras, torch.tensor(self.weights)):
                eps_u, eps_c = self.run_pair(latents, t, self.cond_for(cond, 0), uncond)
        else:
            eps_u, eps_c = self.run_pair(latents, t, self.cond_for(cond, 0), uncond)
        return cfg(eps_u, eps_c, guidance)


@dataclass(frozen=True)
class SwitchArgs:
    k: int = 5  # switch_step of the official code

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"switch: k must be >= 1, got {self.k}")


class SwitchComposer(Composer):
    """LoRA Switch: one LoRA active per step, rotated every k steps (official schedule, module docstring)."""

    name = "switch"
    Args = SwitchArgs

    def active_index(self, step: int) -> int:
        return 0 if step == 0 else ((step - 1) // self.args.k) % len(self.loras)

    def setup(self) -> None:
        self._previous = lorakit.active_adapters(self.unet)

    def teardown(self) -> None:
        lorakit.set_active(self.unet, list(self._previous))

    def noise(self, latents, t, step, cond, uncond, guidance):
        i = self.active_index(step)
        lorakit.set_active(self.unet, [self.loras[i]])
        return cfg(*self.run_pair(latents, t, self.cond_for(cond, i), uncond), guidance)


@dataclass(frozen=True)
class CompositeArgs:
    batched: bool = False  # True: the N passes run as one UNet call with per-row adapter ids (same result)


class CompositeComposer(Composer):
    """LoRA Composite: mean over LoRAs of ε_u and of ε_c (one pass per LoRA), then CFG."""

    name = "composite"
    Args = CompositeArgs

    def setup(self) -> None:
        self._previous = lorakit.active_adapters(self.unet)

    def teardown(self) -> None:
        lorakit.set_active(self.unet, list(self._previous))

    def per_lora(self, latents, t, cond, uncond) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(ε_u^(i), ε_c^(i)) for every LoRA i (only LoRA i active)."""
        n, m = latents.shape[0], len(self.loras)
        if self.args.batched:
            x = torch.cat([latents] * (2 * m))
            emb = torch.cat([torch.cat([uncond.expand(n, *uncond.shape[1:]),
                                        self.cond_for(cond, i).expand(n, *uncond.shape[1:])]) for i in range(m)])
            rows = [name for name in self.loras for _ in range(2 * n)]
            with lorakit.mixed_batch(self.unet, rows):
                out = self.unet(x, t, encoder_hidden_states=emb).sample
            self.passes += m
            self.calls += 1
            return [(out[2 * n * i:2 * n * i + n], out[2 * n * i + n:2 * n * (i + 1)]) for i in range(m)]
        pairs = []
        for i, name in enumerate(self.loras):
            lorakit.set_active(self.unet, [name])
            pairs.append(self.run_pair(latents, t, self.cond_for(cond, i), uncond))
        return pairs

    def noise(self, latents, t, step, cond, uncond, guidance):
        pairs = self.per_lora(latents, t, cond, uncond)
        eps_u = torch.stack([p[0] for p in pairs]).mean(0)
        eps_c = torch.stack([p[1] for p in pairs]).mean(0)
        return cfg(eps_u, eps_c, guidance)


@dataclass(frozen=True)
class LoraHubComposeArgs:
    budget: int = 40
    optimizer: str = "random"  # "ngopt" needs nevergrad (the official optimizer); "random" needs nothing
    seed: int = 42


class LoraHubComposer(MergeComposer):
    """LoraHub: weights searched on few-shot (latent, caption embedding) examples, then one merged pass per
    step. ``examples`` = (x0 [M, C, H, W], text [M, T, D]); the objective is the ε-MSE at fixed noise and
    timesteps (seeded), plus LoraHub's 0.05·mean|w| (added by ``compose.merge.lorahub``)."""

    name = "lorahub"
    Args = LoraHubComposeArgs

    def __init__(self, unet: nn.Module, loras: Sequence[str], weights: Sequence[float] | None = None, *,
                 examples: tuple[torch.Tensor, torch.Tensor] | None = None, scheduler: Any = None,
                 **args: Any) -> None:
        super().__init__(unet, loras, weights, **args)
        if examples is None or scheduler is None:
            raise ComposeError("composer 'lorahub' needs few-shot examples=(latents, text) and the training scheduler")
        self.examples, self.scheduler = examples, scheduler
        self.report: dict[str, Any] = {}
        self.search_passes = 0

    def objective(self) -> Callable[[nn.Module], float]:
        x0, text = self.examples
        g = torch.Generator().manual_seed(self.args.seed)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g)
        xt = self.scheduler.add_noise(x0, noise, t)

        def loss(model: nn.Module) -> float:
            with torch.no_grad():
                return float(F.mse_loss(model(xt, t, encoder_hidden_states=text).sample, noise))

        return loss

    def setup(self) -> None:
        from lorakit.compose.merge.lorahub import LoraHubMerge

        self._previous = lorakit.active_adapters(self.unet)
        self._runtime = False
        states = [lorakit.extract_state(self.unet, n) for n in self.loras]
        lorakit.set_active(self.unet, [])
        hub = LoraHubMerge(budget=self.args.budget, optimizer=self.args.optimizer, seed=self.args.seed)
        state = hub.search(self.unet, states, loss_fn=self.objective())
        self.report = state.meta["merge"]["lorahub"]
        self.weights = list(self.report["weights"])
        self.search_passes = self.report["evaluations"]  # one UNet pass over the examples per evaluation
        lorakit.apply_state(self.unet, state, self.MERGED)
        lorakit.set_active(self.unet, [self.MERGED])


COMPOSERS: dict[str, type[Composer]] = {c.name: c for c in (MergeComposer, SwitchComposer, CompositeComposer,
                                                           LoraHubComposer)}


@dataclass
class Sample:
    latents: torch.Tensor
    passes: int
    calls: int
    seconds: float


@torch.no_grad()
def sample(composer: Composer, cond: Cond, uncond: torch.Tensor, *, scheduler: Any, steps: int = 20,
           guidance: float = 5.0, seed: int = 0, shape: tuple[int, ...] = (12, 16, 16), n: int | None = None,
           callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> Sample:
    """The sampling loop: z_T ~ N(0, I) (seeded), then per scheduler timestep ε̂ = composer.noise(...) and
    z ← scheduler.step(ε̂, t, z). ``n`` images (default: the batch of ``cond``)."""
    import time

    first = cond if isinstance(cond, torch.Tensor) else cond[0]
    n = n or first.shape[0]
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((n, *shape), generator=g) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    start = time.perf_counter()
    composer.total_steps = len(scheduler.timesteps)
    composer.setup()
    try:
        for i, t in enumerate(scheduler.timesteps):
            latents = composer.prepare(latents, t, i, cond, uncond)
            eps = composer.noise(scheduler.scale_model_input(latents, t), t, i, cond, uncond, guidance)
            latents = scheduler.step(eps, t, latents).prev_sample
            if callback is not None:
                callback(i, t, latents)
    finally:
        composer.teardown()
    return Sample(latents, composer.passes, composer.calls, time.perf_counter() - start)
