"""The ingestion benchmark's images: photo-like 640x480 JPEGs drawn with Pillow.

Gradients, shapes and noise, so they compress like photographs. This module
imports no Django models: the processes that draw the JPEGs in parallel import
it on their own.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def photo_like_jpeg(seed: int, size=(640, 480), quality: int = 90) -> bytes:
    """A 640x480 JPEG with smooth gradients, a few shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.empty((h, w, 3), np.float32)
    for c in range(3):
        a, b, d = rng.uniform(-1, 1, 3)
        base[..., c] = 128 + 60 * np.sin(a * xx / 90 + b * yy / 70 + d * 3)
    base += rng.normal(0, 6, base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(20, 240)), y0 + int(rng.integers(20, 200))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_numbered_jpeg(job: tuple[str, int]) -> None:
    """Write JPEG number ``i`` as ``folder/{i:07d}.jpg`` (a pool job: ``(folder, i)``)."""
    folder, i = job
    (Path(folder) / f"{i:07d}.jpg").write_bytes(photo_like_jpeg(i))
