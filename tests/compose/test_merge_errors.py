"""Bad merge input gets a clear error that names the problem, before any work is done."""

from __future__ import annotations

import dataclasses

import pytest
from merge_testutil import make_state

from lorakit.compose.merge import MergeInputError, merge, methods
from lorakit.core.registry import UnknownMethodError
from lorakit.core.state import BaseMismatchError

ALL = ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune", "lego", "lorahub"]


@pytest.fixture(scope="module")
def good():
    return make_state(r=3, seed=0)


def test_catalog_lists_the_merge_family():
    assert set(ALL) <= set(methods())


@pytest.mark.parametrize("method", ALL)
def test_empty_list(method):
    with pytest.raises(MergeInputError, match="nothing to merge"):
        merge([], method)


@pytest.mark.parametrize("method", ALL)
def test_different_targets(good, method):
    other = make_state(r=3, seed=1, targets=["q_proj", "k_proj", "down_proj"])
    with pytest.raises(MergeInputError, match=r"adapts other modules than adapter #0.*k_proj.*share base and targets"):
        merge([good, other], method)


def test_different_base_weights(good):
    other = make_state(r=3, seed=1, base_seed=1)  # same architecture, other weights
    with pytest.raises(BaseMismatchError, match="another base model.*weight statistics differ"):
        merge([good, other], "lego")


def test_different_architecture(good):
    other = make_state(r=3, seed=1, hidden=48)
    with pytest.raises(BaseMismatchError, match="another base model.*hidden_size"):
        merge([good, other], "linear")


def test_same_modules_other_shapes_without_fingerprints(good):
    other = make_state(r=3, seed=1, hidden=48)
    stripped = [dataclasses.replace(s, base={}) for s in (good, other)]
    with pytest.raises(BaseMismatchError, match=r"\(out, in\).*different base models"):
        merge(stripped, "cat")


@pytest.mark.parametrize("form", ["dora", "loldu"])
def test_non_lora_like_form(good, form):
    other = make_state(r=3, seed=1, form=form)
    with pytest.raises(MergeInputError, match=f"form '{form}' is not LoRA-like.*lorakit export"):
        merge([good, other], "linear")


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0]])
def test_weights_length_mismatch(good, weights):
    with pytest.raises(MergeInputError, match=r"weight\(s\) given for 2 adapter\(s\); give exactly one weight"):
        merge([good, good], "ties", weights)


def test_non_finite_weights(good):
    with pytest.raises(MergeInputError, match="finite"):
        merge([good, good], "linear", [1.0, float("nan")])


def test_unknown_method_lists_the_known_ones(good):
    with pytest.raises(UnknownMethodError, match="unknown merge 'avg'; known merges: linear, cat"):
        merge([good], "avg")


@pytest.mark.parametrize("method,args,message", [
    ("cat", {"k": 2}, r"merge method 'cat': unknown argument\(s\) \['k'\]"),
    ("lego", {"clusters": 2}, r"unknown argument\(s\) \['clusters'\]"),
    ("svd", {"k": 0}, "k .output rank. must be a positive integer"),
    ("ties", {"density": 0.0}, r"density must be in \(0, 1\]"),
    ("dare_ties", {"consensus": "vote"}, r"consensus must be one of \('sum', 'count'\), got 'vote'"),
    ("dare_linear", {"rescale": "l3"}, "rescale must be one of"),
    ("lego", {"canonicalize": "yes"}, r"canonicalize must be one of \('none', 'sign', 'scale', 'both'\), got 'yes'"),
    ("lego", {"backend": "faiss"}, "backend must be one of"),
])
def test_bad_method_arguments(good, method, args, message):
    with pytest.raises(ValueError, match=message):
        merge([good], method, **args)


def test_lego_k_larger_than_the_msu_pool(good):
    with pytest.raises(MergeInputError, match=r"k=7 is larger than the pool of 6 MSUs .* choose k <= 6"):
        merge([good, good], "lego", k=7)


def test_not_a_state(good):
    with pytest.raises(MergeInputError, match="item #1 to merge is a dict"):
        merge([good, {}], "cat")


def test_missing_folder(tmp_path):
    from lorakit.core.state import AdapterFileError

    with pytest.raises(AdapterFileError, match="adapter folder not found"):
        merge([tmp_path / "nope"], "cat")
