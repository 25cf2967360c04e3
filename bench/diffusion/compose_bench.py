"""Multi-LoRA composition benchmark on lorakit's synthetic text-to-image testbed (issue 15).

Needs a trained base (``lorakit diffusion train-base --out-dir runs/diffusion-base``); trains the four concept
LoRAs (ring, cross, striped, sunset) into ``--loras`` when they are missing, then for every 2- and 3-concept
combination, seed and method samples the prompts, reads every image back with the detectors and writes
``results/compose.json``, one PNG grid per combination (rows = methods, columns = prompts) and a summary line.

    flock /tmp/lorakit-heavy.lock .venv/bin/python bench/diffusion/compose_bench.py \
        --base runs/diffusion-base --loras runs/diffusion-loras --prompts 32 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

import lorakit
from lorakit.diffusion import composers as cp
from lorakit.diffusion import scenes as sc
from lorakit.diffusion import testbed as tb
from lorakit.diffusion.clora import CLoRAComposer
from lorakit.diffusion.cmlora import CMLoRAComposer, frequency_order
from lorakit.diffusion.lora_composer import LoRAComposerComposer

METHODS = {**cp.COMPOSERS, "cmlora": CMLoRAComposer}

COMBOS = [c for k in (2, 3) for c in itertools.combinations(sc.CONCEPTS, k)
          if sum(x in sc.CONCEPT_OBJECTS for x in c) <= 2]


def run_clora(unet, combo, scenes, encoder, config, a, seed):
    """CLoRA one prompt at a time (its token indices differ per caption): every branch reads the full caption
    (MiniLM is bidirectional), concept c's tokens = the positions of its trigger word."""
    import numpy as np

    images, passes, grads = [], 0, 0
    for scene in scenes:
        caption = scene.caption()
        tokens = encoder.tokens(caption)
        idx = [[[i for i, t in enumerate(tokens) if t == c]] * (len(combo) + 1) for c in combo]
        comp = CLoRAComposer(unet, list(combo), concept_tokens=idx)
        s = cp.sample(comp, [encoder([caption])] * (len(combo) + 1), encoder([""]),
                      scheduler=tb.sample_scheduler(config), steps=a.steps, guidance=a.guidance, seed=seed)
        images.append(tb.from_latent(s.latents)[0])
        passes, grads = passes + s.passes, grads + comp.grad_passes
    return np.stack(images), passes / len(scenes), grads / len(scenes)


def run_lora_composer(unet, combo, scenes, encoder, config, a, seed):
    """LoRA-Composer one prompt at a time: concept r's box is its object's slot (the whole image for the sunset
    background), its region prompt the words of that concept, its tokens the trigger word in the caption."""
    import numpy as np

    images, passes, grads = [], 0, 0
    for scene in scenes:
        caption = scene.caption()
        tokens = encoder.tokens(caption)
        boxes, regions = [], []
        for c in combo:
            if c == "sunset":
                boxes.append((0.0, 0.0, 1.0, 1.0))
                regions.append("sunset background")
                continue
            o = next(o for o in scene.objects if o.shape == c or (c == "striped" and o.striped))
            x = sc.SLOT_X[o.slot]
            boxes.append((max(x - 1 / 6, 0.0), 0.25, min(x + 1 / 6, 1.0), 0.75))
            regions.append(f"a {'striped ' if o.striped else ''}{o.colour} {o.shape}")
        idx = [[i for i, t in enumerate(tokens) if t == c] for c in combo]
        comp = LoRAComposerComposer(unet, list(combo), region_prompts=[encoder([r]) for r in regions], boxes=boxes,
                                    concept_tokens=idx)
        s = cp.sample(comp, encoder([caption]), encoder([""]), scheduler=tb.sample_scheduler(config), steps=a.steps,
                      guidance=a.guidance, seed=seed)
        images.append(tb.from_latent(s.latents)[0])
        passes, grads = passes + s.passes, grads + comp.grad_passes
    return np.stack(images), passes / len(scenes), grads / len(scenes)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--loras", default="runs/diffusion-loras")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["merge", "switch", "composite", "lorahub", "cmlora", "clora",
                                                     "lora_composer"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--lora-steps", type=int, default=120)
    p.add_argument("--combos", type=int, default=0, help="only the first N combinations (0: all)")
    p.add_argument("--out", default="bench/diffusion/results")
    a = p.parse_args()
    torch.set_num_threads(1)
    unet, config = tb.load_base(a.base)
    encoder = tb.TextEncoder()
    for concept in sc.CONCEPTS:
        folder = Path(a.loras) / concept
        if not (folder / "lorakit.json").is_file():
            tb.train_concept_lora(tb.load_base(a.base)[0], concept, folder, steps=a.lora_steps, encoder=encoder,
                                  config=config, device="cpu")
        lorakit.load(unet, folder, concept)
    lorakit.set_active(unet, [])
    scheduler = tb.train_scheduler(config)
    # CMLoRA's frequency ordering: each LoRA's own image (one prompt with that concept alone, LoRA alone)
    alone = {c: tb.generate(cp.MergeComposer(unet, [c]), tb.composition_scenes((c,), 1, seed=7), encoder,
                            steps=a.steps, guidance=a.guidance, config=config)[0][0] for c in sc.CONCEPTS}
    high, low = frequency_order(alone)
    print(json.dumps({"cmlora_order": {"H": high, "L": low}}))
    results, out = [], Path(a.out)
    for combo in COMBOS[: a.combos or None]:
        scenes = tb.composition_scenes(combo, a.prompts, seed=100)
        grid_rows = []
        for method in a.methods:
            loras = list(combo)
            kwargs = {}
            if method == "cmlora":
                loras = [c for c in high + low if c in combo]
                kwargs = {"n_high": max(1, sum(c in high for c in combo))}
            if method == "lorahub":  # few-shot examples: 5 renders of other prompts with the same concepts
                shots = tb.composition_scenes(combo, 5, seed=999)
                import numpy as np

                kwargs = {"examples": (tb.to_latent(np.stack([sc.render(s) for s in shots])),
                                       encoder([s.caption() for s in shots])), "scheduler": scheduler}
            for seed in a.seeds:
                start = time.perf_counter()
                if method in ("clora", "lora_composer"):
                    run = run_clora if method == "clora" else run_lora_composer
                    images, passes, extra = run(unet, combo, scenes, encoder, config, a, seed)
                else:
                    composer = METHODS[method](unet, loras, **kwargs)
                    images, s = tb.generate(composer, scenes, encoder, seed=seed, steps=a.steps,
                                            guidance=a.guidance, config=config)
                    passes, extra = s.passes, getattr(composer, "shallow_passes", 0)
                metrics = tb.evaluate(scenes, images)
                results.append({"combo": list(combo), "method": method, "seed": seed, **metrics,
                                "unet_passes_per_step": passes / a.steps,
                                # CMLoRA: shallow (cached) passes; CLoRA/LoRA-Composer: gradient passes (latent updates)
                                "extra_passes_per_step": extra / a.steps,
                                "seconds_per_image": (time.perf_counter() - start) / len(scenes)})
                if seed == a.seeds[0]:
                    grid_rows.append(images[:8])
                print(json.dumps(results[-1]))
        tb.image_grid(grid_rows, out / f"grid_{'+'.join(combo)}.png")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compose.json").write_text(json.dumps({"args": vars(a), "results": results}, indent=2))
    by = {}
    for r in results:
        by.setdefault(r["method"], []).append(r)
    print("summary: " + "; ".join(
        f"{m} all-concepts {sum(r['all_concepts'] for r in rs) / len(rs):.3f} leakage "
        f"{sum(r['leakage'] for r in rs) / len(rs):.3f} passes/step {rs[0]['unet_passes_per_step']:.1f}"
        for m, rs in by.items()))


if __name__ == "__main__":
    main()
