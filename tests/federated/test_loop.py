"""Whole federated runs without Flower on a tiny model and a CSV task: every method, determinism,
client dropouts, rejected updates, DP-SGD."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from fed_helpers import make_csv, make_tiny_dir

from lorakit.federated import FedConfig, GlobalState, dirichlet_partition, label_histogram
from lorakit.federated.client import Runtime, make_aggregator
from lorakit.federated.run import adapters_equal, run_local


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("fed")
    return make_tiny_dir(d / "model"), make_csv(d / "data.csv")


def cfg(tiny, tmp_path, **kw):
    model, data = tiny
    base = dict(model=str(model), data=str(data), clients=4, rounds=2, local_steps=2, batch_size=4, rank=2,
                alpha=4.0, lr=1e-2, n_eval=15, max_length=32, min_client_examples=4, min_clients=2,
                out=str(tmp_path / "out"))
    base.update(kw)
    if base.get("method") == "lora_fair":  # a short server-side solve keeps the test fast
        base.setdefault("method_args", {"steps": 20})
    return FedConfig(**base)


@pytest.mark.parametrize("method", ["fedavg", "flora", "ffa", "lora_fair"])
def test_every_method_runs_and_exact_ones_are_exact(tiny, tmp_path, method):
    c = cfg(tiny, tmp_path, method=method, ranks="1,2,3" if method == "flora" else "")
    res = run_local(c, progress=False)
    assert len(res.reports) == 2 and all(r.accepted == [0, 1, 2, 3] for r in res.reports)
    assert set(res.evals) == {0, 1, 2} and 0.0 <= res.evals[2]["accuracy"] <= 1.0
    for r in res.reports:
        assert r.traffic["up_bytes"] > 0 and r.traffic["down_bytes"] >= 0
        if method in ("flora", "ffa"):
            assert r.gap["relative"] < 1e-5, r.gap
    summary = (tmp_path / "out" / "fed_summary.json").read_text()
    assert '"metric_final"' in summary and (tmp_path / "out" / "metric.png").exists()
    if method == "flora":
        assert res.state.adapter is None and res.state.base_delta
        assert res.reports[0].info["client_ranks"] == [1, 2, 3, 1]
        assert (tmp_path / "out" / "base_delta.safetensors").exists()
    else:
        assert (tmp_path / "out" / "global_adapter" / "adapter_model.safetensors").exists()


def test_a_run_is_deterministic(tiny, tmp_path):
    a = run_local(cfg(tiny, tmp_path, method="fedavg"), progress=False, write=False)
    b = run_local(cfg(tiny, tmp_path, method="fedavg"), progress=False, write=False)
    assert adapters_equal(a.state, b.state)
    assert a.evals == b.evals


def test_client_dropping_out_mid_round_does_not_stop_the_round(tiny, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="lorakit.federated")
    res = run_local(cfg(tiny, tmp_path, method="flora", fail="1@2"), progress=False, write=False)
    r2 = res.reports[1]
    assert list(r2.failed) == [1] and "SimulatedFailure" in r2.failed[1]
    assert r2.accepted == [0, 2, 3] and not r2.skipped and r2.gap["relative"] < 1e-5
    assert "client 1 failed" in caplog.text
    # too few clients left: the round keeps the previous global model
    res = run_local(cfg(tiny, tmp_path, method="fedavg", fail="0@2,1@2,2@2", min_clients=2), progress=False,
                    write=False)
    assert res.reports[1].skipped and res.reports[1].accepted == []


def _poison(monkeypatch, client: int, how: str):
    original = Runtime.train

    def train(self, aggregator, download, client_id, server_round):
        update = original(self, aggregator, download, client_id, server_round)
        if client_id == client:
            k = next(k for k in update.state.tensors if "lora_B" in k)
            t = update.state.tensors[k]
            update.state.tensors[k] = (t.clone().fill_(math.nan) if how == "nan" else
                                       t.clone().fill_(math.inf) if how == "inf" else torch.zeros(t.shape[0] + 1, 2))
        return update

    monkeypatch.setattr(Runtime, "train", train)


@pytest.mark.parametrize("how,reason", [("nan", "non-finite"), ("inf", "non-finite"), ("shape", "shape")])
def test_bad_updates_are_rejected_with_a_logged_reason(tiny, tmp_path, monkeypatch, caplog, how, reason):
    caplog.set_level(logging.WARNING, logger="lorakit.federated")
    _poison(monkeypatch, client=2, how=how)
    res = run_local(cfg(tiny, tmp_path, method="fedavg", rounds=1), progress=False, write=False)
    r = res.reports[0]
    assert list(r.rejected) == [2] and reason in r.rejected[2]
    assert r.accepted == [0, 1, 3]
    assert f"rejected update from client 2: {r.rejected[2]}" in caplog.text
    assert all(bool(torch.isfinite(t).all()) for t in res.state.adapter.tensors.values())


def test_dp_sgd_clients_report_epsilon_and_keep_a_frozen(tiny, tmp_path):
    pytest.importorskip("opacus")
    c = cfg(tiny, tmp_path, method="ffa", dp=True, dp_noise=1.0, dp_clip=0.5, rounds=2)
    res = run_local(c, progress=False, write=False)
    eps = [r.info["epsilon_max"] for r in res.reports]
    assert 0 < eps[0] < eps[1] < math.inf  # privacy spent grows with the rounds
    assert all(r.gap["relative"] < 1e-5 for r in res.reports)  # FFA stays exact under DP
    init = Runtime.shared(c).template(make_aggregator(c))
    for k, v in init.tensors.items():
        if "lora_A" in k:
            assert torch.equal(res.state.adapter.tensors[k], v)
    # more noise, same steps: smaller epsilon
    from lorakit.federated.dp import epsilon

    assert epsilon(2.0, 0.1, 10, 1e-5) < epsilon(1.0, 0.1, 10, 1e-5)


def test_dp_per_sample_gradients_are_clipped_and_noised(tiny, tmp_path):
    """With σ = 0 a DP step equals a plain step on the mean of per-example gradients clipped to C."""
    pytest.importorskip("opacus")
    import lorakit
    from lorakit.federated.dp import PrivateStep, dp_view
    from lorakit.models import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 2, "alpha": 4}), seed=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    C = 1e-3
    per_example = []
    for i in range(3):
        grads = torch.autograd.grad(model(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss, params)
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        per_example.append([g * min(1.0, C / (float(norm) + 1e-6)) for g in grads])
    expected = [sum(gs[j] for gs in per_example) / 3 for j in range(len(params))]
    with dp_view(model, "default") as m:
        step = PrivateStep(m, torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=C,
                           expected_batch_size=3)
        step.model(input_ids=ids, labels=ids).loss.backward()
        step.optimizer.step()  # leaves the privatized gradient in p.grad
        got = [p.grad.clone() for p in params]
        step.close()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-10)
    # with noise, the gradient moves by N(0, σ²C²)/B per coordinate
    with dp_view(model, "default") as m:
        step = PrivateStep(m, torch.optim.SGD(params, lr=1.0), noise_multiplier=5.0, max_grad_norm=C,
                           expected_batch_size=3, generator=torch.Generator().manual_seed(0))
        step.model(input_ids=ids, labels=ids).loss.backward()
        step.optimizer.step()
        noise = torch.cat([(p.grad - e).flatten() for p, e in zip(params, expected)])
        step.close()
    assert abs(float(noise.std()) / (5.0 * C / 3) - 1) < 0.1
    assert not any(hasattr(p, "grad_sample") for p in params)
    assert type(model.get_submodule("model.layers.0.self_attn.q_proj")).__name__ == "AdaptedLayer"


def test_dirichlet_partition_is_seeded_complete_and_skewed():
    labels = [i % 3 for i in range(300)]
    a = dirichlet_partition(labels, 10, 0.3, seed=1, min_size=5)
    assert a == dirichlet_partition(labels, 10, 0.3, seed=1, min_size=5)
    assert sorted(i for p in a for i in p) == list(range(300))
    assert min(len(p) for p in a) >= 5
    hist = label_histogram(labels, a)
    top_share = sum(max(h.values()) / sum(h.values()) for h in hist) / len(hist)
    assert top_share > 0.6  # label-skewed (IID would be ~1/3)
    iid = label_histogram(labels, dirichlet_partition(labels, 10, 1000.0, seed=1))
    assert sum(max(h.values()) / sum(h.values()) for h in iid) / 10 < 0.5
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_partition(labels[:5], 10)


def test_config_round_trips_through_flower_style_keys():
    c = FedConfig(method="lora-fair", rounds=5, dp=True, fail="1@2")
    again = FedConfig.from_mapping(c.to_run_config())
    assert again == c and again.method == "lora_fair" and again.failures() == {(1, 2)}
    assert FedConfig.from_mapping({"local-steps": "7", "dp": "false"}).local_steps == 7
    with pytest.raises(ValueError, match="unknown federated option"):
        FedConfig.from_mapping({"nope": 1})
    with pytest.raises(ValueError, match="need an aggregator with heterogeneous_ranks"):
        FedConfig(method="fedavg", ranks="2,4")
    assert isinstance(GlobalState(adapter=None).base_delta, dict)
