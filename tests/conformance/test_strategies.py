"""Conformance suite for every training strategy in the catalog (checks chosen by declared attributes only).

Each strategy, with its default ``Args`` (or each of ``Strategy.examples()`` where a strategy offers them):

1. ``Args`` is a frozen dataclass, ``Strategy()`` builds with the defaults, unknown kwargs are refused
   naming the key, and ``exclusive_with`` names only catalog strategies (and ``check_stack`` refuses them).
2. A short run through the real Trainer on the tiny Llama, with a form chosen from the catalog by the
   strategy's ``requires`` capabilities (the form from the same paper where the catalog has one, else
   ``lora`` when it qualifies, else the first that does): finite losses; what the optimizer holds (the
   adapter, or what the strategy puts into the optimizer through ``param_groups``/``add_param_group``)
   changes; nothing else changes in value (a structured pruning may keep a subset of a tensor's rows or
   columns, bit-equal).
3. Exact resume: a run killed after step ``KILL`` and resumed from its checkpoint ends with the same
   losses, every model tensor and the same strategy state as the uninterrupted run.
4. ``state_dict()`` survives the trainer's checkpoint (``torch.save`` / ``torch.load(weights_only=True)``)
   unchanged, and a resumed run's strategy (``restore_structure`` + ``load_state_dict`` +
   ``on_train_start``) reports the saved state again.
5. ``train_spec.json`` in the run dir records the strategy with its full args, which rebuild it.

Plus: ``requires`` is sufficient: every catalog form with those capabilities is accepted for a step.
A strategy that cannot resume by design should declare ``resumable = False`` (the resume checks then
skip it); no strategy name appears in the checks.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from typing import Any

import pytest
import torch

import lorakit
from conftest import kill_at
from lorakit.core import registry
from lorakit.core.caps import Cap
from lorakit.core.spec import TrainSpec, parse_kv
from lorakit.models import tiny_llama
from lorakit.strategies.base import Strategy, check_stack
from lorakit.train import TrainConfig, Trainer
from lorakit.train import checkpoint as ckpt

STRATEGIES = [e.name for e in registry.entries("strategy")]
FORMS = [e.name for e in registry.entries("form")]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
G = torch.Generator().manual_seed(0)
DATA = [torch.randint(3, 128, (10,), generator=G) for _ in range(24)]
IDS = torch.stack(DATA[:2])
# 6 steps, a checkpoint after every step; the kill run dies at the end of step 2 and resumes from step 1
# (early enough that search-then-select strategies, e.g. at 20 % of the steps, resume before selecting)
STEPS, KILL = 6, 2
FORM_ARGS = {"dropout": 0.1}  # the forms' own defaults otherwise; dropout > 0: resume needs the RNG state

# known bugs (strict xfail: the case fails today; fix the strategy, then remove the mark)
RESUME_BUGS: dict[str, str] = {}
REQUIRES_BUGS: dict[tuple[str, str], str] = {}


def _entry(axis: str, name: str):
    return next(e for e in registry.entries(axis) if e.name == name)


def _examples(name: str) -> list[Any]:
    cls = registry.get("strategy", name)
    ex = getattr(cls, "examples", None)
    return list(ex()) if callable(ex) else [cls.Args()]


CASES = [pytest.param(n, i, id=f"{n}-{i}") for n in STRATEGIES for i in range(len(_examples(n)))]


def _marked(bugs: dict[str, str]) -> list:
    out = []
    for p in CASES:
        name = p.values[0]
        marks = [pytest.mark.xfail(reason=bugs[name], strict=True)] if name in bugs else []
        out.append(pytest.param(*p.values, id=p.id, marks=marks))
    return out


def _qualifying_forms(cls) -> list[str]:
    return [f for f in FORMS if cls.requires in registry.get("form", f).caps
            and not registry.get("form", f).caps & cls.excludes]


def _form_for(name: str) -> str:
    """The form from the same paper (same catalog arXiv id) if it qualifies, else lora, else the first."""
    cls = registry.get("strategy", name)
    ok = _qualifying_forms(cls)
    assert ok, f"no catalog form has the capabilities {cls.requires} that strategy {name!r} requires"
    paper = _entry("strategy", name).arxiv
    same = [f for f in ok if paper not in ("", "-") and _entry("form", f).arxiv == paper]
    return same[0] if same else ("lora" if "lora" in ok else ok[0])


def _form_args(form: str) -> dict:
    fields = {f.name for f in dataclasses.fields(registry.get("form", form).Args)}
    return {k: v for k, v in FORM_ARGS.items() if k in fields}


def _collate(items):
    return torch.stack(items)


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


class Probe(Strategy):
    """Listed after the strategy under test: records its state where the trainer would save it."""

    name = "conformance_probe"

    def __init__(self, target: Strategy) -> None:
        super().__init__()
        self.target = target
        self.at_start: dict[str, Any] | None = None
        self.by_step: dict[int, dict[str, Any]] = {}

    def on_train_start(self, ctx, *_):
        self.at_start = _snapshot(self.target.state_dict())

    def on_step_end(self, ctx, step, logs):
        self.by_step[step] = _snapshot(self.target.state_dict())


def _snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy through the checkpoint's serialization (torch.save, torch.load(weights_only=True))."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Deep equality for nested dicts/lists/tuples of tensors and plain values (tensors bit-equal)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b), where
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _build(name: str, index: int, out, extra=()):
    cls = registry.get("strategy", name)
    form = _form_for(name)
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form=form, form_args=_form_args(form), targets=TARGETS), seed=0)
    strategy = cls(**dataclasses.asdict(_examples(name)[index]))
    probe = Probe(strategy)
    cfg = TrainConfig(steps=STEPS, batch_size=4, lr=1e-2, warmup_steps=1, save_every=1, keep_checkpoints=STEPS,
                      progress=False, eval_at_start=False, seed=3, out_dir=str(out))
    trainer = Trainer(model, DATA, _collate, _loss, cfg, strategies=[strategy, probe, *extra])
    return model, strategy, probe, trainer


_RUNS: dict[tuple[str, int], dict[str, Any]] = {}


@pytest.fixture
def full_run(tmp_path_factory):
    """The uninterrupted run of (strategy, example), trained once per session."""

    def get(name: str, index: int) -> dict[str, Any]:
        key = (name, index)
        if key not in _RUNS:
            out = tmp_path_factory.mktemp(f"{name}-{index}-full")
            torch.manual_seed(0)
            model, strategy, probe, trainer = _build(name, index, out)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            held_at_start = {id(p) for p in trainer.optimized_params()}
            result = trainer.train(resume=False)
            held = held_at_start | {id(p) for p in trainer.optimized_params()}
            model.eval()
            with torch.no_grad():
                logits = model(IDS).logits
            _RUNS[key] = dict(out=out, model=model, strategy=strategy, probe=probe, trainer=trainer,
                              result=result, before=before, held=held, logits=logits)
        return _RUNS[key]

    return get


# -- 1. the Args contract, construction and exclusivity ---------------------------------------------------

@pytest.mark.parametrize("name", STRATEGIES)
def test_args_are_frozen_defaults_build_and_unknown_args_are_named(name):
    cls = registry.get("strategy", name)
    assert cls.name == name
    assert isinstance(cls.requires, Cap)
    assert dataclasses.is_dataclass(cls.Args) and cls.Args.__dataclass_params__.frozen
    s = cls()
    assert isinstance(s.args, cls.Args) and s.args == cls.Args()
    fields = dataclasses.fields(cls.Args)
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(s.args, fields[0].name, getattr(s.args, fields[0].name))
    with pytest.raises((TypeError, ValueError), match="no_such_arg"):
        cls(no_such_arg=1)
    for ex in _examples(name):
        assert isinstance(ex, cls.Args)
        assert cls(**dataclasses.asdict(ex)).args == ex


@pytest.mark.parametrize("name", STRATEGIES)
def test_exclusive_with_names_catalog_strategies_and_is_enforced(name):
    cls = registry.get("strategy", name)
    assert isinstance(cls.exclusive_with, frozenset)
    assert name not in cls.exclusive_with
    unknown = sorted(cls.exclusive_with - set(STRATEGIES))
    assert not unknown, f"strategy {name!r}: exclusive_with names strategies not in the catalog: {unknown}"
    for other in sorted(cls.exclusive_with):
        for stack in ([cls(), registry.get("strategy", other)()], [registry.get("strategy", other)(), cls()]):
            with pytest.raises(ValueError, match="cannot be combined"):
                check_stack(stack)
    compatible = [o for o in STRATEGIES if o != name and o not in cls.exclusive_with
                  and name not in registry.get("strategy", o).exclusive_with]
    for other in compatible:
        check_stack([cls(), registry.get("strategy", other)()])  # no refusal
    with pytest.raises(ValueError, match="twice"):
        check_stack([cls(), cls()])


# -- 2. a short run through the real Trainer ------------------------------------------------------------------

def _kept_slice(new: torch.Tensor, old: torch.Tensor) -> bool:
    """``new`` equals ``old`` with a subset of its rows or columns kept (structured pruning), or ``old``."""
    if new.shape == old.shape:
        return torch.equal(new, old)
    if new.dim() != old.dim():
        return False
    dims = [d for d in range(old.dim()) if new.shape[d] != old.shape[d]]
    if len(dims) != 1 or new.shape[dims[0]] > old.shape[dims[0]]:
        return False
    d = dims[0]
    a, b = new.movedim(d, 0).reshape(new.shape[d], -1), old.movedim(d, 0).reshape(old.shape[d], -1)
    return bool((a[:, None, :] == b[None, :, :]).all(-1).any(1).all())


@pytest.mark.parametrize("name,index", CASES)
def test_short_run_trains_what_the_optimizer_holds_and_nothing_else(name, index, full_run):
    run = full_run(name, index)
    model, result, before, held = run["model"], run["result"], run["before"], run["held"]
    assert len(result.losses) == STEPS and all(math.isfinite(x) for x in result.losses)
    assert torch.isfinite(run["logits"]).all()
    params = dict(model.named_parameters())
    missing_base = [n for n in before if n not in params and ".adapters." not in n]
    assert not missing_base, f"base tensors gone after training: {missing_base[:3]}"
    changed_held, changed_adapter, wrong = [], [], []
    for n, p in params.items():
        if n not in before:  # a strategy-made tensor (e.g. grown ranks): must be trained by the optimizer
            assert id(p) in held, f"new tensor {n} is not held by the optimizer"
            continue
        same = p.shape == before[n].shape and torch.equal(p.detach(), before[n])
        if id(p) in held:
            assert torch.isfinite(p).all(), n
            if not same:
                changed_held.append(n)
                if ".adapters." in n:
                    changed_adapter.append(n)
        elif not _kept_slice(p.detach(), before[n]):
            wrong.append(n)
    assert not wrong, f"tensors outside the optimizer changed: {wrong[:5]}"
    assert changed_held, "no tensor held by the optimizer changed"
    held_adapter = [n for n, p in params.items() if id(p) in held and ".adapters." in n]
    if held_adapter:
        assert changed_adapter, f"the adapter's trainable tensors did not change ({held_adapter[:3]})"
    delta = max(float((params[n].detach() - before[n]).abs().max()) for n in changed_held
                if params[n].shape == before[n].shape)
    assert delta > 0


# -- 3. exact resume ------------------------------------------------------------------------------------------

def _skip_unresumable(name: str) -> None:
    if getattr(registry.get("strategy", name), "resumable", True) is False:
        pytest.skip(f"strategy {name!r} declares resumable = False")


@pytest.mark.parametrize("name,index", _marked(RESUME_BUGS))
def test_killed_and_resumed_run_equals_the_uninterrupted_one(name, index, full_run, tmp_path):
    _skip_unresumable(name)
    full = full_run(name, index)
    torch.manual_seed(0)
    *_, killed = _build(name, index, tmp_path, extra=[kill_at(KILL)])
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    torch.manual_seed(123)  # a fresh process: the global RNG must come from the checkpoint
    model, strategy, probe, trainer = _build(name, index, tmp_path)
    result = trainer.train()
    assert result.resumed_from == KILL - 1
    assert result.losses == full["result"].losses[KILL - 1:]
    a, b = dict(full["model"].named_parameters()), dict(model.named_parameters())
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].shape == b[n].shape and torch.equal(a[n], b[n]), n
    sa, sb = lorakit.extract_state(full["model"]).tensors, lorakit.extract_state(model).tensors
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    _assert_same(_snapshot(full["strategy"].state_dict()), _snapshot(strategy.state_dict()), "final state")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, full["logits"])


@pytest.mark.parametrize("name", [n for n in STRATEGIES if not registry.get("strategy", n).resumable])
def test_unresumable_strategies_refuse_a_resume_up_front(name, tmp_path):
    torch.manual_seed(0)
    *_, killed = _build(name, 0, tmp_path, extra=[kill_at(KILL)])
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    *_, trainer = _build(name, 0, tmp_path)
    with pytest.raises(ValueError, match="cannot resume a run"):
        trainer.train()


# -- 4. state_dict through the checkpoint and back --------------------------------------------------------------

@pytest.mark.parametrize("name,index", CASES)
def test_state_dict_survives_the_checkpoint_unchanged(name, index, full_run):
    full = full_run(name, index)
    found = ckpt.list_checkpoints(full["out"] / "checkpoints")
    assert [int(p.name.split("-")[1]) for p in found] == list(range(1, STEPS))
    for path in found:
        step = int(path.name.split("-")[1])
        saved = ckpt.load_checkpoint(path)["strategies"]
        assert name in saved
        _assert_same(saved[name], full["probe"].by_step[step], f"step {step}")


@pytest.mark.parametrize("name,index", _marked(RESUME_BUGS))
def test_state_dict_round_trips_through_load_state_dict_on_resume(name, index, full_run, tmp_path):
    _skip_unresumable(name)
    full = full_run(name, index)
    src = full["out"] / "checkpoints" / f"step-{KILL - 1:07d}"
    saved = ckpt.load_checkpoint(src)["strategies"][name]
    torch.manual_seed(0)
    _, strategy, probe, trainer = _build(name, index, tmp_path)
    trainer.train(resume=src)
    assert probe.at_start is not None
    _assert_same(probe.at_start, saved, "state after restore_structure + load_state_dict + on_train_start")
    # the fresh strategy object, given the saved state, goes on exactly as the uninterrupted one
    for step in range(KILL, STEPS):
        _assert_same(probe.by_step[step], full["probe"].by_step[step], f"step {step}")


# -- 5. the run's TrainSpec ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,index", CASES)
def test_train_spec_records_the_strategy_with_its_full_args(name, index, full_run):
    full = full_run(name, index)
    cls = registry.get("strategy", name)
    saved = json.loads((full["out"] / "train_spec.json").read_text())
    entries = {s["name"]: s["args"] for s in saved["strategies"]}
    assert list(entries)[0] == name
    args = entries[name]
    assert set(args) == {f.name for f in dataclasses.fields(cls.Args)}
    assert args == json.loads(json.dumps(dataclasses.asdict(full["strategy"].args), default=str))
    rebuilt = cls(**parse_kv(cls.Args, args, owner=name))
    assert rebuilt.args == full["strategy"].args  # the record rebuilds the same strategy
    assert saved["trainer"]["steps"] == STEPS and saved["seed"] == 3
    back = TrainSpec.from_dict(saved)
    assert back.to_dict() == saved


# -- requires is sufficient -----------------------------------------------------------------------------------

REQ_CASES = []
for _n in STRATEGIES:
    _cls = registry.get("strategy", _n)
    if _cls.requires == Cap.NONE:
        continue
    for _f in _qualifying_forms(_cls):
        _marks = [pytest.mark.xfail(reason=REQUIRES_BUGS[(_n, _f)], strict=True)] if (_n, _f) in REQUIRES_BUGS \
            else []
        REQ_CASES.append(pytest.param(_n, _f, id=f"{_n}-{_f}", marks=_marks))


@pytest.mark.parametrize("name,form", REQ_CASES)
def test_every_form_with_the_required_capabilities_is_accepted(name, form):
    cls = registry.get("strategy", name)
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form=form, form_args=_form_args(form), targets=TARGETS), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=0, progress=False, eval_at_start=False)
    torch.manual_seed(0)
    result = Trainer(model, DATA, _collate, _loss, cfg, strategies=[cls()]).train(resume=False)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    params = dict(model.named_parameters())
    assert any(n in params and not (params[n].shape == b.shape and torch.equal(params[n].detach(), b))
               for n, b in before.items())


def test_the_suite_chooses_forms_by_capability():
    for name in STRATEGIES:
        cls = registry.get("strategy", name)
        form = _form_for(name)
        assert cls.requires in registry.get("form", form).caps
