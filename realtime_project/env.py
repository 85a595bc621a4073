"""Settings from the environment: the only module that reads ``os.environ``.

Every variable is read once, cast to its type, and a malformed value stops start-up
with an error that names the variable (Starlette's ``Config`` habit).

Each ``env_*`` call in settings.py also says what its variable means (``meaning``, and
``shown`` for a default computed at start-up): the configuration reference is printed
from those calls (``realtime_project.configuration``); they do nothing at run time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from common.conf import EnvType, Option

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


def _count(raw: str) -> int:
    """A count where 0 means "no limit"."""
    value = int(raw)
    if value < 0:
        raise ValueError("expected 0 (no limit) or a positive integer")
    return value


def _text(raw: str) -> str | None:
    """Text, where an empty value is no value."""
    return raw or None


def env_str(name: str, default: str, *, meaning: str, shown: str = "") -> str:
    return _read(name, default, str)


def env_optional_str(name: str, *, meaning: str) -> str | None:
    return _read(name, None, _text)


def env_bool(name: str, default: bool, *, meaning: str) -> bool:
    return _read(name, default, _bool)


def env_int(name: str, default: int, *, meaning: str) -> int:
    return _read(name, default, _positive_int)


def env_float(name: str, default: float, *, meaning: str) -> float:
    return _read(name, default, _positive_float)


def env_list(name: str, default: list[str], *, meaning: str, shown: str = "") -> list[str]:
    return _read(name, default, _csv)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_duration_secs(raw: str) -> int:
    """``90``, ``90s``, ``15m``, ``12h`` or ``30d`` as whole seconds."""
    raw = raw.strip().lower()
    unit = raw[-1:] if raw[-1:] in DURATION_UNITS else "s"
    number = raw[:-1] if raw[-1:] in DURATION_UNITS else raw
    value = int(number) * DURATION_UNITS[unit]
    if value <= 0:
        raise ValueError("expected a positive duration such as 90s, 15m, 12h or 30d")
    return value


def _duration_or_none(raw: str) -> int:
    """A duration, or ``-`` (or ``0``) for none: 0, which the option reads as no limit
    (None would read as unset, and the default would apply)."""
    return 0 if raw.strip() in ("-", "0") else parse_duration_secs(raw)


def _optional_limit(raw: str, parse: Callable[[str], int]) -> int | None:
    raw = raw.strip()
    return None if raw in ("", "-") else parse(raw)


def _retention_rules(raw: str) -> list[tuple[str, int | None, int | None]]:
    """``ticker:*=1000/-;chat:*=-/30d``: per pattern, max messages and max age (``-``
    for no limit); the first matching pattern wins."""
    rules = []
    for item in raw.split(";"):
        if not item.strip():
            continue
        pattern, _, limits = item.partition("=")
        count, _, age = limits.partition("/")
        if not pattern.strip() or not limits:
            raise ValueError(f"rule {item!r} is not PATTERN=COUNT/AGE")
        rules.append(
            (
                pattern.strip(),
                _optional_limit(count, _positive_int),
                _optional_limit(age, parse_duration_secs),
            )
        )
    return rules


HISTORY_MODES = ("durable", "recent")


def _history_modes(raw: str) -> list[tuple[str, str]]:
    """``ticker:*=recent;ticker:archive=durable``: per channel-name pattern, where the
    channel's history lives; the first matching pattern wins, ``durable`` otherwise."""
    modes = []
    for item in raw.split(";"):
        if not item.strip():
            continue
        pattern, _, mode = item.partition("=")
        mode = mode.strip().lower()
        if not pattern.strip() or mode not in HISTORY_MODES:
            raise ValueError(f"rule {item!r} is not PATTERN=durable or PATTERN=recent")
        modes.append((pattern.strip(), mode))
    return modes


_PARSERS: dict[EnvType, Callable[[str], Any]] = {
    EnvType.INT: _positive_int,
    EnvType.COUNT: _count,
    EnvType.NUMBER: _positive_float,
    EnvType.BOOL: _bool,
    EnvType.LIST: _csv,
    EnvType.DURATION: parse_duration_secs,
    EnvType.DURATION_OR_NONE: _duration_or_none,
    EnvType.TEXT: _text,
    EnvType.RETENTION_RULES: _retention_rules,
    EnvType.HISTORY_MODES: _history_modes,
}


def env_overrides(options: Iterable[Option]) -> dict[str, Any]:
    """The options whose variable is set, each read as its type; an unset variable (or
    empty text) is left out, so the option's default applies."""
    found = {}
    for option in options:
        value = _read(option.variable, None, _PARSERS[option.env_type])
        if value is not None:
            found[option.name] = value
    return found
