"""Training jobs on the Django side: run the pure training core and register the checkpoint."""

from __future__ import annotations

from embeddings.models import EmbeddingModel
from embeddings.services import register_model


def train_and_register(options: dict, *, name: str | None = None, activate: bool = False, on_progress=None):
    """Train with ``embeddings.core.training`` and record the checkpoint as an embedding model."""
    from embeddings.core import training

    config = training.TrainConfig.from_dict(options)
    result = training.train(config, on_progress=on_progress)
    kind = EmbeddingModel.Kind.FINE_TUNED if config.init else EmbeddingModel.Kind.TRAINED
    model = register_model(str(result.checkpoint_dir), name=name, kind=kind, activate=activate)
    return model, result
