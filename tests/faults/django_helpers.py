"""Django-side steps of the fault runs, each in its own process on the fault stack:

    python -m tests.faults.django_helpers setup DIR        # tiny model, staff user + token
    python -m tests.faults.django_helpers index-setup N    # a second model with N stored vectors
    python -m tests.faults.django_helpers index-write      # rebuild its image index, slowly
    python -m tests.faults.django_helpers index-check      # what a freshly started process serves

``index-write`` writes the index file in small slices with pauses and reports its phases
(``writing``, ``renamed``, ``committed``) to FAULT_EVENTS, so the driver can kill it
inside each window. Only this process is slowed; the code it runs is the real one.
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
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    from embeddings.checkpoints import build_random_checkpoint
    from embeddings.services import register_model

    from pathlib import Path

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


def _slow_writes(chunk: int, pause: float, hold: float) -> None:
    from search import indexing
    from search.vector_index import base

    real_atomic_write = base.atomic_write
    real_prune = indexing._prune_old_versions

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
        def sliced(fh):
            event("writing")
            write(Slices(fh))

        checksum = real_atomic_write(path, sliced)
        event("renamed")  # the file is in place; its IndexBuild row is not committed yet
        time.sleep(hold)
        return checksum

    def prune(model, modality):
        event("committed")
        time.sleep(hold)
        return real_prune(model, modality)

    base.atomic_write = atomic_write
    indexing._prune_old_versions = prune


def index_write(chunk: int, pause: float, hold: float) -> dict:
    from embeddings.models import EmbeddingModel
    from search import indexing

    _slow_writes(chunk, pause, hold)
    model = EmbeddingModel.objects.get(name=INDEX_MODEL)
    result = indexing.sync_index(model, "image", rebuild=True)
    event("done")
    return {"version": result.build.version, "count": result.build.vector_count}


def index_check() -> dict:
    """Load the index the way a freshly started web process does, and compare with Postgres."""
    from pathlib import Path

    from embeddings.models import EmbeddingModel
    from search import indexing
    from search.models import IndexBuild

    model = EmbeddingModel.objects.get(name=INDEX_MODEL)
    ready_before = list(IndexBuild.objects.filter(model=model, modality="image", status="ready")
                        .order_by("-version").values_list("version", flat=True))
    loader = indexing.LoadedIndices()
    loaded = loader.served(model, "image")
    served = loaded.index if loaded is not None else None
    served_version = loaded.version if loaded is not None else None
    wanted = set(indexing.stored_ids(model, "image").tolist())
    directory = Path(indexing._index_dir(model, "image"))
    return {
        "ready_versions": ready_before,
        "served_version": served_version,
        "served_count": served.count() if served is not None else 0,
        "served_matches_postgres": served is not None and set(served.ids().tolist()) == wanted,
        "failed_versions": list(IndexBuild.objects.filter(model=model, modality="image", status="failed")
                                .values_list("version", flat=True)),
        "temp_files": len(list(directory.glob(".*.tmp"))) if directory.is_dir() else 0,
        "expected": len(wanted),
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
    elif command == "index-check":
        result = index_check()
    else:
        raise SystemExit(f"unknown command {command}")
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
