"""The synthetic text-to-image testbed: renderer/captions, detectors on clean renders, the pixel latent,
the UNet config, MiniLM text states, and a tiny resumable base + concept-LoRA training run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import lorakit  # noqa: E402
from lorakit.diffusion import scenes as sc  # noqa: E402
from lorakit.diffusion import testbed as tb  # noqa: E402


def test_caption_and_concepts():
    s = sc.Scene((sc.Obj("triangle", "red", "left"), sc.Obj("circle", "blue", "right", striped=True)), "gray")
    assert s.caption() == "a red triangle on the left and a striped blue circle on the right, gray background"
    assert s.used_concepts() == ("striped",)
    ring = sc.Scene((sc.Obj("ring", "cyan", "centre"),), "sunset")
    assert ring.caption() == "a cyan ring in the centre, sunset background"
    assert ring.used_concepts() == ("ring", "sunset")
    a, b = sc.render(s), sc.render(s)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)


def test_detectors_read_back_clean_renders():
    rng = np.random.default_rng(123)
    n, correct, per = 300, 0.0, {c: [] for c in sc.CONCEPTS}
    for _ in range(n):
        concepts = tuple(c for c in sc.CONCEPTS if rng.random() < 0.4)
        scene = sc.random_scene(rng, concepts=concepts, max_objects=3)
        result = sc.score(scene, sc.detect(sc.render(scene)))
        correct += result["all_correct"]
        assert result["leakage"] == 0.0
        for c in scene.used_concepts():
            per[c].append(result[c])
    assert correct / n >= 0.95
    assert all(np.mean(v) >= 0.95 for v in per.values() if v)


def test_score_counts_leakage():
    scene = sc.Scene((sc.Obj("ring", "cyan", "left"), sc.Obj("square", "red", "right")), "white")
    wrong = sc.Scene((sc.Obj("ring", "cyan", "left"), sc.Obj("square", "cyan", "right", striped=True)), "white")
    r = sc.score(scene, sc.detect(sc.render(wrong)))
    assert r["leakage"] == 1.0 and r["all_correct"] == 0.0 and r["ring"] == 1.0


def test_pixel_latent_is_exact_and_invertible():
    imgs = np.stack([sc.render(sc.random_scene(np.random.default_rng(i))) for i in range(3)])
    z = tb.to_latent(imgs)
    assert z.shape == (3, 12, 16, 16) and z.min() >= -1 and z.max() <= 1
    assert np.array_equal(tb.from_latent(z), imgs)


@pytest.fixture(scope="module")
def enc():
    return tb.TextEncoder()


def test_unet_config_and_text_states(enc):
    unet = tb.build_unet()
    assert 6e6 < sum(p.numel() for p in unet.parameters()) < 9e6
    text = enc(["a cyan ring on the left, sunset background", ""])
    assert text.shape == (2, tb.MAX_TOKENS, tb.TEXT_DIM)
    for word in ("ring", "cross", "striped", "sunset"):  # trigger words are single WordPiece tokens
        assert word in enc.tokens(f"a {word} thing")
    with torch.no_grad():
        out = unet(torch.randn(2, 12, 16, 16), torch.tensor([1, 900]), encoder_hidden_states=text).sample
    assert out.shape == (2, 12, 16, 16)
    # cross-attention at 16×16 and 8×8 (two down levels), none at the 4×4 level
    assert [hasattr(b, "attentions") for b in unet.down_blocks] == [True, True, False]


def test_tiny_training_resumes_and_concept_lora(tmp_path, enc):
    cfg = tb.TestbedConfig(channels=(8, 16, 16), attention_head_dim=4, dataset_size=64)
    kw = dict(steps=4, batch_size=4, config=cfg, save_every=2, progress=False, device="cpu", encoder=enc)
    r1 = tb.train_base(tmp_path / "base", **kw)
    straight = tb.load_base(tmp_path / "base")[0].state_dict()
    # an interrupted run: only the step-2 checkpoint survived; rerunning the command continues from there
    shutil.rmtree(tmp_path / "base" / "checkpoints" / "step-0000004")
    (tmp_path / "base" / tb.UNET_FILE).unlink()
    r2 = tb.train_base(tmp_path / "base", **kw)
    assert r1["steps"] == 4 and r2["steps"] == 4 and r2["resumed_from"] == 2
    resumed = tb.load_base(tmp_path / "base")[0].state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # exact resume
    r3 = tb.train_base(tmp_path / "base", **{**kw, "steps": 5}, extend=True)
    assert r3["steps"] == 5
    assert json.loads((tmp_path / "base" / tb.CONFIG_FILE).read_text())["config"]["channels"] == [8, 16, 16]
    unet, loaded_cfg = tb.load_base(tmp_path / "base")
    assert loaded_cfg == cfg
    folder = tb.train_concept_lora(unet, "ring", tmp_path / "ring", steps=2, batch_size=4, r=2, config=cfg,
                                   progress=False, device="cpu", encoder=enc)
    state = lorakit.load_state(folder)
    assert state.spec.form_args["r"] == 2 and any(k.endswith("attn2.to_k.lora_A.weight") for k in state.tensors)
    # generation through a composer, scored by the detectors
    from lorakit.diffusion.composers import CompositeComposer

    lorakit.load(unet, folder, "ring2")
    scenes = tb.composition_scenes(("ring", "sunset"), 2)
    assert all(set(s.used_concepts()) == {"ring", "sunset"} for s in scenes)
    images, s = tb.generate(CompositeComposer(unet, ["ring", "ring2"]), scenes, enc, steps=3, config=cfg)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8 and s.passes == 6
    m = tb.evaluate(scenes, images)
    assert m["images"] == 2 and 0.0 <= m["all_concepts"] <= 1.0 and "ring" in m and "sunset" in m
    png = tb.image_grid([images, images], tmp_path / "grid.png")
    assert png.stat().st_size > 0


def test_train_base_command_is_a_typer_command():
    from typer.testing import CliRunner

    from lorakit.diffusion.cli import diffusion_app

    r = CliRunner().invoke(diffusion_app, ["train-base", "--help"])
    assert r.exit_code == 0 and "--steps" in r.output and "--extend" in r.output
