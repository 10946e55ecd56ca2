from django.conf import settings
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.templatetags.static import static
from django.urls import include, path, re_path
from django.views.decorators.http import require_safe
from django.views.generic.base import RedirectView
from django.views.static import serve

import evaluation.views
import search.views
from portal import middleware

# Outages (database, Valkey) anywhere in a request become a 503; API errors stay JSON.
handler500 = "portal.middleware.server_error"
handler400 = "portal.middleware.bad_request"

urlpatterns = [
    path("", search.views.home, name="home"),
    path("assets/<int:pk>/", search.views.asset_page, name="asset"),
    path("benchmarks/", evaluation.views.history, name="benchmarks"),
    path("benchmarks/", include("evaluation.urls")),
    path("admin/", admin.site.urls),
    path("api/", include("search.api.urls")),
    path("health/", middleware.health, name="health"),
    # Browsers ask for /favicon.ico on every page, the admin's included.
    path("favicon.ico", require_safe(RedirectView.as_view(url=static("favicon.ico"), permanent=True))),
    # For SEARCH_REQUIRES_LOGIN: any active user may log in here; the admin stays staff-only.
    path("accounts/login/", auth_views.LoginView.as_view(
        template_name="admin/login.html", extra_context={"site_header": "Visual search", "title": "Log in"},
    ), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
]

if settings.SERVE_MEDIA:
    # Image files are stored under generated names only; serve() refuses paths outside MEDIA_ROOT.
    urlpatterns += [
        re_path(r"^%s(?P<path>.*)$" % settings.MEDIA_URL.lstrip("/"), serve, {"document_root": settings.MEDIA_ROOT}),
    ]
