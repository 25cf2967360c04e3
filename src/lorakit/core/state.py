"""AdapterState: an adapter's tensors + spec + base fingerprint, and its safetensors files.

Files in an adapter folder:
- ``adapter_model.safetensors``: tensors keyed ``base_model.model.<module path>.<suffix>`` (PEFT's
  layout; suffixes are PEFT's names for forms PEFT knows);
- ``adapter_config.json``: PEFT's config, written for forms that have a ``peft_type``;
- ``lorakit.json``: the full spec, the base fingerprint and the SHA-256 of the tensor file.
Each file is written atomically and ``lorakit.json`` last, so an interrupted save is detected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorakit.core import atomic
from lorakit.core.spec import AdapterSpec
from lorakit.forms.base import Form

TENSORS_FILE = "adapter_model.safetensors"
LEGACY_TENSORS_FILE = "adapter_model.bin"
PEFT_CONFIG_FILE = "adapter_config.json"
LORAKIT_FILE = "lorakit.json"
KEY_PREFIX = "base_model.model."
MODEL_KEY_PREFIX = "base_model."  # PEFT's prefix for model-level tensors shared by all layers
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """A missing, corrupt, truncated or foreign adapter file."""


class BaseMismatchError(ValueError):
    """An adapter built for another base model (missing modules, other shapes, other architecture)."""


@dataclass
class AdapterState:
    """Everything needed to rebuild one adapter on a base model.

    ``tensors`` maps ``"<module path>.<suffix>"`` to fp32 tensors (suffix = the form's file key).
    Tensors shared by all layers (``Form.shared_names``) are keyed by their bare name (files:
    ``base_model.<name>``); PEFT's per-layer copies of them (``<module path>.<name>``) may be there too.
    """

    spec: AdapterSpec
    tensors: dict[str, torch.Tensor]
    base: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def form_class(self) -> type[Form]:
        from lorakit.core import registry

        return registry.get("form", self.spec.form)

    def by_module(self) -> dict[str, dict[str, torch.Tensor]]:
        """module path -> {tensor name: tensor}."""
        cls = self.form_class()
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self.tensors.items():
            path, name = cls.split_key(key)
            if name not in cls.shared_names:
                out.setdefault(path, {})[name] = tensor
        return out

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's model-level shared tensors (name -> tensor), from a per-layer copy if need be."""
        cls = self.form_class()
        out = {}
        for key, tensor in self.tensors.items():
            name = cls.split_key(key)[1]
            if name in cls.shared_names and (key == name or name not in out):
                out[name] = tensor
        return out

    @property
    def modules(self) -> list[str]:
        return sorted(self.by_module())

    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_state(state: AdapterState, out_dir: str | Path, *, base_model_name: str | None = None) -> Path:
    """Write ``state`` into ``out_dir`` (PEFT layout + lorakit.json), atomically per file."""
    from lorakit.io import peft as peft_io

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cls = state.form_class()
    tensors = {(MODEL_KEY_PREFIX if k in cls.shared_names else KEY_PREFIX) + k:
               v.detach().to("cpu").contiguous() for k, v in state.tensors.items()}
    # Everything is built in temp files first; nothing replaces the previous files unless all of it
    # worked. The renames then go tensors, PEFT config, lorakit.json (contexts exit in reverse).
    config = peft_io.peft_config(state, base_model_name) if cls.peft_type is not None else None
    with contextlib.ExitStack() as stack:
        info_tmp = stack.enter_context(atomic.atomic_path(out / LORAKIT_FILE))
        config_tmp = (None if config is None
                      else stack.enter_context(atomic.atomic_path(out / PEFT_CONFIG_FILE)))
        tensors_tmp = stack.enter_context(atomic.atomic_path(out / TENSORS_FILE))
        save_file(tensors, str(tensors_tmp), metadata={"format": "pt"})
        if config_tmp is not None:
            config_tmp.write_bytes(_json_bytes(config))
        info_tmp.write_bytes(_json_bytes({
            "format_version": FORMAT_VERSION,
            "spec": state.spec.to_dict(),
            "base": state.base,
            "meta": state.meta,
            "tensors_sha256": _sha256(tensors_tmp),
        }))
    return out


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object")
    return data


def read_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Tensors of an adapter folder (safetensors; a legacy .bin only with weights_only=True)."""
    path = adapter_dir / TENSORS_FILE
    if path.exists():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterFileError(f"{path}: corrupt or truncated safetensors file ({e})") from e
    legacy = adapter_dir / LEGACY_TENSORS_FILE
    if legacy.exists():
        try:
            data = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle; all mean "unreadable"
            raise AdapterFileError(f"{legacy}: unreadable or unsafe (pickle with code) adapter file ({e})") from e
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise AdapterFileError(f"{legacy}: expected a mapping of tensor names to tensors")
        return data
    raise AdapterFileError(f"{adapter_dir}: no {TENSORS_FILE} (or {LEGACY_TENSORS_FILE}) found")


def load_state(adapter_dir: str | Path) -> AdapterState:
    """Read an adapter folder written by lorakit or by PEFT."""
    from lorakit.io import peft as peft_io

    d = Path(adapter_dir)
    if not d.is_dir():
        raise AdapterFileError(f"{d}: adapter folder not found")
    if not (d / LORAKIT_FILE).exists():
        if (d / PEFT_CONFIG_FILE).exists():
            return peft_io.state_from_peft(_read_json(d / PEFT_CONFIG_FILE), read_tensors(d), d)
        raise AdapterFileError(f"{d}: neither {LORAKIT_FILE} nor {PEFT_CONFIG_FILE} found; not an adapter folder")
    info = _read_json(d / LORAKIT_FILE)
    for key in ("format_version", "spec"):
        if key not in info:
            raise AdapterFileError(f"{d / LORAKIT_FILE}: missing required field {key!r}")
    if not isinstance(info["format_version"], int):
        raise AdapterFileError(f"{d / LORAKIT_FILE}: format_version must be an integer, "
                               f"got {info['format_version']!r}")
    if info["format_version"] > FORMAT_VERSION:
        raise AdapterFileError(f"{d / LORAKIT_FILE}: format version {info['format_version']} is newer than "
                               f"this lorakit understands ({FORMAT_VERSION}); upgrade lorakit")
    if (d / TENSORS_FILE).exists() and info.get("tensors_sha256") not in (None, _sha256(d / TENSORS_FILE)):
        raise AdapterFileError(f"{d / TENSORS_FILE}: content does not match the checksum in {LORAKIT_FILE} "
                               "(file changed or a save was interrupted)")
    try:
        spec = AdapterSpec.from_dict(info["spec"])
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{d / LORAKIT_FILE}: invalid spec ({e})") from e
    tensors = {_strip(k, d): v.float() if v.is_floating_point() else v for k, v in read_tensors(d).items()}
    return AdapterState(spec=spec, tensors=tensors, base=info.get("base", {}), meta=info.get("meta", {}))


def _strip(key: str, where: Path) -> str:
    rest = key.removeprefix(MODEL_KEY_PREFIX)
    if rest != key and "." not in rest:
        return rest  # a model-level tensor shared by all layers (Form.shared_names)
    if not key.startswith(KEY_PREFIX):
        raise AdapterFileError(f"{where / TENSORS_FILE}: unexpected tensor key {key!r} "
                               f"(expected the PEFT prefix {KEY_PREFIX!r})")
    return key[len(KEY_PREFIX):]


ARCH_KEYS = ("model_type", "hidden_size", "num_layers", "vocab_size")


def check_base(state: AdapterState, fingerprint: dict[str, Any], where: str) -> None:
    """Refuse an adapter made for another architecture; warn when only the weights differ."""
    from lorakit.models import compare_fingerprints

    if not state.base or not fingerprint:
        return
    diff = {k: (state.base[k], fingerprint[k]) for k in ARCH_KEYS
            if state.base.get(k) is not None and fingerprint.get(k) is not None and state.base[k] != fingerprint[k]}
    if diff:
        shown = ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise BaseMismatchError(f"{where}: adapter was built for another base model ({shown})")
    if "weight_stats" in state.base and compare_fingerprints(state.base, fingerprint):
        warnings.warn(f"{where}: base model weights differ from those the adapter was trained on "
                      "(same architecture); outputs may differ", stacklevel=3)


def replace_spec(state: AdapterState, **changes: Any) -> AdapterState:
    return dataclasses.replace(state, spec=dataclasses.replace(state.spec, **changes))
