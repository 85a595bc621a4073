"""Settings from the environment: the only module that reads ``os.environ``.

Every variable is read once, cast to its type, and a malformed value stops start-up
with an error that names the variable (Starlette's ``Config`` habit).

Each ``env_*`` call in settings.py also says what its variable means (``meaning``, and
``shown`` for a default computed at start-up): the configuration reference is printed
from those calls (``realtime_project.configuration``); they do nothing at run time.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from common.conf import EnvType, ImproperlyConfiguredEnv, Option, webhook_url_problem

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _read(name: str, default: T, cast: Callable[[str], T]) -> T:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return checked(name, raw, lambda value: cast(value.strip()))


def checked(name: str, raw: str, parse: Callable[[str], T], *, secret: bool = False) -> T:
    """``parse(raw)``, where ``raw`` came from the variable ``name``: a value it refuses
    stops start-up with an error that names the variable, and shows the value unless it
    is ``secret`` (a URL with a password)."""
    try:
        return parse(raw)
    except (TypeError, ValueError) as exc:
        shown = name if secret else f"{name}={raw!r}"
        raise ImproperlyConfiguredEnv(f"{shown} is not valid: {exc}") from exc


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
    # ``inf`` (or ``1e999``) is no setting either: a wait that never ends, and an
    # OverflowError where a number of seconds becomes milliseconds (the event worker's).
    if not (value > 0 and math.isfinite(value)):
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


PORT_MAX = 65_535


def _port(raw: str) -> int:
    """A TCP port, or 0 for none: socket calls refuse a larger one only when they bind,
    after start-up, and some servers take it modulo 65,536."""
    value = int(raw)
    if not 0 <= value <= PORT_MAX:
        raise ValueError(f"expected a port, 1 to {PORT_MAX} (0: none)")
    return value


# What a channel name may hold, in our protocol (push.wire.protocol) or Pusher's
# (push.services.pusher_http), and fnmatch's wildcards. A pattern with anything else (a
# space between two patterns, the quotes an env file kept) matches no channel: refused,
# rather than silently applying to none.
_CHANNEL_PATTERN = re.compile(r"[A-Za-z0-9_\-.:@=,;*?\[\]!]+")


def channel_pattern(raw: str) -> str:
    pattern = raw.strip()
    if _CHANNEL_PATTERN.fullmatch(pattern) is None:
        raise ValueError(
            f"pattern {pattern!r} can match no channel name (letters, digits and _-.:@=,; "
            "with the wildcards *?[]!)"
        )
    return pattern


def _patterns(raw: str) -> list[str]:
    return [channel_pattern(item) for item in _csv(raw)]


def _urls(raw: str) -> list[str]:
    urls = _csv(raw)
    for url in urls:
        if problem := webhook_url_problem(url):
            raise ValueError(problem)
    return urls


# DRF's throttle periods, by the first letter it reads of them (SimpleRateThrottle).
RATE_PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def _rate(raw: str) -> str:
    """``COUNT/PERIOD`` (``600/min``, ``10/s``, ``100000/day``): DRF reads it at the first
    request, and a rate it cannot read made every REST request a 500."""
    count, slash, period = raw.partition("/")
    if not slash or not period.isalpha() or period[0].lower() not in RATE_PERIODS:
        raise ValueError("expected COUNT/PERIOD, the period s, min, hour or day")
    _positive_int(count)
    return raw


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


def env_rate(name: str, default: str | None, *, meaning: str) -> str | None:
    """A throttle rate; an empty value is no value (the default), as for empty text."""
    return _read(name, default, lambda raw: _rate(raw) if raw else default)


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
                channel_pattern(pattern),
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
        modes.append((channel_pattern(pattern), mode))
    return modes


_PARSERS: dict[EnvType, Callable[[str], Any]] = {
    EnvType.INT: _positive_int,
    EnvType.COUNT: _count,
    EnvType.NUMBER: _positive_float,
    EnvType.BOOL: _bool,
    EnvType.LIST: _csv,
    EnvType.PATTERNS: _patterns,
    EnvType.URLS: _urls,
    EnvType.PORT: _port,
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
