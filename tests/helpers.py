"""Helpers shared by the tests: pictures as bytes, a dataset file in the Karpathy format, waiting."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(colour=(200, 30, 30), size=(64, 48), fmt="PNG", pattern=0) -> bytes:
    img = Image.new("RGB", size, colour)
    if pattern:
        pixels = img.load()
        for x in range(0, size[0], 2 + pattern):
            for y in range(size[1]):
                pixels[x, y] = (255 - colour[0], 255 - colour[1], 255 - colour[2])
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def wait_for(predicate, timeout=90.0, interval=0.2, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {message}")


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


COLOURS = [(220, 30, 30), (30, 30, 220), (30, 170, 30), (240, 200, 20), (140, 40, 190), (20, 190, 200),
           (250, 120, 190), (120, 70, 30), (15, 15, 15), (128, 128, 128)]


def picture(i: int) -> bytes:
    """A distinct small JPEG for every i."""
    return image_bytes(COLOURS[i % len(COLOURS)], size=(40, 32), fmt="JPEG", pattern=i // len(COLOURS))


def sentences(texts, imgid, first_sentid):
    return [{"raw": t, "tokens": t.lower().split(), "imgid": imgid, "sentid": first_sentid + j}
            for j, t in enumerate(texts)]


def write_karpathy(folder: Path, entries, *, dataset="flickr30k", json_name="dataset_flickr30k.json",
                   image_dir="flickr30k-images", filepath=None) -> Path:
    """A Karpathy split file; ``entries`` are (split, captions) pairs, images written as files.

    With ``filepath`` (COCO style) each entry names its folder: a callable split -> folder.
    """
    folder.mkdir(parents=True, exist_ok=True)
    images, sentid = [], 0
    for imgid, (split, captions) in enumerate(entries):
        entry = {"filename": f"img_{imgid:04d}.jpg", "imgid": imgid, "split": split,
                 "sentids": list(range(sentid, sentid + len(captions))),
                 "sentences": sentences(captions, imgid, sentid)}
        if filepath is not None:
            entry["filepath"] = filepath(split)
            target = folder / entry["filepath"]
        else:
            target = folder / image_dir
        target.mkdir(parents=True, exist_ok=True)
        (target / entry["filename"]).write_bytes(picture(imgid))
        images.append(entry)
        sentid += len(captions)
    path = folder / json_name
    path.write_text(json.dumps({"dataset": dataset, "images": images}))
    return path


def jpeg_bytes(image, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def two_colour_image(width, height):
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    return image


# Captions the tiny checkpoints of the encoder tests train their tokenizer on (the first N of them).
ENCODER_CAPTIONS = [
    "a photo of a red car parked on the street",
    "a brown dog running on the beach",
    "two cats sleeping on a grey sofa",
    "a bowl of fresh fruit on a wooden table",
    "snowy mountains under a blue sky at sunset",
    "a person riding a bicycle through the park",
    "a plate of pasta with tomato sauce",
    "an old lighthouse next to the sea",
]
