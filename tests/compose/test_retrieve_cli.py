"""AutoLoRA index files and `lorakit retrieve build|query`: save/load round trip (same embeddings, same
scores), the CLI retrieves each adapter by its description, merges the hits into a PEFT-format adapter
equal to merging them in Python, and refuses missing or corrupt indexes with a clear message."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import lorakit
from lorakit.api import extract_state
from lorakit.cli import app
from lorakit.compose.merge import merge
from lorakit.compose.retrieve.autolora import AutoLoRARetriever, RetrieveError
from lorakit.core.spec import AdapterSpec
from lorakit.models import tiny_llama

try:
    from tests.conftest import randomize_adapter
except ModuleNotFoundError:
    from conftest import randomize_adapter

TOPICS = ["medicine", "mathematics", "poetry", "law"]
DESCS = {t: f"an adapter for {t} questions" for t in TOPICS}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    out = []
    for i, t in enumerate(TOPICS):
        model = tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)
        lorakit.attach(model, AdapterSpec(form="lora", form_args={"r": 2, "alpha": 4.0}, targets=["q_proj", "v_proj"]),
                       seed=i)
        randomize_adapter(model, seed=i + 50, std=0.3)
        lorakit.save_state(extract_state(model), root / t)
        out.append(root / t)
    (root / "descriptions.json").write_text(json.dumps(DESCS))
    return out


def run(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.output + (res.stderr if res.stderr_bytes is not None else "")


def test_index_save_load_round_trip(folders, tmp_path):
    r = AutoLoRARetriever("hash", steps=60).index(folders, [DESCS[t] for t in TOPICS])
    r.save(tmp_path)
    again = AutoLoRARetriever.load(tmp_path)
    assert torch.equal(again.embeddings, r.embeddings) and again.names == TOPICS
    assert again.query(DESCS["law"], k=4) == r.query(DESCS["law"], k=4)
    # the loaded encoder embeds an adapter exactly as the trained one did
    again.add([folders[1]], names=["maths-copy"])
    assert torch.allclose(again.embeddings[-1], r.embeddings[1], atol=1e-6)
    assert again.states(again.query(DESCS["poetry"], k=1))[0].tensors.keys() == \
        lorakit.load_state(folders[2]).tensors.keys()


def test_cli_build_query_merge(folders, tmp_path):
    index = tmp_path / "index"
    code, out = run("retrieve", "build", *folders, "--descriptions", folders[0].parent / "descriptions.json",
                    "--out", index, "--text-encoder", "hash", "--steps", "150")
    assert code == 0, out
    assert "own description top-1: 4/4" in out
    for t in TOPICS:
        code, out = run("retrieve", "query", index, DESCS[t], "--top-k", "2", "--json")
        assert code == 0, out
        hits = json.loads(out.splitlines()[0])
        assert hits[0]["name"] == t and len(hits) == 2 and hits[0]["score"] >= hits[1]["score"]
    code, out = run("retrieve", "query", index, DESCS["law"], "--top-k", "2", "--merge", "linear",
                    "--out", tmp_path / "merged")
    assert code == 0, out
    assert out.splitlines()[0].startswith("1. law")
    second = out.splitlines()[1].split()[1]
    ours = lorakit.load_state(tmp_path / "merged")
    ref = merge([folders[TOPICS.index("law")], folders[TOPICS.index(second)]], "linear")
    assert ours.tensors.keys() == ref.tensors.keys()
    assert all(torch.allclose(ours.tensors[k], ref.tensors[k], atol=1e-6) for k in ref.tensors)


def test_cli_errors(folders, tmp_path):
    code, out = run("retrieve", "query", tmp_path / "nothing", "x")
    assert code == 2 and "not a retriever index" in out
    code, out = run("retrieve", "query", tmp_path, "x", "--merge", "linear")
    assert code == 2 and "--merge needs --out" in out
    bad = tmp_path / "two.txt"
    bad.write_text("one\ntwo\n")
    code, out = run("retrieve", "build", *folders, "--descriptions", bad, "--out", tmp_path / "i", "--text-encoder",
                    "hash", "--steps", "2")
    assert code == 2 and "2 description(s) for 4 adapter(s)" in out
    index = tmp_path / "index"
    AutoLoRARetriever("hash", steps=2).index(folders, [DESCS[t] for t in TOPICS]).save(index)
    (index / "index.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(RetrieveError, match="corrupt retriever tensors"):
        AutoLoRARetriever.load(index)
    (index / "lorakit_retriever.json").write_text("{not json")
    code, out = run("retrieve", "query", index, "x")
    assert code == 2 and "corrupt index description" in out
