"""PEFT on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Writing: tensors use PEFT's keys (``base_model.model.<path>.lora_A.weight``) and the config PEFT's
fields, so ``PeftModel.from_pretrained`` loads the folder. Per-module ranks/alphas go to
``rank_pattern``/``alpha_pattern`` (generically: the form's ``peft_patterns``).
Reading: any folder PEFT wrote for a form lorakit implements, including several adapters saved in
subfolders (PEFT saves adapter ``name`` under ``<dir>/<name>/``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lorakit.core import registry
from lorakit.core.spec import AdapterSpec
from lorakit.core.state import (
    KEY_PREFIX,
    LORAKIT_FILE,
    MODEL_KEY_PREFIX,
    PEFT_CONFIG_FILE,
    AdapterFileError,
    AdapterState,
    load_state,
)
from lorakit.forms.base import Form


def form_for_peft_type(peft_type: str, config: dict[str, Any]) -> type[Form]:
    """The lorakit form that reads PEFT adapters of ``peft_type`` (DoRA is LoRA + use_dora in PEFT)."""
    candidates = []
    for e in registry.entries("form"):
        cls = registry.get("form", e.name)
        if peft_type in (cls.peft_type, *getattr(cls, "peft_type_aliases", ())):
            candidates.append(cls)
    for cls in candidates:
        if getattr(cls, "peft_accepts", lambda c: True)(config):
            return cls
    if candidates:  # the type is known but no form takes these options (e.g. a variant flag): say why
        reasons = []
        for cls in candidates:
            try:
                cls.args_from_peft(config)
            except (KeyError, ValueError, TypeError) as e:
                reasons.append(str(e))
        shown = "; ".join(dict.fromkeys(reasons)) or "no lorakit form accepts its options"
        raise AdapterFileError(f"PEFT {peft_type} adapter not supported: {shown}")
    known = sorted({registry.get("form", e.name).peft_type for e in registry.entries("form")} - {None})
    raise AdapterFileError(f"PEFT adapter type {peft_type!r} is not supported; lorakit reads: {known}")


def peft_target_modules(state: AdapterState) -> list[str] | str:
    """PEFT ``target_modules``: the spec's name list when it selected exactly these modules, else an
    exact-path regex (PEFT full-matches a string against module paths)."""
    chosen = state.meta.get("peft_target_modules")
    if chosen is not None:
        return chosen
    return "^(" + "|".join(re.escape(p) for p in state.modules) + ")$"


def _pattern_value(patterns: dict[str, Any], path: str, default: Any, *, first: bool) -> Any:
    """The value ``patterns`` give ``path`` (pattern matched against the end of the path): PEFT
    takes the first matching pattern, lorakit's ``AdapterSpec.module_args`` the last."""
    hits = [v for p, v in patterns.items() if re.match(rf"(.*\.)?({p})$", path)]
    return hits[0 if first else -1] if hits else default


def _exact_key(path: str) -> str:
    """A pattern that matches exactly the module ``path`` under both semantics."""
    return "^" + re.escape(path)


class PeftIncompatibleError(ValueError):
    """An adapter PEFT's config cannot describe faithfully (it is still saved for lorakit)."""


def peft_config(state: AdapterState, base_model_name: str | None = None) -> dict[str, Any]:
    cls = state.form_class()
    from lorakit.core.spec import build_args

    args = build_args(cls.Args, state.spec.form_args, owner=f"form {cls.name!r}")
    config: dict[str, Any] = {
        "peft_type": cls.peft_type,
        "task_type": state.meta.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": base_model_name or state.base.get("name_or_path"),
        "target_modules": peft_target_modules(state),
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }
    if state.meta.get("fan_in_fan_out"):  # Conv1D (GPT-2) weights are stored (in, out)
        if not cls.peft_conv1d:
            raise PeftIncompatibleError(f"form {cls.name!r} is on HF Conv1D layers (GPT-2 style, weight stored "
                                        f"(in, out)), and PEFT's {cls.peft_type} tuner wraps only torch.nn.Linear: "
                                        f"PEFT could not load the adapter")
        config["fan_in_fan_out"] = True
    unexpressible = sorted({f for over in state.spec.module_args.values() for f in over}
                           - set(cls.peft_patterns) - {"dropout"})
    if unexpressible:
        raise PeftIncompatibleError(f"per-module {unexpressible} cannot be expressed in PEFT's adapter_config.json "
                                    f"(PEFT has per-module patterns only for {sorted(cls.peft_patterns)})")
    config.update(cls.peft_config(args))
    for field, pattern_key in cls.peft_patterns.items():
        default = getattr(args, field)
        # config files are written with sorted keys, and PEFT takes the first matching pattern
        patterns = dict(sorted((pattern, over[field]) for pattern, over in state.spec.module_args.items()
                               if field in over))
        want = {path: state.spec.args_for(path).get(field, default) for path in state.modules}
        if any(_pattern_value(patterns, path, default, first=True) != v for path, v in want.items()):
            # overlapping patterns resolve differently in PEFT: name each module exactly
            patterns = {_exact_key(path): v for path, v in want.items() if v != default}
        config[pattern_key] = patterns
    return config


def state_from_peft(config: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> AdapterState:
    """Translate a PEFT config + tensors into an AdapterState."""
    peft_type = config.get("peft_type")
    if not peft_type:
        raise AdapterFileError(f"{where / PEFT_CONFIG_FILE}: missing required field 'peft_type'")
    try:
        cls = form_for_peft_type(str(peft_type).upper(), config)
    except AdapterFileError as e:
        raise AdapterFileError(f"{where / PEFT_CONFIG_FILE}: {e}") from e
    try:
        form_args = cls.args_from_peft(config)
    except (KeyError, ValueError, TypeError) as e:
        raise AdapterFileError(f"{where / PEFT_CONFIG_FILE}: {e}") from e
    targets = config.get("target_modules")
    if targets is None:
        raise AdapterFileError(f"{where / PEFT_CONFIG_FILE}: missing required field 'target_modules'")
    out = {}
    for key, tensor in tensors.items():
        if key.removeprefix(MODEL_KEY_PREFIX) in cls.shared_names:  # model-level, shared by all layers
            out[key.removeprefix(MODEL_KEY_PREFIX)] = tensor.float()
            continue
        if not key.startswith(KEY_PREFIX):
            raise AdapterFileError(f"{where}: unexpected tensor key {key!r} (expected prefix {KEY_PREFIX!r})")
        if "modules_to_save" in key or "lora_embedding" in key:
            raise AdapterFileError(f"{where}: tensor {key!r} (modules_to_save / embedding LoRA) is not supported")
        short = re.sub(r"\.(lora_\w+)\.default\.", r".\1.", key[len(KEY_PREFIX):])  # old PEFT kept names
        path, name = cls.split_key(short)  # canonical key (a form may read legacy tensor names)
        short = f"{path}.{cls.tensor_key(name)}" if path else short
        out[short] = tensor.float() if tensor.is_floating_point() else tensor
    if not out:
        raise AdapterFileError(f"{where}: the adapter file holds no tensors")
    module_args = _module_args_from_peft(cls, config, form_args, sorted({cls.split_key(k)[0] for k in out
                                                                        if k not in cls.shared_names}))
    spec = AdapterSpec(form=cls.name, form_args=form_args, targets=targets if isinstance(targets, str)
                       else list(targets), exclude=[], module_args=module_args)
    meta = {"peft_target_modules": targets, "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
            "task_type": config.get("task_type"), "source": "peft"}
    base = {"name_or_path": config.get("base_model_name_or_path")}
    return AdapterState(spec=spec, tensors=out, base=base, meta=meta)


def _module_args_from_peft(cls: type[Form], config: dict[str, Any], form_args: dict[str, Any],
                           paths: list[str]) -> dict[str, dict[str, Any]]:
    """PEFT's rank_pattern/alpha_pattern (first match wins, per field) as ``module_args`` (last match
    wins, all fields of a pattern together): the patterns as they are when both readings agree on
    every module of the adapter, else one exact entry per module that differs from the defaults."""
    patterns = {field: {p: type(form_args[field])(v) for p, v in (config.get(key) or {}).items()}
                for field, key in cls.peft_patterns.items()}
    want = {path: {field: _pattern_value(patterns[field], path, form_args[field], first=True)
                   for field in patterns} for path in paths}
    module_args: dict[str, dict[str, Any]] = {}
    for field, by_pattern in patterns.items():
        for pattern, value in by_pattern.items():
            module_args.setdefault(pattern, {})[field] = value
    spec = AdapterSpec(form_args=form_args, module_args=module_args)
    if all(spec.args_for(path).get(f, form_args[f]) == v
           for path, args in want.items() for f, v in args.items()):
        return module_args
    return {_exact_key(path): {f: v for f, v in args.items() if v != form_args[f]}
            for path, args in want.items() if any(v != form_args[f] for f, v in args.items())}


def load_adapter_dirs(root: str | Path) -> dict[str, AdapterState]:
    """All adapters under ``root``: the root itself (as ``default``) and each subfolder with one."""
    root = Path(root)
    if not root.is_dir():
        raise AdapterFileError(f"{root}: adapter folder not found")
    found: dict[str, AdapterState] = {}
    if (root / LORAKIT_FILE).exists() or (root / PEFT_CONFIG_FILE).exists():
        found["default"] = load_state(root)
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if (sub / LORAKIT_FILE).exists() or (sub / PEFT_CONFIG_FILE).exists():
            found[sub.name] = load_state(sub)
    if not found:
        raise AdapterFileError(f"{root}: no adapter (adapter_config.json or lorakit.json) here or in subfolders")
    return found
