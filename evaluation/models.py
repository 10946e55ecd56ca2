from datetime import timedelta

from django.conf import settings
from django.core.validators import MaxValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from embeddings.models import public_model_name

# No job runs longer than this (the task's time limit); an older run still marked
# queued or running was lost with its worker.
MAX_RUN_SECONDS = 6 * 3600


class BenchmarkRun(models.Model):
    """One benchmark job and its results.

    ``kind`` says what was measured; retrieval runs fill the metric fields, other
    kinds (query latency over HTTP, index scale) keep their numbers in ``extra``
    and share the history, the machine description and the job bookkeeping.
    """

    class Kind(models.TextChoices):
        RETRIEVAL = "retrieval", "retrieval (recall@K, mAP, ranks)"
        QUERY_LATENCY = "query-latency", "query latency over HTTP"
        INDEX_SCALE = "index-scale", "vector index recall and latency at scale"
        INGESTION = "ingestion", "ingestion throughput"
        LIVE_INDEX = "live-index", "upload to searchable, segments and merges"

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    kind = models.CharField(max_length=30, choices=Kind.choices, default=Kind.RETRIEVAL, db_index=True)

    # What was measured
    dataset = models.CharField(max_length=30, db_index=True, help_text="flickr30k, coco, coco2017 or synthetic")
    dataset_path = models.CharField(max_length=500, help_text="The dataset JSON file on the server.")
    split = models.CharField(max_length=30, blank=True, help_text="Blank: test (Karpathy files) or the file's own split.")
    limit = models.PositiveIntegerField(null=True, blank=True, help_text="Only the first N images of the split.")
    collection = models.CharField(max_length=100, blank=True)
    gallery_images = models.PositiveIntegerField(default=0)
    gallery_captions = models.PositiveIntegerField(default=0)

    # With what
    model = models.ForeignKey(
        "embeddings.EmbeddingModel", null=True, blank=True, on_delete=models.SET_NULL, related_name="benchmark_runs"
    )
    model_name = models.CharField(max_length=200, blank=True)  # as recorded; public_model_name for pages
    model_source = models.CharField(max_length=500, blank=True)
    index_backend = models.CharField(max_length=50, blank=True)
    index_params = models.JSONField(default=dict, blank=True)
    image_size = models.PositiveIntegerField(null=True, blank=True)
    text_length = models.PositiveIntegerField(default=64, help_text="Text tokens per query (padded and truncated).")

    # The job
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True)
    progress = models.PositiveSmallIntegerField(default=0, validators=[MaxValueValidator(100)])
    stage = models.CharField(max_length=200, blank=True)
    error = models.TextField(blank=True)

    # Results
    text_to_image = models.JSONField(default=dict, blank=True, help_text="recall@1/5/10, mAP, median/mean rank")
    image_to_text = models.JSONField(default=dict, blank=True, help_text="recall@1/5/10, mAP, median/mean rank")
    t2i_latency_p50_ms = models.FloatField(null=True, blank=True)
    t2i_latency_p95_ms = models.FloatField(null=True, blank=True)
    i2t_latency_p50_ms = models.FloatField(null=True, blank=True)
    i2t_latency_p95_ms = models.FloatField(null=True, blank=True)
    images_per_second = models.FloatField(null=True, blank=True)
    captions_per_second = models.FloatField(null=True, blank=True)
    machine = models.JSONField(default=dict, blank=True)
    sample_grid = models.FileField(max_length=300, blank=True)
    extra = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(progress__lte=100), name="benchmark_progress_at_most_100"),
        ]

    def __str__(self):
        return f"{self.dataset} {self.split} #{self.pk}"

    @property
    def public_model_name(self) -> str:
        return public_model_name(self.model_name)

    @property
    def is_active(self) -> bool:
        return self.status in (self.Status.QUEUED, self.Status.RUNNING)

    @property
    def may_still_change(self) -> bool:
        """Active, and recent enough that a worker may still be on it."""
        return self.is_active and timezone.now() - self.created < timedelta(seconds=MAX_RUN_SECONDS + 600)

    @property
    def duration_s(self) -> float | None:
        if self.started and self.finished:
            return (self.finished - self.started).total_seconds()
        return None
