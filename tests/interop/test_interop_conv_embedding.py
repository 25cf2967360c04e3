"""LoRA on Conv2d and Embedding layers against the real ``peft``: both directions give the same outputs,
PEFT's ΔW equals lorakit's, merge equals the unmerged forward and unmerge restores W.

Conv2d: a small torch CNN (PEFT adapts custom models through ``target_modules``), with stride, dilation,
a reflect padding mode, a 1×1 convolution and a bias-free convolution. Embedding: a tiny Llama's
``embed_tokens`` (padding_idx 0) next to its q/v projections.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import AdapterSpec
from lorakit.core.inject import adapter_modules
from lorakit.models import tiny_llama

try:  # tests/ may or may not be a package
    from tests.conftest import randomize_adapter
except ModuleNotFoundError:
    from conftest import randomize_adapter

TOL = 1e-5


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=2, padding_mode="reflect", bias=False)
        self.conv3 = nn.Conv2d(6, 5, 1)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.head(self.conv3(h).mean((2, 3)))


def cnn() -> TinyCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyCNN().eval()


def llama() -> nn.Module:
    return tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)


def images() -> torch.Tensor:
    return torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))


def token_ids() -> torch.Tensor:
    ids = torch.randint(1, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    ids[0, :2] = 0  # padding ids go through the lookup too
    return ids


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def peft_load(make, folder) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(make(), str(folder)).eval()


CASES = {
    "conv2d": (cnn, images, AdapterSpec(targets=["conv1", "conv2", "conv3"], form_args={"r": 3, "alpha": 6})),
    "conv2d-rslora-bias-ranks": (cnn, images, AdapterSpec(
        targets=["conv1", "conv2", "conv3", "head"], form_args={"r": 4, "alpha": 5, "rslora": True, "bias": True},
        module_args={"conv2": {"r": 2, "alpha": 3}})),
    "embedding": (llama, token_ids, AdapterSpec(targets=["embed_tokens", "q_proj", "v_proj"],
                                                form_args={"r": 4, "alpha": 8})),
    "embedding-rslora-ranks": (llama, token_ids, AdapterSpec(
        targets=["embed_tokens", "v_proj"], form_args={"r": 5, "alpha": 3, "rslora": True},
        module_args={"embed_tokens": {"r": 2, "alpha": 7}})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_adapter_loads_in_peft_with_equal_outputs(case, tmp_path):
    make, inputs, spec = CASES[case]
    model = make()
    lorakit.attach(model, spec, seed=0)
    randomize_adapter(model, seed=3)
    x = inputs()
    ours = run(model, x)
    assert (ours - run(make(), x)).abs().max() > 1e-3  # the adapter changes the output
    lorakit.save(model, tmp_path)
    files = load_file(str(tmp_path / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    if "conv" in case:
        assert files["base_model.model.conv2.lora_A.weight"].shape[1:] == (8, 3, 3)
        assert files["base_model.model.conv2.lora_B.weight"].shape[2:] == (1, 1)
        assert config["task_type"] is None  # a custom module: PEFT's plain PeftModel
    else:
        assert "base_model.model.model.embed_tokens.lora_embedding_A" in files
        assert config["task_type"] == "CAUSAL_LM"
    theirs = peft_load(make, tmp_path)
    assert (run(theirs, x) - ours).abs().max() <= TOL
    # PEFT's own ΔW of every adapted layer equals lorakit's, in the base weight's layout
    for path, form in adapter_modules(model, "default").items():
        peft_layer = theirs.base_model.model.get_submodule(path)
        got = peft_layer.get_delta_weight("default")
        want = form.delta_weight()
        want = want.T if isinstance(peft_layer.base_layer, nn.Embedding) else want
        assert got.shape == peft_layer.base_layer.weight.shape
        assert (got - want).abs().max() <= TOL


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
@pytest.mark.parametrize("case", ["conv2d", "embedding"])
def test_peft_adapter_loads_in_lorakit_with_equal_outputs(case, tmp_path):
    make, inputs, spec = CASES[case]
    torch.manual_seed(1)
    peft_model = get_peft_model(make(), LoraConfig(r=3, lora_alpha=5, target_modules=spec.targets,
                                                   init_lora_weights=False))
    peft_model.save_pretrained(tmp_path)
    x = inputs()
    want = run(peft_model.eval(), x)
    model = lorakit.load(make(), tmp_path)
    assert (run(model, x) - want).abs().max() <= TOL
    assert (want - run(make(), x)).abs().max() > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_unmerged_and_unmerge_restores_w(case):
    make, inputs, spec = CASES[case]
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.attach(model, spec, seed=0)
    randomize_adapter(model, seed=4)
    x = inputs()
    unmerged = run(model, x)
    lorakit.merge(model)
    assert (run(model, x) - unmerged).abs().max() <= TOL
    lorakit.unmerge(model)
    assert (run(model, x) - unmerged).abs().max() <= TOL
    plain = lorakit.unload(model, merge_active=False)
    after = plain.state_dict()
    assert set(after) == set(before)
    assert max((after[k] - before[k]).abs().max().item() for k in before) <= 1e-6


def test_conv2d_delta_is_the_dense_recomputation():
    """ΔW = s·(B_{:,:,0,0}·A.flatten(1)).reshape(out, in, kh, kw): a convolution with ΔW equals B ⋆ (A ⋆ x)."""
    model = cnn()
    lorakit.attach(model, AdapterSpec(targets=["conv2"], form_args={"r": 3, "alpha": 6}), seed=0)
    randomize_adapter(model, seed=5)
    form = adapter_modules(model, "default")["conv2"]
    base = model.conv2.base_layer
    x = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(2))
    dense = base._conv_forward(x, base.weight + form.delta_weight(), base.bias)
    assert (form.apply(x, base(x)) - dense).abs().max() <= TOL
    assert form.delta_weight().shape == base.weight.shape


def test_embedding_delta_is_the_dense_recomputation():
    """h = E[id] + s·Aᵀ[id]·Bᵀ, i.e. a lookup in E + ΔWᵀ (ΔW = s·B·A in (dim, num) layout)."""
    model = llama()
    lorakit.attach(model, AdapterSpec(targets=["embed_tokens"], form_args={"r": 4, "alpha": 8}), seed=0)
    layer = model.model.embed_tokens
    form = adapter_modules(model, "default")["model.embed_tokens"]
    assert form.lora_A.abs().max() == 0 and form.lora_B.abs().max() > 0  # PEFT's init: A = 0, B ~ N(0, 1)
    randomize_adapter(model, seed=6)
    ids = token_ids()
    dense = torch.nn.functional.embedding(ids, layer.base_layer.weight + form.delta_weight().T)
    with torch.no_grad():
        assert (layer(ids) - dense).abs().max() <= TOL


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_peft_file_with_another_base_embedding_is_refused(tmp_path):
    """PEFT saves the base embedding with an adapted one (save_embedding_layers): lorakit checks it equals
    the model's and refuses a resized or trained one instead of silently ignoring it."""
    trained = llama()
    with torch.no_grad():
        trained.model.embed_tokens.weight.add_(0.1)
    get_peft_model(trained, LoraConfig(r=2, target_modules=["embed_tokens"])).save_pretrained(tmp_path)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(
        str(tmp_path / "adapter_model.safetensors"))
    model = llama()
    with pytest.raises(lorakit.BaseMismatchError, match=r"model\.embed_tokens\.weight.*differs from the model"):
        lorakit.load(model, tmp_path)
    assert lorakit.specs(model) == {}
    assert lorakit.load_state(tmp_path).base_layers.keys() == {"model.embed_tokens.weight"}
