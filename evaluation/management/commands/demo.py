"""The offline demo: a small SigLIP trained here on generated shapes, searching its unseen test pictures.

Steps (each skipped when already done, so a second start is quick):
1. the demo checkpoint: the committed ``embeddings/demo_model`` (or trained anew with --retrain);
2. registered and made the active model;
3. the generated test split (compositions never seen in training) imported as assets with
   captions through the normal ingestion path, embedded by the Celery worker;
4. the indices synced.
"""

import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from embeddings.core import synthetic
from embeddings.models import Embedding, EmbeddingModel
from embeddings.services import activate_demo_model, demo_checkpoint
from evaluation import datasets
from search import asset_vectors, index_sync, tasks
from search.models import ImageAsset

DEMO_COLLECTION = "shapes-demo"


def demo_gallery(data_dir: Path) -> Path:
    """The test split of the generated set (it does not depend on the training images)."""

    return synthetic.generate(data_dir, **dict(synthetic.DEMO_DATA, n_train=0), progress=True)


class Command(BaseCommand):
    help = "Set up the offline demo: demo model active, its test pictures imported, embedded and indexed."

    def add_arguments(self, parser):
        parser.add_argument("--retrain", action="store_true", help="train the demo model again instead of "
                            "using the committed checkpoint")
        parser.add_argument("--in-process", action="store_true",
                            help="embed here instead of waiting for a Celery worker")
        parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the worker")
        parser.add_argument("--if-active", action="store_true",
                            help="only fill the gallery, and only when the demo model is already the active one")

    def handle(self, *args, retrain=False, in_process=False, timeout=600, if_active=False, **options):
        from tqdm import tqdm


        if if_active:
            model = EmbeddingModel.active()
            if model is None or model.kind != EmbeddingModel.Kind.DEMO:
                return
        else:
            model = activate_demo_model(demo_checkpoint(retrain, self.stdout))
        self.stdout.write(f"Active model: {model.name} ({model.source})")
        data_dir = Path(settings.STATE_DIR) / "datasets" / "shapes"
        dataset = datasets.load("synthetic", demo_gallery(data_dir), split="test")
        done = Embedding.objects.filter(model=model, asset__collection=DEMO_COLLECTION).count()
        if done >= len(dataset.items):
            index_sync.sync_indices(model)
            self.stdout.write(f"Demo ready: {done} pictures in collection {DEMO_COLLECTION!r}.")
            return
        with tqdm(total=len(dataset.items), desc="importing", unit="image") as bar:
            result = datasets.import_dataset(dataset, DEMO_COLLECTION,
                                             progress=lambda done, total: bar.update(done - bar.n))
        ids = result.asset_ids
        missing = list(asset_vectors.assets_missing_vectors(model).filter(pk__in=ids).values_list("pk", flat=True))
        if in_process:
            for asset_id in tqdm(missing, desc="embedding", unit="image"):
                asset_vectors.embed_asset(asset_id, model)
        else:
            tasks.queue_embedding(*missing)
            self.wait_for_worker(model, ids, timeout)
        index_sync.sync_indices(model)
        self.stdout.write(f"Demo ready: {len(ids)} pictures in collection {DEMO_COLLECTION!r}. "
                          "Try “a small red circle”.")

    def wait_for_worker(self, model, ids, timeout):
        from tqdm import tqdm

        deadline = time.monotonic() + timeout
        pending = asset_vectors.assets_missing_vectors(model).filter(pk__in=ids)
        with tqdm(total=len(ids), desc="embedding (worker)", unit="image") as bar:
            while True:
                left = pending.count()
                bar.update(len(ids) - left - bar.n)
                if not left:
                    return
                failed = pending.filter(status=ImageAsset.Status.FAILED).first()
                if failed is not None:
                    raise CommandError(f"Embedding {failed} failed: {failed.error}")
                if time.monotonic() > deadline:
                    raise CommandError(f"{left} pictures still not embedded after {timeout:.0f} s: "
                                       "is a Celery worker running? (or use --in-process)")
                time.sleep(0.5)
