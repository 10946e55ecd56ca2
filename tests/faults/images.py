"""Image files made on the fly: odd-but-valid ones every part of the pipeline must handle,
and hostile ones every way in must refuse with a 4xx (never a crash, never a half-stored asset).

Nothing here touches Django: the corpora are plain ``(name, bytes)`` lists.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

from PIL import Image, ImageDraw

BASE_SIZE = (64, 48)


def base_picture(size=BASE_SIZE, seed=0) -> Image.Image:
    """An asymmetric RGB picture: orientation mistakes change it visibly."""
    img = Image.new("RGB", size, (240, 240, 240))
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.rectangle([0, 0, w // 3, h // 2], fill=(200 - seed % 50, 30, 30))
    draw.rectangle([w // 2, h // 2, w - 1, h - 1], fill=(30, 30 + seed % 200, 200))
    draw.line([0, h - 1, w - 1, 0], fill=(20, 160, 20), width=3)
    return img


def save(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


# --- odd but valid -------------------------------------------------------------------


# What Pillow's exif_transpose does for each orientation, and the inverse, which turns
# the upright picture into the pixels a camera would have stored.
_UNDO_ORIENTATION = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def with_orientation(upright: Image.Image, orientation: int, fmt: str = "PNG", **params) -> bytes:
    """Stored pixels plus an EXIF Orientation tag that together display as ``upright``."""
    undo = _UNDO_ORIENTATION[orientation]
    stored = upright.transpose(undo) if undo is not None else upright.copy()
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(stored, fmt, exif=exif.tobytes(), **params)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes, extra_chunks=()) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + b"".join(extra_chunks)
            + png_chunk(b"IDAT", zlib.compress(rows, 9)) + png_chunk(b"IEND", b""))


def rgb48_png(width=32, height=24) -> bytes:
    rows = b"".join(
        b"\0" + b"".join(struct.pack(">HHH", x * 2000, y * 2500, 40000) for x in range(width))
        for y in range(height)
    )
    return raw_png(width, height, 16, 2, rows)


def animated(fmt: str, frames=3, **params) -> bytes:
    images = [base_picture(seed=i * 40) for i in range(frames)]
    if fmt == "GIF":
        images = [im.convert("P", palette=Image.Palette.ADAPTIVE) for im in images]
    return save(images[0], fmt, save_all=True, append_images=images[1:], duration=80, loop=0, **params)


def odd_valid_images() -> list[tuple[str, bytes]]:
    """Unusual modes, containers and metadata that must all upload and embed."""
    pic = base_picture()
    alpha = pic.convert("RGBA")
    alpha.putalpha(Image.linear_gradient("L").resize(pic.size))
    palette = pic.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    ramp = b"".join(struct.pack("<H", (i * 21) % 65536) for i in range(64 * 48))
    gray16 = Image.frombytes("I;16", (64, 48), ramp)
    corrupt_exif = bytearray(save(pic, "JPEG", quality=90, exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff"))
    cases = [
        ("cmyk.jpg", save(pic.convert("CMYK"), "JPEG", quality=90)),
        ("gray.jpg", save(pic.convert("L"), "JPEG")),
        ("progressive.jpg", save(pic, "JPEG", progressive=True, quality=85)),
        ("gray16.png", save(gray16, "PNG")),
        ("rgb48.png", rgb48_png()),
        ("palette-transparent.png", save(palette, "PNG", transparency=0)),
        ("palette-transparent.gif", save(palette, "GIF", transparency=0)),
        ("grey-alpha.png", save(pic.convert("LA"), "PNG")),
        ("rgba.png", save(alpha, "PNG")),
        ("rgba.webp", save(alpha, "WEBP", lossless=True)),
        ("bilevel.bmp", save(pic.convert("1"), "BMP")),
        ("rgba.bmp", save(alpha, "BMP")),
        ("lzw.tif", save(pic, "TIFF", compression="tiff_lzw")),
        ("float.tif", save(pic.convert("F"), "TIFF")),
        ("animated.gif", animated("GIF")),
        ("animated.webp", animated("WEBP", lossless=True)),
        ("animated.png", animated("PNG")),
        ("camera.mpo", save(pic, "MPO", save_all=True, append_images=[base_picture(seed=99)])),
        ("one-pixel.png", save(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG")),
        ("thin-strip.png", save(Image.new("RGB", (1, 2000), (90, 20, 20)), "PNG")),
        ("bad-exif.jpg", bytes(corrupt_exif)),
    ]
    cases += [(f"orientation-{o}.jpg", with_orientation(base_picture(seed=o), o, "JPEG", quality=92))
              for o in range(1, 9)]
    return cases


def orientation_set() -> list[tuple[str, bytes]]:
    """The same upright picture stored losslessly under each EXIF orientation 1–8."""
    upright = base_picture(seed=7)
    return [(f"upright-{o}.png", with_orientation(upright, o, "PNG")) for o in range(1, 9)]


# --- hostile -------------------------------------------------------------------------


def png_bomb(width=100_000, height=100_000) -> bytes:
    """A tiny file whose header claims 10 gigapixels (a decompression bomb)."""
    return raw_png(width, height, 8, 0, b"\0" * 1024)


def gif_bomb() -> bytes:
    screen = struct.pack("<HHBBB", 65535, 65535, 0x80, 0, 0)
    palette = b"\0\0\0\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + palette + image + b"\x3b"


def jpeg_bomb() -> bytes:
    """A real small JPEG whose frame header is rewritten to claim 65500×65500 pixels."""
    data = bytearray(save(base_picture(), "JPEG"))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 65500, 65500)
    return bytes(data)


def webp_bomb(width=8000, height=8000) -> bytes:
    """A real 8×8 lossless WebP whose header is rewritten to claim ``width``×``height`` pixels."""
    data = bytearray(save(Image.new("RGB", (8, 8), (1, 2, 3)), "WEBP", lossless=True))
    at = data.find(b"VP8L") + 9  # after the chunk header and the 0x2f signature byte
    (bits,) = struct.unpack_from("<I", data, at)
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    struct.pack_into("<I", data, at, bits)
    return bytes(data)


def tiff_bomb() -> bytes:
    data = bytearray(save(Image.new("L", (8, 8)), "TIFF"))
    # Rewrite ImageWidth (256) and ImageLength (257) entries in the first IFD.
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):
            if kind == 3:
                struct.pack_into("<H", data, entry + 8, 60000)
            else:
                struct.pack_into("<I", data, entry + 8, 60000)
    return bytes(data)


def bmp_bomb() -> bytes:
    data = bytearray(save(Image.new("RGB", (4, 4)), "BMP"))
    struct.pack_into("<ii", data, 18, 50_000, 50_000)
    return bytes(data)


def text_chunk_bomb() -> bytes:
    """A valid PNG with a compressed text chunk that inflates to 64 MB."""
    payload = b"k\0\0" + zlib.compress(b"A" * (64 * 1024 * 1024), 9)
    pic = save(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG")
    end = pic.rfind(b"IEND") - 4
    return pic[:end] + png_chunk(b"zTXt", payload) + pic[end:]


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: max(1, int(len(data) * keep))]


def hostile_images() -> list[tuple[str, bytes, str]]:
    """(file name, bytes, words expected in the refusal) for every way an upload can be bad."""
    pic = base_picture(size=(160, 120))
    big_jpeg = save(pic, "JPEG", quality=95)
    big_png = save(pic, "PNG")
    return [
        ("empty.png", b"", "empty"),
        ("text.png", b"hello, this is not an image\n" * 10, "not a readable image"),
        ("page.jpg", b"<!doctype html><html><script>alert(1)</script></html>", "not a readable image"),
        ("vector.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "not a readable image"),
        ("doc.png", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n", "not a readable image"),
        ("archive.png", _zip_bytes({"a.txt": b"x"}), "not a readable image"),
        ("signature-only.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not a readable image"),
        ("truncated.jpg", truncated(big_jpeg), "not a readable image"),
        ("truncated.png", truncated(big_png, 0.6), "not a readable image"),
        ("truncated.gif", truncated(save(pic.convert("P"), "GIF"), 0.5), "not a readable image"),
        ("truncated.webp", truncated(save(pic, "WEBP"), 0.5), "not a readable image"),
        ("bomb.png", png_bomb(), "pixels"),
        ("bomb.gif", gif_bomb(), "pixels"),
        ("bomb.jpg", jpeg_bomb(), "pixels"),
        ("bomb.webp", webp_bomb(), "pixels"),
        ("bomb.tif", tiff_bomb(), "pixels"),
        ("bomb.bmp", bmp_bomb(), "pixels"),
        ("text-bomb.png", text_chunk_bomb(), "not a readable image"),
        ("icon.ico", save(Image.new("RGB", (16, 16)), "ICO"), "not a readable image"),
        ("pixmap.png", save(Image.new("RGB", (16, 16)), "PPM"), "not a readable image"),
        ("targa.jpg", save(Image.new("RGB", (16, 16)), "TGA"), "not a readable image"),
        ("paintbrush.png", save(Image.new("RGB", (16, 16)), "PCX"), "not a readable image"),
    ]


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


def zip_bomb(entries=3, size=64 * 1024 * 1024) -> bytes:
    """A zip of a few entries that each inflate to ``size`` bytes of zeros."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(entries):
            with archive.open(f"zeros-{i}.png", "w", force_zip64=True) as member:
                chunk = b"\0" * (1024 * 1024)
                for _ in range(size // len(chunk)):
                    member.write(chunk)
    return buf.getvalue()


def zip_of(files: list[tuple[str, bytes]], captions: dict[str, list[str]] | None = None) -> bytes:
    members = dict(files)
    if captions is not None:
        import json

        members["captions.json"] = json.dumps(captions).encode()
    return _zip_bytes(members)


__all__ = [
    "base_picture",
    "hostile_images",
    "odd_valid_images",
    "orientation_set",
    "zip_bomb",
    "zip_of",
]
