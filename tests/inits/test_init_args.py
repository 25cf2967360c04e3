"""Every init and every strategy in the catalog has a frozen ``Args`` dataclass; ``Cls(**kwargs)`` builds
``self.args`` from it (unknown keys named), and the paper defaults are the ones the methods had before."""

from __future__ import annotations

import dataclasses

import pytest

from lorakit import methods
from lorakit.core import registry
from lorakit.core.caps import Cap

METHODS = [(e.axis, e.name) for axis in ("init", "strategy") for e in methods(axis)]


@pytest.mark.parametrize("axis, name", METHODS)
def test_args_are_a_frozen_dataclass_built_from_kwargs(axis, name):
    cls = registry.get(axis, name)
    assert dataclasses.is_dataclass(cls.Args) and cls.Args.__dataclass_params__.frozen
    default = cls()
    assert default.args == cls.Args()
    fields = [f.name for f in dataclasses.fields(cls.Args)]
    # every field given explicitly (as its default) builds the same args: the keyword style still works
    assert cls(**{f: getattr(default.args, f) for f in fields}).args == default.args
    with pytest.raises(ValueError) as e:
        cls(no_such_arg=1)
    assert f"{axis} {name!r}: unknown argument(s) ['no_such_arg']; known: {sorted(fields)}" == str(e.value)
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(default.args, fields[0], getattr(default.args, fields[0]))


@pytest.mark.parametrize("axis, name, expected", [
    ("init", "pissa", {"niter": 0}),
    ("init", "lora_ga", {"variant": "official", "gamma": 16.0, "svd": "lowrank", "niter": 4, "seed": 0,
                         "max_batches": None}),
    ("init", "lora_sb", {"lr": 1e-4, "warmup_steps": 1, "update": "sign", "residual": False, "svd": "exact",
                         "niter": 10, "seed": 42, "max_batches": None}),
    ("init", "eva", {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False,
                     "adjust_scaling_factors": True, "lowrank": True, "max_batches": 1000, "progress": True}),
    ("init", "ldu", {"fold_scale": True}),
    ("init", "nystrom", {"mode": "weight"}),
    ("init", "shira_grad", {"accumulate": "sum", "max_batches": None}),
    ("init", "default", {}),
    ("strategy", "allora", {"eta": 4.0, "granularity": "row", "on_conflict": "override"}),
    ("strategy", "lora_pro", {"mode": "adam", "betas": None, "eps": 1e-8}),
    ("strategy", "lisa", {"gamma": 2, "interval": 20, "seed": 0, "layers": None, "keep_frozen_state": False,
                          "save_full": True}),
    ("strategy", "dylora", {"seed": 0, "r_min": 1, "r_max": None, "frozen": None}),
    ("strategy", "increlora", {"target_rank": 2, "target_total_rank": None, "top_h": 2, "init_warmup": 100,
                               "interval": 100, "beta1": 0.85, "beta2": 0.85, "orth_reg": 0.1,
                               "group_warmup": None, "plot": True}),
    ("strategy", "loraprune", {"ratio": 0.5, "prune_freq": 10, "warmup_ratio": 0.1, "cooldown_ratio": 0.1,
                               "ema": 0.9, "initial_ratio": 0.0, "layers": None, "prune_attn": True,
                               "prune_mlp": True, "physical": True, "normalize": True}),
    ("strategy", "loram", {"ratio": 0.5, "method": "magnitude", "layers": None, "prune_attn": True,
                           "prune_mlp": True, "fill": "zero", "seed": 0, "adapter": "default"}),
])
def test_paper_defaults_are_kept(axis, name, expected):
    assert dataclasses.asdict(registry.get(axis, name).Args()) == expected


@pytest.mark.parametrize("axis, name, kwargs, message", [
    ("init", "pissa", {"niter": -1}, "init 'pissa': niter must be >= 0, got -1"),
    ("init", "nystrom", {"mode": "svd"}, "init 'nystrom': mode must be one of ('weight', 'pinv'), got 'svd'"),
    ("init", "lora_sb", {"lr": 0}, "init 'lora_sb': lr must be > 0"),
    ("strategy", "lisa", {"gamma": 0}, "lisa: need gamma >= 1 and interval >= 1, got gamma=0"),
    ("strategy", "loram", {"fill": "ones"}, "loram: fill must be one of ('zero', 'norm'), got 'ones'"),
    ("strategy", "dylora", {"r_min": 3, "r_max": 2}, "need 1 <= r_min <= r_max, got r_min=3, r_max=2"),
])
def test_values_are_checked_by_the_args(axis, name, kwargs, message):
    with pytest.raises(ValueError) as e:
        registry.get(axis, name)(**kwargs)
    assert message in str(e.value)


def test_derived_settings_follow_the_args():
    sb = registry.get("init", "lora_sb")(lr=1e-3, warmup_steps=4, residual=True)
    assert sb.eta == pytest.approx(2.5e-4)  # η = lr / warmup_steps
    assert Cap.REWRITES_BASE in sb.needs and Cap.REWRITES_BASE not in registry.get("init", "lora_sb")().needs
    prune = registry.get("strategy", "loraprune")(layers="1;2")
    assert prune.args.layers == "1;2" and prune.layers == [1, 2]
