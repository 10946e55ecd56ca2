from django.db import transaction
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, permissions, status, viewsets
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from search import ingest, queries
from search.indexing import schedule_index_sync
from search.models import ImageAsset
from embeddings.models import EmbeddingModel

from . import serializers as s


class IsStaffOrReadOnly(permissions.BasePermission):
    def has_permission(self, request, view):
        if request.method in permissions.SAFE_METHODS:
            return True
        return bool(request.user and request.user.is_staff)


class AssetViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                   mixins.DestroyModelMixin, viewsets.GenericViewSet):
    """Image assets with their captions. Uploads and deletions need a staff account."""

    queryset = ImageAsset.objects.prefetch_related("captions")
    serializer_class = s.AssetSerializer
    permission_classes = [IsStaffOrReadOnly]
    parser_classes = [MultiPartParser, FormParser, JSONParser]

    @extend_schema(request={"multipart/form-data": s.AssetUploadSerializer}, responses={201: s.AssetSerializer, 200: s.AssetSerializer})
    def create(self, request, *args, **kwargs):
        upload = s.AssetUploadSerializer(data=request.data)
        upload.is_valid(raise_exception=True)
        data = upload.validated_data
        result = ingest.ingest_image(
            data["image"].read(), data["captions"], original_name=data["image"].name,
            user=request.user, collection=data["collection"],
        )
        asset = self.get_queryset().get(pk=result.asset.pk)
        return Response(self.get_serializer(asset).data,
                        status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK)

    def perform_destroy(self, instance):
        with transaction.atomic():
            instance.delete()
            for model_id in EmbeddingModel.objects.values_list("pk", flat=True):
                schedule_index_sync(model_id)
        instance.file.storage.delete(instance.file.name)


class TextSearchView(APIView):
    """Text→image: the images that best match a sentence."""

    permission_classes = [permissions.AllowAny]
    parser_classes = [JSONParser, FormParser]

    @extend_schema(request=s.TextSearchRequestSerializer, responses=s.TextSearchResponseSerializer)
    def post(self, request):
        params = s.TextSearchRequestSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        result = queries.search_text(params.validated_data["query"], params.validated_data["k"])
        return Response(s.TextSearchResponseSerializer(
            {"results": result.images, "took_ms": result.took_ms, "model": result.model.name},
            context={"request": request},
        ).data)


class ImageSearchView(APIView):
    """Image→text and image→image: captions and similar images for an image."""

    permission_classes = [permissions.AllowAny]
    parser_classes = [MultiPartParser, FormParser, JSONParser]

    @extend_schema(request={"multipart/form-data": s.ImageSearchRequestSerializer,
                            "application/json": s.ImageSearchRequestSerializer},
                   responses=s.ImageSearchResponseSerializer)
    def post(self, request):
        params = s.ImageSearchRequestSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        if data.get("image"):
            result = queries.search_image(data["image"].read(), data["k"])
        else:
            result = queries.search_asset(data["asset_id"], data["k"])
        return Response(s.ImageSearchResponseSerializer(
            {"captions": result.captions, "images": result.images, "took_ms": result.took_ms,
             "model": result.model.name},
            context={"request": request},
        ).data)
