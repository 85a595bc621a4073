"""Django settings for the push server. Every value that varies between machines comes
from ``realtime_project.env``; nothing else here reads the environment."""

from __future__ import annotations

import socket
import uuid
import warnings
from pathlib import Path

import dj_database_url

from common.redis_client import channel_layer_host, sentinel_address
from realtime_project.env import (
    env_bool,
    env_duration_secs,
    env_float,
    env_history_modes,
    env_int,
    env_int_or_zero,
    env_list,
    env_optional_str,
    env_retention_rules,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", False)
_secret = env_optional_str("SECRET_KEY")
if _secret is None:
    if not DEBUG:
        raise RuntimeError("SECRET_KEY must be set when DEBUG is off")
    _secret = "dev-only-insecure-key-do-not-use-in-production"  # noqa: S105 - DEBUG only
SECRET_KEY = _secret

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
# Browser origins allowed to open a WebSocket; by default the allowed hosts.
ALLOWED_ORIGINS = env_list("ALLOWED_ORIGINS", ALLOWED_HOSTS)

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
    "django_prometheus",
    "accounts",
    "push",
    "monitoring",
]

# Django's, WhiteNoise's and django-prometheus' middleware, whose hooks that cannot
# block run on the event loop for async requests (push.api.middleware).
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

DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}")
DATABASES = {
    "default": dj_database_url.parse(
        DATABASE_URL,
        # Connections are not kept per thread: PostgreSQL gets a pool (below), and
        # SQLite, a file, costs nothing to open.
        conn_max_age=0,
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A pool per node process: daphne and uvicorn run each request's sync code on a
    # thread of its own, and persistent per-thread connections would pile up until
    # PostgreSQL refuses more ("too many clients"). The pool bounds and reuses them.
    DATABASES["default"]["OPTIONS"] = {
        "pool": {
            "min_size": 2,
            "max_size": env_int("DATABASE_POOL_MAX", 16),
            # Only an outage makes a request wait for a connection (the pool is larger
            # than the threads that use it): answer UNAVAILABLE well within a
            # WebSocket handshake's time limit (daphne's is 5 s).
            "timeout": env_float("DATABASE_POOL_TIMEOUT_SECS", 3.0),
        }
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE takes the write lock at BEGIN, so two concurrent publishers queue on the
    # lock instead of one failing with "database is locked" when it upgrades.
    DATABASES["default"]["OPTIONS"] = {"transaction_mode": "IMMEDIATE", "timeout": 20}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_optional_str("REDIS_URL")
# With Sentinel, every Redis client asks these for the current master (common.redis_client);
# REDIS_URL then gives only the database and the password.
REDIS_SENTINELS = [sentinel_address(a) for a in env_list("REDIS_SENTINELS", [])]
REDIS_SENTINEL_MASTER = env_str("REDIS_SENTINEL_MASTER", "mymaster")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            # Pub/sub: one PUBLISH per message reaches every subscribed node, and each
            # node subscribes once per channel it has local subscribers for.
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                "hosts": [channel_layer_host(REDIS_URL, REDIS_SENTINELS, REDIS_SENTINEL_MASTER)],
                "prefix": env_str("REDIS_PREFIX", "push"),
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
            "KEY_PREFIX": env_str("REDIS_PREFIX", "push"),
            "OPTIONS": (
                {"pool_class": "common.redis_client.CacheSentinelPool"} if REDIS_SENTINELS else {}
            ),
        }
        if REDIS_URL
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
}

# Django refuses bodies over this before a view runs; keep it above the frame limit so a
# REST publish over the limit gets the contract's MESSAGE_TOO_LARGE instead.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("PUSH_MAX_FRAME_BYTES", 1_048_576) * 2 + 65_536

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
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_THROTTLE_CLASSES": ["accounts.throttling.PrincipalRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {
        "principal": env_str("PUSH_REST_RATE", "6000/min"),
        "anonymous": env_str("PUSH_REST_ANON_RATE", "600/min"),
        # Service tokens (back-ends): unthrottled unless set (e.g. "100000/min").
        "service": env_optional_str("PUSH_REST_SERVICE_RATE"),
    },
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.AllowAny"],
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
}

# Identifies this node process in connection_established, the connection registry and
# the admin. Unique per process, so two nodes on one host never share it.
NODE_ID = env_str("NODE_ID", f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}")

# The push server's own options; read through common.conf.push_settings.
PUSH = {
    "MAX_FRAME_BYTES": env_int("PUSH_MAX_FRAME_BYTES", 1_048_576),
    "HEARTBEAT_INTERVAL_SECS": env_int("PUSH_HEARTBEAT_INTERVAL_SECS", 25),
    "SEND_QUEUE_MAX_FRAMES": env_int("PUSH_SEND_QUEUE_MAX_FRAMES", 1000),
    "SEND_QUEUE_MAX_BYTES": env_int("PUSH_SEND_QUEUE_MAX_BYTES", 8 * 1_048_576),
    "DROP_OLDEST_CHANNELS": env_list("PUSH_DROP_OLDEST_CHANNELS", []),
    "HISTORY_PAGE_DEFAULT": env_int("PUSH_HISTORY_PAGE_DEFAULT", 100),
    "HISTORY_PAGE_MAX": env_int("PUSH_HISTORY_PAGE_MAX", 1000),
    "HISTORY_PAGE_MAX_BYTES": env_int("PUSH_HISTORY_PAGE_MAX_BYTES", 4 * 1_048_576),
    "REPLAY_BATCH_MAX_BYTES": env_int("PUSH_REPLAY_BATCH_MAX_BYTES", 4 * 1_048_576),
    "MAX_REPLAYS_PER_NODE": env_int_or_zero("PUSH_MAX_REPLAYS_PER_NODE", 64),
    "MAX_REPLAYS_PER_IP": env_int_or_zero("PUSH_MAX_REPLAYS_PER_IP", 4),
    "REPLAY_SLOT_WAIT_SECS": env_float("PUSH_REPLAY_SLOT_WAIT_SECS", 5.0),
    "PENDING_MAX_BYTES": env_int("PUSH_PENDING_MAX_BYTES", 4 * 1_048_576),
    "GAP_WAIT_SECS": env_float("PUSH_GAP_WAIT_SECS", 0.2),
    "SYNC_INTERVAL_SECS": env_float("PUSH_SYNC_INTERVAL_SECS", 1.0),
    "REGISTRY_FLUSH_SECS": env_float("PUSH_REGISTRY_FLUSH_SECS", 1.0),
    "REGISTRY_HEARTBEAT_SECS": env_float("PUSH_REGISTRY_HEARTBEAT_SECS", 10.0),
    "REGISTRY_CLOSED_RETENTION_SECS": env_duration_secs(
        "PUSH_REGISTRY_CLOSED_RETENTION", 7 * 86_400
    ),
    "REGISTRY_MAX_BUFFERED": env_int("PUSH_REGISTRY_MAX_BUFFERED", 200_000),
    "GC_GEN0_THRESHOLD": env_int("PUSH_GC_GEN0_THRESHOLD", 50_000),
    "GC_FREEZE": env_bool("PUSH_GC_FREEZE", True),
    "IDEMPOTENCY_WINDOW_SECS": env_duration_secs("PUSH_IDEMPOTENCY_WINDOW", 86_400),
    "WRITE_BATCH_MAX_MESSAGES": env_int("PUSH_WRITE_BATCH_MAX_MESSAGES", 1000),
    "WRITE_BATCH_MAX_BYTES": env_int("PUSH_WRITE_BATCH_MAX_BYTES", 4 * 1_048_576),
    "WRITE_QUEUE_MAX_MESSAGES": env_int("PUSH_WRITE_QUEUE_MAX_MESSAGES", 20_000),
    "WRITE_QUEUE_MAX_BYTES": env_int("PUSH_WRITE_QUEUE_MAX_BYTES", 64 * 1_048_576),
    "WRITE_CONNECT_TIMEOUT_SECS": env_float("PUSH_WRITE_CONNECT_TIMEOUT_SECS", 3.0),
    "WRITE_TIMEOUT_SECS": env_float("PUSH_WRITE_TIMEOUT_SECS", 10.0),
    "RECENT_PER_CHANNEL": env_int("PUSH_RECENT_PER_CHANNEL", 256),
    "RECENT_MAX_BYTES": env_int("PUSH_RECENT_MAX_BYTES", 1_048_576),
    "RECENT_CACHE_SIZE": env_int_or_zero("PUSH_RECENT_CACHE_SIZE", 100),
    "RECENT_CACHE_MAX_BYTES": env_int("PUSH_RECENT_CACHE_MAX_BYTES", 1_048_576),
    "RECENT_CACHE_TTL_SECS": env_duration_secs("PUSH_RECENT_CACHE_TTL", 3600),
    "RETENTION_MAX_MESSAGES": env_int_or_zero("PUSH_RETENTION_MAX_MESSAGES", 10_000),
    "RETENTION_MAX_AGE_SECS": env_duration_secs("PUSH_RETENTION_MAX_AGE", 7 * 86_400),
    "RETENTION_RULES": env_retention_rules("PUSH_RETENTION_RULES"),
    "HISTORY_MODES": env_history_modes("PUSH_HISTORY_MODES"),
    "RECENT_WINDOW_MESSAGES": env_int("PUSH_RECENT_WINDOW_MESSAGES", 100),
    "RECENT_WINDOW_SECS": env_duration_secs("PUSH_RECENT_WINDOW_SECS", 60),
    "RECENT_WINDOW_BYTES": env_int("PUSH_RECENT_WINDOW_BYTES", 1_048_576),
    "RECENT_SEQ_BLOCK": env_int("PUSH_RECENT_SEQ_BLOCK", 1000),
    "ANONYMOUS_SUBSCRIBE": env_bool("PUSH_ANONYMOUS_SUBSCRIBE", True),
    "USERS_PUBLISH": env_bool("PUSH_USERS_PUBLISH", True),
    "SUBSCRIPTION_TOKEN_SECRET": env_optional_str("PUSH_SUBSCRIPTION_TOKEN_SECRET"),
    "SUBSCRIPTION_TOKEN_MAX_TTL_SECS": env_int("PUSH_SUBSCRIPTION_TOKEN_MAX_TTL_SECS", 3600),
    "TRUSTED_PROXIES": env_int_or_zero("PUSH_TRUSTED_PROXIES", 0),
    "AUTH_FAILURES_PER_MIN": env_int_or_zero("PUSH_AUTH_FAILURES_PER_MIN", 30),
    "RATE_BURST": env_int("PUSH_RATE_BURST", 100),
    "RATE_PER_SEC": env_float("PUSH_RATE_PER_SEC", 50.0),
    "RATE_LIMIT_CLOSE_AFTER": env_int("PUSH_RATE_LIMIT_CLOSE_AFTER", 200),
    # Service tokens are back-ends, not held to the client frame rate above: 0 frames/s
    # is unbounded.
    "SERVICE_RATE_BURST": env_int("PUSH_SERVICE_RATE_BURST", 1000),
    "SERVICE_RATE_PER_SEC": env_int_or_zero("PUSH_SERVICE_RATE_PER_SEC", 0),
    "MAX_SUBSCRIPTIONS_PER_CONNECTION": env_int("PUSH_MAX_SUBSCRIPTIONS_PER_CONNECTION", 1000),
    "MAX_CONNECTIONS_PER_USER": env_int_or_zero("PUSH_MAX_CONNECTIONS_PER_USER", 100),
    "MAX_CONNECTIONS_PER_IP": env_int_or_zero("PUSH_MAX_CONNECTIONS_PER_IP", 0),
    "REVOCATION_CHECK_SECS": env_float("PUSH_REVOCATION_CHECK_SECS", 5.0),
    "HEARTBEAT_TIMEOUT_SECS": env_float("PUSH_HEARTBEAT_TIMEOUT_SECS", 75.0),
    "CLOSE_TIMEOUT_SECS": env_float("PUSH_CLOSE_TIMEOUT_SECS", 10.0),
    "DRAIN_DEADLINE_SECS": env_float("PUSH_DRAIN_DEADLINE_SECS", 20.0),
    "DIRECT_WRITES": env_bool("PUSH_DIRECT_WRITES", True),
    "CLUSTER_ANNOUNCE_SECS": env_float("PUSH_CLUSTER_ANNOUNCE_SECS", 5.0),
    "NODE_DEAD_AFTER_SECS": env_float("PUSH_NODE_DEAD_AFTER_SECS", 15.0),
    "EVENTS": env_bool("PUSH_EVENTS", True),
    "EVENT_STREAM_MAXLEN": env_int("PUSH_EVENT_STREAM_MAXLEN", 1_000_000),
    "EVENT_HANDLERS": env_list("PUSH_EVENT_HANDLERS", []),
    "EVENT_MAX_ATTEMPTS": env_int("PUSH_EVENT_MAX_ATTEMPTS", 5),
    "EVENT_RETRY_SECS": env_float("PUSH_EVENT_RETRY_SECS", 10.0),
    "WEBHOOK_URLS": env_list("PUSH_WEBHOOK_URLS", []),
    "WEBHOOK_SECRET": env_optional_str("PUSH_WEBHOOK_SECRET"),
    "WEBHOOK_CONCURRENCY": env_int("PUSH_WEBHOOK_CONCURRENCY", 16),
    "EVENT_CONCURRENCY": env_int("PUSH_EVENT_CONCURRENCY", 8),
}

LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
LOG_JSON = env_bool("LOG_JSON", False)
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"redact": {"()": "push.ops.logs.RedactFilter"}},
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
    },
}
