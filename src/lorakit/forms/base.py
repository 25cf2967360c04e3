"""The Form interface shared by every adapter parameterization."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.quant import QuantizedBaseError, dequantized_weight, is_quantized


def is_conv1d(layer: nn.Module) -> bool:
    """HF GPT-2 style Conv1D: a linear map whose weight is stored (in, out)."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


# Layer kinds lorakit adapts. "linear" and "conv1d" are linear maps x ↦ W·x; "conv2d" is the 2-D
# convolution of nn.Conv2d (weight (out, in, kh, kw)); "embedding" is the lookup of nn.Embedding
# (weight (num_embeddings, dim)), i.e. the linear map one-hot(id) ↦ Wᵀ·one-hot(id) from R^num to R^dim.
LAYER_KINDS: tuple[str, ...] = ("linear", "conv1d", "conv2d", "embedding")
# The capability a form must declare to be put on a layer of each kind (Linear needs none).
LAYER_CAPS: dict[str, Cap] = {"conv1d": Cap.CONV1D_OK, "conv2d": Cap.CONV2D_OK, "embedding": Cap.EMBEDDING_OK}


def layer_kind(layer: nn.Module) -> str | None:
    """"linear", "conv1d", "conv2d" or "embedding" (see ``LAYER_KINDS``); None for any other layer."""
    if isinstance(layer, nn.Linear):
        return "linear"
    if is_conv1d(layer):
        return "conv1d"
    if isinstance(layer, nn.Conv2d):
        return "conv2d"
    if isinstance(layer, nn.Embedding):
        return "embedding"
    return None


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an adaptable layer, as PEFT counts them: Linear/Conv1D their
    feature sizes, Conv2d its channels (in_channels, out_channels), Embedding (num_embeddings,
    embedding_dim) (the lookup is a linear map from one-hot ids in R^num to R^dim)."""
    kind = layer_kind(layer)
    if kind == "linear":
        return layer.in_features, layer.out_features
    if kind == "conv1d":
        return layer.weight.shape[0], layer.weight.shape[1]
    if kind == "conv2d":
        if layer.groups != 1:
            # ΔW = B·A of a grouped convolution is block-diagonal over the groups; PEFT cannot merge it either
            raise TypeError(f"grouped Conv2d (groups={layer.groups}) is not supported; lorakit adapts Conv2d "
                            "with groups=1")
        return layer.in_channels, layer.out_channels
    if kind == "embedding":
        return layer.num_embeddings, layer.embedding_dim
    raise TypeError(f"unsupported layer type {type(layer).__name__}; lorakit adapts Linear, HF Conv1D, Conv2d "
                    "and Embedding layers")


def _stored_transposed(layer: nn.Module) -> bool:
    # Conv1D stores (in, out) and Embedding (num_embeddings, dim) = (in, out): both are the transpose of
    # the (out, in) layout that ΔW uses.
    return layer_kind(layer) in ("conv1d", "embedding")


def weight_out_in(layer: nn.Module) -> torch.Tensor:
    """The base weight in the layout ΔW uses (a view, no copy): (out, in) for Linear, Conv1D and Embedding
    (Embedding: (dim, num_embeddings)), (out, in, kh, kw) for Conv2d (the weight itself)."""
    layer_dims(layer)  # refuses unsupported layers clearly
    if is_quantized(layer):  # a bitsandbytes 4-/8-bit linear: W read back in floating point (a copy)
        return dequantized_weight(layer)
    return layer.weight.T if _stored_transposed(layer) else layer.weight


def stored_layout(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` given in the layout of :func:`weight_out_in`, as the layer stores it (a view, no copy)."""
    return weight.T if _stored_transposed(layer) else weight


def write_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Write ``weight``, given in the layout of :func:`weight_out_in`, into the layer's own weight storage
    (in place, cast to the layer's dtype): the inverse of ``weight_out_in`` for merge/unmerge."""
    if is_quantized(layer):
        raise QuantizedBaseError(f"cannot write the weight of a quantized {type(layer).__name__} base layer "
                                 "(requantizing W would lose the change to rounding); dequantize the base first "
                                 "(lorakit.core.quant.dequantize_model)")
    w = layer.weight
    new = stored_layout(layer, weight)
    if tuple(new.shape) != tuple(w.shape):
        raise ValueError(f"write_weight: {type(layer).__name__} weight is {tuple(w.shape)} stored, got "
                         f"{tuple(weight.shape)} in the (out, in) layout")
    w.data.copy_(new.to(w.dtype))


class _LayerAwareKey:
    """``tensor_key`` that reads on the class (the form's default ``file_keys``) and on an instance (the
    keys for the kind of layer the form sits on: ``layer_file_keys[kind]`` over ``file_keys``), so
    PEFT's per-layer-type names (e.g. ``lora_embedding_A`` on an Embedding) come out of one call."""

    def __get__(self, form: Form | None, cls: type[Form]) -> Any:
        kind = getattr(form, "layer_kind", None) if form is not None else None

        def tensor_key(tensor_name: str) -> str:
            keys = {**cls.file_keys, **cls.layer_file_keys.get(kind or "", {})}
            return keys.get(tensor_name, tensor_name)

        return tensor_key


_SKIP_INIT: contextvars.ContextVar[bool] = contextvars.ContextVar("lorakit_skip_init", default=False)


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Build forms whose saved tensors are about to be overwritten (a load): inside this context a form's
    ``reset_parameters`` is a no-op, and forms skip any other construction work that only fills tensors
    of ``save_tensors()`` (an SVD, an LU, a weight-guided mask), leaving them allocated but unset.
    Work that builds tensors a file does not carry (non-persistent buffers, shared tensors) still runs.
    Use it only around construction, and load every saved tensor afterwards."""
    token = _SKIP_INIT.set(True)
    try:
        yield
    finally:
        _SKIP_INIT.reset(token)


def init_skipped() -> bool:
    """True inside ``skip_init()``: forms being built will have all their saved tensors loaded."""
    return _SKIP_INIT.get()


def _skipped_under_load(reset: Any) -> Any:
    @functools.wraps(reset)
    def reset_parameters(self: Form, *args: Any, **kwargs: Any) -> Any:
        if init_skipped():
            return None
        return reset(self, *args, **kwargs)

    reset_parameters._skips_on_load = True  # type: ignore[attr-defined]
    return reset_parameters


class SharedTensors(nn.Module):
    """Model-level tensors shared by all layers of one adapter (forms with ``Cap.SHARED_TENSORS``,
    e.g. RandLoRA's random bases; PEFT keeps such tensors on the tuner).

    One instance is a child module of every form of the adapter: ``.to()`` moves it along and the
    tensors exist once in memory. Its buffers are non-persistent, so they never appear in a form's
    own ``state_dict``; the core saves them once per adapter (AdapterState keys = the bare names, file
    keys ``base_model.<name>``) when ``saved``, and also under every layer key when ``layer_copies``.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], *, saved: bool = True,
                 layer_copies: bool = False) -> None:
        super().__init__()
        self.saved = saved
        self.layer_copies = layer_copies
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in tensors.items():
                getattr(self, name).copy_(tensor)


class Form(nn.Module):
    """An adapter parameterization attached to one base layer (Linear/Conv1D; Conv2d and Embedding for
    forms that declare ``Cap.CONV2D_OK`` / ``Cap.EMBEDDING_OK``).

    Subclasses set ``name``, ``Args`` (a frozen dataclass whose defaults come from the paper),
    ``caps`` and optionally ``peft_type``, allocate parameters in ``__init__`` and implement
    ``delta_weight``. ``apply`` is the hot path; the default materializes ΔW, factored forms
    override it. Parameters listed in ``frozen`` stay frozen when the adapter is trained.
    """

    name: ClassVar[str] = ""
    Args: ClassVar[type]
    caps: ClassVar[Cap] = Cap.NONE
    peft_type: ClassVar[str | None] = None
    # older PEFT type names whose files this form also reads (e.g. "BONE" for MiSS)
    peft_type_aliases: ClassVar[tuple[str, ...]] = ()
    # args field -> PEFT per-module pattern key (e.g. "r" -> "rank_pattern")
    peft_patterns: ClassVar[dict[str, str]] = {}
    # whether PEFT's tuner for ``peft_type`` wraps HF Conv1D layers (False: nn.Linear only; PEFT export
    # of an adapter on Conv1D layers is then refused)
    peft_conv1d: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # every form's own reset_parameters (its init) becomes a no-op while forms are built for a load
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("reset_parameters")
        if callable(own) and not getattr(own, "_skips_on_load", False):
            cls.reset_parameters = _skipped_under_load(own)

    def __init__(self, base_layer: nn.Module, args: Any) -> None:
        super().__init__()
        self.args = args
        self.in_features, self.out_features = layer_dims(base_layer)
        self.layer_kind: str = layer_kind(base_layer) or "linear"
        self.frozen: set[str] = set()
        # A plain reference (not a submodule): forms whose ΔW reads W (weight-guided forms) use it,
        # and it must not be saved or registered twice.
        object.__setattr__(self, "_base_layer", base_layer)
        self.shared: SharedTensors | None = None  # set by bind_shared (Cap.SHARED_TENSORS forms)

    @property
    def base_weight(self) -> torch.Tensor:
        """The current base weight in (out, in) layout (merged adapters included, if any); (out, in, kh, kw)
        on a Conv2d."""
        return weight_out_in(self._base_layer)

    # -- semantics -------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """ΔW in the base weight's (out, in) layout."""
        raise NotImplementedError(f"form {self.name!r} must implement delta_weight()")

    def delta_bias(self) -> torch.Tensor | None:
        """Change to the base bias, if the form has one."""
        return None

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Adapted output given the input and the frozen base output."""
        out = base_out + F.linear(x, self.delta_weight())
        bias = self.delta_bias()
        return out if bias is None else out + bias

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight()

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight()

    def merge_into(self, weight: torch.Tensor, sign: float) -> bool:
        """Optional in-place merge (``sign`` = +1) or unmerge (``sign`` = −1) into ``weight``, the base
        layer's own weight in (out, in) layout: a view of its storage (transposed for Conv1D) in the
        base dtype, modified in place under ``no_grad``. Return True when done; the default returns
        False and the layer falls back to ``merged_weight``/``unmerged_weight`` (a dense W ± ΔW written
        back). Forms whose ΔW touches few entries (sparse, scatter forms) override it to write only
        those, allocating nothing of the weight's size; they must keep the fallback's exactness (an
        unmerge that restores what the dense path restores, bit for bit where it is bit-exact)."""
        return False

    def reset_parameters(self) -> None:
        """The paper's default initialization (of saved tensors only: a no-op inside ``skip_init()``)."""

    # -- tensors shared by all layers of an adapter (Cap.SHARED_TENSORS) ---------------------
    shared_names: ClassVar[tuple[str, ...]] = ()  # AdapterState keys; file keys add the prefix base_model.

    @classmethod
    def build_shared(cls, forms: dict[str, Form]) -> SharedTensors:
        """The shared tensors of one adapter, built from all its new forms (module path -> form)."""
        raise NotImplementedError(f"form {cls.name!r} declares no shared tensors")

    def bind_shared(self, shared: SharedTensors) -> None:
        self.shared = shared

    def bind_path(self, module_path: str) -> None:
        """Called once with the form's module path right after construction, before any init or
        load. Forms whose tensors derive from the path (e.g. per-layer seeds) override it."""

    # -- bookkeeping -----------------------------------------------------------------------
    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: Any) -> int:
        """Closed-form count of trainable parameters on one layer (checked by conformance tests)."""
        raise NotImplementedError(f"form {cls.name!r} must implement num_trainable()")

    @classmethod
    def examples(cls) -> list[Any]:
        """Small Args for the conformance suite."""
        return [cls.Args()]

    # tensor name -> key suffix in saved files (PEFT's naming where PEFT knows the form)
    file_keys: ClassVar[dict[str, str]] = {}
    # layer kind -> {tensor name: key suffix} where PEFT names a tensor differently on that kind of layer
    # (e.g. LoRA on an Embedding: "lora_A" -> "lora_embedding_A")
    layer_file_keys: ClassVar[dict[str, dict[str, str]]] = {}

    # ``Form.tensor_key(name)``: the default suffix; ``form.tensor_key(name)``: the suffix for its layer kind
    tensor_key = _LayerAwareKey()

    @classmethod
    def split_key(cls, key: str) -> tuple[str, str]:
        """Split a saved key ``<module path>.<suffix>`` into (module path, tensor name); any layer kind's
        suffix is recognized."""
        for keys in (cls.file_keys, *cls.layer_file_keys.values()):
            for name, suffix in keys.items():
                if key.endswith("." + suffix):
                    return key[: -len(suffix) - 1], name
        path, _, name = key.rpartition(".")
        return path, name

    def save_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that define this adapter (parameters and persistent buffers)."""
        return {k: v for k, v in self.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(tensors, strict=True)

    @classmethod
    def peft_accepts(cls, config: dict[str, Any]) -> bool:
        """Whether this form reads a PEFT config of its ``peft_type`` (several forms may share one)."""
        return True

    @classmethod
    def peft_config(cls, args: Any) -> dict[str, Any]:
        """Fields of PEFT's adapter_config.json for these args (forms with ``peft_type`` only)."""
        raise NotImplementedError(f"form {cls.name!r} has no PEFT config")

    @classmethod
    def args_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Form args from a PEFT adapter_config.json (forms with ``peft_type`` only)."""
        raise NotImplementedError(f"form {cls.name!r} cannot read PEFT configs")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, args={self.args}"
