"""The configuration reference, docs/configuration.md, printed from where each default
lives: the push server's options from ``common.conf.PushSettings``, the project's own
variables from the ``env_*`` calls in settings.py (read as source, so a variable read only
under some condition is listed too, whatever the environment).

    python -m realtime_project.configuration > docs/configuration.md

tests/test_configuration_doc.py fails when the file differs from what this prints.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.conf import EnvType, push_options
from realtime_project.env import DURATION_UNITS

SETTINGS_FILE = Path(__file__).with_name("settings.py")

# How settings.py's readers (realtime_project.env) read their variable.
_READERS = {
    "env_str": EnvType.TEXT,
    "env_optional_str": EnvType.TEXT,
    "env_bool": EnvType.BOOL,
    "env_int": EnvType.INT,
    "env_float": EnvType.NUMBER,
    "env_list": EnvType.LIST,
    "env_rate": EnvType.RATE,
}

HEADER = """\
# Configuration

Every setting comes from the environment, read once at start-up by
`realtime_project/env.py`; a value that cannot be read as its type stops start-up with
an error that names the variable. A boolean is `1`/`0`, `true`/`false`, `yes`/`no` or
`on`/`off`; a duration is whole seconds or a number with a unit: `90`, `90s`, `15m`,
`12h`, `30d`; a rate is a count per period: `600/min`, `10/s`, `5000/hour`, `100000/day`.
A channel pattern is a channel name with the wildcards `*`, `?` and `[...]`
(`ticker:*`); one with a character no channel name holds (a space, a quote) is refused.

This file is generated: `python -m realtime_project.configuration > docs/configuration.md`
prints it from `common/conf.py` and `realtime_project/settings.py`, and a test fails when
the two differ.
"""

PROJECT_INTRO = """\
## The project

Django, the database, Redis and logging (`realtime_project/settings.py`).
"""

PUSH_INTRO = """\
## The push server

The push server's options (`settings.PUSH`), each with its default and meaning in one
place, `PushSettings` in `common/conf.py`. The code reads them as
`push_settings.<OPTION>`; settings.py passes only the options whose variable is set, and
a test sets its own with `override_settings(PUSH={...})`.
"""


@dataclass(frozen=True)
class Variable:
    """One row of the reference."""

    variable: str
    env_type: EnvType
    default: str
    meaning: str
    option: str = ""


def shown_default(value: Any, env_type: EnvType) -> str:
    """A default as one would write it in the environment."""
    if value is None:
        return "unset"
    if isinstance(value, list):
        return f"`{','.join(value)}`" if value else "empty"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if env_type is EnvType.DURATION_OR_NONE and not value:
        return "`-`"
    if env_type in (EnvType.DURATION, EnvType.DURATION_OR_NONE):
        # In the largest unit that divides it: 7d, not 604800.
        for unit, secs in sorted(DURATION_UNITS.items(), key=lambda item: -item[1]):
            if value % secs == 0:
                return f"`{value // secs}{unit}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def _keyword(call: ast.Call, name: str) -> str | None:
    for keyword in call.keywords:
        if keyword.arg == name:
            return str(ast.literal_eval(keyword.value))
    return None


def project_variables(source: str | None = None) -> list[Variable]:
    """The variables settings.py reads, in the order it reads them, each once."""
    tree = ast.parse(source if source is not None else SETTINGS_FILE.read_text())
    calls = [
        (node.lineno, node.col_offset, node, _READERS[node.func.id])
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _READERS
    ]
    found: dict[str, Variable] = {}
    for _, _, call, env_type in sorted(calls, key=lambda c: c[:2]):
        name = ast.literal_eval(call.args[0])
        meaning = _keyword(call, "meaning")
        if meaning is None:
            raise ValueError(f"settings.py line {call.lineno}: {name} has no meaning=")
        default = _keyword(call, "shown")
        if default is None:
            value = ast.literal_eval(call.args[1]) if len(call.args) > 1 else None
            default = shown_default(value, env_type)
        found.setdefault(name, Variable(name, env_type, default, meaning))
    return list(found.values())


def push_variables() -> list[Variable]:
    return [
        Variable(o.variable, o.env_type, shown_default(o.default, o.env_type), o.meaning, o.name)
        for o in push_options()
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference() -> str:
    lines = [HEADER, PROJECT_INTRO, "| variable | type | default | meaning |", "|---|---|---|---|"]
    lines += [
        f"| `{v.variable}` | {v.env_type.value} | {_cell(v.default)} | {_cell(v.meaning)} |"
        for v in project_variables()
    ]
    lines += ["", PUSH_INTRO, "| variable | option | type | default | meaning |"]
    lines.append("|---|---|---|---|---|")
    lines += [
        f"| `{v.variable}` | `{v.option}` | {v.env_type.value} | {_cell(v.default)} "
        f"| {_cell(v.meaning)} |"
        for v in push_variables()
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
