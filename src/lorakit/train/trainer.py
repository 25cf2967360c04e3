"""The lorakit trainer, built on accelerate (single process, DDP via ``accelerate launch``/``torchrun``).

AdamW + warmup/cosine|linear|constant schedule, gradient accumulation and clipping, periodic eval,
a progress bar, ``log.jsonl`` + ``curves.png`` in the run dir, atomic checkpoints every N steps and
exact resume (same data order, optimizer, scheduler and RNG state), and strategy hooks.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.core import atomic
from lorakit.core.quant import QUANT_TYPES
from lorakit.core.spec import TrainSpec
from lorakit.strategies.base import Strategy, check_forms, check_stack
from lorakit.train import checkpoint as ckpt
from lorakit.train.context import TrainingContext
from lorakit.train.plots import plot_run, read_log
from lorakit.train.sampler import IndexStream
from lorakit.train.schedule import SCHEDULES, lr_multiplier

LossFn = Callable[[nn.Module, dict[str, Any]], torch.Tensor]
EvalFn = Callable[[nn.Module], dict[str, float]]

# trainer config fields that may change between a run and its resume without changing what is trained
RESUME_NEUTRAL = frozenset({"out_dir", "progress", "eval_every", "eval_at_start", "save_every", "keep_checkpoints",
                            "log_every", "allow_config_change", "config_changes", "gradient_checkpointing",
                            "device", "fsdp"})


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_autocast(device_type: str, precision: str) -> None:
    """Refuse a precision this device/torch build cannot autocast to (fp16 also needs a GradScaler)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return
    try:
        with torch.autocast(device_type=device_type, dtype=dtype):
            out = torch.nn.functional.linear(torch.ones(1, 2, device=device_type), torch.ones(2, 2, device=device_type))
        if out.dtype != dtype:
            raise RuntimeError(f"autocast produced {out.dtype}")
        if precision == "fp16":
            torch.amp.GradScaler(device_type)
    except (RuntimeError, TypeError, AttributeError) as e:
        works = [p for p, d in PRECISIONS.items() if d is None or _autocasts(device_type, d)]
        raise ValueError(f"precision {precision!r} is not supported on device {device_type!r} with torch "
                         f"{torch.__version__} ({e}); use one of: {', '.join(works)}") from e


def _autocasts(device_type: str, dtype: torch.dtype) -> bool:
    try:
        with torch.autocast(device_type=device_type, dtype=dtype):
            out = torch.nn.functional.linear(torch.ones(1, 2, device=device_type), torch.ones(2, 2, device=device_type))
        return out.dtype == dtype
    except (RuntimeError, TypeError):
        return False


def _enable_checkpointing(model: nn.Module) -> None:
    """HF gradient checkpointing, non-reentrant (the frozen base needs no input grads then), plus a guard:
    lorakit's per-forward adapter context (a ContextVar set by ``use_context``) is gone when backward
    re-runs the checkpointed forward, so a forward under a context is refused instead of silently
    recomputing with the wrong adapters."""
    from lorakit.core.context import current_context
    from lorakit.core.layer import AdaptedLayer

    if not (callable(getattr(model, "gradient_checkpointing_enable", None))
            and getattr(model, "supports_gradient_checkpointing", False)):
        raise ValueError(f"gradient_checkpointing needs a Hugging Face model that supports it "
                         f"(gradient_checkpointing_enable); {type(model).__name__} does not")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False  # a KV cache is useless in training and HF refuses it with checkpointing

    def refuse_context(module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled() and current_context() is not None:
            raise ValueError("gradient_checkpointing cannot be combined with a per-forward adapter context "
                             "(mixed_batch / mixing / use_context): backward recomputes the forward outside "
                             "the context and would use other adapters; train without checkpointing")

    for m in model.modules():
        if isinstance(m, AdaptedLayer):
            m.register_forward_pre_hook(refuse_context)


def parse_device(device: str) -> torch.device | None:
    """``"auto"`` -> None (CUDA when available, else CPU); ``"cpu"``, ``"cuda"``, ``"cuda:N"`` -> that device.
    Refuses a malformed name, and a CUDA device this machine does not have (no silent CPU fallback)."""
    if device == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA device; "
                             "use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r} asked for, but only {count} CUDA device(s) exist (0..{count - 1})")
    return dev


def check_hardware(model: nn.Module, strategies: Sequence[Strategy], precision: str) -> None:
    """Refuse, once and before training, forms and strategies that do not declare they work on this
    model's base (quantized: ``Cap.QUANTIZED_OK``) or in this precision (``Cap.LOW_PRECISION_OK``)."""
    from lorakit.core.caps import require
    from lorakit.core.inject import adapted_layers
    from lorakit.core.quant import has_quantized_layers

    forms: dict[str, Any] = {}
    for _, layer in adapted_layers(model):
        for form in layer.adapters.values():
            forms.setdefault(form.name, form)
    # catalog strategies only: ad-hoc hook objects (loggers, a test's kill switch) change no weights
    methods = [("form", f) for f in forms.values()] + [("strategy", s) for s in strategies
                                                        if _catalog_strategy(s.name)]
    if has_quantized_layers(model):
        require(methods, "quantized")
    if precision != "fp32":
        require(methods, "low_precision")


class ResumeConfigError(ValueError):
    """A resume whose config differs from the one the checkpointed run was trained with."""


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def _catalog_strategy(name: Any) -> bool:
    from lorakit.core import registry

    return isinstance(name, str) and name in registry.names("strategy")


def spec_differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """``{field: [recorded, now]}`` for every field of two ``TrainSpec.to_dict()`` records that changes what
    is trained (not logging, eval or checkpoint cadence, the out_dir or the lorakit version).

    Strategies are compared by the catalog's (registered) ones with their args; ad-hoc hook objects that
    are not in the catalog (a progress logger, a test's kill switch) are not part of the comparison."""
    def view(d: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        trainer = {k: v for k, v in (d.get("trainer") or {}).items() if k not in RESUME_NEUTRAL}
        trainer.setdefault("precision", "fp32")  # runs recorded before the field trained in fp32
        trainer.setdefault("quantize", None)  # ... and on an unquantized base
        _flat("", trainer, out)
        strategies = [s for s in d.get("strategies") or []
                      if _catalog_strategy(s.get("name") if isinstance(s, dict) else s[0])]
        out["strategies"] = [s.get("name") if isinstance(s, dict) else s[0] for s in strategies]
        for s in strategies:
            name, args = (s.get("name"), s.get("args")) if isinstance(s, dict) else s
            _flat(f"strategy.{name}", args or {}, out)
        for k in ("init", "init_args", "seed", "data"):
            _flat(k, d.get(k), out)
        return out

    a, b = view(old), view(new)
    # a strategy added or removed is reported once (in "strategies"), not field by field
    one_sided = set(a["strategies"]) ^ set(b["strategies"])
    missing = object()
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b), key=str)
            if not (k.startswith("strategy.") and k.split(".")[1] in one_sided)
            and json.dumps(a.get(k, missing), default=str) != json.dumps(b.get(k, missing), default=str)}


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int | None = None  # None: warmup_ratio of the steps
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int = 0  # 0: only before and after training
    eval_at_start: bool = True
    save_every: int = 0  # 0: no intermediate checkpoints
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    out_dir: str | None = None
    progress: bool = True
    allow_config_change: bool = False  # resume a run whose recorded config differs (the change is recorded)
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast for forward and loss; adapter weights stay fp32
    gradient_checkpointing: bool = False  # HF models: recompute activations in backward (use_reentrant=False)
    quantize: str | None = None  # nf4 | fp4 | int8: finetune() loads the base through bitsandbytes (QLoRA)
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N
    fsdp: bool = False  # several processes: shard with FSDP2 (fully_shard per block) instead of DDP

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be >= 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; known: {', '.join(PRECISIONS)}")
        if self.quantize is not None and self.quantize not in QUANT_TYPES:
            raise ValueError(f"unknown quantize {self.quantize!r}; known: {', '.join(QUANT_TYPES)}")
        parse_device(self.device)
        if self.fsdp and self.save_every:
            raise ValueError("fsdp runs do not write intermediate checkpoints yet (sharded optimizer state); "
                             "use save_every=0 (the adapter is still saved at the end)")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * self.steps)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    train_seconds: float
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    out_dir: str | None = None


def _shard_fsdp(model: nn.Module, accelerator: Any) -> None:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) over the process group accelerate set up: each
    transformer block (the model's ``_no_split_modules`` classes) is one unit, the root holds the rest.
    Frozen base and trainable adapter tensors share units (FSDP2 shards per parameter). One process: no-op.
    accelerate's own FSDP plugin is not used because accelerate runs CPU jobs as DDP (MULTI_CPU)."""
    if accelerator.num_processes < 2:
        return
    from torch.distributed.fsdp import fully_shard

    model.to(accelerator.device)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if not units:
        raise ValueError(f"fsdp needs a model that names its transformer blocks (_no_split_modules); "
                         f"{type(model).__name__} does not")
    for m in units:
        fully_shard(m)
    fully_shard(model)


def _accelerator(device: str) -> Any:
    """An accelerate ``Accelerator`` on ``device`` (``TrainConfig.device``)."""
    from accelerate import Accelerator

    dev = parse_device(device)
    if dev is None:
        return Accelerator(cpu=not torch.cuda.is_available())
    if dev.type == "cpu":
        return Accelerator(cpu=True)
    if dev.index is not None:  # accelerate places a single process on the current CUDA device
        torch.cuda.set_device(dev.index)
    return Accelerator()


class Trainer:
    """Train the parameters of ``model`` that require grad.

    ``train_data`` is indexable; ``collate`` turns a list of its items into a batch;
    ``loss_fn(model, batch)`` returns the scalar loss; ``eval_fn(model)`` returns metrics. A model with
    an ``aux_loss()`` method (e.g. a router's balance loss over its last forward) has it added to the loss.
    ``train_spec`` records the run (strategies with their args, this config, init, data); without one the
    trainer records its own strategies and config. It is written to ``<out_dir>/train_spec.json``.
    """

    def __init__(self, model: nn.Module, train_data: Sequence[Any], collate: Callable[[list[Any]], Any],
                 loss_fn: LossFn, config: TrainConfig | None = None, *, eval_fn: EvalFn | None = None,
                 strategies: Sequence[Strategy] = (), accelerator: Any = None,
                 train_spec: TrainSpec | None = None) -> None:
        self.config = config or TrainConfig()
        self.strategies = list(strategies)
        check_stack(self.strategies)
        check_forms(self.strategies, model)
        self.train_spec = train_spec or TrainSpec.for_run(self.strategies, self.config)
        check_hardware(model, self.strategies, self.config.precision)
        self.accelerator = accelerator or _accelerator(self.config.device)
        self.model = model
        if self.config.fsdp:
            _shard_fsdp(model, self.accelerator)  # before the optimizer: FSDP2 replaces the parameters
        self.train_data, self.collate, self.loss_fn, self.eval_fn = train_data, collate, loss_fn, eval_fn
        self.out_dir = Path(self.config.out_dir) if self.config.out_dir else None
        self.step = 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters; attach an adapter first")
        self.param_names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self.device_type = self.accelerator.device.type
        _check_autocast(self.device_type, self.config.precision)
        if self.config.precision != "fp32":
            low = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
            if low:
                raise ValueError(f"precision {self.config.precision!r} keeps trainable (master) weights in fp32, "
                                 f"but {low[:3]} are {model.get_parameter(low[0]).dtype}; attach the adapter in fp32")
        self.scaler = torch.amp.GradScaler(self.device_type) if self.config.precision == "fp16" else None
        if self.config.gradient_checkpointing:
            _enable_checkpointing(model)
        self._build_optimizer()
        self.context = TrainingContext(self)  # what strategy hooks see: not the whole trainer
        self._previous_spec: dict[str, Any] | None = None
        self._history: list[dict[str, Any]] = []

    # -- set-up ----------------------------------------------------------------------------
    def _build_optimizer(self) -> None:
        c = self.config
        groups = [{"params": self.params, "weight_decay": c.weight_decay}]
        for s in self.strategies:
            groups = s.param_groups(self.model, self.params) or groups
        self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=c.betas)
        for s in self.strategies:
            self.optimizer = s.wrap_optimizer(self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(c.schedule, c.warmup, c.steps, c.min_lr_ratio))
        # FSDP2 shards in place (the model is its own wrapper); otherwise accelerate (DDP, device placement)
        self.wrapped = self.model if self.config.fsdp else self.accelerator.prepare(self.model)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # -- checkpoints -----------------------------------------------------------------------
    def optimized_params(self) -> list[nn.Parameter]:
        """Every parameter the optimizer holds (strategies may add groups or move requires_grad)."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        ids = {id(p) for p in self.optimized_params()}
        return {n: p for n, p in self.model.named_parameters() if id(p) in ids}

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors, whole on every process (FSDP: gathered from the shards, a collective that
        every process must call; otherwise the tensors themselves)."""
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                for n, p in self._trainable_state().items()}

    def save_checkpoint(self) -> Path | None:
        from accelerate.utils import gather_object

        if self.config.fsdp:
            raise ValueError("fsdp runs do not write checkpoints yet; train with save_every=0")

        rngs = gather_object([ckpt.rng_state()]) if self.accelerator.num_processes > 1 else [ckpt.rng_state()]
        path = None
        if self.is_main and self.out_dir is not None:
            state = {"step": self.step, "config": dataclasses.asdict(self.config),
                     "world_size": self.accelerator.num_processes, "train_spec": self.train_spec.to_dict()}
            if self.scaler is not None:  # plain floats/ints: exact in the JSON trainer state
                state["grad_scaler"] = self.scaler.state_dict()
            path = ckpt.save_checkpoint(self.out_dir / "checkpoints", self.step, params=self._trainable_state(),
                                        optimizer=self.optimizer, scheduler=self.scheduler, trainer_state=state,
                                        strategies={s.name: s.state_dict() for s in self.strategies},
                                        rng_per_rank=rngs, keep=self.config.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return path

    def _resume(self, resume: str | Path | bool) -> int | None:
        if resume is False or resume is None:
            return None
        if resume is True or resume == "latest":
            found = ckpt.list_checkpoints(self.out_dir / "checkpoints") if self.out_dir else []
            if not found:
                return None
            path = found[-1]
        else:
            path = Path(resume)
            if not (path / ckpt.COMPLETE).exists():
                raise FileNotFoundError(f"{path}: not a complete checkpoint (no {ckpt.COMPLETE})")
        blocking = [s.name for s in self.strategies if not s.resumable]
        if blocking:
            raise ValueError(f"{path}: strategy {blocking} cannot resume a run (declared resumable = False); "
                             "start a new run in another out_dir or remove the checkpoints")
        data = ckpt.load_checkpoint(path)
        changes = self._check_config(path, data["trainer_state"])
        saved_world = data["trainer_state"].get("world_size", 1)
        if saved_world != self.accelerator.num_processes:
            raise ValueError(f"{path}: checkpoint was written by {saved_world} processes, resuming with "
                             f"{self.accelerator.num_processes}; exact resume needs the same number")
        for s in self.strategies:  # structure first (grown tensors, added groups), then the state into it
            s.restore_structure(self.context, data["strategies"].get(s.name, {}))
        named = self._trainable_state()
        missing = set(named) - set(data["params"])
        if missing:
            raise ValueError(f"{path}: checkpoint lacks trainable tensors {sorted(missing)[:3]}")
        wrong = [n for n, p in named.items() if tuple(p.shape) != tuple(data["params"][n].shape)]
        if wrong:
            n = wrong[0]
            raise ValueError(f"{path}: checkpoint tensor {n} has shape {tuple(data['params'][n].shape)}, the model's "
                             f"{tuple(named[n].shape)}; resume with the same adapter spec and strategies")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(data["params"][n])
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        for s in self.strategies:
            s.load_state_dict(data["strategies"].get(s.name, {}))
        if self.scaler is not None:
            if "grad_scaler" not in data["trainer_state"]:
                raise ValueError(f"{path}: checkpoint has no fp16 loss-scaler state (trained in another precision?)")
            self.scaler.load_state_dict(data["trainer_state"]["grad_scaler"])
        ckpt.set_rng_state(data["rng"][self.accelerator.process_index])
        self.step = int(data["trainer_state"]["step"])
        if changes:
            self._apply_changes(changes)
            self._history.append({"step": self.step, "changes": changes})
        return self.step

    def _recorded_spec(self, trainer_state: dict[str, Any]) -> dict[str, Any]:
        """The spec the checkpointed run was trained with: the checkpoint's own record, else the run dir's
        ``train_spec.json`` as it was before this run, else a spec from the checkpoint's trainer config."""
        if isinstance(trainer_state.get("train_spec"), dict):
            return trainer_state["train_spec"]
        if self._previous_spec is not None:
            return self._previous_spec
        config = trainer_state.get("config") or {}
        return TrainSpec.for_run(self.strategies, config).to_dict() | {"strategies": None} if config else {}

    def _check_config(self, path: Path, trainer_state: dict[str, Any]) -> dict[str, list[Any]]:
        old = self._recorded_spec(trainer_state)
        if not old:
            return {}
        new = self.train_spec.to_dict()
        if old.get("strategies") is None:  # an old checkpoint recorded only the trainer config
            old = {**old, "strategies": new["strategies"], "init": new["init"], "init_args": new["init_args"],
                   "data": new["data"]}
        self._history = list((old.get("trainer") or {}).get("config_changes") or [])
        diff = spec_differences(old, new)
        if diff and not self.config.allow_config_change:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ResumeConfigError(
                f"{path}: the run was trained with another config; resuming would mix two runs ({listed}). "
                "Use the recorded values, another out_dir, or allow_config_change=True "
                "(lorakit train --allow-config-change) to change them deliberately (the change is recorded)")
        return diff

    def _apply_changes(self, changes: dict[str, list[Any]]) -> None:
        """A deliberate change takes effect from the resumed step: the loaded optimizer and scheduler state
        carry the old lr/betas/weight decay, so the new ones are set here (the schedule's shape and length
        come from the new config already)."""
        c = self.config
        old_lr = changes.get("lr", [c.lr])[0]
        if "lr" in changes and isinstance(old_lr, (int, float)) and old_lr > 0:
            ratio = c.lr / old_lr
            self.scheduler.base_lrs = [b * ratio for b in self.scheduler.base_lrs]
            for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=False):
                g["initial_lr"] = base
        for g, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas,
                               strict=False):
            g["lr"] = base * fn(self.scheduler.last_epoch)
            if any(k.startswith("betas") for k in changes):
                g["betas"] = tuple(c.betas)
            if "weight_decay" in changes and g.get("weight_decay") == changes["weight_decay"][0]:
                g["weight_decay"] = c.weight_decay
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def _logged_eval_before(self) -> dict[str, float]:
        """A resumed run's eval before training: the step-0 eval record of the run's log."""
        if self.out_dir is None:
            return {}
        for r in read_log(self.out_dir / "log.jsonl"):
            if r.get("step") == 0 and isinstance(r.get("eval"), dict):
                return {k: float(v) for k, v in r["eval"].items()}
        return {}

    # -- logging ---------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if self.is_main and self.out_dir is not None:
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _trim_log(self) -> None:
        """After a resume, drop log records from steps the checkpoint does not contain."""
        if not (self.is_main and self.out_dir is not None):
            return
        path = self.out_dir / "log.jsonl"
        kept = [r for r in read_log(path) if r.get("step", 0) <= self.step]
        atomic.write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def evaluate(self) -> dict[str, float]:
        if self.eval_fn is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            metrics = self.eval_fn(self.model)
        self.model.train(was_training)
        return {k: float(v) for k, v in metrics.items()}

    def _autocast(self) -> Any:
        dtype = PRECISIONS[self.config.precision]
        return nullcontext() if dtype is None else torch.autocast(device_type=self.device_type, dtype=dtype)

    # -- the loop --------------------------------------------------------------------------
    def train(self, resume: str | Path | bool = True) -> TrainResult:
        c, acc = self.config, self.accelerator
        self._previous_spec = None  # the run dir's train_spec.json before this run (what a resume compares with)
        self._history = []
        if self.out_dir is not None and (self.out_dir / "train_spec.json").is_file():
            try:
                self._previous_spec = json.loads((self.out_dir / "train_spec.json").read_text())
            except (OSError, ValueError):
                self._previous_spec = None
        if self.out_dir is not None and self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed = self._resume(resume)  # a refused resume leaves the recorded train_spec.json as it was
        if resumed is not None and self._history:  # earlier deliberate changes stay in the record
            self.train_spec = dataclasses.replace(self.train_spec, trainer={**self.train_spec.trainer,
                                                                            "config_changes": self._history})
        if self.out_dir is not None and self.is_main:
            atomic.write_json(self.out_dir / "train_spec.json", self.train_spec.to_dict())
        eval_before: dict[str, float] = {}
        if resumed is not None:
            self._trim_log()
            eval_before = self._logged_eval_before()
        else:
            torch.manual_seed(c.seed + acc.process_index)
        stream = IndexStream(len(self.train_data), c.seed)
        if resumed is None and c.eval_at_start:
            eval_before = self.evaluate()
            self._log({"step": 0, "eval": eval_before})
        for s in self.strategies:
            s.on_train_start(self.context)
        bar = tqdm(total=c.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (c.progress and self.is_main), file=sys.stderr)
        losses: list[float] = []
        t0 = time.perf_counter()
        self.model.train()
        while self.step < c.steps:
            for s in self.strategies:
                s.on_step_start(self.context, self.step)
            total = 0.0
            for micro in range(c.grad_accum):
                k = self.step * c.grad_accum + micro
                idx = stream.batch(k, c.batch_size, acc.process_index, acc.num_processes)
                batch = self.collate([self.train_data[i] for i in idx])
                sync = micro == c.grad_accum - 1
                ctx = acc.no_sync(self.wrapped) if not sync and acc.num_processes > 1 else nullcontext()
                with ctx:
                    with self._autocast():
                        loss = self.loss_fn(self.wrapped, batch)
                        aux = getattr(self.model, "aux_loss", None)
                        if inspect.ismethod(aux):  # a model's own auxiliary loss (e.g. a router's balance loss)
                            loss = loss + aux()
                        for s in self.strategies:
                            loss = s.on_loss(self.context, loss, batch)
                    loss = loss.float()
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss.item()} at step {self.step}; lower the lr")
                    scaled = loss / c.grad_accum
                    acc.backward(self.scaler.scale(scaled) if self.scaler is not None else scaled)
                total += loss.detach().item() / c.grad_accum
            if self.scaler is not None:  # true gradients for every strategy hook, clipping and the inf check
                self.scaler.unscale_(self.optimizer)
            for s in self.strategies:
                s.on_after_backward(self.context, self.step)
            grad_norm = None
            if c.max_grad_norm:
                grad_norm = float(acc.clip_grad_norm_(self.optimized_params(), c.max_grad_norm))
            for s in self.strategies:
                s.on_before_optimizer_step(self.context, self.step)
            if self.scaler is not None:  # skips the step when a gradient is inf/nan, then adapts the scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            with warnings.catch_warnings():  # a skipped fp16 step still advances the schedule (one step per step)
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if acc.num_processes > 1:
                total = float(acc.reduce(torch.tensor(total), reduction="mean"))
            losses.append(total)
            logs = {"step": self.step, "loss": total, "lr": self.scheduler.get_last_lr()[0],
                    "epoch": round(stream.epoch_of(self.step * c.grad_accum, c.batch_size, acc.num_processes), 4)}
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm
            for s in self.strategies:
                s.on_step_end(self.context, self.step, logs)
            if self.step % c.log_every == 0 or self.step == c.steps:
                self._log(logs)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{logs['lr']:.2e}")
            bar.update(1)
            if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                self._log({"step": self.step, "eval": self.evaluate()})
                self.model.train()
            if c.save_every and self.step % c.save_every == 0 and self.step < c.steps:
                self.save_checkpoint()
        bar.close()
        seconds = time.perf_counter() - t0
        self.model.eval()
        eval_after = self.evaluate()
        if eval_after:
            self._log({"step": self.step, "eval": eval_after})
        if self.out_dir is not None and self.is_main:
            plot_run(self.out_dir / "log.jsonl", self.out_dir / "curves.png")
        final = losses[-1] if losses else math.nan
        return TrainResult(steps=self.step, final_loss=final, train_seconds=seconds, eval_before=eval_before,
                           eval_after=eval_after, losses=losses, resumed_from=resumed,
                           out_dir=str(self.out_dir) if self.out_dir else None)
