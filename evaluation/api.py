"""Benchmark runs over the API: anyone may read the history; staff may launch runs."""

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.response import Response

from embeddings.models import EmbeddingModel
from embeddings.services import NoActiveModel
from evaluation import datasets, services, tasks
from evaluation.models import BenchmarkRun
from search.api.views import IsStaffOrReadOnly


class BenchmarkRunSerializer(serializers.ModelSerializer):
    model = serializers.PrimaryKeyRelatedField(read_only=True)
    sample_grid_url = serializers.SerializerMethodField()

    class Meta:
        model = BenchmarkRun
        fields = [
            "id", "kind", "status", "progress", "stage", "error",
            "dataset", "dataset_path", "split", "limit", "collection", "gallery_images", "gallery_captions",
            "model", "model_name", "model_source", "index_backend", "index_params", "image_size", "text_length",
            "created", "started", "finished",
            "text_to_image", "image_to_text",
            "t2i_latency_p50_ms", "t2i_latency_p95_ms", "i2t_latency_p50_ms", "i2t_latency_p95_ms",
            "images_per_second", "captions_per_second", "machine", "sample_grid_url", "extra",
        ]
        read_only_fields = fields

    def get_sample_grid_url(self, run) -> str | None:
        if not run.sample_grid:
            return None
        request = self.context.get("request")
        return request.build_absolute_uri(run.sample_grid.url) if request else run.sample_grid.url

    def to_representation(self, run):
        data = super().to_representation(run)
        request = self.context.get("request")
        if not (request and request.user and request.user.is_staff):
            data.pop("dataset_path", None)  # server paths are for staff eyes
            data.pop("model_source", None)
            data["model_name"] = run.public_model_name
        return data


class BenchmarkLaunchSerializer(serializers.Serializer):
    dataset = serializers.ChoiceField(choices=["auto", *datasets.KINDS], default="auto",
                                      help_text="Dataset layout; auto detects it from the file.")
    path = serializers.CharField(max_length=500, help_text="The dataset JSON file on the server, or its folder.")
    split = serializers.CharField(max_length=30, required=False, allow_blank=True, default="",
                                  help_text="Blank: test (Karpathy files) or the COCO file's own split.")
    limit = serializers.IntegerField(min_value=1, required=False, allow_null=True, default=None,
                                     help_text="Only the first N images of the split.")
    collection = serializers.CharField(max_length=100, required=False, allow_blank=True, default="",
                                       help_text="Blank: <dataset>-<split>.")
    model = serializers.PrimaryKeyRelatedField(queryset=EmbeddingModel.objects.all(), required=False,
                                               allow_null=True, default=None,
                                               help_text="Embedding model id; default the active model.")

    def validate(self, attrs):
        request = self.context.get("request")
        try:
            self.prepared = services.prepare_run(user=getattr(request, "user", None), **attrs)
        except datasets.DatasetError as exc:
            raise serializers.ValidationError({"path": [str(exc)]}) from exc
        except NoActiveModel as exc:
            raise serializers.ValidationError({"model": [str(exc)]}) from exc
        return attrs


class BenchmarkRunViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                          viewsets.GenericViewSet):
    """Retrieval benchmark runs, newest first. Launching one needs a staff account; it runs on a worker."""

    queryset = BenchmarkRun.objects.all()
    serializer_class = BenchmarkRunSerializer
    permission_classes = [IsStaffOrReadOnly]

    @extend_schema(request=BenchmarkLaunchSerializer, responses={201: BenchmarkRunSerializer})
    def create(self, request, *args, **kwargs):
        launch = BenchmarkLaunchSerializer(data=request.data, context={"request": request})
        launch.is_valid(raise_exception=True)
        run = tasks.queue_benchmark(launch.prepared)
        return Response(self.get_serializer(run).data, status=status.HTTP_201_CREATED)
