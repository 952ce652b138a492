"""`stats` at size (issue 13): a covering index of each test's window and a partial index.

``ix_attempts_stats`` lets ``history.stats`` walk one test's window in the index alone
(durations and outcomes included); ``ix_attempts_unusual`` holds only the finished rows that
are not a first-attempt success, the few whose firing needs a closer look. On a large SQLite file
building them reads the table once (about a minute at ten million rows).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As scheduler.store.tables.UNUSUAL, copied: a migration must not change when the code does.
_UNUSUAL = "outcome NOT IN ('success', 'pending') OR attempt > 1 OR status_code = 429"


def upgrade() -> None:
    """Create the two indexes; the rows are untouched."""
    op.create_index(
        "ix_attempts_stats",
        "attempts",
        ["job", "test_id", "started_at", "duration_ms", "outcome"],
    )
    op.create_index(
        "ix_attempts_unusual",
        "attempts",
        ["job", "test_id", "started_at", "outcome", "attempt", "status_code", "scheduled_for"],
        sqlite_where=sa.text(_UNUSUAL),
        postgresql_where=sa.text(_UNUSUAL),
    )


def downgrade() -> None:
    """Drop the two indexes."""
    op.drop_index("ix_attempts_unusual", table_name="attempts")
    op.drop_index("ix_attempts_stats", table_name="attempts")
