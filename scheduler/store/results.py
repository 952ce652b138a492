"""The ``results`` table of SPEC section 7 and the follow-up state that fills it.

A follow-up is an accepted run whose ``attempts.results`` is ``waiting``. Its reading state
(who reads it, when next, what it saw) lives in ``followups``, one row per follow-up, so a
restart or a surviving instance carries it on. Ownership changes only by a conditional
write: the first ``followups`` row is inserted once (its primary key), and a dead owner's row
is taken over by ``UPDATE ... WHERE owner = <the dead one>``, which one instance wins.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from scheduler.store.db import translate_errors, write_transaction
from scheduler.store.tables import UTCDateTime, attempts, metadata

log = logging.getLogger(__name__)

STATES = ("waiting", "complete", "partial", "none", "unknown-type", "error")
DATA_CAP = 16 * 1024  # characters of a result's JSON kept in ``data``

results = sa.Table(
    "results",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "attempt_id",
        sa.Integer,
        sa.ForeignKey("attempts.id", ondelete="CASCADE", name="fk_results_attempt"),
        nullable=False,
    ),
    sa.Column("job", sa.String(100), nullable=False),
    sa.Column("test_id", sa.String(32), nullable=False),
    sa.Column("endpoint", sa.String(32), nullable=False),
    sa.Column("round_id", sa.BigInteger, nullable=False),
    sa.Column("agent_id", sa.String(32), nullable=False),
    sa.Column("agent_name", sa.String(200), nullable=True),
    sa.Column("date", UTCDateTime(), nullable=True),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("loss", sa.Float, nullable=True),
    sa.Column("latency_ms", sa.Float, nullable=True),
    sa.Column("response_code", sa.Integer, nullable=True),
    sa.Column("data", sa.Text, nullable=True),
    sa.Column("app_link", sa.Text, nullable=True),
    sa.UniqueConstraint(
        "attempt_id", "endpoint", "round_id", "agent_id", name="uq_results_attempt_agent"
    ),
    sa.Index("ix_results_job_round_id", "job", "round_id"),
    sa.Index("ix_results_test_id_round_id", "test_id", "round_id"),
    sa.Index("ix_results_round_id", "round_id"),
    sqlite_autoincrement=True,
)

# Reading state of each follow-up; the row stays after it ends (reads, for the cost figures).
followups = sa.Table(
    "followups",
    metadata,
    sa.Column(
        "attempt_id",
        sa.Integer,
        sa.ForeignKey("attempts.id", ondelete="CASCADE", name="fk_followups_attempt"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("deadline", UTCDateTime(), nullable=False),
    sa.Column("next_read_at", UTCDateTime(), nullable=False),
    sa.Column("reads", sa.Integer, nullable=False),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("agents", sa.Text, nullable=True),  # JSON list of the last read's agent ids
    sa.Column("agents_at", UTCDateTime(), nullable=True),  # when that set was first seen
    sa.Column("endpoint", sa.String(32), nullable=True),
    sa.Column("note", sa.Text, nullable=True),  # why it ended, or the last failed read
)

# Waiting follow-ups are few among millions of rows: the reader finds them by this index.
sa.Index("ix_attempts_results", attempts.c.results)


@dataclass(frozen=True)
class Followup:
    """A waiting follow-up as the reader sees it (``owner`` None: nobody claimed it yet)."""

    attempt_id: int
    job: str
    test_id: str
    aid: str | None
    instance: str  # who made the run call
    sent_at: datetime  # T0: when the accepted call was sent
    owner: str | None = None
    deadline: datetime | None = None
    next_read_at: datetime | None = None
    reads: int = 0
    failures: int = 0
    agents: tuple[str, ...] | None = None
    agents_at: datetime | None = None
    endpoint: str | None = None


@dataclass(frozen=True)
class AgentRow:
    """One agent's result of the run's round, as the ``results`` table keeps it."""

    round_id: int
    agent_id: str
    agent_name: str | None
    date: datetime | None
    ok: bool
    error: str | None
    loss: float | None
    latency_ms: float | None
    response_code: int | None
    data: str | None
    app_link: str | None


def waiting(engine: Engine) -> list[Followup]:
    """Every follow-up still ``waiting``, with its reading state when it has one."""
    a, f = attempts.c, followups.c
    stmt = (
        sa.select(
            a.id, a.job, a.test_id, a.aid, a.instance, a.finished_at, a.duration_ms, followups
        )
        .select_from(attempts.outerjoin(followups, f.attempt_id == a.id))
        .where(a.results == "waiting")
        .order_by(a.id)
    )
    with translate_errors(engine, "reading follow-ups"), engine.connect() as conn:
        return [_followup(row._mapping) for row in conn.execute(stmt)]


def _followup(row: Any) -> Followup:
    sent = row["finished_at"] - timedelta(milliseconds=row["duration_ms"] or 0)
    agents = json.loads(row["agents"]) if row["agents"] else None
    return Followup(
        attempt_id=row["id"],
        job=row["job"],
        test_id=row["test_id"],
        aid=row["aid"],
        instance=row["instance"],
        sent_at=sent,
        owner=row["owner"],
        deadline=row["deadline"],
        next_read_at=row["next_read_at"],
        reads=row["reads"] or 0,
        failures=row["failures"] or 0,
        agents=tuple(agents) if agents is not None else None,
        agents_at=row["agents_at"],
        endpoint=row["endpoint"],
    )


def claim(engine: Engine, item: Followup, me: str, deadline: datetime, first: datetime) -> bool:
    """Make ``me`` the reader of an unclaimed follow-up; False when another got there first."""
    values = {
        "attempt_id": item.attempt_id,
        "owner": me,
        "deadline": deadline,
        "next_read_at": first,
        "reads": 0,
        "failures": 0,
    }
    with translate_errors(engine, "claiming a follow-up"), write_transaction(engine) as conn:
        try:
            with conn.begin_nested():
                conn.execute(sa.insert(followups).values(values))
            return True
        except sa.exc.IntegrityError:
            return False


def take_over(engine: Engine, attempt_id: int, dead: str, me: str) -> bool:
    """Take a dead owner's follow-up; exactly one instance's UPDATE finds ``dead`` there."""
    stmt = (
        sa.update(followups)
        .where(followups.c.attempt_id == attempt_id, followups.c.owner == dead)
        .values(owner=me)
    )
    with translate_errors(engine, "taking over a follow-up"), write_transaction(engine) as conn:
        return bool(conn.execute(stmt).rowcount)


def save(engine: Engine, attempt_id: int, me: str, **values: Any) -> bool:
    """Update ``me``'s follow-up state (``agents`` as a list); False when no longer ours."""
    if "agents" in values and values["agents"] is not None:
        values["agents"] = json.dumps(list(values["agents"]))
    stmt = (
        sa.update(followups)
        .where(followups.c.attempt_id == attempt_id, followups.c.owner == me)
        .values(**values)
    )
    with translate_errors(engine, "saving a follow-up"), write_transaction(engine) as conn:
        return bool(conn.execute(stmt).rowcount)


def store_round(engine: Engine, item: Followup, endpoint: str, rows: Sequence[AgentRow]) -> None:
    """Keep ``rows`` (one round) for ``item``: rows of any other round or endpoint go."""
    r = results.c
    with translate_errors(engine, "writing results"), write_transaction(engine) as conn:
        if rows:
            conn.execute(
                sa.delete(results).where(
                    r.attempt_id == item.attempt_id,
                    sa.or_(r.round_id != rows[0].round_id, r.endpoint != endpoint),
                )
            )
        have = set(conn.scalars(sa.select(r.agent_id).where(r.attempt_id == item.attempt_id)).all())
        new = [_values(item, endpoint, row) for row in rows if row.agent_id not in have]
        if new:
            conn.execute(sa.insert(results), new)


def _values(item: Followup, endpoint: str, row: AgentRow) -> dict[str, Any]:
    return {
        "attempt_id": item.attempt_id,
        "job": item.job,
        "test_id": item.test_id,
        "endpoint": endpoint,
        **{name: getattr(row, name) for name in AgentRow.__dataclass_fields__},
    }


def end(engine: Engine, attempt_id: int, me: str, state: str, note: str | None) -> bool:
    """Set ``attempts.results`` to ``state`` if ``me`` still owns the follow-up."""
    if state not in STATES[1:]:
        raise ValueError(f"results state {state!r} is not one of {', '.join(STATES[1:])}")
    owned = sa.exists().where(followups.c.attempt_id == attempt_id, followups.c.owner == me)
    stmt = (
        sa.update(attempts)
        .where(attempts.c.id == attempt_id, attempts.c.results == "waiting", owned)
        .values(results=state)
    )
    with translate_errors(engine, "ending a follow-up"), write_transaction(engine) as conn:
        done = bool(conn.execute(stmt).rowcount)
        if done:
            conn.execute(
                sa.update(followups)
                .where(followups.c.attempt_id == attempt_id)
                .values(note=(note or "")[:300] or None)
            )
        return done


def count_rows(engine: Engine, attempt_id: int) -> int:
    """How many agent rows a follow-up has kept."""
    stmt = sa.select(sa.func.count()).where(results.c.attempt_id == attempt_id)
    with translate_errors(engine, "reading results"), engine.connect() as conn:
        return int(conn.scalar(stmt) or 0)


def first_error(engine: Engine, attempt_id: int) -> str | None:
    """``agent name: error`` of the first agent not ok in a follow-up's rows, if any."""
    r = results.c
    stmt = (
        sa.select(r.agent_name, r.agent_id, r.error)
        .where(r.attempt_id == attempt_id, sa.not_(r.ok))
        .order_by(r.agent_id)
        .limit(1)
    )
    with translate_errors(engine, "reading results"), engine.connect() as conn:
        row = conn.execute(stmt).first()
    if row is None:
        return None
    return f"{row.agent_name or row.agent_id}: {row.error or 'not ok'}"


def later_run(engine: Engine, item: Followup) -> datetime | None:
    """T1: when the next accepted run of the same test (and aid) after ``item`` was sent."""
    a = attempts.c
    stmt = (
        sa.select(a.finished_at, a.duration_ms)
        .where(
            a.test_id == item.test_id,
            a.aid.is_(None) if item.aid is None else a.aid == item.aid,
            a.outcome == "success",
            a.id != item.attempt_id,
            a.finished_at > item.sent_at,
        )
        .order_by(a.finished_at)
        .limit(5)
    )
    with translate_errors(engine, "reading history"), engine.connect() as conn:
        sent = [f - timedelta(milliseconds=d or 0) for f, d in conn.execute(stmt)]
    later = [moment for moment in sent if moment > item.sent_at]
    return min(later) if later else None


def known_agents(engine: Engine, test_id: str, endpoint: str) -> frozenset[str] | None:
    """The agents of the test's latest ``complete`` round: its known agent set, if any."""
    a, r = attempts.c, results.c
    latest = (
        sa.select(sa.func.max(r.attempt_id))
        .select_from(results.join(attempts, a.id == r.attempt_id))
        .where(r.test_id == test_id, r.endpoint == endpoint, a.results == "complete")
        .scalar_subquery()
    )
    stmt = sa.select(r.agent_id).where(r.attempt_id == latest)
    with translate_errors(engine, "reading results"), engine.connect() as conn:
        agents = frozenset(conn.scalars(stmt).all())
    return agents or None


def query(
    engine: Engine,
    *,
    job: str | None = None,
    test_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = 100,
) -> list[dict[str, Any]]:
    """``results`` rows keyed by column, newest round first; ``limit`` None or 0: all."""
    r = results.c
    stmt = sa.select(results).order_by(r.round_id.desc(), r.id.desc())
    for column, value in ((r.job, job), (r.test_id, test_id)):
        if value is not None:
            stmt = stmt.where(column == value)
    if since is not None:
        stmt = stmt.where(r.round_id >= int(since.timestamp()))
    if until is not None:
        stmt = stmt.where(r.round_id < int(until.timestamp()))
    if limit:
        stmt = stmt.limit(limit)
    with translate_errors(engine, "reading results"), engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(stmt)]


def summaries(engine: Engine, attempt_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Per attempt id: agents, agents ok and the median latency of its kept rows."""
    ids = sorted(set(attempt_ids))
    found: dict[int, dict[str, Any]] = {}
    r = results.c
    for start in range(0, len(ids), 500):
        stmt = sa.select(r.attempt_id, r.ok, r.latency_ms).where(
            r.attempt_id.in_(ids[start : start + 500])
        )
        with translate_errors(engine, "reading results"), engine.connect() as conn:
            for attempt_id, ok, latency in conn.execute(stmt):
                entry = found.setdefault(attempt_id, {"agents": 0, "ok": 0, "latency": []})
                entry["agents"] += 1
                entry["ok"] += bool(ok)
                if latency is not None:
                    entry["latency"].append(latency)
    for entry in found.values():
        values = sorted(entry.pop("latency"))
        entry["latency_ms"] = values[(len(values) - 1) // 2] if values else None
    return found


def summary_text(state: str | None, summary: dict[str, Any] | None, wait: str = "") -> str | None:
    """``3/3 ok, 41 ms``, ``waiting``, ``none after 5m``: one follow-up for a table cell."""
    if state is None:
        return None
    if state in ("complete", "partial") and summary:
        text = f"{summary['ok']}/{summary['agents']} ok"
        if summary["latency_ms"] is not None:
            text += f", {summary['latency_ms']:.0f} ms"
        return text if state == "complete" else f"{text} (partial)"
    if state == "none":
        return f"none after {wait}" if wait else "none"
    return state


def deadlines(engine: Engine, attempt_ids: Iterable[int]) -> dict[int, datetime]:
    """Per attempt id with a follow-up: when its wait ended (or ends)."""
    ids = sorted(set(attempt_ids))
    found: dict[int, datetime] = {}
    f = followups.c
    for start in range(0, len(ids), 500):
        stmt = sa.select(f.attempt_id, f.deadline).where(f.attempt_id.in_(ids[start : start + 500]))
        with translate_errors(engine, "reading follow-ups"), engine.connect() as conn:
            found.update({attempt_id: deadline for attempt_id, deadline in conn.execute(stmt)})
    return found
