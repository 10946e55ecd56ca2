from django.urls import path

from evaluation.api import BenchmarkRunViewSet

urlpatterns = [
    path("", BenchmarkRunViewSet.as_view({"get": "list", "post": "create"}), name="api-benchmark-list"),
    path("<int:pk>/", BenchmarkRunViewSet.as_view({"get": "retrieve"}), name="api-benchmark-detail"),
]
