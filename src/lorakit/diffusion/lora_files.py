"""LoRA files that Stable Diffusion users have: the kohya (sd-scripts) layout and the diffusers layout.

Both hold, per adapted layer, the two factors of ΔW = s·B·A (LoRA, Hu et al., arXiv 2106.09685, Eq. 3):

- **kohya** (kohya-ss/sd-scripts ``networks/lora.py``): keys ``<prefix><module path with '.' -> '_'>.<suffix>``
  with prefix ``lora_unet_`` (UNet), ``lora_te_`` (text encoder; SDXL: ``lora_te1_``/``lora_te2_``) and
  suffixes ``lora_down.weight`` (A: (r, in) or (r, in, kh, kw)), ``lora_up.weight`` (B: (out, r) or
  (out, r, 1, 1)) and ``alpha`` (a scalar; absent means α = r), s = α/r.
- **diffusers** (``StableDiffusionPipeline.save_lora_weights``; PEFT names): keys
  ``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight`` (component ``unet``, ``text_encoder``,
  ``text_encoder_2``); α per module from the safetensors metadata ``lora_adapter_metadata`` (the packed
  ``LoraConfig``: ``<component>.lora_alpha``, ``.alpha_pattern``, ``.rank_pattern``), else α = r (diffusers'
  convention: scale 1).

Kohya names lose the dots of the module path, so a kohya name is resolved against the actual model:
every Linear/Conv2d of the model is indexed by its path with '.' replaced by '_'; a name that two
paths produce is ambiguous and refused, a name that matches no module is refused naming the key
(lorakit's choice: no hard-coded SD 1.5 table, so any model with diffusers/transformers module
names works). Conversion gives one lorakit :class:`~lorakit.core.state.AdapterState` (form ``lora``,
per-module r/α in ``module_args``) per component, so ``lorakit.apply_state``/``save``/``load`` handle it.

Writing: kohya files keep r and α per module (an rsLoRA state, s = α/√r, is written with the equivalent
α' = α·√r); diffusers files fold s into B (α = r, s = 1, no metadata), which diffusers and PEFT load
exactly. Text-encoder names: kohya files name CLIP modules from the ``text_model`` root
(``lora_te_text_model_encoder_layers_0_...``), which transformers >= 5 no longer has; the reader accepts
names with or without that root, the kohya writer always writes it. Files are read as untrusted input
with ``core.state.read_adapter_file`` (regular files only, bounded) and parsed as safetensors only; the
metadata JSON is bounded by ``MAX_JSON_BYTES``.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from lorakit.core import atomic
from lorakit.core.extract import fingerprint
from lorakit.core.inject import exact_pattern
from lorakit.core.layer import AdaptedLayer
from lorakit.core.spec import AdapterSpec
from lorakit.core.state import MAX_JSON_BYTES, AdapterFileError, AdapterState, parse_float_tensors, read_adapter_file

KOHYA_PREFIXES: dict[str, str] = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                                  "lora_te2_": "text_encoder_2"}
KOHYA_PREFIX_OF: dict[str, str] = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
# transformers >= 5 dropped CLIPTextModel's ``text_model`` root module; files in the wild keep it
_TE_ROOT, _TE_ROOT_KOHYA = "text_model.", "text_model_"
_KOHYA_SUFFIXES = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
# kohya/LyCORIS variants that are not plain LoRA: named in the error instead of being misread
_OTHER_VARIANTS = ("hada_", "lokr_", "lora_mid", "dora_scale", ".diff", "oft_", "boft_")


class LoRAFileError(AdapterFileError):
    """A LoRA file that does not fit the model (unknown keys, ambiguous names, shapes) or is corrupt."""


# -- reading ---------------------------------------------------------------------------------------


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a ``.safetensors`` LoRA file, read as untrusted input."""
    p = Path(path)
    if p.suffix != ".safetensors":
        raise LoRAFileError(f"{p}: only .safetensors LoRA files are read (no pickled .ckpt/.pt/.bin)")
    raw = read_adapter_file(p)
    try:
        tensors = parse_float_tensors(p, raw, "LoRA file")
    except AdapterFileError as e:
        raise LoRAFileError(str(e)) from None
    return {k: tensors[k] for k in sorted(tensors)}, _safetensors_metadata(raw, p)


def _safetensors_metadata(raw: bytes, where: Path) -> dict[str, str]:
    if len(raw) < 8:
        raise LoRAFileError(f"{where}: truncated safetensors header")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > min(MAX_JSON_BYTES, len(raw) - 8):
        raise LoRAFileError(f"{where}: safetensors header of {n} bytes is larger than allowed or than the file")
    try:
        header = json.loads(raw[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise LoRAFileError(f"{where}: unreadable safetensors header ({e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        return {}
    return {str(k): v for k, v in meta.items() if isinstance(v, str)}


def detect_layout(tensors: Mapping[str, torch.Tensor]) -> str:
    """``"kohya"`` or ``"diffusers"``, from the key names."""
    keys = list(tensors)
    if keys and all(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        return "kohya"
    if keys and all(k.split(".", 1)[0] in DIFFUSERS_COMPONENTS for k in keys):
        return "diffusers"
    odd = next((k for k in keys if not k.startswith(tuple(KOHYA_PREFIXES))
                and k.split(".", 1)[0] not in DIFFUSERS_COMPONENTS), keys[0] if keys else None)
    raise LoRAFileError(f"not a kohya (lora_unet_*/lora_te_*) or diffusers (unet.*/text_encoder.*) LoRA file: "
                        f"key {odd!r}" if odd else "the LoRA file holds no tensors")


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """path -> base layer of every Linear/Conv2d of ``model`` (through lorakit wrappers)."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, AdaptedLayer):
            out[path] = m.base_layer
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and not path.endswith(".base_layer"):
            out[path] = m
    return out


def kohya_index(model: nn.Module) -> dict[str, list[str]]:
    """kohya name (module path with '.' -> '_') -> the module paths that give it (more than one: ambiguous)."""
    index: dict[str, list[str]] = {}
    for path in _adaptable(model):
        index.setdefault(path.replace(".", "_"), []).append(path)
    return index


def _layer_shape(layer: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise LoRAFileError(f"grouped Conv2d (groups={layer.groups}) cannot carry a LoRA")
        return layer.out_channels, layer.in_channels, tuple(layer.kernel_size)
    return layer.out_features, layer.in_features, ()


def _fit(A: torch.Tensor, B: torch.Tensor, layer: nn.Module, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A, B reshaped to the lorakit layout of ``layer`` (a 1×1 Conv2d and a Linear are the same map, so
    either layout of the file fits either layer), or a LoRAFileError naming the key."""
    out, inp, kernel = _layer_shape(layer)
    r = A.shape[0] if A.dim() else 0
    if A.dim() not in (2, 4) or B.dim() not in (2, 4) or B.shape[1] != r or r < 1:
        raise LoRAFileError(f"{key}: down {tuple(A.shape)} / up {tuple(B.shape)} are not LoRA factors (r, in...) / "
                            "(out, r...)")
    if B.dim() == 4 and tuple(B.shape[2:]) != (1, 1):
        raise LoRAFileError(f"{key}: up weight {tuple(B.shape)} is not a 1×1 convolution")
    a_in = A.shape[1:]
    want = (inp, *kernel)
    flat_ok = math.prod(a_in) == math.prod(want) and (tuple(a_in) == want or all(k == 1 for k in kernel)
                                                      and all(k == 1 for k in a_in[1:]))
    if B.shape[0] != out or not flat_ok:
        raise LoRAFileError(f"{key}: factors down {tuple(A.shape)} / up {tuple(B.shape)} do not fit the model's "
                            f"layer ({type(layer).__name__} out={out}, in={inp}, kernel={kernel or None})")
    A = A.reshape(r, *want)
    B = B.reshape(out, r, *((1, 1) if kernel else ()))
    return A, B


def _state(modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]], model: nn.Module,
           source: str) -> AdapterState:
    """One ``lora`` AdapterState from {path: (A, B, alpha)} in lorakit's layout."""
    pairs = Counter((A.shape[0], alpha) for A, _, alpha in modules.values())
    r0, a0 = pairs.most_common(1)[0][0]
    tensors, module_args = {}, {}
    for path in sorted(modules):
        A, B, alpha = modules[path]
        tensors[f"{path}.lora_A.weight"] = A.detach().float().contiguous()
        tensors[f"{path}.lora_B.weight"] = B.detach().float().contiguous()
        if (A.shape[0], alpha) != (r0, a0):
            module_args[exact_pattern(path)] = {"r": int(A.shape[0]), "alpha": float(alpha)}
    spec = AdapterSpec(form="lora", form_args={"r": int(r0), "alpha": float(a0)}, targets=sorted(modules),
                       module_args=module_args)
    return AdapterState(spec=spec, tensors=tensors, base=fingerprint(model),
                        meta={"source": source, "peft_target_modules": sorted(modules)})


def kohya_to_states(tensors: Mapping[str, torch.Tensor], components: Mapping[str, nn.Module], *,
                    where: str = "kohya LoRA") -> dict[str, AdapterState]:
    """Kohya tensors -> {component: AdapterState}. ``components`` maps ``"unet"``/``"text_encoder"``/
    ``"text_encoder_2"`` to the models the names are resolved against (see the module docstring)."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        prefix = next((p for p in KOHYA_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise LoRAFileError(f"{where}: key {key!r} has no kohya prefix ({sorted(KOHYA_PREFIXES)})")
        variant = next((v for v in _OTHER_VARIANTS if v in key), None)
        if variant is not None:
            raise LoRAFileError(f"{where}: key {key!r} belongs to a LoRA variant ({variant.strip('._')}: LoHa/LoKr/"
                                "LoCon-Tucker/DoRA/...) that is not plain LoRA; only lora_down/lora_up/alpha are read")
        name, _, suffix = key[len(prefix):].partition(".")
        if suffix not in _KOHYA_SUFFIXES:
            raise LoRAFileError(f"{where}: key {key!r}: unknown suffix {suffix!r} (expected one of "
                                f"{sorted(_KOHYA_SUFFIXES)})")
        groups.setdefault((KOHYA_PREFIXES[prefix], name), {})[_KOHYA_SUFFIXES[suffix]] = t
    per_component: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    indexes: dict[str, dict[str, list[str]]] = {}
    unmatched = []
    for (comp, name), parts in sorted(groups.items()):
        if comp not in components:
            raise LoRAFileError(f"{where}: the file adapts {comp!r} (keys lora_*{name}...) but no {comp} model was "
                                f"given (components: {sorted(components)})")
        index = indexes.setdefault(comp, kohya_index(components[comp]))
        paths = index.get(name) or (index.get(name.removeprefix(_TE_ROOT_KOHYA)) if comp != "unet" else None)
        key = f"{KOHYA_PREFIX_OF.get(comp, comp)}{name}"
        if not paths:
            unmatched.append(key)
            continue
        if len(paths) > 1:
            raise LoRAFileError(f"{where}: kohya name {key!r} is ambiguous in the {comp}: modules {paths}")
        if "A" not in parts or "B" not in parts:
            raise LoRAFileError(f"{where}: {key} lacks {'lora_down' if 'A' not in parts else 'lora_up'}.weight")
        A, B = _fit(parts["A"].float(), parts["B"].float(), _adaptable(components[comp])[paths[0]], key)
        alpha = float(parts["alpha"].float().reshape(-1)[0]) if "alpha" in parts else float(A.shape[0])
        if "alpha" in parts and parts["alpha"].numel() != 1:
            raise LoRAFileError(f"{where}: {key}.alpha must be a scalar, got shape {tuple(parts['alpha'].shape)}")
        if not math.isfinite(alpha):
            raise LoRAFileError(f"{where}: {key}.alpha is not finite")
        per_component.setdefault(comp, {})[paths[0]] = (A, B, alpha)
    if unmatched:
        raise LoRAFileError(f"{where}: {len(unmatched)} kohya module name(s) match no Linear/Conv2d of the model, "
                            f"e.g. {unmatched[:3]} (a LoRA for another architecture?)")
    return {comp: _state(mods, components[comp], "kohya") for comp, mods in per_component.items()}


def _meta_config(metadata: Mapping[str, str], comp: str, where: str) -> dict[str, Any]:
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    if len(raw) > MAX_JSON_BYTES:
        raise LoRAFileError(f"{where}: metadata {METADATA_KEY!r} is larger than {MAX_JSON_BYTES} bytes")
    try:
        packed = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise LoRAFileError(f"{where}: metadata {METADATA_KEY!r} is not JSON ({e})") from None
    if not isinstance(packed, dict):
        raise LoRAFileError(f"{where}: metadata {METADATA_KEY!r} must be an object")
    return {k[len(comp) + 1:]: v for k, v in packed.items() if isinstance(k, str) and k.startswith(comp + ".")}


def _alpha_for(config: dict[str, Any], path: str, r: int, where: str) -> float:
    """α of module ``path``: PEFT's alpha_pattern (matched as ``(.*\\.)?(pattern)$``), lora_alpha, else r."""
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise LoRAFileError(f"{where}: alpha_pattern must be an object")
    for pattern, value in patterns.items():
        try:
            hit = re.match(rf"(.*\.)?({pattern})$", path)
        except re.error as e:
            raise LoRAFileError(f"{where}: alpha_pattern {pattern!r} is not a regex ({e})") from None
        if hit:
            return _number(value, where)
    if "lora_alpha" in config:
        return _number(config["lora_alpha"], where)
    return float(r)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LoRAFileError(f"{where}: alpha {value!r} is not a finite number")
    return float(value)


def diffusers_to_states(tensors: Mapping[str, torch.Tensor], components: Mapping[str, nn.Module], *,
                        metadata: Mapping[str, str] | None = None,
                        where: str = "diffusers LoRA") -> dict[str, AdapterState]:
    """Diffusers-layout tensors (``unet.<path>.lora_A.weight``, ...) -> {component: AdapterState}."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        comp, _, rest = key.partition(".")
        for suffix, role in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if rest.endswith(suffix):
                groups.setdefault((comp, rest[: -len(suffix)]), {})[role] = t
                break
        else:
            raise LoRAFileError(f"{where}: key {key!r} is not <component>.<module>.lora_A/lora_B.weight "
                                "(lora biases, DoRA magnitudes and old attention-processor keys are not read)")
    per_component: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    unmatched = []
    for (comp, path), parts in sorted(groups.items()):
        if comp not in components:
            raise LoRAFileError(f"{where}: the file adapts {comp!r} but no {comp} model was given")
        layers = _adaptable(components[comp])
        if path not in layers and comp != "unet":
            path = path.removeprefix(_TE_ROOT)
        if path not in layers:
            unmatched.append(f"{comp}.{path}")
            continue
        if set(parts) != {"A", "B"}:
            raise LoRAFileError(f"{where}: {comp}.{path} lacks lora_{'A' if 'A' not in parts else 'B'}.weight")
        A, B = _fit(parts["A"].float(), parts["B"].float(), layers[path], f"{comp}.{path}")
        alpha = _alpha_for(_meta_config(metadata or {}, comp, where), path, A.shape[0], where)
        per_component.setdefault(comp, {})[path] = (A, B, alpha)
    if unmatched:
        raise LoRAFileError(f"{where}: {len(unmatched)} module(s) of the file are not Linear/Conv2d layers of the "
                            f"model, e.g. {unmatched[:3]} (a LoRA for another architecture?)")
    return {comp: _state(mods, components[comp], "diffusers") for comp, mods in per_component.items()}


def load_lora_file(path: str | Path, components: Mapping[str, nn.Module]) -> dict[str, AdapterState]:
    """A kohya or diffusers ``.safetensors`` LoRA file -> {component: AdapterState} (layout detected)."""
    tensors, metadata = read_lora_file(path)
    layout = detect_layout(tensors)
    if layout == "kohya":
        return kohya_to_states(tensors, components, where=str(path))
    return diffusers_to_states(tensors, components, metadata=metadata, where=str(path))


# -- writing ---------------------------------------------------------------------------------------


def _lora_modules(state: AdapterState, what: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """path -> (A, B, kohya α) of a plain-LoRA state (s = α/r)."""
    from lorakit.forms.lora import lora_scaling

    if state.spec.form not in ("lora", "ffa"):
        raise LoRAFileError(f"{what}: form {state.spec.form!r} is not plain LoRA; convert it first (`lorakit export`)")
    out = {}
    for path, t in state.by_module().items():
        extra = sorted(set(t) - {"lora_A", "lora_B"})
        if extra:
            raise LoRAFileError(f"{what}: module {path} has tensors {extra} (LoRA bias, embedding factors) that "
                                "LoRA files cannot hold")
        args = state.spec.args_for(path)
        r = int(t["lora_A"].shape[0])
        s = lora_scaling(float(args.get("alpha", 8.0)), r, bool(args.get("rslora", False)))
        out[path] = (t["lora_A"], t["lora_B"], s * r)  # kohya's α with α/r = s
    return out


def states_to_kohya(states: Mapping[str, AdapterState]) -> dict[str, torch.Tensor]:
    """{component: AdapterState} -> kohya tensors (per-module r and α kept; α as a float32 scalar)."""
    out: dict[str, torch.Tensor] = {}
    for comp, state in states.items():
        if comp not in KOHYA_PREFIX_OF:
            raise LoRAFileError(f"component {comp!r} has no kohya prefix (known: {sorted(KOHYA_PREFIX_OF)})")
        for path, (A, B, alpha) in _lora_modules(state, comp).items():
            if comp != "unet" and not path.startswith(_TE_ROOT):
                path = _TE_ROOT + path  # kohya's CLIP names keep the text_model root (see the module docstring)
            name = KOHYA_PREFIX_OF[comp] + path.replace(".", "_")
            out[f"{name}.lora_down.weight"] = A.detach().float().contiguous()
            out[f"{name}.lora_up.weight"] = B.detach().float().contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def states_to_diffusers(states: Mapping[str, AdapterState]) -> dict[str, torch.Tensor]:
    """{component: AdapterState} -> diffusers tensors with s folded into B (α = r: diffusers' default)."""
    out: dict[str, torch.Tensor] = {}
    for comp, state in states.items():
        if comp not in DIFFUSERS_COMPONENTS:
            raise LoRAFileError(f"unknown diffusers component {comp!r} (known: {list(DIFFUSERS_COMPONENTS)})")
        for path, (A, B, alpha) in _lora_modules(state, comp).items():
            s = alpha / A.shape[0]
            out[f"{comp}.{path}.lora_A.weight"] = A.detach().float().contiguous()
            out[f"{comp}.{path}.lora_B.weight"] = (s * B.detach().float()).contiguous()
    return out


def save_lora_file(states: Mapping[str, AdapterState], path: str | Path, layout: str = "kohya") -> Path:
    """Write {component: AdapterState} as one ``.safetensors`` LoRA file (``layout`` kohya|diffusers),
    atomically (``core.atomic``)."""
    if layout not in ("kohya", "diffusers"):
        raise ValueError(f"layout must be 'kohya' or 'diffusers', got {layout!r}")
    tensors = states_to_kohya(states) if layout == "kohya" else states_to_diffusers(states)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(p) as tmp:
        Path(tmp).write_bytes(save_safetensors(tensors, metadata={"format": "pt"}))
    return p


def delta_weights(state: AdapterState) -> dict[str, torch.Tensor]:
    """path -> dense ΔW = s·B·A of a plain-LoRA state in the weight's own layout (Conv2d: (out, in, kh, kw))."""
    out = {}
    for path, (A, B, alpha) in _lora_modules(state, "adapter").items():
        s = alpha / A.shape[0]
        out[path] = (s * (B.flatten(1) @ A.flatten(1))).reshape(B.shape[0], *A.shape[1:])
    return out
