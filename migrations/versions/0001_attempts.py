"""The attempts table: one row per HTTP attempt (SPEC.md section 4).

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``attempts`` with its firing key and the indexes history/stats/prune use."""
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("job", sa.String(100), nullable=False),
        sa.Column("test_id", sa.String(32), nullable=False),
        sa.Column("aid", sa.String(32), nullable=True),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("instance", sa.String(200), nullable=False),
        sa.UniqueConstraint(
            "job", "test_id", "scheduled_for", "attempt", name="uq_attempts_firing"
        ),
        # Ids are never reused on SQLite, so "newest first" can break ties by id.
        sqlite_autoincrement=True,
    )
    op.create_index("ix_attempts_job_started_at", "attempts", ["job", "started_at"])
    op.create_index("ix_attempts_test_id_started_at", "attempts", ["test_id", "started_at"])
    op.create_index("ix_attempts_started_at", "attempts", ["started_at"])
    op.create_index("ix_attempts_outcome", "attempts", ["outcome"])


def downgrade() -> None:
    """Drop ``attempts`` and everything recorded in it."""
    op.drop_index("ix_attempts_outcome", table_name="attempts")
    op.drop_index("ix_attempts_started_at", table_name="attempts")
    op.drop_index("ix_attempts_test_id_started_at", table_name="attempts")
    op.drop_index("ix_attempts_job_started_at", table_name="attempts")
    op.drop_table("attempts")
