"""Conformance suite for every federated aggregator in the catalog (like the forms suite: checks chosen
by declared flags only, never by name): frozen ``Args`` that ``describe()`` shows and that plain strings
rebuild; aggregation deterministic and independent of the clients' order; identical clients are a fixed
point (the global update equals their common ΔW); what a fresh round downloads matches the flags."""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "federated"))
from fed_helpers import client_states, template, updates_of  # noqa: E402

from lorakit.core import registry  # noqa: E402
from lorakit.federated import FedConfig  # noqa: E402
from lorakit.federated.base import delta_weights  # noqa: E402
from lorakit.federated.metrics import global_delta  # noqa: E402
from lorakit.federated.run import adapters_equal  # noqa: E402

NAMES = registry.names("federated")


@pytest.mark.parametrize("name", NAMES)
def test_every_aggregator_has_frozen_args_and_describes_them(name):
    cls = registry.get("federated", name)
    assert dataclasses.is_dataclass(cls.Args) and cls.Args.__dataclass_params__.frozen
    assert cls.Args.__doc__  # says what the settings are (or that the rule has none)
    for args in cls.examples():
        agg = cls(args)
        text = agg.describe()
        assert text.startswith(f"{name}(")
        for f in dataclasses.fields(cls.Args):
            assert f"{f.name}={getattr(args, f.name)!r}" in text
        # the same values as strings (a command line) build the same Args
        as_text = {f.name: str(getattr(args, f.name)) for f in dataclasses.fields(args)}
        assert cls.from_values(as_text).args == args
        with pytest.raises(dataclasses.FrozenInstanceError):
            agg.args.x = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=cls.Args.__name__):
        cls({"not": "an Args"})


@pytest.mark.parametrize("name", NAMES)
def test_every_aggregator_is_deterministic_and_order_independent(name):
    cls = registry.get("federated", name)
    form = FedConfig(method=name).form()
    states = client_states(4, form=form, ranks=[2, 4] if cls.heterogeneous_ranks else None, seed=3)
    for args in cls.examples():
        agg = cls(args)
        init = agg.init_state(template(form))
        ups = updates_of(states)
        shuffled = ups[:]
        random.Random(1).shuffle(shuffled)
        a, b = agg.aggregate(init, ups).state, agg.aggregate(init, shuffled).state
        assert adapters_equal(a, b) and a.round == 1
        assert (a.adapter is None) == cls.fresh_adapters


@pytest.mark.parametrize("name", NAMES)
def test_identical_clients_are_a_fixed_point(name):
    cls = registry.get("federated", name)
    form = FedConfig(method=name).form()
    one = client_states(1, form=form, seed=7)[0]
    want = {p: d.double() for p, d in delta_weights(one).items()}
    for args in cls.examples():
        agg = cls(args)
        init = agg.init_state(template(form))
        result = agg.aggregate(init, updates_of([one, one, one])).state
        got = global_delta(result)
        start = global_delta(init)
        assert set(got) == set(want)
        for p in want:  # the round's change of the global model is the clients' common update
            change = got[p] - start.get(p, 0) if cls.fresh_adapters else got[p]
            torch.testing.assert_close(change, want[p], rtol=1e-5, atol=1e-6)
