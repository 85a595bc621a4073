"""Report side of the benchmark: the results table, ratios to the references, JSON.

Ratios are ours / reference for the same scenario, step and server, so each line
reads "our figure is x times the reference's". For deliveries/s, publishes/s and
connects/s higher is better; for RSS, CPU per delivery and latency lower is better.
The publish scenarios are also divided by ``db_floor`` (pgbench, no server: one row per
run), and a last table checks them against their targets.

The slow-consumer steps are set beside the ``fanout`` step of the same N, server and
target in the same run: the healthy subscribers' figures with and without stalled
ones on the channel, and what happened to the stalled ones. The ``pusher_fanout`` steps
are set beside it the same way: Pusher subscribers' figures and ours at the same N.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.options import PUBLISH_SCENARIOS

Row = dict[str, Any]
REFERENCES = ("channels_ref", "bare_ref")
DB_FLOOR = "db_floor"
RATIO_METRICS = (
    "publish_per_s",
    "deliveries_per_s",
    "connect_per_s",
    "rss_per_conn_kb",
    "server_cpu_us_per_delivery",
    "lat_p99_ms",
)
SLOW_SCENARIOS = ("slow_consumer", "slow_drop_oldest")
# The healthy subscribers' figures, with stalled ones on the channel and in ``fanout``.
SLOW_COMPARED: tuple[tuple[str, str], ...] = (
    ("deliveries_per_s", "deliv/s"),
    ("lat_p50_ms", "p50 ms"),
    ("lat_p99_ms", "p99 ms"),
    ("lat_max_ms", "max ms"),
    ("loss", "loss"),
    ("server_rss_growth_mb", "RSS +MB"),
)
SLOW_FIGURES: tuple[tuple[str, str], ...] = (
    ("stalled_subscribers", "stalled"),
    ("stalled_closed_4002", "4002"),
    ("first_4002_after_s", "1st 4002 s"),
    ("last_4002_after_s", "last 4002 s"),
    ("dropped_frames", "dropped"),
    ("rss_peak_growth_mb", "peak +MB"),
)
# pusher_fanout beside fanout: the same figures for both protocols' subscribers.
PUSHER_COMPARED: tuple[tuple[str, str], ...] = (
    ("deliveries_per_s", "deliv/s"),
    ("server_cpu_us_per_delivery", "srv us/d"),
    ("client_cpu_us_per_delivery", "cli us/d"),
    ("lat_p50_ms", "p50 ms"),
    ("lat_p99_ms", "p99 ms"),
    ("loss", "loss"),
    ("duplicates", "dup"),
)
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("scenario", "scenario", 16),
    ("step", "step", 18),
    ("server", "server", 7),
    ("target", "target", 12),
    ("connections", "conns", 7),
    ("connect_per_s", "conn/s", 8),
    ("rss_per_conn_kb", "KB/conn", 8),
    ("publish_per_s", "pub/s", 8),
    ("deliveries_per_s", "deliv/s", 9),
    ("server_cpu_us_per_delivery", "cpu us/d", 8),
    ("lat_p50_ms", "p50 ms", 8),
    ("lat_p99_ms", "p99 ms", 8),
    ("lat_max_ms", "max ms", 8),
    ("ack_p50_ms", "ack p50", 7),
    ("ack_p99_ms", "ack p99", 7),
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
    if row["scenario"] in SLOW_SCENARIOS and "stalled_closed_4002" in row:
        parts.append(_stalled_note(row))
    if row.get("note"):
        parts.append(row["note"])
    if row.get("skipped"):
        parts.append(f"skipped: {row['skipped']}")
    if row.get("error"):
        parts.append(f"FAILED: {row['error']}")
    return "; ".join(parts)


def _stalled_note(row: Row) -> str:
    closed = f"{row['stalled_closed_4002']} of {row['stalled_subscribers']} stalled closed 4002"
    if row.get("first_4002_after_s") is not None:
        closed += f" {row['first_4002_after_s']}-{row['last_4002_after_s']} s into the flood"
    return (
        f"{closed} ({row['flood_secs']} s); dropped frames {row['dropped_frames']}; "
        f"read again: codes {row['stalled_close_codes']}, gaps {row['stalled_gaps']}; "
        f"server RSS +{row['rss_peak_growth_mb']} MB at peak, +{row['server_rss_growth_mb']} "
        "MB at the end"
    )


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
        floor = _db_floor(rows)
        # A fixed-rate step publishes what it was told to: no ratio to a maximum.
        if floor is not None and row["scenario"] in PUBLISH_SCENARIOS and row.get("kind") != "rate":
            ratios.append(_floor_ratio(row, floor))
    return ratios


def _db_floor(rows: list[Row]) -> Row | None:
    for row in rows:
        if row["scenario"] == DB_FLOOR and row.get("publish_per_s"):
            return row
    return None


def _floor_ratio(row: Row, floor: Row) -> Row:
    entry: Row = {"scenario": row["scenario"], "step": row["step"]}
    entry.update({"server": row["server"], "versus": DB_FLOOR})
    mine = row.get("publish_per_s")
    if isinstance(mine, int | float):
        entry["publish_per_s"] = round(mine / floor["publish_per_s"], 2)
    return entry


def format_ratios(ratios: list[Row]) -> str:
    if not ratios:
        return "(no ratios: run target 'ours' together with a reference)"
    titles = ("pub/s", "deliv/s", "conn/s", "KB/conn", "cpu/d", "p99")
    header = f"{'scenario':>14} {'step':>18} {'server':>7} {'versus':>12} " + " ".join(
        title.rjust(8) for title in titles
    )
    lines = [header, "-" * len(header)]
    for entry in ratios:
        head = (
            f"{entry['scenario']:>14} {entry['step'][:18]:>18} "
            f"{entry['server']:>7} {entry['versus']:>12} "
        )
        cells = [_cell(entry.get(metric), 8) for metric in RATIO_METRICS]
        lines.append(head + " ".join(cells))
    return "\n".join(lines)


# (scenario, kind of step, versus, least ratio of publishes/s): bench/README.md, "Targets".
PUBLISH_RATIO_TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("publish", "max", DB_FLOOR, 2.0),
    ("publish", "max", "bare_ref", 0.7),
    ("publish_rest", "single", DB_FLOOR, 1.0),
    ("publish_rest", "batch", DB_FLOOR, 5.0),
    ("publish_recent", "max", "bare_ref", 0.9),
)
ACK_P99_TARGET_MS = 20.0  # at the fixed rate (publish, kind "rate")


def check_publish_targets(rows: list[Row], ratios: list[Row]) -> list[Row]:
    """Each publish target against our rows of this run; ``met`` is None when a
    figure is missing (the reference or the step was not run).

    A target against ``db_floor`` also gets ``bare_ref``'s own ratio to the floor in
    the same step, where bare_ref ran: the most any server with this load generator
    reaches on this machine (bare_ref stores nothing). When PostgreSQL is fast, the
    target can lie above it, and the line says so."""
    by_key = {(r["scenario"], r["step"], r["server"], r["versus"]): r for r in ratios}
    floor = _db_floor(rows)
    bare = {_key(row): row for row in rows if row["target"] == "bare_ref"}
    ours = [row for row in rows if row["target"] == "ours" and row.get("kind")]
    checks: list[Row] = []
    for scenario, kind, versus, least in PUBLISH_RATIO_TARGETS:
        for row in ours:
            if (row["scenario"], row["kind"]) != (scenario, kind):
                continue
            entry = by_key.get((scenario, row["step"], row["server"], versus), {})
            value = entry.get("publish_per_s")
            check: Row = {
                "target": f"{scenario} {kind}: pub/s >= {least:g}x {versus}",
                "server": row["server"],
                "value": value,
                "met": None if value is None else value >= least,
                "least": least,
            }
            reference = bare.get(_key(row))
            if versus == DB_FLOOR and floor is not None and reference is not None:
                check["bare_ref_value"] = _floor_ratio(reference, floor).get("publish_per_s")
            checks.append(check)
    for row in ours:
        if (row["scenario"], row["kind"]) == ("publish", "rate"):
            value = row.get("ack_p99_ms")
            rate = row["step"].split()[0]
            checks.append(
                {
                    "target": f"publish {rate}: ack p99 < {ACK_P99_TARGET_MS:g} ms",
                    "server": row["server"],
                    "value": value,
                    "met": None if value is None else value < ACK_P99_TARGET_MS,
                }
            )
    return checks


def format_publish_targets(checks: list[Row]) -> str:
    lines = ["publish targets (ours)"]
    for check in checks:
        verdict = {True: "met", False: "NOT MET", None: "not measured"}[check["met"]]
        value = "-" if check["value"] is None else f"{check['value']:g}"
        line = f"  {check['target']:<42} {check['server']:>7} {value:>8}  {verdict}"
        ceiling = check.get("bare_ref_value")
        if ceiling is not None:
            above = " (the target is above it)" if ceiling < check["least"] else ""
            line += f"; bare_ref: {ceiling:g}x{above}"
        lines.append(line)
    return "\n".join(lines)


def write_results(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def json_line(document: dict[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"), sort_keys=True)


def _beside_fanout(
    rows: list[Row],
    scenarios: tuple[str, ...],
    compared: tuple[tuple[str, str], ...],
    figures: tuple[tuple[str, str], ...],
) -> list[Row]:
    """Every step of ``scenarios`` beside the ``fanout`` step of the same N, server and
    target (if run): ``compared`` from both, ``figures`` from the step alone."""
    plain = {
        (row["step"], row["server"], row["target"]): row
        for row in rows
        if row["scenario"] == "fanout" and not row.get("error")
    }
    entries: list[Row] = []
    for row in rows:
        if row["scenario"] not in scenarios or row.get("error") or row.get("skipped"):
            continue
        fanout = plain.get((row["step"], row["server"], row["target"]), {})
        entry = {key: row[key] for key in ("scenario", "step", "server", "target")}
        for key, _ in compared:
            entry[key] = row.get(key)
            entry[f"fanout_{key}"] = fanout.get(key)
        entry.update({key: row.get(key) for key, _ in figures})
        entries.append(entry)
    return entries


def _format_beside(
    title: str,
    entries: list[Row],
    compared: tuple[tuple[str, str], ...],
    figures: tuple[tuple[str, str], ...],
) -> str:
    """``compared`` as "this step / in fanout", then ``figures``."""
    header = f"{'scenario':>16} {'step':>10} {'server':>7} " + " ".join(
        [*(name.rjust(17) for _, name in compared), *(name.rjust(11) for _, name in figures)]
    )
    lines = [title, header, "-" * len(header)]
    for entry in entries:
        pairs = [
            f"{_cell(entry[key], 8).strip()} / {_cell(entry[f'fanout_{key}'], 8).strip()}"
            for key, _ in compared
        ]
        cells = [
            *(pair.rjust(17) for pair in pairs),
            *(_cell(entry[key], 11) for key, _ in figures),
        ]
        head = f"{entry['scenario']:>16} {entry['step'][:10]:>10} {entry['server']:>7} "
        lines.append(head + " ".join(cells))
    return "\n".join(lines)


def compare_slow_to_fanout(rows: list[Row]) -> list[Row]:
    """Every slow-consumer step beside the ``fanout`` step of the same N (if run)."""
    entries = _beside_fanout(rows, SLOW_SCENARIOS, SLOW_COMPARED, SLOW_FIGURES)
    return [entry for entry in entries if entry["stalled_closed_4002"] is not None]


def format_slow_comparison(entries: list[Row]) -> str:
    """Healthy figures as "with stalled / in fanout", then the stalled ones' fate."""
    title = "healthy subscribers: with stalled ones / in fanout at the same N"
    return _format_beside(title, entries, SLOW_COMPARED, SLOW_FIGURES)


def compare_pusher_to_fanout(rows: list[Row]) -> list[Row]:
    """Every ``pusher_fanout`` step beside the ``fanout`` step of the same N (if run),
    with the ratio of their server CPU per delivery (the target: at most 1)."""
    entries = _beside_fanout(rows, ("pusher_fanout",), PUSHER_COMPARED, ())
    for entry in entries:
        mine, ours = entry["server_cpu_us_per_delivery"], entry["fanout_server_cpu_us_per_delivery"]
        entry["cpu_ratio"] = round(mine / ours, 2) if mine and ours else None
    return entries


def format_pusher_comparison(entries: list[Row]) -> str:
    title = "Pusher subscribers / ours (fanout) at the same N; cpu ratio = Pusher / ours"
    return _format_beside(title, entries, PUSHER_COMPARED, (("cpu_ratio", "cpu ratio"),))
