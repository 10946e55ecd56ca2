from django.core.management.base import BaseCommand, CommandError

from embeddings.models import EmbeddingModel
from search import index_sync


class Command(BaseCommand):
    help = "Rebuild the vector indices of a model (the active one by default) from the vectors in Postgres."

    def add_arguments(self, parser):
        parser.add_argument("--model", help="embedding model name (default: the active model)")
        parser.add_argument("--sync", action="store_true",
                            help="only add missing and drop stale rows instead of rebuilding")

    def handle(self, *args, model=None, sync=False, **options):
        target = EmbeddingModel.objects.filter(name=model).first() if model else EmbeddingModel.active()
        if target is None:
            raise CommandError(f"No embedding model {'named ' + model if model else 'is active'}.")
        for result in index_sync.sync_indices(target, rebuild=not sync):
            count = result.build.vector_count if result.build else 0
            self.stdout.write(f"{result.modality}: {count} vectors (v{result.build.version if result.build else 0})")
