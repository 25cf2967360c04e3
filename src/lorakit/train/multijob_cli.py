"""``lorakit train-many CONFIG.yaml``: several adapter jobs (a learning-rate sweep, several tasks, several
forms) trained as one multi-job run on one frozen base (:class:`lorakit.train.multijob.MultiJobTrainer`).

Config (YAML or JSON; at most 1 MB)::

    model: smollm2              # embedded model name or a local HF folder
    out_dir: runs/many          # each job writes <out_dir>/<job name>/ (log, checkpoints, adapter, curves)
    token_cap: 2048             # planner cap per micro-batch (rows × padded length)
    planner: ffd                # ffd | milp | pad_to_max
    max_length: 128
    memory_budget_mb: null      # admission: jobs beyond it wait in a queue
    max_concurrent: null
    eval: true                  # evaluate each job's adapter after its last step
    defaults: {data: sentiment, form: lora, r: 8, alpha: 16, steps: 100, batch_size: 8, lr: 2e-4}
    jobs:                       # each entry overrides the defaults; `name` is required
      - {name: tweets, data: sentiment}
      - {name: fortunes, data: fortunes, r: 4}
    sweep: {lr: [1e-4, 3e-4]}   # optional: each job (or the defaults alone) × the cartesian product

A sweep of 8 learning rates as one run is the one-line config
``{defaults: {data: sentiment, steps: 60}, sweep: {lr: [5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3, 3e-3]}}``
(``model`` defaults to the embedded SmolLM2).
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from lorakit.core.spec import AdapterSpec
from lorakit.train.trainer import TrainConfig

MAX_CONFIG_BYTES = 1 << 20
TOP_KEYS = {"model", "out_dir", "token_cap", "planner", "max_length", "memory_budget_mb", "max_concurrent", "eval",
            "defaults", "jobs", "sweep", "threads", "n_eval", "act_bytes_per_token"}
ADAPTER_KEYS = {"form", "r", "alpha", "dropout", "targets", "form_args", "init", "init_args", "rslora"}
TRAIN_KEYS = {"lr", "steps", "batch_size", "grad_accum", "schedule", "warmup_steps", "warmup_ratio", "max_grad_norm",
              "weight_decay", "seed", "save_every", "keep_checkpoints", "min_lr_ratio", "log_every"}
JOB_KEYS = {"name", "data", "n_train"} | ADAPTER_KEYS | TRAIN_KEYS


class ManyConfigError(ValueError):
    """A train-many config that cannot run (unknown keys, missing names, bad values)."""


def read_config(path: str | Path) -> dict[str, Any]:
    """The config file as a dict (YAML safe_load or JSON; size-capped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such config file")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ManyConfigError(f"{p}: config larger than {MAX_CONFIG_BYTES} bytes")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        cfg = json.loads(text)
    else:
        import yaml

        cfg = yaml.safe_load(text)
    if not isinstance(cfg, dict):
        raise ManyConfigError(f"{p}: the config must be a mapping (model, defaults, jobs, sweep)")
    return cfg


def expand_jobs(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The job entries: defaults ⊕ each job, times the sweep's cartesian product (names get ``-k=v``)."""
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise ManyConfigError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(TOP_KEYS)}")
    defaults = dict(cfg.get("defaults") or {})
    jobs = cfg.get("jobs")
    sweep = cfg.get("sweep") or {}
    if not isinstance(sweep, dict) or any(not isinstance(v, list) or not v for v in sweep.values()):
        raise ManyConfigError("sweep must map option names to non-empty lists of values")
    if jobs is None:
        if not sweep:
            raise ManyConfigError("the config needs a 'jobs' list or a 'sweep'")
        jobs = [{"name": str(defaults.get("data", "job"))}]
    if not isinstance(jobs, list) or not jobs:
        raise ManyConfigError("'jobs' must be a non-empty list of mappings")
    out = []
    for entry in jobs:
        if not isinstance(entry, dict) or not entry.get("name"):
            raise ManyConfigError(f"every job needs a name: {entry!r}")
        base = {**defaults, **entry}
        keys = list(sweep)
        for combo in itertools.product(*(sweep[k] for k in keys)) if keys else [()]:
            job = {**base, **dict(zip(keys, combo, strict=True))}
            if keys:
                job["name"] = base["name"] + "".join(f"-{k}{v}" for k, v in zip(keys, combo, strict=True))
            job["name"] = re.sub(r"[^A-Za-z0-9_-]", "_", str(job["name"]))  # an adapter (module) name: no dots
            bad = set(job) - JOB_KEYS
            if bad:
                raise ManyConfigError(f"job {job['name']!r}: unknown key(s) {sorted(bad)}; known: {sorted(JOB_KEYS)}")
            out.append(job)
    names = [j["name"] for j in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ManyConfigError(f"duplicate job names {dupes}")
    return out


def _spec(job: dict[str, Any]) -> AdapterSpec:
    form_args = dict(job.get("form_args") or {})
    for k in ("r", "alpha", "dropout", "rslora"):
        if k in job:
            form_args[k] = job[k]
    form_args.setdefault("r", 8)
    form_args.setdefault("alpha", 2.0 * form_args["r"])
    kwargs: dict[str, Any] = {"form": job.get("form", "lora"), "form_args": form_args,
                              "init": job.get("init", "default"), "init_args": dict(job.get("init_args") or {})}
    if "targets" in job:
        kwargs["targets"] = job["targets"]
    return AdapterSpec(**kwargs)


def _config(job: dict[str, Any], out_dir: Path) -> TrainConfig:
    kwargs = {k: job[k] for k in TRAIN_KEYS if k in job}
    for k in ("lr", "warmup_ratio", "max_grad_norm", "weight_decay", "min_lr_ratio"):
        if k in kwargs and kwargs[k] is not None:
            kwargs[k] = float(kwargs[k])  # YAML reads 2e-4 as a string
    return TrainConfig(**kwargs, out_dir=str(out_dir / job["name"]), progress=False, eval_at_start=False)


def run_many(cfg: dict[str, Any], *, progress: bool = True) -> dict[str, Any]:
    """Run the config; returns the summary (also written to ``<out_dir>/summary.json``)."""
    import lorakit
    from lorakit.core import atomic
    from lorakit.models import load_model, set_threads
    from lorakit.train.multijob import Job, MultiJobTrainer
    from lorakit.train.objectives import make_objective
    from lorakit.train.run import load_data

    entries = expand_jobs(cfg)
    set_threads(cfg.get("threads"))
    out_dir = Path(cfg.get("out_dir") or "runs/many")
    max_length = int(cfg.get("max_length", 128))
    t0 = time.perf_counter()
    try:
        specs = [_spec(j) for j in entries]
        configs = [_config(j, out_dir) for j in entries]
    except (TypeError, ValueError) as e:
        raise ManyConfigError(str(e)) from e
    model, tokenizer = load_model(cfg.get("model"), progress=progress)
    tasks: dict[tuple, Any] = {}
    jobs, objectives = [], {}
    for entry, spec, config in zip(entries, specs, configs, strict=True):
        key = (entry.get("data", "sentiment"), config.seed, entry.get("n_train"))
        if key not in tasks:
            tasks[key] = load_data(key[0], seed=config.seed, n_train=key[2], n_eval=cfg.get("n_eval"))
        task = tasks[key]
        objective = make_objective(task, tokenizer, max_length=max_length)
        objectives[entry["name"]] = objective
        jobs.append(Job(entry["name"], task.train, objective, config, spec))
    budget = cfg.get("memory_budget_mb")
    trainer = MultiJobTrainer(model, [], token_cap=int(cfg.get("token_cap", 2048)),
                              planner=str(cfg.get("planner", "ffd")),
                              memory_budget=int(float(budget) * 2**20) if budget else None,
                              max_concurrent=cfg.get("max_concurrent"),
                              act_bytes_per_token=cfg.get("act_bytes_per_token"), progress=False)
    for job in jobs:
        state = trainer.add_job(job)
        _say(f"job {job.name}: {state} ({job.spec.form} r={job.spec.form_args.get('r')}, lr={job.config.lr}, "
             f"steps={job.config.steps}, batch={job.config.batch_size})")
    last_print = [0.0]

    def report(tr: MultiJobTrainer, stats: Any) -> None:
        now = time.perf_counter()
        if progress and (now - last_print[0] > 5 or not tr.running):
            last_print[0] = now
            parts = [f"{r['job']} {r['step']}/{r['steps']} loss {r['loss']:.4f}" for r in tr.status()
                     if r["status"] == "running" and r["loss"] is not None]
            _say(f"step {tr.step_count}: " + "; ".join(parts[:8]) + (" ..." if len(parts) > 8 else ""))

    results = trainer.run(on_step=report)
    rows = []
    for entry, job in zip(entries, jobs, strict=True):
        res = results[job.name]
        row: dict[str, Any] = {"job": job.name, "data": entry.get("data", "sentiment"), "form": job.spec.form,
                               "r": job.spec.form_args.get("r"), "lr": job.config.lr, "steps": res.steps,
                               "final_loss": res.final_loss, "status": res.status, "out_dir": res.out_dir}
        if cfg.get("eval", True):
            lorakit.set_active(model, job.name)
            model.eval()
            metrics = objectives[job.name].evaluate(model)
            row["metric"] = objectives[job.name].metric_name
            row["metric_after"] = metrics.get(row["metric"])
        rows.append(row)
    stats = trainer.history
    summary = {"jobs": rows, "steps": trainer.step_count, "seconds": round(time.perf_counter() - t0, 2),
               "real_tokens": sum(s.real_tokens for s in stats), "padded_tokens": sum(s.padded_tokens for s in stats),
               "micro_batches": sum(s.micro_batches for s in stats), "config": cfg}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out_dir / "summary.json", summary)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    head = f"{'job':<28} {'form':<6} {'r':>3} {'lr':>9} {'steps':>5} {'loss':>8} {'metric':>12}"
    lines = [head, "-" * len(head)]
    for r in summary["jobs"]:
        metric = "" if r.get("metric_after") is None else f"{r['metric']}={r['metric_after']:.3f}"
        lines.append(f"{r['job'][:28]:<28} {r['form']:<6} {r['r']!s:>3} {r['lr']:>9.2e} {r['steps']:>5} "
                     f"{r['final_loss']:>8.4f} {metric:>12}")
    pad = summary["padded_tokens"]
    ratio = 1 - summary["real_tokens"] / pad if pad else 0.0
    lines.append(f"{len(summary['jobs'])} job(s), {summary['steps']} steps, {summary['micro_batches']} micro-batches, "
                 f"padding {100 * ratio:.1f}%, {summary['seconds']:.1f} s")
    return "\n".join(lines)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_many(
    config: Annotated[Path, typer.Argument(help="YAML/JSON: model, defaults, jobs and/or sweep")],
    out_dir: Annotated[Path | None, typer.Option(help="override the config's out_dir")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: $LORAKIT_THREADS)")] = None,
    quiet: Annotated[bool, typer.Option(help="no per-step progress")] = False,
) -> None:
    """Train several adapters (a sweep, several tasks or forms) as one multi-job run on one frozen base."""
    try:
        cfg = read_config(config)
        if out_dir is not None:
            cfg["out_dir"] = str(out_dir)
        if threads is not None:
            cfg["threads"] = threads
        summary = run_many(cfg, progress=not quiet)
    except (ValueError, FileNotFoundError, KeyError) as e:
        typer.secho(f"error: {' '.join(str(e).split()) or type(e).__name__}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    typer.echo(format_table(summary))


__all__ = ["ManyConfigError", "expand_jobs", "format_table", "read_config", "run_many", "train_many"]
