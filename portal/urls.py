from django.conf import settings
from django.contrib import admin
from django.urls import include, path, re_path
from django.views.static import serve

from evaluation import views as evaluation_views
from search import views as search_views

urlpatterns = [
    path("", search_views.home, name="home"),
    path("benchmarks/", evaluation_views.history, name="benchmarks"),
    path("admin/", admin.site.urls),
    path("api/", include("search.api.urls")),
]

if settings.SERVE_MEDIA:
    # Image files are stored under generated names only; serve() refuses paths outside MEDIA_ROOT.
    urlpatterns += [
        re_path(r"^%s(?P<path>.*)$" % settings.MEDIA_URL.lstrip("/"), serve, {"document_root": settings.MEDIA_ROOT}),
    ]
