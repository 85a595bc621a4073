"""Settings from the environment: the only module that reads ``os.environ``.

Every variable is read once, cast to its type, and a malformed value stops start-up
with an error that names the variable (Starlette's ``Config`` habit).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ImproperlyConfiguredEnv(ValueError):
    """Raised when an environment variable is present but cannot be read as its type."""


def _read(name: str, default: T, cast: Callable[[str], T]) -> T:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return cast(raw.strip())
    except (TypeError, ValueError) as exc:
        raise ImproperlyConfiguredEnv(f"{name}={raw!r} is not valid: {exc}") from exc


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("expected a positive integer")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("expected a positive number")
    return value


def _csv(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_str(name: str, default: str) -> str:
    return _read(name, default, str)


def env_optional_str(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def env_bool(name: str, default: bool) -> bool:
    return _read(name, default, _bool)


def env_int(name: str, default: int) -> int:
    return _read(name, default, _positive_int)


def env_float(name: str, default: float) -> float:
    return _read(name, default, _positive_float)


def env_list(name: str, default: list[str]) -> list[str]:
    return _read(name, default, _csv)
