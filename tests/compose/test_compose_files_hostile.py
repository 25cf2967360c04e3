"""Router folders (``load_routed``) and AutoLoRA index folders (``AutoLoRARetriever.load``) are untrusted input,
read by the adapter-folder rules of ``core.state``: a symlink to /dev/zero, a FIFO, a link out of the folder, a
truncated file, JSON nested 100,000 deep, wrong field types, NaN or integer tensors, shapes that disagree with
the JSON (checked before anything is allocated) all fail fast with a ``RouterError`` / ``RetrieveError`` naming
the file; a failed router load leaves the model unrouted."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.api import extract_state
from lorakit.compose.retrieve.autolora import (
    EMBEDDINGS_FILE,
    ENCODER_FILE,
    INDEX_FILE,
    AutoLoRARetriever,
    RetrieveError,
)
from lorakit.compose.route import RouterError, fresh_bank, load_routed, route
from lorakit.compose.route.base import BANK_FILE, GATES_FILE, ROUTER_FILE
from lorakit.core.spec import AdapterSpec
from lorakit.models import tiny_llama

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
IDS = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
Mutation = Callable[[Path], None]


def _within(fn: Callable[[], Any], timeout: float = 10.0) -> BaseException | None:
    box: dict[str, Any] = {"error": None}

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the load hangs"
    return box["error"]


def _edit_json(name: str, edit: Callable[[dict[str, Any]], None]) -> Mutation:
    def mutate(d: Path) -> None:
        data = json.loads((d / name).read_text())
        edit(data)
        (d / name).write_text(json.dumps(data))
    return mutate


def _set(name: str, key: str, value: Any) -> Mutation:
    return _edit_json(name, lambda data: data.__setitem__(key, value))


def _replace(name: str, make: Callable[[Path], None]) -> Mutation:
    def mutate(d: Path) -> None:
        (d / name).unlink()
        make(d / name)
    return mutate


def _edit_tensors(name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Mutation:
    def mutate(d: Path) -> None:
        t = load_file(str(d / name))
        edit(t)
        save_file(t, str(d / name))
    return mutate


def _first(pred: Callable[[str], bool], fn: Callable[[torch.Tensor], torch.Tensor]):
    def edit(t: dict[str, torch.Tensor]) -> None:
        k = next(k for k in sorted(t) if pred(k))
        t[k] = fn(t[k])
    return edit


def _outside(path: Path) -> None:
    target = path.parent.parent / f"outside-{path.name}"
    shutil.copy(path.parent.parent / "_orig" / path.name, target)
    os.symlink(target, path)


def file_attacks(name: str) -> list[tuple[str, Mutation]]:
    return [
        (f"{name} -> /dev/zero", _replace(name, lambda p: os.symlink("/dev/zero", p))),
        (f"{name} is a FIFO", _replace(name, lambda p: os.mkfifo(p))),
        (f"{name} is a directory", _replace(name, lambda p: p.mkdir())),
        (f"{name} links outside the folder", _replace(name, _outside)),
        (f"{name} missing", lambda d: (d / name).unlink()),
        (f"{name} truncated", lambda d: (d / name).write_bytes((d / name).read_bytes()[: len((d / name).read_bytes())
                                                                                       // 2])),
        (f"{name} empty", lambda d: (d / name).write_bytes(b"")),
    ]


def json_attacks(name: str) -> list[tuple[str, Mutation]]:
    return [
        (f"{name} nested 100,000 deep", lambda d: (d / name).write_text("[" * 100_000 + "]" * 100_000)),
        (f"{name} not an object", lambda d: (d / name).write_text("[1, 2]")),
        (f"{name} NaN", lambda d: (d / name).write_text('{"format_version": NaN}')),
        (f"{name} not JSON", lambda d: (d / name).write_text("{not json")),
    ]


def _run_cases(original: Path, tmp_path: Path, cases: list[tuple[str, Mutation]], load: Callable[[Path], Any],
               error: type[Exception], check: Callable[[], None] | None = None) -> None:
    failures = []
    shutil.copytree(original, tmp_path / "_orig")
    for i, (label, mutate) in enumerate(cases):
        d = tmp_path / f"case{i}"
        shutil.copytree(original, d)
        mutate(d)
        err = _within(lambda d=d: load(d))
        if not isinstance(err, error):
            failures.append(f"{label}: expected {error.__name__}, got {err!r}")
        elif str(d) not in str(err):
            failures.append(f"{label}: message does not name the file: {err}")
        if check is not None:
            check()
    assert not failures, "\n".join(failures)


# -- routers ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def router_dir(tmp_path_factory) -> Path:
    model = tiny_llama(seed=0)
    routed = route(model, fresh_bank(model, TARGETS, k=3, r=4, seed=0), "lora_mixer", regime="joint", top_k=2)
    return routed.save(tmp_path_factory.mktemp("router") / "r")


def router_cases() -> list[tuple[str, Mutation]]:
    q = TARGETS[0]
    cases = file_attacks(ROUTER_FILE) + file_attacks(BANK_FILE) + file_attacks(GATES_FILE) + json_attacks(ROUTER_FILE)
    for key, values in {"format_version": ["1", None, 0, 99, True], "method": [5, None, "no-such-router"],
                        "names": ["x", [], [1, 2, 3]], "args": [[], "x", {"no_such_arg": 1}, {"top_k": "2"}],
                        "extra": [[]], "ranks": [[], {}, {q: 4}, {q: [4, 4]}, {q: [4, 4, "4"]}, {q: [0, 4, 4]},
                                                 {"no.such.module": [4, 4, 4]}, {q: [10**9, 4, 4]}]}.items():
        cases += [(f"{ROUTER_FILE} {key} = {v!r:.40}", _set(ROUTER_FILE, key, v)) for v in values]
    cases += [
        (f"{BANK_FILE}: int A", _edit_tensors(BANK_FILE, _first(lambda k: k.endswith(".A"), lambda t: t.long()))),
        (f"{BANK_FILE}: NaN B", _edit_tensors(BANK_FILE, _first(lambda k: k.endswith(".B"),
                                                                lambda t: t.fill_(float("nan"))))),
        (f"{BANK_FILE}: A of the wrong rank", _edit_tensors(BANK_FILE, _first(lambda k: k.endswith(".A"),
                                                                              lambda t: t[:, :2].contiguous()))),
        (f"{BANK_FILE}: a scale too many", _edit_tensors(BANK_FILE, _first(lambda k: k.endswith(".scale"),
                                                                           lambda t: torch.cat([t, t[:1]])))),
        (f"{BANK_FILE}: an unexpected tensor", _edit_tensors(BANK_FILE, lambda t: t.update(extra=torch.zeros(2)))),
        (f"{GATES_FILE}: bool gate", _edit_tensors(GATES_FILE, _first(lambda k: True, lambda t: t.bool()))),
        (f"{GATES_FILE}: Inf gate", _edit_tensors(GATES_FILE, _first(lambda k: True, lambda t: t.fill_(float("inf"))))),
        (f"{GATES_FILE}: gate of the wrong shape", _edit_tensors(GATES_FILE, _first(lambda k: "gate" in k,
                                                                                  lambda t: torch.zeros(7, 3)))),
        (f"{GATES_FILE}: a missing gate", _edit_tensors(GATES_FILE, lambda t: t.pop(next(k for k in sorted(t)
                                                                                          if "gate" in k)))),
    ]
    return cases


def test_the_router_folder_loads(router_dir: Path) -> None:
    load_routed(tiny_llama(seed=0), router_dir)


def test_hostile_router_folders_fail_with_a_named_error(router_dir: Path, tmp_path: Path) -> None:
    cases = router_cases()
    assert len(cases) >= 50, len(cases)
    model = tiny_llama(seed=0)
    with torch.no_grad():
        before = model(input_ids=IDS).logits

    def unchanged() -> None:
        with torch.no_grad():
            assert torch.equal(model(input_ids=IDS).logits, before), "a failed load left the model changed"

    _run_cases(router_dir, tmp_path, cases, lambda d: load_routed(model, d), RouterError, unchanged)
    load_routed(model, router_dir)  # the model is still unrouted: a good folder loads onto it


# -- AutoLoRA index -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    states = []
    for i in range(3):
        model = tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)
        lorakit.attach(model, AdapterSpec(form="lora", form_args={"r": 2, "alpha": 4.0}, targets=["q_proj", "v_proj"]),
                       seed=i)
        states.append(extract_state(model))
    r = AutoLoRARetriever("hash", steps=2).index(states, [f"adapter {i}" for i in range(3)])
    return r.save(tmp_path_factory.mktemp("index") / "i")


def index_cases() -> list[tuple[str, Mutation]]:
    cases = (file_attacks(INDEX_FILE) + file_attacks(ENCODER_FILE) + file_attacks(EMBEDDINGS_FILE)
             + json_attacks(INDEX_FILE))
    for key, values in {"format_version": ["1", None, 99], "text_encoder": [5, None, "no-such-encoder"],
                        "text_dim": ["64", 0, 10**9, 2.5], "names": ["x", [], [1, 2, 3]],
                        "sources": ["x", [None], [1, 2, 3]], "losses": ["x", [None]],
                        "args": [[], {"d_model": 10**9}, {"layers": 10**6}, {"heads": 0}, {"lr": "x"},
                                 {"no_such_arg": 1}, {"d_model": 48}],
                        "shapes": [[], {}, {"model.layers.0.self_attn.q_proj": [10**9, 32]},
                                   {"model.layers.0.self_attn.q_proj": "32x32"}]}.items():
        cases += [(f"{INDEX_FILE} {key} = {v!r:.40}", _set(INDEX_FILE, key, v)) for v in values]
    cases += [
        (f"{ENCODER_FILE}: int probe", _edit_tensors(ENCODER_FILE, _first(lambda k: k.startswith("probes."),
                                                                          lambda t: t.long()))),
        (f"{ENCODER_FILE}: NaN head", _edit_tensors(ENCODER_FILE, _first(lambda k: k == "head.weight",
                                                                         lambda t: t.fill_(float("nan"))))),
        (f"{ENCODER_FILE}: a layer too many", _edit_tensors(ENCODER_FILE, lambda t: t.update(
            {k.replace("layers.0.", "layers.9."): v.clone() for k, v in list(t.items()) if ".layers.0." in k}))),
        (f"{ENCODER_FILE}: a huge encoder tensor", _edit_tensors(ENCODER_FILE, _first(
            lambda k: k.startswith("encoder.") and k.endswith("linear1.weight"), lambda t: torch.zeros(4096, 64)))),
        (f"{EMBEDDINGS_FILE}: one embedding too few", _edit_tensors(EMBEDDINGS_FILE, _first(
            lambda k: True, lambda t: t[:-1].contiguous()))),
        (f"{EMBEDDINGS_FILE}: int embeddings", _edit_tensors(EMBEDDINGS_FILE, _first(lambda k: True,
                                                                                     lambda t: t.int()))),
        (f"{EMBEDDINGS_FILE}: another tensor name", _edit_tensors(EMBEDDINGS_FILE, lambda t: t.update(
            other=t.pop("embeddings")))),
    ]
    return cases


def test_the_index_folder_loads(index_dir: Path) -> None:
    r = AutoLoRARetriever.load(index_dir)
    assert len(r.query("adapter 1", k=2)) == 2


def test_hostile_index_folders_fail_with_a_named_error(index_dir: Path, tmp_path: Path) -> None:
    cases = index_cases()
    assert len(cases) >= 50, len(cases)
    _run_cases(index_dir, tmp_path, cases, AutoLoRARetriever.load, RetrieveError)
