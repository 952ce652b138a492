"""``python -m bench.history_writes [N] [--postgres]``: start+finish pairs per second, two ways.

Every attempt writes twice: the 'pending' row (INSERT unless its firing key is taken), then
its completion (UPDATE by id). This times N such pairs on a migrated SQLite file (and on a
throwaway PostgreSQL cluster with ``--postgres``, started as tests/postgres.py starts one):

* ``history``: ``history.start_attempt`` + ``history.finish_attempt``, the daemon's path;
* ``core``: the same two writes built through SQLAlchemy Core each time (a write transaction,
  INSERT in a savepoint that the unique key may refuse, then the UPDATE), the way they were
  written before scheduler.store.writes.

Prints the mean milliseconds per pair and pairs per second, best of three rounds.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from scheduler.store import db, history
from scheduler.store.db import write_transaction
from scheduler.store.tables import attempts

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
ROUNDS = 3
Pair = Callable[[sa.Engine, history.AttemptKey], None]


def key(n: int) -> history.AttemptKey:
    return history.AttemptKey(
        run_id=f"run-{n}",
        job="bench",
        test_id="105",
        aid=None,
        trigger="schedule",
        scheduled_for=T0 + timedelta(minutes=n),
        attempt=1,
        instance="bench:1",
    )


def through_history(engine: sa.Engine, k: history.AttemptKey) -> None:
    row_id = history.start_attempt(engine, k, T0)
    assert row_id is not None
    history.finish_attempt(
        engine,
        row_id,
        finished_at=T0,
        outcome="success",
        status_code=201,
        error=None,
        duration_ms=12,
    )


def through_core(engine: sa.Engine, k: history.AttemptKey) -> None:
    values: dict[str, Any] = {
        **{name: getattr(k, name) for name in history._KEY_FIELDS},
        "started_at": T0,
        "finished_at": None,
        "outcome": "pending",
        "error": None,
    }
    with write_transaction(engine) as conn:
        with conn.begin_nested():
            result = conn.execute(sa.insert(attempts).values(values))
        row_id = result.inserted_primary_key[0]  # type: ignore[index]
    done = {
        "finished_at": T0,
        "outcome": "success",
        "status_code": 201,
        "error": None,
        "duration_ms": 12,
    }
    with write_transaction(engine) as conn:
        conn.execute(sa.update(attempts).where(attempts.c.id == row_id).values(done))


def per_pair(url: str, pair: Pair, n: int) -> float:
    """Milliseconds per start+finish pair: the best round of ``n`` pairs on a fresh database."""
    engine = db.make_engine(url)
    try:
        db.upgrade(engine)
        best = float("inf")
        for round_ in range(ROUNDS):
            started = time.perf_counter()
            for i in range(n):
                pair(engine, key(round_ * n + i))
            best = min(best, (time.perf_counter() - started) / n * 1000)
        return best
    finally:
        engine.dispose()


def compare(label: str, urls: Callable[[str], str], n: int) -> None:
    for name, pair in (("history", through_history), ("core", through_core)):
        ms = per_pair(urls(name), pair, n)
        print(f"{label:10} {name:8} {ms:.3f} ms per start+finish ({1000 / ms:,.0f}/s)")


def main(argv: list[str]) -> None:
    n = next((int(arg) for arg in argv if arg.isdigit()), 2000)
    with tempfile.TemporaryDirectory() as tmp:
        compare("sqlite", lambda name: f"sqlite:///{Path(tmp) / name}.db", n)
    if "--postgres" in argv:
        from tests.postgres import LocalCluster, find_bin_dir

        bin_dir = find_bin_dir()
        if bin_dir is None:
            sys.exit("no PostgreSQL here (run .ci/ensure-postgres)")
        cluster = LocalCluster(bin_dir)
        try:
            server = cluster.start()
            compare("postgresql", lambda name: server.url(server.create_database()), n)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
