"""Make sure an embedding model is active, falling back to an offline model when needed.

Order: SIGLIP_MODEL when set (an error if it cannot be loaded); else the active
model; else the default hub model when the hub is reachable or it is cached;
else the committed offline demo model; else a small random checkpoint, clearly
flagged as meaningless in the portal.
"""

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from embeddings import services
from embeddings.core.siglip import ModelNotAvailable
from embeddings.models import EmbeddingModel
from embeddings.services import DEMO_MODEL_DIR, DEMO_MODEL_NAME


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def cached_on_disk(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


class Command(BaseCommand):
    help = "Activate the configured SigLIP model, or an offline fallback when none can be loaded."

    def handle(self, *args, **options):
        model = services.calibrate(self.choose())
        self.stdout.write(f"Active embedding model: {model.name} ({model.get_kind_display()}, {model.source})")

    def choose(self) -> EmbeddingModel:
        source = settings.SIGLIP_MODEL
        if settings.SIGLIP_MODEL_EXPLICIT:
            try:
                return self.register(source, EmbeddingModel.Kind.PRETRAINED)
            except ModelNotAvailable as exc:
                raise CommandError(str(exc)) from exc
        active = EmbeddingModel.active()
        if active is not None and (Path(active.source).is_dir() or cached_on_disk(active.source)):
            return active
        if Path(source).is_dir() or cached_on_disk(source) or hub_reachable():
            try:
                return self.register(source, EmbeddingModel.Kind.PRETRAINED)
            except ModelNotAvailable as exc:
                self.stderr.write(f"{exc}\nFalling back to an offline model.")
        if (DEMO_MODEL_DIR / "config.json").exists():
            return self.register(str(DEMO_MODEL_DIR), EmbeddingModel.Kind.DEMO, name=DEMO_MODEL_NAME)
        return self.random_model()

    def register(self, source, kind, name=None) -> EmbeddingModel:
        existing = EmbeddingModel.objects.filter(source=str(source)).first()
        if existing is not None:
            existing.activate()
            return existing
        self.stdout.write(f"Loading {source} …")
        return services.register_model(str(source), name=name, kind=kind)

    def random_model(self) -> EmbeddingModel:
        from embeddings.core.checkpoints import build_random_checkpoint

        directory = Path(settings.STATE_DIR) / "models" / "random-siglip"
        if not (directory / "config.json").exists():
            self.stderr.write("No SigLIP model can be loaded: building a small random one (results will be meaningless).")
            build_random_checkpoint(directory, ["a photo of a dog", "a photo of a cat", "a red car on a street"])
        return self.register(str(directory), EmbeddingModel.Kind.RANDOM, name="random-siglip")
