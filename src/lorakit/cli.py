"""`lorakit` command line: quickstart, train, eval, generate, methods, inspect."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="lorakit: LoRA adapters for PyTorch and Hugging Face models, PEFT-format compatible.")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "bad input" (adapter files, method names, values): exit 2 with one line, no traceback.
    AdapterFileError and BaseMismatchError are ValueErrors; UnknownMethodError is a KeyError."""
    from lorakit.core.registry import UnknownMethodError

    return (ValueError, UnknownMethodError, FileNotFoundError)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _parse_kv(items: list[str] | None, what: str) -> dict[str, Any]:
    """k=v pairs; values parsed as JSON when possible (numbers, booleans, lists), else strings."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"{what} expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _targets(value: str) -> str | list[str]:
    if value == "all-linear" or value.startswith("re:"):
        return value.removeprefix("re:")
    return [t.strip() for t in value.split(",") if t.strip()]


def _print_summary(summary: dict[str, Any]) -> None:
    name = summary["metric_name"]
    before, after = summary.get("metric_before"), summary.get("metric_after")
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    majority = summary.get("majority_baseline")
    baseline = f"; majority class {majority:.4f}" if name == "accuracy" and majority else ""
    typer.echo(f"\n{name}: {fmt(before)} -> {fmt(after)}   "
               f"(train {summary['train_seconds']:.0f}s, {summary['steps']} steps, "
               f"{summary['trainable_params']:,} trainable params{baseline})")
    typer.echo(f"adapter + summary.json + curves.png in {summary['adapter_dir']}")


@app.command()
def quickstart(
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 80,
    out: Annotated[Path, typer.Option(help="run dir: adapter, summary.json, curves")] = Path("runs/quickstart"),
    threads: Annotated[int | None, typer.Option(help="torch threads (default: $LORAKIT_THREADS or torch's)")] = None,
    n_eval: Annotated[int, typer.Option(help="eval examples before and after")] = 300,
) -> None:
    """Fine-tune the embedded SmolLM2-135M-Instruct on 3-class tweet sentiment with LoRA (r=8, q/v)."""
    from lorakit.core.spec import AdapterSpec
    from lorakit.train.run import finetune
    from lorakit.train.trainer import TrainConfig

    spec = AdapterSpec(form="lora", form_args={"r": 8, "alpha": 16}, targets=["q_proj", "v_proj"])
    config = TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=5, schedule="cosine",
                         out_dir=str(out), save_every=max(steps // 4, 10), seed=0)
    _print_summary(finetune(data="sentiment", spec=spec, config=config, n_eval=n_eval, threads=threads))


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[str, typer.Option(help="task name (`lorakit tasks`) or a CSV/JSONL file")] = "sentiment",
    model: Annotated[str | None, typer.Option(
        help="embedded model (smollm2, minilm), local HF model dir or .gguf; default: embedded SmolLM2")] = None,
    head: Annotated[str | None, typer.Option(
        help="lm (label words scored by the LM head) | seq_cls (a new classification head); "
             "default: seq_cls for --model minilm, else lm")] = None,
    modules_to_save: Annotated[str | None, typer.Option(
        help="comma list of modules trained as full copies (PEFT's modules_to_save); "
             "default with --head seq_cls: the head (classifier or score)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file with any of these options (CLI wins)")] = None,
    form: Annotated[str, typer.Option(help="adapter form (see `lorakit methods`)")] = "lora",
    init: Annotated[str, typer.Option(help="initialization")] = "default",
    targets: Annotated[str, typer.Option(
        help="comma list of module names, all-linear, or re:REGEX (--model minilm: query,value)")] = "q_proj,v_proj",
    rank: Annotated[int | None, typer.Option("--rank", "-r", help="rank r")] = 8,
    alpha: Annotated[float | None, typer.Option(help="alpha (scale = alpha/r)")] = 16.0,
    dropout: Annotated[float | None, typer.Option(help="adapter dropout")] = None,
    rslora: Annotated[bool, typer.Option(help="scale alpha/sqrt(r)")] = False,
    form_arg: Annotated[list[str] | None, typer.Option(help="extra form argument k=v (repeatable)")] = None,
    init_arg: Annotated[list[str] | None, typer.Option(help="init argument k=v (repeatable)")] = None,
    strategy: Annotated[list[str] | None, typer.Option(help="training strategy (repeatable)")] = None,
    strategy_arg: Annotated[list[str] | None, typer.Option(help="strategy argument NAME.k=v or k=v")] = None,
    lr: Annotated[float, typer.Option(help="learning rate")] = 1e-3,
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 100,
    batch_size: Annotated[int, typer.Option(help="micro-batch size per process")] = 8,
    grad_accum: Annotated[int, typer.Option(help="gradient accumulation steps")] = 1,
    schedule: Annotated[str, typer.Option(help="cosine | linear | constant")] = "cosine",
    warmup_steps: Annotated[int | None, typer.Option(help="warmup steps (default 5% of steps)")] = None,
    max_grad_norm: Annotated[float, typer.Option(help="gradient clipping (0 = off)")] = 1.0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = 0.0,
    max_length: Annotated[int, typer.Option(help="max tokens per example")] = 128,
    n_train: Annotated[int | None, typer.Option(help="use at most this many training examples")] = None,
    n_eval: Annotated[int | None, typer.Option(help="eval examples (default 10%, at most 500)")] = None,
    eval_every: Annotated[int, typer.Option(help="eval every N steps (0: before/after only)")] = 0,
    save_every: Annotated[int, typer.Option(help="checkpoint every N steps (0: none)")] = 0,
    seed: Annotated[int, typer.Option(help="seed for data order and adapter init")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
    out: Annotated[Path, typer.Option(help="run dir")] = Path("runs/train"),
    allow_config_change: Annotated[bool, typer.Option(
        help="resume although the config differs from the checkpointed run's (recorded in train_spec.json)",
    )] = False,
    precision: Annotated[str, typer.Option(
        help="fp32 | bf16 | fp16 (autocast; adapter weights stay fp32; fp16 with loss scaling)")] = "fp32",
    gradient_checkpointing: Annotated[bool, typer.Option(
        help="recompute activations in backward (HF models; not with a mixing/mixed-batch context)")] = False,
    quantize: Annotated[str | None, typer.Option(
        help="nf4 | fp4 | int8: load the base 4-/8-bit through bitsandbytes (QLoRA; the `quantize` extra)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: CUDA when available)")] = "auto",
) -> None:
    """Fine-tune an adapter; resumes from the run dir's latest checkpoint if there is one (a resume with
    another config is refused, listing the differences, unless --allow-config-change).

    --rank/--alpha/--dropout/--rslora fill only the forms that have r/alpha/...
    (an explicit one for a form without it is an error); --form-arg r=.. wins.

    --form-arg/--init-arg/--strategy-arg k=v are parsed to the argument's type.
    --strategy-arg NAME.k=v goes to strategy NAME; a bare k=v goes to every
    listed strategy that has k. In the YAML --config file these take a list of
    "k=v" strings or a mapping (strategy_arg also {NAME: {k: v}}).
    """
    from lorakit.core import registry
    from lorakit.core.registry import UnknownMethodError
    from lorakit.core.spec import AdapterSpec, TrainSpec, validate_spec
    from lorakit.models import HEADS, embedded_model
    from lorakit.strategies.base import check_stack
    from lorakit.train.run import RunSetupError, finetune
    from lorakit.train.trainer import TrainConfig

    cli = {k: v for k, v in locals().items() if k not in _TRAIN_LOCALS}
    explicit = {k for k in cli if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"}
    if config is not None:
        cli, from_yaml = _merge_yaml(ctx, config, cli)
        explicit |= from_yaml
    try:
        form_cls = registry.get("form", cli["form"])
        init_cls = registry.get("init", cli["init"])
        names = [cli["strategy"]] if isinstance(cli["strategy"], str) else cli["strategy"] or []  # YAML: one name
        strategy_classes = {name: registry.get("strategy", name) for name in names}
        form_args = _form_args(form_cls, cli, explicit)
        init_args = parse_method_args(init_cls, cli["init_arg"], owner=f"init {init_cls.name!r}")
        strategy_args = _strategy_args(strategy_classes, cli["strategy_arg"])
        if len(strategy_classes) != len(names):
            raise ValueError(f"strategy listed twice in --strategy {names}")
        strategies = [cls(**strategy_args[name]) for name, cls in strategy_classes.items()]
        check_stack(strategies)  # refuse exclusive pairs here, with exit code 2, before a model loads
        embedded = embedded_model(cli["model"])
        head = cli["head"] or (embedded.heads[0] if embedded is not None else "lm")
        if head not in HEADS:
            raise ValueError(f"unknown --head {head!r}; known: {', '.join(HEADS)}")
        if embedded is not None and head not in embedded.heads:
            raise ValueError(f"--model {embedded.name} ({embedded.description}) has no {head!r} head; "
                             f"use --head {' or '.join(embedded.heads)}")
        targets = cli["targets"]
        if "targets" not in explicit and embedded is not None:
            targets = list(embedded.targets)  # the embedded model's attention projections
        saved = _names(cli["modules_to_save"], "--modules-to-save")
        spec = AdapterSpec(form=cli["form"], form_args=form_args, init=cli["init"], init_args=init_args,
                           targets=_targets(targets) if isinstance(targets, str) else targets,
                           modules_to_save=saved)
        validate_spec(spec)  # bad form/init values (e.g. k > r) exit 2 here, before a model loads
    except (UnknownMethodError, ValueError) as e:
        _fail(str(e))
    try:  # bad trainer values (an unknown --precision) exit 2 here
        tc = TrainConfig(steps=cli["steps"], batch_size=cli["batch_size"], grad_accum=cli["grad_accum"],
                         lr=cli["lr"], weight_decay=cli["weight_decay"], warmup_steps=cli["warmup_steps"],
                         schedule=cli["schedule"], max_grad_norm=cli["max_grad_norm"] or None,
                         eval_every=cli["eval_every"], save_every=cli["save_every"], seed=cli["seed"],
                         out_dir=str(cli["out"]), allow_config_change=bool(cli["allow_config_change"]),
                         precision=cli["precision"], gradient_checkpointing=bool(cli["gradient_checkpointing"]),
                         quantize=cli["quantize"] or None, device=str(cli["device"]))
    except ValueError as e:
        _fail(str(e))
    train_spec = TrainSpec.for_run(strategies, tc, init=spec.init, init_args=init_args, seed=cli["seed"],
                                   data=str(cli["data"]))
    try:
        summary = finetune(model=cli["model"], data=cli["data"], spec=spec, config=tc, strategies=strategies,
                           n_train=cli["n_train"], n_eval=cli["n_eval"], max_length=cli["max_length"],
                           threads=cli["threads"], adapter_seed=cli["seed"], train_spec=train_spec, head=head)
    except (RunSetupError, FileNotFoundError, ValueError) as e:  # data, model, head, adapter, precision that
        _fail(str(e))                                              # do not fit together, named by lorakit
    _print_summary(summary)


_TRAIN_LOCALS = ("ctx", "registry", "UnknownMethodError", "AdapterSpec", "TrainSpec", "validate_spec", "check_stack",
                 "finetune", "TrainConfig", "HEADS", "embedded_model", "RunSetupError")


def _names(value: str | list[str] | None, what: str) -> list[str]:
    """A comma list (or a YAML list) of module names."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(n, str) for n in items):
        raise ValueError(f"{what} expects a comma list of module names, got {value!r}")
    return [n.strip() for n in items if n.strip()]


# CLI shortcut option -> the form field it fills (only where the form's Args has that field)
_FORM_SHORTCUTS = {"rank": "r", "alpha": "alpha", "dropout": "dropout", "rslora": "rslora"}


def parse_method_args(cls: Any, items: Any, *, owner: str) -> dict[str, Any]:
    """``--*-arg k=v`` items (or a YAML mapping) typed by ``cls.Args``."""
    from lorakit.core.spec import parse_kv

    return parse_kv(cls.Args, items, owner=owner)


def _form_args(form_cls: Any, cli: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The form's args: shortcuts where its Args has the field, then ``--form-arg`` (which wins)."""
    import dataclasses

    fields = [f.name for f in dataclasses.fields(form_cls.Args)]
    given = parse_method_args(form_cls, cli["form_arg"], owner=f"form {form_cls.name!r}")
    out: dict[str, Any] = {}
    for option, field_name in _FORM_SHORTCUTS.items():
        value = cli[option]
        if value is None or value is False or field_name in given:  # unset, off, or said otherwise
            continue
        if field_name in fields:
            out[field_name] = value
        elif option in explicit:  # a default is silently skipped; an explicit choice must not be
            raise ValueError(f"form {form_cls.name!r} has no argument {field_name!r} (set by --{option}); "
                             f"its arguments: {fields}")
    return {**out, **given}


def _kv_pairs(items: Any, what: str) -> list[tuple[str, Any]]:
    """``["k=v", ...]`` or a mapping (YAML) as (key, raw value) pairs; ``{NAME: {k: v}}`` -> ``NAME.k``."""
    if isinstance(items, dict):
        pairs: list[tuple[str, Any]] = []
        for k, v in items.items():
            if isinstance(v, dict):
                pairs += [(f"{k}.{kk}", vv) for kk, vv in v.items()]
            else:
                pairs.append((str(k), v))
        return pairs
    pairs = []
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} expects key=value, got {item!r}")
        pairs.append((key.strip(), value))
    return pairs


def _strategy_args(classes: dict[str, Any], items: Any) -> dict[str, dict[str, Any]]:
    """Route ``--strategy-arg`` values: ``NAME.k=v`` to strategy NAME, a bare ``k=v`` to every listed
    strategy whose Args has ``k``; each strategy's values are then typed by its Args."""
    import dataclasses

    fields = {n: [f.name for f in dataclasses.fields(c.Args)] for n, c in classes.items()}
    per: dict[str, dict[str, Any]] = {n: {} for n in classes}
    for key, value in _kv_pairs(items, "--strategy-arg"):
        name, dot, arg = key.partition(".")
        if dot:
            if name not in per:
                raise ValueError(f"--strategy-arg {key}: strategy {name!r} is not among --strategy {list(classes)}")
            per[name][arg] = value
            continue
        takers = [n for n in classes if key in fields[n]]
        if not takers:
            if not classes:
                raise ValueError(f"--strategy-arg {key}=...: no --strategy given")
            raise ValueError(f"--strategy-arg {key}: no strategy in {list(classes)} has argument {key!r}; "
                             f"their arguments: {fields}")
        for n in takers:
            per[n][key] = value
    return {n: parse_method_args(classes[n], per[n], owner=f"strategy {n!r}") for n in classes}


def _merge_yaml(ctx: typer.Context, path: Path, cli: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """Options from YAML, overridden by options given explicitly on the command line; also the names the
    YAML file set (they count as the user's explicit choices)."""
    import yaml

    if not path.is_file():
        _fail(f"config file not found: {path}")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        _fail(f"{path}: expected a mapping of option names to values")
    loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
    unknown = set(loaded) - set(cli)
    if unknown:
        _fail(f"{path}: unknown option(s) {sorted(unknown)}; known: {sorted(set(cli) - {'config'})}")
    explicit = {k for k in cli if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"}
    merged = dict(cli)
    for k, v in loaded.items():
        if k not in explicit:
            merged[k] = Path(v) if k == "out" else v
    return merged, set(loaded) - explicit


@app.command("eval")
def evaluate(
    adapter: Annotated[Path | None, typer.Option(help="adapter dir (lorakit or PEFT); none = base model")] = None,
    data: Annotated[str, typer.Option(help="task name or data file")] = "sentiment",
    model: Annotated[str | None, typer.Option(
        help="base model; default: the one a classifier adapter records, else embedded SmolLM2")] = None,
    head: Annotated[str | None, typer.Option(help="lm | seq_cls; default: what the adapter was trained with")] = None,
    n_eval: Annotated[int | None, typer.Option(help="eval examples (default 10%, at most 500)")] = None,
    max_length: Annotated[int | None, typer.Option(help="max tokens per example (default: the run's, or 128)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the train/eval split")] = 0,
    threads: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Evaluate the base model or base + adapter on a task's eval split.

    A classification-head adapter (--head seq_cls runs) is evaluated on its base rebuilt with the same head.
    """
    from lorakit.core.state import AdapterFileError
    from lorakit.models import set_threads
    from lorakit.train.run import RunSetupError, evaluate_adapter

    set_threads(threads)
    try:
        metrics = evaluate_adapter(adapter, data=data, model=model, head=head, n_eval=n_eval,
                                   max_length=max_length, seed=seed)
    except (RunSetupError, AdapterFileError, *_user_errors()) as e:
        _fail(_one_line(e))
    typer.echo(json.dumps(metrics, indent=2))


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt")],
    adapter: Annotated[Path | None, typer.Option(help="adapter dir")] = None,
    model: Annotated[str | None, typer.Option(help="base model")] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    chat: Annotated[bool, typer.Option(help="wrap the prompt in the model's chat template")] = True,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Generate text with the base model or base + adapter (streams tokens as they come)."""
    import torch
    from transformers import TextStreamer

    import lorakit
    from lorakit.models import load_model

    torch.manual_seed(seed)
    base, tok = load_model(model)
    if adapter is not None:
        try:
            lorakit.load(base, adapter)
        except _user_errors() as e:
            _fail(_one_line(e))
    text = prompt
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=not chat)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = temperature
    with torch.no_grad():
        base.eval().generate(**enc, max_new_tokens=max_new_tokens, streamer=streamer,
                             pad_token_id=tok.pad_token_id, **kwargs)


@app.command()
def methods(
    axis: Annotated[str | None, typer.Option(help="only this axis")] = None,
    markdown: Annotated[bool, typer.Option(help="print a Markdown table (the README's method table)")] = False,
) -> None:
    """Every method in the catalog with its paper, arXiv id and capabilities."""
    from lorakit.core import registry
    from lorakit.core.caps import describe
    from lorakit.core.catalog import AXES

    rows = sorted(registry.entries(axis), key=lambda e: AXES.index(e.axis))
    if markdown:
        typer.echo("| axis | name | paper | arXiv | capabilities / requirements | PEFT type |")
        typer.echo("|---|---|---|---|---|---|")
    else:
        typer.echo(f"{'axis':<10} {'name':<12} {'arXiv':<24} {'capabilities':<50} paper")
    for e in rows:
        peft_type = None
        try:
            obj = registry.get(e.axis, e.name)
            caps = describe(getattr(obj, "caps", None) or getattr(obj, "requires", None) or _none_caps())
            peft_type = getattr(obj, "peft_type", None)
        except Exception as exc:  # a broken optional method must not hide the rest of the table
            caps = f"(unavailable: {type(exc).__name__})"
        if markdown:
            caps = caps.replace(",", ", ")
            typer.echo(f"| {e.axis} | `{e.name}` | {e.paper} | {e.arxiv} | {caps} | {peft_type or '-'} |")
        else:
            typer.echo(f"{e.axis:<10} {e.name:<12} {e.arxiv:<24} {caps:<50} {e.paper}")
    if not markdown:
        typer.echo(f"\n{len(rows)} methods")


def _none_caps():
    from lorakit.core.caps import Cap

    return Cap.NONE


@app.command()
def tasks() -> None:
    """Bundled tasks with their sizes, sources and licenses."""
    from lorakit.data import list_tasks, load_task

    for name in list_tasks():
        try:
            t = load_task(name)
            typer.echo(f"{t.summary()}\n    source: {t.source}\n    license: {t.license}")
        except Exception as exc:  # a task whose package is missing still gets listed with the reason
            typer.echo(f"{name}: unavailable ({exc})")


@app.command()
def inspect(adapter_dir: Annotated[Path, typer.Argument(help="adapter folder (lorakit or PEFT)")]) -> None:
    """Show an adapter's spec, modules, ranks, sizes and the base it was made for."""
    from lorakit.core.state import AdapterFileError
    from lorakit.io.peft import load_state

    try:
        state = load_state(adapter_dir)
    except (AdapterFileError, *_user_errors()) as e:
        _fail(_one_line(e))
    by_module = state.by_module()
    typer.echo(f"adapter:  {adapter_dir}")
    typer.echo(f"form:     {state.spec.form}  args={state.spec.form_args}")
    typer.echo(f"init:     {state.spec.init}  targets={state.spec.targets}")
    if state.spec.module_args:
        typer.echo(f"per-module args: {state.spec.module_args}")
    typer.echo(f"base:     {({k: v for k, v in state.base.items() if k != 'weight_stats'})}")
    typer.echo(f"source:   {state.meta.get('source', 'lorakit')}")
    typer.echo(f"modules:  {len(by_module)}   tensors: {len(state.tensors)}   "
               f"parameters: {state.num_params():,}   "
               f"size: {sum(t.numel() * t.element_size() for t in state.tensors.values()) / 1e6:.2f} MB")
    for path in list(by_module)[:8]:
        shapes = ", ".join(f"{n}{tuple(t.shape)}" for n, t in by_module[path].items())
        typer.echo(f"  {path}: {shapes}")
    if len(by_module) > 8:
        typer.echo(f"  ... {len(by_module) - 8} more")
    train_spec = _read_train_spec(adapter_dir)
    if train_spec is not None:
        t = train_spec.trainer
        typer.echo(f"training: init={train_spec.init} {train_spec.init_args}  data={train_spec.data}  "
                   f"seed={train_spec.seed}  lorakit {train_spec.lorakit_version}")
        typer.echo("          " + "  ".join(f"{k}={t[k]}" for k in _TRAINER_SHOWN if k in t))
        for name, args in train_spec.strategies or (("(none)", {}),):
            typer.echo(f"strategy: {name}  args={args}")


_TRAINER_SHOWN = ("steps", "batch_size", "grad_accum", "lr", "schedule", "warmup_steps", "weight_decay",
                  "max_grad_norm", "objective")


def _read_train_spec(run_dir: Path) -> Any:
    """The run's TrainSpec from ``train_spec.json`` (or ``summary.json``), None when the folder has neither."""
    from lorakit.core.spec import TrainSpec
    from lorakit.core.state import AdapterFileError, read_json

    for name, key in (("train_spec.json", None), ("summary.json", "train_spec")):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            data = read_json(path, finite=False)  # the adapter folder's rules: regular file, size and depth caps
        except AdapterFileError as e:
            _fail(f"{path}: not a valid training spec ({_one_line(e).removeprefix(f'{path}: ')})")
        try:
            data = data.get(key) if key else data
            if data:
                return TrainSpec.from_dict(data)
        except (json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
            _fail(f"{path}: not a valid training spec ({e})")
    return None


@app.command()
def export(
    adapter_dir: Annotated[Path, typer.Argument(help="adapter folder of any mergeable form")],
    out: Annotated[Path, typer.Option(help="output folder (a plain PEFT LoRA)")],
    rank: Annotated[int, typer.Option(help="rank of the exported LoRA")] = 16,
    model: Annotated[str | None, typer.Option(help="base model the adapter was made for")] = None,
) -> None:
    """Export an adapter whose form PEFT lacks to a plain PEFT LoRA (truncated SVD of ΔW)."""
    import lorakit
    from lorakit.io.export import export_lora
    from lorakit.io.peft import save_state
    from lorakit.models import load_model

    try:
        base, _ = load_model(model)
        lorakit.load(base, adapter_dir)
        state, report = export_lora(base, "default", rank)
        save_state(state, out)
    except _user_errors() as e:
        _fail(_one_line(e))
    worst = max(report.per_module.items(), key=lambda kv: kv[1])
    typer.echo(f"exported {len(report.per_module)} modules at rank {rank} to {out}: relative error "
               f"{report.relative_error:.3e} overall, worst {worst[1]:.3e} ({worst[0]})")


@app.command("merge")
def merge_adapters(
    adapters: Annotated[list[Path], typer.Argument(help="adapter folders (lorakit or PEFT), same base and targets")],
    out: Annotated[Path, typer.Option(help="output folder (a PEFT-format LoRA)")],
    method: Annotated[str, typer.Option(help="merge method (`lorakit methods --axis merge`)")] = "lego",
    k: Annotated[int | None, typer.Option("--k", help="output rank (methods that truncate or cluster)")] = None,
    weights: Annotated[str | None, typer.Option(help="comma-separated weights, one per adapter (default 1)")] = None,
    method_arg: Annotated[list[str] | None, typer.Option(help="method argument k=v (repeatable)")] = None,
) -> None:
    """Merge several LoRA adapters into one (LoRA-LEGO, linear, cat, svd, TIES, DARE, ...)."""
    from lorakit.compose.merge import merge, summary
    from lorakit.core.registry import UnknownMethodError
    from lorakit.core.state import AdapterFileError
    from lorakit.io.peft import save_state

    args = _parse_kv(method_arg, "--method-arg")
    if k is not None:
        args["k"] = k
    try:
        w = None if weights is None else [float(x) for x in weights.split(",") if x.strip()]
    except ValueError:
        _fail(f"--weights expects comma-separated numbers, got {weights!r}")
    try:
        state = merge(adapters, method, w, progress=True, **args)
    except (AdapterFileError, UnknownMethodError, ValueError, TypeError) as e:
        _fail(_one_line(e))
    save_state(state, out)
    typer.echo(f"{summary(state)} -> {out}")


from lorakit.federated.cli import fed_app  # noqa: E402  (federated: `lorakit fed simulate|app|show`)

app.add_typer(fed_app, name="fed")

from lorakit.compose.retrieve.cli import retrieve_app  # noqa: E402  (`lorakit retrieve build|query`)

app.add_typer(retrieve_app, name="retrieve")

from lorakit.generate.cli import generate_app  # noqa: E402  (`lorakit generate-adapter bank|fit|sample`)

app.add_typer(generate_app, name="generate-adapter")

from lorakit.train.multijob_cli import train_many  # noqa: E402  (`lorakit train-many CONFIG.yaml`)

app.command("train-many")(train_many)

from lorakit.transfer.cli import transfer, transfer_discriminator  # noqa: E402  (Trans-LoRA)

app.command("transfer")(transfer)
app.command("transfer-discriminator")(transfer_discriminator)

from lorakit.ensemble.cli import ensemble_app  # noqa: E402  (`lorakit ensemble eval`)

app.add_typer(ensemble_app, name="ensemble")

from lorakit.diffusion.cli import diffusion_app  # noqa: E402  (`lorakit diffusion train-base ...`)

app.add_typer(diffusion_app, name="diffusion")


@app.command()
def serve(
    adapters: Annotated[list[Path] | None, typer.Option("--adapters", help="adapter folders (repeatable)")] = None,
    model: Annotated[str | None, typer.Option(help="base model; default: embedded SmolLM2")] = None,
    host: Annotated[str, typer.Option(help="bind address (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    budget_mb: Annotated[int, typer.Option(help="device pool for adapter weights, in MB")] = 512,
    max_batch: Annotated[int, typer.Option(help="rows decoded together")] = 32,
    kv: Annotated[str, typer.Option(help="KV cache: 'dense' (padded batch) or 'paged'")] = "dense",
    unified_budget_mb: Annotated[int | None, typer.Option(
        help="one budget for adapter and KV pages (S-LoRA unified paging; needs --kv paged)")] = None,
    kv_budget_mb: Annotated[int, typer.Option(help="KV cache budget in MB (0 = unbounded)")] = 1024,
    max_model_len: Annotated[int | None, typer.Option(help="context length served (default: the model's)")] = None,
    max_loras: Annotated[int | None, typer.Option(help="most adapters loaded at once")] = None,
    api_key: Annotated[str | None, typer.Option(
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $LORAKIT_API_KEY)")] = None,
    enable_lora_loading: Annotated[bool, typer.Option(
        help="allow runtime /v1/load_lora_adapter and /v1/unload_lora_adapter")] = False,
    allowed_origin: Annotated[list[str] | None, typer.Option(
        help="browser Origin allowed to call the server (repeatable; default: none)")] = None,
    allowed_host: Annotated[list[str] | None, typer.Option(
        help="Host header served (repeatable; default: loopback names when bound to loopback)")] = None,
    max_body_mb: Annotated[float, typer.Option(help="largest request body, in MB")] = 2.0,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: $LORAKIT_THREADS or torch's)")] = None,
    device: Annotated[str, typer.Option(
        help="auto | cpu | cuda | cuda:N: where the model, adapter pool and KV cache live")] = "auto",
) -> None:
    """OpenAI-compatible multi-adapter server (needs the `serving` extra); "model" = adapter name."""
    from lorakit.serving.server import main as serve_main
    from lorakit.serving.server import server_parser
    from lorakit.train.trainer import parse_device

    try:
        parse_device(device)  # a CUDA device this machine lacks is refused here, not replaced by the CPU
    except ValueError as e:
        _fail(str(e))

    argv = ["--host", host, "--port", str(port), "--budget-mb", str(budget_mb), "--max-batch", str(max_batch),
            "--kv", kv, "--kv-budget-mb", str(kv_budget_mb), "--max-body-mb", str(max_body_mb)]
    if unified_budget_mb is not None:
        argv += ["--unified-budget-mb", str(unified_budget_mb)]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    if max_loras is not None:
        argv += ["--max-loras", str(max_loras)]
    if api_key:
        argv += ["--api-key", api_key]
    if enable_lora_loading:
        argv += ["--enable-lora-loading"]
    for o in allowed_origin or []:
        argv += ["--allowed-origin", o]
    for h in allowed_host or []:
        argv += ["--allowed-host", h]
    if threads is not None:
        argv += ["--threads", str(threads)]
    if device != "auto":
        if "--device" not in server_parser()._option_string_actions:
            _fail("this server build cannot place the model on a device (serving/server.py has no --device)")
        argv += ["--device", device]
    if model:
        argv += ["--model", model]
    if adapters:
        argv += ["--adapters", *map(str, adapters)]
    serve_main(argv)


def main() -> None:  # pragma: no cover
    try:
        app()
    except Exception as e:  # last resort: a clean message instead of a traceback for known errors
        from lorakit.core.registry import UnknownMethodError
        from lorakit.core.state import AdapterFileError, BaseMismatchError

        if isinstance(e, (UnknownMethodError, AdapterFileError, BaseMismatchError, ValueError, FileNotFoundError)):
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            sys.exit(2)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
