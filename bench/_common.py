"""Helpers shared by the benchmark scripts in bench/*/run.py.

The scripts are run as ``python bench/<name>/run.py``, so Python puts ``bench/<name>/`` (not ``bench/``) on
``sys.path``; each script appends ``bench/`` itself before importing this module::

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/, for the shared bench/_common.py
    import _common as common  # noqa: E402

(appended, not prepended: the folders in bench/ must not shadow installed packages of the same name). The
same line works when a script is loaded by another one (importlib) or started as a subprocess by path.

Everything here is what several scripts repeated verbatim: the machine block of the result JSONs, the
one-thread setup that makes CPU timings comparable on a shared box, the round-robin order and the turn table
used to interleave runs step by step, atomic output writes, the eval slice of the sentiment benchmarks, and
small parsing/formatting helpers. Nothing here decides what a benchmark measures; the JSON keys these
functions produce are the ones the committed results already carry.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import os
import platform
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

# The two clocks step timings are taken on. "cpu" (process CPU time) is the headline clock of most scripts:
# other jobs on the shared cores barely move it; "wall" is recorded beside it.
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


# ------------------------------------------------------------------------------ machine and process setup
def quiet_warnings() -> None:
    """Ignore FutureWarning and DeprecationWarning (transformers/peft emit them per model load; noise only)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (``platform.processor()`` is empty or just the arch on Linux)."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return cpu


def machine_info(packages: Sequence[str] = ("transformers",)) -> dict[str, Any]:
    """Platform, CPU and library versions for a result's ``"machine"`` block.

    Keys, in order: platform, cpu, cpu_count, python, torch, one ``<package>: __version__`` per name in
    ``packages`` (scripts differ in which libraries they record: keep each script's list so its JSON keys do
    not change), lorakit, torch_threads (read at call time: call it after ``pin_threads``).
    """
    import lorakit

    info: dict[str, Any] = {"platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                            "python": platform.python_version(), "torch": torch.__version__}
    for name in packages:
        info[name] = importlib.import_module(name).__version__
    info["lorakit"] = lorakit.__version__
    info["torch_threads"] = torch.get_num_threads()
    return info


def machine_with_load(loadavg_start: tuple[float, float, float],
                      packages: Sequence[str] = ("transformers",)) -> dict[str, Any]:
    """``machine_info`` plus the load average at the start of the measurement and now (its end).

    The load averages say how busy the shared cores were while the numbers were taken; take
    ``loadavg_start = os.getloadavg()`` right before the measured part and call this right after it.
    """
    return {**machine_info(packages), "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()}


def pin_threads() -> None:
    """One torch thread (intra- and inter-op) and no transformers progress bars.

    On a loaded 2-core box several torch threads spin-wait for each other and make timings meaningless;
    ``load_model(progress=False)`` still shows transformers' "Loading weights" bar on the cached path.
    The inter-op count can only be set before any inter-op work, hence the suppressed RuntimeError.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


def limit_malloc_arenas() -> None:
    """One glibc malloc arena for the process (call before starting threads).

    glibc gives each thread its own arena, and memory one run's step frees stays in that thread's arena:
    with a trainer thread per run, the process held one activation peak per run (an LR sweep of 24 runs
    reached 11 GB and was OOM-killed). The threads take turns anyway, so one shared arena costs nothing.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX = -8


# ------------------------------------------------------------------------------ interleaving
class TurnTable:
    """One run computes at a time; turns go round-robin, the order rotated every round.

    Used to interleave several training runs (one thread each) step by step, so that a change of machine
    load hits all of them alike and their step-time ratios can be paired by step. ``turns`` is the list of
    runs in the order they are served (round k serves every run once, starting k places further on); a run
    waits for its next turn, then gives the turn on. Finished (or failed) runs are skipped.
    """

    def __init__(self, runs: list[str], rounds: int) -> None:
        n = len(runs)
        self.turns = [runs[(k + i) % n] for k in range(rounds) for i in range(n)]
        self.pos = 0
        self.done: set[str] = set()
        self.cond = threading.Condition()

    def _skip_done(self) -> None:
        while self.pos < len(self.turns) and self.turns[self.pos] in self.done:
            self.pos += 1

    def wait(self, run: str) -> None:
        """Block until it is ``run``'s turn (raises if the schedule ended first)."""
        with self.cond:
            self.cond.wait_for(lambda: self.pos >= len(self.turns) or self.turns[self.pos] == run)
            if self.pos >= len(self.turns):
                raise RuntimeError(f"run {run} waited for a turn after the schedule ended")

    def give_on(self, run: str, finished: bool = False) -> None:
        """End ``run``'s turn (and with ``finished``, all its later ones) and wake the next run."""
        with self.cond:
            if finished:
                self.done.add(run)
            if self.pos < len(self.turns) and self.turns[self.pos] == run:
                self.pos += 1
            self._skip_done()
            self.cond.notify_all()


def run_in_threads(target: Callable[..., None], jobs: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
    """Run ``target(*args)`` for each ``(name, args)`` in its own (named, daemon) thread and wait for all.

    Interleaved benchmarks give every run its own thread so that each Trainer keeps its own call stack
    between steps; a ``TurnTable`` makes the threads take turns, so nothing computes concurrently.
    """
    threads = [threading.Thread(target=target, args=args, name=name, daemon=True) for name, args in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ------------------------------------------------------------------------------ output
def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary sibling and rename it into place.

    An interrupted run (or a crash in plotting) then never leaves a truncated committed result behind.
    The temporary name keeps the suffix, because ``savefig`` picks the format from it.
    """
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """``atomic_write`` of ``obj`` as JSON, indent 2 and a final newline (the committed results' format)."""
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def save_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    """Lay out, save and close a matplotlib figure (closing frees it: scripts draw after long runs)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def save_result(out: Path, name: str, result: dict[str, Any], plot: Callable[[dict[str, Any], Path], None],
                texts: dict[str, str] | None = None) -> None:
    """Write ``<out>/<name>.json`` (``write_json``), ``<out>/<name>.png`` (``plot(result, path)``) and any
    ``texts`` (file name -> content, e.g. a markdown table), each atomically, then print ``result["summary"]``:
    every script ends with its one summary line on stdout, after its files are in place."""
    write_json(out / f"{name}.json", result)
    atomic_write(out / f"{name}.png", lambda p: plot(result, p))
    for fname, text in (texts or {}).items():
        atomic_write(out / fname, lambda p, text=text: p.write_text(text))
    print(result["summary"])


def median_or_none(xs: Sequence[float]) -> float | None:
    """Median, or None for no samples (a failed run has no step times; JSON gets null)."""
    return statistics.median(xs) if xs else None


def fmt_params(n: int) -> str:
    """A parameter count for summary lines: 1.2M, 35k, 4.5k or the plain number."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else f"{n / 1e3:.1f}k" \
        if n >= 1e3 else str(n)


# ------------------------------------------------------------------------------ data
def eval_slice(task: Any, objective: Any, offset: int, n: int) -> list[Any]:
    """Eval examples ``[offset, offset + n)`` of a task's (seeded, shuffled) eval split, sorted by prompt length.

    The same slice is the same subset for every variant of a benchmark (LR sweeps select on [0, 100) and the
    reports use a later offset, so the choice is not fitted to the reported numbers); sorted by prompt
    length, eval batches carry little padding (about a quarter less compute; accuracy is the same).
    """
    if offset + n > len(task.eval):
        raise SystemExit(f"--eval-offset + --n-eval = {offset + n} exceeds the eval split ({len(task.eval)})")
    return sorted(task.eval[offset: offset + n], key=lambda ex: len(objective.collate.encode_prompt(ex.text)))


# ------------------------------------------------------------------------------ arguments
def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """The scripts' parser: the module docstring's first paragraph as description, defaults shown in --help."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def parse_lr_overrides(items: list[str]) -> dict[str, float]:
    """``["NAME=VALUE", ...]`` (repeated ``--lr`` options) as ``{NAME: float(VALUE)}``."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--lr expects FORM=VALUE, got {item!r}")
        out[name.strip()] = float(value)
    return out


# ------------------------------------------------------------------------------ round-robin order
def rotated(seq: Sequence[Any], k: int) -> list[Any]:
    """``seq`` rotated left by ``k`` places (``k`` taken modulo its length): round k's order of the variants."""
    s = k % len(seq)
    return list(seq[s:]) + list(seq[:s])


def rotations(names: Sequence[str], rounds: int) -> Iterator[tuple[int, list[str]]]:
    """``(k, order)`` for rounds k = 0..rounds-1, the order rotated by one each round.

    Timing variants side by side in rounds whose first slot moves on every round makes a slow drift of
    the machine's load (and any first-in-round effect) hit every variant alike.
    """
    for k in range(rounds):
        yield k, rotated(names, k)
