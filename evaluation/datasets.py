"""Image-caption benchmark datasets: reading them and importing them as assets.

Supported layouts (``kind``):

``flickr30k``
    Karpathy's ``dataset_flickr30k.json`` with the images in a
    ``flickr30k-images/`` folder next to it. Entries have ``filename``,
    ``split`` (train / val / test; the test split holds 1,000 images) and
    ``sentences`` (five per image, each with ``raw`` text).
``coco``
    Karpathy's ``dataset_coco.json`` with ``train2014/`` and ``val2014/`` next
    to it. Entries also have ``filepath`` (the folder); the test split holds
    5,000 images.
``coco2017``
    The official COCO caption annotations, e.g. ``captions_val2017.json``
    (``images[{id, file_name}]`` and ``annotations[{image_id, caption}]``),
    with the images in the folder named after the split (``val2017/``) next to
    the file or next to its ``annotations/`` folder. The split is the file's.
``synthetic``
    The generated shapes set (``embeddings.core.synthetic``): Karpathy format,
    ``dataset_synthetic.json`` with the images in ``images/`` next to it.

Every image becomes an ordinary asset through ``search.curation.ingest_image``,
in a named collection; re-importing is idempotent (the same bytes are the same
asset, known captions are not added twice). Each image keeps at most
``captions_per_image`` captions (5 by default, the usual 1K / 5K protocol:
COCO has a few images with six or seven).

Problems with the files raise :class:`DatasetError`, whose message names the
file and the entry.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from django.conf import settings

from search.curation import FollowUps, ingest_image
from search.validation import InvalidUpload, clean_captions

KARPATHY_KINDS = {"flickr30k": "flickr30k", "coco": "coco", "synthetic": "synthetic"}
KINDS = ("flickr30k", "coco", "coco2017", "synthetic")
KIND_LABELS = {
    "flickr30k": "Flickr30k (Karpathy split JSON)",
    "coco": "MSCOCO (Karpathy split JSON)",
    "coco2017": "MSCOCO 2017 caption annotations",
    "synthetic": "generated shapes set",
}
JSON_NAMES = {
    "flickr30k": ("dataset_flickr30k.json",),
    "coco": ("dataset_coco.json",),
    "coco2017": ("captions_val2017.json", "annotations/captions_val2017.json"),
    "synthetic": ("dataset_synthetic.json",),
}
DEFAULT_SPLIT = "test"
CAPTIONS_PER_IMAGE = 5

Progress = Callable[[int, int], None]


class DatasetError(ValueError):
    """A dataset file or folder that cannot be used; the message says which and why."""


@dataclass
class DatasetItem:
    label: str  # names the entry in the JSON file, for messages
    path: Path
    relative_name: str
    captions: list[str]


@dataclass
class Dataset:
    kind: str
    split: str
    json_path: Path
    image_root: Path
    items: list[DatasetItem]

    @property
    def default_collection(self) -> str:
        return default_collection(self.kind, self.split)


def default_collection(kind: str, split: str) -> str:
    return f"{kind}-{split}"[:100]


# --- Finding the files --------------------------------------------------------------


def dataset_root() -> Path | None:
    """Where dataset paths must lie, when the ``DATASET_ROOT`` setting names a folder."""
    root = getattr(settings, "DATASET_ROOT", None)
    return Path(root).expanduser().resolve() if root else None


def resolve(kind: str, path) -> tuple[str, Path]:
    """The dataset kind (``auto`` detected) and the JSON file for a file or folder path."""
    if kind not in ("auto", *KINDS):
        raise DatasetError(f"Unknown dataset kind {kind!r}; choose one of: auto, {', '.join(KINDS)}.")
    if not str(path or "").strip():
        raise DatasetError("Give the path of the dataset JSON file or of its folder.")
    given = Path(str(path).strip()).expanduser()
    root = dataset_root()
    if root is not None and not given.is_absolute():
        given = root / given
    target = given.resolve()
    if root is not None and not target.is_relative_to(root):
        raise DatasetError(f"{given} is outside the dataset folder {root}.")
    if not target.exists():
        raise DatasetError(f"{given}: no such file or folder.")
    if target.is_dir():
        target = _find_json(kind, target)
    if kind == "auto":
        kind = detect_kind(target)
    else:
        named = _kind_from_name(target.name)
        if named is not None and named != kind:
            raise DatasetError(f"{target} is a {named!r} dataset file, not {kind!r}.")
    return kind, target


def _find_json(kind: str, folder: Path) -> Path:
    kinds = KINDS if kind == "auto" else (kind,)
    names = [name for k in kinds for name in JSON_NAMES[k]]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    if "coco2017" in kinds:
        for pattern in ("captions_*.json", "annotations/captions_*.json"):
            found = sorted(folder.glob(pattern))
            if found:
                return found[0]
    raise DatasetError(f"{folder} holds no dataset file; expected one of: {', '.join(names)}.")


def _kind_from_name(name: str) -> str | None:
    """The kind a file's usual name gives away, if any."""
    for kind in ("flickr30k", "coco", "synthetic"):
        if name in JSON_NAMES[kind]:
            return kind
    return "coco2017" if name.startswith("captions_") and name.endswith(".json") else None


def detect_kind(json_path: Path) -> str:
    named = _kind_from_name(json_path.name)
    if named is not None:
        return named
    data = read_json(json_path)
    if isinstance(data, dict):
        if isinstance(data.get("annotations"), list):
            return "coco2017"
        declared = data.get("dataset")
        if declared in KARPATHY_KINDS.values() and isinstance(data.get("images"), list):
            return declared
    raise DatasetError(
        f"{json_path}: cannot tell which dataset this is; choose the kind ({', '.join(KINDS)})."
    )


def read_json(json_path: Path):
    try:
        raw = json_path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{json_path}: cannot be read ({exc.strerror or exc}).") from exc
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{json_path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{json_path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from exc


# --- Reading -----------------------------------------------------------------------


def load(
    kind: str,
    path,
    *,
    split: str | None = None,
    limit: int | None = None,
    image_root=None,
    captions_per_image: int | None = CAPTIONS_PER_IMAGE,
) -> Dataset:
    """Read one split of a dataset (the first ``limit`` images of it when given).

    Checks that every selected image file exists before anything is imported.
    """
    kind, json_path = resolve(kind, path)
    if limit is not None and limit < 1:
        raise DatasetError("The limit must be at least 1 image.")
    if captions_per_image is not None and captions_per_image < 1:
        raise DatasetError("captions_per_image must be at least 1.")
    root = Path(image_root).expanduser().resolve() if image_root else None
    if kind == "coco2017":
        dataset = _load_coco_annotations(json_path, split, limit, root, captions_per_image)
    else:
        dataset = _load_karpathy(kind, json_path, split, limit, root, captions_per_image)
    for item in dataset.items:
        if not item.path.is_file():
            raise DatasetError(f"{json_path}: {item.label}: image file not found: {item.path}")
    return dataset


def _relative(json_path: Path, label: str, *parts: str) -> PurePosixPath:
    """A path inside the image folder; absolute paths and '..' are refused."""
    relative = PurePosixPath(*[p.replace("\\", "/") for p in parts if p])
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise DatasetError(f"{json_path}: {label}: the image path {str(relative)!r} must stay inside the image folder.")
    return relative


def _captions(json_path: Path, label: str, texts, limit: int | None) -> list[str]:
    try:
        captions = clean_captions(texts)
    except InvalidUpload as exc:
        raise DatasetError(f"{json_path}: {label}: {exc}") from exc
    if not captions:
        raise DatasetError(f"{json_path}: {label} has no captions.")
    return captions[:limit] if limit else captions


def _pick_root(candidates: list[Path], first: PurePosixPath | None) -> Path:
    """The first candidate folder holding the first image; else the first that exists."""
    if first is not None:
        for folder in candidates:
            if (folder / first).is_file():
                return folder
    for folder in candidates:
        if folder.is_dir():
            return folder
    return candidates[0]


def _load_karpathy(kind, json_path, split, limit, image_root, captions_per_image) -> Dataset:
    data = read_json(json_path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DatasetError(f"{json_path}: not a Karpathy split file (it has no 'images' list).")
    declared = data.get("dataset")
    if isinstance(declared, str) and declared and declared != KARPATHY_KINDS[kind]:
        raise DatasetError(f"{json_path} is a {declared!r} dataset file, not {kind!r}.")
    split = split or DEFAULT_SPLIT
    seen: Counter = Counter()
    selected: list[tuple[str, PurePosixPath, list[str]]] = []
    for i, entry in enumerate(images):
        if not isinstance(entry, dict):
            raise DatasetError(f"{json_path}: images[{i}] is not an object.")
        entry_split = entry.get("split")
        seen[str(entry_split)] += 1
        if entry_split != split or (limit and len(selected) >= limit):
            continue
        filename = entry.get("filename")
        if not isinstance(filename, str) or not filename.strip():
            raise DatasetError(f"{json_path}: images[{i}] has no 'filename'.")
        label = f"images[{i}] ({filename})"
        filepath = entry.get("filepath") or ""
        if not isinstance(filepath, str):
            raise DatasetError(f"{json_path}: {label}: 'filepath' must be text.")
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise DatasetError(f"{json_path}: {label} has no 'sentences'.")
        texts = []
        for j, sentence in enumerate(sentences):
            text = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(text, str) and isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
                text = " ".join(str(t) for t in sentence["tokens"])
            if not isinstance(text, str):
                raise DatasetError(f"{json_path}: {label}: sentences[{j}] has no 'raw' text.")
            texts.append(text)
        selected.append((label, _relative(json_path, label, filepath, filename), _captions(
            json_path, label, texts, captions_per_image)))
    if not selected:
        found = ", ".join(f"{name} ({count})" for name, count in sorted(seen.items())) or "none"
        raise DatasetError(f"{json_path} has no images in the split {split!r}; its splits: {found}.")
    folder = json_path.parent
    if kind == "flickr30k":
        candidates = [folder / "flickr30k-images", folder / "flickr30k_images", folder / "images", folder]
    else:
        candidates = [folder, folder.parent]
    root = image_root or _pick_root(candidates, selected[0][1])
    items = [DatasetItem(label, root / rel, str(rel), caps) for label, rel, caps in selected]
    return Dataset(kind=kind, split=split, json_path=json_path, image_root=root, items=items)


def _load_coco_annotations(json_path, split, limit, image_root, captions_per_image) -> Dataset:
    data = read_json(json_path)
    images = data.get("images") if isinstance(data, dict) else None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise DatasetError(f"{json_path}: not a COCO caption file (it needs 'images' and 'annotations' lists).")
    stem = json_path.stem
    file_split = stem[len("captions_"):] if stem.startswith("captions_") else stem
    if split and split != file_split:
        raise DatasetError(f"{json_path} holds only the {file_split!r} split, not {split!r}.")
    files: dict[int, tuple[str, PurePosixPath]] = {}
    order: list[int] = []
    for i, image in enumerate(images):
        image_id = image.get("id") if isinstance(image, dict) else None
        name = image.get("file_name") if isinstance(image, dict) else None
        if not isinstance(image_id, int) or not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{json_path}: images[{i}] needs an integer 'id' and a 'file_name'.")
        label = f"image id {image_id} ({name})"
        if image_id in files:
            raise DatasetError(f"{json_path}: images[{i}]: the image id {image_id} appears twice.")
        files[image_id] = (label, _relative(json_path, label, name))
        order.append(image_id)
    texts: dict[int, list[str]] = {}
    for j, annotation in enumerate(annotations):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        caption = annotation.get("caption") if isinstance(annotation, dict) else None
        if not isinstance(image_id, int) or not isinstance(caption, str):
            raise DatasetError(f"{json_path}: annotations[{j}] needs an integer 'image_id' and a 'caption'.")
        if image_id not in files:
            raise DatasetError(f"{json_path}: annotations[{j}] refers to the unknown image id {image_id}.")
        texts.setdefault(image_id, []).append(caption)
    if limit:
        order = order[:limit]
    if not order:
        raise DatasetError(f"{json_path} lists no images.")
    selected = []
    for image_id in order:
        label, rel = files[image_id]
        selected.append((label, rel, _captions(json_path, label, texts.get(image_id, []), captions_per_image)))
    folder = json_path.parent
    root = image_root or _pick_root([folder / file_split, folder.parent / file_split, folder], selected[0][1])
    items = [DatasetItem(label, root / rel, str(rel), caps) for label, rel, caps in selected]
    return Dataset(kind="coco2017", split=file_split, json_path=json_path, image_root=root, items=items)


# --- Importing ---------------------------------------------------------------------


@dataclass
class ImportResult(FollowUps):
    collection: str
    asset_ids: list[int] = field(default_factory=list)  # one per dataset item, in order
    created: int = 0
    existing: int = 0
    new_captions: int = 0


def import_dataset(
    dataset: Dataset,
    collection: str | None = None,
    *,
    progress: Progress | None = None,
    user=None,
) -> ImportResult:
    """Ingest every image of the dataset with its captions into ``collection``.

    Idempotent: images already stored (same bytes) are reused, and only the
    captions they lack are added. An image already stored under another
    collection keeps that collection (an asset belongs to one collection).
    """
    collection = (collection or dataset.default_collection)[:100]
    result = ImportResult(collection=collection)
    total = len(dataset.items)
    for done, item in enumerate(dataset.items, 1):
        try:
            data = item.path.read_bytes()
        except OSError as exc:
            raise DatasetError(
                f"{dataset.json_path}: {item.label}: cannot read {item.path} ({exc.strerror or exc})."
            ) from exc
        try:
            outcome = ingest_image(
                data, item.captions, original_name=item.relative_name, user=user,
                collection=collection,
            )
        except InvalidUpload as exc:
            raise DatasetError(f"{dataset.json_path}: {item.label}: {item.path}: {exc}") from exc
        result.asset_ids.append(outcome.asset.pk)
        if outcome.created:
            result.created += 1
        else:
            result.existing += 1
        result.new_captions += len(outcome.new_captions)
        result.to_embed += outcome.to_embed
        if progress is not None:
            progress(done, total)
    return result
