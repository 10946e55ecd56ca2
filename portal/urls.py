from django.conf import settings
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.templatetags.static import static
from django.urls import include, path, re_path
from django.views.decorators.http import require_safe
from django.views.generic.base import RedirectView

import evaluation.views
import search.collection_views
import search.media
import search.views
from portal import middleware

# Outages (database, Valkey) anywhere in a request become a 503; API errors stay JSON.
handler500 = "portal.middleware.server_error"
handler400 = "portal.middleware.bad_request"

urlpatterns = [
    path("", search.views.home, name="home"),
    path("assets/<int:pk>/", search.views.asset_page, name="asset"),
    path("collections/", search.collection_views.collections, name="collections"),
    # The unnamed collection is /collections/-/ (search.models.collection_slug).
    path("collections/<path:slug>/", search.collection_views.collection_page, name="collection"),
    path("benchmarks/", evaluation.views.history, name="benchmarks"),
    path("benchmarks/", include("evaluation.urls")),
    path("admin/", admin.site.urls),
    path("api/", include("search.api.urls")),
    path("health/", middleware.health, name="health"),
    # Browsers ask for /favicon.ico on every page, the admin's included.
    path("favicon.ico", require_safe(RedirectView.as_view(url=static("favicon.ico"), permanent=True))),
    # Any active user may log in here (private collections, SEARCH_REQUIRES_LOGIN); the admin
    # stays staff-only. Logging out (a POST) returns to the home page (LOGOUT_REDIRECT_URL).
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    # Every uploaded image, checked against its collection's visibility; the bytes go out by the
    # front server when settings name one (MEDIA_ACCEL_REDIRECT, MEDIA_SENDFILE).
    re_path(r"^%s(?P<path>.*)$" % settings.MEDIA_URL.lstrip("/"), search.media.media_file, name="media"),
]
