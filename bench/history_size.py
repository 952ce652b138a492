"""Scenario 5: history at size. `history`, `stats` and `prune` on 1 M and 10 M attempt rows.

Rows are generated with SQL into a file migrated by te-scheduler's own Alembic scripts (see
``bench.history_tool``). Each call is te-scheduler's own function (``history.query``,
``history.stats``, ``history.prune``) in a fresh process, as the CLI makes it; the CLI itself
is also timed for `history` (its wall time includes starting Python). While `prune` deletes
the older half, another process writes like the daemon (a pending row, then its completion,
50 times a second) and each write's latency is compared with the same writes just before.
A `stats` or `prune` call still running after the cap is stopped and reported as such.
"""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.common import env, percentile, say
from bench.report import Section, fmt, prose
from bench.settings import Settings

TARGET_QUERY_MS, TARGET_STATS_S, TARGET_SLOWDOWN = 100.0, 2.0, 1.5
BASELINE_S = 5.0
_generation: dict[str, threading.Thread] = {}


def db_path(settings: Settings, rows: int) -> Path:
    return settings.case_dir("history") / f"history-{rows}.db"


def start_generation(settings: Settings) -> None:
    """Generate every size in the background (scenario 3 runs meanwhile: it is mostly idle)."""
    key = str(settings.workdir)
    if key not in _generation:
        thread = threading.Thread(target=_generate_all, args=(settings,), daemon=True)
        _generation[key] = thread
        thread.start()


def _generate_all(settings: Settings) -> None:
    for rows in settings.history_rows:
        path = db_path(settings, rows)
        _tool(settings, "generate", path, f"gen-{rows}", ["--rows", str(rows)], timeout=3600)


def _tool(
    settings: Settings, action: str, path: Path, name: str, extra: list[str], timeout: float | None
) -> dict[str, Any] | None:
    """Run one history_tool action; None when it was stopped at ``timeout``."""
    out = settings.case_dir("history") / f"{name}.json"
    args = [
        sys.executable,
        "-m",
        "bench.history_tool",
        action,
        "--db",
        str(path),
        "--out",
        str(out),
        *extra,
    ]
    try:
        subprocess.run(
            args,
            env=env(),
            timeout=timeout,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    except subprocess.TimeoutExpired:
        return None
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def run(settings: Settings) -> Section:
    section = Section("history", "5. History at size", "python -m bench", intro=prose(__doc__))
    start_generation(settings)
    _generation[str(settings.workdir)].join()
    rows_out: list[list[Any]] = []
    for rows in settings.history_rows:
        say(f"history: {rows:,} rows")
        data = _measure(settings, rows)
        section.data[str(rows)] = data
        rows_out.append(_row(rows, data))
    section.table(
        [
            "rows",
            "generated in s",
            "file GB",
            "history first ms",
            "history warm ms",
            "CLI history s",
            "stats s",
            "prune half s",
            "writes p50 / p99 / max ms before",
            "writes p50 / p99 / max ms during prune",
        ],
        rows_out,
    )
    _targets(section, settings)
    section.notes.append(
        f"`stats` and `prune` are stopped after {settings.history_cap:g} s (shown as "
        "`> cap`); for a stopped prune the rows it had deleted are counted and its rate given."
    )
    return section


def _measure(settings: Settings, rows: int) -> dict[str, Any]:
    path = db_path(settings, rows)
    cap = settings.history_cap or None
    gen = json.loads((settings.case_dir("history") / f"gen-{rows}.json").read_text())
    query = _tool(settings, "query", path, f"query-{rows}", ["--repeat", "5"], 300)
    cli = _cli_history(settings, path)
    stats = _tool(settings, "stats", path, f"stats-{rows}", [], cap)
    prune = _prune_with_writes(settings, path, rows, cap)
    return {"generated": gen, "query": query, "cli_s": cli, "stats": stats, **prune}


def _cli_history(settings: Settings, path: Path) -> float:
    config = settings.case_dir("history") / "jobs.yaml"
    config.write_text("version: 1\njobs:\n  - {name: job-7, tests: [1], schedule: {every: 1h}}\n")
    started = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "scheduler",
            "-c",
            str(config),
            "--db",
            f"sqlite:///{path}",
            "history",
            "--job",
            "job-7",
            "--since",
            "7d",
        ],
        env=env(),
        capture_output=True,
        timeout=300,
        check=True,
    )
    return time.monotonic() - started


def _prune_with_writes(
    settings: Settings, path: Path, rows: int, cap: float | None
) -> dict[str, Any]:
    before = _median_start(path)
    total = _count(path)
    out = settings.case_dir("history") / f"writes-{rows}.json"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.history_tool",
            "insert",
            "--db",
            str(path),
            "--out",
            str(out),
            "--rate",
            "50",
        ],
        env=env(),
    )
    time.sleep(1.0 if settings.quick else BASELINE_S)
    prune_start = time.time()
    pruned = _tool(settings, "prune", path, f"prune-{rows}", ["--before", before], cap)
    prune_end = time.time()
    time.sleep(1.0)
    writer.terminate()
    writer.wait(timeout=60)
    samples = json.loads(out.read_text())
    base = [ms for at, ms in samples if at < prune_start]
    during = [ms for at, ms in samples if prune_start <= at <= prune_end]
    deleted = pruned["deleted"] if pruned else total - _count(path)
    return {
        "prune": pruned,
        "deleted": deleted,
        "prune_s": prune_end - prune_start,
        "writes_before": _spread(base),
        "writes_during": _spread(during),
    }


def _median_start(path: Path) -> str:
    con = sqlite3.connect(path)
    try:
        count = con.execute("SELECT max(id) FROM attempts").fetchone()[0] or 0
        text = con.execute(
            "SELECT started_at FROM attempts WHERE id >= ? ORDER BY id LIMIT 1", (count // 2,)
        ).fetchone()[0]
    finally:
        con.close()
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).isoformat()


def _count(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return int(con.execute("SELECT count(*) FROM attempts").fetchone()[0])
    finally:
        con.close()


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
    }


def _row(rows: int, d: dict[str, Any]) -> list[Any]:
    query = d["query"]["ms"] if d["query"] else []
    stats = f"{d['stats']['seconds']:.2f}" if d["stats"] else "> cap"
    prune = (
        f"{d['prune']['seconds']:.1f}"
        if d["prune"]
        else f"> cap ({d['deleted']:,} of {rows // 2:,} rows, "
        f"{d['deleted'] / max(d['prune_s'], 1e-9):,.0f}/s)"
    )
    b, w = d["writes_before"], d["writes_during"]
    return [
        rows,
        d["generated"]["seconds"],
        d["generated"]["bytes"] / 1e9,
        query[0] if query else math.nan,
        sorted(query[1:])[len(query[1:]) // 2] if len(query) > 1 else math.nan,
        d["cli_s"],
        stats,
        prune,
        f"{fmt(b['p50'])} / {fmt(b['p99'])} / {fmt(b['max'])}",
        f"{fmt(w['p50'])} / {fmt(w['p99'])} / {fmt(w['max'])}",
    ]


def _targets(section: Section, settings: Settings) -> None:
    at = max(settings.history_rows)
    d = section.data[str(at)]
    first = d["query"]["ms"][0] if d["query"] else math.nan
    section.ratio(
        f"history (first call) / {TARGET_QUERY_MS:g} ms target at {at:,} rows",
        first / TARGET_QUERY_MS,
        "<= 1",
    )
    stats_s = d["stats"]["seconds"] if d["stats"] else math.inf
    if d["stats"]:
        section.ratio(
            f"stats / {TARGET_STATS_S:g} s target at {at:,} rows", stats_s / TARGET_STATS_S, "<= 1"
        )
    else:
        section.ratios.append(
            f"stats / {TARGET_STATS_S:g} s target at {at:,} rows: "
            f"> {settings.history_cap / TARGET_STATS_S:.2f}x (stopped at the cap; target <= 1)"
        )
    slow = d["writes_during"]["p99"] / d["writes_before"]["p99"]
    section.ratio(
        f"daemon write p99 during prune / before, at {at:,} rows", slow, f"<= {TARGET_SLOWDOWN}"
    )
    section.target(
        f"5. history --job X --since 7d, {at:,} rows",
        f"< {TARGET_QUERY_MS:g} ms",
        f"{fmt(first)} ms (first call in a fresh process)",
        first < TARGET_QUERY_MS,
    )
    section.target(
        f"5. stats --since 30d, {at:,} rows",
        f"< {TARGET_STATS_S:g} s",
        f"{fmt(stats_s, 2)} s" if d["stats"] else f"> {settings.history_cap:g} s",
        stats_s < TARGET_STATS_S,
    )
    section.target(
        f"5. daemon writes during prune, {at:,} rows",
        f"not slowed (p99 <= {TARGET_SLOWDOWN}x before)",
        f"p99 {fmt(d['writes_during']['p99'])} ms vs {fmt(d['writes_before']['p99'])}"
        f" ms ({fmt(slow, 1)}x)",
        slow <= TARGET_SLOWDOWN,
    )
