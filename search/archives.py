"""Bulk uploads: caption files (JSON, TSV, text) and the images of a zip archive."""

from __future__ import annotations

import io
import json
import zipfile
import zlib

from django.conf import settings

from search.validation import InvalidUpload


def captions_from_file(name: str, data: bytes) -> dict[str, list[str]]:
    """Captions per image file name, from JSON ``{"file.jpg": ["...", ...]}`` or
    tab-separated lines ``file.jpg<TAB>caption``."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidUpload(f"{name} is not UTF-8 text.") from exc
    if name.lower().endswith(".json"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidUpload(f"{name} is not valid JSON: {exc}.") from exc
        if not isinstance(parsed, dict) or not all(
            isinstance(v, list) and all(isinstance(c, str) for c in v) for v in parsed.values()
        ):
            raise InvalidUpload(f'{name} must map file names to lists of captions: {{"a.jpg": ["..."]}}.')
        return {basename(k): v for k, v in parsed.items()}
    mapping: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise InvalidUpload(f"{name}, line {lineno}: expected 'file name<TAB>caption'.")
        filename, caption = line.split("\t", 1)
        mapping.setdefault(basename(filename.strip()), []).append(caption)
    return mapping


def basename(name: str) -> str:
    return name.replace("\\", "/").rsplit("/", 1)[-1]


CAPTION_FILE_NAMES = ("captions.json", "captions.tsv", "captions.txt")


def files_from_zip(data: bytes) -> tuple[list[tuple[str, bytes]], dict[str, list[str]]]:
    """Image files and the captions file of a zip archive (read in memory, never extracted)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise InvalidUpload("The archive is not a valid zip file.") from exc
    images, captions = [], {}
    members = [m for m in archive.infolist() if not m.is_dir() and not basename(m.filename).startswith(".")]
    if len(members) > settings.UPLOAD_MAX_FILES + 1:
        raise InvalidUpload(f"The archive holds {len(members)} files; the limit is {settings.UPLOAD_MAX_FILES}.")
    total = 0
    for member in members:
        total += member.file_size
        if member.file_size > settings.UPLOAD_MAX_BYTES or total > settings.UPLOAD_MAX_BYTES * 10:
            raise InvalidUpload("The archive expands to more data than allowed.")
        name = basename(member.filename)
        content = _read_member(archive, member, name)
        if name.lower() in CAPTION_FILE_NAMES:
            captions = captions_from_file(name, content)
        else:
            images.append((name, content))
    return images, captions


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, name: str) -> bytes:
    """A member's bytes, never more than its declared size (which was checked against the caps)."""
    try:
        with archive.open(member) as handle:
            content = handle.read(member.file_size + 1)
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise InvalidUpload(f"{name} in the archive cannot be read ({exc}).") from exc
    if len(content) != member.file_size:
        raise InvalidUpload(f"{name} in the archive is damaged (its size does not match the directory).")
    return content
