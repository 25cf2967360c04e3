"""AutoLoRA gated fusion: the layer formula against a manual computation, the global LoRA = rank-r SVD of the
mean ΔW, only the gates train (LoRAs frozen) and the objective falls, the retriever → fusion chain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

import lorakit  # noqa: E402
from lorakit.core.inject import adapter_modules  # noqa: E402
from lorakit.diffusion import UNET_TARGETS  # noqa: E402
from lorakit.diffusion.autolora_fusion import (  # noqa: E402
    KEY,
    W_OUT_INIT,
    fuse_retrieved,
    global_lora,
    install_fusion,
    remove_fusion,
    train_fusion,
)
from lorakit.diffusion.tiny import tiny_unet  # noqa: E402

PATH = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


def _states(n=2):
    unet = tiny_unet(0)
    out = []
    for i in range(n):
        name = f"l{i}"
        lorakit.attach(unet, lorakit.AdapterSpec(form_args={"r": 2, "alpha": 4.0}, targets=list(UNET_TARGETS)),
                       name, seed=i)
        g = torch.Generator().manual_seed(70 + i)
        with torch.no_grad():
            for form in adapter_modules(unet, name).values():
                form.lora_B.copy_(0.3 * torch.randn(form.lora_B.shape, generator=g))
        out.append(lorakit.extract_state(unet, name))
    return out


def _delta(state, path):
    A, B = state.tensors[f"{path}.lora_A.weight"], state.tensors[f"{path}.lora_B.weight"]
    return (4.0 / 2) * B @ A


def test_layer_formula_and_global_lora():
    states = _states()
    unet = tiny_unet(0)
    install_fusion(unet, states, global_rank=2)
    layer = unet.get_submodule(PATH)
    src = layer.sources[KEY]
    with torch.no_grad():
        src.w_l.normal_()
        src.w_c.normal_()
        src.b.normal_()
    x = torch.randn(3, 5, 12)
    h = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    mean = (_delta(states[0], PATH) + _delta(states[1], PATH)) / 2
    U, S, Vh = torch.linalg.svd(mean)
    glob = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
    ga, gb = global_lora(states, 2)[PATH]
    torch.testing.assert_close(gb @ ga, glob, rtol=1e-4, atol=1e-5)
    y = h.clone()
    for d in (_delta(states[0], PATH), _delta(states[1], PATH), glob):
        o = x @ d.T
        ln_o, ln_h = F.layer_norm(o, (8,)), F.layer_norm(h, (8,))
        gate = torch.sigmoid(src.w_l * ln_o + src.w_c * (ln_h * ln_o) + src.b)
        y = y + W_OUT_INIT * gate * o
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-5)
    remove_fusion(unet)
    assert not any(hasattr(m, "sources") for m in unet.modules())  # the original modules are back


def test_only_gates_train_and_the_objective_falls():
    from diffusers import DDPMScheduler

    states = _states()
    unet = tiny_unet(0)
    install_fusion(unet, states, global_rank=None)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in unet.named_buffers()}
    g = torch.Generator().manual_seed(0)
    x0, c1, c2 = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 5, 12, generator=g), torch.randn(8, 5, 12,
                                                                                                       generator=g)
    data = [(x0[i], c1[i], c2[i]) for i in range(8)]

    def collate(items):
        return {k: torch.stack([it[j] for it in items]) for j, k in enumerate(("latent", "text", "other"))}

    losses = train_fusion(unet, data, collate, DDPMScheduler(num_train_timesteps=100), torch.zeros(1, 5, 12),
                          steps=30, batch_size=8, lr=3e-2, device="cpu")
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith((".w_l", ".w_c", ".b", ".w_out")) and ".sources." in n for n in changed)
    assert all(torch.equal(b, buffers[n]) for n, b in unet.named_buffers())  # the LoRAs stay frozen


def test_retriever_chain():
    from lorakit.compose.retrieve.autolora import AutoLoRARetriever

    states = _states(3)
    r = AutoLoRARetriever(text_encoder="hash", steps=60)
    r.index(states, ["a red ring", "a blue cross", "striped style"], names=["ring", "cross", "striped"])
    unet = tiny_unet(0)
    names = fuse_retrieved(unet, r, "a red ring", k=2, global_rank=None)
    assert len(names) == 2 and names[0] == "ring"
    assert unet.get_submodule(PATH).sources[KEY].A.shape[0] == 2
