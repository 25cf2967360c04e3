"""The defining property of each aggregation rule: the aggregation gap
‖aggregated ΔW − Σ p_k ΔW_k‖ / ‖Σ p_k ΔW_k‖ (METHODS.md, "Federated LoRA")."""

from __future__ import annotations

import random

import pytest
import torch
from fed_helpers import client_states, template, updates_of

from lorakit.core import registry
from lorakit.federated import (
    FFA,
    AggregationError,
    FedAvg,
    FLoRA,
    LoRAFAIR,
    Server,
    aggregation_gap,
    fedavg_states,
    flora_stack,
    global_delta,
    lora_factors,
)
from lorakit.federated.base import add_to_base_delta, base_delta_weights


def one_round(agg, states, sizes=None, tmpl=None):
    tmpl = tmpl or template("ffa" if isinstance(agg, FFA) else "lora")
    before = agg.init_state(tmpl)
    ups = updates_of(states, sizes)
    result = agg.aggregate(before, ups)
    completed = [agg.complete(u.state, before) for u in ups]
    return before, result, aggregation_gap(before, result.state, completed, result.info["weights"])


def test_catalog_lists_the_four_aggregators():
    assert {e.name for e in registry.entries("federated")} == {"fedavg", "flora", "ffa", "lora_fair"}
    assert registry.get("federated", "lora-fair") is LoRAFAIR


def test_fedavg_gap_is_large_on_heterogeneous_clients():
    _, result, gap = one_round(FedAvg(), client_states(4))
    assert gap["relative"] > 1e-2
    # A and B are averaged separately with p_k = n_k / Σ n
    states, p = client_states(4), torch.tensor([10.0, 20, 30, 40]) / 100
    avg = fedavg_states(states, p)
    k = next(iter(avg.tensors))
    torch.testing.assert_close(avg.tensors[k], sum(float(w) * s.tensors[k] for w, s in zip(p, states)))


def test_flora_is_exact_with_homogeneous_and_mixed_ranks():
    for ranks in (None, [2, 4, 8], [1, 6]):
        states = client_states(5, ranks=ranks)
        before, result, gap = one_round(FLoRA(), states)
        assert gap["relative"] < 1e-5, (ranks, gap)
        assert gap["max_module"] < 1e-5
        assert result.state.adapter is None  # clients start fresh next round
        total = sum(lora_factors(s)[next(iter(s.modules))].rank for s in states)
        assert result.info["stacked_rank"] == total
        # a stateful client downloads just this round's stack: Σr·(d+k) fp32 numbers per module
        dims = sum(f.B.shape[0] + f.A.shape[1] for f in lora_factors(states[0]).values())
        assert result.info["increment_bytes"] == 4 * total * dims


def test_flora_stack_is_a_plain_lora_of_summed_rank_with_scale_one():
    states = client_states(3, ranks=[2, 4, 8])
    p = torch.tensor([0.2, 0.3, 0.5])
    stacked = flora_stack(states, p)
    assert stacked.spec.form_args["r"] == 14 and stacked.spec.form_args["alpha"] == 14.0
    for path, f in lora_factors(stacked).items():
        assert f.rank == 14
        ideal = sum(float(w) * lora_factors(s)[path].delta() for w, s in zip(p, states))
        torch.testing.assert_close(f.delta(), ideal, rtol=1e-5, atol=1e-7)


def test_flora_merges_into_the_base_over_rounds_exactly():
    agg, tmpl = FLoRA(), template()
    state = agg.init_state(tmpl)
    expected: dict[str, torch.Tensor] = {}
    for rnd in range(3):
        states = client_states(4, ranks=[2, 4], seed=rnd)
        p = torch.tensor([1.0, 2, 3, 4]) / 10
        state = agg.aggregate(state, updates_of(states, [1, 2, 3, 4])).state
        for s, w in zip(states, p):
            for path, f in lora_factors(s).items():
                expected[path] = expected.get(path, 0) + float(w) * f.delta().double()
    got = global_delta(state)
    for path, e in expected.items():
        assert float((got[path] - e).norm() / e.norm()) < 1e-5
    assert state.round == 3


def test_base_delta_stays_factored_while_smaller_then_turns_dense():
    d, k = 16, 12
    B1, A1 = torch.randn(d, 3), torch.randn(3, k)
    delta = add_to_base_delta({}, "m", B1, A1)
    assert set(delta) == {"m.delta_B", "m.delta_A"}  # 3·28 < 192
    B2, A2 = torch.randn(d, 5), torch.randn(5, k)
    delta = add_to_base_delta(delta, "m", B2, A2)  # 8·28 = 224 >= 192 -> dense
    assert set(delta) == {"m.delta_W"}
    torch.testing.assert_close(base_delta_weights(delta)["m"], B1 @ A1 + B2 @ A2)


def test_ffa_is_exact_and_a_never_travels():
    agg = FFA()
    states = client_states(4, form="ffa")
    before, result, gap = one_round(agg, states)
    assert gap["relative"] < 1e-5
    assert agg.upload_names() == ("lora_B", "lora_bias")
    assert not any(k.endswith("lora_A.weight") for k in agg.download(result.state))
    a0 = {k: v for k, v in before.adapter.tensors.items() if k.endswith("lora_A.weight")}
    for k, v in a0.items():
        assert torch.equal(result.state.adapter.tensors[k], v)  # A0 bit for bit
    # with A trained by a client, ffa refuses (it would silently be inexact)
    bad = client_states(2, form="lora")
    with pytest.raises(AggregationError, match="another A"):
        agg.combine(agg.init_state(template("ffa")), bad, torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("solver", ["cosine", "l2"])
def test_lora_fair_gap_is_strictly_below_fedavg(solver):
    states = client_states(4)
    _, _, gap_avg = one_round(FedAvg(), states)
    _, result, gap_fair = one_round(LoRAFAIR(LoRAFAIR.Args(solver=solver)), states)
    assert gap_fair["relative"] < gap_avg["relative"]
    assert result.info["fair_cos_after"] > result.info["fair_cos_before"]
    # only B is corrected: Ā is FedAvg's
    avg = fedavg_states(states, torch.tensor([10.0, 20, 30, 40]))
    for k, v in avg.tensors.items():
        if k.endswith("lora_A.weight"):
            assert torch.equal(result.state.adapter.tensors[k], v)


def test_aggregation_is_independent_of_arrival_order():
    for agg in (FedAvg(), FLoRA(), LoRAFAIR()):
        states = client_states(5, ranks=[2, 4] if agg.heterogeneous_ranks else None)
        ups = updates_of(states)
        init = agg.init_state(template())
        a = agg.aggregate(init, ups).state
        shuffled = ups[:]
        random.Random(0).shuffle(shuffled)
        b = agg.aggregate(init, shuffled).state
        x = a.adapter.tensors if a.adapter else a.base_delta
        y = b.adapter.tensors if b.adapter else b.base_delta
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_explicit_weights_override_example_counts():
    states = client_states(2)
    init = FedAvg().init_state(template())
    a = FedAvg().aggregate(init, updates_of(states, [1, 1])).state
    b = FedAvg().aggregate(init, updates_of(states, [1, 99]), weights=[5, 5]).state
    assert all(torch.equal(a.adapter.tensors[k], b.adapter.tensors[k]) for k in a.adapter.tensors)
    with pytest.raises(AggregationError, match="finite"):
        FedAvg().aggregate(init, updates_of(states), weights=[1, float("nan")])


def test_fedavg_refuses_mixed_ranks_and_non_factored_forms():
    with pytest.raises(AggregationError, match="one rank"):
        fedavg_states(client_states(2, ranks=[2, 4]), [1, 1])
    from lorakit.core.spec import AdapterSpec

    with pytest.raises(AggregationError, match="not B·A factored"):
        FedAvg().check_spec(AdapterSpec(form="dora"))
    with pytest.raises(AggregationError, match="needs A frozen"):
        FFA().check_spec(AdapterSpec(form="lora"))
    with pytest.raises(AggregationError, match="freezes it"):
        FedAvg().check_spec(AdapterSpec(form="ffa"))


def test_server_round_reports_gap_and_traffic():
    tmpl = template()
    server = Server(FedAvg(), tmpl, min_clients=2)
    report = server.round(updates_of(client_states(3)))
    assert report.accepted == [0, 1, 2] and not report.rejected and not report.skipped
    assert report.gap["relative"] > 1e-2
    per_client = sum(t.numel() * 4 for t in tmpl.tensors.values())
    assert report.traffic["down_bytes_per_client"] == per_client
    assert report.traffic["up_bytes"] == 3 * per_client
    ffa = Server(FFA(), template("ffa"))
    r = ffa.round(updates_of([_only_b(s) for s in client_states(3, form="ffa")]))
    b_bytes = sum(t.numel() * 4 for k, t in tmpl.tensors.items() if "lora_B" in k)
    assert r.traffic["up_bytes"] == 3 * b_bytes  # B only; A0 comes from the shared seed


def _only_b(state):
    from lorakit.core.state import AdapterState

    return AdapterState(spec=state.spec, tensors={k: v for k, v in state.tensors.items() if "lora_B" in k})
