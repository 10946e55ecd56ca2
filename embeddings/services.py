"""Embedding models: which one is active, its loaded encoder, registering checkpoints,
training one and the offline demo model."""

from __future__ import annotations

import logging
from pathlib import Path

from django.conf import settings

from embeddings.core.siglip import SiglipEncoder, get_encoder
from embeddings.models import EmbeddingModel

log = logging.getLogger(__name__)


class NoActiveModel(RuntimeError):
    def __init__(self):
        super().__init__(
            "No embedding model is active. Run `python manage.py ensure_model` "
            "(the run command does it), or activate one in the admin."
        )


def active_model() -> EmbeddingModel:
    model = EmbeddingModel.active()
    if model is None:
        raise NoActiveModel()
    return model


def encoder_for(model: EmbeddingModel) -> SiglipEncoder:
    """The loaded encoder of a model, cached per process, running the towers
    with ``settings.SIGLIP_INFERENCE`` (ONNX exports kept under the state folder)."""
    return get_encoder(model.source, device=settings.SIGLIP_DEVICE, backend=settings.SIGLIP_INFERENCE,
                       onnx_cache_dir=Path(settings.STATE_DIR) / "onnx").load()


def register_model(source: str, *, name: str | None = None, kind: str = EmbeddingModel.Kind.PRETRAINED,
                   activate: bool = True) -> EmbeddingModel:
    """Load a checkpoint once to learn its shape, then record (and activate) it."""
    source = str(Path(source).resolve()) if Path(source).is_dir() else source
    encoder = get_encoder(source, device=settings.SIGLIP_DEVICE).load()
    scale, bias = encoder.logit_calibration()
    model, _ = EmbeddingModel.objects.update_or_create(
        name=name or source,
        defaults={"source": source, "kind": kind, "dimension": encoder.dim, "image_size": encoder.image_size,
                  "logit_scale": scale, "logit_bias": bias},
    )
    if activate:
        model.activate()
    return model




def calibrate(model: EmbeddingModel) -> EmbeddingModel:
    """Read the sigmoid head of a model registered before it was recorded (loads the checkpoint
    once; searches then turn cosines into match probabilities without it)."""
    if not model.calibrated:
        model.logit_scale, model.logit_bias = get_encoder(model.source, device=settings.SIGLIP_DEVICE).load() \
            .logit_calibration()
        EmbeddingModel.objects.filter(pk=model.pk).update(logit_scale=model.logit_scale, logit_bias=model.logit_bias)
    return model


def train_and_register(options: dict, *, name: str | None = None, activate: bool = False, on_progress=None):
    """Train with ``embeddings.core.training`` and record the checkpoint as an embedding model."""
    from embeddings.core import training

    config = training.TrainConfig.from_dict(options)
    result = training.train(config, on_progress=on_progress)
    kind = EmbeddingModel.Kind.FINE_TUNED if config.init else EmbeddingModel.Kind.TRAINED
    model = register_model(str(result.checkpoint_dir), name=name, kind=kind, activate=activate)
    return model, result


DEMO_MODEL_DIR = Path(settings.BASE_DIR) / "embeddings" / "demo_model"
DEMO_MODEL_NAME = "offline-demo"


def demo_checkpoint(retrain: bool, stdout) -> Path:
    if not retrain and (DEMO_MODEL_DIR / "config.json").exists():
        return DEMO_MODEL_DIR
    from embeddings.core import training

    target = Path(settings.STATE_DIR) / "models" / "demo"
    stdout.write(f"Training the demo model into {target} (about 9 minutes on 2 CPU cores) …")
    return training.demo(out_dir=target, data_dir=Path(settings.STATE_DIR) / "datasets" / "shapes-train")


def activate_demo_model(checkpoint: Path) -> EmbeddingModel:
    existing = EmbeddingModel.objects.filter(source=str(checkpoint.resolve())).first()
    model = existing or register_model(str(checkpoint), name=DEMO_MODEL_NAME, kind=EmbeddingModel.Kind.DEMO)
    model.activate()
    return model
