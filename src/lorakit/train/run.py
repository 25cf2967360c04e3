"""One fine-tuning run end to end: model, task, adapter, training, evaluation, saved adapter, summary."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from lorakit.core import atomic
from lorakit.core.spec import AdapterSpec, TrainSpec
from lorakit.strategies.base import Strategy
from lorakit.train.objectives import make_objective
from lorakit.train.trainer import TrainConfig, Trainer


def load_data(data: str, *, seed: int = 0, n_train: int | None = None, n_eval: int | None = None,
              text_field: str = "text", label_field: str = "label"):
    """A bundled task name, or a CSV/TSV/JSONL/JSON file path."""
    from lorakit.data import load_file, load_task

    if Path(data).suffix.lower() in {".csv", ".tsv", ".jsonl", ".json", ".ndjson"}:
        return load_file(data, text_field=text_field, label_field=label_field, seed=seed,
                         n_train=n_train, n_eval=n_eval)
    return load_task(data, seed=seed, n_train=n_train, n_eval=n_eval)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def finetune(*, model: str | None = None, data: str = "sentiment", spec: AdapterSpec | None = None,
             config: TrainConfig | None = None, strategies: list[Strategy] | None = None,
             n_train: int | None = None, n_eval: int | None = None, max_length: int = 128,
             eval_batch_size: int = 16, threads: int | None = None, adapter_seed: int = 0,
             train_spec: TrainSpec | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` on ``data`` with the adapter ``spec``; write the adapter, summary.json and
    train_spec.json into ``config.out_dir``; return the summary (its ``"train_spec"`` is the run's
    ``TrainSpec``: the given one, else one built from the strategies, config, init and data)."""
    import lorakit
    from lorakit.core.spec import validate_spec
    from lorakit.models import load_model, set_threads

    spec = spec or AdapterSpec(form_args={"r": 8, "alpha": 16})
    validate_spec(spec)
    config = config or TrainConfig()
    out = Path(config.out_dir or "runs/train")
    config = dataclasses.replace(config, out_dir=str(out))
    set_threads(threads)
    t0 = time.perf_counter()
    base, tokenizer = load_model(model, progress=True)
    task = load_data(data, seed=config.seed, n_train=n_train, n_eval=n_eval)
    _say(f"task: {task.summary()}  (source: {task.source}; license: {task.license})")
    lorakit.attach(base, spec, seed=adapter_seed)
    trainable = sum(p.numel() for p in base.parameters() if p.requires_grad)
    total = sum(p.numel() for p in base.parameters())
    _say(f"adapter: form={spec.form} init={spec.init} targets={spec.targets} args={spec.form_args} "
         f"-> {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    objective = make_objective(task, tokenizer, max_length=max_length, eval_batch_size=eval_batch_size,
                               progress=config.progress)
    if train_spec is None:
        train_spec = TrainSpec.for_run(strategies or [], config, init=spec.init, init_args=spec.init_args,
                                       data=data)
    else:  # the config as run (out_dir filled in above)
        train_spec = dataclasses.replace(train_spec, trainer=dataclasses.asdict(config))
    trainer = Trainer(base, task.train, objective.collate, objective.loss, config,
                      eval_fn=objective.evaluate, strategies=strategies or [], train_spec=train_spec)
    result = trainer.train(resume=True)
    summary: dict[str, Any] = {
        "metric_name": objective.metric_name,
        "metric_before": result.eval_before.get(objective.metric_name),
        "metric_after": result.eval_after.get(objective.metric_name),
        "eval_before": result.eval_before,
        "eval_after": result.eval_after,
        "train_seconds": round(result.train_seconds, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "trainable_params": trainable,
        "total_params": total,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "resumed_from": result.resumed_from,
        "model": model or "smollm2",
        "task": task.name,
        "n_train": len(task.train),
        "n_eval": len(task.eval),
        "majority_baseline": task.majority_baseline() if task.kind == "classification" else None,
        "spec": spec.to_dict(),
        "train_config": dataclasses.asdict(config),
        "train_spec": train_spec.to_dict(),
        "adapter_dir": str(out),
    }
    if trainer.is_main:
        lorakit.save(base, out, base_model_name=model or "HuggingFaceTB/SmolLM2-135M-Instruct")
        atomic.write_json(out / "summary.json", summary)
    return summary
