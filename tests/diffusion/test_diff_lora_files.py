"""Kohya and diffusers LoRA files: ΔW against a hand-built dense reference, round trips, real diffusers/PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

import lorakit  # noqa: E402
from lorakit.diffusion import (  # noqa: E402
    LoRAFileError,
    kohya_to_states,
    load_lora_file,
    save_lora_file,
    states_to_diffusers,
    states_to_kohya,
)
from lorakit.diffusion.lora_files import diffusers_to_states  # noqa: E402
from lorakit.diffusion.tiny import tiny_text_encoder, tiny_unet  # noqa: E402

# module path -> rank, alpha (None: the file has no alpha -> α = r); a 3×3 conv, a 1×1 conv, Linears
UNET_MODULES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (4, 2.0),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (4, 2.0),
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": (2, 8.0),
    "down_blocks.0.attentions.0.proj_in": (3, None),
    "up_blocks.1.resnets.0.conv1": (2, 1.0),
}
TE_MODULES = {"encoder.layers.0.self_attn.q_proj": (4, 4.0),
              "encoder.layers.1.mlp.fc1": (4, 2.0)}


def _hand_kohya(unet: nn.Module, te: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya dict built by hand from the layer shapes (independent of lorakit's writer)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    # real kohya files name CLIP modules from the text_model root (transformers < 5 layout)
    for prefix, model, mods in (("lora_unet_", unet, UNET_MODULES), ("lora_te_text_model_", te, TE_MODULES)):
        for path, (r, alpha) in mods.items():
            layer = model.get_submodule(path)
            name = prefix + path.replace(".", "_")
            if isinstance(layer, nn.Conv2d):
                down = torch.randn(r, layer.in_channels, *layer.kernel_size, generator=g)
                up = torch.randn(layer.out_channels, r, 1, 1, generator=g)
            else:
                down = torch.randn(r, layer.in_features, generator=g)
                up = torch.randn(layer.out_features, r, generator=g)
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = up
            if alpha is not None:
                out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def _dense_delta(kohya: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
    r = down.shape[0]
    alpha = float(kohya[f"{name}.alpha"]) if f"{name}.alpha" in kohya else float(r)
    return (alpha / r) * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def _merged_deltas(models: dict[str, nn.Module], states: dict[str, lorakit.AdapterState]) -> dict[str, torch.Tensor]:
    """ΔW the runtime applies: merge the installed adapter into the weights and subtract the base."""
    out = {}
    for comp, model in models.items():
        m = copy.deepcopy(model)
        base = {p: mod.weight.detach().clone() for p, mod in m.named_modules()
                if isinstance(mod, (nn.Linear, nn.Conv2d))}
        lorakit.apply_state(m, states[comp], "x")
        lorakit.merge(m, ["x"])
        for path in states[comp].modules:
            out[f"{comp}:{path}"] = m.get_submodule(path).base_layer.weight.detach() - base[path]
    return out


@pytest.fixture(scope="module")
def models():
    return {"unet": tiny_unet(0), "text_encoder": tiny_text_encoder(0)}


def test_kohya_hand_built_and_written_give_the_dense_delta(models, tmp_path):
    hand = _hand_kohya(models["unet"], models["text_encoder"])
    states = kohya_to_states(hand, models)
    got = _merged_deltas(models, states)
    for comp, prefix, mods in (("unet", "lora_unet_", UNET_MODULES),
                               ("text_encoder", "lora_te_text_model_", TE_MODULES)):
        for path in mods:
            ref = _dense_delta(hand, prefix + path.replace(".", "_"))
            torch.testing.assert_close(got[f"{comp}:{path}"], ref, rtol=1e-5, atol=1e-5)
    # lorakit's writer -> file -> reader: the same ΔW
    f = save_lora_file(states, tmp_path / "lora.safetensors", layout="kohya")
    again = _merged_deltas(models, load_lora_file(f, models))
    for k, v in got.items():
        torch.testing.assert_close(again[k], v, rtol=1e-6, atol=1e-6)


def test_kohya_round_trip_is_exact(models):
    hand = _hand_kohya(models["unet"], models["text_encoder"], seed=1)
    back = states_to_kohya(kohya_to_states(hand, models))
    hand_with_alpha = dict(hand)
    for path, (r, alpha) in UNET_MODULES.items():  # a missing alpha is written as α = r
        if alpha is None:
            hand_with_alpha[f"lora_unet_{path.replace('.', '_')}.alpha"] = torch.tensor(float(r))
    assert sorted(back) == sorted(hand_with_alpha)
    for k in back:
        torch.testing.assert_close(back[k].float(), hand_with_alpha[k].float().reshape(back[k].shape))


def test_diffusers_layout_round_trip_and_lorakit_folder(models, tmp_path):
    states = kohya_to_states(_hand_kohya(models["unet"], models["text_encoder"], seed=2), models)
    ref = _merged_deltas(models, states)
    d = states_to_diffusers(states)
    assert all(k.split(".")[0] in ("unet", "text_encoder") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in d)
    again = _merged_deltas(models, diffusers_to_states(d, models))
    f = save_lora_file(states, tmp_path / "pytorch_lora_weights.safetensors", layout="diffusers")
    from_file = _merged_deltas(models, load_lora_file(f, models))
    # lorakit's own folder (PEFT layout) holds the converted UNet adapter too
    unet = copy.deepcopy(models["unet"])
    lorakit.apply_state(unet, states["unet"], "k")
    lorakit.save(unet, tmp_path / "unet_adapter", "k")
    folder = _merged_deltas({"unet": models["unet"]}, {"unet": lorakit.load_state(tmp_path / "unet_adapter")})
    for k, v in ref.items():
        torch.testing.assert_close(again[k], v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(from_file[k], v, rtol=1e-5, atol=1e-6)
        if k.startswith("unet:"):
            torch.testing.assert_close(folder[k], v, rtol=1e-5, atol=1e-6)


def _unet_out(unet: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x, enc = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), encoder_hidden_states=enc).sample


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_real_diffusers_loader_agrees(models, tmp_path, layout):
    """diffusers' own loader (kohya conversion + PEFT injection) and lorakit give the same UNet output."""
    from diffusers import StableDiffusionPipeline

    hand = {k: v for k, v in _hand_kohya(models["unet"], models["text_encoder"], seed=3).items()
            if k.startswith("lora_unet_")}
    states = kohya_to_states(hand, models)
    f = save_lora_file(states, tmp_path / f"{layout}.safetensors", layout=layout)
    ours = copy.deepcopy(models["unet"])
    lorakit.apply_state(ours, load_lora_file(f, models)["unet"], "x")
    theirs = copy.deepcopy(models["unet"])
    sd, alphas = StableDiffusionPipeline.lora_state_dict(str(f))
    StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet=theirs, adapter_name="x")
    base = _unet_out(models["unet"])
    out_ours, out_theirs = _unet_out(ours), _unet_out(theirs)
    assert (out_ours - base).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-4, atol=1e-5)


def test_clear_errors(models, tmp_path):
    hand = _hand_kohya(models["unet"], models["text_encoder"])
    with pytest.raises(LoRAFileError, match="match no Linear/Conv2d"):
        kohya_to_states({**hand, "lora_unet_nonexistent_block_to_q.lora_down.weight": torch.zeros(2, 8),
                         "lora_unet_nonexistent_block_to_q.lora_up.weight": torch.zeros(8, 2)}, models)
    with pytest.raises(LoRAFileError, match="LoRA variant"):
        kohya_to_states({"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2)}, models)
    with pytest.raises(LoRAFileError, match="do not fit"):
        name = "lora_unet_" + "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".replace(".", "_")
        kohya_to_states({f"{name}.lora_down.weight": torch.zeros(2, 7), f"{name}.lora_up.weight": torch.zeros(8, 2)},
                        models)
    with pytest.raises(LoRAFileError, match="no text_encoder model"):
        kohya_to_states(hand, {"unet": models["unet"]})

    class Twin(nn.Module):  # "a.b_c" and "a_b.c" both flatten to "a_b_c"
        def __init__(self):
            super().__init__()
            self.a = nn.Module()
            self.a.b_c = nn.Linear(2, 2)
            self.a_b = nn.Module()
            self.a_b.c = nn.Linear(2, 2)

    with pytest.raises(LoRAFileError, match="ambiguous"):
        kohya_to_states({"lora_unet_a_b_c.lora_down.weight": torch.zeros(1, 2),
                         "lora_unet_a_b_c.lora_up.weight": torch.zeros(2, 1)}, {"unet": Twin()})
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"\x80\x04")
    with pytest.raises(LoRAFileError, match="only .safetensors"):
        load_lora_file(bad, models)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 20)
    with pytest.raises(LoRAFileError):
        load_lora_file(junk, models)
