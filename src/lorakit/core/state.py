"""AdapterState: an adapter's tensors + spec + base fingerprint, and its safetensors files.

Files in an adapter folder:
- ``adapter_model.safetensors``: tensors keyed ``base_model.model.<module path>.<suffix>`` (PEFT's
  layout; suffixes are PEFT's names for forms PEFT knows);
- ``adapter_config.json``: PEFT's config, written for forms that have a ``peft_type``;
- ``lorakit.json``: the full spec, the base fingerprint and the SHA-256 of the tensor file.
Each file is written atomically and ``lorakit.json`` last, so an interrupted save is detected.

This module is the lorakit side only: :func:`write_state` takes the PEFT config ready-made and
:func:`read_state` reads folders with a ``lorakit.json``. ``lorakit.io.peft`` builds and reads PEFT
configs and has the combined ``save_state`` / ``load_state`` (any adapter folder); core never imports io.
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
# An adapter whose init rewrote the base keeps its own tensors here; adapter_model.safetensors then
# holds the PEFT export for the ORIGINAL base.
NATIVE_TENSORS_FILE = "lorakit_adapter.safetensors"
INITIAL_TENSORS_FILE = "lorakit_initial.safetensors"
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
    ``saved_modules`` holds the full copies of ``spec.modules_to_save`` keyed ``"<module path>.<param>"``
    (files: ``base_model.model.<module path>.<param>``, PEFT's layout), apart from the form tensors.
    """

    spec: AdapterSpec
    tensors: dict[str, torch.Tensor]
    base: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    # Tensors a base-rewriting init started from (same keys as ``tensors``); empty otherwise. With
    # them, loading onto the original base redoes W ← W − ΔW0 and the trained adapter is exact.
    initial: dict[str, torch.Tensor] = field(default_factory=dict)
    saved_modules: dict[str, torch.Tensor] = field(default_factory=dict)
    # Base-layer weights a PEFT file carries (``<path>.base_layer.<param>``, PEFT's ``save_embedding_layers``
    # for adapted embeddings), keyed ``<module path>.<param>``: checked against the model on load, never saved.
    base_layers: dict[str, torch.Tensor] = field(default_factory=dict)

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


def is_saved_module_key(key: str, modules_to_save: list[str] | tuple[str, ...]) -> bool:
    """Whether tensor ``key`` (``<module path>.<param>``) belongs to a module of ``modules_to_save``
    (a name matches a module path as PEFT: the full path or its last dotted parts)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if any(prefix == n or prefix.endswith("." + n) for n in modules_to_save):
            return True
    return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_state(state: AdapterState, out_dir: str | Path, *, peft_config: dict[str, Any] | None = None,
                peft_state: AdapterState | None = None) -> Path:
    """Write ``state`` into ``out_dir`` (PEFT tensor layout + lorakit.json), atomically.

    ``peft_config`` is written as ``adapter_config.json`` when given (``lorakit.io.peft.save_state``
    builds it). ``peft_state`` (for adapters whose init rewrote the base) is the equivalent adapter for
    the original base: it becomes the PEFT files, and ``state`` is kept in lorakit's own files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state.initial and peft_state is None:
        warnings.warn("this adapter's init rewrote the base weights; without a PEFT export for the original "
                      "base (lorakit.save(model, ...) makes one), only lorakit can load it", stacklevel=3)
    split = bool(state.initial) or peft_state is not None
    peft_side = peft_state if peft_state is not None else (None if split else state)
    files: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    if peft_side is not None:  # the full copies (modules_to_save) go where PEFT reads them too
        saved = peft_side.saved_modules or state.saved_modules
        files["peft"] = (TENSORS_FILE, _file_tensors(peft_side, peft_side.tensors, saved))
    if split:
        files["native"] = (NATIVE_TENSORS_FILE, _file_tensors(state, state.tensors, state.saved_modules))
        if state.initial:
            files["initial"] = (INITIAL_TENSORS_FILE, _file_tensors(state, state.initial))
    config = peft_config if peft_side is not None else None
    # Everything is built in temp files first; nothing replaces the previous files unless all of it
    # worked. The renames then go tensors, PEFT config, lorakit.json (contexts exit in reverse).
    with contextlib.ExitStack() as stack:
        info_tmp = stack.enter_context(atomic.atomic_path(out / LORAKIT_FILE))
        config_tmp = (None if config is None
                      else stack.enter_context(atomic.atomic_path(out / PEFT_CONFIG_FILE)))
        sums = {}
        for role, (name, tensors) in files.items():
            tmp = stack.enter_context(atomic.atomic_path(out / name))
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            sums[role] = _sha256(tmp)
        if config_tmp is not None:
            config_tmp.write_bytes(_json_bytes(config))
        info = {"format_version": FORMAT_VERSION, "spec": state.spec.to_dict(), "base": state.base,
                "meta": state.meta, "tensors_sha256": sums.get("native", sums.get("peft"))}
        if split:
            info["files"] = {role: name for role, (name, _) in files.items()}
            info["sha256"] = sums
            if peft_state is not None:
                info["peft_export"] = {"form": peft_state.spec.form, **peft_state.meta.get("export", {})}
        info_tmp.write_bytes(_json_bytes(info))
    return out


def _file_tensors(state: AdapterState, tensors: dict[str, torch.Tensor],
                  saved_modules: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    cls = state.form_class()
    out = {(MODEL_KEY_PREFIX if k in cls.shared_names else KEY_PREFIX) + k: v.detach().to("cpu").contiguous()
           for k, v in tensors.items()}
    for k, v in (saved_modules or {}).items():
        if KEY_PREFIX + k in out:
            raise ValueError(f"modules_to_save tensor {k!r} has the key of an adapter tensor")
        out[KEY_PREFIX + k] = v.detach().to("cpu").contiguous()
    return out


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from an adapter folder; a clear AdapterFileError if it is not one."""
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object")
    return data


def read_tensors(adapter_dir: Path, name: str = TENSORS_FILE) -> dict[str, torch.Tensor]:
    """Tensors of an adapter folder (safetensors; a legacy .bin only with weights_only=True)."""
    path = adapter_dir / name
    if not path.exists() and name != TENSORS_FILE:
        raise AdapterFileError(f"{path}: missing (listed in {LORAKIT_FILE})")
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


def read_state(adapter_dir: str | Path) -> AdapterState:
    """Read an adapter folder written by lorakit (it has a ``lorakit.json``). Folders PEFT wrote are read
    by ``lorakit.io.peft.load_state``, which reads either kind."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise AdapterFileError(f"{d}: adapter folder not found")
    if not (d / LORAKIT_FILE).exists():
        raise AdapterFileError(f"{d}: no {LORAKIT_FILE} found; not a lorakit adapter folder "
                               "(lorakit.io.peft.load_state also reads PEFT folders)")
    info = read_json(d / LORAKIT_FILE)
    for key in ("format_version", "spec"):
        if key not in info:
            raise AdapterFileError(f"{d / LORAKIT_FILE}: missing required field {key!r}")
    if not isinstance(info["format_version"], int):
        raise AdapterFileError(f"{d / LORAKIT_FILE}: format_version must be an integer, "
                               f"got {info['format_version']!r}")
    if info["format_version"] > FORMAT_VERSION:
        raise AdapterFileError(f"{d / LORAKIT_FILE}: format version {info['format_version']} is newer than "
                               f"this lorakit understands ({FORMAT_VERSION}); upgrade lorakit")
    files = info.get("files") or {"native": TENSORS_FILE}
    sums = info.get("sha256") or {"native": info.get("tensors_sha256")}
    if not isinstance(files, dict) or "native" not in files and "peft" not in files:
        raise AdapterFileError(f"{d / LORAKIT_FILE}: invalid 'files' field {files!r}")
    native = files.get("native", files.get("peft"))
    for role, name in files.items():
        expected = sums.get(role)
        if (d / name).exists() and expected not in (None, _sha256(d / name)):
            raise AdapterFileError(f"{d / name}: content does not match the checksum in {LORAKIT_FILE} "
                                   "(file changed or a save was interrupted)")
    try:
        spec = AdapterSpec.from_dict(info["spec"])
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{d / LORAKIT_FILE}: invalid spec ({e})") from e
    def read(name: str) -> dict[str, torch.Tensor]:
        return {_strip(k, d): v.float() if v.is_floating_point() else v for k, v in read_tensors(d, name).items()}

    initial = read(files["initial"]) if "initial" in files else {}
    tensors = read(native)
    saved = {k: tensors.pop(k) for k in list(tensors) if spec.modules_to_save
             and is_saved_module_key(k, spec.modules_to_save)}
    return AdapterState(spec=spec, tensors=tensors, base=info.get("base", {}), meta=info.get("meta", {}),
                        initial=initial, saved_modules=saved)


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

