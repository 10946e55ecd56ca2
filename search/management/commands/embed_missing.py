from django.core.management.base import BaseCommand

from embeddings.services import active_model
from search import asset_vectors
from search.asset_vectors import assets_missing_vectors
from search.tasks import embed_asset_task


class Command(BaseCommand):
    help = "Queue embedding for every asset that lacks vectors for the active model."

    def add_arguments(self, parser):
        parser.add_argument("--now", action="store_true", help="embed in this process instead of queueing")

    def handle(self, *args, now=False, **options):
        from tqdm import tqdm


        model = active_model()
        ids = list(assets_missing_vectors(model).values_list("pk", flat=True))
        for asset_id in tqdm(ids, desc="embedding" if now else "queueing", unit="image", disable=not ids):
            if now:
                asset_vectors.embed_asset(asset_id, model)
            else:
                embed_asset_task.delay(asset_id)
        self.stdout.write(f"{len(ids)} assets {'embedded' if now else 'queued'} for {model.name}.")
