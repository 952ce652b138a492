"""The history schema: ``attempts`` (SPEC.md section 4), ``instances`` and ``rate_limits``.

Alembic compares ``metadata`` with the migrations; scheduler.store.history and
scheduler.store.instances read and write these tables.
"""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa

# What identifies one attempt of one firing: claiming a firing is inserting its first row.
FIRING_KEY = ("job", "test_id", "scheduled_for", "attempt")

# The rows `stats` must look at one by one (history.stats): not a first-attempt success.
# Pending rows are left out: each attempt would enter and leave the index (`stats` counts
# the few pending rows by ix_attempts_outcome). SQL text, so a query repeating it word for
# word may use the partial index built on it.
UNUSUAL = "outcome NOT IN ('success', 'pending') OR attempt > 1 OR status_code = 429"


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in and out: naive UTC text on SQLite, ``timestamptz`` elsewhere."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: history times must be timezone-aware")
        value = value.astimezone(timezone.utc)
        # SQLite has no time zones: store UTC wall time so sqlite3 shows readable UTC.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


metadata = sa.MetaData()

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(36), nullable=False),
    sa.Column("job", sa.String(100), nullable=False),
    sa.Column("test_id", sa.String(32), nullable=False),
    sa.Column("aid", sa.String(32), nullable=True),
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("scheduled_for", UTCDateTime(), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("duration_ms", sa.Integer, nullable=True),
    sa.Column("instance", sa.String(200), nullable=False),
    # results: SPEC section 7 (null: not fetched; waiting, complete, partial, none, ...)
    sa.Column("results", sa.String(16), nullable=True),
    # Claiming a firing = inserting its first row; this key makes that happen once.
    sa.UniqueConstraint(*FIRING_KEY, name="uq_attempts_firing"),
    sa.Index("ix_attempts_job_started_at", "job", "started_at"),
    sa.Index("ix_attempts_test_id_started_at", "test_id", "started_at"),
    sa.Index("ix_attempts_started_at", "started_at"),
    sa.Index("ix_attempts_outcome", "outcome"),
    # `stats` (migration 0004): every row of a test's window, index only; the unusual few.
    sa.Index("ix_attempts_stats", "job", "test_id", "started_at", "duration_ms", "outcome"),
    sa.Index(
        "ix_attempts_unusual",
        "job",
        "test_id",
        "started_at",
        "outcome",
        "attempt",
        "status_code",
        "scheduled_for",
        sqlite_where=sa.text(UNUSUAL),
        postgresql_where=sa.text(UNUSUAL),
    ),
    sqlite_autoincrement=True,
)


# Every daemon sharing the database, for liveness (heartbeats) and `te-scheduler status`.
instances = sa.Table(
    "instances",
    metadata,
    sa.Column("instance", sa.String(200), primary_key=True),  # host:pid, as in attempts
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
    sa.Column("stopped_at", UTCDateTime(), nullable=True),  # null while running
    # The latest wall-clock jump it noticed, in words ("the wall clock stepped back by ...").
    sa.Column("last_clock_jump", sa.Text, nullable=True),
)

# The server's rate-limit windows as last seen by any instance, per token and bucket.
rate_limits = sa.Table(
    "rate_limits",
    metadata,
    sa.Column("token_key", sa.String(64), primary_key=True),  # SHA-256 prefix, never the token
    sa.Column("bucket", sa.String(32), primary_key=True),
    sa.Column("remaining", sa.Integer, nullable=True),
    sa.Column("reset", sa.Double, nullable=True),  # Unix seconds, as the Reset headers
    sa.Column("paused_until", sa.Double, nullable=True),  # Unix seconds
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("updated_by", sa.String(200), nullable=False),
)
