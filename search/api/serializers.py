from django.conf import settings
from rest_framework import serializers

from search.core.facets import ORIENTATIONS
from search.filters import MAX_PIXELS_SIDE, MAX_VALUES, SORTS
from search.models import Caption, ImageAsset
from search.validation import ALLOWED_FORMATS


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


def _names(help_text: str):
    return serializers.ListField(child=serializers.CharField(max_length=150), required=False, default=list,
                                 max_length=MAX_VALUES, help_text=help_text)


class SearchFiltersSerializer(serializers.Serializer):
    """The filters of every search, applied inside the vector search (``search.filters``)."""

    collection = _names("Only images in these collections (repeat for several; `(unnamed)` for the unnamed one).")
    exclude_collection = _names("No images from these collections.")
    uploader = _names("Only images uploaded by these users (user names).")
    date_from = serializers.DateField(required=False, allow_null=True, default=None,
                                      help_text="Uploaded on or after this day (YYYY-MM-DD).")
    date_to = serializers.DateField(required=False, allow_null=True, default=None,
                                    help_text="Uploaded on or before this day (YYYY-MM-DD).")
    format = serializers.ListField(child=serializers.ChoiceField(choices=sorted(ALLOWED_FORMATS)), required=False,
                                   default=list, help_text="Only images stored in these formats.")
    min_width = serializers.IntegerField(required=False, allow_null=True, default=None, min_value=1,
                                         max_value=MAX_PIXELS_SIDE, help_text="At least this many pixels wide.")
    min_height = serializers.IntegerField(required=False, allow_null=True, default=None, min_value=1,
                                          max_value=MAX_PIXELS_SIDE, help_text="At least this many pixels high.")
    orientation = serializers.ChoiceField(choices=ORIENTATIONS, required=False, allow_blank=True, default="",
                                          help_text="landscape (wider than high), portrait or square.")

    def to_internal_value(self, data):
        # Formats are stored upper-case; accept "jpeg" as well.
        if hasattr(data, "getlist") and "format" in data:
            data = data.copy()
            data.setlist("format", [str(v).upper() for v in data.getlist("format")])
        elif isinstance(data, dict) and isinstance(data.get("format"), list):
            data = {**data, "format": [str(v).upper() for v in data["format"]]}
        return super().to_internal_value(data)


def cursor_field():
    return serializers.CharField(required=False, allow_blank=False, default=None, allow_null=True,
                                 help_text="The `next` of the page before: the following k results.")


class TextSearchRequestSerializer(SearchFiltersSerializer):
    query = serializers.CharField(trim_whitespace=True, allow_blank=False,
                                  help_text="Any length; the model reads its first 64 tokens.")
    k = k_field()
    min_score = min_score_field()
    cursor = cursor_field()
    sort = serializers.ChoiceField(choices=SORTS, required=False, default="relevance",
                                   help_text="relevance (best first), or the matches above the threshold "
                                             "by upload date (newest, oldest) or file name.")


class ImageSearchRequestSerializer(SearchFiltersSerializer):
    image = serializers.FileField(required=False)
    asset_id = serializers.IntegerField(required=False, min_value=1)
    k = k_field()
    min_score = min_score_field()
    cursor = cursor_field()

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
    captions = CaptionHitSerializer(many=True, help_text="On the first page only.")
    images = ImageHitSerializer(many=True)
    next = serializers.CharField(allow_null=True, source="next_cursor",
                                 help_text="Send as `cursor`, with the same image or asset_id, for the next "
                                           "page of similar images; null after the last one.")
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
    body["next"] = result.next_cursor
    body["took_ms"] = result.took_ms
    body["model"] = result.model.public_name
    body["no_good_match"] = result.no_good_match
    body["reason"] = result.reason
    return body
