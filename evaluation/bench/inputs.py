"""Generated inputs of the query benchmark: caption-like text queries and photo-like JPEGs.

The same seeds give the same queries and images on every run and machine, so the
gallery's captions, the phases' queries and the quality checks are reproducible.
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

_SUBJECTS = ("a man", "a woman", "two children", "a dog", "a black cat", "an old car", "a red bus",
             "a surfer", "a cyclist", "three horses", "a small boat", "a chef", "a girl", "a bird",
             "a tennis player", "a group of people", "a white truck", "a brown bear", "a skier", "a baby")
_ACTIONS = ("riding", "standing next to", "walking past", "sitting on", "jumping over", "looking at",
            "running along", "parked near", "lying on", "holding", "playing with", "waiting by")
_OBJECTS = ("a wave", "the beach", "a wooden table", "a busy street", "a snowy hill", "a green field",
            "a bowl of fruit", "the river", "a stone wall", "a kitchen counter", "a park bench",
            "the train station", "a lighthouse", "a plate of pasta", "a bicycle", "a sofa")
_TAILS = ("at sunset", "in the rain", "on a sunny day", "at night", "in the snow", "under a blue sky",
          "in a city", "near the sea", "in the morning", "with trees behind", "", "")


def query_texts(n: int, seed) -> list[str]:
    """``n`` distinct caption-like queries."""
    rng = random.Random(f"bench-queries-{seed}")
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        text = " ".join(filter(None, (rng.choice(_SUBJECTS), rng.choice(_ACTIONS), rng.choice(_OBJECTS),
                                      rng.choice(_TAILS))))
        if rng.random() < 0.5:
            text += f" number {rng.randrange(10_000)}"
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def photo_jpeg(seed: int, size=(640, 480), quality: int = 90) -> bytes:
    """A photo-like 640×480 JPEG: smooth colour fields, shapes, fine noise."""
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(field, "RGB").resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        w, h = int(rng.integers(20, 200)), int(rng.integers(20, 200))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    noise = rng.normal(0, 6, (size[1], size[0], 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()
