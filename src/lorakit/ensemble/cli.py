"""`lorakit ensemble ...`: evaluate an ensemble of adapters with a cascade (registered by lorakit.cli).

``lorakit ensemble eval --adapters A B --cascade window --target cov@10 --data supersense [--ood fortunes]``
loads the adapters on one base, sets the cascade's operating point on a validation split, runs it on the
test split (plus OOD texts, scored as if they were the task's inputs) and prints one table row for the
cascade and one for member 1 alone: the targeted metric, AURC, AUROC (with OOD), accuracy, pass rate and
estimated cost relative to member 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

ensemble_app = typer.Typer(no_args_is_help=True, add_completion=False,
                           help="Ensembles of adapters on one base and window early-exit cascades "
                                "(`lorakit methods --axis ensemble`).")


@ensemble_app.callback()
def _group() -> None:
    """Ensembles of adapters: `lorakit ensemble eval`."""


class EnsembleSetupError(ValueError):
    """Adapters, data and model that do not fit together for an ensemble evaluation."""


def _head_record(states: list[Any], adapters: list[str]) -> dict[str, Any]:
    records = [dict(s.meta.get("head") or {}) for s in states]
    kinds = {r.get("head", "lm") for r in records}
    if len(kinds) > 1:
        raise EnsembleSetupError(f"the adapters were trained with different heads {sorted(kinds)}: {adapters}")
    labels = {tuple(r["labels"]) for r in records if r.get("labels") is not None}
    if len(labels) > 1:
        raise EnsembleSetupError(f"the adapters were trained on different label sets: {sorted(labels)}")
    return records[0]


def load_members(adapters: list[str], *, data: str, model: str | None = None, head: str | None = None,
                 n_val: int = 500, n_test: int = 500, ood: str | None = None, n_ood: int | None = None,
                 seed: int = 0, max_length: int | None = None, combine: str = "mean_probs") -> dict[str, Any]:
    """The ensemble (members ``m1``, ``m2``, ... in the given order), its collate function and the splits.

    Val and test are the first ``n_val`` and the next ``n_test`` examples of the task's eval split at size
    ``n_val + n_test`` (seeded, stratified: ``load_task``); adapters trained with the same ``seed`` and an
    eval split at least that large have seen none of them. OOD texts get a placeholder label (task.labels[0];
    only their scores are used)."""
    import lorakit
    from lorakit.data import Example
    from lorakit.ensemble.ensemble import Ensemble
    from lorakit.models import embedded_model, load_model
    from lorakit.train.objectives import make_objective
    from lorakit.train.run import load_data

    if len(adapters) < 2:
        raise EnsembleSetupError(f"an ensemble needs at least two adapters, got {adapters}")
    if n_val < 2 or n_test < 2:
        raise EnsembleSetupError(f"n_val and n_test must be >= 2, got {n_val}, {n_test}")
    states = [lorakit.load_state(a) for a in adapters]
    record = _head_record(states, adapters)
    embedded = embedded_model(model)
    head = head or record.get("head") or (embedded.heads[0] if embedded is not None else "lm")
    if model is None and record.get("model"):
        model = record["model"]
    task = load_data(data, seed=seed, n_eval=n_val + n_test)
    if task.kind != "classification":
        raise EnsembleSetupError(f"task {task.name!r} is a {task.kind!r} task; cascades need classification")
    if record.get("labels") is not None and list(record["labels"]) != list(task.labels):
        raise EnsembleSetupError(f"the adapters' classes are {record['labels']}, the data's are {task.labels}")
    base, tokenizer = load_model(model, progress=False, head=head,
                                 num_labels=len(task.labels) if head == "seq_cls" else None,
                                 head_seed=int(record.get("seed", 0)))
    names = [f"m{i + 1}" for i in range(len(adapters))]
    for name, state, path in zip(names, states, adapters, strict=True):
        lorakit.apply_state(base, state, name, where=str(path))
    objective = make_objective(task, tokenizer, max_length=max_length or int(record.get("max_length", 128)),
                               head=head)
    label_ids = getattr(objective.collate, "label_token_ids", None) if head == "lm" else None
    ensemble = Ensemble(base.eval(), names, combine, head=head, label_token_ids=label_ids)
    out: dict[str, Any] = {"ensemble": ensemble, "collate": objective.collate, "task": task,
                           "val": task.eval[:n_val], "test": task.eval[n_val:n_val + n_test], "ood": []}
    if ood:
        texts = load_data(ood, seed=seed, n_eval=n_ood or n_test).eval
        out["ood"] = [Example(ex.text, task.labels[0]) for ex in texts]
    return out


def evaluate_cascade(setup: dict[str, Any], *, cascade: str = "window", target: str = "cov@10",
                     uncertainty: str | None = None, stage2_score: str | None = None, window: float = 0.1,
                     shift_guard: bool = True, pass_rate: float = 0.2, seed: int = 0, batch_size: int = 32,
                     prefix_reuse: bool = False) -> dict[str, Any]:
    """Fit the cascade on val, run it on test (+ OOD); metrics of the cascade and of member 1 alone."""
    import torch

    from lorakit.ensemble import metrics as M
    from lorakit.ensemble.cascade import confidence, make_cascade

    uncertainty = uncertainty or ("energy" if target.startswith("FPR") else "msp")
    ens, collate = setup["ensemble"], setup["collate"]
    policy = make_cascade(cascade, target=target, uncertainty=uncertainty, stage2_score=stage2_score,
                          pass_rate=pass_rate, shift_guard=shift_guard, window=window, seed=seed,
                          prefix_reuse=prefix_reuse)
    policy.fit_examples(ens, setup["val"], collate, batch_size=batch_size)
    rows = list(setup["test"]) + list(setup["ood"])
    result = policy.run(ens, rows, collate, batch_size=batch_size)
    n_id = len(setup["test"])
    labels = torch.tensor([setup["task"].label_index(ex.label) for ex in setup["test"]])

    def row(logits: torch.Tensor, conf: torch.Tensor, passed: float, cost: float) -> dict[str, Any]:
        correct = logits[:n_id].argmax(-1) == labels
        ood_conf = conf[n_id:] if setup["ood"] else None
        out = {"target": target, target: M.target_metric(target, correct, conf[:n_id], ood_conf),
               "AURC": M.aurc(correct, conf[:n_id]), "accuracy": float(correct.double().mean()),
               "pass_rate": passed, "cost_vs_single": cost}
        if ood_conf is not None:
            out["AUROC"] = M.auroc(conf[:n_id], ood_conf)
        return out

    single = result.member1_logits
    report = {
        "cascade": cascade, "target": target, "uncertainty": uncertainty, "stage2_score": policy.stage2_score,
        "members": list(ens.members), "combine": ens.combine, "n_val": len(setup["val"]), "n_test": n_id,
        "n_ood": len(setup["ood"]),
        "rows": {cascade: row(result.logits, result.conf, result.pass_rate, result.cost_vs_single),
                 "member1": row(single, confidence(single, uncertainty), 0.0, 1.0)},
        "tau": getattr(policy, "tau", None), "window": result.window,
        "cost": {"stage1": result.stage1.to_dict(), "stage2": result.stage2.to_dict()},
    }
    return report


def _table(report: dict[str, Any]) -> str:
    target = report["target"]
    cols = [target, "AURC", "AUROC", "accuracy", "pass_rate", "cost_vs_single"]
    lines = [f"{'method':<10}" + "".join(f"{c:>15}" for c in cols)]
    for name, r in report["rows"].items():
        cells = "".join(f"{r[c]:>15.4f}" if isinstance(r.get(c), float) else f"{'-':>15}" for c in cols)
        lines.append(f"{name:<10}{cells}")
    return "\n".join(lines)


@ensemble_app.command("eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def eval_command(
    ctx: typer.Context,
    adapters: Annotated[list[str], typer.Option(
        "--adapters", help="adapter folders, member 1 first (--adapters A B or --adapters A --adapters B)")],
    data: Annotated[str, typer.Option(help="classification task name or data file")] = "sentiment",
    cascade: Annotated[str, typer.Option(help="window | single | random | none | all")] = "window",
    target: Annotated[str, typer.Option(help="cov@5 | cov@10 | risk@50 | risk@80 | FPR@80 | FPR@95")] = "cov@10",
    model: Annotated[str | None, typer.Option(help="base model (default: the adapters' recorded base)")] = None,
    head: Annotated[str | None, typer.Option(help="lm | seq_cls (default: the adapters')")] = None,
    ood: Annotated[str | None, typer.Option(help="OOD texts (task name, e.g. fortunes) for AUROC / FPR")] = None,
    n_val: Annotated[int, typer.Option(help="validation examples (τ and window)")] = 500,
    n_test: Annotated[int, typer.Option(help="test examples")] = 500,
    n_ood: Annotated[int | None, typer.Option(help="OOD examples (default: n_test)")] = None,
    uncertainty: Annotated[str | None, typer.Option(help="msp | energy (default: energy for FPR targets)")] = None,
    stage2_score: Annotated[str | None, typer.Option(help="ens | mean (default: ens for msp, mean for energy)")
                            ] = None,
    window: Annotated[float, typer.Option(help="window half-width in quantiles")] = 0.1,
    shift_guard: Annotated[bool, typer.Option(help="recompute the window on the unlabelled test scores")] = True,
    pass_rate: Annotated[float, typer.Option(help="pass rate of the single-threshold and random cascades")] = 0.2,
    combine: Annotated[str, typer.Option(help="mean_probs (the cascade code) | mean_logits")] = "mean_probs",
    prefix_reuse: Annotated[bool, typer.Option(help="stage 2 resumes at the first adapted layer")] = False,
    batch_size: Annotated[int, typer.Option()] = 32,
    seed: Annotated[int, typer.Option(help="seed of the data split (and the random cascade)")] = 0,
    out: Annotated[Path | None, typer.Option(help="write the report as JSON here")] = None,
    threads: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Evaluate a cascade of adapters: τ and window on val, then test (+ OOD)."""
    from lorakit.core import atomic
    from lorakit.core.state import AdapterFileError
    from lorakit.models import set_threads

    extra = [a for a in ctx.args if not a.startswith("-")]
    if len(extra) != len(ctx.args):
        typer.secho(f"error: unexpected arguments {ctx.args}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    set_threads(threads)
    try:
        setup = load_members(list(adapters) + extra, data=data, model=model, head=head, n_val=n_val,
                             n_test=n_test, ood=ood, n_ood=n_ood, seed=seed, combine=combine)
        report = evaluate_cascade(setup, cascade=cascade, target=target, uncertainty=uncertainty,
                                  stage2_score=stage2_score, window=window, shift_guard=shift_guard,
                                  pass_rate=pass_rate, seed=seed, batch_size=batch_size, prefix_reuse=prefix_reuse)
    except (AdapterFileError, ValueError, FileNotFoundError) as e:
        typer.secho(f"error: {' '.join(str(e).split())}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    report["adapters"] = list(adapters) + extra
    typer.echo(_table(report))
    if out is not None:
        atomic.write_json(out, report)
        print(f"wrote {out}", file=sys.stderr)


__all__ = ["EnsembleSetupError", "ensemble_app", "evaluate_cascade", "load_members"]
