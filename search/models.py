import re
import uuid

from django.conf import settings
from django.db import models
from django.urls import reverse


def normalise_text(text: str) -> str:
    """Stripped, whitespace collapsed, lower-cased."""
    return re.sub(r"\s+", " ", text).strip().lower()


def collection_slug(name: str) -> str:
    """The URL part of a collection's page. Names are free text: the unnamed collection is
    "-", and a name made only of dashes gets one more, so no two collections share a URL."""
    return name + "-" if re.fullmatch(r"-*", name) else name


def collection_from_slug(slug: str) -> str:
    """The collection name a URL part means (``collection_slug`` backwards)."""
    return slug[:-1] if re.fullmatch(r"-+", slug) else slug


def image_upload_path(instance, filename):
    # Never a path from the client: the name is generated from the content hash.
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else "img"
    digest = instance.sha256 or uuid.uuid4().hex
    return f"images/{digest[:2]}/{digest}.{ext}"


class ImageAsset(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        EMBEDDED = "embedded"
        FAILED = "failed"

    file = models.FileField(upload_to=image_upload_path, max_length=300)
    sha256 = models.CharField(max_length=64, unique=True)
    original_name = models.CharField(max_length=255, blank=True)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    format = models.CharField(max_length=16)
    collection = models.CharField(max_length=100, blank=True, default="", db_index=True)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created = models.DateTimeField(auto_now_add=True)
    # Any change to the row, ``collection`` included. Queryset ``.update()`` skips auto_now:
    # every such call that changes what a filter reads sets ``updated=timezone.now()`` itself,
    # so a per-process table can refresh only the rows changed since its last read.
    updated = models.DateTimeField(auto_now=True, db_index=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-created", "-id"]

    def __str__(self):
        return self.original_name or f"image {self.pk}"

    def collection_url(self) -> str:
        """The page of this asset's collection."""
        return reverse("collection", args=[collection_slug(self.collection)])


class Collection(models.Model):
    """Who may see the assets whose ``ImageAsset.collection`` holds this name.

    The asset keeps the name (not a foreign key): uploads name collections freely, and an
    asset whose collection has no row here counts as public. "" is the unnamed collection.
    """

    class Visibility(models.TextChoices):
        PUBLIC = "public", "public"
        USERS = "users", "logged-in users"
        STAFF = "staff", "staff only"

    name = models.CharField(max_length=100, unique=True, blank=True)
    visibility = models.CharField(max_length=10, choices=Visibility.choices, default=Visibility.PUBLIC)
    description = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name or "(unnamed)"

    def get_absolute_url(self) -> str:
        return reverse("collection", args=[collection_slug(self.name)])


class Caption(models.Model):
    asset = models.ForeignKey(ImageAsset, on_delete=models.CASCADE, related_name="captions")
    text = models.TextField()
    normalized_text = models.TextField(editable=False)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["asset", "normalized_text"], name="unique_caption_per_asset")
        ]

    def save(self, *args, **kwargs):
        self.normalized_text = normalise_text(self.text)
        super().save(*args, **kwargs)

    def __str__(self):
        return self.text


class IndexBuild(models.Model):
    """One saved version of a vector index file."""

    class Modality(models.TextChoices):
        IMAGE = "image"
        CAPTION = "caption"

    class Status(models.TextChoices):
        BUILDING = "building"
        READY = "ready"
        FAILED = "failed"

    model = models.ForeignKey("embeddings.EmbeddingModel", on_delete=models.CASCADE, related_name="index_builds")
    modality = models.CharField(max_length=10, choices=Modality.choices)
    backend = models.CharField(max_length=50)
    params = models.JSONField(default=dict, blank=True)
    version = models.PositiveIntegerField()
    vector_count = models.PositiveIntegerField(default=0)
    file_path = models.CharField(max_length=500)
    checksum = models.CharField(max_length=64, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.BUILDING)
    error = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created"]
        constraints = [
            models.UniqueConstraint(fields=["model", "modality", "version"], name="unique_index_version")
        ]

    def __str__(self):
        return f"{self.model} {self.modality} v{self.version}"


class VectorChange(models.Model):
    """The key of a stored vector that went away or was rewritten in place, for the next
    index sync (``search.index_changes``).

    Written by PostgreSQL triggers on ``embeddings_embedding`` (migration ``0003``), so no
    code path that deletes or updates vectors, cascades included, can forget it. New vectors
    need no entry: a sync reads them by id, past its watermark. Entries every kept index
    version has read are pruned after each sync.
    """

    model_id = models.BigIntegerField()  # no foreign key: the entry outlives nothing it names
    asset_id = models.BigIntegerField(null=True)
    caption_id = models.BigIntegerField(null=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            models.Index(fields=["model_id", "id"], condition=models.Q(asset_id__isnull=False),
                         name="vector_change_image"),
            models.Index(fields=["model_id", "id"], condition=models.Q(caption_id__isnull=False),
                         name="vector_change_caption"),
        ]

    def __str__(self):
        return f"vector change {self.pk} (model {self.model_id})"
