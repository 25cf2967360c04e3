"""A whole federated run without Flower (one process), and the files every engine writes.

``run_local`` is the reference: the Flower apps call the very same :class:`Runtime` and
:class:`Server` methods, so a Flower simulation gives the same global adapter as this loop.
"""

from __future__ import annotations

import logging
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.federated.args import args_dict
from lorakit.federated.base import GlobalState, tensor_bytes
from lorakit.federated.client import Runtime, make_aggregator
from lorakit.federated.config import FedConfig
from lorakit.federated.server import RoundReport, Server

log = logging.getLogger("lorakit.federated")


@dataclass
class FedResult:
    config: FedConfig
    engine: str
    state: GlobalState
    reports: list[RoundReport]
    evals: dict[int, dict[str, float]] = field(default_factory=dict)  # round -> metrics (0 = before)
    seconds: float = 0.0
    metric_name: str = "accuracy"

    def summary(self) -> dict[str, Any]:
        rounds = [r.to_dict() for r in self.reports]
        final = self.evals[max(self.evals)] if self.evals else {}
        gaps = [r.gap.get("relative") for r in self.reports if r.gap]
        eps = [r.info["epsilon_max"] for r in self.reports if "epsilon_max" in r.info]
        return {
            "engine": self.engine,
            "method": self.config.method,
            "method_args": args_dict(self.config.aggregator_args()),  # every Args field, defaults included
            "dp": self.config.dp,
            "metric_name": self.metric_name,
            "metric_before": self.evals.get(0, {}).get(self.metric_name),
            "metric_final": final.get(self.metric_name),
            "metric_by_round": {r: m.get(self.metric_name) for r, m in sorted(self.evals.items())},
            "gap_by_round": gaps,
            "gap_mean": sum(gaps) / len(gaps) if gaps else None,
            "epsilon": eps[-1] if eps else None,
            "bytes_per_round": [r.traffic.get("total_bytes") for r in self.reports],
            "seconds": round(self.seconds, 2),
            "config": self.config.to_dict(),
            "rounds": rounds,
        }


def sample_clients(cfg: FedConfig, server_round: int) -> list[int]:
    """The clients asked to train in a round: all, or a seeded sample of ⌈fraction·K⌉ (at least min_clients)."""
    if cfg.fraction >= 1.0:
        return list(range(cfg.clients))
    k = min(cfg.clients, max(cfg.min_clients, round(cfg.fraction * cfg.clients)))
    return sorted(random.Random(f"{cfg.seed}-{server_round}").sample(range(cfg.clients), k))


def new_server(cfg: FedConfig, rt: Runtime) -> Server:
    agg = make_aggregator(cfg)
    log.info("aggregator %s", agg.describe())
    return Server(agg, rt.template(agg), min_clients=cfg.min_clients, max_rank=max(cfg.client_ranks()))


def eval_due(cfg: FedConfig, server_round: int) -> bool:
    return server_round == cfg.rounds or (cfg.eval_every > 0 and server_round % cfg.eval_every == 0)


def run_local(cfg: FedConfig, runtime: Runtime | None = None, *, progress: bool = True, write: bool = True,
              initial_eval: dict[str, float] | None = None) -> FedResult:
    """All rounds in this process: every sampled client trains in turn, then the server aggregates.

    ``initial_eval`` reuses a known round-0 evaluation (e.g. the base model's, shared by several runs).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    rt = runtime or Runtime.shared(cfg)
    rt.cfg = cfg
    server = new_server(cfg, rt)
    evals = {0: dict(initial_eval) if initial_eval is not None else rt.evaluate(server.aggregator, server.state)}
    bar = tqdm(total=cfg.rounds * len(sample_clients(cfg, 1)), desc=f"fed {cfg.method}", unit="client",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for rnd in range(1, cfg.rounds + 1):
        download = server.download()
        ids = sample_clients(cfg, rnd)
        updates, failures = [], {}
        for cid in ids:
            try:
                updates.append(rt.train(server.aggregator, download, cid, rnd))
            except Exception as e:  # a failing client is a dropout, as in Flower; the round goes on
                failures[cid] = f"{type(e).__name__}: {e}"
                log.debug("client %s failed:\n%s", cid, traceback.format_exc())
            bar.update(1)
        report = server.round(updates, sent=len(ids), failures=failures)
        if eval_due(cfg, rnd):
            report.eval = evals[rnd] = rt.evaluate(server.aggregator, server.state)
        bar.set_postfix(round=rnd, gap=f"{report.gap.get('relative', float('nan')):.2e}")
    bar.close()
    result = FedResult(config=cfg, engine="local", state=server.state, reports=server.reports, evals=evals,
                       seconds=time.perf_counter() - t0, metric_name=rt.objective.metric_name)
    if write:
        save_result(result, cfg.out)
    return result


def save_result(result: FedResult, out: str | Path) -> Path:
    """``fed_summary.json``, ``metric.png``, the global adapter (``global_adapter/``) and the merged base
    change (``base_delta.safetensors``, when the aggregator merges into the base) in ``out``."""
    from safetensors.torch import save_file

    from lorakit.core import atomic
    from lorakit.io.peft import save_state

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    if result.state.adapter is not None:
        save_state(result.state.adapter, out / "global_adapter")
        summary["global_adapter"] = str(out / "global_adapter")
    if result.state.base_delta:
        tensors = {k: v.contiguous() for k, v in result.state.base_delta.items()}
        atomic.write_with(out / "base_delta.safetensors", lambda p: save_file(tensors, str(p)))
        summary["base_delta"] = str(out / "base_delta.safetensors")
        summary["base_delta_bytes"] = tensor_bytes(tensors)
    atomic.write_json(out / "fed_summary.json", summary)
    plot_rounds({f"{result.config.method}{' +DP' if result.config.dp else ''}": summary["metric_by_round"]},
                out / "metric.png", result.metric_name)
    return out


def plot_rounds(curves: dict[str, dict[int, float | None]], path: Path, metric: str, title: str = "") -> Path:
    """One line per run: the server-side metric against the round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, by_round in curves.items():
        pts = sorted((int(r), v) for r, v in by_round.items() if v is not None)
        if pts:
            ax.plot([r for r, _ in pts], [v for _, v in pts], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def adapters_equal(a: GlobalState, b: GlobalState) -> bool:
    """Bit-for-bit equality of two global states (adapter tensors and base delta)."""
    def same(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
        return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)

    if (a.adapter is None) != (b.adapter is None):
        return False
    return (a.adapter is None or same(a.adapter.tensors, b.adapter.tensors)) and same(a.base_delta, b.base_delta)
