import time

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from embeddings.services import active_model
from search import curation, filters, queries, tasks, validation
from search.api import serializers
from search.api.access import SEARCH_THROTTLES, IsStaffOrReadOnly, SearchAllowed, UploadThrottle
from search.models import ImageAsset
from search.visibility import visible_assets

__all__ = ["AssetViewSet", "ImageSearchView", "IsStaffOrReadOnly", "TextSearchView"]


class AssetViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                   mixins.DestroyModelMixin, viewsets.GenericViewSet):
    """Image assets with their captions. Uploads, deletions and re-indexing need a staff account."""

    queryset = ImageAsset.objects.prefetch_related("captions")
    serializer_class = serializers.AssetSerializer
    permission_classes = [SearchAllowed, IsStaffOrReadOnly]
    parser_classes = [MultiPartParser, FormParser, JSONParser]

    def get_queryset(self):
        # Assets of collections hidden from this user are not found (404), as on the pages.
        return visible_assets(self.request.user, super().get_queryset())

    def get_throttles(self):
        return [UploadThrottle()] if self.action == "create" else []

    @extend_schema(request={"multipart/form-data": serializers.AssetUploadSerializer}, responses={201: serializers.AssetSerializer, 200: serializers.AssetSerializer})
    def create(self, request, *args, **kwargs):
        if len(request.FILES.getlist("image")) > 1:
            raise ValidationError({"image": ["Send one image per request (or use the admin's bulk upload)."]})
        upload = serializers.AssetUploadSerializer(data=request.data)
        upload.is_valid(raise_exception=True)
        data = upload.validated_data
        result = curation.ingest_image(
            validation.read_upload(data["image"]), data["captions"], original_name=data["image"].name,
            user=request.user, collection=data["collection"],
        )
        tasks.queue_follow_ups(result)
        # The asset as the upload committed it (a delete may follow at once: no fetch again).
        return Response(self.get_serializer(result.asset).data,
                        status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK)

    def perform_destroy(self, instance):
        # Gone from every search as soon as the row is; the index files follow on the next sync.
        if not curation.delete_assets(ImageAsset.objects.filter(pk=instance.pk)):
            raise ImageAsset.DoesNotExist(f"Image {instance.pk} was already deleted by another request.")
        tasks.schedule_index_syncs()

    @extend_schema(request=None, responses={202: None})
    @action(detail=False, methods=["post"])
    def reindex(self, request):
        """Rebuild the active model's indices from the vectors in Postgres (on a worker)."""
        model = active_model()
        tasks.rebuild_indices_task.delay(model.pk)
        return Response({"detail": f"Rebuilding the indices of {model.name}."}, status=status.HTTP_202_ACCEPTED)


def _timed(response, result, started, searched):
    """Add a ``Server-Timing`` header: encode, search (index and rows), serialise
    and the whole view in ms, whether the query embedding came from the cache and
    whether the index's neighbours did."""
    done = time.perf_counter()
    timings = result.timings
    parts = [
        f"encode;dur={timings.get('encode_ms', 0.0):.2f}",
        f"search;dur={timings.get('search_ms', 0.0):.2f}",
        f"serialise;dur={(done - searched) * 1000:.2f}",
        f"view;dur={(done - started) * 1000:.2f}",
    ]
    if timings.get("query_cache"):
        parts.append(f'cache;desc="{timings["query_cache"]}"')
    if timings.get("result_cache"):
        parts.append(f'results;desc="{timings["result_cache"]}"')
    response["Server-Timing"] = ", ".join(parts)
    return response


class TextSearchView(APIView):
    """Text→image: the images that best match a sentence."""

    permission_classes = [SearchAllowed]
    throttle_classes = SEARCH_THROTTLES
    parser_classes = [JSONParser, FormParser]

    @extend_schema(request=serializers.TextSearchRequestSerializer, responses=serializers.TextSearchResponseSerializer)
    def post(self, request):
        started = time.perf_counter()
        params = serializers.TextSearchRequestSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        result = queries.search_text(data["query"], data["k"], data["min_score"], data["cursor"],
                                     filters.parse_filters(data, request.user), data["sort"])
        searched = time.perf_counter()
        return _timed(Response(serializers.search_response(result, request, captions=False)), result, started, searched)


class ImageSearchView(APIView):
    """Image→text and image→image: captions and similar images for an image."""

    permission_classes = [SearchAllowed]
    throttle_classes = SEARCH_THROTTLES
    parser_classes = [MultiPartParser, FormParser, JSONParser]

    @extend_schema(request={"multipart/form-data": serializers.ImageSearchRequestSerializer,
                            "application/json": serializers.ImageSearchRequestSerializer},
                   responses=serializers.ImageSearchResponseSerializer)
    def post(self, request):
        params = serializers.ImageSearchRequestSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        started = time.perf_counter()
        wanted = filters.parse_filters(data, request.user)
        if data.get("image"):
            result = queries.search_image(data["image"].read(), data["k"], data["min_score"], data["cursor"], wanted)
        else:
            result = queries.search_asset(data["asset_id"], data["k"], data["min_score"], data["cursor"], wanted)
        searched = time.perf_counter()
        return _timed(Response(serializers.search_response(result, request, captions=True)), result, started, searched)
