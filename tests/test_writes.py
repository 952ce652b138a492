"""The attempts writes (scheduler.store.writes), checked against Core on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from scheduler.errors import DatabaseError
from scheduler.store import db, history
from scheduler.store.history import AttemptKey
from scheduler.store.tables import FIRING_KEY, attempts
from scheduler.store.writes import PreparedWrites, prepared_writes
from tests.postgres import any_engine, postgres_server, postgres_url  # noqa: F401

T0 = datetime(2026, 3, 29, 0, 59, 59, 999999, tzinfo=timezone.utc)


@pytest.fixture
def engine(any_engine: sa.Engine) -> sa.Engine:  # noqa: F811
    """The tests below run on SQLite and on PostgreSQL."""
    return any_engine


def key(n: int, **changes: Any) -> AttemptKey:
    values: dict[str, Any] = {
        "run_id": f"run-{n}",
        "job": "dns 'quoted' \"job\"",
        "test_id": "105",
        "aid": None,
        "trigger": "schedule",
        "scheduled_for": T0,
        "attempt": n,
        "instance": "host:1",
    }
    values.update(changes)
    return AttemptKey(**values)


def raw_rows(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """Every row as the driver returns it (no SQLAlchemy type conversion), by id."""
    with engine.connect() as conn:
        return [tuple(row) for row in conn.exec_driver_sql("SELECT * FROM attempts ORDER BY id")]


def test_a_row_written_by_the_prepared_path_is_the_row_core_writes(engine: sa.Engine) -> None:
    # Core writes no attempts row in the product any more; here it is the reference the
    # hand-written SQL and bind conversions must match byte for byte (the firing key's
    # uniqueness depends on scheduled_for being stored the same way every time).
    berlin = T0.astimezone(timezone(timedelta(hours=2)))
    values = {
        "run_id": "r",
        "job": "dns",
        "test_id": "105",
        "aid": "7",
        "trigger": "manual",
        "scheduled_for": berlin,
        "attempt": 1,
        "started_at": berlin,
        "finished_at": None,
        "status_code": None,
        "outcome": "pending",
        "error": None,
        "duration_ms": None,
        "instance": "h:1",
    }
    with engine.begin() as conn:  # Core, the reference
        conn.execute(sa.insert(attempts).values(values))
    prepared = prepared_writes(engine, attempts, conflict_key=FIRING_KEY)
    new_id = prepared.insert({**values, "attempt": 2})
    core_row, our_row = raw_rows(engine)
    assert our_row[0] == new_id
    assert our_row[1:7] + our_row[8:] == core_row[1:7] + core_row[8:]  # all but id and attempt
    assert (core_row[7], our_row[7]) == (1, 2)

    finished = {
        "finished_at": berlin,
        "outcome": "success",
        "status_code": 200,
        "error": "é\n'",
        "duration_ms": 12,
    }
    assert prepared.finish(finished, new_id) == 1
    with engine.begin() as conn:
        conn.execute(sa.update(attempts).where(attempts.c.id == core_row[0]).values(finished))
    core_row, our_row = raw_rows(engine)
    assert our_row[8:] == core_row[8:]


def test_start_and_finish_through_history_claim_once_and_complete(engine: sa.Engine) -> None:
    first = history.start_attempt(engine, key(1), T0)
    assert first is not None
    assert history.start_attempt(engine, key(1, run_id="other", instance="host:2"), T0) is None
    history.finish_attempt(
        engine,
        first,
        finished_at=T0 + timedelta(seconds=1),
        outcome="http_error",
        status_code=503,
        error="busy",
        duration_ms=40,
    )
    [row] = history.query(engine)
    assert (row["id"], row["run_id"], row["outcome"], row["status_code"], row["error"]) == (
        first,
        "run-1",
        "http_error",
        503,
        "busy",
    )
    assert row["scheduled_for"] == T0 and row["finished_at"] == T0 + timedelta(seconds=1)


def test_history_writes_attempts_only_through_the_prepared_statements(
    engine: sa.Engine,
) -> None:
    # One write path: start, finish and record never build a Core statement, which would
    # show up as a Core execution on the engine.
    core: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *args: core.append(args[2]))
    first = history.start_attempt(engine, key(1), T0)
    assert first is not None
    history.finish_attempt(
        engine,
        first,
        finished_at=T0,
        outcome="success",
        status_code=201,
        error=None,
        duration_ms=3,
    )
    history.record_attempt(engine, key(2), started_at=T0, outcome="skipped", error="paused")
    assert core == []
    assert [(r["attempt"], r["outcome"]) for r in history.query(engine)] == [
        (2, "skipped"),
        (1, "success"),
    ]


def test_a_database_without_the_prepared_statements_is_refused() -> None:
    mysql = sa.create_mock_engine("mysql://", lambda *args, **kwargs: None)
    with pytest.raises(ValueError, match="history writes support sqlite and postgresql, not mysql"):
        PreparedWrites(mysql, attempts, FIRING_KEY)  # type: ignore[arg-type]


def test_a_naive_time_is_refused_before_reaching_the_database(engine: sa.Engine) -> None:
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        history.start_attempt(engine, key(1), datetime(2026, 3, 29, 1, 0))
    assert raw_rows(engine) == []


def test_an_unmigrated_database_is_a_one_line_database_error(tmp_path: Path) -> None:
    eng = db.make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        with pytest.raises(DatabaseError, match=r"is not migrated .*te-scheduler db upgrade"):
            history.start_attempt(eng, key(1), T0)
    finally:
        eng.dispose()


def test_writes_survive_the_server_closing_the_pooled_connections(
    postgres_url: str,  # noqa: F811
) -> None:
    # A PostgreSQL restart or an idle-session killer: the pool's pre-ping replaces the dead
    # connection on checkout, for the prepared path as for Core.
    eng = db.make_engine(postgres_url)
    db.upgrade(eng)
    try:
        assert history.start_attempt(eng, key(1), T0) is not None
        admin = sa.create_engine(eng.url, poolclass=sa.NullPool)
        with admin.connect() as conn:  # kill every other session: the pooled one included
            killed = conn.exec_driver_sql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).scalar()
            conn.commit()
        assert killed >= 1
        assert history.start_attempt(eng, key(2), T0) is not None
        assert [r["attempt"] for r in history.query(eng)] == [2, 1]
    finally:
        eng.dispose()
