"""LoRA-Mixer's joint regime pulls the experts toward their values θ^(0) when the router was built
(β Σ‖θ − θ^(0)‖²). θ^(0) is saved with the router and restored on load: a loaded routed model's aux loss
equals the original's, and the preservation term is not reset to zero by the load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.compose.route import fresh_bank, load_routed, route
from lorakit.compose.route.base import GATES_FILE
from lorakit.models import tiny_llama

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
IDS = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
TASKS = torch.tensor([0, -1])  # one labelled row (hard-routed), one unlabelled


def _trained(**args):
    model = tiny_llama(seed=0)
    routed = route(model, fresh_bank(model, TARGETS, k=3, r=4, seed=0), "lora_mixer", regime="joint",
                   preserve_coef=0.5, top_k=2, **args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for joint training: move every expert and gate away from θ^(0)
        for p in routed.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return routed.eval()


def _aux(routed) -> torch.Tensor:
    with torch.no_grad():
        routed(input_ids=IDS, task_ids=TASKS)
        return routed.aux_loss()


def _preservation(routed) -> float:
    return sum(float(((t - routed._initial[p][n]) ** 2).sum()) for p, la in routed.layers.items()
               for n, t in la.stack.expert_named_parameters())


def test_loaded_joint_router_has_the_same_aux_loss(tmp_path):
    routed = _trained()
    assert _preservation(routed) > 1e-3  # the β term is really part of the loss compared below
    expected = _aux(routed)
    routed.save(tmp_path / "r")
    saved = load_file(str(tmp_path / "r" / GATES_FILE))
    assert sum(k.startswith("_reference.") for k in saved) == 2 * len(TARGETS)  # A and B per module
    loaded = load_routed(tiny_llama(seed=0), tmp_path / "r")
    assert torch.equal(_aux(loaded), expected)
    assert _preservation(loaded) == pytest.approx(_preservation(routed), rel=1e-6)
    for p, ts in routed._initial.items():
        assert all(torch.equal(loaded._initial[p][n], t) for n, t in ts.items())


def test_reference_is_saved_only_when_the_regime_uses_it(tmp_path):
    for i, args in enumerate([{"regime": "router_only"}, {"regime": "joint", "preserve_coef": 0.0}]):
        model = tiny_llama(seed=0)
        routed = route(model, fresh_bank(model, TARGETS, k=2, r=4), "lora_mixer", **args)
        routed.save(tmp_path / str(i))
        assert not any(k.startswith("_reference.") for k in load_file(str(tmp_path / str(i) / GATES_FILE)))
        load_routed(tiny_llama(seed=0), tmp_path / str(i))


def test_older_file_without_reference_loads_with_a_warning(tmp_path):
    routed = _trained()
    routed.save(tmp_path / "r")
    gates = load_file(str(tmp_path / "r" / GATES_FILE))
    save_file({k: v for k, v in gates.items() if not k.startswith("_reference.")}, str(tmp_path / "r" / GATES_FILE))
    with pytest.warns(UserWarning, match="older lorakit"):
        loaded = load_routed(tiny_llama(seed=0), tmp_path / "r")
    assert _preservation(loaded) == 0.0  # the old behaviour: θ^(0) = the loaded (trained) experts
