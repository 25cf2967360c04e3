"""Loss and metric curves from a run's log.jsonl, as one PNG."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(log_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Training loss (raw and smoothed) and every eval metric against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("eval")]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="train loss")
        smooth, acc = [], None
        for v in losses:
            acc = v if acc is None else 0.9 * acc + 0.1 * v
            smooth.append(acc)
        ax.plot(steps, smooth, color="tab:blue", lw=2, label="train loss (EMA 0.9)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if evals:
        ax2 = ax.twinx()
        for i, key in enumerate(sorted(evals[-1]["eval"])):
            pts = [(r["step"], r["eval"][key]) for r in evals if key in r["eval"]]
            ax2.plot(*zip(*pts), marker="o", color=f"C{i + 1}", label=f"eval {key}")
        ax2.set_ylabel("eval metric")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(title or log_path.parent.name)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
