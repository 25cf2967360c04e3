"""Trans-LoRA's discriminator: trained at source-training time, while the real task data exist, and kept
next to the source adapter.

Trans-LoRA (Wang et al., NeurIPS 2024, arXiv 2405.17258, Fig. 1/2, step 1): after θ_s is trained on D,
the source model synthesises inputs from the seeds and a discriminator learns real (D) vs synthetic.
At transfer time it filters the target model's candidates (:mod:`lorakit.transfer.filters`). Two kinds:

- ``lora`` (paper-like): a LoRA on the source BASE model that answers " real" / " fake" to
  ``"Is the text a real example or a synthetic one?\\nText: x\\nAnswer:"``; P(real | x) is the softmax
  over the two label strings' log-probs (:mod:`lorakit.transfer.labels`), trained with cross-entropy on
  equal numbers of real and synthetic inputs.
- ``embedding`` (cheap, lorakit's choice): logistic regression on standardised mean-pooled MiniLM
  embeddings e(x): P(real | x) = σ(wᵀ (e(x) − μ)/σ_e + b), fit by full-batch L-BFGS on the mean
  binary cross-entropy + λ‖w‖²/2.

Saved layout: ``<adapter>/trans_lora_discriminator/`` with ``discriminator.json`` (kind, labels, prompt,
encoder, training counts and accuracy) plus ``logreg.safetensors`` (``weight`` [D], ``bias`` [1], ``mean``
[D], ``scale`` [D]) or ``adapter/`` (a PEFT/lorakit LoRA folder). Everything is read back under the
untrusted-file rules of ``core/state.py`` (size-capped JSON, safetensors only, finite floats, shapes
checked); a corrupt folder raises :class:`DiscriminatorFileError`.

What leaves the client at transfer time: the source adapter folder, which now holds this discriminator
(the ``embedding`` kind also carries μ and σ_e, the per-dimension mean and spread of the real and
synthetic embeddings it was fit on, i.e. aggregate statistics of D) and the seed examples the client
agrees to share. No other real example leaves.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.core import atomic
from lorakit.core.state import AdapterFileError, read_float_tensors, read_json, save_file
from lorakit.data.tasks import Example, Task

DISCRIMINATOR_DIR = "trans_lora_discriminator"
META_FILE = "discriminator.json"
LOGREG_FILE = "logreg.safetensors"
LORA_DIR = "adapter"
FORMAT = "lorakit.trans_lora_discriminator"
FORMAT_VERSION = 1
KINDS = ("embedding", "lora")
DISC_LABELS = ["real", "fake"]
DISC_INSTRUCTION = "Is the text a real example or a synthetic one?"
ADAPTER_NAME = "trans_lora_discriminator"
MAX_DIM = 1 << 16

Encoder = Callable[[Sequence[str]], torch.Tensor]


class DiscriminatorFileError(AdapterFileError):
    """A saved discriminator that is missing, corrupt, or does not fit (shapes, kinds, encoder)."""


def discriminator_task() -> Task:
    """The real/fake label-scoring task of the ``lora`` discriminator."""
    return Task(name="trans_lora_discriminator", kind="classification", labels=list(DISC_LABELS), train=[],
                eval=[], source="trans-lora", license="n/a", instruction=DISC_INSTRUCTION, answer_prefix="Answer")


# ----------------------------------------------------------------------------- encoder

class MiniLMEncoder:
    """Mean-pooled (attention-masked) last hidden states of the embedded all-MiniLM-L6-v2, L2-normalised."""

    name = "minilm"

    def __init__(self, batch_size: int = 64, max_length: int = 128) -> None:
        from transformers import AutoModel, AutoTokenizer

        from lorakit.models import minilm_path

        path = minilm_path()
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[s:s + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"][..., None].float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1))
        return torch.cat(out) if out else torch.empty(0, 384)


_ENCODERS: dict[str, Callable[[], Encoder]] = {"minilm": MiniLMEncoder}


# ----------------------------------------------------------------------------- discriminators

@dataclass
class EmbeddingDiscriminator:
    """P(real | x) = σ(wᵀ (e(x) − μ)/σ_e + b) on a text encoder's embeddings."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    encoder: Encoder
    encoder_name: str = "minilm"
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    kind: str = "embedding"

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        z = (embeddings.double() - self.mean.double()) / self.scale.double()
        return z @ self.weight.double() + self.bias.double()

    def prob_real(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.empty(0, dtype=torch.float64)
        return torch.sigmoid(self.logits(self.encoder(texts)))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.float().contiguous(), "bias": self.bias.float().reshape(1).contiguous(),
                   "mean": self.mean.float().contiguous(), "scale": self.scale.float().contiguous()}
        atomic.write_with(folder / LOGREG_FILE, lambda p: save_file(tensors, str(p)))
        atomic.write_json(folder / META_FILE, {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind,
                                               "encoder": self.encoder_name, "dim": int(self.weight.numel()),
                                               "info": self.info})
        return folder


@dataclass
class LoraDiscriminator:
    """A LoRA on the source base model answering " real" / " fake"; bound to that model to score."""

    state: Any  # AdapterState
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: nn.Module | None = None
    tokenizer: Any = None
    max_length: int = 128
    batch_size: int = 16
    kind: str = "lora"

    def bind(self, model: nn.Module, tokenizer: Any) -> LoraDiscriminator:
        """Score with ``model`` (the source base, other adapters may be attached: they are switched off)."""
        self.model, self.tokenizer = model, tokenizer
        return self

    def prob_real(self, texts: Sequence[str]) -> torch.Tensor:
        import lorakit
        from lorakit.core.inject import active_adapters, delete, set_active, specs
        from lorakit.transfer.labels import label_distribution

        if self.model is None:
            raise ValueError("a LoRA discriminator scores with the source base model: call bind(model, tokenizer)")
        if not texts:
            return torch.empty(0, dtype=torch.float64)
        model, before = self.model, active_adapters(self.model)
        if ADAPTER_NAME in specs(model):
            delete(model, ADAPTER_NAME)
        lorakit.apply_state(model, self.state, ADAPTER_NAME, activate=False, where="discriminator")
        try:
            set_active(model, [ADAPTER_NAME])
            probs = label_distribution(model, self.tokenizer, discriminator_task(), texts,
                                       batch_size=self.batch_size, max_length=self.max_length)
        finally:
            delete(model, ADAPTER_NAME)
            if before:
                set_active(model, before)
        return probs[:, 0].double()

    def save(self, folder: str | Path) -> Path:
        from lorakit.io.peft import save_state

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_state(self.state, folder / LORA_DIR)
        atomic.write_json(folder / META_FILE, {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind,
                                               "labels": DISC_LABELS, "instruction": DISC_INSTRUCTION,
                                               "max_length": self.max_length, "info": self.info})
        return folder


Discriminator = EmbeddingDiscriminator | LoraDiscriminator


# ----------------------------------------------------------------------------- training

def _fit_logreg(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-2, iters: int = 200) -> tuple[torch.Tensor, ...]:
    x = x.double()
    mean, scale = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / scale
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.double()) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mean, scale


def train_discriminator(real: Sequence[str], fake: Sequence[str], *, kind: str = "embedding",
                        encoder: Encoder | None = None, encoder_name: str = "minilm",
                        source_model: nn.Module | None = None, source_tokenizer: Any = None, steps: int = 60,
                        batch_size: int = 8, lr: float = 5e-4, r: int = 8, alpha: float = 16.0,
                        targets: Sequence[str] = ("q_proj", "v_proj"), l2: float = 1e-2, seed: int = 0,
                        max_length: int = 128, progress: bool = False) -> Discriminator:
    """Fit a real-vs-synthetic discriminator (``kind`` ``embedding`` or ``lora``; see the module doc).

    The ``lora`` kind trains a fresh adapter on ``source_model`` with the model's other adapters switched
    off and frozen (their ``requires_grad`` and the active set are restored afterwards) and removes it
    again: the model comes back as it was.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown discriminator kind {kind!r}; known: {', '.join(KINDS)}")
    if not real or not fake:
        raise ValueError(f"a discriminator needs real and synthetic texts (got {len(real)} real, {len(fake)} fake)")
    info = {"n_real": len(real), "n_fake": len(fake), "seed": seed}
    if kind == "embedding":
        enc = encoder or _ENCODERS[encoder_name]()
        x = torch.cat([enc(list(real)), enc(list(fake))])
        y = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))])
        w, b, mean, scale = _fit_logreg(x, y, l2=l2)
        disc = EmbeddingDiscriminator(w, b, mean, scale, enc, encoder_name, info)
        acc = float(((disc.logits(x) > 0).double() == y.double()).double().mean())
        disc.info["train_accuracy"] = round(acc, 4)
        return disc
    if source_model is None or source_tokenizer is None:
        raise ValueError("the 'lora' discriminator trains on the source model: pass source_model and source_tokenizer")
    return _train_lora(real, fake, source_model, source_tokenizer, info, steps=steps, batch_size=batch_size, lr=lr,
                       r=r, alpha=alpha, targets=targets, seed=seed, max_length=max_length, progress=progress)


def _train_lora(real: Sequence[str], fake: Sequence[str], model: nn.Module, tokenizer: Any, info: dict[str, Any],
                *, steps: int, batch_size: int, lr: float, r: int, alpha: float, targets: Sequence[str], seed: int,
                max_length: int, progress: bool) -> LoraDiscriminator:
    import lorakit
    from lorakit.core.extract import extract_state
    from lorakit.core.inject import active_adapters, delete, set_active
    from lorakit.core.spec import AdapterSpec
    from lorakit.train.trainer import TrainConfig, Trainer
    from lorakit.transfer.labels import LabelStringCollator, hard_label_loss, label_distribution

    task = discriminator_task()
    data = [Example(t, "real") for t in real] + [Example(t, "fake") for t in fake]
    random.Random(seed).shuffle(data)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    before = active_adapters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    spec = AdapterSpec(targets=list(targets), form_args={"r": r, "alpha": alpha})
    lorakit.attach(model, spec, ADAPTER_NAME, seed=seed)
    try:
        set_active(model, [ADAPTER_NAME])
        collate = LabelStringCollator(tokenizer, task, max_length=max_length)
        Trainer(model, data, collate, hard_label_loss,
                TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                            eval_at_start=False)).train(resume=False)
        model.eval()
        probs = label_distribution(model, tokenizer, task, [e.text for e in data], max_length=max_length)
        gold = torch.tensor([0 if e.label == "real" else 1 for e in data])
        info["train_accuracy"] = round(float((probs.argmax(-1) == gold).float().mean()), 4)
        state = extract_state(model, ADAPTER_NAME)
    finally:
        delete(model, ADAPTER_NAME)
        if before:
            set_active(model, before)
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, False))
    return LoraDiscriminator(state, info, max_length=max_length).bind(model, tokenizer)


def save_discriminator(disc: Discriminator, adapter_dir: str | Path) -> Path:
    """Write ``disc`` into ``<adapter_dir>/trans_lora_discriminator/``."""
    return disc.save(Path(adapter_dir) / DISCRIMINATOR_DIR)


def prepare_source(adapter_dir: str | Path, source_model: nn.Module, source_tokenizer: Any, real: Sequence[Example],
                   seeds: Sequence[Example], *, kind: str = "embedding", n_real: int = 1000, n_fake: int | None = None,
                   input_name: str = "Text", temperature: float = 1.0, top_p: float = 0.95, max_new_tokens: int = 40,
                   seed: int = 0, encoder: Encoder | None = None, steps: int = 60, progress: bool = False,
                   max_batch: int = 32) -> tuple[Path, Discriminator]:
    """The call after training the source adapter (step 1 of Trans-LoRA): ``source_model`` (with θ_s attached
    and active) synthesises ``n_fake`` inputs from the ``seeds``, a discriminator learns ``real`` (up to
    ``n_real`` of the client's texts) vs those, and it is saved next to the adapter in ``adapter_dir``."""
    from lorakit.transfer.generate import generate_candidates

    texts = [e.text for e in real][:n_real]
    fake = generate_candidates(source_model, source_tokenizer, [e.text for e in seeds], n_fake or len(texts),
                               temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                               input_name=input_name, seed=seed, max_batch=max_batch)
    disc = train_discriminator(texts, fake, kind=kind, encoder=encoder, source_model=source_model,
                               source_tokenizer=source_tokenizer, steps=steps, seed=seed, progress=progress)
    disc.info["source_synthetic_examples"] = fake[:5]
    return save_discriminator(disc, adapter_dir), disc


# ----------------------------------------------------------------------------- reading

def _bad(path: Path, why: str) -> DiscriminatorFileError:
    return DiscriminatorFileError(f"{path}: not a usable Trans-LoRA discriminator: {why}")


def load_discriminator(path: str | Path, *, encoder: Encoder | None = None, source_model: nn.Module | None = None,
                       source_tokenizer: Any = None) -> Discriminator:
    """Read a discriminator folder (or the adapter folder holding ``trans_lora_discriminator/``).

    ``encoder`` replaces the recorded one (tests); a ``lora`` discriminator is bound to ``source_model``.
    """
    folder = Path(path)
    if (folder / DISCRIMINATOR_DIR / META_FILE).exists():
        folder = folder / DISCRIMINATOR_DIR
    try:
        meta = read_json(folder / META_FILE)
    except AdapterFileError as e:
        raise DiscriminatorFileError(f"{folder}: missing or corrupt {META_FILE} ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise _bad(folder, f"format {meta.get('format')!r} version {meta.get('version')!r}, expected {FORMAT!r} "
                           f"version {FORMAT_VERSION}")
    kind = meta.get("kind")
    if kind not in KINDS:
        raise _bad(folder, f"kind {kind!r} is not one of {KINDS}")
    info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
    if kind == "embedding":
        dim = meta.get("dim")
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 < dim <= MAX_DIM:
            raise _bad(folder, f"dim {dim!r} is not an integer in [1, {MAX_DIM}]")
        name = meta.get("encoder")
        if encoder is None and name not in _ENCODERS:
            raise _bad(folder, f"encoder {name!r} is not one of {sorted(_ENCODERS)}")
        try:
            t = read_float_tensors(folder / LOGREG_FILE, "discriminator weights")
        except AdapterFileError as e:
            raise DiscriminatorFileError(f"{folder}: {e}") from None
        want = {"weight": (dim,), "bias": (1,), "mean": (dim,), "scale": (dim,)}
        if set(t) != set(want):
            raise _bad(folder, f"tensors {sorted(t)}, expected {sorted(want)}")
        wrong = [f"{k} {tuple(t[k].shape)} (expected {s})" for k, s in want.items() if tuple(t[k].shape) != s]
        if wrong:
            raise _bad(folder, "shapes " + ", ".join(wrong))
        if not bool((t["scale"] > 0).all()):
            raise _bad(folder, "scale holds values <= 0")
        return EmbeddingDiscriminator(t["weight"], t["bias"], t["mean"], t["scale"],
                                      encoder or _ENCODERS[name](), str(name), info)
    from lorakit.io.peft import load_state

    if meta.get("labels") != DISC_LABELS:
        raise _bad(folder, f"labels {meta.get('labels')!r}, expected {DISC_LABELS}")
    max_length = meta.get("max_length", 128)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or not 8 <= max_length <= 1 << 16:
        raise _bad(folder, f"max_length {max_length!r} is not an integer in [8, 65536]")
    try:
        state = load_state(folder / LORA_DIR)
    except (AdapterFileError, FileNotFoundError) as e:
        raise DiscriminatorFileError(f"{folder}: corrupt discriminator adapter ({e})") from None
    disc = LoraDiscriminator(state, info, max_length=max_length)
    if source_model is not None:
        disc.bind(source_model, source_tokenizer)
    return disc
