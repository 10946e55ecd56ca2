"""The limits on an image before it is decoded: its bytes and, read from its header, its
pixels. Uploads (``search.validation``) and the bulk pipeline's readers
(``embeddings.core.batches``) check the same rule and say it in the same words."""

from __future__ import annotations


def too_large(size: int, limit: int | None) -> str | None:
    """Why ``size`` bytes are too many, or None."""
    if limit is None or size <= limit:
        return None
    return f"The file is {size:,} bytes; the limit is {limit:,} bytes."


def too_many_pixels(width: int, height: int, limit: int | None) -> str | None:
    """Why a ``width`` × ``height`` image has too many pixels, or None."""
    if limit is None or width * height <= limit:
        return None
    return f"The image is {width}×{height} pixels; the limit is {limit:,} pixels."
