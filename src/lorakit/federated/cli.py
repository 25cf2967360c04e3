"""`lorakit fed ...`: federated LoRA from the command line (registered by lorakit.cli as one group)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from lorakit.core import registry

# names and help come from the catalog, so this file names no aggregator
fed_app = typer.Typer(no_args_is_help=True, add_completion=False,
                      help="Federated LoRA on Flower: aggregators of the catalog's 'federated' axis "
                           "(`lorakit methods --axis federated`); DP-SGD clients.")

ENGINES = ("flower", "local")


def _config(values: dict[str, Any], options: list[str] | None, method_args: list[str] | None = None) -> Any:
    """The FedConfig of a command: its options, then ``-o key=value``, then ``--method-arg k=v``."""
    from lorakit.federated.args import split_kv
    from lorakit.federated.config import FedConfig

    try:
        extra: dict[str, Any] = split_kv(options, "--option")
        given = {k: v for k, v in values.items() if v is not None}  # None: not given, the config's default
        merged = {**given, **extra}
        if method_args:
            # --method-arg values are typed by FedConfig against the aggregator's Args fields
            dotted = {f"method_args.{k}": v for k, v in split_kv(method_args, "--method-arg").items()}
            merged.update(dotted)
        return FedConfig.from_mapping(merged)
    except ValueError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


Method = Annotated[str | None, typer.Option(
    help=f"aggregator: {' | '.join(registry.names('federated'))} (default: the first)")]
MethodArgs = Annotated[list[str] | None, typer.Option(
    "--method-arg", help="a field of the aggregator's Args as key=value (repeatable), e.g. the solver's steps")]
Clients = Annotated[int, typer.Option(help="number of clients (non-IID partitions of the data)")]
Rounds = Annotated[int, typer.Option(help="federated rounds")]
Model = Annotated[str, typer.Option(help="'smollm2' (embedded) or a local HF model dir / .gguf")]
Data = Annotated[str, typer.Option(help="bundled task name or a CSV/JSONL file")]
LocalSteps = Annotated[int, typer.Option(help="optimizer steps per client per round")]
BatchSize = Annotated[int, typer.Option(help="local batch size (expected Poisson batch under DP)")]
Lr = Annotated[float, typer.Option(help="local learning rate (AdamW)")]
Rank = Annotated[int, typer.Option("--rank", "-r", help="LoRA rank")]
Alpha = Annotated[float, typer.Option(help="LoRA alpha (scale alpha/r)")]
Ranks = Annotated[str, typer.Option(help="per-client ranks, comma list cycled over clients (aggregators with "
                                           "heterogeneous ranks)")]
Targets = Annotated[str, typer.Option(help="comma list of module names, all-linear, or re:REGEX")]
Dirichlet = Annotated[float, typer.Option(help="Dirichlet concentration of the label-skewed split")]
NTrain = Annotated[int, typer.Option(help="training examples to split over clients (0: all)")]
NEval = Annotated[int, typer.Option(help="server-side eval examples")]
MaxLength = Annotated[int, typer.Option(help="max tokens per example")]
Dp = Annotated[bool, typer.Option(help="DP-SGD on every client (opacus: per-sample clipping + noise)")]
DpNoise = Annotated[float, typer.Option(help="DP noise multiplier sigma")]
DpClip = Annotated[float, typer.Option(help="DP per-sample gradient norm bound C")]
DpDelta = Annotated[float, typer.Option(help="DP delta for the reported epsilon")]
Seed = Annotated[int, typer.Option(help="seed of split, adapters, sampling and noise")]
Out = Annotated[Path, typer.Option(help="output folder")]
Options = Annotated[list[str] | None, typer.Option("--option", "-o",
                                                   help="any other FedConfig field as key=value (repeatable)")]


@fed_app.command("simulate")
def simulate(
    clients: Clients = 10, rounds: Rounds = 3, method: Method = None, method_arg: MethodArgs = None,
    engine: Annotated[str, typer.Option(help="flower (Flower's simulation engine, Ray) or local (one process)")]
    = "flower",
    model: Model = "smollm2", data: Data = "sentiment", local_steps: LocalSteps = 5, batch_size: BatchSize = 8,
    lr: Lr = 1e-3, rank: Rank = 8, alpha: Alpha = 16.0, ranks: Ranks = "", targets: Targets = "q_proj,v_proj",
    dirichlet_alpha: Dirichlet = 0.5, n_train: NTrain = 0, n_eval: NEval = 200, max_length: MaxLength = 128,
    dp: Dp = False, dp_noise: DpNoise = 1.0, dp_clip: DpClip = 1.0, dp_delta: DpDelta = 1e-5, seed: Seed = 0,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs for the simulation (default: all)")] = None,
    out: Out = Path("runs/fed"), option: Options = None,
) -> None:
    """Run a federated fine-tuning on one machine: Flower's simulation engine (default) or a plain loop."""
    values = {k: v for k, v in locals().items() if k not in ("engine", "num_cpus", "option", "method_arg")}
    values["out"] = str(out)
    cfg = _config(values, option, method_arg)
    if engine not in ENGINES:
        typer.secho(f"error: --engine must be one of {ENGINES}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if engine == "flower":
        try:
            from lorakit.federated.flower import simulate as flower_simulate
        except ImportError as e:
            typer.secho(f"error: {e} (or use --engine local)", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        result = flower_simulate(cfg, num_cpus=num_cpus)
    else:
        from lorakit.federated.run import run_local

        result = run_local(cfg)
    _print(result.summary(), out)


def _print(summary: dict[str, Any], out: Path) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    gap = summary.get("gap_mean")
    eps = summary.get("epsilon")
    per_round = [b for b in summary.get("bytes_per_round", []) if b]
    typer.echo(f"\n{summary['method']}{' +DP' if summary['dp'] else ''} on {summary['engine']}: "
               f"{summary['metric_name']} {fmt(summary['metric_before'])} -> {fmt(summary['metric_final'])}; "
               f"aggregation gap {'n/a' if gap is None else f'{gap:.2e}'}; "
               f"{(sum(per_round) / len(per_round) / 1e6) if per_round else 0:.2f} MB/round"
               + (f"; epsilon {eps:.2f}" if eps is not None else "") + f"  ({summary['seconds']:.0f} s)")
    if summary.get("method_args"):
        typer.echo(f"{summary['method']} args: {_args_text(summary['method_args'])}")
    typer.echo(f"fed_summary.json, metric.png and the global adapter in {out}")


def _args_text(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


@fed_app.command("app")
def write_app(
    out: Annotated[Path, typer.Argument(help="folder of the Flower app to write")],
    clients: Clients = 10, rounds: Rounds = 3, method: Method = None, method_arg: MethodArgs = None,
    model: Model = "smollm2",
    data: Data = "sentiment", local_steps: LocalSteps = 5, batch_size: BatchSize = 8, lr: Lr = 1e-3,
    rank: Rank = 8, alpha: Alpha = 16.0, ranks: Ranks = "", targets: Targets = "q_proj,v_proj",
    dirichlet_alpha: Dirichlet = 0.5, n_train: NTrain = 0, n_eval: NEval = 200, max_length: MaxLength = 128,
    dp: Dp = False, dp_noise: DpNoise = 1.0, dp_clip: DpClip = 1.0, dp_delta: DpDelta = 1e-5, seed: Seed = 0,
    results: Annotated[Path, typer.Option(help="where the ServerApp writes its results")] = Path("runs/fed"),
    option: Options = None,
) -> None:
    """Write a Flower app folder for `flwr run` (simulation or deployment engine; see docs/federated.md)."""
    values = {k: v for k, v in locals().items() if k not in ("out", "results", "option", "method_arg")}
    values["out"] = str(results.resolve())
    cfg = _config(values, option, method_arg)
    try:
        from lorakit.federated.flower import write_app as write
    except ImportError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    d = write(out, cfg)
    typer.echo(f"Flower app written to {d}/pyproject.toml (run config: {len(cfg.to_run_config())} keys)")
    typer.echo("deployment on localhost (see docs/federated.md):\n"
               "  flower-superlink --insecure --disable-runtime-dependency-installation &\n"
               f"  flower-supernode --insecure --superlink 127.0.0.1:8000 --port 9094 "
               f"--node-config 'partition-id=0 num-partitions={cfg.clients}' &   # one per client, own --port\n"
               f"  flwr run {d} deploy --stream")


@fed_app.command("show")
def show(summary: Annotated[Path, typer.Argument(help="a run folder or its fed_summary.json")]) -> None:
    """Print the per-round table of a finished run."""
    path = summary / "fed_summary.json" if summary.is_dir() else summary
    if not path.is_file():
        typer.secho(f"error: {path} not found", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    s = json.loads(path.read_text())
    typer.echo(f"{s.get('method', '?')}({_args_text(s.get('method_args') or {})}) on {s.get('engine', '?')}")
    typer.echo(f"{'round':>5} {'accepted':>8} {'rejected':>8} {'failed':>6} {'gap':>10} {'MB':>8} "
               f"{s['metric_name']:>10}")
    for r in s["rounds"]:
        m = (r.get("eval") or {}).get(s["metric_name"])
        gap = (r.get("gap") or {}).get("relative")
        typer.echo(f"{r['round']:>5} {len(r['accepted']):>8} {len(r['rejected']):>8} {len(r['failed']):>6} "
                   f"{'-' if gap is None else f'{gap:.2e}':>10} {r['traffic'].get('total_bytes', 0) / 1e6:>8.2f} "
                   f"{'-' if m is None else f'{m:.4f}':>10}")
    for r in s["rounds"]:
        for cid, why in r["rejected"].items():
            typer.echo(f"round {r['round']}: rejected {cid}: {why}", err=True)


if __name__ == "__main__":  # pragma: no cover
    fed_app(sys.argv[1:])
