"""Regex backtracking (ReDoS) in adapter files: a pattern such as ``(.*)*Z`` in ``rank_pattern``,
``alpha_pattern``, ``target_modules`` (PEFT) or ``spec.targets`` / ``spec.module_args`` (lorakit.json) would
take minutes to match against a module path; loading such a file fails fast with an ``AdapterFileError``
naming the file and the field. Patterns real adapters use still load."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import lorakit
from lorakit.core.spec import AdapterSpec
from lorakit.core.state import (
    MAX_LITERAL_PATTERN_CHARS,
    MAX_PATTERN_REPEATS,
    AdapterFileError,
    _regex_hazard,
    check_regex,
)

HOSTILE = ["(.*)*Z", "([a-z_.0-9]+)*Z", r"(.|\w)*Z", r"(\w+\.?)+Z", "(a+)+$", "(a|a)*$", "(a?)+$", r"(q)\1",
           r"(?P<x>q)(?(x)a|b)", ".*" * (MAX_PATTERN_REPEATS + 1) + "Z", ".*" + "q" * 2000,
           "q" * (MAX_LITERAL_PATTERN_CHARS + 1)]
FINE = ["q_proj", r".*\.(q|v)_proj", r"layers\.\d+\.mlp\..*", r"^(?!.*vision).*q_proj", "q_proj|v_proj",
        r"model\.layers\.[0-9]+\.self_attn\.(q_proj|k_proj)", r"^model\.layers\.0\.self_attn\.q_proj", "(a|b)+x",
        r"(\.[0-9])+x", "^(q_proj|v_proj)$", ".*.*.*x",
        # what lorakit writes as PEFT target_modules for a selection that is no name list: long, no quantifier
        "^(" + "|".join(re.escape(f"model.layers.{i}.self_attn.{m}_proj") for i in range(200) for m in "qkvo") + ")$"]


def _llama() -> torch.nn.Module:
    from lorakit.models import tiny_llama

    return tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=64, seed=0)


def _load_within(fn, timeout: float) -> tuple[bool, BaseException | None]:
    box: dict[str, Any] = {"error": None}

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), box["error"]


@pytest.mark.parametrize("pattern", HOSTILE)
def test_hostile_patterns_are_refused(pattern: str) -> None:
    assert _regex_hazard(pattern) is not None
    with pytest.raises(AdapterFileError, match=r"cfg\.json: field 'rank_pattern'"):
        check_regex(pattern, Path("cfg.json"), "rank_pattern")


@pytest.mark.parametrize("pattern", FINE)
def test_patterns_real_adapters_use_pass(pattern: str) -> None:
    assert _regex_hazard(pattern) is None
    check_regex(pattern, Path("cfg.json"), "rank_pattern")


def test_the_hostile_pattern_really_backtracks() -> None:
    """Why this matters: unvalidated, ``(.*)*Z`` on a 20-character path already takes milliseconds, doubling per
    character (a real module path of 31 characters: minutes)."""
    times = []
    for n in (12, 16):
        t0 = time.perf_counter()
        re.match(r"(.*\.)?((.*)*Z)$", "model.layers.0.self_attn.q_proj"[-n:])
        times.append(time.perf_counter() - t0)
    assert times[1] > 4 * times[0] or times[1] > 0.01


def _peft_folder(tmp_path: Path) -> Path:
    model = _llama()
    lorakit.attach(model, AdapterSpec(targets=["q_proj", "v_proj"], form_args={"r": 4, "alpha": 8}), seed=0)
    lorakit.save(model, tmp_path / "lorakit")
    peft = tmp_path / "peft"
    peft.mkdir()
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (peft / f).write_bytes((tmp_path / "lorakit" / f).read_bytes())
    return peft


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern", "target_modules"])
def test_loading_a_peft_folder_with_a_redos_pattern_fails_fast(tmp_path: Path, field: str) -> None:
    folder = _peft_folder(tmp_path)
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config[field] = "(.*)*Z" if field == "target_modules" else {"(.*)*Z": 2 if field == "rank_pattern" else 4.0}
    config_file.write_text(json.dumps(config))
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    done, error = _load_within(lambda: lorakit.load(model, folder), timeout=10.0)
    elapsed = time.perf_counter() - t0
    assert done, "the load is still backtracking"
    assert elapsed < 1.0, elapsed
    assert isinstance(error, AdapterFileError), repr(error)
    assert "adapter_config.json" in str(error) and repr(field) in str(error) and "refused" in str(error)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_loading_lorakit_json_with_a_redos_module_args_pattern_fails_fast(tmp_path: Path) -> None:
    model = _llama()
    lorakit.attach(model, AdapterSpec(targets=["q_proj", "v_proj"], form_args={"r": 4, "alpha": 8}), seed=0)
    folder = tmp_path / "ad"
    lorakit.save(model, folder)
    meta_file = folder / "lorakit.json"
    meta = json.loads(meta_file.read_text())
    meta["spec"]["module_args"] = {r"(\w+\.?)+Z": {"r": 2}}
    meta_file.write_text(json.dumps(meta))
    t0 = time.perf_counter()
    done, error = _load_within(lambda: lorakit.load(_llama(), folder), timeout=10.0)
    assert done and time.perf_counter() - t0 < 1.0
    assert isinstance(error, AdapterFileError) and "lorakit.json" in str(error) and "module_args" in str(error)


def test_a_peft_folder_with_ordinary_patterns_still_loads(tmp_path: Path) -> None:
    folder = _peft_folder(tmp_path)
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = r".*\.(q_proj|v_proj)"
    config["alpha_pattern"] = {r"layers\.\d+\.self_attn\.q_proj": 8.0}
    config_file.write_text(json.dumps(config))
    lorakit.load(_llama(), folder)
