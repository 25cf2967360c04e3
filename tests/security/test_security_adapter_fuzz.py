"""Fuzz corpus of hostile adapter folders (issue 13, "Adapter files").

A valid lorakit folder and a valid PEFT folder are mutated programmatically into >= 150 bad folders:
truncated files, wrong types per field, hostile names and symlinks (/dev/zero, FIFOs, outside the folder),
huge ranks, NaN/Infinity, int/bool tensors, deep and oversized JSON, a legacy pickle that would run code.
For every case: ``lorakit.load`` raises a named lorakit error within a per-case timeout (each load runs in a
daemon thread: a FIFO read would block forever), the model is unchanged, no code ran (a marker file is
never created), and ``lorakit inspect DIR`` exits 2 with a one-line message and no traceback.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lorakit
from lorakit import AdapterFileError, AdapterSpec, BaseMismatchError
from lorakit.cli import app
from lorakit.core.state import LORAKIT_FILE, PEFT_CONFIG_FILE, TENSORS_FILE
from lorakit.models import tiny_llama

CASE_TIMEOUT_S = 10.0  # generous for 2 shared cores; a hang is infinite, a slow case is ~50 ms
TOTAL_BUDGET_S = 60.0
LIKE_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

Mutation = Callable[[Path], None]


def _llama() -> torch.nn.Module:
    return tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)


# -- helpers that edit a folder --------------------------------------------------------------------

def _edit_json(name: str, edit: Callable[[dict[str, Any]], None]) -> Mutation:
    def mutate(d: Path) -> None:
        data = json.loads((d / name).read_text())
        edit(data)
        (d / name).write_text(json.dumps(data))  # json.dumps writes NaN/Infinity for non-finite floats
    return mutate


def _set(name: str, dotted: str, value: Any) -> Mutation:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = dotted.split(".")
        for p in parents:
            data = data[p]
        data[last] = value
    return _edit_json(name, edit)


def _delete(name: str, dotted: str) -> Mutation:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = dotted.split(".")
        for p in parents:
            data = data[p]
        del data[last]
    return _edit_json(name, edit)


def _raw(name: str, content: bytes) -> Mutation:
    def mutate(d: Path) -> None:
        (d / name).write_bytes(content)
    return mutate


def _truncate(name: str, keep: Callable[[int], int]) -> Mutation:
    def mutate(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: keep(len(data))])
    return mutate


def _replace_with(name: str, make: Callable[[Path], None]) -> Mutation:
    def mutate(d: Path) -> None:
        (d / name).unlink()
        make(d / name)
    return mutate


def _symlink(target: str | Callable[[Path], str]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        os.symlink(target(path) if callable(target) else target, path)
    return make


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.mkdir()


def _outside_copy(path: Path) -> str:
    """A VALID copy of the file outside the folder: loading it would still be reading outside."""
    outside = path.parent.parent / f"outside-{path.parent.name}-{path.name}"
    shutil.copyfile(path.parent.parent / "_originals" / path.parent.name.split("-")[0] / path.name, outside)
    return str(outside)


def _rechecksum(d: Path) -> None:
    """Record the tensor file's new SHA-256 in lorakit.json, so the mutation reaches the parser."""
    import hashlib

    info = json.loads((d / LORAKIT_FILE).read_text())
    info["tensors_sha256"] = hashlib.sha256((d / TENSORS_FILE).read_bytes()).hexdigest()
    (d / LORAKIT_FILE).write_text(json.dumps(info))


def _checksummed(mutate: Mutation) -> Mutation:
    def run(d: Path) -> None:
        mutate(d)
        _rechecksum(d)
    return run


def _rewrite_tensors(edit: Callable[[dict[str, torch.Tensor]], None], *, fix_checksum: bool = True) -> Mutation:
    """Change the tensors; in a lorakit folder also update the checksum so the dtype/shape checks are hit."""
    def mutate(d: Path) -> None:
        tensors = load_file(str(d / TENSORS_FILE))
        edit(tensors)
        save_file(tensors, str(d / TENSORS_FILE), metadata={"format": "pt"})
        if fix_checksum and (d / LORAKIT_FILE).exists():
            _rechecksum(d)
    return mutate


def _retype(key_part: str, dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        for k in tensors:
            if key_part in k:
                tensors[k] = (tensors[k] * 10).to(dtype)
    return edit


class _Exploit:
    """A pickle that would create the marker file if unpickled without weights_only."""

    marker: str = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _legacy_pickle(marker: Path) -> Mutation:
    def mutate(d: Path) -> None:
        (d / TENSORS_FILE).unlink()
        _Exploit.marker = str(marker)
        (d / "adapter_model.bin").write_bytes(pickle.dumps({LIKE_A: _Exploit()}))
    return mutate


def _legacy_torch_save(obj: Any) -> Mutation:
    def mutate(d: Path) -> None:
        (d / TENSORS_FILE).unlink()
        torch.save(obj, d / "adapter_model.bin")
    return mutate


def _safetensors_header(header: bytes, length: int | None = None, tail: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + tail


# -- the corpus ------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
DEEP = b"[" * 100_000 + b"]" * 100_000


def _file_attacks(name: str) -> list[tuple[str, Mutation]]:
    """Attacks on one file lorakit reads, whatever its role."""
    return [
        (f"{name}: empty", _raw(name, b"")),
        (f"{name}: 1 byte", _truncate(name, lambda n: 1)),
        (f"{name}: 8 bytes", _truncate(name, lambda n: 8)),
        (f"{name}: half", _truncate(name, lambda n: n // 2)),
        (f"{name}: all but 2 bytes", _truncate(name, lambda n: n - 2)),  # JSON: "}\n" gone
        (f"{name}: random bytes", _raw(name, os.urandom(4096))),
        (f"{name}: symlink to /dev/zero", _replace_with(name, _symlink("/dev/zero"))),
        (f"{name}: symlink to /dev/null", _replace_with(name, _symlink("/dev/null"))),
        (f"{name}: symlink to /dev/urandom", _replace_with(name, _symlink("/dev/urandom"))),
        (f"{name}: FIFO", _replace_with(name, _fifo)),
        (f"{name}: symlink to a FIFO", _replace_with(name, lambda p: (os.mkfifo(p.with_name("pipe")),
                                                                       os.symlink("pipe", p)))),
        (f"{name}: directory", _replace_with(name, _directory)),
        (f"{name}: symlink to /", _replace_with(name, _symlink("/"))),
        (f"{name}: dangling symlink", _replace_with(name, _symlink("no-such-file"))),
        (f"{name}: symlink loop", _replace_with(name, _symlink(name))),
        (f"{name}: symlink to a valid copy outside the folder", _replace_with(name, _symlink(_outside_copy))),
        (f"{name}: relative symlink out of the folder", _replace_with(name, _symlink(lambda p: "../../" + p.name))),
    ] + ([] if name == LORAKIT_FILE else [(f"{name}: missing", lambda d: (d / name).unlink())])
    # (a lorakit folder without lorakit.json is a valid PEFT folder)


def _json_attacks(name: str) -> list[tuple[str, Mutation]]:
    return [
        (f"{name}: 100,000 deep", _raw(name, DEEP)),
        (f"{name}: 100,000 deep inside an object", _raw(name, b'{"a": ' + DEEP + b"}")),
        (f"{name}: 17 MiB", _raw(name, b"{" + b" " * (17 << 20) + b"}")),
        (f"{name}: top-level list", _raw(name, b"[]")),
        (f"{name}: top-level string", _raw(name, b'"lora"')),
        (f"{name}: top-level number", _raw(name, b"5")),
        (f"{name}: top-level null", _raw(name, b"null")),
        (f"{name}: NaN literal", _raw(name, b"NaN")),
        (f"{name}: invalid utf-8", _raw(name, b'{"\xff\xfe": 1}')),
        (f"{name}: 10,000-digit integer", _raw(name, b'{"r": ' + b"9" * 10_000 + b"}")),
    ]


def _tensor_attacks(*, checksummed: bool) -> list[tuple[str, Mutation]]:
    st = TENSORS_FILE
    return [
        ("tensors: int32 lora_A", _rewrite_tensors(_retype("lora_A", torch.int32))),
        ("tensors: int64 lora_B", _rewrite_tensors(_retype("lora_B", torch.int64))),
        ("tensors: bool lora_A", _rewrite_tensors(_retype("lora_A", torch.bool))),
        ("tensors: uint8 everything", _rewrite_tensors(_retype("lora_", torch.uint8))),
        ("tensors: int8 lora_B", _rewrite_tensors(_retype("lora_B", torch.int8))),
        ("tensors: wrong key prefix", _rewrite_tensors(lambda t: t.update({"evil.key": torch.zeros(2)}))),
        ("tensors: none at all", _rewrite_tensors(lambda t: t.clear() or t.update({}))),
    ] + ([("tensors: changed, old checksum", _rewrite_tensors(lambda t: t.update({k: v + 1 for k, v in t.items()}),
                                                              fix_checksum=False))] if checksummed else []) + [
        ("safetensors: header length 2**63", _raw(st, _safetensors_header(b"{}", length=1 << 63))),
        ("safetensors: header length past the end", _raw(st, _safetensors_header(b"{}", length=10_000))),
        ("safetensors: header not JSON", _raw(st, _safetensors_header(b"{not json"))),
        ("safetensors: header deep", _raw(st, _safetensors_header(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}"))),
        ("safetensors: unknown dtype", _raw(st, _safetensors_header(
            json.dumps({LIKE_A: {"dtype": "Q9", "shape": [4, 32], "data_offsets": [0, 512]}}).encode(),
            tail=b"\0" * 512))),
        ("safetensors: shape larger than data", _raw(st, _safetensors_header(
            json.dumps({LIKE_A: {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 16]}}).encode(),
            tail=b"\0" * 16))),
        ("safetensors: offsets overlap", _raw(st, _safetensors_header(
            json.dumps({LIKE_A: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        LIKE_A + "x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode(),
            tail=b"\0" * 12))),
    ]


# Regexes that backtrack for minutes against the module paths (ReDoS) or that the validator refuses as such:
# nested quantifiers, overlapping alternation under a repeat, a backreference, too many quantifiers, too long.
REDOS = ["(.*)*Z", "([a-z_.0-9]+)*Z", r"(.|\w)*Z", r"(\w+\.?)+Z", r"(q)\1", ".*.*.*.*.*Z", ".*" + "q" * 2000]


def lorakit_cases(marker: Path) -> list[tuple[str, Mutation]]:
    lj = LORAKIT_FILE
    cases = _file_attacks(lj) + _file_attacks(TENSORS_FILE) + _json_attacks(lj) + _tensor_attacks(checksummed=True)
    # the same broken tensor files with a matching checksum: the safetensors parser itself must refuse them
    raw = [c for c in _file_attacks(TENSORS_FILE) + _tensor_attacks(checksummed=False)
           if c[0].startswith("safetensors:") or c[0].split(": ")[1] in ("empty", "1 byte", "8 bytes", "half",
                                                                          "all but 2 bytes", "random bytes")]
    cases += [(f"{label} (checksum updated)", _checksummed(m)) for label, m in raw]
    bad_values: dict[str, list[Any]] = {
        "format_version": ["1", 1.5, None, True, [1], 99],
        "spec": ["lora", [], None, 5],
        "spec.form": [5, None, ["lora"], "no-such-form"],
        "spec.form_args": [[], "r=4", 5],
        "spec.form_args.r": ["4", 4.5, 0, -1, 10**9, 2**70, True, None, [4]],
        "spec.form_args.alpha": [NAN, INF, -INF, "8", [8], True, None],
        "spec.form_args.dropout": [NAN, "0.1", 2.0],
        "spec.form_args.no_such_arg": [1],
        "spec.targets": [5, None, [1, 2], {"q_proj": 1}, "(unclosed", "a)|(b", *REDOS],
        "spec.exclude": ["q_proj", 5, [None]],
        "spec.module_args": [[], "x", {"(": {"r": 4}}, {"q_proj": 4}, {"q_proj": {"r": "4"}},
                             {"q_proj": {"alpha": NAN}}, {"q_proj": {"r": 10**9}},
                             *({p: {"r": 2}} for p in REDOS)],
        "spec.modules_to_save": ["lm_head", 5, [1]],
        "spec.init": [5, None],
        "spec.init_args": [[], "x"],
        "spec.no_such_field": [1],
        "files": [[], "adapter_model.safetensors", {"weird": TENSORS_FILE}, {"initial": TENSORS_FILE}],
        "files.native": ["/etc/passwd", "/dev/zero", "../outside.safetensors", "sub/adapter_model.safetensors",
                         "..", ".", "", "a\x00b", 5, None, ["x"], "no-such-file.safetensors",
                         "C:\\evil.safetensors"],
        "tensors_sha256": [["x"], 5, "not-a-digest", "0" * 64],
        "sha256": [["x"], "abc", {"native": ["x"]}, {"native": 5}],
        "base": [[], "x", 5],
        "base.weight_stats": ["x", [None], {"a": 1}],
        "base.model_type": [5],
        "meta": [[], "x"],
        "meta.fan_in_fan_out": ["no"],
        "meta.peft_target_modules": [5, [1]],
    }
    for field, values in bad_values.items():
        for v in values:
            if field == "files.native":
                mutate = _set(lj, "files", {"native": v})
            elif field == "sha256":
                mutate = _set(lj, "sha256", v)
            else:
                mutate = _set(lj, field, v)
            cases.append((f"lorakit.json {field} = {v!r:.40}", mutate))
    cases += [
        ("lorakit.json: no spec", _delete(lj, "spec")),
        ("lorakit.json: no format_version", _delete(lj, "format_version")),
        ("legacy .bin: pickle that runs code", _legacy_pickle(marker)),
        ("legacy .bin: not a dict", _legacy_torch_save([torch.zeros(2)])),
        ("legacy .bin: a non-tensor value", _legacy_torch_save({LIKE_A: 5})),
        ("legacy .bin: garbage", lambda d: ((d / TENSORS_FILE).unlink(),
                                            (d / "adapter_model.bin").write_bytes(os.urandom(512)))),
    ]
    return cases


def peft_cases(marker: Path) -> list[tuple[str, Mutation]]:
    pc = PEFT_CONFIG_FILE
    cases = _file_attacks(pc) + _file_attacks(TENSORS_FILE) + _json_attacks(pc) + _tensor_attacks(checksummed=False)
    bad_values: dict[str, list[Any]] = {
        "peft_type": [5, None, "", ["LORA"], "NOT_A_TYPE"],
        "target_modules": [5, None, [1], {"q_proj": 1}, "(unclosed", "a)|(b", True, *REDOS],
        "rank_pattern": [["q_proj"], "q_proj", 5, {"(": 4}, {"q_proj": "4"}, {"q_proj": 0}, {"q_proj": 10**9},
                         {"q_proj": True}, {"q_proj": 4.5}, {"q_proj": NAN}, *({p: 2} for p in REDOS)],
        "alpha_pattern": ["q_proj", [], {"[": 8}, {"q_proj": NAN}, {"q_proj": INF}, {"q_proj": "8"},
                          {"q_proj": None}, *({p: 4.0} for p in REDOS)],
        "r": ["4", 4.5, 0, -3, 10**9, True, None, 2**64, [4]],
        "lora_alpha": [NAN, INF, -INF, "16", [16], True, None],
        "lora_dropout": ["0.1", [], True, NAN, 1.5],
        "use_rslora": ["false", 1, None],
        "use_dora": ["yes", 1],
        "lora_bias": ["no"],
        "fan_in_fan_out": ["no", 0],
        "modules_to_save": ["lm_head", 5, [1]],
        "bias": [5, "all"],
        "task_type": [5, []],
        "inference_mode": ["true"],
        "base_model_name_or_path": [5],
        "exclude_modules": [5, [1]],
    }
    for field, values in bad_values.items():
        for v in values:
            cases.append((f"adapter_config.json {field} = {v!r:.40}", _set(pc, field, v)))
    cases += [
        ("adapter_config.json: no peft_type", _delete(pc, "peft_type")),
        ("adapter_config.json: no target_modules", _delete(pc, "target_modules")),
        ("legacy .bin: pickle that runs code", _legacy_pickle(marker)),
        ("legacy .bin: int tensors", _legacy_torch_save({LIKE_A: torch.ones(4, 32, dtype=torch.int64)})),
    ]
    return cases


# -- the harness -----------------------------------------------------------------------------------

def _in_thread(fn: Callable[[], Any], timeout: float) -> tuple[bool, BaseException | None]:
    """Run ``fn`` in a daemon thread (a blocked read cannot be interrupted, only abandoned): (finished, error)."""
    box: dict[str, BaseException | None] = {"error": None}

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001  (the test inspects whatever came out)
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), box["error"]


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    model = _llama()
    lorakit.attach(model, AdapterSpec(targets=["q_proj", "v_proj"], form_args={"r": 4, "alpha": 8}), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapters" in name:
                p.add_(0.1)
    lorakit.save(model, root / "_originals" / "lorakit")
    peft = root / "_originals" / "peft"
    shutil.copytree(root / "_originals" / "lorakit", peft)
    (peft / LORAKIT_FILE).unlink()
    return root


def test_the_valid_folders_load(originals: Path) -> None:
    """The corpus starts from folders that load: every failure below is caused by its mutation."""
    for kind in ("lorakit", "peft"):
        model = _llama()
        lorakit.load(model, originals / "_originals" / kind)
        result = CliRunner().invoke(app, ["inspect", str(originals / "_originals" / kind)])
        assert result.exit_code == 0, result.output


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_fuzz_corpus(originals: Path) -> None:
    marker = originals / "PWNED"
    cases = [("lorakit", *c) for c in lorakit_cases(marker)] + [("peft", *c) for c in peft_cases(marker)]
    assert len(cases) >= 150, len(cases)
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = CliRunner()
    failures: list[str] = []
    messages: list[str] = []
    start = time.monotonic()
    for i, (kind, label, mutate) in enumerate(cases):
        d = originals / f"{kind}-{i:03d}"
        shutil.copytree(originals / "_originals" / kind, d)
        mutate(d)
        finished, error = _in_thread(lambda d=d, m=model: lorakit.load(m, d), CASE_TIMEOUT_S)
        if not finished:
            failures.append(f"[{kind}] {label}: load still running after {CASE_TIMEOUT_S}s (hang)")
            continue
        if not isinstance(error, (AdapterFileError, BaseMismatchError)):
            failures.append(f"[{kind}] {label}: expected AdapterFileError/BaseMismatchError, got {error!r}")
        elif str(d) not in str(error):  # the message names the folder and, mostly, the file and field
            failures.append(f"[{kind}] {label}: message does not name the adapter folder: {error}")
        messages.append(f"[{kind}] {label}: {str(error).replace(str(d), '<dir>')}")
        state = model.state_dict()
        if state.keys() != before.keys() or not all(torch.equal(state[k], before[k]) for k in before):
            failures.append(f"[{kind}] {label}: the model changed")
            model = _llama()  # keep checking the other cases on a clean model
        # the load did not hang, so the CLI (same reader) can run in this thread
        result = runner.invoke(app, ["inspect", str(d)])
        out = result.output
        if result.exit_code != 2 or "Traceback" in out or len(out.strip().splitlines()) != 1:
            failures.append(f"[{kind}] {label}: lorakit inspect exit {result.exit_code}, output {out[-300:]!r}, "
                            f"exception {result.exception!r}")
        shutil.rmtree(d, ignore_errors=True)
    elapsed = time.monotonic() - start
    assert not marker.exists(), "a pickle in the corpus ran code"
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
    assert elapsed < TOTAL_BUDGET_S, f"corpus of {len(cases)} took {elapsed:.1f}s"
    print(f"fuzz corpus: {len(cases)} bad folders in {elapsed:.1f}s")
    if os.environ.get("LORAKIT_FUZZ_LOG"):  # to read every message: LORAKIT_FUZZ_LOG=path pytest ...
        Path(os.environ["LORAKIT_FUZZ_LOG"]).write_text("\n".join(messages) + "\n")
