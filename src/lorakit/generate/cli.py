"""`lorakit generate-adapter fit|sample|bank`: parameter generators from the command line.

    lorakit generate-adapter fit BANK --method sg_lora --out GEN/           # BANK: a bank folder or task folders
    lorakit generate-adapter sample GEN/ --description "nouns denoting plants" --out ADAPTER/
    lorakit generate-adapter bank TASK_DIR... --out BANK/                  # task folders of checkpoints -> bank

The method names and their arguments come from the catalog's ``generate`` axis (``lorakit methods
--axis generate``); ``--method-arg k=v`` is typed against the method's ``Args``.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Annotated, Any

import typer

generate_app = typer.Typer(no_args_is_help=True, add_completion=False,
                           help="Adapters for a new task from a description: fit a parameter generator on a bank "
                                "of trained checkpoints, then sample PEFT adapters from it.")


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _read_bank(paths: list[Path]) -> Any:
    from lorakit.generate.bank import BANK_JSON, CheckpointBank

    if len(paths) == 1 and (paths[0] / BANK_JSON).is_file():
        return CheckpointBank.load(paths[0])
    return CheckpointBank.from_folders(paths)


def _generator_classes() -> dict[str, Any]:
    from lorakit.core import registry

    return {n: registry.get("generate", n) for n in registry.names("generate")}


@generate_app.command("bank")
def bank_cmd(task_dirs: Annotated[list[Path], typer.Argument(help="task folders: adapter checkpoint folders "
                                                                  "+ optional task.json {task_id, description}")],
             out: Annotated[Path, typer.Option(help="bank folder to write")]) -> None:
    """Flatten the checkpoints of several task folders into one bank (aligned vectors + descriptions)."""
    from lorakit.generate.bank import CheckpointBank

    try:
        bank = CheckpointBank.from_folders(task_dirs)
    except ValueError as e:
        _fail(str(e))
    bank.save(out)
    typer.echo(f"bank: {len(bank.tasks)} task(s), {sum(len(t.vectors) for t in bank.tasks)} checkpoint(s), "
               f"D={bank.layout.dim} -> {out}")


@generate_app.command("fit")
def fit_cmd(bank_paths: Annotated[list[Path], typer.Argument(metavar="BANK...", help="a bank folder, or task folders")],
            out: Annotated[Path, typer.Option(help="generator folder to write")],
            method: Annotated[str, typer.Option(help="generator of the catalog's generate axis")] = "sg_lora",
            encoder: Annotated[str, typer.Option(help="text encoder of the task descriptions")] = "minilm",
            steps: Annotated[int, typer.Option(min=1)] = 500,
            lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
            seed: int = 0,
            holdout: Annotated[list[str] | None, typer.Option(help="task ids to leave out of fitting")] = None,
            method_arg: Annotated[list[str] | None, typer.Option("--method-arg", help="k=v, the method's Args")] = None,
            ) -> None:
    """Fit a parameter generator on a bank; conditions are the text embeddings of the task descriptions."""
    from lorakit.core.registry import UnknownMethodError
    from lorakit.core.spec import parse_kv
    from lorakit.generate.base import Generator
    from lorakit.generate.conditions import text_encoder

    try:
        classes = _generator_classes()
        if method not in classes or not issubclass(classes[method], Generator):
            known = [n for n, c in classes.items() if isinstance(c, type) and issubclass(c, Generator)]
            raise UnknownMethodError(f"unknown parameter generator {method!r}; known: {', '.join(known)}")
        cls = classes[method]
        args = parse_kv(cls.Args, method_arg or [], owner=f"generator {method!r}")
        bank = _read_bank(bank_paths)
        if holdout:
            bank = bank.without(holdout)
        if any(not d for d in bank.descriptions):
            raise ValueError("every task needs a description (task.json 'description') to fit on text conditions")
        t0 = time.perf_counter()
        typer.echo(f"encoding {len(bank.tasks)} task description(s) with {encoder}")
        conditions = text_encoder(encoder).encode(bank.descriptions)
        gen = cls.for_embeddings(bank.layout, conditions.shape[1], encoder, **args)
        accepted = inspect.signature(gen.fit).parameters
        extra = {k: v for k, v in {"steps": steps, "lr": lr, "seed": seed, "progress": True}.items() if k in accepted}
        report = gen.fit(bank, conditions, **extra) or {}
    except (ValueError, UnknownMethodError) as e:
        _fail(str(e))
    gen.save(out)
    losses = report.get("losses") or report.get("loss") or []
    last = f"; final loss {losses[-1]:.4g}" if isinstance(losses, list) and losses else ""
    typer.echo(f"{method}: fitted on {len(bank.tasks)} task(s) × {sum(len(t.vectors) for t in bank.tasks)} "
               f"checkpoint(s), D={bank.layout.dim}{last}; generator {gen.nbytes() / 1e6:.2f} MB vs bank "
               f"{bank.nbytes() / 1e6:.2f} MB; {time.perf_counter() - t0:.1f} s -> {out}")


@generate_app.command("sample")
def sample_cmd(generator: Annotated[Path, typer.Argument(help="generator folder (from `fit`)")],
               out: Annotated[Path, typer.Option(help="adapter folder to write (PEFT layout)")],
               description: Annotated[str, typer.Option(help="the new task in one line")],
               seed: int = 0,
               mode: Annotated[str, typer.Option(help="sample: z from the (conditional) prior; mean: its mean")
                               ] = "sample",
               base_model_name: Annotated[str | None, typer.Option(help="base_model_name_or_path in the PEFT config")
                                          ] = None,
               ) -> None:
    """Generate one PEFT adapter for a task described in words."""
    from lorakit.generate.base import load_generator
    from lorakit.io.peft import save_state

    if mode not in ("sample", "mean"):
        _fail(f"unknown mode {mode!r}; known: sample, mean")
    if not description.strip():
        _fail("--description is empty")
    try:
        gen = load_generator(generator)
        state = gen.generate(description=description, seed=seed, mode=mode)
    except ValueError as e:
        _fail(str(e))
    save_state(state, out, base_model_name=base_model_name)
    typer.echo(f"{gen.name}: adapter with {state.num_params():,} parameters for {description!r} "
               f"(mode={mode}, seed={seed}) -> {out}")
