"""Adapter folders as untrusted input (issue 13, items 1-3, 5, 6): symlink policy, bounded hashing, checks
before allocation, file modes under a umask, RandLoRA under float64 defaults, CLI exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lorakit
import lorakit.api as api
import lorakit.core.state as state_mod
from lorakit import AdapterFileError, AdapterSpec, BaseMismatchError
from lorakit.cli import app
from lorakit.core.state import LORAKIT_FILE, TENSORS_FILE
from lorakit.models import tiny_llama

try:  # tests/ may or may not be a package
    from tests.conftest import randomize_adapter, save_tiny_model_dir
except ModuleNotFoundError:
    from conftest import randomize_adapter, save_tiny_model_dir


def llama() -> torch.nn.Module:
    return tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = llama()
    lorakit.attach(model, AdapterSpec(targets=["q_proj", "v_proj"], form_args={"r": 4, "alpha": 8}), seed=0)
    randomize_adapter(model)
    return lorakit.save(model, tmp_path / "adapter")


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def reference(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = llama()
    lorakit.load(model, folder)
    return logits(model, ids)


# -- item 1: which files are read ------------------------------------------------------------------

def test_symlink_to_a_regular_file_inside_the_folder_is_followed(saved: Path, input_ids: torch.Tensor) -> None:
    want = reference(saved, input_ids)
    (saved / TENSORS_FILE).rename(saved / "real.safetensors")
    os.symlink("real.safetensors", saved / TENSORS_FILE)
    assert torch.equal(reference(saved, input_ids), want)


def test_hugging_face_cache_layout_is_followed(saved: Path, tmp_path: Path, input_ids: torch.Tensor) -> None:
    """huggingface_hub snapshots are symlinks ``snapshots/<rev>/x -> ../../blobs/<hash>``: allowed."""
    want = reference(saved, input_ids)
    repo = tmp_path / "models--x--y"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in saved.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        os.symlink(f"../../blobs/{digest}", snap / f.name)
    assert torch.equal(reference(snap, input_ids), want)
    # the same links from a folder that is not a hub snapshot are refused (outside the folder)
    other = tmp_path / "not-a-cache" / "adapter"
    other.mkdir(parents=True)
    for f in snap.iterdir():
        os.symlink(os.path.realpath(f), other / f.name)
    with pytest.raises(AdapterFileError, match="outside the adapter folder"):
        lorakit.load_state(other)


def test_symlink_to_a_regular_file_outside_is_refused(saved: Path, tmp_path: Path) -> None:
    shutil.move(saved / TENSORS_FILE, tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", saved / TENSORS_FILE)
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors: symlink to .*outside"):
        lorakit.load_state(saved)


def test_fifo_named_in_lorakit_json_is_refused_without_blocking(saved: Path) -> None:
    os.mkfifo(saved / "pipe.safetensors")
    info = json.loads((saved / LORAKIT_FILE).read_text())
    info["files"] = {"native": "pipe.safetensors"}
    (saved / LORAKIT_FILE).write_text(json.dumps(info))
    with pytest.raises(AdapterFileError, match=r"pipe\.safetensors: a FIFO"):  # would block forever if opened
        lorakit.load_state(saved)


@pytest.mark.parametrize("name", ["/etc/passwd", "../adapter/adapter_model.safetensors", "..", "a/b"])
def test_hostile_names_in_lorakit_json(saved: Path, name: str) -> None:
    info = json.loads((saved / LORAKIT_FILE).read_text())
    info["files"] = {"native": name}
    (saved / LORAKIT_FILE).write_text(json.dumps(info))
    with pytest.raises(AdapterFileError, match=r"lorakit\.json: field 'files\.native'"):
        lorakit.load_state(saved)


def test_hashing_only_where_a_checksum_is_recorded(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hashlib.sha256

    def counting(data: bytes = b"") -> object:
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(state_mod.hashlib, "sha256", counting)
    lorakit.load_state(saved)
    assert calls == [(saved / TENSORS_FILE).stat().st_size]  # once, over exactly the file's bytes
    calls.clear()
    (saved / LORAKIT_FILE).unlink()  # a PEFT folder: no checksum, no hashing
    lorakit.load_state(saved)
    assert calls == []


def test_json_size_cap_is_checked_before_reading(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_mod, "MAX_JSON_BYTES", 100)
    with pytest.raises(AdapterFileError, match=r"lorakit\.json: \d+ bytes, more than the 100 allowed"):
        lorakit.load_state(saved)


# -- item 2: the CLI maps lorakit errors to exit 2 -----------------------------------------------

@pytest.fixture
def broken(saved: Path) -> Path:
    info = json.loads((saved / LORAKIT_FILE).read_text())
    info["spec"]["module_args"] = ["not", "a", "dict"]
    (saved / LORAKIT_FILE).write_text(json.dumps(info))
    return saved


def _assert_clean_exit_2(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output  # progress bars aside
    return errors[0]


def test_cli_inspect_and_merge_exit_2(broken: Path, tmp_path: Path) -> None:
    assert "spec.module_args" in _assert_clean_exit_2(["inspect", str(broken)])
    assert "spec.module_args" in _assert_clean_exit_2(["merge", str(broken), str(broken), "--out",
                                                       str(tmp_path / "m"), "--method", "linear"])


def test_cli_eval_and_export_exit_2(broken: Path, saved: Path, tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir(tmp_path / "tiny", ["good", "bad"])
    assert "spec.module_args" in _assert_clean_exit_2(["eval", "--adapter", str(broken), "--model", str(model_dir)])
    assert "spec.module_args" in _assert_clean_exit_2(["export", str(broken), "--out", str(tmp_path / "e"),
                                                       "--model", str(model_dir)])


def test_cli_base_mismatch_exits_2(saved: Path, tmp_path: Path) -> None:
    # an adapter for another architecture: BaseMismatchError is a lorakit error too
    model_dir = save_tiny_model_dir(tmp_path / "tiny", ["good", "bad"])
    info = json.loads((saved / LORAKIT_FILE).read_text())
    info["base"]["hidden_size"] = 999
    (saved / LORAKIT_FILE).write_text(json.dumps(info))
    out = _assert_clean_exit_2(["export", str(saved), "--out", str(tmp_path / "e"), "--model", str(model_dir)])
    assert "another base model" in out and "hidden_size" in out


# -- item 3: config values checked before allocating ---------------------------------------------

def test_huge_rank_fails_before_any_form_is_built(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("build_forms ran: the rank was trusted before the tensors were checked")

    monkeypatch.setattr(api, "build_forms", no_build)
    info = json.loads((saved / LORAKIT_FILE).read_text())
    info["spec"]["form_args"]["r"] = 10**9
    (saved / LORAKIT_FILE).write_text(json.dumps(info))
    with pytest.raises(AdapterFileError, match="rank r=1000000000 but the file holds only"):
        lorakit.load(llama(), saved)


def test_oversized_config_on_an_in_memory_state_fails_before_building(
        saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """apply_state compares the form's closed-form size on the real layer with what the state holds."""
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("build_forms ran")

    state = lorakit.load_state(saved)
    state = state_mod.replace_spec(state, form_args={**state.spec.form_args, "r": 150})  # <= values held
    monkeypatch.setattr(api, "build_forms", no_build)
    monkeypatch.setattr(api, "PREBUILD_FLOOR", 0)  # the tiny model is far below the default floor
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BaseMismatchError, match="makes 9600 trainable values on this layer but the file holds"):
        api.apply_state(model, state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_small_rank_mismatch_keeps_the_exact_shape_message(saved: Path) -> None:
    info = json.loads((saved / LORAKIT_FILE).read_text())
    info["spec"]["form_args"]["r"] = 5
    (saved / LORAKIT_FILE).write_text(json.dumps(info))
    with pytest.raises(BaseMismatchError, match=r"lora_A: shape \(4, 32\) in the file, \(5, 32\) expected"):
        lorakit.load(llama(), saved)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_alpha_is_refused(saved: Path, value: float) -> None:
    (saved / LORAKIT_FILE).unlink()
    config = json.loads((saved / "adapter_config.json").read_text())
    config["lora_alpha"] = value
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: field 'lora_alpha' is"):
        lorakit.load(llama(), saved)


def test_int_tensors_are_not_cast_in_memory_either(saved: Path) -> None:
    state = lorakit.load_state(saved)
    key = next(k for k in state.tensors if k.endswith("lora_A.weight"))
    state.tensors[key] = state.tensors[key].round().to(torch.int64)
    with pytest.raises(AdapterFileError, match="is torch.int64; form 'lora' expects floating point"):
        api.apply_state(llama(), state)


def test_integer_tensors_stay_allowed_where_the_form_keeps_integers(tmp_path: Path) -> None:
    """SHiRA's indices are int64: the dtype check follows the form, not a blanket "floats only"."""
    model = llama()
    lorakit.attach(model, AdapterSpec(form="shira", form_args={"r": 2}, targets=["q_proj"]), seed=0)
    lorakit.save(model, tmp_path / "shira")
    state = lorakit.load_state(tmp_path / "shira")
    assert any(not t.is_floating_point() for t in state.tensors.values())
    lorakit.load(llama(), tmp_path / "shira")


# -- item 5: file modes follow the umask ----------------------------------------------------------

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_saved_adapter_files_respect_the_umask(saved: Path, tmp_path: Path, umask_022: None) -> None:
    model = llama()
    lorakit.attach(model, AdapterSpec(targets=["q_proj"], form_args={"r": 2}), seed=0)
    out = lorakit.save(model, tmp_path / "modes")
    files = [p for p in out.iterdir() if p.is_file()]
    assert files and all(_mode(p) == 0o644 for p in files), {p.name: oct(_mode(p)) for p in files}
    os.umask(0o077)  # and a private umask keeps them private
    lorakit.save(model, tmp_path / "private")
    assert all(_mode(p) == 0o600 for p in (tmp_path / "private").iterdir())


def test_checkpoint_dirs_respect_the_umask(tmp_path: Path, umask_022: None) -> None:
    from lorakit.train.checkpoint import save_checkpoint

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = save_checkpoint(tmp_path / "ckpt", 1, params={"p": p}, optimizer=opt, scheduler=sched,
                           trainer_state={"step": 1}, strategies={}, rng_per_rank=[])
    assert _mode(ckpt) == 0o755
    assert all(_mode(f) == 0o644 for f in ckpt.iterdir())


def test_current_umask_does_not_change_it(umask_022: None) -> None:
    from lorakit.core.atomic import current_umask

    assert current_umask() == 0o022
    assert os.umask(0o022) == 0o022


# -- item 6: RandLoRA under a float64 default dtype ----------------------------------------------

def test_randlora_with_float64_default_dtype(tmp_path: Path) -> None:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 12))
        lorakit.attach(model, AdapterSpec(form="randlora", form_args={"r": 4, "alpha": 8}, targets=["0", "2"]),
                       seed=0)
        with torch.no_grad():
            for name, q in model.named_parameters():
                if "randlora_lambda" in name:
                    q.normal_()
        x = torch.randn(5, 16)
        y = model(x)
        assert y.dtype == torch.float64
        y.square().sum().backward()
        grads = [q.grad for n, q in model.named_parameters() if "randlora" in n]
        assert grads and all(g is not None and g.dtype == torch.float64 for g in grads)
        lorakit.save(model, tmp_path / "rl")
        fresh = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 12))
        fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                               if "adapters" not in k and "shared" not in k}, strict=False)
        lorakit.load(fresh, tmp_path / "rl")
        with torch.no_grad():
            # files hold fp32 (lorakit's format), so a float64 adapter comes back to fp32 precision
            torch.testing.assert_close(fresh(x), model(x), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_default_dtype(old)


def test_randlora_bases_do_not_depend_on_the_default_dtype() -> None:
    from lorakit.forms.randlora import make_bases

    want = make_bases(4, (24, 16), 3, sparse=True)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = make_bases(4, (24, 16), 3, sparse=True)
    finally:
        torch.set_default_dtype(old)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


def test_reading_a_folder_does_not_move_the_random_stream(saved: Path) -> None:
    """The dtype probe builds small forms once per class: a seeded run must not see its RNG shifted."""
    state_mod.integer_tensors.cache_clear()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    lorakit.load_state(saved)
    assert torch.equal(torch.get_rng_state(), before)
