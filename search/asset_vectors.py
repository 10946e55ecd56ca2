"""The vectors of one asset: embedding its image and captions with a model, storing them
under the asset's row lock, and the statuses that follow from what is stored.

Callers queue what comes next (an index sync after vectors were stored: ``search.tasks``)."""

from __future__ import annotations

from django.db import transaction
from django.db.models import Exists, OuterRef

from embeddings import services
from embeddings.models import Embedding, EmbeddingModel
from search.locking import lock_assets, retry_on_conflict
from search.models import Caption, ImageAsset
from search.validation import inspect_image


def embed_asset(asset_id: int, model: EmbeddingModel | None = None) -> int:
    """Embed an image and its captions that have no vector yet; returns how many were stored.

    Idempotent: running it twice stores nothing the second time. An asset deleted before
    or while this runs is done (0), not an error.
    """

    model = model or services.active_model()
    asset = ImageAsset.objects.filter(pk=asset_id).first()
    if asset is None:
        return 0  # deleted before its turn came
    encoder = services.encoder_for(model)
    image_vector = None
    if not Embedding.objects.filter(model=model, asset_id=asset_id).exists():
        try:
            with asset.file.open("rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            if not ImageAsset.objects.filter(pk=asset_id).exists():
                return 0  # deleted while this ran: its file went with it
            raise
        # The same caps as at upload (size, pixels from the header, format, complete data), so a
        # file that changed on disk or came in another way cannot take the worker down.
        inspect_image(data)
        image_vector = encoder.encode_images([data])[0]
    captions = list(Caption.objects.filter(asset_id=asset_id).exclude(embeddings__model=model)
                    .order_by("id").values_list("id", "text"))
    vectors = encoder.encode_texts([text for _, text in captions]) if captions else []
    return store_vectors(model, asset_id, image_vector,
                         [(caption_id, text, vector) for (caption_id, text), vector in zip(captions, vectors)])


def store_vectors(model: EmbeddingModel, asset_id: int, image_vector, caption_vectors) -> int:
    """Store the vectors of one asset, encoded before: ``image_vector`` (or ``None``) and
    ``(caption id, text it was encoded from, vector)`` triples; how many were stored.

    Under the asset's row lock (``search.locking``): nothing is stored for an asset deleted
    meanwhile, nor for a caption deleted or edited since it was encoded (its new text gets
    a vector from the task the edit queued)."""

    return retry_on_conflict(_store_vectors)(model, asset_id, image_vector, caption_vectors)


def _store_vectors(model, asset_id, image_vector, caption_vectors) -> int:

    with transaction.atomic():
        if not lock_assets([asset_id]):
            return 0
        texts = dict(Caption.objects.filter(asset_id=asset_id).values_list("id", "text"))
        rows = [] if image_vector is None else [Embedding(model=model, asset_id=asset_id,
                                                          vector=Embedding.pack(image_vector))]
        rows += [Embedding(model=model, caption_id=caption_id, vector=Embedding.pack(vector))
                 for caption_id, text, vector in caption_vectors if texts.get(caption_id) == text]
        Embedding.objects.bulk_create(rows, ignore_conflicts=True)
        # Captions added while this ran keep the asset pending: their own task (or the
        # reconciler) embeds them and marks it embedded then.
        mark_complete(model, [asset_id])
    return len(rows)


def mark_complete(model: EmbeddingModel, asset_ids) -> int:
    """Mark ``embedded`` those of these assets whose image and every caption have a vector of
    ``model``; how many. Callers hold the asset rows (``search.locking.lock_assets``)."""


    image_done = Embedding.objects.filter(model=model, asset=OuterRef("pk"))
    caption_missing = Caption.objects.filter(asset=OuterRef("pk")).exclude(
        Exists(Embedding.objects.filter(model=model, caption=OuterRef("pk")))
    )
    return (ImageAsset.objects.filter(pk__in=list(asset_ids)).filter(Exists(image_done)).exclude(Exists(caption_missing))
            .exclude(status=ImageAsset.Status.EMBEDDED, error="")
            .update(status=ImageAsset.Status.EMBEDDED, error=""))


def assets_missing_vectors(model: EmbeddingModel):
    """Assets whose image or any caption has no vector for the model (a queryset)."""


    image_done = Embedding.objects.filter(model=model, asset=OuterRef("pk"))
    caption_missing = Caption.objects.filter(asset=OuterRef("pk")).exclude(
        Exists(Embedding.objects.filter(model=model, caption=OuterRef("pk")))
    )
    return ImageAsset.objects.filter(~Exists(image_done) | Exists(caption_missing))


def mark_failed(asset_id: int, reason: str) -> None:

    ImageAsset.objects.filter(pk=asset_id).update(status=ImageAsset.Status.FAILED, error=reason[:2000])


def models_with_vectors(asset) -> list[EmbeddingModel]:
    """The models that hold a vector of this asset's image."""
    return list(EmbeddingModel.objects.filter(embeddings__asset=asset).distinct().order_by("name"))
