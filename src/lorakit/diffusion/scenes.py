"""The synthetic multi-concept scenes of lorakit's text-to-image testbed: renderer, captions, detectors.

No pretrained text-to-image model installs offline (``DIFFUSION.md``), so lorakit trains its own small model
on scenes it can score exactly (lorakit's choice, in place of the papers' CLIPScore / GPT-4V judges):

- a scene is a background plus objects in the ``left``/``centre``/``right`` slots, each a shape in a colour,
  optionally ``striped``; images are drawn with PIL at 4× and box-downscaled to 32×32 RGB;
- the base model sees 3 shapes × 4 colours on white/gray/black; four concepts are held out for LoRAs: a cyan
  ``ring`` and a magenta ``cross`` (objects), ``striped`` (a high-frequency style) and a ``sunset`` gradient
  background (low frequency): CMLoRA's (arXiv 2502.04923) high- vs low-frequency split;
- captions: ``"a red triangle on the left and a striped blue circle on the right, gray background"``;
- detectors read every attribute back with numpy only: background from the border, then per slot the
  pixels that differ from the background, colour by nearest palette entry of the brighter half, shape by
  template overlap (IoU with each shape drawn in that slot), stripes by the luminance spread inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SIZE = 32
SCALE = 4  # drawn at 4× then box-downscaled (anti-aliased edges)
BASE_SHAPES = ("circle", "square", "triangle")
BASE_COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 40, 40), "green": (40, 170, 60),
                                                  "blue": (40, 70, 220), "yellow": (230, 210, 40)}
BASE_BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (250, 250, 250), "gray": (128, 128, 128),
                                                      "black": (10, 10, 10)}
SLOTS = ("left", "centre", "right")
SLOT_X = {"left": 0.2, "centre": 0.5, "right": 0.8}
# the concepts the base never sees (each taught by one LoRA)
CONCEPT_OBJECTS = {"ring": "cyan", "cross": "magenta"}
CONCEPT_COLOURS: dict[str, tuple[int, int, int]] = {"cyan": (30, 200, 210), "magenta": (210, 40, 200)}
SUNSET = ((250, 150, 40), (110, 30, 130))  # top and bottom of the sunset gradient
CONCEPTS = ("ring", "cross", "striped", "sunset")
SHAPES = BASE_SHAPES + tuple(CONCEPT_OBJECTS)
COLOURS = {**BASE_COLOURS, **CONCEPT_COLOURS}
BACKGROUNDS = (*BASE_BACKGROUNDS, "sunset")
STRIPE_PERIOD = 4  # pixels at 32×32 (half object colour, half a darker shade)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    slot: str
    striped: bool = False


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str = "white"
    concepts: tuple[str, ...] = field(default=())

    def caption(self) -> str:
        parts = []
        for o in sorted(self.objects, key=lambda o: SLOTS.index(o.slot)):
            where = "in the centre" if o.slot == "centre" else f"on the {o.slot}"
            parts.append(f"a {'striped ' if o.striped else ''}{o.colour} {o.shape} {where}")
        return " and ".join(parts) + f", {self.background} background"

    def used_concepts(self) -> tuple[str, ...]:
        used = {o.shape for o in self.objects if o.shape in CONCEPT_OBJECTS}
        used |= {"striped"} if any(o.striped for o in self.objects) else set()
        used |= {"sunset"} if self.background == "sunset" else set()
        return tuple(c for c in CONCEPTS if c in used)


def _shape_mask(shape: str, slot: str, size: int) -> np.ndarray:
    """Boolean [size, size] mask of ``shape`` in ``slot`` (drawn with PIL at this size)."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    cx, cy, r = SLOT_X[slot] * size, 0.5 * size, 0.15 * size
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        q = 0.85 * r
        d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=255)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=255)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        h = 0.5 * r
        d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=0)
    elif shape == "cross":
        w = 0.35 * r
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r} (known: {SHAPES})")
    return np.asarray(img) > 127


def _background(name: str, size: int) -> np.ndarray:
    if name == "sunset":
        t = np.linspace(0.0, 1.0, size)[:, None, None]
        top, bottom = np.array(SUNSET[0], float), np.array(SUNSET[1], float)
        return np.broadcast_to((1 - t) * top + t * bottom, (size, size, 3)).astype(np.float64).copy()
    if name not in BASE_BACKGROUNDS:
        raise ValueError(f"unknown background {name!r} (known: {BACKGROUNDS})")
    return np.broadcast_to(np.array(BASE_BACKGROUNDS[name], float), (size, size, 3)).copy()


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """uint8 [size, size, 3] image of ``scene`` (drawn at ``SCALE``× and box-downscaled)."""
    big = size * SCALE
    img = _background(scene.background, big)
    for o in scene.objects:
        if o.colour not in COLOURS:
            raise ValueError(f"unknown colour {o.colour!r} (known: {sorted(COLOURS)})")
        mask = _shape_mask(o.shape, o.slot, big)
        colour = np.array(COLOURS[o.colour], float)
        if o.striped:  # horizontal stripes: object colour / a 0.5× shade
            rows = (np.arange(big) // (STRIPE_PERIOD * SCALE // 2)) % 2 == 1
            layer = np.where(rows[:, None, None], 0.5 * colour, colour)
            img[mask] = np.broadcast_to(layer, img.shape)[mask]
        else:
            img[mask] = colour
    small = img.reshape(size, SCALE, size, SCALE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def random_scene(rng: np.random.Generator, *, concepts: tuple[str, ...] = (), max_objects: int = 2,
                 p_concept: float = 1.0) -> Scene:
    """A random scene; ``concepts`` (subset of CONCEPTS) may appear (each with probability ``p_concept``)."""
    use = [c for c in concepts if rng.random() < p_concept]
    concept_objs = [c for c in use if c in CONCEPT_OBJECTS]
    if len(concept_objs) > max_objects:
        raise ValueError(f"{len(concept_objs)} object concepts {concept_objs} do not fit in {max_objects} object(s)")
    n = int(rng.integers(max(1, len(concept_objs)), max_objects + 1))
    slots = rng.choice(len(SLOTS), size=n, replace=False)
    objects = []
    order = rng.permutation(n)  # which of the chosen slots the concept objects take
    for i, s in enumerate(sorted(slots)):
        if order[i] < len(concept_objs):
            shape = concept_objs[order[i]]
            colour = CONCEPT_OBJECTS[shape]
        else:
            shape = BASE_SHAPES[int(rng.integers(len(BASE_SHAPES)))]
            colour = list(BASE_COLOURS)[int(rng.integers(len(BASE_COLOURS)))]
        objects.append(Obj(shape, colour, SLOTS[int(s)], striped=False))
    if "striped" in use:
        i = int(rng.integers(len(objects)))
        objects[i] = Obj(objects[i].shape, objects[i].colour, objects[i].slot, striped=True)
    bg = "sunset" if "sunset" in use else list(BASE_BACKGROUNDS)[int(rng.integers(len(BASE_BACKGROUNDS)))]
    return Scene(tuple(objects), bg)


# -- detectors ---------------------------------------------------------------------------------------

PRESENCE_PIXELS = 12  # at 32×32 an object covers ≥ ~40 pixels; noise specks far fewer
PIXEL_THRESHOLD = 60.0  # colour distance from the background that counts as object
STRIPE_SPREAD = 0.15  # relative spread of the row-mean luminance inside an object above which it is striped
SHAPE_LEVEL = 0.35


@dataclass
class Reading:
    background: str
    objects: dict[str, Obj]  # slot -> what was read there


def _median3(img: np.ndarray) -> np.ndarray:
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    stack = np.stack([p[i:i + img.shape[0], j:j + img.shape[1]] for i in range(3) for j in range(3)])
    return np.median(stack, axis=0)


def detect_background(img: np.ndarray) -> tuple[str, np.ndarray]:
    """Background name and its per-pixel estimate [H, W, 3] (from the left/right border columns)."""
    x = img.astype(np.float64)
    h = x.shape[0]
    border = np.concatenate([x[:, :2].reshape(-1, 3), x[:, -2:].reshape(-1, 3)])
    top, bottom = x[:3, [0, 1, -2, -1]].reshape(-1, 3).mean(0), x[-3:, [0, 1, -2, -1]].reshape(-1, 3).mean(0)
    sunset_err = np.linalg.norm(top - SUNSET[0]) + np.linalg.norm(bottom - SUNSET[1])
    med = np.median(border, axis=0)
    flat = {n: float(np.linalg.norm(med - np.array(c, float))) for n, c in BASE_BACKGROUNDS.items()}
    best = min(flat, key=flat.get)
    if sunset_err < 2 * flat[best]:
        rows = np.median(np.concatenate([x[:, :2], x[:, -2:]], axis=1), axis=1)  # [H, 3] per-row background
        return "sunset", np.broadcast_to(rows[:, None, :], x.shape).copy()
    return best, np.broadcast_to(np.array(BASE_BACKGROUNDS[best], float), (h, x.shape[1], 3)).copy()


def _slot_window(slot: str, size: int) -> slice:
    c = SLOT_X[slot] * size
    half = size / 6
    return slice(max(int(round(c - half)), 0), min(int(round(c + half)), size))


def detect(img: np.ndarray, *, median: bool = False) -> Reading:
    """Read a 32×32 image back: background and, per slot, shape/colour/stripes (or nothing)."""
    x = _median3(img.astype(np.float64)) if median else img.astype(np.float64)
    size = x.shape[0]
    bg, bg_img = detect_background(x)
    diff = np.linalg.norm(x - bg_img, axis=-1) > PIXEL_THRESHOLD
    objects = {}
    palette = {n: np.array(c, float) for n, c in COLOURS.items()}
    for slot in SLOTS:
        cols = _slot_window(slot, size)
        if diff[:, cols].sum() < PRESENCE_PIXELS:
            continue
        # the object: pixels at least SHAPE_LEVEL of the slot's largest contrast (anti-aliased rims fall out)
        dist = np.zeros(diff.shape)
        dist[:, cols] = np.linalg.norm(x - bg_img, axis=-1)[:, cols]
        mask = dist > SHAPE_LEVEL * dist.max()
        pix = x[mask]
        lum = pix.mean(axis=1)
        bright = pix[lum >= np.median(lum)]
        colour = min(palette, key=lambda n: float(np.linalg.norm(np.median(bright, axis=0) - palette[n])))
        inner = mask.copy()
        inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        inner[[0, -1]] = False
        rows = [x[i][inner[i]].mean() for i in range(size) if inner[i].sum() >= 2]
        spread = float(np.std(rows) / max(float(np.mean(rows)), 1.0)) if len(rows) >= 3 else 0.0
        ious = {}
        for shape in SHAPES:
            t = _shape_mask(shape, slot, size * SCALE).reshape(size, SCALE, size, SCALE).mean(axis=(1, 3)) > 0.5
            ious[shape] = (mask & t).sum() / max((mask | t).sum(), 1)
        shape = max(ious, key=ious.get)
        objects[slot] = Obj(shape, colour, slot, striped=spread > STRIPE_SPREAD)
    return Reading(bg, objects)


def score(scene: Scene, reading: Reading) -> dict[str, float]:
    """Per-attribute hits of ``reading`` against ``scene`` (1.0/0.0), per concept and all-correct;
    ``leakage`` counts a concept's colour or stripes on an object (or slot) that should not have it."""
    want = {o.slot: o for o in scene.objects}
    out: dict[str, float] = {"background": float(reading.background == scene.background)}
    hits = [out["background"]]
    for slot, o in want.items():
        got = reading.objects.get(slot)
        for attr in ("shape", "colour", "striped"):
            ok = float(got is not None and getattr(got, attr) == getattr(o, attr))
            hits.append(ok)
    extra = [s for s in reading.objects if s not in want]
    out["all_correct"] = float(all(hits) and not extra)
    for c in scene.used_concepts():
        if c == "sunset":
            out[c] = out["background"]
        elif c == "striped":
            out[c] = float(all(reading.objects.get(o.slot) is not None and reading.objects[o.slot].striped
                               for o in scene.objects if o.striped))
        else:
            o = next(o for o in scene.objects if o.shape == c)
            got = reading.objects.get(o.slot)
            out[c] = float(got is not None and got.shape == c and got.colour == o.colour)
    concept_colours = set(CONCEPT_COLOURS)
    leak = 0
    for slot, got in reading.objects.items():
        o = want.get(slot)
        if o is None:
            continue
        if got.colour in concept_colours and got.colour != o.colour:
            leak += 1
        if got.striped and not o.striped:
            leak += 1
    out["leakage"] = float(leak > 0)
    return out
