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
from lorakit.train.trainer import ResumeConfigError, TrainConfig, Trainer


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


class RunSetupError(ValueError):
    """A run that cannot start: the data, model, head and adapter do not fit together (the CLI exits 2)."""


# classification heads that AutoModelForSequenceClassification builds (BERT & co: classifier; decoders: score)
HEAD_MODULES = ("classifier", "score")


def head_modules(model: Any) -> list[str]:
    """Names of the classification head modules ``model`` has (the default ``modules_to_save``)."""
    paths = [p for p, _ in model.named_modules() if p]
    return [n for n in HEAD_MODULES if any(p == n or p.endswith("." + n) for p in paths)]


def _model_ref(model: str | None) -> str:
    """How a run names its base: an embedded model's name, else the folder's absolute path."""
    from lorakit.models import embedded_model

    embedded = embedded_model(model)
    return embedded.name if embedded is not None else str(Path(model).expanduser().resolve())  # type: ignore[arg-type]


def _base_model_name(model: str | None) -> str:
    from lorakit.models import embedded_model

    embedded = embedded_model(model)
    return embedded.hf_name if embedded is not None else str(model)


def _load_device(config: TrainConfig) -> str | None:
    """Where a quantized base must be built (bitsandbytes quantizes on the device it places weights on);
    None for a dense base (the trainer's accelerator moves it)."""
    import torch

    from lorakit.train.trainer import parse_device

    if config.quantize is None:
        return None
    dev = parse_device(config.device)
    return str(dev) if dev is not None else ("cuda" if torch.cuda.is_available() else "cpu")


def finetune(*, model: str | None = None, data: str = "sentiment", spec: AdapterSpec | None = None,
             config: TrainConfig | None = None, strategies: list[Strategy] | None = None,
             n_train: int | None = None, n_eval: int | None = None, max_length: int = 128,
             eval_batch_size: int = 16, threads: int | None = None, adapter_seed: int = 0,
             train_spec: TrainSpec | None = None, head: str | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` on ``data`` with the adapter ``spec``; write the adapter, summary.json and
    train_spec.json into ``config.out_dir``; return the summary (its ``"train_spec"`` is the run's
    ``TrainSpec``: the given one, else one built from the strategies, config, init and data).

    ``head``: ``"lm"`` (label words scored by the LM head; causal-LM tuning on text tasks) or ``"seq_cls"``
    (a new classification head, ``num_labels`` = the task's labels, initialised under ``adapter_seed``,
    trained with cross-entropy; ``spec.modules_to_save`` defaults to the head module); ``None`` = the
    model's default (``seq_cls`` for MiniLM, else ``lm``). The head kind, labels and base are recorded in
    ``lorakit.json``'s meta (``"head"``) and the TrainSpec, so ``evaluate_adapter`` rebuilds the model.
    Setup problems (a text task for a classification head, a ``modules_to_save`` name that matches
    nothing, ...) raise :class:`RunSetupError` before training starts.
    """
    import lorakit
    from lorakit.core.spec import validate_spec
    from lorakit.models import embedded_model, load_model, set_threads

    spec = spec or AdapterSpec(form_args={"r": 8, "alpha": 16})
    validate_spec(spec)
    config = config or TrainConfig()
    out = Path(config.out_dir or "runs/train")
    config = dataclasses.replace(config, out_dir=str(out))
    set_threads(threads)
    t0 = time.perf_counter()
    embedded = embedded_model(model)
    head = head or (embedded.heads[0] if embedded is not None else "lm")
    try:
        task = load_data(data, seed=config.seed, n_train=n_train, n_eval=n_eval)
        _say(f"task: {task.summary()}  (source: {task.source}; license: {task.license})")
        if head == "seq_cls" and task.kind != "classification":
            raise ValueError(f"head 'seq_cls' needs a classification task (text + label); {task.name!r} is a "
                             f"{task.kind!r} task")
        num_labels = len(task.labels) if head == "seq_cls" else None
        base, tokenizer = load_model(model, progress=True, head=head, num_labels=num_labels, head_seed=adapter_seed,
                                     quantize=config.quantize, device=_load_device(config))
        if head == "seq_cls" and not spec.modules_to_save:
            spec = dataclasses.replace(spec, modules_to_save=head_modules(base))
        lorakit.attach(base, spec, seed=adapter_seed)
        objective = make_objective(task, tokenizer, max_length=max_length, eval_batch_size=eval_batch_size,
                                   progress=config.progress, head=head)
    except ValueError as e:
        raise RunSetupError(str(e)) from e
    trainable = sum(p.numel() for p in base.parameters() if p.requires_grad)
    total = sum(p.numel() for p in base.parameters())
    saved = f" modules_to_save={spec.modules_to_save}" if spec.modules_to_save else ""
    quant = f" on a {config.quantize} base" if config.quantize else ""
    _say(f"adapter{quant}: form={spec.form} init={spec.init} targets={spec.targets} args={spec.form_args}{saved} "
         f"-> {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    run_info: dict[str, Any] = {"head": head, "model": _model_ref(model), "max_length": max_length}
    if head == "seq_cls":
        run_info |= {"num_labels": num_labels, "labels": list(task.labels), "seed": adapter_seed}
    if train_spec is None:
        train_spec = TrainSpec.for_run(strategies or [], config, init=spec.init, init_args=spec.init_args,
                                       data=data)
    # the config as run (out_dir filled in above) and what the objective was
    train_spec = dataclasses.replace(train_spec, trainer={**dataclasses.asdict(config), "objective": run_info})
    trainer = Trainer(base, task.train, objective.collate, objective.loss, config,
                      eval_fn=objective.evaluate, strategies=strategies or [], train_spec=train_spec)
    try:
        result = trainer.train(resume=True)
    except ResumeConfigError as e:  # a resume with another config than the checkpointed run's (CLI: exit 2)
        raise RunSetupError(str(e)) from e
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
        "head": head,
        "task": task.name,
        "n_train": len(task.train),
        "n_eval": len(task.eval),
        "majority_baseline": task.majority_baseline() if task.kind == "classification" else None,
        "spec": spec.to_dict(),
        "train_config": dataclasses.asdict(config),
        "train_spec": trainer.train_spec.to_dict(),  # with the history of deliberate config changes, if any
        "adapter_dir": str(out),
    }
    if trainer.is_main:
        lorakit.save(base, out, base_model_name=_base_model_name(model),
                     meta=None if head == "lm" else {"head": run_info})  # what rebuilds a classification head
        atomic.write_json(out / "summary.json", summary)
    return summary


def evaluate_adapter(adapter: str | Path | None, *, data: str = "sentiment", model: str | None = None,
                     head: str | None = None, n_eval: int | None = None, max_length: int | None = None,
                     seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Metrics of the base model, or base + the adapter folder, on ``data``'s eval split.

    A classification-head adapter (``lorakit.json`` meta ``"head"``, or a PEFT ``task_type`` SEQ_CLS) is
    evaluated on the model it was made from (its recorded base unless ``model`` is given) rebuilt with the
    same head: kind, number of labels and init seed; the data's labels must be the ones it was trained on.
    """
    import lorakit
    from lorakit.models import embedded_model, load_model

    state = lorakit.load_state(adapter) if adapter is not None else None
    record: dict[str, Any] = dict(state.meta.get("head") or {}) if state is not None else {}
    if state is not None and not record and (state.meta.get("task_type") == "SEQ_CLS" or str(
            state.base.get("model_class", "")).endswith("ForSequenceClassification")):
        record = {"head": "seq_cls"}  # e.g. a PEFT adapter: labels taken from the data, in its order
    if head is not None and record and head != record.get("head", "lm"):
        raise RunSetupError(f"{adapter}: the adapter was trained with head {record.get('head')!r}, not {head!r}")
    embedded = embedded_model(model)
    head = head or record.get("head") or (embedded.heads[0] if embedded is not None else "lm")
    if model is None and record.get("model"):
        model = record["model"]
    try:
        task = load_data(data, seed=seed, n_eval=n_eval)
        if head == "seq_cls":
            if task.kind != "classification":
                raise ValueError(f"head 'seq_cls' needs a classification task; {task.name!r} is a {task.kind!r} task")
            if record.get("labels") is not None and list(record["labels"]) != list(task.labels):
                raise ValueError(f"{adapter}: the adapter's classes are {record['labels']}, the data's are "
                                 f"{task.labels}; evaluate it on data with the same labels")
        base, tokenizer = load_model(model, progress=progress, head=head,
                                     num_labels=record.get("num_labels", len(task.labels)) if head == "seq_cls"
                                     else None, head_seed=int(record.get("seed", 0)))
        if state is not None:
            lorakit.apply_state(base, state, where=str(adapter))
        length = max_length or int(record.get("max_length", 128))
        objective = make_objective(task, tokenizer, max_length=length, progress=progress, head=head)
    except ValueError as e:
        raise RunSetupError(str(e)) from e
    metrics = objective.evaluate(base.eval())
    return {"task": task.name, "adapter": str(adapter) if adapter is not None else None, "head": head,
            "n_eval": len(task.eval), **metrics}
