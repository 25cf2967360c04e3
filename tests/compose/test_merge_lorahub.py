"""LoraHub on a tiny Llama: factor-wise composition, and a weight search that finds the adapter that
explains a few-shot task (random search always; nevergrad's NGOpt when it is installed)."""

from __future__ import annotations

import pytest
import torch
from merge_testutil import base_model, deltas, logits, make_state

import lorakit
from lorakit.compose.merge import MergeInputError, merge
from lorakit.compose.merge.lorahub import LoraHubMerge

IDS = torch.randint(3, 128, (4, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hub():
    return [make_state(r=2, alpha=4, seed=s, std=0.4) for s in range(3)]


@pytest.fixture(scope="module")
def few_shot(hub):
    """Examples labelled by base + adapter #1 (its greedy next tokens)."""
    model = base_model()
    lorakit.apply_state(model, hub[1])
    target = logits(model, IDS).argmax(-1)
    labels = torch.full_like(IDS, -100)
    labels[:, 1:] = target[:, :-1]
    return [{"input_ids": IDS, "labels": labels}]


def test_factorwise_composition_is_the_papers(hub):
    w = [0.3, -1.2, 0.7]
    merged = merge(hub, "lorahub", w)
    path = "model.layers.1.self_attn.v_proj"
    s = 4 / 2
    B = sum(wi * s * st.tensors[f"{path}.lora_B.weight"] for wi, st in zip(w, hub))
    A = sum(wi * st.tensors[f"{path}.lora_A.weight"] for wi, st in zip(w, hub))
    torch.testing.assert_close(deltas(merged)[path][0], B @ A, rtol=0, atol=1e-5)
    exact = merge(hub, "lorahub", w, composition="delta")
    want = sum(wi * deltas(st)[path][0] for wi, st in zip(w, hub))
    torch.testing.assert_close(deltas(exact)[path][0], want, rtol=0, atol=1e-5)


def test_factorwise_composition_needs_equal_ranks(hub):
    with pytest.raises(MergeInputError, match="needs equal ranks.*composition='delta'"):
        merge([hub[0], make_state(r=3, seed=9)], "lorahub", [1.0, 1.0])


@pytest.mark.parametrize("optimizer", ["random", "ngopt"])
def test_search_finds_the_adapter_of_the_task_and_leaves_the_model_as_it_was(hub, few_shot, optimizer):
    if optimizer == "ngopt":
        pytest.importorskip("nevergrad")
    model = base_model()
    lorakit.apply_state(model, hub[0], "other")  # an unrelated active adapter must be left alone
    before = logits(model, IDS)
    hubm = LoraHubMerge(optimizer=optimizer, budget=30, seed=0)
    state = hubm.search(model, hub, batches=few_shot)
    torch.testing.assert_close(logits(model, IDS), before, rtol=0, atol=0)
    assert lorakit.specs(model).keys() == {"other"} and lorakit.active_adapters(model) == ("other",)
    report = state.meta["merge"]["lorahub"]
    assert report["evaluations"] == 30 and len(report["history"]) == 30
    w = report["weights"]
    assert all(abs(x) <= 1.5 for x in w)
    assert report["objective"] < report["history"][0]  # better than w = 0 (the base model)
    assert abs(w[1]) == max(abs(x) for x in w)  # adapter #1 explains the task
    # the returned adapter is the composition at the found weights, and PEFT-savable
    torch.testing.assert_close(state.tensors["model.layers.0.self_attn.q_proj.lora_A.weight"],
                               merge(hub, "lorahub", w).tensors["model.layers.0.self_attn.q_proj.lora_A.weight"])


def test_search_needs_data(hub):
    with pytest.raises(MergeInputError, match="needs few-shot data"):
        LoraHubMerge().search(base_model(), hub)
