"""Django settings for the push server. Every value that varies between machines comes
from ``realtime_project.env``; nothing else here reads the environment."""

from __future__ import annotations

import logging
import socket
import uuid
import warnings
from pathlib import Path

import dj_database_url
from redis.connection import parse_url

from common.conf import PushSettings, push_options
from common.redis_client import channel_layer_host, sentinel_address
from realtime_project.env import (
    ImproperlyConfiguredEnv,
    checked,
    env_bool,
    env_float,
    env_int,
    env_list,
    env_optional_str,
    env_overrides,
    env_rate,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool(
    "DEBUG", False, meaning="Django debug mode; also allows the development `SECRET_KEY`"
)
_secret = env_optional_str(
    "SECRET_KEY",
    meaning="Django's secret; required unless `DEBUG`, which falls back to a development key",
)
if _secret is None:
    if not DEBUG:
        raise ImproperlyConfiguredEnv("SECRET_KEY must be set when DEBUG is off")
    _secret = "dev-only-insecure-key-do-not-use-in-production"  # noqa: S105 - DEBUG only
SECRET_KEY = _secret

ALLOWED_HOSTS = env_list(
    "ALLOWED_HOSTS",
    ["localhost", "127.0.0.1", "[::1]", "testserver"],
    meaning="hosts this server answers for: Django's views, WebSocket handshakes (403 "
    "otherwise) and SSE streams (400)",
)
ALLOWED_ORIGINS = env_list(
    "ALLOWED_ORIGINS",
    ALLOWED_HOSTS,
    meaning="browser `Origin`s allowed to open a WebSocket (a client without `Origin` is allowed)",
    shown="`ALLOWED_HOSTS`",
)

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "django_prometheus",
    "accounts",
    "push",
    "monitoring",
]

# Django's, WhiteNoise's and django-prometheus' middleware, whose hooks that cannot
# block run on the event loop for async requests (push.api.middleware).
# A password is checked only while its address has failed authentications left
# (accounts.password_backend): each check costs ~360 ms of CPU.
AUTHENTICATION_BACKENDS = ["accounts.password_backend.AddressLimitedModelBackend"]

MIDDLEWARE = [
    "push.api.middleware.PrometheusBeforeMiddleware",
    "push.api.middleware.SecurityMiddleware",
    # Static files (the admin's CSS, the JavaScript client) from every node, under
    # daphne and uvicorn too, where Django itself serves them only with DEBUG.
    "push.api.middleware.WhiteNoiseMiddleware",
    "push.api.middleware.SessionMiddleware",
    "push.api.middleware.CommonMiddleware",
    "push.api.middleware.CsrfViewMiddleware",
    "push.api.middleware.AuthenticationMiddleware",
    "push.api.middleware.MessageMiddleware",
    "push.api.middleware.XFrameOptionsMiddleware",
    "push.api.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "realtime_project.urls"
ASGI_APPLICATION = "realtime_project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = env_str(
    "DATABASE_URL",
    f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
    meaning="the database; PostgreSQL in production (`postgres://user:pw@host:5432/name`)",
    shown="`sqlite:///db.sqlite3` in the project directory",
)
DATABASES = {
    "default": checked(
        "DATABASE_URL",
        DATABASE_URL,
        lambda url: dj_database_url.parse(
            url,
            # Connections are not kept per thread: PostgreSQL gets a pool (below), and
            # SQLite, a file, costs nothing to open.
            conn_max_age=0,
            conn_health_checks=True,
        ),
        secret=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Django's backend, with a pool that checks a pooled connection without a round
    # trip (common/postgresql/base.py).
    DATABASES["default"]["ENGINE"] = "common.postgresql"
    # A pool per node process: daphne and uvicorn run each request's sync code on a
    # thread of its own, and persistent per-thread connections would pile up until
    # PostgreSQL refuses more ("too many clients"). The pool bounds and reuses them.
    DATABASES["default"]["OPTIONS"] = {
        "pool": {
            "min_size": 2,
            "max_size": env_int(
                "DATABASE_POOL_MAX",
                16,
                meaning="PostgreSQL connections per node process (psycopg pool)",
            ),
            # Only an outage makes a request wait for a connection (the pool is larger
            # than the threads that use it): answer UNAVAILABLE well within a
            # WebSocket handshake's time limit (daphne's is 5 s).
            "timeout": env_float(
                "DATABASE_POOL_TIMEOUT_SECS",
                3.0,
                meaning="how long a request waits for a PostgreSQL connection before it is "
                "answered `UNAVAILABLE` (only an outage makes it wait)",
            ),
            # A failed reconnection is retried after 1, 2, 4, 8 s... until this runs
            # out (psycopg_pool's default: 5 minutes), and the retrying slot counts in
            # the pool: after an 8 s outage the node waited ~7 s for its next attempt,
            # timing out every request meanwhile. Given up sooner, the slot is freed
            # and the next request connects at once.
            "reconnect_timeout": 3.0,
        }
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE takes the write lock at BEGIN, so two concurrent publishers queue on the
    # lock instead of one failing with "database is locked" when it upgrades.
    DATABASES["default"]["OPTIONS"] = {"transaction_mode": "IMMEDIATE", "timeout": 20}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_optional_str(
    "REDIS_URL",
    meaning="Redis for the channel layer across nodes; unset, an in-memory channel layer "
    "(one process)",
)
if REDIS_URL:
    # Read as every Redis client will, so a malformed one stops start-up, not the first
    # client made.
    checked("REDIS_URL", REDIS_URL, parse_url, secret=True)
# With Sentinel, every Redis client asks these for the current master (common.redis_client);
# REDIS_URL then gives only the database and the password.
REDIS_SENTINELS = [
    checked("REDIS_SENTINELS", a, sentinel_address)
    for a in env_list(
        "REDIS_SENTINELS",
        [],
        meaning="`host:port,...` of Redis Sentinels: every Redis client asks them for the "
        "master (again after a failover); `REDIS_URL` still gives the database and password",
    )
]
REDIS_SENTINEL_MASTER = env_str(
    "REDIS_SENTINEL_MASTER", "mymaster", meaning="the Sentinel master name"
)
# Every Redis key and pub/sub channel of this deployment starts with it (the channel
# layer, the cache, push.cluster.directory.redis_prefix).
REDIS_PREFIX = env_str(
    "REDIS_PREFIX", "push", meaning="prefix of this deployment's Redis keys and channels"
)
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            # Pub/sub: one PUBLISH per message reaches every subscribed node, and each
            # node subscribes once per channel it has local subscribers for.
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                "hosts": [channel_layer_host(REDIS_URL, REDIS_SENTINELS, REDIS_SENTINEL_MASTER)],
                "prefix": REDIS_PREFIX,
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            # The node's own inbox receives every message of every channel it serves;
            # the default capacity of 100 would drop messages under a burst.
            "CONFIG": {"capacity": 100_000, "expiry": 3600},
        }
    }

# Throttle counters must be shared by every node, so with Redis they live there.
CACHES = {
    "default": (
        {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": REDIS_PREFIX,
            "OPTIONS": {
                # Every token look-up and REST throttle asks the cache (on the database
                # threads and Django's one shared request thread): without a deadline, a
                # Redis that stopped answering held them all for ever. Past it the cache
                # counts as unreachable (accounts.auth_failures), as the node's own
                # kept-token check does after the same second.
                "socket_connect_timeout": 1.0,
                "socket_timeout": 1.0,
                **(
                    {"pool_class": "common.redis_client.CacheSentinelPool"}
                    if REDIS_SENTINELS
                    else {}
                ),
            },
        }
        if REDIS_URL
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
}

# The push server's own options, read through common.conf.push_settings: only those
# whose variable is set; PushSettings there holds every default and its meaning.
PUSH = env_overrides(push_options())
# Made once here for the checks of options against each other (PushSettings'
# __post_init__): at start-up, not at their first use, which may come late or never.
PushSettings(**PUSH)

# No request body past this is read (push.api.handler: 413 before reading one declared
# larger, and a chunked one stops there); above the frame limit, so a REST publish just
# over that limit gets the view's own MESSAGE_TOO_LARGE.
DATA_UPLOAD_MAX_MEMORY_SIZE = PUSH.get("MAX_FRAME_BYTES", PushSettings.MAX_FRAME_BYTES) * 2 + 65_536

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# Served straight from the apps' static directories when collectstatic has not run
# (development, tests); an image runs collectstatic at build time.
WHITENOISE_USE_FINDERS = True
# Without collectstatic there is no STATIC_ROOT yet, which is fine with the finders.
warnings.filterwarnings("ignore", message="No directory at", module="whitenoise.base")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.PushTokenAuthentication",
        "accounts.authentication.PushSessionAuthentication",
    ],
    "DEFAULT_THROTTLE_CLASSES": ["accounts.throttling.PrincipalRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {
        "principal": env_rate(
            "PUSH_REST_RATE",
            "6000/min",
            meaning="REST throttle per user token or session (429 `RATE_LIMITED`)",
        ),
        "anonymous": env_rate(
            "PUSH_REST_ANON_RATE", "600/min", meaning="REST throttle per anonymous address"
        ),
        "service": env_rate(
            "PUSH_REST_SERVICE_RATE",
            None,
            meaning="REST throttle per service token (a back-end), e.g. `100000/min`; unset, "
            "unthrottled",
        ),
    },
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.AllowAny"],
    # DRF's two, with the browsable API bounded in what it shows (push.api.renderers).
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "push.api.renderers.BoundedBrowsableAPIRenderer",
    ],
    # The JSON parser that answers a too deeply nested body 400, not 500.
    "DEFAULT_PARSER_CLASSES": [
        "push.api.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    # REMOTE_ADDR already is the client's address from behind PUSH_TRUSTED_PROXIES
    # (realtime_project.asgi); unset, DRF would key anonymous throttling on the raw
    # X-Forwarded-For, which the client writes.
    "NUM_PROXIES": 0,
    "EXCEPTION_HANDLER": "push.api.exceptions.api_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    # The OpenAPI schema at /api/v1/schema/: drf-spectacular's AutoSchema (DRF's own
    # generator is deprecated), which push.api.schema extends to show anonymous reads.
    "DEFAULT_SCHEMA_CLASS": "push.api.schema.PushAutoSchema",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Push server REST API",
    "DESCRIPTION": "Publish to the push server's channels, read their history and see "
    "who is on them.",
    "VERSION": "1",
    # The schema describes the API, not its own endpoint.
    "SERVE_INCLUDE_SCHEMA": False,
    # The contract's request bodies are JSON (docs/protocol.md): the form parsers that
    # DRF enables by default still work, but the schema does not offer them.
    "PARSER_WHITELIST": ["push.api.parsers.JSONParser"],
}

# Identifies this node process in connection_established, the connection registry and
# the admin. Unique per process, so two nodes on one host never share it.
NODE_ID = env_str(
    "NODE_ID",
    f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}",
    meaning="this node's name in `connection_established`, the registry and the admin",
    shown="`<hostname>-<random>`",
)


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in logging.getLevelNamesMapping():
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


LOG_LEVEL = checked("LOG_LEVEL", env_str("LOG_LEVEL", "INFO", meaning="root log level"), _log_level)
LOG_JSON = env_bool("LOG_JSON", False, meaning="one JSON object per log line")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "redact": {"()": "push.ops.logs.RedactFilter"},
        "client_noise": {"()": "push.ops.logs.SampledClientNoise"},
    },
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "push.ops.logs.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_JSON else "plain",
            "filters": ["redact"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
        "uvicorn.access": {"handlers": ["console"], "propagate": False},
        "uvicorn.error": {"filters": ["client_noise"]},
    },
}
