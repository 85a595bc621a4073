"""Report side of the benchmark: the results table, ratios to the references, JSON.

Ratios are ours / reference for the same scenario, step and server, so each line
reads "our figure is x times the reference's". For deliveries/s and connects/s
higher is better; for RSS, CPU per delivery and latency lower is better.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Row = dict[str, Any]
REFERENCES = ("channels_ref", "bare_ref")
RATIO_METRICS = (
    "deliveries_per_s",
    "connect_per_s",
    "rss_per_conn_kb",
    "server_cpu_us_per_delivery",
    "lat_p99_ms",
)
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("scenario", "scenario", 13),
    ("step", "step", 16),
    ("server", "server", 7),
    ("target", "target", 12),
    ("connections", "conns", 7),
    ("connect_per_s", "conn/s", 8),
    ("rss_per_conn_kb", "KB/conn", 8),
    ("deliveries_per_s", "deliv/s", 9),
    ("server_cpu_us_per_delivery", "cpu us/d", 8),
    ("lat_p50_ms", "p50 ms", 8),
    ("lat_p99_ms", "p99 ms", 8),
    ("lat_max_ms", "max ms", 8),
    ("loss", "loss", 6),
    ("duplicates", "dup", 5),
    ("gaps", "gaps", 5),
    ("server_cores_busy", "srv cpu", 7),
    ("client_cores_busy", "cli cpu", 7),
)


def _cell(value: Any, width: int) -> str:
    if value is None or value == "":
        text = "-"
    elif isinstance(value, float):
        text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return text[:width].rjust(width)


def format_table(rows: list[Row]) -> str:
    header = " ".join(title.rjust(width) for _, title, width in COLUMNS)
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(" ".join(_cell(row.get(key), width) for key, _, width in COLUMNS))
        notes = _notes(row)
        if notes:
            lines.append(" " * 4 + notes)
    return "\n".join(lines)


def _notes(row: Row) -> str:
    parts = []
    for key in ("connect_failures", "close_codes", "errors", "publish_errors"):
        if row.get(key):
            parts.append(f"{key}={row[key]}")
    if row.get("stalled"):
        parts.append("publisher stalled (probe saw no progress)")
    if row.get("skipped"):
        parts.append(f"skipped: {row['skipped']}")
    if row.get("error"):
        parts.append(f"FAILED: {row['error']}")
    return "; ".join(parts)


def _key(row: Row) -> tuple[str, str, str]:
    return row["scenario"], row["step"], row["server"]


def compute_ratios(rows: list[Row]) -> list[Row]:
    """For every row of ours, its figures divided by each reference's."""
    by_key = {(_key(row), row["target"]): row for row in rows}
    ratios: list[Row] = []
    for row in rows:
        if row["target"] != "ours":
            continue
        for reference in REFERENCES:
            other = by_key.get((_key(row), reference))
            if other is None:
                continue
            entry: Row = {"scenario": row["scenario"], "step": row["step"]}
            entry.update({"server": row["server"], "versus": reference})
            for metric in RATIO_METRICS:
                mine, theirs = row.get(metric), other.get(metric)
                if isinstance(mine, int | float) and isinstance(theirs, int | float) and theirs:
                    entry[metric] = round(mine / theirs, 2)
            ratios.append(entry)
    return ratios


def format_ratios(ratios: list[Row]) -> str:
    if not ratios:
        return "(no ratios: run target 'ours' together with a reference)"
    titles = ("deliv/s", "conn/s", "KB/conn", "cpu/d", "p99")
    header = f"{'scenario':>13} {'step':>16} {'server':>7} {'versus':>12} " + " ".join(
        title.rjust(8) for title in titles
    )
    lines = [header, "-" * len(header)]
    for entry in ratios:
        head = (
            f"{entry['scenario']:>13} {entry['step'][:16]:>16} "
            f"{entry['server']:>7} {entry['versus']:>12} "
        )
        cells = [_cell(entry.get(metric), 8) for metric in RATIO_METRICS]
        lines.append(head + " ".join(cells))
    return "\n".join(lines)


def write_results(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def json_line(document: dict[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"), sort_keys=True)
