"""The shared machinery of all routers: a bank of frozen LoRA adapters per Linear and Σ_e g_e(x)·ΔW_e x.

Notation: expert e (one adapter) has, on a target Linear W0 (out × in), ΔW_e = s_e·B_e·A_e with
A_e ∈ R^{r_e×in}, B_e ∈ R^{out×r_e}. The bank reads the adapters with the scale folded into B
(``compose.merge.parts.gather``: same checks as merging, i.e. same base, same targets, LoRA-like forms)
and stacks them per module, zero-padding ranks to r_max:

    A: [E, r_max, in]   B: [E, out, r_max]   scale: [E] (1 after folding)   bias: [E, out] or None

Zero padding is exact: padded rows of A meet padded columns of B, so B_e·A_e is unchanged.

A :class:`RoutedLinear` replaces each target Linear (or HF Conv1D); its output is

    y = W0 x + Σ_e g_e · s_e·B_e·A_e·x            (``mix="delta"``: MeteoRA, LoRA-Mixer)
    y = W0 x + (Σ_e g_e s_e B_e)(Σ_e g_e A_e)·x    (``mix="factors"``: RecLoRA's official code)

where the gate weights g come from the router that owns the layer (:meth:`RoutedModel.layer_weights`):
per token from the layer's input (MeteoRA, LoRA-Mixer), or per sample from a side input (RecLoRA).
The delta path never materializes ΔW: h = x·Aᵀ per expert ([..., E, r]), scaled by g, then one
contraction with B.

:class:`RoutedModel` is the base of the routers: it installs the layers, passes routing side inputs
(``task_ids=``, ``user=``) from ``forward`` to the layers, offers fixed manual weights
(:meth:`set_weights`) and saves/loads a folder:

- ``lorakit_router.json``: method, its args, adapter names, module paths, ranks, format version;
- ``bank.safetensors``: the stacked adapters (``<path>.A``, ``.B``, ``.scale``, ``.bias``);
- ``router.safetensors``: the router's own tensors (gates, user MLP) and its :meth:`RoutedModel.extra_state`
  (e.g. the reference values of LoRA-Mixer's joint-regime preservation term).

Each file is written atomically and the JSON last, so an interrupted save is detected on load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import nn

from lorakit.core import atomic
from lorakit.core.batched import BackendError
from lorakit.core.layer import AdaptedLayer
from lorakit.core.sources import StackedLoRA, add_source, remove_source
from lorakit.core.spec import NoArgs, build_args
from lorakit.core.state import AdapterState
from lorakit.forms.base import layer_dims

ROUTER_FILE = "lorakit_router.json"
BANK_FILE = "bank.safetensors"
GATES_FILE = "router.safetensors"
FORMAT_VERSION = 1
MIXES = ("delta", "factors")


class RouterError(ValueError):
    """Bad router input: no adapters, unknown module, wrong side input, corrupt router folder."""


# -- the bank ---------------------------------------------------------------------------------------


@dataclass
class ExpertTensors:
    """The stacked adapters of one module (scale folded into B unless ``scale`` says otherwise)."""

    A: torch.Tensor  # [E, r_max, in]
    B: torch.Tensor  # [E, out, r_max]
    scale: torch.Tensor  # [E]
    bias: torch.Tensor | None  # [E, out]
    ranks: list[int]


@dataclass
class LoRABank:
    """Frozen LoRA adapters stacked per module: ``modules[path]`` holds all E experts of that module."""

    names: list[str]
    modules: dict[str, ExpertTensors]

    @property
    def num_experts(self) -> int:
        return len(self.names)

    @classmethod
    def from_adapters(cls, adapters: Sequence[AdapterState | str | Path],
                      names: Sequence[str] | None = None) -> LoRABank:
        """Stack adapters (AdapterStates or PEFT/lorakit folders; any ranks, same base and targets)."""
        from lorakit.compose.merge.parts import MergeInputError, gather, load_inputs

        if not adapters:
            raise RouterError("a router needs at least one adapter")
        try:
            states, labels = load_inputs(list(adapters))
            paths, factors = gather(states, labels)
        except MergeInputError as e:
            raise RouterError(str(e)) from e
        if names is None:
            names = [Path(a).name if isinstance(a, (str, Path)) else f"adapter_{i}" for i, a in enumerate(adapters)]
        names = [str(n) for n in names]
        if len(names) != len(states) or len(set(names)) != len(names):
            raise RouterError(f"give one distinct name per adapter; got {names} for {len(states)} adapter(s)")
        modules = {}
        for path in paths:
            fs = [f[path] for f in factors]
            r_max = max(f.rank for f in fs)
            out, inp = fs[0].B.shape[0], fs[0].A.shape[1]
            A = torch.zeros(len(fs), r_max, inp)
            B = torch.zeros(len(fs), out, r_max)
            for e, f in enumerate(fs):
                A[e, : f.rank] = f.A
                B[e, :, : f.rank] = f.B
            bias = None
            if any(f.bias is not None for f in fs):
                bias = torch.stack([f.bias if f.bias is not None else torch.zeros(out) for f in fs])
            modules[path] = ExpertTensors(A=A, B=B, scale=torch.ones(len(fs)), bias=bias,
                                          ranks=[f.rank for f in fs])
        return cls(names=names, modules=modules)


class ExpertStack(StackedLoRA):
    """The E experts of one layer: the core's stacked source (``core.sources.StackedLoRA``), built from
    :class:`ExpertTensors` (frozen unless a regime trains them); its gate is the router's."""

    def __init__(self, t: ExpertTensors, trainable: bool = False, gate: nn.Module | None = None,
                 mode: str = "delta") -> None:
        super().__init__(t.A, t.B, t.scale, t.bias, t.ranks, trainable=trainable, gate=gate, mode=mode)

    def mix(self, x: torch.Tensor, g: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        try:
            return super().mix(x, g, mode)
        except BackendError as e:
            raise RouterError(str(e)) from e

    def expert_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The experts' own tensors (A, B, bias), not the gate's."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("gate.")]

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.expert_named_parameters()]

    def tensors(self) -> ExpertTensors:
        return ExpertTensors(A=self.A.detach(), B=self.B.detach(), scale=self.scale.detach(),
                             bias=None if self.bias is None else self.bias.detach(), ranks=self.ranks)


class RoutedLinear(nn.Module):
    """A router's gate on one layer: computes the expert weights from the layer input (through the
    owning :class:`RoutedModel`) and holds that layer's own gate parameters (``gate``) and what the
    router records in forward (``last``: logits, probs). It is the ``gate`` of the layer's
    :class:`ExpertStack`, a delta source of the one ``AdaptedLayer`` (``core.sources``)."""

    def __init__(self, base_layer: nn.Module, stack: ExpertStack, gate: nn.Module | None, path: str) -> None:
        super().__init__()
        self.__dict__["base_layer"] = base_layer  # plain references: the AdaptedLayer owns both
        self.__dict__["stack"] = stack
        self.gate = gate
        self.path = path
        self.__dict__["_owner"] = None  # the RoutedModel (not a submodule: no cycle)
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor | None:
        owner = self.__dict__["_owner"]
        if owner is None or owner.disabled:
            return None
        return owner.layer_weights(self, x)


ROUTER_SOURCE = "router"  # the key of a router's stacks in AdaptedLayer.sources


def _layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear or HF Conv1D."""
    i, o = layer_dims(module)
    return o, i


# -- the routed model ---------------------------------------------------------------------------------


class RoutedModel(nn.Module):
    """Base of the routers. A subclass sets ``name``, ``Args``, ``mix``, builds its gates in
    :meth:`make_gate` / :meth:`build`, and implements :meth:`compute_weights`."""

    name: ClassVar[str] = ""
    Args: ClassVar[type] = NoArgs
    mix: ClassVar[str] = "delta"
    side_inputs: ClassVar[tuple[str, ...]] = ()  # forward kwargs this router consumes

    def __init__(self, model: nn.Module, bank: LoRABank, **args: Any) -> None:
        super().__init__()
        self.args = build_args(self.Args, args, owner=f"router {self.name!r}")
        self.model = model
        self.expert_names = list(bank.names)
        self.disabled = False
        self._forced: torch.Tensor | None = None
        self.context: dict[str, Any] = {}
        self.last_context: dict[str, Any] = {}
        self._pending: dict[str, Any] = {}
        self.layers: dict[str, RoutedLinear] = {}
        for path, t in bank.modules.items():
            try:
                module = model.get_submodule(path)
            except AttributeError as e:
                raise RouterError(f"module {path!r} of the adapters is not in this model") from e
            if isinstance(module, AdaptedLayer) and ROUTER_SOURCE in module.sources:
                raise RouterError(f"{path}: already routed; unroute the model first")
            base = module.base_layer if isinstance(module, AdaptedLayer) else module
            try:
                shape = _layer_shape(base)
            except TypeError as e:
                raise RouterError(f"{path}: a {type(base).__name__}, not a Linear; routers wrap Linear layers") from e
            if shape != (t.B.shape[1], t.A.shape[2]):
                raise RouterError(f"{path}: model layer is (out, in) = {shape}, the adapters are "
                                  f"{(t.B.shape[1], t.A.shape[2])}: another base model")
            stack = ExpertStack(t, trainable=self.trains_experts(), mode=self.mix).to(base.weight.device)
            layer = RoutedLinear(base, stack, self.make_gate(t, path), path)
            layer.to(base.weight.device)
            layer.__dict__["_owner"] = self
            stack.gate = layer
            add_source(model, path, ROUTER_SOURCE, stack)
            self.layers[path] = layer
        self.build()

    # -- hooks for the methods
    def make_gate(self, t: ExpertTensors, path: str) -> nn.Module | None:
        """The per-layer gate module (None: the router's weights do not come from the layer input)."""
        return None

    def build(self) -> None:
        """Router-level modules (after the layers exist)."""

    def trains_experts(self) -> bool:
        return False

    def compute_weights(self, layer: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, context: dict[str, Any]) -> None:
        """Called once per forward with the side inputs (e.g. compute per-user weights)."""

    # -- generic behaviour
    def layer_weights(self, layer: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
        if self._forced is not None:
            w = self._forced.to(x.device)
            if self.mix == "factors":
                return w.expand(x.shape[0], w.shape[-1])
            return w
        return self.compute_weights(layer, x)

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def set_weights(self, weights: Sequence[float] | torch.Tensor | None) -> None:
        """Fix the expert weights of every layer and token (e.g. one-hot: that adapter alone); None: route."""
        if weights is None:
            self._forced = None
            return
        w = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if w.numel() != self.num_experts:
            raise RouterError(f"{w.numel()} weight(s) for {self.num_experts} experts")
        self._forced = w

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        context = {k: kwargs.pop(k) for k in list(kwargs) if k in self.side_inputs}
        if not context and self._pending:
            context = dict(self._pending)
        self.context = context
        self.last_context = context  # kept after forward for aux losses that need the labels
        for layer in self.layers.values():
            layer.last = {}
        self.prepare(context)
        try:
            return self.model(*args, **kwargs)
        finally:
            self.context = {}

    @contextlib.contextmanager
    def side_inputs_from(self, batch: dict[str, Any]):
        """Route the forward calls inside with the side inputs found in ``batch`` (``task_ids``, ``user``):
        for loss functions that call the model with fixed keyword arguments (e.g. a task objective)."""
        self._pending = {k: batch[k] for k in self.side_inputs if k in batch}
        try:
            yield self
        finally:
            self._pending = {}

    def mark_trainable(self) -> list[nn.Parameter]:
        """Freeze everything but the router (and the experts where the regime trains them); returns them."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = self.gate_parameters()
        if self.trains_experts():
            params += [p for la in self.layers.values() for p in la.stack.expert_parameters()]
        for p in params:
            p.requires_grad_(True)
        return params

    def gate_parameters(self) -> list[nn.Parameter]:
        """The router's own parameters (gates, user MLP), not the experts or the base."""
        return [p for _, p in self.router_named_parameters()]

    def router_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        out = []
        for path, layer in self.layers.items():
            if layer.gate is not None:
                out += [(f"{path}.gate.{k}", p) for k, p in layer.gate.named_parameters()]
        out += [(f"_router.{k}", p) for k, p in self.router_modules().named_parameters()]
        return out

    def router_modules(self) -> nn.Module:
        """Router-level modules (override); their state is saved with the gates."""
        return nn.Module()

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors (not parameters) the router needs after a load, saved with the gates (override; keys
        must not start with a module path's ``<path>.gate.`` or ``_router.``)."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`extra_state` (called with exactly its keys)."""

    def router_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for path, layer in self.layers.items():
            if layer.gate is not None:
                state.update({f"{path}.gate.{k}": v for k, v in layer.gate.state_dict().items()})
        state.update({f"_router.{k}": v for k, v in self.router_modules().state_dict().items()})
        state.update(self.extra_state())
        return state

    def load_router_state(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.router_state()
        extra_keys = set(self.extra_state())
        missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        if missing and set(missing) == extra_keys and not extra:  # a file written before extra_state existed
            warnings.warn(f"router {self.name!r}: the file holds no {sorted(extra_keys)[:2]}... (saved by an older "
                          f"lorakit); keeping the values built from the loaded tensors", stacklevel=2)
            extra_keys, missing = set(), []
        if missing or extra:
            raise RouterError(f"router tensors do not match this router: missing {missing[:3]}, unexpected "
                              f"{extra[:3]}")
        if extra_keys:
            self.load_extra_state({k: state[k] for k in extra_keys})
        for path, layer in self.layers.items():
            if layer.gate is not None:
                prefix = f"{path}.gate."
                layer.gate.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        self.router_modules().load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("_router.")})

    def bank(self) -> LoRABank:
        return LoRABank(names=list(self.expert_names), modules={p: la.stack.tensors() for p, la in self.layers.items()})

    def unroute(self) -> nn.Module:
        """Take the router's sources out of the layers (the original modules return); the base model."""
        for path in self.layers:
            remove_source(self.model, path, ROUTER_SOURCE)
        self.layers = {}
        return self.model

    @contextlib.contextmanager
    def disabled_routing(self):
        self.disabled = True
        try:
            yield self
        finally:
            self.disabled = False

    def extra_config(self) -> dict[str, Any]:
        """What a subclass needs to rebuild itself besides Args and the bank (e.g. user_dim)."""
        return {}

    # -- files
    def save(self, out_dir: str | Path) -> Path:
        """Write the router folder (bank + router tensors + ``lorakit_router.json``), atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        bank = self.bank()
        tensors = {}
        for path, t in bank.modules.items():
            tensors[f"{path}.A"], tensors[f"{path}.B"], tensors[f"{path}.scale"] = t.A, t.B, t.scale
            if t.bias is not None:
                tensors[f"{path}.bias"] = t.bias
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        gates = {k: v.detach().cpu().contiguous() for k, v in self.router_state().items()}
        info = {"format_version": FORMAT_VERSION, "method": self.name, "args": dataclasses.asdict(self.args),
                "names": bank.names, "ranks": {p: t.ranks for p, t in bank.modules.items()},
                "extra": self.extra_config()}
        with contextlib.ExitStack() as stack:
            info_tmp = stack.enter_context(atomic.atomic_path(out / ROUTER_FILE))
            bank_tmp = stack.enter_context(atomic.atomic_path(out / BANK_FILE))
            gates_tmp = stack.enter_context(atomic.atomic_path(out / GATES_FILE))
            save_file(tensors, str(bank_tmp), metadata={"format": "pt"})
            save_file(gates, str(gates_tmp), metadata={"format": "pt"})
            info_tmp.write_bytes((json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
        return out

    @classmethod
    def from_extra(cls, model: nn.Module, bank: LoRABank, args: dict[str, Any], extra: dict[str, Any]) -> RoutedModel:
        return cls(model, bank, **args)


def _untrusted_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of a router folder by the adapter-folder rules (``core.state.read_float_tensors``)."""
    from lorakit.core.state import AdapterFileError, read_float_tensors

    try:
        return read_float_tensors(path, "router tensors")
    except AdapterFileError as e:
        raise RouterError(str(e)) from None


def _router_info(path: Path, model: nn.Module) -> dict[str, Any]:
    """``lorakit_router.json``, read by the adapter-folder rules (bounded, depth-limited, finite) and type-checked."""
    from lorakit.core.state import AdapterFileError, read_json

    try:
        info = read_json(path)
    except AdapterFileError as e:
        raise RouterError(str(e)) from None

    def bad(field: str, what: str) -> RouterError:
        shown = repr(info.get(field))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return RouterError(f"{path}: field {field!r} must be {what}, got {shown}")

    version = info.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad("format_version", "an integer >= 1")
    if version > FORMAT_VERSION:
        raise RouterError(f"{path}: format {version} is newer than this lorakit")
    if not isinstance(info.get("method"), str):
        raise bad("method", "a router name (a string)")
    names = info.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise bad("names", "a non-empty list of strings")
    for field in ("args", "extra"):
        if not isinstance(info.setdefault(field, {}), dict):
            raise bad(field, "an object")
    ranks = info.get("ranks")
    if not isinstance(ranks, dict) or not ranks:
        raise bad("ranks", "an object (module path -> one rank per expert)")
    for mpath, rs in ranks.items():
        if not (isinstance(rs, list) and len(rs) == len(names)
                and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rs)):
            raise RouterError(f"{path}: field 'ranks.{mpath}' must be {len(names)} integer rank(s) >= 1 "
                              f"(one per expert), got {rs!r:.80}")
        try:
            model.get_submodule(mpath)
        except AttributeError:
            raise RouterError(f"{path}: field 'ranks' names module {mpath!r:.80}, which this model does not "
                              "have") from None
    return info


def _check_bank_tensors(path: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any], model: nn.Module) -> None:
    """Every tensor's shape against the JSON's ranks and the model's layers, before anything is built."""
    e = len(info["names"])
    expected: set[str] = set()
    for mpath, ranks in info["ranks"].items():
        try:
            out, inp = _layer_shape(model.get_submodule(mpath))
        except Exception as err:  # noqa: BLE001 - a module that is no Linear / Conv1D
            raise RouterError(f"{path}: module {mpath!r} cannot carry LoRA experts ({err})") from None
        r = max(ranks)
        want = {"A": (e, r, inp), "B": (e, out, r), "scale": (e,), "bias": (e, out)}
        for part, shape in want.items():
            key = f"{mpath}.{part}"
            if key not in tensors:
                if part == "bias":
                    continue
                raise RouterError(f"{path}: tensor {key!r} missing")
            expected.add(key)
            if tuple(tensors[key].shape) != shape:
                raise RouterError(f"{path}: tensor {key!r} has shape {list(tensors[key].shape)}, expected "
                                  f"{list(shape)} ({e} experts, rank {r}, layer {out}x{inp})")
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise RouterError(f"{path}: unexpected tensors {unexpected[:3]} (not listed in {ROUTER_FILE} 'ranks')")


def load_routed(model: nn.Module, router_dir: str | Path) -> RoutedModel:
    """Rebuild a saved router on ``model`` (the same base it was built on).

    A router folder is untrusted input, read by the adapter-folder rules of ``core.state``: only regular
    files inside the folder (no FIFOs, devices, links out of the folder), bounded JSON with finite numbers and
    checked types, floating-point finite tensors whose shapes match the JSON's ranks and the model before
    anything is built; every failure is a :class:`RouterError` naming the file. A failed load leaves
    ``model`` as it was."""
    import os

    from lorakit.core import registry

    d = Path(router_dir)
    if not os.path.lexists(d / ROUTER_FILE):
        raise RouterError(f"{d}: no {ROUTER_FILE}; not a router folder")
    info = _router_info(d / ROUTER_FILE, model)
    try:
        cls = registry.get("route", info["method"])
    except Exception as e:  # noqa: BLE001 - unknown name
        raise RouterError(f"{d / ROUTER_FILE}: unknown router method {info['method']!r:.80} ({e})") from None
    tensors = _untrusted_tensors(d / BANK_FILE)
    _check_bank_tensors(d / BANK_FILE, tensors, info, model)
    gates = _untrusted_tensors(d / GATES_FILE)
    modules = {p: ExpertTensors(A=tensors[f"{p}.A"], B=tensors[f"{p}.B"], scale=tensors[f"{p}.scale"],
                                bias=tensors.get(f"{p}.bias"), ranks=list(ranks)) for p, ranks in info["ranks"].items()}
    try:
        router = cls.from_extra(model, LoRABank(names=info["names"], modules=modules), info["args"], info["extra"])
    except RouterError as e:
        raise RouterError(f"{d / ROUTER_FILE}: {e}") from None
    except (TypeError, ValueError, KeyError, RuntimeError, AttributeError) as e:
        raise RouterError(f"{d / ROUTER_FILE}: cannot rebuild the router from 'args'/'extra' "
                          f"({type(e).__name__}: {str(e)[:200]})") from None
    try:
        mine = router.router_state()
        for k, t in gates.items():
            if k in mine and tuple(t.shape) != tuple(mine[k].shape):
                raise RouterError(f"tensor {k!r} has shape {list(t.shape)}, expected {list(mine[k].shape)}")
        router.load_router_state(gates)
    except (RouterError, RuntimeError, ValueError, KeyError) as e:
        router.unroute()  # leave the model as it was
        raise RouterError(f"{d / GATES_FILE}: {e}") from None
    return router.eval()  # inference mode (dropout in a user gate off); call .train() to keep training


def broadcast_labels(task_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Task ids per sample [B] or per token [B, T] → per position of ``x`` ([..., in] → [...])."""
    t = torch.as_tensor(task_ids, device=x.device).long()
    lead = x.shape[:-1]
    while t.dim() < len(lead):
        t = t[..., None]
    return t.expand(lead)


def fresh_bank(model: nn.Module, targets: Sequence[str], k: int = 8, r: int = 8, alpha: float | None = None,
               seed: int = 0, names: Sequence[str] | None = None) -> LoRABank:
    """K untrained LoRA experts on ``targets`` (module paths): A Kaiming-uniform (a=√5, PEFT's default),
    B = 0, s = α/r with α = 2r by default. For regimes that train the experts (joint LoRA-Mixer, RecLoRA)."""
    import math

    g = torch.Generator().manual_seed(seed)
    alpha = 2.0 * r if alpha is None else alpha
    modules = {}
    for path in targets:
        out, inp = _layer_shape(model.get_submodule(path))
        bound = 1.0 / math.sqrt(inp)  # kaiming_uniform_(a=√5) on (r, in)
        A = (torch.rand(k, r, inp, generator=g) * 2 - 1) * bound
        modules[path] = ExpertTensors(A=A, B=torch.zeros(k, out, r), scale=torch.full((k,), alpha / r), bias=None,
                                      ranks=[r] * k)
    names = [f"expert_{i}" for i in range(k)] if names is None else [str(n) for n in names]
    if len(names) != k:
        raise RouterError(f"{len(names)} name(s) for {k} experts")
    return LoRABank(names=names, modules=modules)
