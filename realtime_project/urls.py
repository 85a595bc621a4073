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
