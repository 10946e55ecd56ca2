import re
from pathlib import PurePath

import numpy as np
from django.db import models, transaction
from django.db.models import Q


def public_model_name(name: str) -> str:
    """A model's name as anyone may read it: a local checkpoint named by its path shows only its
    folder's name (server paths are for staff); hub ids ("google/siglip-…") stay as they are."""
    name = name or ""
    if name.startswith(("/", "~", "./", "../", "\\")) or re.match(r"^[A-Za-z]:[\\/]", name):
        return PurePath(name.replace("\\", "/")).name or name
    return name


class EmbeddingModel(models.Model):
    """A SigLIP checkpoint the portal embeds with. One is active at a time."""

    class Kind(models.TextChoices):
        PRETRAINED = "pretrained", "pretrained"
        FINE_TUNED = "fine-tuned", "fine-tuned"
        TRAINED = "trained", "trained here from scratch"
        DEMO = "demo", "offline demo (trained on generated shapes)"
        RANDOM = "random", "random weights (results are meaningless)"

    name = models.CharField(max_length=200, unique=True)
    source = models.CharField(max_length=500, help_text="Hub id or local checkpoint directory.")
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.PRETRAINED)
    dimension = models.PositiveIntegerField()
    image_size = models.PositiveIntegerField()
    is_active = models.BooleanField(default=False)
    created = models.DateTimeField(auto_now_add=True)
    # SigLIP's sigmoid head: a text and an image match with probability
    # σ(logit_scale · cosine + logit_bias), the checkpoint's own learned scale (exp'd) and bias.
    logit_scale = models.FloatField(null=True, blank=True, help_text="The checkpoint's learned temperature, exp'd.")
    logit_bias = models.FloatField(null=True, blank=True, help_text="The checkpoint's learned bias.")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["is_active"], condition=Q(is_active=True), name="one_active_embedding_model"
            )
        ]

    def __str__(self):
        return self.name

    @property
    def public_name(self) -> str:
        return public_model_name(self.name)

    @classmethod
    def active(cls):
        return cls.objects.filter(is_active=True).first()

    @property
    def calibrated(self) -> bool:
        return self.logit_scale is not None and self.logit_bias is not None

    def match_probability(self, cosine: float) -> float | None:
        """The probability that a text and an image with this cosine match, as the checkpoint's
        sigmoid head says; None for a model whose head was not read."""
        if not self.calibrated:
            return None
        logit = self.logit_scale * float(cosine) + self.logit_bias
        return float(1.0 / (1.0 + np.exp(-logit))) if logit > -700 else 0.0

    def activate(self):
        with transaction.atomic():
            EmbeddingModel.objects.filter(is_active=True).exclude(pk=self.pk).update(is_active=False)
            EmbeddingModel.objects.filter(pk=self.pk).update(is_active=True)
        self.is_active = True


class Embedding(models.Model):
    """One L2-normalised float32 vector of an image or of a caption."""

    model = models.ForeignKey(EmbeddingModel, on_delete=models.CASCADE, related_name="embeddings")
    asset = models.ForeignKey(
        "search.ImageAsset", null=True, blank=True, on_delete=models.CASCADE, related_name="embeddings"
    )
    caption = models.ForeignKey(
        "search.Caption", null=True, blank=True, on_delete=models.CASCADE, related_name="embeddings"
    )
    vector = models.BinaryField(help_text="float32, little-endian")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=(Q(asset__isnull=False) & Q(caption__isnull=True))
                | (Q(asset__isnull=True) & Q(caption__isnull=False)),
                name="embedding_of_image_or_caption",
            ),
            models.UniqueConstraint(
                fields=["model", "asset"], condition=Q(asset__isnull=False), name="one_embedding_per_image"
            ),
            models.UniqueConstraint(
                fields=["model", "caption"],
                condition=Q(caption__isnull=False),
                name="one_embedding_per_caption",
            ),
        ]
        # An index sync reads the vectors stored since its watermark, per model and
        # modality: a range of these, however many rows of other models or the other
        # modality came in between (search.index_changes).
        indexes = [
            models.Index(fields=["model", "id"], condition=Q(asset__isnull=False), name="embedding_image_by_id"),
            models.Index(fields=["model", "id"], condition=Q(caption__isnull=False), name="embedding_caption_by_id"),
        ]

    @staticmethod
    def pack(vector) -> bytes:
        return np.asarray(vector, dtype="<f4").tobytes()

    @property
    def array(self) -> np.ndarray:
        return np.frombuffer(bytes(self.vector), dtype="<f4")
