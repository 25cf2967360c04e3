"""Atomic file writes: temp file in the same folder, fsync, rename. Readers never see half a file.

``mkstemp``/``mkdtemp`` create 0600 files and 0700 folders (right for secrets, wrong for adapters and
checkpoints that a serving container or another user must read): the results get the mode a plain
``open(path, "w")`` / ``mkdir`` would give, ``0o666 & ~umask`` / ``0o777 & ~umask``.

Temp names carry the writer's pid (``.<name>.<pid>.<random>.tmp``), so :func:`remove_stale` can remove
what a killed writer left behind (pid no longer running, or older than :data:`STALE_AFTER_S`) without
touching a live writer's files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``os.umask`` can only be read by
    setting it, which briefly gives every other thread's new files the wrong mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, (path.name,))  # what killed writes of this file left behind
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # after the writer: mkstemp's 0600 would make the saved file private, and some writers
        # (safetensors' save_file) create the file anew with 0600 themselves
        os.chmod(tmp, file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


STALE_AFTER_S = 24 * 3600  # a temp file this old is stale even if its pid is (re)used by a live process


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's live process (PermissionError) or a nonsense pid
    return True


def is_stale(path: Path, *, now: float | None = None) -> bool:
    """Whether ``path`` (a temp file/folder named ``.<name>.<pid>.<...>``) was left by a dead writer.
    Names without a pid (written by older versions) count as stale once older than STALE_AFTER_S."""
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    match = re.match(r"\.[^/]+?\.(\d+)\.[^.]+(\.tmp)?$", path.name)
    if age > STALE_AFTER_S:
        return True
    return match is not None and match[1] != str(os.getpid()) and not _pid_alive(int(match[1]))


def remove_stale(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Remove temp files/folders ``.<name>.*`` (for each of ``names``) that dead writers left in ``folder``;
    the removed paths. Never follows symlinks (a link is removed, not its target)."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not any(entry.name.startswith(f".{n}.") for n in names) or not is_stale(entry):
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Atomically create ``path`` with ``writer(tmp_path)`` (e.g. safetensors' save_file)."""
    with atomic_path(path) as tmp:
        writer(tmp)
