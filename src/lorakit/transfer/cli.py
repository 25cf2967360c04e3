"""`lorakit transfer` and `lorakit transfer-discriminator`: Trans-LoRA from the command line.

The lead registers the two command functions in ``lorakit.cli``:
``app.command("transfer")(transfer)`` and ``app.command("transfer-discriminator")(transfer_discriminator)``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer


def _say(msg: str) -> None:
    print(f"lorakit: {msg}", file=sys.stderr, flush=True)


def _fail(msg: str) -> typer.Exit:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def load_base(name: str) -> tuple[Any, Any]:
    """``gemma3`` (the optional Gemma-3-270M package), an embedded model name, or a local model folder / GGUF."""
    if name.lower() in ("gemma3", "gemma3-270m", "gemma-3-270m"):
        from lorakit.models.gemma import load_gemma

        return load_gemma()
    from lorakit.models import load_model

    return load_model(name)


def _seeds(path: Path, labels: list[str]) -> list[Any]:
    from lorakit.data import load_file

    task = load_file(path, n_eval=0)
    if task.kind != "classification":
        raise ValueError(f"{path}: the seeds need a 'label' column (labelled examples)")
    bad = sorted({e.label for e in task.train if e.label not in labels})
    if bad:
        raise ValueError(f"{path}: seed labels {bad} are not labels of the task ({labels})")
    return task.train


def transfer(
    source_adapter: Annotated[Path, typer.Option("--source-adapter", help="the source LoRA folder (PEFT/lorakit); "
                                                 "its trans_lora_discriminator/ is used by --filter discriminator")],
    seeds: Annotated[Path, typer.Option("--seeds", help="JSONL/CSV of the labelled seed examples (text, label)")],
    out: Annotated[Path, typer.Option("--out", help="folder for the target adapter and report.json")],
    source_model: Annotated[str, typer.Option("--source-model", help="source base: smollm2, a folder or .gguf")]
    = "smollm2",
    target_model: Annotated[str, typer.Option("--target-model", help="target base: gemma3, smollm2, a folder, "
                                              ".gguf")] = "gemma3",
    data: Annotated[str, typer.Option("--data", help="task whose label strings and prompt are used (a bundled "
                                      "task name or a file); its examples are read only with --eval")] = "sentiment",
    filter: Annotated[str, typer.Option("--filter", help="discriminator | contrastive_excess | none")]
    = "discriminator",
    n_candidates: Annotated[int, typer.Option(help="candidate inputs the target model generates")] = 600,
    keep: Annotated[float, typer.Option(help="candidates kept: a count (>= 1) or a fraction (< 1)")] = 200,
    threshold: Annotated[float | None, typer.Option(help="discriminator: keep only P(real) >= this")] = None,
    steps: Annotated[int, typer.Option(help="target LoRA optimizer steps")] = 60,
    batch_size: Annotated[int, typer.Option(help="target LoRA batch size")] = 8,
    lr: Annotated[float, typer.Option(help="target LoRA learning rate")] = 5e-4,
    r: Annotated[int, typer.Option(help="target LoRA rank")] = 8,
    alpha: Annotated[float, typer.Option(help="target LoRA alpha")] = 16.0,
    loss: Annotated[str, typer.Option(help="kl (teacher label distribution) | ce (teacher argmax)")] = "kl",
    temperature: Annotated[float, typer.Option(help="sampling temperature")] = 1.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling top-p")] = 0.95,
    max_new_tokens: Annotated[int, typer.Option(help="new tokens per candidate (cut at the first newline)")] = 40,
    input_name: Annotated[str, typer.Option(help="line prefix of the few-shot generation prompt")] = "Text",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    eval: Annotated[int, typer.Option("--eval", help="evaluate the target adapter on this many real examples of "
                                      "--data (0: no evaluation, nothing but the seeds is read)")] = 0,
) -> None:
    """Trans-LoRA (arXiv 2405.17258): a LoRA for --target-model from --source-model's adapter, without the task data."""
    import lorakit
    from lorakit.data.tasks import Task
    from lorakit.train.run import load_data
    from lorakit.transfer.discriminator import load_discriminator
    from lorakit.transfer.labels import label_accuracy
    from lorakit.transfer.pipeline import Transfer, TransferArgs

    t0 = time.perf_counter()
    try:
        args = TransferArgs(n_candidates=n_candidates, keep=keep, threshold=threshold, filter=filter, steps=steps,
                            batch_size=batch_size, lr=lr, r=r, alpha=alpha, loss=loss, temperature=temperature,
                            top_p=top_p, max_new_tokens=max_new_tokens, input_name=input_name, seed=seed,
                            progress=True)
        task: Task = load_data(data, seed=seed, n_eval=eval or None)
        seed_examples = _seeds(seeds, task.labels)
        _say(f"{len(seed_examples)} seeds; labels {task.labels}; loading source {source_model} + {source_adapter}")
        src, stok = load_base(source_model)
        lorakit.load(src, source_adapter)
        disc = None
        if filter == "discriminator":
            disc = load_discriminator(source_adapter, source_model=src, source_tokenizer=stok)
            _say(f"discriminator: {disc.kind} ({disc.info})")
        _say(f"loading target {target_model}")
        tgt, ttok = load_base(target_model)
        result = Transfer(src, stok, tgt, ttok, task, args, discriminator=disc, log=_say).run(seed_examples, out)
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    report = result.report
    if eval:
        report["eval_accuracy"] = label_accuracy(tgt, ttok, task, task.eval)
        report["eval_n"] = len(task.eval)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    tm = report["timings"]
    typer.echo(f"transfer: {report['n_candidates']} candidates -> {report['n_kept']} kept ({filter}); teacher labels "
               f"{report['teacher_label_counts']}; generate {tm['generate_s']} s, filter {tm['filter_s']} s, label "
               f"{tm['label_s']} s, train {tm['train_s']} s"
               + (f"; target accuracy {report['eval_accuracy']:.3f} on {report['eval_n']}" if eval else "")
               + f"\nadapter: {out}")


def transfer_discriminator(
    source_adapter: Annotated[Path, typer.Option("--source-adapter", help="the trained source LoRA folder; the "
                                                 "discriminator is written into its trans_lora_discriminator/")],
    seeds: Annotated[Path, typer.Option("--seeds", help="JSONL/CSV of the seed examples the source model imitates")],
    source_model: Annotated[str, typer.Option("--source-model")] = "smollm2",
    data: Annotated[str, typer.Option("--data", help="the REAL task data (bundled task or file): its training "
                                      "texts are the discriminator's real class")] = "sentiment",
    kind: Annotated[str, typer.Option(help="embedding (MiniLM + logistic regression) | lora (paper-like)")]
    = "embedding",
    n_real: Annotated[int, typer.Option(help="real texts (and as many synthetic ones)")] = 1000,
    steps: Annotated[int, typer.Option(help="lora kind: optimizer steps")] = 60,
    input_name: Annotated[str, typer.Option(help="line prefix of the few-shot generation prompt")] = "Text",
    max_new_tokens: Annotated[int, typer.Option(help="new tokens per synthetic input")] = 40,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Train Trans-LoRA's real-vs-synthetic discriminator next to a source adapter, while the real data exist."""
    import lorakit
    from lorakit.train.run import load_data
    from lorakit.transfer.discriminator import prepare_source

    try:
        task = load_data(data, seed=seed)
        seed_examples = _seeds(seeds, task.labels)
        src, stok = load_base(source_model)
        lorakit.load(src, source_adapter)
        folder, disc = prepare_source(source_adapter, src, stok, task.train, seed_examples, kind=kind, n_real=n_real,
                                      input_name=input_name, max_new_tokens=max_new_tokens, seed=seed, steps=steps,
                                      progress=True)
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"discriminator ({kind}): {disc.info.get('n_real')} real vs {disc.info.get('n_fake')} synthetic, "
               f"train accuracy {disc.info.get('train_accuracy')}\nsaved: {folder}\nwhat leaves the client: the "
               f"adapter folder (with this discriminator) and {seeds}")
