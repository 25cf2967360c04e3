"""The generator interface of the ``generate/`` axis and the one folder format all generators share.

A generator G maps a task condition to adapter parameters in a bank's layout (:mod:`.bank`):

    c = condition(description or embedding)          (a text embedding, a hidden state, a parameter prior)
    x = G(c, z)  ∈ R^D,   z ~ p(z | c)               (CVAEs; deterministic generators ignore z)
    adapter = layout.unflatten(x)                     (an AdapterState: saves as a PEFT adapter)

Subclasses implement :meth:`Generator.fit` (train on a :class:`~.bank.CheckpointBank` and one condition
per task) and :meth:`Generator.sample`; they may override :meth:`Generator.condition` to turn a
description embedding into their condition (SG-LoRA's parameter-space prior does). Everything a
generator needs at sampling time lives in its ``state_dict`` (buffers included) and its frozen ``Args``,
so :meth:`save` / :func:`load_generator` are written once here:

- ``generator.json``: method name, its Args, the bank layout, the condition encoder, the seen tasks'
  ids and descriptions, format version;
- ``generator.safetensors``: the state dict (networks, per-tensor statistics, prototypes).

Both written atomically, the JSON last; loading rebuilds the class named in the JSON from the catalog
(axis ``generate``) and checks every tensor's shape against a freshly built generator before copying.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lorakit.core import atomic
from lorakit.core.spec import NoArgs, build_args
from lorakit.core.state import AdapterState, read_float_tensors, read_json, save_file
from lorakit.generate.bank import BankError, BankLayout, CheckpointBank

GENERATOR_JSON = "generator.json"
GENERATOR_TENSORS = "generator.safetensors"
FORMAT_VERSION = 1


class GeneratorError(ValueError):
    """Bad generator input: wrong condition shape, unfitted generator, corrupt generator folder."""


class Generator(nn.Module):
    """Base class: ``fit(bank, conditions)`` then ``sample(c)`` / ``generate(...)``."""

    name: ClassVar[str] = ""
    Args: ClassVar[type] = NoArgs

    def __init__(self, layout: BankLayout, cond_dim: int, args: Any = None, *, encoder: str | None = None) -> None:
        super().__init__()
        if not isinstance(cond_dim, int) or cond_dim < 1:
            raise GeneratorError(f"cond_dim must be a positive integer, got {cond_dim!r}")
        self.layout = layout
        self.cond_dim = cond_dim
        self.args = args if args is not None else self.Args()
        self.encoder_name = encoder  # how `generate(description=...)` embeds text (see conditions.text_encoder)
        self.task_ids: list[str] = []
        self.task_descriptions: list[str] = []
        self.fitted = False

    @classmethod
    def build(cls, layout: BankLayout, cond_dim: int, encoder: str | None = None, **args: Any) -> Generator:
        return cls(layout, cond_dim, build_args(cls.Args, args, owner=f"generator {cls.name!r}"), encoder=encoder)

    @classmethod
    def for_embeddings(cls, layout: BankLayout, emb_dim: int, encoder: str | None = None, **args: Any) -> Generator:
        """A generator whose ``fit`` takes one ``emb_dim``-d description embedding per task (the CLI's and the
        benchmarks' one way to build any generator); generators whose condition is not the embedding itself
        (SG-LoRA: a parameter-space prior) override it."""
        return cls.build(layout, emb_dim, encoder, **args)

    # -- to implement ---------------------------------------------------------------------------
    def fit(self, bank: CheckpointBank, conditions: torch.Tensor, **kw: Any) -> dict[str, Any]:
        raise NotImplementedError

    def sample(self, c: torch.Tensor, n: int = 1, *, seed: int | None = None, mode: str = "sample") -> torch.Tensor:
        """[n, D] parameter vectors for one condition ``c`` ([cond_dim]); ``mode="mean"`` is deterministic."""
        raise NotImplementedError

    def condition(self, embedding: torch.Tensor) -> torch.Tensor:
        """The generator's condition for a description embedding (identity unless the method says otherwise)."""
        return embedding

    def prepare_for_load(self, num_tasks: int) -> None:
        """Resize task-dependent buffers before loading (generators that store per-task tensors override)."""

    # -- shared ---------------------------------------------------------------------------------
    def _remember(self, bank: CheckpointBank, conditions: torch.Tensor) -> torch.Tensor:
        if bank.layout.slots != self.layout.slots or bank.layout.spec != self.layout.spec:
            raise BankError("the bank's layout differs from the generator's (other adapter structure)")
        c = self.check_condition(conditions, batch=True)
        if c.shape[0] != len(bank.tasks):
            raise GeneratorError(f"give one condition per task: {c.shape[0]} condition(s) for "
                                 f"{len(bank.tasks)} task(s)")
        self.task_ids, self.task_descriptions = bank.task_ids, bank.descriptions
        self.fitted = True
        return c

    def check_condition(self, c: Any, batch: bool = False) -> torch.Tensor:
        if not isinstance(c, torch.Tensor) or not c.is_floating_point():
            raise GeneratorError("a condition must be a float tensor")
        want = 2 if batch else 1
        if c.dim() != want or c.shape[-1] != self.cond_dim:
            shape = "[tasks, cond_dim]" if batch else "[cond_dim]"
            raise GeneratorError(f"condition must have shape {shape} with cond_dim={self.cond_dim}, "
                                 f"got {tuple(c.shape)}")
        if not torch.isfinite(c).all():
            raise GeneratorError("condition holds NaN or inf")
        return c.float()

    def _check_ready(self) -> None:
        if not self.fitted:
            raise GeneratorError(f"generator {self.name!r} is not fitted; call fit(bank, conditions) or load one")

    def generate(self, *, description: str | None = None, embedding: torch.Tensor | None = None,
                 condition: torch.Tensor | None = None, seed: int | None = None, mode: str = "sample") -> AdapterState:
        """One adapter for a task given by a description (embedded with the generator's encoder), a
        description embedding, or the generator's own condition."""
        self._check_ready()
        given = [x is not None for x in (description, embedding, condition)]
        if sum(given) != 1:
            raise GeneratorError("give exactly one of description=, embedding=, condition=")
        if description is not None:
            from lorakit.generate.conditions import text_encoder

            if not self.encoder_name:
                raise GeneratorError(f"generator {self.name!r} was fitted on raw conditions; it has no text encoder "
                                     "(pass condition=)")
            embedding = text_encoder(self.encoder_name).encode([description])[0]
        if embedding is not None:
            condition = self.condition(embedding.float())
        x = self.sample(self.check_condition(condition), 1, seed=seed, mode=mode)[0]
        meta = {"generated_by": self.name, "mode": mode, "seed": seed}
        if description is not None:
            meta["description"] = description
        return self.layout.unflatten(x.detach(), meta)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def save(self, out_dir: str | Path) -> Path:
        self._check_ready()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic.write_with(out / GENERATOR_TENSORS, lambda p: save_file(tensors, str(p)))
        atomic.write_json(out / GENERATOR_JSON, {
            "format_version": FORMAT_VERSION, "method": self.name, "args": dataclasses.asdict(self.args),
            "cond_dim": self.cond_dim, "encoder": self.encoder_name, "layout": self.layout.to_json(),
            "tasks": [{"task_id": i, "description": d} for i, d in zip(self.task_ids, self.task_descriptions)]})
        return out


def load_generator(folder: str | Path) -> Generator:
    """A generator saved by :meth:`Generator.save` (read as untrusted input)."""
    from lorakit.core import registry
    from lorakit.core.registry import UnknownMethodError

    folder = Path(folder)
    where = folder / GENERATOR_JSON
    if not where.is_file():
        raise GeneratorError(f"{folder}: not a generator folder (no {GENERATOR_JSON})")
    data = read_json(where)
    if data.get("format_version") != FORMAT_VERSION:
        raise GeneratorError(f"{where}: unsupported format_version {data.get('format_version')!r}")
    try:
        cls = registry.get("generate", str(data.get("method")))
    except UnknownMethodError as e:
        raise GeneratorError(f"{where}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Generator)):
        raise GeneratorError(f"{where}: {data.get('method')!r} is not a parameter generator")
    layout = BankLayout.from_json(data.get("layout"), where)
    cond_dim, encoder, args = data.get("cond_dim"), data.get("encoder"), data.get("args")
    if not isinstance(cond_dim, int) or isinstance(cond_dim, bool) or not 0 < cond_dim <= 1 << 22:
        raise GeneratorError(f"{where}: cond_dim must be a positive integer")
    if encoder is not None and not isinstance(encoder, str):
        raise GeneratorError(f"{where}: encoder must be a string or null")
    if not isinstance(args, dict):
        raise GeneratorError(f"{where}: args must be an object")
    try:
        gen = cls.build(layout, cond_dim, encoder, **args)
    except (TypeError, ValueError) as e:
        raise GeneratorError(f"{where}: {e}") from None
    tasks = data.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("task_id"), str)
                                              and isinstance(t.get("description"), str) for t in tasks):
        raise GeneratorError(f"{where}: tasks must be a list of {{task_id, description}} objects")
    gen.prepare_for_load(len(tasks))
    tensors = read_float_tensors(folder / GENERATOR_TENSORS, "generator")
    own = gen.state_dict()
    if set(tensors) != set(own):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise GeneratorError(f"{folder / GENERATOR_TENSORS}: tensors do not match a {cls.name} generator "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise GeneratorError(f"{folder / GENERATOR_TENSORS}: {k} has shape {tuple(v.shape)}, expected "
                                 f"{tuple(own[k].shape)}")
    gen.load_state_dict(tensors)
    gen.task_ids = [t["task_id"] for t in tasks]
    gen.task_descriptions = [t["description"] for t in tasks]
    gen.fitted = True
    return gen.eval()
