"""Every relative link in the repository's Markdown points at a file that exists and, with
a ``#fragment``, at a heading of that file: a reader who clones the project never meets a
dead link, and no document links outside the repository. Offline and in milliseconds."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# [text](target) and [text](target "title"); images alike. Code spans and fenced blocks
# are removed first, so a link written as an example inside them is not checked.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _markdown_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    files = {ROOT / name for name in listed} | set((ROOT / "docs").glob("*.md"))
    files.add(ROOT / "README.md")
    return sorted(path for path in files if path.exists())


def _prose(text: str) -> str:
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but ``-`` and ``_``
    dropped, spaces to hyphens (inline code and emphasis markers dropped with it)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def _anchors(path: Path) -> frozenset[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(anchors)


def _problems(path: Path) -> list[str]:
    problems = []
    for target in LINK.findall(_prose(path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        name, _, fragment = target.partition("#")
        resolved = (path.parent / name).resolve() if name else path
        where = f"{path.relative_to(ROOT)}: {target}"
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{where} leaves the repository")
        elif not resolved.exists():
            problems.append(f"{where} names no file")
        elif (
            fragment
            and resolved.suffix == ".md"
            and resolved.exists()
            and fragment not in _anchors(resolved)
        ):
            problems.append(f"{where} names no heading of {resolved.relative_to(ROOT)}")
    return problems


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    assert _problems(path) == []


def test_the_slug_is_githubs() -> None:
    assert _slug("Readings of the contract") == "readings-of-the-contract"
    assert _slug("Where: browsers, hosts and client addresses") == (
        "where-browsers-hosts-and-client-addresses"
    )
    assert _slug("`since` and `Last-Event-ID`") == "since-and-last-event-id"
