"""The image stages of bulk embedding that need no database: reading and decoding files in
worker processes (a torch ``DataLoader`` dataset), batching them, and normalising uint8
pixels on the device. ``search.bulk_embedding`` composes them with the database stages."""

from __future__ import annotations

import io
import os
import time

import numpy as np

from embeddings.core.limits import too_large, too_many_pixels
from embeddings.core.siglip import ImagePreprocessor, load_image


def default_workers(device: str) -> int:
    """Decoding processes: on a GPU host all cores but two (the main process
    feeds the GPU); on CPU the model wants the cores, so a few at most."""
    cores = os.cpu_count() or 1
    if device.startswith("cuda"):
        return max(1, min(cores - 2, 32))
    return max(1, min(4, cores // 4))


def default_batch_size(device: str) -> int:
    return 256 if device.startswith("cuda") else 16


def resized_uint8(preprocessor: ImagePreprocessor, data: bytes, draft: bool = False) -> np.ndarray:
    """Decode and resize exactly as ``ImagePreprocessor.process_one``, stopping
    before rescaling: (3, H, W) uint8.

    ``draft``: let libjpeg decode a JPEG straight at a reduced scale (1/2, 1/4,
    1/8: the smallest that still covers the model's input size), then resize
    from there. Decoding a 640x480 photo for a 224 px model gets about twice as
    fast; the pixels differ slightly from the exact path (see docs/scaling.md).
    """
    source = data
    if draft:
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ValueError(f"cannot decode image: {exc}") from exc
        if image.format == "JPEG":
            image.draft("RGB", (preprocessor.width, preprocessor.height))
        source = image
    rgb = load_image(source)
    if rgb.size != (preprocessor.width, preprocessor.height):
        rgb = rgb.resize((preprocessor.width, preprocessor.height), resample=preprocessor.resample)
    return np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1))


def check_header(data: bytes, max_bytes: int | None, max_pixels: int | None) -> None:
    """The upload caps (bytes, pixels from the header) before anything is decoded."""
    refused = too_large(len(data), max_bytes)
    if refused:
        raise ValueError(refused)
    if max_pixels is not None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ValueError(f"cannot decode image: {exc}") from exc
        refused = too_many_pixels(width, height, max_pixels)
        if refused:
            raise ValueError(refused)


class ImageFiles:
    """Map-style dataset: item i -> (asset id, pixels or None, error, read s, decode s)."""

    def __init__(self, items: list[tuple[int, str | bytes]], preprocessor: ImagePreprocessor, uint8: bool,
                 max_bytes: int | None = None, max_pixels: int | None = None, draft: bool = False):
        self.items = items
        self.preprocessor = preprocessor
        self.uint8 = uint8
        self.draft = draft
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        asset_id, source = self.items[i]
        t0 = time.perf_counter()
        try:
            if isinstance(source, bytes):
                data = source
            else:
                with open(source, "rb") as fh:
                    data = fh.read()
        except OSError as exc:
            return asset_id, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0, 0.0
        t1 = time.perf_counter()
        try:
            check_header(data, self.max_bytes, self.max_pixels)
            if self.uint8:
                pixels = resized_uint8(self.preprocessor, data, draft=self.draft)
            else:
                pixels = self.preprocessor.process_one(data)
        except (ValueError, OSError) as exc:
            return asset_id, None, f"{type(exc).__name__}: {exc}", t1 - t0, time.perf_counter() - t1
        return asset_id, pixels, None, t1 - t0, time.perf_counter() - t1


def lower_priority(worker_id: int) -> None:
    """On CPU the model is the bottleneck: decoding (a few per cent of a core)
    takes only the cycles the model's threads leave."""
    try:
        os.nice(10)
    except OSError:
        pass


def collate(samples):
    import torch

    ids, pixels, errors, read_s, decode_s = zip(*samples)
    good = [p for p in pixels if p is not None]
    batch = torch.from_numpy(np.stack(good)) if good else None
    return {
        "ids": [i for i, p in zip(ids, pixels) if p is not None],
        "pixels": batch,
        "failed": {i: e for i, p, e in zip(ids, pixels, errors) if p is None},
        "read": float(sum(read_s)),
        "decode": float(sum(decode_s)),
    }


def normalise_on_device(batch, preprocessor: ImagePreprocessor, dtype):
    """uint8 (N, 3, H, W) on the device -> the model's normalised input."""
    import torch

    x = batch.to(torch.float32)
    if preprocessor.do_rescale:
        x = x * preprocessor.rescale_factor
    if preprocessor.do_normalize:
        mean = torch.tensor(preprocessor.image_mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(preprocessor.image_std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x.to(dtype)
