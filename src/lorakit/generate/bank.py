"""A bank of trained adapter checkpoints per task, as aligned parameter vectors (the ``generate/`` axis).

Parameter generators (ICM-LoRA, SG-LoRA, a Text-to-LoRA-style hypernetwork) learn a map from a task
condition to adapter parameters; they all need the same thing: for every task n, a description d_n and
M checkpoints ΔW_n^1..M of ONE adapter structure, flattened to vectors x ∈ R^D in one fixed order.

Layout. A :class:`BankLayout` fixes that order: the adapter's tensors sorted by key, each a slot
(key, shape, offset). ``flatten(state)`` concatenates the slots; ``unflatten(x)`` rebuilds an
:class:`AdapterState` with the layout's spec and base fingerprint, so a generated vector saves as a
PEFT adapter like any trained one. Every checkpoint must align: same form and form args (rank),
same keys, same shapes, same base; anything else is refused with the first mismatches named (SG-LoRA
§3.3 of the notes: experts must share targets and rank).

Per-tensor statistics. ICM-LoRA z-scores each tensor separately, (v − mean)/std with torch's unbiased
std (``utils/normalizeLoraWeight_small.py`` of the official code); :meth:`BankLayout.tensor_stats` and
:meth:`BankLayout.normalize` / :meth:`BankLayout.denormalize` do that per slot for any set of vectors.

Storage. ``save(dir)`` writes ``bank.safetensors`` (one ``[M, D]`` float tensor per task) and
``bank.json`` (layout, spec, base, task ids and descriptions), each atomically, the JSON last; ``load``
reads both under the untrusted-file rules of :mod:`lorakit.core.state` and checks every shape against
the JSON before building anything.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.core import atomic
from lorakit.core.spec import AdapterSpec
from lorakit.core.state import AdapterState, check_str_list, read_float_tensors, read_json, save_file, spec_from_file

BANK_JSON = "bank.json"
BANK_TENSORS = "bank.safetensors"
FORMAT_VERSION = 1
MAX_TASKS = 100_000
MAX_DESCRIPTION = 4_000
Stats = tuple[torch.Tensor, torch.Tensor]  # per-slot (mean [T], std [T])


class BankError(ValueError):
    """A bank that cannot be built or read: misaligned checkpoints, bad vectors, corrupt bank folder."""


@dataclass(frozen=True)
class Slot:
    """One tensor of the flattened adapter: ``x[offset : offset + numel].view(shape)``."""

    key: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class BankLayout:
    """The fixed order in which one adapter structure is flattened to a vector."""

    spec: AdapterSpec
    slots: tuple[Slot, ...]
    base: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def dim(self) -> int:
        return sum(s.numel for s in self.slots)

    @classmethod
    def of(cls, state: AdapterState) -> BankLayout:
        if state.initial:
            raise BankError("adapters whose init rewrote the base (PiSSA, LoRA-GA, ...) are relative to a "
                            "rewritten base and cannot share a parameter space with others; export them to "
                            "plain LoRA first (`lorakit export`)")
        slots, offset = [], 0
        for key in sorted(state.tensors):
            t = state.tensors[key]
            if not t.is_floating_point():
                raise BankError(f"tensor {key!r} is {t.dtype}; a bank flattens float tensors only")
            slots.append(Slot(key, tuple(t.shape), offset))
            offset += t.numel()
        if not slots:
            raise BankError("the adapter has no tensors")
        return cls(spec=state.spec, slots=tuple(slots), base=dict(state.base))

    def check(self, state: AdapterState, where: str = "checkpoint") -> None:
        """Refuse a checkpoint that does not align with this layout, naming what differs."""
        problems = []
        if state.spec.form != self.spec.form:
            problems.append(f"form {state.spec.form!r} != {self.spec.form!r}")
        if dict(state.spec.form_args) != dict(self.spec.form_args):
            problems.append(f"form args {dict(state.spec.form_args)} != {dict(self.spec.form_args)}")
        if state.initial:
            problems.append("its init rewrote the base (export it to plain LoRA first)")
        mine = {s.key: s.shape for s in self.slots}
        theirs = {k: tuple(t.shape) for k, t in state.tensors.items()}
        missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        if missing:
            problems.append(f"{len(missing)} tensor(s) missing, e.g. {missing[:2]} (different targets?)")
        if extra:
            problems.append(f"{len(extra)} extra tensor(s), e.g. {extra[:2]} (different targets?)")
        wrong = [f"{k}: {theirs[k]} != {mine[k]}" for k in sorted(set(mine) & set(theirs)) if theirs[k] != mine[k]]
        if wrong:
            problems.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[:2]} (different rank or base?)")
        if self.base and state.base:
            from lorakit.models.loading import compare_fingerprints

            differ = compare_fingerprints(self.base, state.base)
            if differ:
                problems.append(f"it was trained on another base model ({differ[0]})")
        if problems:
            raise BankError(f"{where} does not align with the bank: " + "; ".join(problems))

    def flatten(self, state: AdapterState, where: str = "checkpoint") -> torch.Tensor:
        """[D] float32 vector of ``state`` in this layout."""
        self.check(state, where)
        return torch.cat([state.tensors[s.key].detach().reshape(-1).float().cpu() for s in self.slots])

    def unflatten(self, vector: torch.Tensor, meta: dict[str, Any] | None = None) -> AdapterState:
        """The :class:`AdapterState` of a [D] vector (saves as a PEFT adapter with ``lorakit.io.peft``)."""
        v = self._check_vectors(vector, "vector")
        if v.dim() != 1:
            raise BankError(f"unflatten takes one [D] vector, got shape {tuple(v.shape)}")
        tensors = {s.key: v[s.offset:s.offset + s.numel].reshape(s.shape).clone() for s in self.slots}
        return AdapterState(spec=self.spec, tensors=tensors, base=dict(self.base), meta=dict(meta or {}))

    def segments(self) -> list[tuple[int, int]]:
        return [(s.offset, s.offset + s.numel) for s in self.slots]

    def tensor_stats(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-slot mean and unbiased std ([T] each) over all entries of ``vectors`` ([N, D] or [D])."""
        v = self._check_vectors(vectors, "vectors").reshape(-1, self.dim)
        means = torch.stack([v[:, a:b].mean() for a, b in self.segments()])
        stds = torch.stack([v[:, a:b].std() if (b - a) * v.shape[0] > 1 else torch.zeros(())
                            for a, b in self.segments()])
        return means, stds

    def normalize(self, vectors: torch.Tensor, stats: Stats, eps: float = 1e-8) -> torch.Tensor:
        """Per-slot z-score (v − mean_t)/std_t (ICM-LoRA's per-tensor normalisation)."""
        mean, std = self._expand(stats, vectors)
        return (vectors - mean) / (std + eps)

    def denormalize(self, vectors: torch.Tensor, stats: Stats, eps: float = 1e-8) -> torch.Tensor:
        mean, std = self._expand(stats, vectors)
        return vectors * (std + eps) + mean

    def _expand(self, stats: Stats, like: torch.Tensor) -> Stats:
        mean, std = stats
        if mean.shape != (len(self.slots),) or std.shape != (len(self.slots),):
            raise BankError(f"per-tensor stats must have shape [{len(self.slots)}], got {tuple(mean.shape)}, "
                            f"{tuple(std.shape)}")
        sizes = torch.tensor([s.numel for s in self.slots], device=mean.device)
        return (torch.repeat_interleave(mean, sizes).to(like), torch.repeat_interleave(std, sizes).to(like))

    def _check_vectors(self, v: Any, what: str) -> torch.Tensor:
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise BankError(f"{what} must be a float tensor")
        if v.shape[-1] != self.dim:
            raise BankError(f"{what} has last dimension {v.shape[-1]}, the bank's adapters have {self.dim} parameters")
        if not torch.isfinite(v).all():
            raise BankError(f"{what} holds NaN or inf")
        return v

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "slots": [[s.key, list(s.shape)] for s in self.slots],
                "base": self.base}

    @classmethod
    def from_json(cls, data: Any, where: Path) -> BankLayout:
        if not isinstance(data, dict) or not isinstance(data.get("slots"), list) or not data["slots"]:
            raise BankError(f"{where}: 'layout' must hold a non-empty 'slots' list")
        spec = spec_from_file(data.get("spec"), where, "layout.spec")
        slots, offset, seen = [], 0, set()
        for i, item in enumerate(data["slots"]):
            ok = (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], list)
                  and len(item[1]) <= 8 and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 1 << 20
                                                for n in item[1]))
            if not ok or item[0] in seen:
                raise BankError(f"{where}: layout.slots[{i}] must be [key, [positive dims]] with a new key")
            seen.add(item[0])
            slots.append(Slot(item[0], tuple(item[1]), offset))
            offset += slots[-1].numel
        if offset > 1 << 31:
            raise BankError(f"{where}: layout describes {offset} parameters, more than a bank holds")
        base = data.get("base", {})
        if not isinstance(base, dict):
            raise BankError(f"{where}: layout.base must be an object")
        return cls(spec=spec, slots=tuple(slots), base=base)


@dataclass
class BankTask:
    """One task of the bank: id, one-line description, M checkpoints as rows of ``vectors`` [M, D]."""

    task_id: str
    description: str
    vectors: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prototype(self) -> torch.Tensor:
        """μ_n = (1/M) Σ_m ΔW_n^m (SG-LoRA's expert prototype)."""
        return self.vectors.mean(0)

    @property
    def variance(self) -> torch.Tensor:
        """σ_n² = element-wise (biased) variance over the M checkpoints (0 for M = 1)."""
        return self.vectors.var(0, unbiased=False)


@dataclass
class CheckpointBank:
    """Tasks × checkpoints of one adapter structure, aligned to one :class:`BankLayout`."""

    layout: BankLayout
    tasks: list[BankTask]

    def __post_init__(self) -> None:
        ids = [t.task_id for t in self.tasks]
        if len(set(ids)) != len(ids):
            raise BankError(f"task ids must be distinct, got {ids}")
        for t in self.tasks:
            if t.vectors.dim() != 2 or t.vectors.shape[0] < 1:
                raise BankError(f"task {t.task_id!r}: vectors must be [M >= 1, D], got {tuple(t.vectors.shape)}")
            self.layout._check_vectors(t.vectors, f"task {t.task_id!r}")

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_states(cls, entries: Iterable[tuple[str, str, Sequence[AdapterState]]]) -> CheckpointBank:
        """Build from (task id, description, checkpoints) triples; every checkpoint must align."""
        layout: BankLayout | None = None
        tasks = []
        for task_id, description, states in entries:
            if not states:
                raise BankError(f"task {task_id!r} has no checkpoints")
            layout = layout or BankLayout.of(states[0])
            rows = [layout.flatten(s, f"task {task_id!r} checkpoint {i}") for i, s in enumerate(states)]
            tasks.append(BankTask(str(task_id), str(description), torch.stack(rows)))
        if layout is None:
            raise BankError("a bank needs at least one task")
        return cls(layout, tasks)

    @classmethod
    def from_folders(cls, task_dirs: Sequence[str | Path],
                     descriptions: dict[str, str] | None = None) -> CheckpointBank:
        """Build from task folders: each holds adapter folders (one per checkpoint, sorted by name as
        numbers where they are numbers) and optionally ``task.json`` {"task_id", "description"}."""
        from lorakit.io.peft import load_state

        entries = []
        for d in map(Path, task_dirs):
            if not d.is_dir():
                raise BankError(f"{d}: not a folder")
            info = read_json(d / "task.json") if (d / "task.json").is_file() else {}
            task_id = str(info.get("task_id", d.name))
            desc = (descriptions or {}).get(task_id, info.get("description", ""))
            if not isinstance(desc, str):
                raise BankError(f"{d / 'task.json'}: 'description' must be a string")
            ckpts = sorted((p for p in d.iterdir() if p.is_dir()), key=_natural)
            if not ckpts:
                raise BankError(f"{d}: holds no checkpoint folders")
            entries.append((task_id, desc, [load_state(p) for p in ckpts]))
        return cls.from_states(entries)

    # -- views ----------------------------------------------------------------------------------
    @property
    def task_ids(self) -> list[str]:
        return [t.task_id for t in self.tasks]

    @property
    def descriptions(self) -> list[str]:
        return [t.description for t in self.tasks]

    def task(self, task_id: str) -> BankTask:
        for t in self.tasks:
            if t.task_id == task_id:
                return t
        raise BankError(f"unknown task {task_id!r}; the bank has {self.task_ids}")

    def subset(self, task_ids: Iterable[str]) -> CheckpointBank:
        return CheckpointBank(self.layout, [self.task(i) for i in task_ids])

    def without(self, task_ids: Iterable[str]) -> CheckpointBank:
        drop = set(task_ids)
        unknown = drop - set(self.task_ids)
        if unknown:
            raise BankError(f"unknown task(s) {sorted(unknown)}")
        return CheckpointBank(self.layout, [t for t in self.tasks if t.task_id not in drop])

    def all_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, D] every checkpoint, [N] its task index)."""
        x = torch.cat([t.vectors for t in self.tasks])
        idx = torch.cat([torch.full((len(t.vectors),), i) for i, t in enumerate(self.tasks)])
        return x, idx

    def prototypes(self) -> torch.Tensor:
        return torch.stack([t.prototype for t in self.tasks])

    def variances(self) -> torch.Tensor:
        return torch.stack([t.variance for t in self.tasks])

    def spread(self) -> dict[str, float]:
        """Within-task spread vs between-task distance (tells generation from memorisation).

        within = mean over tasks of the RMS distance of a checkpoint to its task prototype;
        between = mean pairwise distance between prototypes; both in parameter-space L2.
        """
        protos = self.prototypes()
        within = [float(((t.vectors - t.prototype) ** 2).sum(1).mean().sqrt()) for t in self.tasks]
        between = torch.pdist(protos).mean().item() if len(self.tasks) > 1 else float("nan")
        return {"within_task_rms": sum(within) / len(within), "between_task_mean": between,
                "ratio": (sum(within) / len(within)) / between if len(self.tasks) > 1 and between > 0 else float("nan"),
                "prototype_norm_mean": float(protos.norm(dim=1).mean())}

    def state(self, vector: torch.Tensor, meta: dict[str, Any] | None = None) -> AdapterState:
        return self.layout.unflatten(vector, meta)

    def nbytes(self) -> int:
        return sum(t.vectors.numel() for t in self.tasks) * 4

    # -- storage --------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"task.{i}": t.vectors.float().contiguous() for i, t in enumerate(self.tasks)}
        atomic.write_with(out / BANK_TENSORS, lambda p: save_file(tensors, str(p)))
        atomic.write_json(out / BANK_JSON, {
            "format_version": FORMAT_VERSION, "layout": self.layout.to_json(),
            "tasks": [{"task_id": t.task_id, "description": t.description, "checkpoints": len(t.vectors),
                       "meta": t.meta} for t in self.tasks]})
        return out

    @classmethod
    def load(cls, folder: str | Path) -> CheckpointBank:
        folder = Path(folder)
        if not (folder / BANK_JSON).is_file():
            raise BankError(f"{folder}: not a bank folder (no {BANK_JSON})")
        where = folder / BANK_JSON
        data = read_json(where)
        if data.get("format_version") != FORMAT_VERSION:
            raise BankError(f"{where}: unsupported format_version {data.get('format_version')!r}")
        layout = BankLayout.from_json(data.get("layout"), where)
        tasks_info = data.get("tasks")
        if not isinstance(tasks_info, list) or not 0 < len(tasks_info) <= MAX_TASKS:
            raise BankError(f"{where}: 'tasks' must be a non-empty list")
        tensors = read_float_tensors(folder / BANK_TENSORS, "bank")
        expected = {f"task.{i}" for i in range(len(tasks_info))}
        if set(tensors) != expected:
            raise BankError(f"{folder / BANK_TENSORS}: holds {sorted(tensors)[:3]}..., the JSON lists "
                            f"{len(tasks_info)} task(s)")
        tasks = []
        for i, info in enumerate(tasks_info):
            if not isinstance(info, dict):
                raise BankError(f"{where}: tasks[{i}] must be an object")
            check_str_list([info.get("task_id"), info.get("description")], where, f"tasks[{i}]")
            if len(info["description"]) > MAX_DESCRIPTION:
                raise BankError(f"{where}: tasks[{i}].description is longer than {MAX_DESCRIPTION} characters")
            v = tensors[f"task.{i}"]
            if v.dim() != 2 or v.shape[1] != layout.dim or v.shape[0] != info.get("checkpoints"):
                raise BankError(f"{folder / BANK_TENSORS}: task.{i} has shape {tuple(v.shape)}, the JSON says "
                                f"[{info.get('checkpoints')}, {layout.dim}]")
            meta = info.get("meta", {})
            tasks.append(BankTask(info["task_id"], info["description"], v, meta if isinstance(meta, dict) else {}))
        return cls(layout, tasks)


def _natural(p: Path) -> tuple[int, Any]:
    """Sort checkpoint folders by the number in their name (epoch_2 before epoch_10), unlike ICM-LoRA's
    lexicographic ``sorted`` (notes §2.1: its indices do not follow the epoch)."""
    digits = "".join(ch for ch in p.name if ch.isdigit())
    return (0, int(digits), p.name) if digits else (1, 0, p.name)  # type: ignore[return-value]


def replace_layout_spec(layout: BankLayout, **changes: Any) -> BankLayout:
    return dataclasses.replace(layout, spec=dataclasses.replace(layout.spec, **changes))
