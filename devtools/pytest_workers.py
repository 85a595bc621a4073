"""Keeps the workers of a parallel test run (pytest-xdist, ``make test``) out of each
other's way in Redis.

The tests that run a node in their own process use the process's ``REDIS_PREFIX``.
Two workers with one prefix would receive each other's messages (pub/sub channels are
shared by every Redis database, and the tests reuse channel names) and count each
other's connections. Each worker appends its id to the prefix. The settings read
``REDIS_PREFIX`` once, when pytest-django imports them, which is after this plugin is
imported (pyproject.toml loads it with ``-p``, before any conftest): so this happens
at import. The end-to-end tests' nodes get a random prefix of their own anyway, and
pytest-django gives each worker its own test database (``test_<name>_gw0``)."""

from __future__ import annotations

import os

_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    os.environ["REDIS_PREFIX"] = os.environ.get("REDIS_PREFIX", "push") + _WORKER
