from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("push.api.urls")),
    path("", include("push.api.pusher_urls")),
    path("", include("monitoring.urls")),
    path("", include("django_prometheus.urls")),
    path("", include("push.demo")),
]

# An unknown path under /api/ is answered in the API's error envelope, not an HTML page
# (with DEBUG on, Django's own debugging page answers instead).
handler404 = "push.api.exceptions.not_found"
