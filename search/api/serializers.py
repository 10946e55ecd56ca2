from django.conf import settings
from rest_framework import serializers

from search.models import Caption, ImageAsset


def caption_texts(asset) -> list[str]:
    texts = getattr(asset, "caption_texts", None)  # gathered with the row by a search
    return list(texts) if texts is not None else [c.text for c in asset.captions.all()]


class CaptionSerializer(serializers.ModelSerializer):
    class Meta:
        model = Caption
        fields = ["id", "text"]


class AssetSerializer(serializers.ModelSerializer):
    image_url = serializers.SerializerMethodField()
    captions = serializers.SerializerMethodField()

    class Meta:
        model = ImageAsset
        fields = ["id", "image_url", "captions", "width", "height", "format", "sha256",
                  "collection", "status", "error", "created"]
        read_only_fields = fields

    def get_image_url(self, asset) -> str:
        request = self.context.get("request")
        url = asset.file.url
        return request.build_absolute_uri(url) if request else url

    def get_captions(self, asset) -> list[str]:
        return caption_texts(asset)


class AssetUploadSerializer(serializers.Serializer):
    image = serializers.FileField(help_text="JPEG, PNG, GIF, WebP, BMP or TIFF.")
    captions = serializers.ListField(
        child=serializers.CharField(allow_blank=True, trim_whitespace=True), required=False, default=list,
        help_text="Repeat the field for several captions.",
    )
    collection = serializers.CharField(required=False, allow_blank=True, default="", max_length=100)


def probability_field():
    return serializers.FloatField(
        allow_null=True, help_text="The match probability of a text↔image hit, σ(t·cosine + b) with the "
                                   "checkpoint's own logit scale t and bias b; null for image→image.")


def match_field():
    return serializers.BooleanField(allow_null=True, help_text="Whether the probability reaches the threshold "
                                                              "(min_score, or SEARCH_MATCH_THRESHOLD).")


class ImageHitSerializer(serializers.Serializer):
    asset = AssetSerializer()
    score = serializers.FloatField(help_text="The cosine similarity.")
    probability = probability_field()
    match = match_field()


class CaptionHitSerializer(serializers.Serializer):
    id = serializers.IntegerField(source="caption.id")
    text = serializers.CharField(source="caption.text")
    asset_id = serializers.IntegerField(source="caption.asset_id")
    score = serializers.FloatField(help_text="The cosine similarity.")
    probability = probability_field()
    match = match_field()


def k_field():
    return serializers.IntegerField(required=False, default=10, min_value=1, max_value=settings.SEARCH_MAX_K)


def min_score_field():
    return serializers.FloatField(
        required=False, allow_null=True, default=None, min_value=0.0, max_value=1.0,
        help_text="Keep only text↔image hits whose match probability reaches this; when none does, the "
                  "nearest come back with no_good_match true.")


class TextSearchRequestSerializer(serializers.Serializer):
    query = serializers.CharField(trim_whitespace=True, allow_blank=False,
                                  help_text="Any length; the model reads its first 64 tokens.")
    k = k_field()
    min_score = min_score_field()
    cursor = serializers.CharField(required=False, allow_blank=False, default=None, allow_null=True,
                                   help_text="The `next` of the page before: the following k results.")


class ImageSearchRequestSerializer(serializers.Serializer):
    image = serializers.FileField(required=False)
    asset_id = serializers.IntegerField(required=False, min_value=1)
    k = k_field()
    min_score = min_score_field()

    def validate(self, attrs):
        if bool(attrs.get("image")) == bool(attrs.get("asset_id")):
            raise serializers.ValidationError("Send either an image file or an asset_id.")
        return attrs


class TextSearchResponseSerializer(serializers.Serializer):
    results = ImageHitSerializer(many=True)
    next = serializers.CharField(allow_null=True, source="next_cursor",
                                 help_text="Send as `cursor` for the next page; null after the last one.")
    took_ms = serializers.FloatField()
    model = serializers.CharField()
    no_good_match = serializers.BooleanField(help_text="No hit reaches the threshold: the nearest are shown.")
    reason = serializers.CharField(allow_blank=True, help_text="Why nothing matched; empty otherwise.")


class ImageSearchResponseSerializer(serializers.Serializer):
    captions = CaptionHitSerializer(many=True)
    images = ImageHitSerializer(many=True)
    took_ms = serializers.FloatField()
    model = serializers.CharField()
    no_good_match = serializers.BooleanField(help_text="No caption reaches the threshold: the nearest are shown.")
    reason = serializers.CharField(allow_blank=True, help_text="Why nothing matched; empty otherwise.")


# Search answers are built without the serializer machinery above (instantiating
# nested serializers and their fields costs more than the rest of a cached search);
# the classes above still describe them in the API schema, and the tests check that
# both give the same JSON.
_created = serializers.DateTimeField()


def asset_data(asset, absolute_url) -> dict:
    return {
        "id": asset.pk,
        "image_url": absolute_url(asset.file.url),
        "captions": caption_texts(asset),
        "width": asset.width,
        "height": asset.height,
        "format": asset.format,
        "sha256": asset.sha256,
        "collection": asset.collection,
        "status": asset.status,
        "error": asset.error,
        "created": _created.to_representation(asset.created),
    }


def search_response(result, request, *, captions: bool) -> dict:
    """The JSON of a text search (``captions=False``) or an image search."""
    absolute_url = request.build_absolute_uri if request is not None else str
    body = {}
    if captions:
        body["captions"] = [
            {"id": hit.caption.pk, "text": hit.caption.text, "asset_id": hit.caption.asset_id, "score": hit.score,
             "probability": hit.probability, "match": hit.match}
            for hit in result.captions
        ]
    body["images" if captions else "results"] = [
        {"asset": asset_data(hit.asset, absolute_url), "score": hit.score, "probability": hit.probability,
         "match": hit.match}
        for hit in result.images
    ]
    if not captions:
        body["next"] = result.next_cursor
    body["took_ms"] = result.took_ms
    body["model"] = result.model.public_name
    body["no_good_match"] = result.no_good_match
    body["reason"] = result.reason
    return body
