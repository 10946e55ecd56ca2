"""Deterministic captioned image set of simple shapes ("shapes world").

Every image shows one object drawn with Pillow.  Its *composition* is the tuple
(colour, shape, size, position, background); rendering adds small random jitter
(exact hue, size, offset, rotation) so that several renders of one composition
differ.  Each image carries five captions built from varied sentence templates
and synonyms ("a small red circle on the left on a white background", "there is
a tiny red disc at the left side against a white backdrop", ...).

Validation and test images use compositions that never occur in training, and
every test (and validation) image is a distinct composition, so text-to-image
Recall@1 is well defined.  Test and validation captions always name all five
attributes; in the training split one caption of every five is a partial
description ("a red circle", "a large star at the top") so that short search
queries work too.

The set is written in the Karpathy split JSON format used for Flickr30k and
COCO::

    {"dataset": "synthetic",
     "images": [{"filepath": "images", "filename": "train_00000.png",
                 "split": "train", "imgid": 0, "sentids": [0, 1, 2, 3, 4],
                 "sentences": [{"raw": "...", "tokens": [...], "imgid": 0,
                                "sentid": 0}, ...],
                 "composition": {"colour": "red", ...}}, ...]}

with the PNG files in ``<out_dir>/images/``.

Command line::

    python -m embeddings.core.synthetic OUT_DIR [--seed 0] [--n-train 12000]
        [--n-val 200] [--n-test 600] [--image-size 64]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

DATASET_NAME = "synthetic"
JSON_NAME = "dataset_synthetic.json"
IMAGE_DIR = "images"
CAPTIONS_PER_IMAGE = 5
FORMAT_VERSION = 1

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 30),
    "green": (40, 165, 55),
    "cyan": (35, 205, 215),
    "blue": (35, 70, 225),
    "purple": (135, 50, 195),
    "pink": (250, 125, 195),
    "brown": (125, 75, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "heart", "crescent")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")

# Relative object radius (fraction of the image side) and position centres.
_SIZE_RADIUS = {"small": 0.15, "large": 0.27}
_POSITION_CENTRE = {
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
    "centre": (0.5, 0.5),
}
_SUPERSAMPLE = 4

# --------------------------------------------------------------------------
# Vocabulary for captions
# --------------------------------------------------------------------------
_SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
_COLOUR_MODIFIERS = ("", "", "", "bright ", "vivid ")
_SHAPE_WORDS = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "square block", "square tile"),
    "triangle": ("triangle", "triangular shape"),
    "star": ("star", "five pointed star"),
    "diamond": ("diamond", "rhombus", "diamond shape"),
    "cross": ("cross", "plus sign"),
    "heart": ("heart", "heart shape"),
    "crescent": ("crescent", "crescent moon"),
}
_POSITION_WORDS = {
    "left": ("on the left", "at the left side", "in the left part of the picture", "towards the left"),
    "right": ("on the right", "at the right side", "in the right part of the picture", "towards the right"),
    "top": ("at the top", "near the top", "in the upper part of the picture", "towards the top"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part of the picture", "towards the bottom"),
    "centre": ("in the centre", "in the middle", "at the center", "in the middle of the picture"),
}
_BACKGROUND_PHRASES = (
    "on a {b} background",
    "against a {b} backdrop",
    "with a {b} background",
    "on {b}",
)
_FULL_TEMPLATES = (
    "{a_obj} {pos} {bg}",
    "there is {a_obj} {pos} {bg}",
    "picture of {a_obj} {bg}, placed {pos}",
    "a {b} background with {a_obj} {pos}",
    "{a_obj_nosize}, {size}, {pos} {bg}",
    "an image showing {a_obj} {pos} {bg}",
    "{Pos} {bg} there is {a_obj}",
    "photo of {a_obj} sitting {pos}, {bg}",
    "{a_size} {colour} coloured {shape} {pos} {bg}",
)


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


# The demo model's world: how many pictures of each split, at which size.
DEMO_DATA = {"seed": 0, "n_train": 12000, "n_val": 200, "n_test": 600, "image_size": 64}


@dataclass(frozen=True, order=True)
class Composition:
    """The attributes that define what an image shows."""

    colour: str
    shape: str
    size: str
    position: str
    background: str

    def key(self) -> tuple[str, str, str, str, str]:
        return (self.colour, self.shape, self.size, self.position, self.background)


def all_compositions() -> list[Composition]:
    """Every possible composition, in a fixed order."""
    return [
        Composition(c, s, z, p, b)
        for c, s, z, p, b in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS, BACKGROUNDS)
    ]


def split_compositions(seed: int, n_val: int, n_test: int) -> dict[str, list[Composition]]:
    """Partition all compositions into disjoint train / val / test groups.

    Held-out groups are drawn at random (seeded), so every single attribute value
    and every attribute pair still occurs in training, but the exact tuples of
    the val and test groups never do.
    """
    combos = all_compositions()
    if n_val + n_test >= len(combos):
        raise ValueError(f"n_val + n_test must be below the {len(combos)} possible compositions")
    rng = random.Random(f"shapes-split-{seed}")
    rng.shuffle(combos)
    test = sorted(combos[:n_test])
    val = sorted(combos[n_test : n_test + n_val])
    train = sorted(combos[n_test + n_val :])
    return {"train": train, "val": val, "test": test}


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------
def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Outline of a shape of radius ~1 centred on the origin (y grows downward)."""
    if shape == "square":
        h = 0.85
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        r = 1.15
        return [(r * math.cos(a), r * math.sin(a) + 0.15) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.18 if k % 2 == 0 else 0.48
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a) + 0.08))
        return pts
    if shape == "diamond":
        return [(0.0, -1.15), (0.75, 0.0), (0.0, 1.15), (-0.75, 0.0)]
    if shape == "cross":
        w, l = 0.34, 1.0
        return [(-w, -l), (w, -l), (w, -w), (l, -w), (l, w), (w, w), (w, l), (-w, l),
                (-w, w), (-l, w), (-l, -w), (-w, -w)]
    if shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 15.0, -y / 15.0 + 0.1))
        return pts
    raise ValueError(f"no polygon for shape {shape!r}")


def _jitter_colour(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)  # type: ignore[return-value]


def render(composition: Composition, image_size: int = 64, seed: int | str = 0) -> Image.Image:
    """Draw one image of ``composition``; the same seed always gives the same pixels."""
    rng = random.Random(f"shapes-render-{seed}")
    side = image_size * _SUPERSAMPLE
    shade = rng.randint(-8, 8)  # backgrounds stay neutral: one offset for all channels
    background = tuple(max(0, min(255, v + shade)) for v in BACKGROUNDS[composition.background])
    colour = _jitter_colour(COLOURS[composition.colour], rng, 14)
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)

    radius = _SIZE_RADIUS[composition.size] * side * rng.uniform(0.88, 1.12)
    cx_rel, cy_rel = _POSITION_CENTRE[composition.position]
    cx = (cx_rel + rng.uniform(-0.045, 0.045)) * side
    cy = (cy_rel + rng.uniform(-0.045, 0.045)) * side
    angle = math.radians(rng.uniform(-12.0, 12.0))

    if composition.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif composition.shape == "crescent":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
        off = 0.45 * radius
        dx, dy = off * math.cos(angle), off * math.sin(angle)
        r2 = 0.85 * radius
        draw.ellipse((cx + dx - r2, cy + dy - r2 - 0.1 * radius, cx + dx + r2, cy + dy + r2 - 0.1 * radius),
                     fill=background)
    else:
        cos_a, sin_a = math.cos(angle), math.sin(angle)
        pts = [
            (cx + radius * (x * cos_a - y * sin_a), cy + radius * (x * sin_a + y * cos_a))
            for x, y in _unit_polygon(composition.shape)
        ]
        draw.polygon(pts, fill=colour)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


# --------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------
def tokenize_caption(text: str) -> list[str]:
    """Karpathy-style tokens: lower case words without punctuation."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _full_caption(c: Composition, template: str, rng: random.Random) -> str:
    size = rng.choice(_SIZE_WORDS[c.size])
    colour = rng.choice(_COLOUR_MODIFIERS) + c.colour
    shape = rng.choice(_SHAPE_WORDS[c.shape])
    pos = rng.choice(_POSITION_WORDS[c.position])
    bg = rng.choice(_BACKGROUND_PHRASES).format(b=c.background)
    text = template.format(
        a_obj=_article(f"{size} {colour} {shape}"),
        a_obj_nosize=_article(f"{colour} {shape}"),
        a_size=_article(size),
        size=size,
        colour=colour,
        shape=shape,
        pos=pos,
        Pos=pos[0].upper() + pos[1:],
        bg=bg,
        b=c.background,
    )
    return text[0].upper() + text[1:] if rng.random() < 0.3 else text


def _partial_caption(c: Composition, rng: random.Random) -> str:
    """A short description that names the colour and/or the shape and, now and
    then, some of the other attributes ("a red circle", "a large star at the
    top", "a small green object")."""
    keep_colour, keep_shape = rng.choice([(True, True), (True, True), (True, False), (False, True)])
    keep_size = rng.random() < 0.5
    keep_position = rng.random() < 0.4
    keep_background = rng.random() < 0.25
    words = []
    if keep_size:
        words.append(rng.choice(_SIZE_WORDS[c.size]))
    if keep_colour:
        words.append(c.colour)
    words.append(rng.choice(_SHAPE_WORDS[c.shape]) if keep_shape else rng.choice(("shape", "object")))
    text = _article(" ".join(words))
    if keep_position:
        text += " " + rng.choice(_POSITION_WORDS[c.position])
    if keep_background:
        text += " " + rng.choice(_BACKGROUND_PHRASES).format(b=c.background)
    return text


def captions_for(c: Composition, seed: int | str = 0, partial: bool = False) -> list[str]:
    """Five distinct captions for a composition (one of them partial if ``partial``)."""
    rng = random.Random(f"shapes-captions-{seed}")
    templates = rng.sample(_FULL_TEMPLATES, CAPTIONS_PER_IMAGE)
    captions: list[str] = []
    for template in templates:
        for _ in range(20):
            text = _full_caption(c, template, rng)
            if text not in captions:
                break
        captions.append(text)
    if partial:
        captions[rng.randrange(CAPTIONS_PER_IMAGE)] = _partial_caption(c, rng)
    return captions


# --------------------------------------------------------------------------
# Whole data set
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Item:
    split: str
    index: int
    composition: Composition


def plan(seed: int = 0, n_train: int = 12000, n_val: int = 200, n_test: int = 600) -> list[_Item]:
    """Which composition each image of each split shows (no rendering)."""
    groups = split_compositions(seed, n_val, n_test)
    items: list[_Item] = []
    rng = random.Random(f"shapes-train-order-{seed}")
    train_combos = list(groups["train"])
    order: list[Composition] = []
    while len(order) < n_train:
        rng.shuffle(train_combos)
        order.extend(train_combos)
    items += [_Item("train", i, c) for i, c in enumerate(order[:n_train])]
    items += [_Item("val", i, c) for i, c in enumerate(groups["val"])]
    items += [_Item("test", i, c) for i, c in enumerate(groups["test"])]
    return items


def _entry(item: _Item, imgid: int, sentid: int, seed: int) -> dict:
    tag = f"{seed}-{item.split}-{item.index}"
    captions = captions_for(item.composition, seed=tag, partial=item.split == "train")
    sentids = list(range(sentid, sentid + len(captions)))
    return {
        "filepath": IMAGE_DIR,
        "filename": f"{item.split}_{item.index:05d}.png",
        "split": item.split,
        "imgid": imgid,
        "sentids": sentids,
        "sentences": [
            {"raw": text, "tokens": tokenize_caption(text), "imgid": imgid, "sentid": sid}
            for text, sid in zip(captions, sentids)
        ],
        "composition": asdict(item.composition),
    }


def generate(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 12000,
    n_val: int = 200,
    n_test: int = 600,
    image_size: int = 64,
    progress: bool = False,
) -> Path:
    """Write the images and the Karpathy JSON into ``out_dir``; return the JSON path.

    Idempotent: when the folder already holds a set made with the same arguments,
    it is reused; otherwise every file is (re)written, byte-identically for equal
    arguments.
    """
    out = Path(out_dir)
    json_path = out / JSON_NAME
    params = {
        "version": FORMAT_VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "image_size": image_size,
    }
    items = plan(seed, n_train, n_val, n_test)
    image_dir = out / IMAGE_DIR
    if json_path.exists():
        try:
            existing = json.loads(json_path.read_text())
        except (OSError, ValueError):
            existing = {}
        if existing.get("generator") == params and all(
            (image_dir / entry["filename"]).exists() for entry in existing.get("images", [])
        ):
            return json_path

    image_dir.mkdir(parents=True, exist_ok=True)
    iterator = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc="rendering", unit="img")
    entries = []
    sentid = 0
    for imgid, item in enumerate(iterator):
        entry = _entry(item, imgid, sentid, seed)
        sentid += len(entry["sentids"])
        image = render(item.composition, image_size, seed=f"{seed}-{item.split}-{item.index}")
        image.save(image_dir / entry["filename"], format="PNG", optimize=False)
        entries.append(entry)
    data = {"dataset": DATASET_NAME, "generator": params, "images": entries}
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=None, separators=(",", ":")))
    tmp.replace(json_path)
    return json_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the synthetic captioned shapes data set.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=12000)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    path = generate(
        args.out_dir,
        seed=args.seed,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        image_size=args.image_size,
        progress=True,
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
