"""Scenario 5's separate processes: ``python -m bench.history_tool ACTION --db PATH ...``.

* ``generate --rows N``: fill a migrated SQLite file with N attempt rows over the last 90 days
  (500 job/test pairs, 100 jobs; 96% success, 2% 500, 2% 429), in one transaction with
  ``synchronous=OFF``, the secondary indexes (``stats``'s two of migration 0004 among them)
  dropped during the insert and rebuilt after (the schema ends as Alembic made it);
* ``query``, ``stats``, ``prune``: time te-scheduler's own ``history.query``/``stats``/``prune``
  (``stats`` as `te-scheduler stats --since 30d`: a third of the rows in its window);
* ``insert --rate R``: the daemon's writes (``start_attempt`` then ``finish_attempt``) at R a
  second until SIGTERM, each pair's latency recorded.

Each writes its JSON result to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

SPAN_DAYS = 90
PAIRS, TESTS_PER_JOB = 500, 5
CHUNK = 1_000_000
QUERY_JOB = "job-7"


def generate(path: Path, rows: int) -> dict[str, Any]:
    from scheduler.store import db

    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    engine.dispose()
    started = time.monotonic()
    con = sqlite3.connect(path, isolation_level=None)
    for pragma in (
        "journal_mode=OFF",
        "synchronous=OFF",
        "cache_size=-2000000",
        "temp_store=MEMORY",
    ):
        con.execute(f"PRAGMA {pragma}")
    indexes = con.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'attempts' "
        "AND sql IS NOT NULL"
    ).fetchall()
    end = int(time.time())
    con.execute("BEGIN")
    for name, _ in indexes:
        con.execute(f"DROP INDEX {name}")
    for offset in range(0, rows, CHUNK):
        con.execute(_insert_sql(offset, min(CHUNK, rows - offset), rows, end))
    for _, sql in indexes:
        con.execute(sql)
    con.execute("COMMIT")
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    return {
        "rows": rows,
        "seconds": time.monotonic() - started,
        "bytes": path.stat().st_size,
        "end": end,
    }


def _insert_sql(offset: int, count: int, total: int, end: int) -> str:
    """INSERT ... SELECT over a recursive CTE: row i starts at i * span / total after start."""
    span = SPAN_DAYS * 86400
    start = end - span
    # SQLAlchemy stores SQLite times as 'YYYY-MM-DD HH:MM:SS.ffffff'; match it exactly.
    stamp = (
        f"printf('%s.%06d', datetime({start} + (i * {span} / {total}), 'unixepoch'), "
        f"(i * {span} % {total}) * 1000000 / {total})"
    )
    failure = "i % 50 = 7"
    limited = "i % 50 = 13"
    return f"""
WITH RECURSIVE c(i) AS (SELECT {offset} UNION ALL SELECT i + 1 FROM c WHERE i < {offset + count - 1}),
r(i, ts) AS (SELECT i, {stamp} FROM c)
INSERT INTO attempts (run_id, job, test_id, aid, "trigger", scheduled_for, attempt, started_at,
                      finished_at, status_code, outcome, error, duration_ms, instance)
SELECT printf('%032x', i), 'job-' || ((i % {PAIRS}) / {TESTS_PER_JOB}),
       CAST(100000 + (i % {PAIRS}) AS TEXT), NULL, 'schedule', ts, 1, ts, ts,
       CASE WHEN {failure} THEN 500 WHEN {limited} THEN 429 ELSE 200 END,
       CASE WHEN {failure} THEN 'http_error' WHEN {limited} THEN 'rate_limited' ELSE 'success' END,
       CASE WHEN {failure} THEN 'Internal Server Error: Simulated failure' END,
       40 + (i * 7919) % 400, 'bench-host:4242'
FROM r"""  # noqa: E501


def _engine(path: Path) -> Any:
    from scheduler.store import db

    return db.make_engine(f"sqlite:///{path}")


def query(path: Path, repeat: int) -> dict[str, Any]:
    from scheduler import clock
    from scheduler.store import history

    engine = _engine(path)
    times, found = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        rows = history.query(engine, job=QUERY_JOB, since=clock.now() - timedelta(days=7))
        times.append((time.perf_counter() - started) * 1000)
        found = len(rows)
    return {"ms": times, "rows": found}


def stats(path: Path) -> dict[str, Any]:
    from scheduler import clock
    from scheduler.store import history

    engine = _engine(path)
    started = time.perf_counter()
    groups = history.stats(engine, since=clock.now() - timedelta(days=30))
    return {"seconds": time.perf_counter() - started, "groups": len(groups)}


def prune(path: Path, before: str) -> dict[str, Any]:
    from scheduler.store import history

    engine = _engine(path)
    started = time.perf_counter()
    deleted = history.prune(engine, before=datetime.fromisoformat(before))
    return {"seconds": time.perf_counter() - started, "deleted": deleted}


def insert(path: Path, rate: float, out: Path) -> None:
    """Write like the daemon until SIGTERM; then save [epoch, ms] per start+finish pair."""
    from scheduler import clock
    from scheduler.store import history

    engine = _engine(path)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    samples: list[list[float]] = []
    base = datetime.now(timezone.utc).replace(microsecond=0)
    i = 0
    next_at = time.monotonic()
    while not stop.is_set():
        i += 1
        key = history.AttemptKey(
            f"live{i:028d}",
            "bench-live",
            "1",
            None,
            "schedule",
            base + timedelta(seconds=i),
            1,
            "bench-live:1",
        )
        started = time.perf_counter()
        row = history.start_attempt(engine, key, clock.now())
        if row is not None:
            history.finish_attempt(
                engine,
                row,
                finished_at=clock.now(),
                outcome="success",
                status_code=200,
                error=None,
                duration_ms=5,
            )
        samples.append([time.time(), (time.perf_counter() - started) * 1000])
        next_at += 1 / rate
        stop.wait(max(0.0, next_at - time.monotonic()))
    out.write_text(json.dumps(samples))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.history_tool")
    parser.add_argument("action", choices=("generate", "query", "stats", "prune", "insert"))
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rows", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--before", default="")
    parser.add_argument("--rate", type=float, default=50.0)
    args = parser.parse_args()
    if args.action == "insert":
        insert(args.db, args.rate, args.out)
        return
    result = {
        "generate": lambda: generate(args.db, args.rows),
        "query": lambda: query(args.db, args.repeat),
        "stats": lambda: stats(args.db),
        "prune": lambda: prune(args.db, args.before),
    }[args.action]()
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
