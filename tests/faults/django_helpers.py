"""Django-side steps of the fault runs, each in its own process on the fault stack:

    python -m tests.faults.django_helpers setup DIR        # tiny model, staff user + token
    python -m tests.faults.django_helpers index-setup N    # a second model with N stored vectors
    python -m tests.faults.django_helpers index-write      # rebuild its image index, slowly
    python -m tests.faults.django_helpers index-mutate A R # A vectors stored, R deleted (assets and all)
    python -m tests.faults.django_helpers index-sync       # a sync (a delta), at full speed
    python -m tests.faults.django_helpers index-delta-write  # the same, slowly
    python -m tests.faults.django_helpers index-merge      # fold the deltas into a new base, at full speed
    python -m tests.faults.django_helpers index-merge-write  # the same, slowly
    python -m tests.faults.django_helpers index-check      # what a freshly started process serves
    python -m tests.faults.django_helpers soak-setup       # a curator for the admin
    python -m tests.faults.django_helpers soak-check FILE  # the soak's invariants against its ledger

``index-write`` writes the index file in small slices with pauses and reports its phases
(``writing``, ``renamed``, ``committed``) to FAULT_EVENTS, so the driver can kill it
inside each window. Only this process is slowed; the code it runs is the real one. The
slowed delta sync and merge report each file they write by kind as well (``writing-delta``,
``renamed-delta``, ``writing-manifest``, ``renamed-manifest``, ``writing-base``,
``renamed-keys`` …), so a kill can land before and after every write step.
"""

from __future__ import annotations

import json
import os
import sys
import time

INDEX_MODEL = "fault-index-model"
INDEX_DIM = 64


def event(name: str) -> None:
    path = os.environ.get("FAULT_EVENTS")
    if path:
        with open(path, "a") as fh:
            fh.write(f"{time.time():.6f} {os.getpid()} {name}\n")


def setup(directory: str) -> dict:
    from pathlib import Path

    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    from embeddings.core.checkpoints import build_random_checkpoint
    from embeddings.services import register_model

    checkpoint = Path(directory)
    if not (checkpoint / "config.json").exists():  # else reuse one built earlier (the test session's)
        checkpoint = build_random_checkpoint(directory, ["a red square", "a blue circle", "a green triangle"], seed=0)
    model = register_model(str(checkpoint), name="fault-tiny-siglip", kind="random")
    user, _ = get_user_model().objects.get_or_create(username="fault-staff", defaults={"is_staff": True})
    token, _ = Token.objects.get_or_create(user=user)
    return {"token": token.key, "model_id": model.pk}


def index_setup(count: int) -> dict:
    import numpy as np

    from embeddings.models import Embedding, EmbeddingModel
    from search.models import ImageAsset

    model, _ = EmbeddingModel.objects.get_or_create(
        name=INDEX_MODEL, defaults={"source": "/nonexistent/fault-index-model", "kind": "random",
                                    "dimension": INDEX_DIM, "image_size": 32},
    )
    if not Embedding.objects.filter(model=model).exists():
        assets = ImageAsset.objects.bulk_create([
            ImageAsset(sha256=f"{i:064x}", file=f"images/index-fault/{i}.png", width=1, height=1, format="PNG",
                       collection="index-fault", status="embedded")
            for i in range(1, count + 1)
        ])
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((count, INDEX_DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        Embedding.objects.bulk_create(
            [Embedding(model=model, asset=a, vector=Embedding.pack(v)) for a, v in zip(assets, vectors)],
            batch_size=1000,
        )
    return {"model_id": model.pk, "vectors": Embedding.objects.filter(model=model).count()}


FILE_KINDS = {".vdelta": "delta", ".manifest": "manifest", ".vidx": "base", ".keys": "keys"}


def _file_kind(path) -> str:
    from pathlib import Path

    return FILE_KINDS.get(Path(path).suffix, "file")


def _slow_writes(chunk: int, pause: float, hold: float) -> None:
    from search import index_sync
    from search.core.vector_index import base

    real_atomic_write = base.atomic_write
    real_prune = index_sync.prune_versions

    class Slices:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            view = memoryview(data)
            if view.nbytes == 0:
                return 0
            view = view.cast("B")
            for start in range(0, len(view), chunk):
                self.fh.write(view[start:start + chunk])
                time.sleep(pause)
            return len(view)

    def atomic_write(path, write):
        kind = _file_kind(path)

        def sliced(fh):
            event("writing")
            event(f"writing-{kind}")
            write(Slices(fh))

        checksum = real_atomic_write(path, sliced)
        event("renamed")  # the file is in place; its IndexBuild row is not committed yet
        event(f"renamed-{kind}")
        time.sleep(hold)
        return checksum

    def prune(model, modality):
        event("committed")
        time.sleep(hold)
        return real_prune(model, modality)

    base.atomic_write = atomic_write
    index_sync.prune_versions = prune


def index_write(chunk: int, pause: float, hold: float) -> dict:
    from embeddings.models import EmbeddingModel
    from search import index_sync

    _slow_writes(chunk, pause, hold)
    model = EmbeddingModel.objects.get(name=INDEX_MODEL)
    result = index_sync.sync_index(model, "image", rebuild=True)
    event("done")
    return {"version": result.build.version, "count": result.build.vector_count}


def index_mutate(add: int, remove: int) -> dict:
    """``add`` new assets with a vector each, and ``remove`` existing ones deleted (their
    vectors go with them, as in a curator's delete)."""
    import numpy as np

    from embeddings.models import Embedding, EmbeddingModel
    from search.models import ImageAsset

    model = EmbeddingModel.objects.get(name=INDEX_MODEL)
    rng = np.random.default_rng()
    existing = list(ImageAsset.objects.filter(collection="index-fault").values_list("pk", flat=True))
    gone = [int(i) for i in rng.choice(existing, size=min(remove, len(existing)), replace=False)] if remove else []
    ImageAsset.objects.filter(pk__in=gone).delete()
    added = []
    for _ in range(add):
        token = rng.integers(1 << 62)
        asset = ImageAsset.objects.create(sha256=f"{token:064x}", file=f"images/index-fault/m{token}.png", width=1,
                                          height=1, format="PNG", collection="index-fault", status="embedded")
        vector = rng.standard_normal(INDEX_DIM).astype(np.float32)
        Embedding.objects.create(model=model, asset=asset, vector=Embedding.pack(vector / np.linalg.norm(vector)))
        added.append(asset.pk)
    return {"added": added, "removed": gone}


def index_sync_once() -> dict:
    from embeddings.models import EmbeddingModel
    from search import index_sync

    model = EmbeddingModel.objects.get(name=INDEX_MODEL)
    result = index_sync.sync_index(model, "image")
    event("done")
    return {"version": result.build.version, "count": result.build.vector_count, "added": result.added,
            "removed": result.removed}


def index_merge_once() -> dict:
    from embeddings.models import EmbeddingModel
    from search import index_merge, index_sync
    from search.core.vector_index.segments import MergePlan

    model = EmbeddingModel.objects.get(name=INDEX_MODEL)
    version = index_sync.latest_version(model, "image")
    plan = MergePlan("base", ((0, len(version.manifest.segments)),), "fault run")
    result = index_merge.merge_index(model, "image", plan=plan)
    event("done")
    return result.as_dict()


def index_check() -> dict:
    """Load the index the way a freshly started web process does, and compare with Postgres."""
    from pathlib import Path

    from embeddings.models import EmbeddingModel
    from search import index_sync, serving
    from search.models import IndexBuild

    model = EmbeddingModel.objects.get(name=INDEX_MODEL)
    ready_before = list(IndexBuild.objects.filter(model=model, modality="image", status="ready")
                        .order_by("-version").values_list("version", flat=True))
    loader = serving.LoadedIndices()
    loaded = loader.served(model, "image")
    served = loaded.index if loaded is not None else None
    served_version = loaded.version if loaded is not None else None
    wanted = set(index_sync.stored_ids(model, "image").tolist())
    served_ids = set(served.ids().tolist()) if served is not None else set()
    directory = Path(index_sync.index_dir(model, "image"))
    named, _ = index_sync.referenced_files(IndexBuild.objects.filter(model=model, modality="image"))
    files = [p for p in directory.iterdir() if p.is_file()] if directory.is_dir() else []
    build = IndexBuild.objects.filter(model=model, modality="image", version=served_version).first()
    return {
        "ready_versions": ready_before,
        "served_version": served_version,
        "served_count": served.count() if served is not None else 0,
        "served_build_count": build.vector_count if build is not None else None,
        "served_matches_postgres": served is not None and served_ids == wanted,
        "lost": len(wanted - served_ids),
        "ghosts": len(served_ids - wanted),
        "failed_versions": list(IndexBuild.objects.filter(model=model, modality="image", status="failed")
                                .values_list("version", flat=True)),
        "temp_files": sum(p.name.endswith(".tmp") for p in files),
        "unreferenced_files": sum(not p.name.endswith(".tmp") and p.resolve() not in named for p in files),
        "expected": len(wanted),
    }


def soak_setup() -> dict:
    """A curator who can log in to the admin."""
    import secrets

    from django.contrib.auth import get_user_model

    password = secrets.token_urlsafe(16)
    user, _ = get_user_model().objects.get_or_create(username="soak-curator",
                                                     defaults={"is_staff": True, "is_superuser": True})
    user.set_password(password)
    user.save()
    return {"username": user.username, "password": password}


def soak_check(ledger_path: str) -> dict:
    """The soak's invariants, from inside the portal: what the clients were told against what
    the database, the media folder and the served indices hold."""
    from pathlib import Path

    from django.conf import settings
    from django.db import connection

    from embeddings.models import Embedding, EmbeddingModel
    from embeddings.services import encoder_for
    from search import index_sync, serving
    from search.models import Caption, ImageAsset, normalise_text

    ledger = json.loads(Path(ledger_path).read_text())
    deleted = set(ledger["deleted"])
    edits = ledger["edits"]

    def final_text(text):
        seen = set()
        while text in edits and text not in seen:
            seen.add(text)
            text = edits[text]
        return normalise_text(text)

    model = EmbeddingModel.objects.get(name="fault-tiny-siglip")
    encoder = encoder_for(model)
    acknowledged = {int(k): {final_text(t) for t in v} for k, v in ledger["captions"].items()}
    kept = {k: v for k, v in acknowledged.items() if k not in deleted}
    lost = duplicates = stale = 0
    problems = []
    for asset_id, texts in kept.items():
        asset = ImageAsset.objects.filter(pk=asset_id).first()
        if asset is None or asset.status != "embedded":
            lost += 1
            problems.append(f"asset {asset_id}: {'missing' if asset is None else asset.status + ' ' + asset.error}")
            continue
        vectors = Embedding.objects.filter(model=model, asset_id=asset_id).count()
        lost += vectors == 0
        duplicates += vectors > 1
        stored = {c.normalized_text: c for c in Caption.objects.filter(asset_id=asset_id)}
        for text in texts:
            caption = stored.get(text)
            rows = list(Embedding.objects.filter(model=model, caption=caption)) if caption else []
            if caption is None or not rows:
                lost += 1
                problems.append(f"asset {asset_id}: caption {text!r} {'missing' if caption is None else 'no vector'}")
                continue
            duplicates += len(rows) > 1
            wanted = encoder.encode_texts([caption.text])[0]
            if float(rows[0].array @ wanted) < 0.999:
                stale += 1
                problems.append(f"caption {caption.pk}: its vector is not that of {caption.text!r}")
    media = Path(settings.MEDIA_ROOT)
    files = {p.relative_to(media).as_posix() for p in (media / "images").rglob("*") if p.is_file()} \
        if (media / "images").is_dir() else set()
    named = set(ImageAsset.objects.values_list("file", flat=True))
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM embeddings_embedding e LEFT JOIN search_imageasset a ON a.id = e.asset_id "
            "LEFT JOIN search_caption c ON c.id = e.caption_id WHERE a.id IS NULL AND c.id IS NULL")
        (orphan_vectors,) = cursor.fetchone()
    served = serving.LoadedIndices()
    image_index = served.get(model, "image")
    caption_index = served.get(model, "caption")
    image_ids = set(image_index.ids().tolist()) if image_index is not None else set()
    caption_ids = set(caption_index.ids().tolist()) if caption_index is not None else set()
    live_ids = set(ImageAsset.objects.values_list("pk", flat=True))
    unacknowledged = ImageAsset.objects.exclude(pk__in=list(acknowledged))
    return {
        "acknowledged": len(acknowledged), "deleted": len(deleted & set(acknowledged)), "kept": len(kept),
        "kept_captions": sum(len(v) for v in kept.values()), "edited_captions": len(edits),
        "lost": lost, "duplicates": duplicates, "stale_caption_vectors": stale,
        "deleted_present": ImageAsset.objects.filter(pk__in=list(deleted)).count(),
        "deleted_in_search": 0,
        "orphan_files": len(files - named), "assets_without_file": len(named - files),
        "orphan_vectors": orphan_vectors,
        "index_rows_of_deleted": len((image_ids - live_ids) | (image_ids & deleted)),
        "index_drift": len(image_ids ^ set(index_sync.stored_ids(model, "image").tolist()))
        + len(caption_ids ^ set(index_sync.stored_ids(model, "caption").tolist())),
        "unacknowledged": unacknowledged.count(),
        "unacknowledged_pending": unacknowledged.exclude(status="embedded").count(),
        "problems": problems[:20],
    }


def main(argv: list[str]) -> int:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    django.setup()
    command, *args = argv
    if command == "setup":
        result = setup(args[0])
    elif command == "index-setup":
        result = index_setup(int(args[0]))
    elif command == "index-write":
        result = index_write(int(os.environ.get("FAULT_CHUNK", "16384")),
                             float(os.environ.get("FAULT_PAUSE", "0.01")),
                             float(os.environ.get("FAULT_HOLD", "0.3")))
    elif command == "index-mutate":
        result = index_mutate(int(args[0]), int(args[1]))
    elif command in ("index-sync", "index-delta-write", "index-merge", "index-merge-write"):
        if command.endswith("-write"):
            _slow_writes(int(os.environ.get("FAULT_CHUNK", "16384")), float(os.environ.get("FAULT_PAUSE", "0.01")),
                         float(os.environ.get("FAULT_HOLD", "0.3")))
        result = index_sync_once() if command.startswith("index-sync") or command == "index-delta-write" \
            else index_merge_once()
    elif command == "index-check":
        result = index_check()
    elif command == "soak-setup":
        result = soak_setup()
    elif command == "soak-check":
        result = soak_check(args[0])
    else:
        raise SystemExit(f"unknown command {command}")
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
