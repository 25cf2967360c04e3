"""Declarative descriptions of an adapter and of a training run."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Targets = str | list[str]
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass
class AdapterSpec:
    """One value per axis for one adapter.

    - ``targets``: a list of module names matched as PEFT does (the full path or its last dotted
      parts), ``"all-linear"`` (every Linear/Conv1D except the output head), or a regex string
      fully matched against module paths. Conv2d and Embedding layers are selected by name or regex
      only, and only for forms that declare ``Cap.CONV2D_OK`` / ``Cap.EMBEDDING_OK``.
    - ``module_args``: per-module overrides of ``form_args``, keyed by a regex matched against the
      end of the module path (PEFT's ``rank_pattern``/``alpha_pattern`` semantics).
    - ``modules_to_save``: module names (matched like ``targets`` lists) that the adapter replaces by a
      trainable full copy, as PEFT's ``modules_to_save`` (e.g. a new classifier head).
    """

    form: str = "lora"
    form_args: dict[str, Any] = field(default_factory=dict)
    init: str = "default"
    init_args: dict[str, Any] = field(default_factory=dict)
    targets: Targets = field(default_factory=lambda: list(DEFAULT_TARGETS))
    exclude: list[str] = field(default_factory=list)
    module_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)

    def args_for(self, module_path: str) -> dict[str, Any]:
        """form_args with the overrides whose pattern matches ``module_path``."""
        args = dict(self.form_args)
        for pattern, overrides in self.module_args.items():
            if re.match(rf"(.*\.)?({pattern})$", module_path):
                args.update(overrides)
        return args

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown AdapterSpec field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def build_args(args_cls: type, values: dict[str, Any], *, owner: str) -> Any:
    """Instantiate a method's frozen ``Args`` dataclass, naming unknown keys clearly."""
    known = {f.name for f in dataclasses.fields(args_cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{owner}: unknown argument(s) {sorted(unknown)}; known: {sorted(known)}")
    return args_cls(**values)


def validate_spec(spec: AdapterSpec) -> None:
    """Check names, arguments and form/init compatibility before any model is touched."""
    from lorakit.core import registry

    form_cls = registry.get("form", spec.form)
    init_cls = registry.get("init", spec.init)
    build_args(form_cls.Args, spec.form_args, owner=f"form {form_cls.name!r}")
    for overrides in spec.module_args.values():
        build_args(form_cls.Args, {**spec.form_args, **overrides}, owner=f"form {form_cls.name!r}")
    init_cls(**spec.init_args).check_form(form_cls)


# -- typed key=value arguments (CLI --form-arg/--init-arg/--strategy-arg, YAML config) ----------------------

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
_NONE = {"none", "null", "~"}


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _split_items(value: Any) -> list[Any]:
    """A sequence value: a YAML list as is, or a CLI string ``a,b`` / ``[a,b]`` / ``(a,b)``."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a comma-separated list, got {value!r}")
    s = value.strip()
    if len(s) >= 2 and s[0] + s[-1] in ("[]", "()"):
        s = s[1:-1]
    return [part.strip() for part in s.split(",")] if s.strip() else []


def convert_value(value: Any, tp: Any) -> Any:
    """``value`` (a command-line string, or an already-typed YAML value) as the annotated type ``tp``.

    Knows bool, int, float, str, ``X | None``, unions (members tried in order), ``Literal``,
    ``tuple[X, ...]``, ``tuple[X, Y]`` and ``list[X]``; raises ValueError when the value does not fit.
    """
    origin, members = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        if isinstance(value, str):  # untyped field: numbers/booleans/lists as JSON, else the string
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in members and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        errors = []
        for member in members:
            if member is type(None):
                continue
            try:
                return convert_value(value, member)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors) or f"{value!r} does not fit {_type_name(tp)}")
    if origin is typing.Literal:
        for choice in members:
            try:
                if convert_value(value, type(choice)) == choice:
                    return choice
            except ValueError:
                continue
        raise ValueError(f"expected one of {list(members)}, got {value!r}")
    if origin in (tuple, list):
        items = _split_items(value)
        if origin is tuple and members and members[-1] is not Ellipsis:
            if len(items) != len(members):
                raise ValueError(f"expected {len(members)} comma-separated values, got {len(items)} in {value!r}")
            return tuple(convert_value(v, t) for v, t in zip(items, members, strict=True))
        inner = members[0] if members else Any
        out = [convert_value(v, inner) for v in items]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in _TRUE | _FALSE:
            return s in _TRUE
        raise ValueError(f"expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError(f"cannot read {value!r} as {_type_name(tp)}")


def parse_kv(args_cls: type, items: Iterable[str] | Mapping[str, Any] | None, *, owner: str = "") -> dict[str, Any]:
    """Values for a method's frozen ``Args`` dataclass from ``["k=v", ...]`` (or a ``{k: v}`` mapping, as a
    YAML file gives), each converted to its field's annotated type (see ``convert_value``).

    Unknown keys and values that do not fit their field raise ValueError naming the field, its type and
    the known fields; the result is meant for ``build_args`` (which the method's constructor calls).
    """
    owner = owner or args_cls.__name__
    hints = typing.get_type_hints(args_cls)
    known = [f.name for f in dataclasses.fields(args_cls)]
    pairs: list[tuple[str, Any]] = []
    if isinstance(items, Mapping):
        pairs = [(str(k), v) for k, v in items.items()]
    else:
        for item in items or []:
            key, sep, value = str(item).partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{owner}: expected key=value, got {item!r}; known keys: {known}")
            pairs.append((key.strip(), value))
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key not in known:
            raise ValueError(f"{owner}: unknown argument {key!r}; known: {known}")
        try:
            out[key] = convert_value(value, hints[key])
        except ValueError as e:
            raise ValueError(f"{owner}: bad value for {key!r} ({_type_name(hints[key])}): {e}") from None
    return out


# -- the training run's spec -----------------------------------------------------------------------------

def _lorakit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorakit")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown"


def _jsonable(value: Any) -> Any:
    """Tuples as lists, dict keys as strings, other non-JSON leaves as strings: what json.dumps would keep."""
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class TrainSpec:
    """What a training run did beyond the adapter's own spec: the strategies with their full ``Args``,
    the trainer config, the init, the seed, the data/task and the lorakit version.

    Saved with every run as ``train_spec.json`` and under ``"train_spec"`` in ``summary.json``; shown
    by ``lorakit inspect``. Frozen at the top level (its dicts are plain, JSON-ready values).
    """

    strategies: tuple[tuple[str, dict[str, Any]], ...] = ()
    trainer: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    init_args: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    data: str | None = None
    lorakit_version: str = field(default_factory=_lorakit_version)

    def __post_init__(self) -> None:
        pairs = []
        for item in self.strategies:
            if isinstance(item, Mapping):  # the to_dict() shape
                item = (item["name"], item.get("args", {}))
            name, args = item
            pairs.append((str(name), _jsonable(dict(args))))
        object.__setattr__(self, "strategies", tuple(pairs))
        object.__setattr__(self, "trainer", _jsonable(dict(self.trainer)))
        object.__setattr__(self, "init_args", _jsonable(dict(self.init_args)))

    @classmethod
    def for_run(cls, strategies: Iterable[Any] = (), trainer_config: Any = None, *, init: str | None = None,
                init_args: Mapping[str, Any] | None = None, seed: int | None = None,
                data: str | None = None) -> TrainSpec:
        """The spec of a run from its strategy objects (``.name`` and a frozen ``.args``, where present)
        and its trainer config (a dataclass or a mapping)."""
        pairs = []
        for s in strategies:
            args = getattr(s, "args", None)
            pairs.append((s.name, dataclasses.asdict(args) if dataclasses.is_dataclass(args) else {}))
        if dataclasses.is_dataclass(trainer_config):
            trainer = dataclasses.asdict(trainer_config)
        else:
            trainer = dict(trainer_config or {})
        if seed is None:
            seed = trainer.get("seed")
        return cls(strategies=tuple(pairs), trainer=trainer, init=init, init_args=dict(init_args or {}),
                   seed=seed, data=data)

    def to_dict(self) -> dict[str, Any]:
        return {"strategies": [{"name": n, "args": a} for n, a in self.strategies], "trainer": self.trainer,
                "init": self.init, "init_args": self.init_args, "seed": self.seed, "data": self.data,
                "lorakit_version": self.lorakit_version}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TrainSpec field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if k == "strategies" else v for k, v in data.items()})


@dataclass(frozen=True)
class NoArgs:
    """The ``Args`` of a method that takes no arguments."""
