"""Target selection: PEFT name-suffix lists, full-match regex strings, "all-linear", exclude."""

from __future__ import annotations

import re

import pytest
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import AdapterSpec
from lorakit.core.layer import AdaptedLayer


def linear_paths(model: nn.Module) -> list[str]:
    """Every Linear/Conv1D module path, in model order (the independent reference)."""
    return [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def test_name_list_uses_peft_suffix_semantics(tiny_llama):
    every = linear_paths(tiny_llama)
    # PEFT: a name matches the full path or its last dotted parts, never a bare substring
    for names in (["q_proj"], ["self_attn.q_proj", "down_proj"], ["layers.1.mlp.up_proj"],
                  ["model.layers.0.self_attn.k_proj"]):
        want = [p for p in every if any(p == n or p.endswith("." + n) for n in names)]
        assert want, names
        assert lorakit.find_targets(tiny_llama, AdapterSpec(targets=names)) == want
    assert lorakit.find_targets(tiny_llama, AdapterSpec(targets=["q_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("names", [["proj"], ["_proj"], ["attn.q"], ["q_pro"]])
def test_name_list_is_not_a_substring_match(tiny_llama, names):
    with pytest.raises(ValueError, match="match no Linear/Conv1D module"):
        lorakit.find_targets(tiny_llama, AdapterSpec(targets=names))


def test_regex_string_is_a_full_match(tiny_llama):
    every = linear_paths(tiny_llama)
    pattern = r".*\.0\.(self_attn|mlp)\.(q|up)_proj"
    want = [p for p in every if re.fullmatch(pattern, p)]
    assert want == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    assert lorakit.find_targets(tiny_llama, AdapterSpec(targets=pattern)) == want
    # "q_proj" matches only at the end of the path, so it is not a full match of any path
    with pytest.raises(ValueError, match="q_proj"):
        lorakit.find_targets(tiny_llama, AdapterSpec(targets="q_proj"))
    assert lorakit.find_targets(tiny_llama, AdapterSpec(targets=".*q_proj")) == [
        p for p in every if p.endswith("q_proj")]


def test_all_linear_excludes_the_output_head_llama(tiny_llama):
    got = lorakit.find_targets(tiny_llama, AdapterSpec(targets="all-linear"))
    every = linear_paths(tiny_llama)
    assert "lm_head" in every
    assert got == [p for p in every if p != "lm_head"]
    assert len(got) == 2 * 7


def test_all_linear_excludes_the_output_head_gpt2(tiny_gpt2):
    got = lorakit.find_targets(tiny_gpt2, AdapterSpec(targets="all-linear"))
    every = linear_paths(tiny_gpt2)
    assert "lm_head" in every
    assert got == [p for p in every if p != "lm_head"]
    assert all(isinstance(tiny_gpt2.get_submodule(p), Conv1D) for p in got)


def test_all_linear_excludes_the_head_even_when_another_adapter_wraps_it(tiny_llama):
    lorakit.attach(tiny_llama, AdapterSpec(targets=["lm_head"]), name="head")
    got = lorakit.find_targets(tiny_llama, AdapterSpec(targets="all-linear"))
    assert "lm_head" not in got
    assert len(got) == 2 * 7


def test_wrapped_modules_are_still_selected_by_their_own_path(tiny_llama):
    lorakit.attach(tiny_llama, AdapterSpec(targets=["q_proj"]), name="a")
    got = lorakit.find_targets(tiny_llama, AdapterSpec(targets=["q_proj", "k_proj"]))
    assert got == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                   "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    assert not any("base_layer" in p or "adapters" in p for p in
                   lorakit.find_targets(tiny_llama, AdapterSpec(targets="all-linear")))


def test_exclude_list_and_regex(tiny_llama):
    every = [p for p in linear_paths(tiny_llama) if p != "lm_head"]
    spec = AdapterSpec(targets="all-linear", exclude=["o_proj", "mlp.up_proj"])
    got = lorakit.find_targets(tiny_llama, spec)
    assert got == [p for p in every if not p.endswith((".o_proj", ".up_proj"))]
    got = lorakit.find_targets(tiny_llama, AdapterSpec(targets="all-linear", exclude=r".*\.layers\.1\..*"))
    assert got == [p for p in every if ".layers.1." not in p]
    got = lorakit.find_targets(tiny_llama, AdapterSpec(targets=["q_proj", "v_proj"],
                                                       exclude=["model.layers.0.self_attn.v_proj"]))
    assert got == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                   "model.layers.1.self_attn.v_proj"]


def test_attach_honours_exclude(tiny_llama):
    want = [p for p in linear_paths(tiny_llama) if p != "lm_head" and not p.endswith("gate_proj")]
    lorakit.attach(tiny_llama, AdapterSpec(targets="all-linear", exclude=["mlp.gate_proj"]))
    adapted = [p for p, m in tiny_llama.named_modules() if isinstance(m, AdaptedLayer)]
    assert adapted == want


@pytest.mark.parametrize("targets", [["nope"], "nope.*"])
def test_no_match_is_a_clear_error_listing_candidates(tiny_llama, targets):
    with pytest.raises(ValueError) as e:
        lorakit.find_targets(tiny_llama, AdapterSpec(targets=targets))
    msg = str(e.value)
    assert repr(targets) in msg
    assert "candidates" in msg
    assert "model.layers.0.self_attn.q_proj" in msg
    with pytest.raises(ValueError, match="match no Linear/Conv1D module"):
        lorakit.attach(tiny_llama, AdapterSpec(targets=targets))
    assert lorakit.specs(tiny_llama) == {}


@pytest.mark.parametrize("targets", [["embed_tokens"], r"model\.embed_tokens"])
def test_embedding_needs_a_form_that_declares_it(tiny_llama, targets):
    """An Embedding is a target only for forms with Cap.EMBEDDING_OK; others are refused by name."""
    assert lorakit.find_targets(tiny_llama, AdapterSpec(targets=targets)) == ["model.embed_tokens"]  # lora: ok
    with pytest.raises(ValueError, match=r"Embedding layer 'model\.embed_tokens'.*form 'dora'.*EMBEDDING_OK"):
        lorakit.attach(tiny_llama, AdapterSpec(form="dora", targets=targets))
    assert lorakit.specs(tiny_llama) == {}


def test_all_linear_never_selects_embeddings(tiny_llama):
    paths = lorakit.find_targets(tiny_llama, AdapterSpec(targets="all-linear"))
    assert "model.embed_tokens" not in paths and "lm_head" not in paths
    assert all(isinstance(tiny_llama.get_submodule(p), nn.Linear) for p in paths)


def test_exclude_everything_is_an_error(tiny_llama):
    with pytest.raises(ValueError, match="match no"):
        lorakit.find_targets(tiny_llama, AdapterSpec(targets=["q_proj"], exclude=["q_proj"]))
