"""AdapterState: an adapter's tensors + spec + base fingerprint, and its safetensors files.

Files in an adapter folder:
- ``adapter_model.safetensors``: tensors keyed ``base_model.model.<module path>.<suffix>`` (PEFT's
  layout; suffixes are PEFT's names for forms PEFT knows);
- ``adapter_config.json``: PEFT's config, written for forms that have a ``peft_type``;
- ``lorakit.json``: the full spec, the base fingerprint and the SHA-256 of the tensor file.
Each file is written atomically and ``lorakit.json`` last, so an interrupted save is detected.
Saved files get the permissions of a normal file write (``0o666 & ~umask``), see ``core.atomic``.

Reading treats a folder as untrusted input (it may come from anyone):
- Only the known names are opened, and names listed in ``lorakit.json`` (``files``) must be bare file
  names (no ``/``, ``\\``, ``..``, NUL, not absolute): nothing outside the folder is named.
- Only regular files are read. Each is ``lstat``-ed first and opened ``O_NONBLOCK`` only when it is a
  regular file, then ``fstat``-ed again (same inode), so FIFOs, ``/dev/zero`` and other devices,
  sockets and directories are refused with an :class:`AdapterFileError` naming the file and nothing
  ever blocks or reads forever.
- Symlinks: followed only when the target is a regular file INSIDE the adapter folder (after resolving
  every link), or, as the one exception, a blob of a Hugging Face hub cache
  (``<repo>/snapshots/<rev>/<name> -> ../../blobs/<hash>``, the layout ``huggingface_hub`` downloads
  make). Any other target (``/etc/passwd``, another user's folder, a device) is refused.
- JSON files are read only up to :data:`MAX_JSON_BYTES` (checked with the size from ``fstat`` before
  reading), nested at most :data:`MAX_JSON_DEPTH` levels, with finite numbers only and integers that fit
  in 64 bits; every field lorakit uses is type-checked, failures name the file and the field.
- A checksum is computed only where ``lorakit.json`` records one, over the bytes that are then parsed
  (read once, bounded by the file's size), so a file cannot change between the check and the load.
- Tensors: safetensors (no code), a legacy ``adapter_model.bin`` only with ``weights_only=True``;
  integer/bool tensors only where the form keeps integers (indices, seeds), never cast into floats.

This module is the lorakit side only: :func:`write_state` takes the PEFT config ready-made and
:func:`read_state` reads folders with a ``lorakit.json``. ``lorakit.io.peft`` builds and reads PEFT
configs and has the combined ``save_state`` / ``load_state`` (any adapter folder); core never imports io.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import stat
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_tensors_bytes

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
# Limits of what an adapter folder may ask of a reader (real files are far below them).
MAX_JSON_BYTES = 16 << 20  # adapter_config.json / lorakit.json
MAX_JSON_DEPTH = 64  # lorakit writes at most ~5 levels; deep nesting is only an attack on recursion
MAX_TENSOR_FILE_BYTES = 1 << 40  # a sanity bound only: the real bound is the file's size on disk
_INT64 = 1 << 63
FILE_ROLES = ("native", "peft", "initial")


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


def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``, but writing into ``filename`` itself: the library's own writes go through
    a temp file of its own (``.tmpXXXXXX``, mode 0600) that a killed save would leave behind unattributed;
    ``filename`` is already an ``atomic_path`` temp file."""
    data = save_tensors_bytes(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data)


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
    # temp files of saves that were killed here before (a live writer's are kept: see atomic.remove_stale)
    atomic.remove_stale(out, (TENSORS_FILE, NATIVE_TENSORS_FILE, INITIAL_TENSORS_FILE, PEFT_CONFIG_FILE,
                              LORAKIT_FILE))
    # Everything is built in temp files first; nothing replaces the previous files unless all of it
    # worked. Then (contexts exit in reverse): the old adapter_config.json is REMOVED, the tensors are
    # renamed, the new config, lorakit.json last. A kill at any point leaves either the old folder, a
    # folder without adapter_config.json (PEFT refuses it; lorakit refuses it by checksum), or new
    # tensors + new config (PEFT loads the new adapter; lorakit.json's checksum says the save did not
    # finish): never new tensors beside an old config, which PEFT would load wrongly.
    with contextlib.ExitStack() as stack:
        info_tmp = stack.enter_context(atomic.atomic_path(out / LORAKIT_FILE))
        config_tmp = (None if config is None
                      else stack.enter_context(atomic.atomic_path(out / PEFT_CONFIG_FILE)))
        sums = {}
        for role, (name, tensors) in files.items():
            tmp = stack.enter_context(atomic.atomic_path(out / name))
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            sums[role] = _sha256(tmp)
        # entered last, so it runs first, and only if everything above worked; without a new config
        # (a form PEFT cannot describe) the old one must go too, or it would describe the new tensors
        stack.enter_context(_on_success(lambda: _unlink(out / PEFT_CONFIG_FILE)))
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


@contextlib.contextmanager
def _on_success(fn: Any) -> Any:
    """Run ``fn`` when the ``with`` body succeeded (a failed save must leave the old files as they were)."""
    yield
    fn()


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


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


# -- reading untrusted folders -----------------------------------------------------------------------

def check_file_name(name: Any, where: Path, field: str) -> str:
    """A file name listed in ``where`` (lorakit.json): a bare name inside the adapter folder."""
    if not isinstance(name, str) or not name:
        raise AdapterFileError(f"{where}: field {field!r} must be a file name, got {name!r}")
    if (name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or len(name) > 255
            or os.path.isabs(name)):
        raise AdapterFileError(f"{where}: field {field!r} = {name!r} is not a plain file name inside the adapter "
                               "folder (absolute paths, '..' and subfolders are refused)")
    return name


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _hub_blob(target: str, folder: str) -> bool:
    """A Hugging Face hub cache file: ``<repo>/snapshots/<rev>/x`` -> ``<repo>/blobs/<hash>``."""
    snapshots = os.path.dirname(folder)
    if os.path.basename(snapshots) != "snapshots":
        return False
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    return os.path.dirname(target) == blobs


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    """Open ``path`` (a file in an adapter folder) for reading if it is a regular file inside the folder
    (see the module docstring for symlinks); an fd and its fstat. Never blocks (FIFOs are refused before
    ``open``, which is non-blocking anyway)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise AdapterFileError(f"{path}: missing") from None
    except OSError as e:
        raise AdapterFileError(f"{path}: cannot be read ({e.strerror})") from e
    if stat.S_ISLNK(st.st_mode):
        folder = os.path.realpath(path.parent)
        target = os.path.realpath(path)
        if not (_inside(target, folder) or _hub_blob(target, folder)):
            raise AdapterFileError(f"{path}: symlink to {target}, outside the adapter folder; refused (only links "
                                   "to regular files inside the folder, or a Hugging Face cache blob, are followed)")
        try:
            st = os.stat(path)
        except OSError as e:
            raise AdapterFileError(f"{path}: dangling or unreadable symlink ({e.strerror})") from e
    if not stat.S_ISREG(st.st_mode):
        raise AdapterFileError(f"{path}: {_file_kind(st.st_mode)}, not a regular file; refused")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise AdapterFileError(f"{path}: cannot be opened ({e.strerror})") from e
    fst = os.fstat(fd)
    if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)  # swapped between the check and the open: read nothing
        raise AdapterFileError(f"{path}: changed while being opened; refused")
    return fd, fst


def read_adapter_file(path: Path, *, max_bytes: int = MAX_TENSOR_FILE_BYTES) -> bytes:
    """The bytes of one regular file of an adapter folder, at most ``max_bytes`` (checked before reading);
    reads stop at the size ``fstat`` reported, so a file that grows meanwhile cannot keep us reading."""
    fd, st = _open_regular(path)
    try:
        if st.st_size > max_bytes:
            raise AdapterFileError(f"{path}: {st.st_size} bytes, more than the {max_bytes} allowed for this file")
        chunks, left = [], st.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise AdapterFileError(f"{path}: read failed ({e.strerror})") from e
    finally:
        os.close(fd)


def _check_tree(value: Any, where: Path, field: str, *, finite: bool = True) -> None:
    """Depth, finite numbers and 64-bit integers over a parsed JSON value (iterative: no recursion)."""
    stack: list[tuple[Any, str, int]] = [(value, field, 1)]
    while stack:
        v, name, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise AdapterFileError(f"{where}: nested more than {MAX_JSON_DEPTH} levels deep (at {name or 'top'})")
        if isinstance(v, dict):
            stack.extend((x, f"{name}.{k}" if name else str(k), depth + 1) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((x, f"{name}[{i}]", depth + 1) for i, x in enumerate(v))
        elif finite and isinstance(v, float) and not math.isfinite(v):
            raise AdapterFileError(f"{where}: field {name!r} is {v} (only finite numbers are allowed)")
        elif isinstance(v, int) and not isinstance(v, bool) and not -_INT64 <= v < _INT64:
            raise AdapterFileError(f"{where}: field {name!r} is an integer out of the 64-bit range")


def read_json(path: Path, *, finite: bool = True) -> dict[str, Any]:
    """A JSON object from an adapter folder; a clear AdapterFileError if it is not one (or is too large,
    too deep, not a regular file, or, with ``finite``, holds NaN/Infinity: configs never do, while a
    run's summary.json may record a NaN loss)."""
    raw = read_adapter_file(path, max_bytes=MAX_JSON_BYTES)
    try:
        data = json.loads(raw)
    except RecursionError:
        raise AdapterFileError(f"{path}: nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:  # ValueError: ints of > 4300 digits
        raise AdapterFileError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object")
    _check_tree(data, path, "", finite=finite)
    return data


def _parse_tensors(path: Path, raw: bytes) -> dict[str, torch.Tensor]:
    try:
        tensors = load_safetensors(raw)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise AdapterFileError(f"{path}: corrupt or truncated safetensors file ({e})") from e
    return {k: tensors[k] for k in sorted(tensors)}  # load() returns hash order; keep results deterministic


def _parse_legacy(path: Path, raw: bytes) -> dict[str, torch.Tensor]:
    try:  # weights_only: a pickle that would run code is refused, never executed
        data = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle; all mean "unreadable"
        reason = " ".join(str(e).split())  # torch's message spans many lines: keep the first words
        raise AdapterFileError(f"{path}: unreadable or unsafe (pickle with code) adapter file "
                               f"({reason[:160]}{'...' if len(reason) > 160 else ''})") from e
    if (not isinstance(data, dict) or not all(isinstance(k, str) for k in data)
            or not all(isinstance(v, torch.Tensor) for v in data.values())):
        raise AdapterFileError(f"{path}: expected a mapping of tensor names to tensors")
    return data


def read_float_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A safetensors file of a lorakit folder (router bank, retriever index) read by the adapter-folder rules
    (``read_adapter_file``: a regular file inside the folder, read once, bounded); floating-point, finite
    tensors only. ``what`` names the file's role in the errors."""
    try:
        raw = read_adapter_file(path)
    except AdapterFileError as e:
        raise AdapterFileError(f"missing or corrupt {what}: {e}") from None
    return parse_float_tensors(path, raw, what)


def parse_float_tensors(path: Path, raw: bytes, what: str) -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes ``raw`` (read from ``path``): floating-point and finite only."""
    from safetensors.torch import load as load_bytes

    try:
        tensors = load_bytes(raw)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise AdapterFileError(f"{path}: corrupt {what}, not a valid safetensors file ({e})") from None
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterFileError(f"{path}: tensor {k!r} is {t.dtype}, expected a floating-point tensor")
        if not bool(torch.isfinite(t).all()):
            raise AdapterFileError(f"{path}: tensor {k!r} holds NaN or infinite values")
    return tensors


def read_tensors(adapter_dir: Path, name: str = TENSORS_FILE, *, sha256: str | None = None,
                 listed_in: Path | None = None) -> dict[str, torch.Tensor]:
    """Tensors of an adapter folder (safetensors; a legacy .bin only with weights_only=True).

    ``sha256`` (when ``lorakit.json`` records one) is checked over the very bytes that are parsed."""
    path = adapter_dir / name
    legacy = adapter_dir / LEGACY_TENSORS_FILE
    if name == TENSORS_FILE and not os.path.lexists(path) and os.path.lexists(legacy):
        path = legacy
    elif not os.path.lexists(path):
        if name != TENSORS_FILE:
            raise AdapterFileError(f"{path}: missing (listed in {LORAKIT_FILE})")
        raise AdapterFileError(f"{adapter_dir}: no {TENSORS_FILE} (or {LEGACY_TENSORS_FILE}) found")
    raw = read_adapter_file(path)
    if path.name == LEGACY_TENSORS_FILE:
        sha256 = None  # a checksum names the safetensors file; a legacy fallback was never hashed
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise AdapterFileError(f"{path}: content does not match the checksum in {listed_in or LORAKIT_FILE} "
                               "(file changed or a save was interrupted)")
    return _parse_legacy(path, raw) if path.name == LEGACY_TENSORS_FILE else _parse_tensors(path, raw)


def _checksum(sums: Any, role: str, where: Path, field: str) -> str | None:
    value = sums.get(role)
    if value is not None and not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)):
        raise AdapterFileError(f"{where}: field {field!r} must be a SHA-256 hex digest, got {value!r:.80}")
    return value


def _expect(value: Any, ok: bool, where: Path, field: str, what: str) -> None:
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise AdapterFileError(f"{where}: field {field!r} must be {what}, got {shown}")


def check_str_list(value: Any, where: Path, field: str, *, allow_str: bool = False,
                   regex: bool = False) -> None:
    """A list of strings (or one string when ``allow_str``); with ``regex``, a string must compile."""
    if allow_str and isinstance(value, str):
        if regex:
            check_regex(value, where, field)
        return
    _expect(value, isinstance(value, list) and all(isinstance(x, str) for x in value), where, field,
            "a string or a list of strings" if allow_str else "a list of strings")


MAX_PATTERN_CHARS = 1024  # a module-path regex from a file with quantifiers, longer than this, is refused
# Without quantifiers a regex cannot backtrack beyond trying each alternative once per position; lorakit itself
# writes such long ones (PEFT ``target_modules`` ``^(path|path|...)$`` naming every adapted module).
MAX_LITERAL_PATTERN_CHARS = 1 << 20
MAX_PATTERN_REPEATS = 3  # repeats (``*``, ``+``, ``{m,n}`` with n > 1) per regex from a file


def _regex_hazard(pattern: str) -> str | None:
    """Why matching ``pattern`` could backtrack badly (ReDoS), or None. Conservative, on the parsed regex:
    no backreferences or conditionals; a repeated part (``*``, ``+``, ``{m,n}`` with n > 1) holds no
    repeat, optional part or alternation of its own (``(a+)+``, ``(a|a)*``, ``(a?)+``: exponential); at
    most MAX_PATTERN_REPEATS repeats in all (``.*.*.*.*.*x`` is polynomial of that degree). The patterns
    module paths need (``q_proj``, ``.*\\.(q|v)_proj``, ``layers\\.\\d+\\.mlp\\..*``, ``^(?!.*vis).*proj``) pass."""
    from re import _constants as c  # the stdlib's own parser (what re.compile uses)
    from re import _parser as sre

    repeat_ops = {c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT}
    refs = {c.GROUPREF, c.GROUPREF_EXISTS, c.GROUPREF_IGNORE, c.GROUPREF_LOC_IGNORE, c.GROUPREF_UNI_IGNORE}
    repeats = 0

    def children(op: Any, av: Any) -> list[Any]:
        if op in repeat_ops:
            return [av[2]]
        if op == c.SUBPATTERN:
            return [av[3]]
        if op in (c.ASSERT, c.ASSERT_NOT):
            return [av[1]]
        if op == c.ATOMIC_GROUP:
            return [av]
        if op == c.BRANCH:
            return list(av[1])
        return []

    def walk(items: Any, inside_repeat: bool) -> str | None:
        nonlocal repeats
        for op, av in items:
            if op in refs:
                return "a backreference or conditional group"
            if op in repeat_ops:
                if inside_repeat:
                    return "a nested quantifier (a repeated group holding a quantifier)"
                if av[1] > 1:
                    repeats += 1
                    if repeats > MAX_PATTERN_REPEATS:
                        return f"more than {MAX_PATTERN_REPEATS} quantifiers"
            if op == c.BRANCH and inside_repeat:
                return "an alternation inside a repeated group"
            nested = inside_repeat or (op in repeat_ops and av[1] > 1)
            for child in children(op, av):
                why = walk(child, nested)
                if why:
                    return why
        return None

    if len(pattern) > MAX_LITERAL_PATTERN_CHARS:
        return f"longer than {MAX_LITERAL_PATTERN_CHARS} characters"
    why = walk(sre.parse(pattern), False)
    if why is None and repeats and len(pattern) > MAX_PATTERN_CHARS:
        return f"longer than {MAX_PATTERN_CHARS} characters with quantifiers"
    return why


def check_regex(pattern: Any, where: Path, field: str) -> None:
    """A module-path regex as lorakit and PEFT use it (``(.*\\.)?(pattern)$``) must compile, and must
    not be able to backtrack for long when matched (``_regex_hazard``): patterns in files are untrusted."""
    _expect(pattern, isinstance(pattern, str), where, field, "a string (a regex)")
    try:
        re.compile(pattern)  # alone (target regexes are full-matched as they are) and wrapped (patterns)
        re.compile(rf"(.*\.)?({pattern})$")
        why = _regex_hazard(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise AdapterFileError(f"{where}: field {field!r}: invalid regex {pattern!r} ({e})") from None
    if why:
        raise AdapterFileError(f"{where}: field {field!r}: regex {pattern[:80]!r} refused: {why} (patterns in "
                               "adapter files must not backtrack; name the modules or use simpler patterns)")


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value is of the annotated type ``tp`` WITHOUT conversion (files are not command
    lines: ``"8"`` is not an int, ``1`` is not a bool, ``5.5`` is not an int)."""
    origin, members = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, m) for m in members)
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return any(value == m and type(value) is type(m) for m in members)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and members and members[-1] is not Ellipsis:
            return len(value) == len(members) and all(_fits(v, t) for v, t in zip(value, members, strict=True))
        inner = members[0] if members else Any
        return all(_fits(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation this checker does not know: left to the Args' own checks


def check_form_args(cls: type[Form], args: dict[str, Any], where: Path, field: str) -> None:
    """Every value of ``args`` has the type its field of ``cls.Args`` declares, and the Args accept them."""
    from lorakit.core.spec import build_args

    hints = typing.get_type_hints(cls.Args)
    for key, value in args.items():
        if key in hints and not _fits(value, hints[key]):
            tp = hints[key]
            raise AdapterFileError(f"{where}: field '{field}.{key}' must be "
                                   f"{tp.__name__ if isinstance(tp, type) else str(tp).replace('typing.', '')}, "
                                   f"got {value!r}")
    try:
        build_args(cls.Args, args, owner=f"form {cls.name!r}")
    except (TypeError, ValueError, OverflowError) as e:
        raise AdapterFileError(f"{where}: field {field!r}: {e}") from None


def spec_from_file(data: Any, where: Path, field: str = "spec") -> AdapterSpec:
    """An AdapterSpec from a file's JSON, every field type-checked (form args against the form's Args)."""
    from lorakit.core import registry
    from lorakit.core.registry import UnknownMethodError

    if not isinstance(data, dict):
        raise AdapterFileError(f"{where}: invalid spec: field {field!r} must be an object, got {data!r:.80}")
    known = {f.name for f in dataclasses.fields(AdapterSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise AdapterFileError(f"{where}: field {field!r}: unknown AdapterSpec field(s) {unknown}")
    for key in ("form", "init"):
        if key in data:
            _expect(data[key], isinstance(data[key], str), where, f"{field}.{key}", "a string")
    for key in ("form_args", "init_args", "module_args"):
        if key in data:
            _expect(data[key], isinstance(data[key], dict), where, f"{field}.{key}", "an object")
    if "targets" in data:
        targets = data["targets"]
        check_str_list(targets, where, f"{field}.targets", allow_str=True,
                       regex=isinstance(targets, str) and targets != "all-linear")
    for key in ("exclude", "modules_to_save"):
        if key in data:
            check_str_list(data[key], where, f"{field}.{key}")
    for pattern, overrides in data.get("module_args", {}).items():
        check_regex(pattern, where, f"{field}.module_args")
        _expect(overrides, isinstance(overrides, dict), where, f"{field}.module_args.{pattern}", "an object")
    spec = AdapterSpec(**data)
    try:
        cls = registry.get("form", spec.form)
    except UnknownMethodError as e:
        raise AdapterFileError(f"{where}: field '{field}.form': {e}") from None
    check_form_args(cls, spec.form_args, where, f"{field}.form_args")
    for pattern, overrides in spec.module_args.items():
        check_form_args(cls, {**spec.form_args, **overrides}, where, f"{field}.module_args.{pattern}")
    return spec


@functools.cache
def integer_tensors(cls: type[Form]) -> frozenset[str]:
    """Names of the tensors ``cls`` keeps as integers (indices, seeds, ranks): a probe form per example."""
    from torch import nn

    from lorakit.forms.base import skip_init

    names: set[str] = set()
    # fork_rng: probing must not move the caller's random stream (a load before seeded training)
    with torch.random.fork_rng(devices=[]):
        for args in cls.examples():
            try:
                with skip_init():
                    form = cls(nn.Linear(32, 32), args)
            except Exception:  # a form that cannot be probed this way: its tensors are checked when loaded
                continue
            names |= {k for k, v in form.save_tensors().items() if not v.is_floating_point()}
    return frozenset(names)


def check_state(state: AdapterState, where: Path) -> None:
    """Checks that need no model: tensor dtypes (float parameters stay float; no silent casts) and rank-like
    arguments bounded by what the file holds (``r = 10**9`` with small tensors is refused here, before a
    loader allocates r-sized tensors)."""
    cls = state.form_class()
    ints = integer_tensors(cls)
    for key, t in state.tensors.items():
        name = cls.split_key(key)[1]
        want_int = name in ints
        if want_int and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise AdapterFileError(f"{where}: tensor {key!r} must hold integers, got {t.dtype}")
        if not want_int and not t.is_floating_point():
            raise AdapterFileError(f"{where}: tensor {key!r} is {t.dtype}; form {cls.name!r} expects floating "
                                   "point (integer and bool tensors are not cast into float parameters)")
    shared = sum(t.numel() for t in state.shared_tensors().values())
    for path, tensors in state.by_module().items():
        held = sum(t.numel() for t in tensors.values()) + shared
        r = state.spec.args_for(path).get("r", None)
        # every form has at least r values per layer (r·(in+out) for LoRA), and saves them
        if isinstance(r, int) and r > max(held, 1):
            raise AdapterFileError(f"{where}: module {path!r}: rank r={r} but the file holds only {held} values "
                                   "for it (config and tensors do not match)")
def _check_base_meta(info: dict[str, Any], where: Path) -> None:
    base = info.get("base", {})
    _expect(base, isinstance(base, dict), where, "base", "an object")
    stats = base.get("weight_stats")
    if stats is not None:
        _expect(stats, isinstance(stats, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       for x in stats), where, "base.weight_stats",
                "a list of numbers")
    for key in ("name_or_path", "model_class", "weights_hash", "model_type"):
        if base.get(key) is not None:
            _expect(base[key], isinstance(base[key], str), where, f"base.{key}", "a string")
    meta = info.get("meta", {})
    _expect(meta, isinstance(meta, dict), where, "meta", "an object")
    if meta.get("peft_target_modules") is not None:
        check_str_list(meta["peft_target_modules"], where, "meta.peft_target_modules", allow_str=True)
    for key, tp, what in (("fan_in_fan_out", bool, "true or false"), ("task_type", str, "a string"),
                          ("source", str, "a string"), ("export", dict, "an object"), ("head", dict, "an object"),
                          ("merge", dict, "an object")):
        if meta.get(key) is not None:
            _expect(meta[key], isinstance(meta[key], tp), where, f"meta.{key}", what)
    head = meta.get("head") or {}  # the classifier head record `lorakit eval` rebuilds the base from
    for key, ok, what in (("head", lambda v: isinstance(v, str), "a string"),
                          ("model", lambda v: isinstance(v, str), "a string"),
                          ("labels", lambda v: isinstance(v, list) and all(isinstance(x, (str, int)) for x in v),
                           "a list of labels"),
                          ("num_labels", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 20,
                           "a positive integer"),
                          ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
                          ("max_length", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 24,
                           "a positive integer")):
        if head.get(key) is not None:
            _expect(head[key], ok(head[key]), where, f"meta.head.{key}", what)


def read_state(adapter_dir: str | Path) -> AdapterState:
    """Read an adapter folder written by lorakit (it has a ``lorakit.json``). Folders PEFT wrote are read
    by ``lorakit.io.peft.load_state``, which reads either kind. Untrusted input: see the module docstring."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise AdapterFileError(f"{d}: adapter folder not found")
    where = d / LORAKIT_FILE
    if not os.path.lexists(where):
        raise AdapterFileError(f"{d}: no {LORAKIT_FILE} found; not a lorakit adapter folder "
                               "(lorakit.io.peft.load_state also reads PEFT folders)")
    info = read_json(where)
    for key in ("format_version", "spec"):
        if key not in info:
            raise AdapterFileError(f"{where}: missing required field {key!r}")
    version = info["format_version"]
    _expect(version, isinstance(version, int) and not isinstance(version, bool), where, "format_version",
            "an integer")
    if version > FORMAT_VERSION:
        raise AdapterFileError(f"{where}: format version {version} is newer than "
                               f"this lorakit understands ({FORMAT_VERSION}); upgrade lorakit")
    files = info.get("files")
    files = {"native": TENSORS_FILE} if files is None else files  # an empty [] or "" is a wrong type, not absent
    _expect(files, isinstance(files, dict) and files, where, "files", "an object (role -> file name)")
    unknown = sorted(set(files) - set(FILE_ROLES))
    if unknown or ("native" not in files and "peft" not in files):
        raise AdapterFileError(f"{where}: invalid 'files' field {files!r} (roles: {list(FILE_ROLES)}, "
                               "with 'native' or 'peft')")
    for role, name in files.items():
        check_file_name(name, where, f"files.{role}")
    if info.get("sha256") is not None:
        sums = info["sha256"]
        _expect(sums, isinstance(sums, dict), where, "sha256", "an object (role -> hex digest)")
        checks = {role: _checksum(sums, role, where, f"sha256.{role}") for role in files}
    else:
        checks = {role: _checksum({"native": info.get("tensors_sha256")}, role, where, "tensors_sha256")
                  for role in files}
    spec = spec_from_file(info["spec"], where)
    _check_base_meta(info, where)
    native = "native" if "native" in files else "peft"
    # the PEFT export beside lorakit's own files is not read here; its checksum still says whether a
    # save was interrupted, so it is verified when one is recorded (hashing nothing else)
    peft_file = d / files["peft"] if "peft" in files else None
    if (native != "peft" and peft_file is not None and checks.get("peft") is not None
            and os.path.lexists(peft_file)
            and hashlib.sha256(read_adapter_file(peft_file)).hexdigest() != checks["peft"]):
        raise AdapterFileError(f"{peft_file}: content does not match the checksum in {where} "
                                   "(file changed or a save was interrupted)")

    def read(role: str) -> dict[str, torch.Tensor]:
        loaded = read_tensors(d, files[role], sha256=checks.get(role), listed_in=where)
        return {_strip(k, d): v.float() if v.is_floating_point() else v for k, v in loaded.items()}

    initial = read("initial") if "initial" in files else {}
    tensors = read(native)
    saved = {k: tensors.pop(k) for k in list(tensors) if spec.modules_to_save
             and is_saved_module_key(k, spec.modules_to_save)}
    state = AdapterState(spec=spec, tensors=tensors, base=info.get("base", {}), meta=info.get("meta", {}),
                         initial=initial, saved_modules=saved)
    if not state.tensors:
        raise AdapterFileError(f"{d / files[native]}: the adapter file holds no tensors")
    check_state(state, d / files[native])
    return state


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

