"""The testbed text-to-image model: a small text-conditioned diffusers UNet on the synthetic scenes
(``diffusion.scenes``), with frozen MiniLM per-token text states, trained by lorakit's own Trainer.

- "Latent": ``pixel_unshuffle(2)`` of the 32×32 RGB image in [−1, 1] → 12×16×16 (exact and invertible; in
  place of a VAE, lorakit's choice).
- UNet: diffusers ``UNet2DConditionModel``, channels (64, 128, 128), cross-attention at 16×16 and 8×8
  (16×16 attention maps, the resolution CLoRA reads), cross-attention width 384 (MiniLM).
- Text: all-MiniLM-L6-v2 (``lorakit.models.minilm_path``) last hidden states, padded/truncated to 24 tokens.
- Diffusion: DDPM (Ho et al., arXiv 2006.11239, Eq. 14: L = ‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t, c)‖²) with the
  cosine schedule (Nichol & Dhariwal, arXiv 2102.09672, Eq. 17; diffusers ``squaredcos_cap_v2``),
  ``clip_sample=True`` (without it this pixel-space model samples noise), 10 % caption dropout for
  classifier-free guidance (Ho & Salimans, arXiv 2207.12598: ε̂ = ε_u + g·(ε_c − ε_u)); DDIM sampling
  (Song et al., arXiv 2010.02502) in 20 steps.
- Concept LoRAs (rank 8 on q/k/v/out/ff) are trained on scenes with the held-out concepts only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.diffusion import scenes as sc
from lorakit.diffusion._deps import diffusers

MAX_TOKENS = 24
TEXT_DIM = 384
UNET_FILE = "unet.safetensors"
CONFIG_FILE = "testbed.json"


@dataclass(frozen=True)
class TestbedConfig:
    channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    train_timesteps: int = 1000
    caption_dropout: float = 0.1
    dataset_size: int = 20000
    data_seed: int = 0

    def __post_init__(self) -> None:
        if len(self.channels) != 3 or min(self.channels) < 8:
            raise ValueError(f"testbed: channels must be 3 widths >= 8, got {self.channels}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"testbed: caption_dropout must be in [0, 1), got {self.caption_dropout}")


def build_unet(config: TestbedConfig = TestbedConfig(), seed: int = 0) -> nn.Module:
    UNet2DConditionModel = diffusers().UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=16, in_channels=12, out_channels=12, block_out_channels=tuple(config.channels),
            layers_per_block=config.layers_per_block, cross_attention_dim=TEXT_DIM,
            attention_head_dim=config.attention_head_dim, norm_num_groups=min(32, min(config.channels)),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def train_scheduler(config: TestbedConfig = TestbedConfig()) -> Any:
    DDPMScheduler = diffusers().DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.train_timesteps, beta_schedule="squaredcos_cap_v2",
                         clip_sample=True, prediction_type="epsilon")


def sample_scheduler(config: TestbedConfig = TestbedConfig()) -> Any:
    DDIMScheduler = diffusers().DDIMScheduler

    return DDIMScheduler(num_train_timesteps=config.train_timesteps, beta_schedule="squaredcos_cap_v2",
                         clip_sample=True, prediction_type="epsilon", set_alpha_to_one=True)


def to_latent(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, 32, 32, 3] → float [N, 12, 16, 16] in [−1, 1] (pixel_unshuffle(2))."""
    x = torch.as_tensor(np.asarray(images)).float().permute(0, 3, 1, 2) / 127.5 - 1.0
    return F.pixel_unshuffle(x, 2)


def from_latent(latent: torch.Tensor) -> np.ndarray:
    """The inverse of :func:`to_latent`: uint8 [N, 32, 32, 3]."""
    x = F.pixel_shuffle(latent.detach().float().cpu(), 2).clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class TextEncoder:
    """Frozen all-MiniLM-L6-v2 per-token states [N, 24, 384]; ``""`` is the unconditional prompt. Caches
    captions (the scenes' captions repeat)."""

    def __init__(self, path: str | Path | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        from lorakit.models import minilm_path

        p = Path(path) if path is not None else minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(p)
        self.model = AutoModel.from_pretrained(p).eval().requires_grad_(False)
        self._cache: dict[str, torch.Tensor] = {}

    def tokens(self, caption: str) -> list[str]:
        """WordPiece tokens of ``caption`` as the encoder sees them ([CLS] first): token index i of the states."""
        ids = self.tokenizer(caption, max_length=MAX_TOKENS, truncation=True)["input_ids"]
        return self.tokenizer.convert_ids_to_tokens(ids)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        todo = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if todo:
            enc = self.tokenizer(todo, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                                 return_tensors="pt")
            states = self.model(**enc).last_hidden_state
            for c, s in zip(todo, states):
                if len(self._cache) < 100_000:
                    self._cache[c] = s
        return torch.stack([self._cache[c] if c in self._cache else self([c])[0] for c in captions])


def dataset(config: TestbedConfig = TestbedConfig(), *, concepts: tuple[str, ...] = (), size: int | None = None,
            seed: int | None = None) -> list[sc.Scene]:
    """A seeded list of scenes (base: no held-out concept; with ``concepts``: every scene uses them)."""
    rng = np.random.default_rng(config.data_seed if seed is None else seed)
    return [sc.random_scene(rng, concepts=concepts) for _ in range(size or config.dataset_size)]


class Collate:
    """Scenes → {"latent", "text"}; caption dropout (to "") with torch's RNG (restored on resume)."""

    def __init__(self, encoder: TextEncoder, dropout: float) -> None:
        self.encoder, self.dropout = encoder, dropout

    def __call__(self, items: list[sc.Scene]) -> dict[str, torch.Tensor]:
        drop = torch.rand(len(items)) < self.dropout
        captions = ["" if d else s.caption() for s, d in zip(items, drop.tolist())]
        return {"latent": to_latent(np.stack([sc.render(s) for s in items])), "text": self.encoder(captions)}


def diffusion_loss(scheduler: Any) -> Any:
    """loss_fn(model, batch) for the Trainer: the DDPM ε-prediction MSE (Ho et al., Eq. 14)."""

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x0 = batch["latent"]
        device = next(model.parameters()).device
        x0, text = x0.to(device), batch["text"].to(device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=device)
        xt = scheduler.add_noise(x0, noise, t)
        return F.mse_loss(model(xt, t, encoder_hidden_states=text).sample, noise)

    return loss


def train_base(out_dir: str | Path, *, steps: int = 6000, batch_size: int = 64, lr: float = 3e-4,
               config: TestbedConfig = TestbedConfig(), seed: int = 0, save_every: int = 200,
               progress: bool = True, resume: bool = True, device: str = "auto",
               extend: bool = False, encoder: TextEncoder | None = None) -> dict[str, Any]:
    """Train the testbed base UNet with lorakit's Trainer (progress bar, atomic checkpoints every
    ``save_every`` steps, exact resume: rerunning an interrupted run continues it); writes ``unet.safetensors``
    (fp16) + ``testbed.json`` to ``out_dir``. ``extend`` resumes a finished run with more ``steps`` (the
    Trainer's ``allow_config_change``; the change is recorded)."""
    from lorakit.train.trainer import TrainConfig, Trainer

    out = Path(out_dir)
    unet = build_unet(config, seed).train()
    data = dataset(config)
    tc = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(200, steps // 10), seed=seed,
                     out_dir=str(out), save_every=save_every, progress=progress, eval_at_start=False,
                     schedule="cosine", min_lr_ratio=0.1, device=device, allow_config_change=extend)
    trainer = Trainer(unet, data, Collate(encoder or TextEncoder(), config.caption_dropout),
                      diffusion_loss(train_scheduler(config)), tc)
    result = trainer.train(resume=resume)
    if save_every:  # the Trainer checkpoints only inside the run: keep the end too, so --extend can continue it
        trainer.save_checkpoint()
    save_base(unet, out, config)
    return {"steps": result.steps, "final_loss": result.final_loss, "seconds": result.train_seconds,
            "losses": result.losses, "resumed_from": result.resumed_from, "out_dir": str(out)}


def save_base(unet: nn.Module, out_dir: str | Path, config: TestbedConfig) -> Path:
    from safetensors.torch import save as save_bytes

    from lorakit.core import atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().half().contiguous() for k, v in unet.state_dict().items()}
    with atomic.atomic_path(out / UNET_FILE) as tmp:
        Path(tmp).write_bytes(save_bytes(tensors, metadata={"format": "pt"}))
    with atomic.atomic_path(out / CONFIG_FILE) as tmp:
        Path(tmp).write_text(json.dumps({"config": asdict(config)}, indent=2))
    return out


def load_base(folder: str | Path) -> tuple[nn.Module, TestbedConfig]:
    """The trained base UNet (fp32, eval) from ``folder`` (untrusted: core.state readers, safetensors only)."""
    from lorakit.core.state import AdapterFileError, read_float_tensors, read_json

    d = Path(folder)
    info = read_json(d / CONFIG_FILE)
    raw = info.get("config")
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{d / CONFIG_FILE}: missing 'config' object")
    try:
        config = TestbedConfig(**{k: tuple(v) if k == "channels" else v for k, v in raw.items()})
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{d / CONFIG_FILE}: invalid testbed config ({e})") from None
    unet = build_unet(config)
    tensors = read_float_tensors(d / UNET_FILE, "testbed UNet weights")
    missing, unexpected = unet.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if missing or unexpected:
        raise AdapterFileError(f"{d / UNET_FILE}: weights do not fit the config (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    return unet.eval(), config


def train_concept_lora(unet: nn.Module, concept: str, out_dir: str | Path, *, steps: int = 120, batch_size: int = 32,
                       lr: float = 1e-3, r: int = 8, seed: int = 0, config: TestbedConfig = TestbedConfig(),
                       encoder: TextEncoder | None = None, progress: bool = True, device: str = "auto") -> Path:
    """Train one concept LoRA (rank ``r`` on attention q/k/v/out and feed-forward Linears) on scenes that
    all use ``concept``, with the same diffusion loss; saved as a lorakit adapter folder in ``out_dir``."""
    import lorakit
    from lorakit.diffusion import UNET_TARGETS
    from lorakit.train.trainer import TrainConfig, Trainer

    if concept not in sc.CONCEPTS:
        raise ValueError(f"unknown concept {concept!r} (known: {sc.CONCEPTS})")
    spec = lorakit.AdapterSpec(form_args={"r": r, "alpha": float(r)}, targets=list(UNET_TARGETS))
    lorakit.attach(unet, spec, concept, seed=seed)
    lorakit.set_active(unet, [concept])
    data = dataset(config, concepts=(concept,), size=4000, seed=1000 + sc.CONCEPTS.index(concept))
    tc = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, out_dir=str(Path(out_dir) / "run"),
                     progress=progress, eval_at_start=False, device=device)
    Trainer(unet, data, Collate(encoder or TextEncoder(), config.caption_dropout),
            diffusion_loss(train_scheduler(config)), tc).train(resume=True)
    unet.requires_grad_(False)
    return lorakit.save(unet, out_dir, concept, meta={"concept": concept})


def train_base_cmd(out_dir: str = "runs/diffusion-base", steps: int = 6000, batch_size: int = 64, lr: float = 3e-4,
                   seed: int = 0, save_every: int = 200, device: str = "auto", progress: bool = True,
                   extend: bool = False) -> None:
    """Train the testbed base text-to-image UNet (resumable: rerun the same command to continue an interrupted
    run; --extend to continue a finished run with more --steps)."""
    result = train_base(out_dir, steps=steps, batch_size=batch_size, lr=lr, seed=seed, save_every=save_every,
                        progress=progress, device=device, extend=extend)
    print(f"trained {result['steps']} steps in {result['seconds']:.0f}s, final loss {result['final_loss']:.4f}; "
          f"weights in {Path(out_dir) / UNET_FILE}")


# -- generation and scoring ---------------------------------------------------------------------------


def composition_scenes(concepts: tuple[str, ...], n: int, seed: int = 0) -> list[sc.Scene]:
    """``n`` seeded prompts (scenes) that use every concept of ``concepts`` (2- or 3-concept compositions)."""
    rng = np.random.default_rng(seed)
    objs = sum(c in sc.CONCEPT_OBJECTS for c in concepts)
    return [sc.random_scene(rng, concepts=concepts, max_objects=max(2, objs)) for _ in range(n)]


def generate(composer: Any, scenes: list[sc.Scene], encoder: TextEncoder, *, seed: int = 0, steps: int = 20,
             guidance: float = 5.0, config: TestbedConfig = TestbedConfig()) -> tuple[np.ndarray, Any]:
    """Images (uint8 [N, 32, 32, 3]) of ``scenes``' captions sampled with ``composer``
    (``diffusion.composers``), and the :class:`~lorakit.diffusion.composers.Sample` record."""
    from lorakit.diffusion.composers import sample

    cond = encoder([s.caption() for s in scenes])
    uncond = encoder([""])
    out = sample(composer, cond, uncond, scheduler=sample_scheduler(config), steps=steps, guidance=guidance,
                 seed=seed)
    return from_latent(out.latents), out


def evaluate(scenes: list[sc.Scene], images: np.ndarray, *, median: bool = True) -> dict[str, float]:
    """Detector metrics over generated images: ``all_concepts`` (every concept of the prompt present),
    per-concept presence, ``leakage`` (a concept's colour/stripes on the wrong object) and ``all_correct``."""
    rows = [sc.score(s, sc.detect(img, median=median)) for s, img in zip(scenes, images)]
    out: dict[str, float] = {"images": float(len(rows))}
    for key in ("all_correct", "leakage", "background"):
        out[key] = float(np.mean([r[key] for r in rows])) if rows else float("nan")
    for c in sc.CONCEPTS:
        hits = [r[c] for r, s in zip(rows, scenes) if c in s.used_concepts()]
        if hits:
            out[c] = float(np.mean(hits))
    out["all_concepts"] = float(np.mean([all(r[c] for c in s.used_concepts()) for r, s in zip(rows, scenes)]))
    return out


def image_grid(rows: list[np.ndarray], path: str | Path, *, scale: int = 3) -> Path:
    """Save rows of images (each [N, 32, 32, 3]) as one PNG grid (rows = methods, columns = prompts)."""
    from PIL import Image

    h = max(len(r) for r in rows)
    grid = np.full((len(rows) * 34, h * 34, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            grid[i * 34 + 1:i * 34 + 33, j * 34 + 1:j * 34 + 33] = img
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(p)
    return p
