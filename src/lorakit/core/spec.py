"""Declarative descriptions of an adapter and of a training run."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

Targets = str | list[str]
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass
class AdapterSpec:
    """One value per axis for one adapter.

    - ``targets``: a list of module names matched as PEFT does (the full path or its last dotted
      parts), ``"all-linear"`` (every Linear/Conv1D except the output head), or a regex string
      fully matched against module paths.
    - ``module_args``: per-module overrides of ``form_args``, keyed by a regex matched against the
      end of the module path (PEFT's ``rank_pattern``/``alpha_pattern`` semantics).
    """

    form: str = "lora"
    form_args: dict[str, Any] = field(default_factory=dict)
    init: str = "default"
    init_args: dict[str, Any] = field(default_factory=dict)
    targets: Targets = field(default_factory=lambda: list(DEFAULT_TARGETS))
    exclude: list[str] = field(default_factory=list)
    module_args: dict[str, dict[str, Any]] = field(default_factory=dict)

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
