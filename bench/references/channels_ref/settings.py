"""Settings of the tutorial-style Channels reference: no database, Redis channel layer."""

from __future__ import annotations

import os

SECRET_KEY = "bench-reference-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["channels"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "bench.references.channels_ref.urls"
ASGI_APPLICATION = "bench.references.channels_ref.asgi.application"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        # The tutorial's configuration: default capacity (100) and expiry.
        "CONFIG": {"hosts": [REDIS_URL], "prefix": "benchref"},
    }
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": "WARNING"},
}
