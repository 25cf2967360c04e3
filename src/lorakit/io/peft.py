"""PEFT on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Writing: tensors use PEFT's keys (``base_model.model.<path>.lora_A.weight``) and the config PEFT's
fields, so ``PeftModel.from_pretrained`` loads the folder. Per-module ranks/alphas go to
``rank_pattern``/``alpha_pattern`` (generically: the form's ``peft_patterns``).
Reading: any folder PEFT wrote for a form lorakit implements, including several adapters saved in
subfolders (PEFT saves adapter ``name`` under ``<dir>/<name>/``).

:func:`save_state` and :func:`load_state` are the entry points for any adapter folder (lorakit's own
files are written and read by ``lorakit.core.state``; this module adds the PEFT config on top).
Full copies (``modules_to_save``) are stored as PEFT does, ``base_model.model.<module path>.<param>``,
and listed in the config; ``task_type`` follows the model class recorded in the base fingerprint.

A PEFT folder is untrusted input: files are read as ``core.state`` reads them (regular files only, size
and depth caps), and every config field lorakit uses is type-checked before the form's
``args_from_peft`` converts it (``int("5")``/``bool("false")`` would otherwise accept nonsense).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
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
    check_form_args,
    check_regex,
    check_state,
    check_str_list,
    is_saved_module_key,
    read_json,
    read_state,
    read_tensors,
    write_state,
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


# Model class name suffix -> PEFT task type (PEFT picks the PeftModel subclass from it; each subclass calls
# methods of its model kind, e.g. CAUSAL_LM needs ``prepare_inputs_for_generation``).
_TASK_TYPES: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
)


def task_type_for(model_class: str | None) -> str | None:
    """PEFT's ``task_type`` for a model class name: CAUSAL_LM for ``*ForCausalLM``/``*LMHeadModel``,
    SEQ_CLS for ``*ForSequenceClassification``, TOKEN_CLS, QUESTION_ANS likewise; None (PEFT's plain
    ``PeftModel``, which forwards any inputs) for anything else: bare encoders (``BertModel``), vision
    models and custom modules. PEFT's FEATURE_EXTRACTION is not used: its forward takes text inputs only."""
    if not model_class:
        return None
    for suffix, task in _TASK_TYPES:
        if model_class.endswith(suffix):
            return task
    return None


def peft_task_type(state: AdapterState) -> str | None:
    """The task type recorded with the adapter (a PEFT file's own), else the one of the model class in
    the base fingerprint; states without either (older lorakit files) keep the former CAUSAL_LM."""
    if "task_type" in state.meta:
        return state.meta["task_type"]
    if "model_class" in state.base:
        return task_type_for(state.base["model_class"])
    return "CAUSAL_LM"


def peft_config(state: AdapterState, base_model_name: str | None = None) -> dict[str, Any]:
    cls = state.form_class()
    from lorakit.core.spec import build_args

    args = build_args(cls.Args, state.spec.form_args, owner=f"form {cls.name!r}")
    config: dict[str, Any] = {
        "peft_type": cls.peft_type,
        "task_type": peft_task_type(state),
        "base_model_name_or_path": base_model_name or state.base.get("name_or_path"),
        "target_modules": peft_target_modules(state),
        "inference_mode": True,
        "modules_to_save": list(state.spec.modules_to_save) or None,
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# PEFT config fields lorakit reads -> (check, what it must be). Checked on the raw JSON because the
# forms' args_from_peft convert with int()/float()/bool(), which accept strings, floats and anything truthy.
_PEFT_FIELDS: dict[str, tuple[Any, str]] = {
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "task_type": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "revision": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "bias": (lambda v: v is None or isinstance(v, str), "a string"),
    "init_weights": (lambda v: isinstance(v, (bool, str)), "true, false or a string"),
    "r": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "mini_r": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "projection_prng_key": (_is_int, "an integer"),
    "random_seed": (lambda v: v is None or _is_int(v), "an integer or null"),
    "lora_alpha": (_is_number, "a finite number"),
    "randlora_alpha": (_is_number, "a finite number"),
    **{k: (lambda v: v is None or _is_number(v), "a finite number or null")
       for k in ("lora_dropout", "randlora_dropout", "miss_dropout", "bone_dropout")},
    **{k: (lambda v: isinstance(v, bool), "true or false")
       for k in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "inference_mode", "sparse",
                 "very_sparse", "save_projection")},
}


def check_peft_config(config: dict[str, Any], where: Path) -> None:
    """Types of the fields lorakit reads from ``adapter_config.json`` (``where``); AdapterFileError naming
    the file and the field. Fields lorakit does not read are left alone (PEFT adds new ones often)."""
    def bad(field: str, value: Any, what: str) -> AdapterFileError:
        shown = repr(value)
        return AdapterFileError(f"{where}: field {field!r} must be {what}, got "
                                f"{shown if len(shown) <= 80 else shown[:77] + '...'}")

    for field, (ok, what) in _PEFT_FIELDS.items():
        if field in config and not ok(config[field]):
            raise bad(field, config[field], what)
    if not config.get("peft_type"):
        raise AdapterFileError(f"{where}: missing required field 'peft_type'")
    if config.get("target_modules") is None:
        raise AdapterFileError(f"{where}: missing required field 'target_modules'")
    targets = config["target_modules"]
    check_str_list(targets, where, "target_modules", allow_str=True,
                   regex=isinstance(targets, str) and targets != "all-linear")
    for field in ("modules_to_save", "exclude_modules"):
        if config.get(field) is not None:
            check_str_list(config[field], where, field, allow_str=field == "exclude_modules")
    for field, check in (("rank_pattern", lambda v: _is_int(v) and v >= 1),
                         ("alpha_pattern", _is_number)):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise bad(field, patterns, "an object (module regex -> value)")
        for pattern, value in patterns.items():
            check_regex(pattern, where, field)
            if not check(value):
                raise bad(f"{field}.{pattern}", value,
                          "an integer >= 1" if field == "rank_pattern" else "a finite number")


def state_from_peft(config: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> AdapterState:
    """Translate a PEFT config + tensors into an AdapterState."""
    check_peft_config(config, where / PEFT_CONFIG_FILE)
    peft_type = config.get("peft_type")
    try:
        cls = form_for_peft_type(str(peft_type).upper(), config)
    except AdapterFileError as e:
        raise AdapterFileError(f"{where / PEFT_CONFIG_FILE}: {e}") from e
    try:
        form_args = cls.args_from_peft(config)
    except (KeyError, ValueError, TypeError, OverflowError) as e:
        raise AdapterFileError(f"{where / PEFT_CONFIG_FILE}: {e}") from e
    check_form_args(cls, form_args, where / PEFT_CONFIG_FILE, "form args")
    targets = config["target_modules"]
    to_save = config.get("modules_to_save") or []
    out, saved, base_layers = {}, {}, {}
    for key, tensor in tensors.items():
        if key.removeprefix(MODEL_KEY_PREFIX) in cls.shared_names:  # model-level, shared by all layers
            out[key.removeprefix(MODEL_KEY_PREFIX)] = tensor.float()
            continue
        if not key.startswith(KEY_PREFIX):
            raise AdapterFileError(f"{where}: unexpected tensor key {key!r} (expected prefix {KEY_PREFIX!r})")
        rest = key[len(KEY_PREFIX):]
        if to_save and is_saved_module_key(rest, to_save):  # a full copy (PEFT's modules_to_save)
            rest = re.sub(r"\.modules_to_save\.[^.]+\.", ".", rest)  # PEFT before 0.7 kept the wrapper path
            saved[rest] = tensor.float() if tensor.is_floating_point() else tensor
            continue
        base_layer = re.fullmatch(r"(.+)\.base_layer\.(\w+)", rest)
        if base_layer:  # the base weights PEFT saves with adapted embeddings (save_embedding_layers)
            base_layers[f"{base_layer[1]}.{base_layer[2]}"] = tensor.float() if tensor.is_floating_point() else tensor
            continue
        if ".modules_to_save." in key:
            raise AdapterFileError(f"{where}: tensor {key!r} is a modules_to_save copy but the config does not "
                                   "list its module in modules_to_save")
        short = re.sub(r"\.(lora_\w+)\.default\.", r".\1.", rest)  # old PEFT kept adapter names
        path, name = cls.split_key(short)  # canonical key (a form may read legacy tensor names)
        short = f"{path}.{cls.tensor_key(name)}" if path else short
        out[short] = tensor.float() if tensor.is_floating_point() else tensor
    if not out:
        raise AdapterFileError(f"{where}: the adapter file holds no tensors")
    module_args = _module_args_from_peft(cls, config, form_args, sorted({cls.split_key(k)[0] for k in out
                                                                        if k not in cls.shared_names}))
    # PEFT adds names such as "score" for SEQ_CLS whether or not the model has them: keep those with tensors
    kept = [n for n in to_save if any(is_saved_module_key(k, [n]) for k in saved)]
    spec = AdapterSpec(form=cls.name, form_args=form_args, targets=targets if isinstance(targets, str)
                       else list(targets), exclude=[], module_args=module_args, modules_to_save=kept)
    meta = {"peft_target_modules": targets, "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
            "task_type": config.get("task_type"), "source": "peft"}
    base = {"name_or_path": config.get("base_model_name_or_path")}
    state = AdapterState(spec=spec, tensors=out, base=base, meta=meta, saved_modules=saved,
                         base_layers=base_layers)
    check_state(state, where)
    return state


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


def save_state(state: AdapterState, out_dir: str | Path, *, base_model_name: str | None = None,
               peft_state: AdapterState | None = None) -> Path:
    """Write ``state`` into ``out_dir``: PEFT's files (``adapter_model.safetensors`` and, for forms with a
    ``peft_type``, ``adapter_config.json``) + ``lorakit.json``, atomically (``core.state.write_state``).

    ``peft_state`` (for adapters whose init rewrote the base) is the equivalent adapter for the
    original base: it becomes the PEFT files, and ``state`` is kept in lorakit's own files. An adapter
    PEFT's config cannot describe is saved without ``adapter_config.json``, with a warning.
    """
    peft_side = peft_state if peft_state is not None else (None if state.initial else state)
    config = None
    if peft_side is not None and peft_side.form_class().peft_type is not None:
        if peft_state is not None and not peft_side.spec.modules_to_save and state.spec.modules_to_save:
            # the export carries the form tensors only; the full copies are the adapter's own
            peft_side = dataclasses.replace(peft_side, spec=dataclasses.replace(
                peft_side.spec, modules_to_save=list(state.spec.modules_to_save)))
        try:
            config = peft_config(peft_side, base_model_name)
        except PeftIncompatibleError as e:
            warnings.warn(f"{out_dir}: no {PEFT_CONFIG_FILE} written, only lorakit can load this adapter: {e}",
                          stacklevel=2)
    return write_state(state, out_dir, peft_config=config, peft_state=peft_state)


def load_state(adapter_dir: str | Path) -> AdapterState:
    """Read an adapter folder written by lorakit (``lorakit.json``) or by PEFT (``adapter_config.json``)."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise AdapterFileError(f"{d}: adapter folder not found")
    # lexists: a dangling or hostile symlink is still this folder's file and is refused by the reader
    if os.path.lexists(d / LORAKIT_FILE):
        return read_state(d)
    if os.path.lexists(d / PEFT_CONFIG_FILE):
        config = read_json(d / PEFT_CONFIG_FILE)
        check_peft_config(config, d / PEFT_CONFIG_FILE)  # before the tensors are read at all
        return state_from_peft(config, read_tensors(d), d)
    raise AdapterFileError(f"{d}: neither {LORAKIT_FILE} nor {PEFT_CONFIG_FILE} found; not an adapter folder")


def load_adapter_dirs(root: str | Path) -> dict[str, AdapterState]:
    """All adapters under ``root``: the root itself (as ``default``) and each subfolder with one."""
    root = Path(root)
    if not root.is_dir():
        raise AdapterFileError(f"{root}: adapter folder not found")
    found: dict[str, AdapterState] = {}
    if os.path.lexists(root / LORAKIT_FILE) or os.path.lexists(root / PEFT_CONFIG_FILE):
        found["default"] = load_state(root)
    # symlinked subfolders are not followed: they could lead anywhere on the machine
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        if os.path.lexists(sub / LORAKIT_FILE) or os.path.lexists(sub / PEFT_CONFIG_FILE):
            found[sub.name] = load_state(sub)
    if not found:
        raise AdapterFileError(f"{root}: no adapter (adapter_config.json or lorakit.json) here or in subfolders")
    return found
