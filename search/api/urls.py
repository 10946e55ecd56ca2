from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from search.api import views

router = DefaultRouter()
router.register("assets", views.AssetViewSet, basename="asset")

urlpatterns = [
    path("search/text/", views.TextSearchView.as_view(), name="api-search-text"),
    path("search/image/", views.ImageSearchView.as_view(), name="api-search-image"),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("redoc/", SpectacularRedocView.as_view(url_name="api-schema"), name="api-redoc"),
    path("benchmarks/", include("evaluation.api_urls")),
    path("", include(router.urls)),
]
