"""Scenario 6 (``--soak``): a long run of ``te-scheduler run`` at 20 calls a second.

The simulator answers 5% of calls 500/502 and enforces its instant-test bucket (250 per 10 s,
while te-scheduler sends 200); every minute another client (this benchmark) spends 200 calls of
that bucket at once, so te-scheduler meets 429s it could not foresee. Every minute the config
is rewritten (a job added or removed) and the daemon gets SIGHUP. Resident memory, open
descriptors and threads are sampled every 10 s. At the end (SIGTERM) every call the simulator
answered must be a history row with the same status, and every slot of every job a firing.
"""

from __future__ import annotations

import http.client
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import ProcSample, env, sample, say
from bench.report import Section, fmt, prose
from bench.server import Record, Server
from bench.settings import Settings

JOBS, TESTS = 4, 5  # 4 jobs x 5 tests every second = 20 calls a second
LIMIT, WINDOW, NOISE, NOISE_EVERY = 250, 10.0, 200, 60.0
SAMPLE_EVERY, RELOAD_EVERY = 10.0, 60.0
TARGET_RSS_MB = 10.0


def config_text(base_url: str, db_url: str, extra: bool) -> str:
    lines = [
        "version: 1",
        "api:",
        f"  base_url: {base_url}",
        "  token_env: BENCH_TOKEN",
        "  timeout: 5s",
        "  concurrency: 8",
        "  rate_limit: 300/10s",
        "history:",
        f"  url: {db_url}",
        "  retention: 90d",
        "defaults:",
        "  retry: {attempts: 3, backoff: 200ms, max_backoff: 1s}",
        "jobs:",
    ]
    for j in range(JOBS):
        tests = ", ".join(str(100 + j * 10 + t) for t in range(TESTS))
        lines.append(
            f"  - {{name: soak-{j}, tests: [{tests}], schedule: {{every: 1s}}, spread: 1s}}"
        )
    if extra:  # toggled by each reload, so the reload has something to apply
        lines.append("  - {name: soak-extra, tests: [900], schedule: {every: 5s}}")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    """Replace the file atomically, as config management does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _noise(port: int) -> None:
    """Another client on the same account: NOISE calls back to back on one connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(NOISE):
            conn.request(
                "POST",
                "/v7/tests/1/run",
                headers={"Authorization": "Bearer other", "User-Agent": "other-client/1"},
            )
            conn.getresponse().read()
    finally:
        conn.close()


def run(settings: Settings) -> Section:
    minutes = settings.soak_minutes
    workdir = settings.case_dir("soak")
    db_file = workdir / "soak.db"
    config = workdir / "jobs.yaml"
    samples: list[ProcSample] = []
    reloads = 0
    with Server(
        workdir,
        "soak",
        "sim",
        org_limit=LIMIT * 10,
        instant_limit=LIMIT,
        window=WINDOW,
        fail_rate=0.05,
    ) as server:
        _write(config, config_text(server.url, f"sqlite:///{db_file}", False))
        log = (workdir / "daemon.log").open("w")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "scheduler", "-c", str(config), "run"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env(),
            cwd=workdir,
        )
        started = time.monotonic()
        end = started + minutes * 60
        # A short soak (--soak-minutes, --quick) still reloads and meets 429s a few times.
        reload_every = min(RELOAD_EVERY, max(10.0, minutes * 20))
        noise_every = min(NOISE_EVERY, max(5.0, minutes * 20))
        next_sample, next_reload = started + SAMPLE_EVERY, started + reload_every
        next_noise = started + noise_every / 2
        try:
            while time.monotonic() < end and daemon.poll() is None:
                now = time.monotonic()
                if now >= next_sample:
                    samples.append(sample(daemon.pid))
                    next_sample += SAMPLE_EVERY
                if now >= next_reload:
                    reloads += 1
                    _write(
                        config, config_text(server.url, f"sqlite:///{db_file}", reloads % 2 == 1)
                    )
                    daemon.send_signal(signal.SIGHUP)
                    next_reload += reload_every
                if now >= next_noise:
                    _noise(server.port)
                    next_noise += noise_every
                time.sleep(0.2)
            samples.append(sample(daemon.pid))
            say(f"soak: {minutes:g} min done; stopping the daemon")
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=90)
            log.close()
    section = Section("soak", "6. Soak", "python -m bench --soak", intro=prose(__doc__))
    _report(section, settings, started, samples, server.records, db_file, code, reloads)
    return section


def _report(
    section: Section,
    settings: Settings,
    started: float,
    samples: list[ProcSample],
    records: list[Record],
    db_file: Path,
    code: int,
    reloads: int,
) -> None:
    minutes = settings.soak_minutes
    warm = started + min(180.0, minutes * 60 * 0.2)
    after = [s for s in samples if s.at >= warm] or samples[-1:]
    base = after[0]
    # Descriptors and threads come and go with the pools: compare the highest count in the
    # first and in the last fifth after warm-up, so a leak shows and a busy moment does not.
    fifth = max(1, len(after) // 5)
    early, late = after[:fifth], after[-fifth:]
    growth = {
        "rss_mb": samples[-1].rss_mb - base.rss_mb,
        "rss_max_mb": max(s.rss_mb for s in after) - base.rss_mb,
        "fds": max(s.fds for s in late) - max(s.fds for s in early),
        "threads": max(s.threads for s in late) - max(s.threads for s in early),
        "fds_max": max(s.fds for s in samples),
        "threads_max": max(s.threads for s in samples),
    }
    step = max(1, round(60 / SAMPLE_EVERY))
    shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    section.table(
        ["minute", "RSS MB", "open fds", "threads"],
        [[(s.at - started) / 60, s.rss_mb, s.fds, s.threads] for s in shown],
        f"{minutes:g} minutes, {reloads} reloads; warm-up ends at minute "
        f"{(warm - started) / 60:.1f}",
    )
    books = _accounts(records, db_file)
    section.table(
        ["status", "answered by the simulator", "history rows with that status"],
        [
            [code_, books["server"].get(code_, 0), books["rows"].get(code_, 0)]
            for code_ in sorted(set(books["server"]) | set(books["rows"]))
        ],
        "every call te-scheduler made, as the simulator saw it and as history has it",
    )
    section.table(["outcome", "rows"], sorted(books["outcomes"].items()), "history rows by outcome")
    section.data = {
        "growth": growth,
        "books": {k: dict(v) if isinstance(v, Counter) else v for k, v in books.items()},
        "exit_code": code,
        "reloads": reloads,
        "samples": [[s.at - started, s.rss_mb, s.fds, s.threads] for s in samples],
    }
    section.ratio("RSS growth after warm-up / 10 MB", growth["rss_mb"] / TARGET_RSS_MB, "<= 1")
    section.target(
        "6. RSS growth after warm-up",
        f"< {TARGET_RSS_MB:g} MB",
        f"{fmt(growth['rss_mb'])} MB (max {fmt(growth['rss_max_mb'])})",
        growth["rss_mb"] < TARGET_RSS_MB,
    )
    section.target(
        "6. descriptor growth",
        "0",
        f"{growth['fds']} (highest {growth['fds_max']})",
        growth["fds"] <= 0,
    )
    section.target(
        "6. thread growth",
        "0",
        f"{growth['threads']} (highest {growth['threads_max']})",
        growth["threads"] <= 0,
    )
    matched = books["server"] == books["rows"] and books["pending"] == 0
    section.target(
        "6. every call in history", "all", _accounting_text(books), matched and not books["gaps"]
    )
    section.notes.append(
        f"The daemon exited {code} on SIGTERM. Growth of descriptors and threads: the highest "
        "count in the last fifth of the samples after warm-up minus the highest in the first "
        "fifth; memory: the last sample minus the first after warm-up."
    )


def _accounts(records: list[Record], db_file: Path) -> dict[str, Any]:
    """Calls per status as the simulator answered them and as history recorded them."""
    server = Counter(str(r[2]) for r in records if r[3])
    con = sqlite3.connect(db_file)
    try:
        rows = Counter(
            str(code)
            for (code,) in con.execute(
                "SELECT status_code FROM attempts WHERE status_code IS NOT NULL"
            )
        )
        outcomes = Counter(
            dict(con.execute("SELECT outcome, count(*) FROM attempts GROUP BY outcome").fetchall())
        )
        slots = con.execute(
            "SELECT job, test_id, scheduled_for FROM attempts WHERE job != 'soak-extra' "
            "GROUP BY job, test_id, scheduled_for ORDER BY job, test_id, scheduled_for"
        ).fetchall()
    finally:
        con.close()
    return {
        "server": server,
        "rows": rows,
        "outcomes": outcomes,
        "pending": outcomes.get("pending", 0),
        "gaps": _gaps(slots),
    }


def _gaps(slots: list[tuple[str, str, str]]) -> int:
    """Slots (one a second) missing between a test's first and last recorded slot."""
    gaps, previous = 0, None
    for job, test, text in slots:
        at = datetime.fromisoformat(text).timestamp()
        if previous and previous[0] == (job, test):
            gaps += max(0, round(at - previous[1]) - 1)
        previous = ((job, test), at)
    return gaps


def _accounting_text(books: dict[str, Any]) -> str:
    sent, recorded = sum(books["server"].values()), sum(books["rows"].values())
    return (
        f"{sent:,} calls answered, {recorded:,} rows with a status, "
        f"{books['pending']} pending, {books['gaps']} slot(s) without a row"
    )
