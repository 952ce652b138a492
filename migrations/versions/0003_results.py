"""Results of each rerun (SPEC section 7): ``attempts.results``, ``results`` and ``followups``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the column (batch mode rebuilds the table on SQLite) and the two tables."""
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("results", sa.String(16), nullable=True))
        batch.create_index("ix_attempts_results", ["results"])
    op.create_table(
        "results",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("attempt_id", sa.Integer(), nullable=False),
        sa.Column("job", sa.String(100), nullable=False),
        sa.Column("test_id", sa.String(32), nullable=False),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("round_id", sa.BigInteger(), nullable=False),
        sa.Column("agent_id", sa.String(32), nullable=False),
        sa.Column("agent_name", sa.String(200), nullable=True),
        sa.Column("date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("response_code", sa.Integer(), nullable=True),
        sa.Column("data", sa.Text(), nullable=True),
        sa.Column("app_link", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["attempt_id"], ["attempts.id"], name="fk_results_attempt", ondelete="CASCADE"
        ),
        sa.UniqueConstraint(
            "attempt_id", "endpoint", "round_id", "agent_id", name="uq_results_attempt_agent"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_results_job_round_id", "results", ["job", "round_id"])
    op.create_index("ix_results_test_id_round_id", "results", ["test_id", "round_id"])
    op.create_index("ix_results_round_id", "results", ["round_id"])
    op.create_table(
        "followups",
        sa.Column("attempt_id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_read_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reads", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("agents", sa.Text(), nullable=True),
        sa.Column("agents_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("endpoint", sa.String(32), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["attempt_id"], ["attempts.id"], name="fk_followups_attempt", ondelete="CASCADE"
        ),
    )


def downgrade() -> None:
    """Drop the two tables and the column; the attempts themselves are untouched."""
    op.drop_table("followups")
    op.drop_index("ix_results_round_id", table_name="results")
    op.drop_index("ix_results_test_id_round_id", table_name="results")
    op.drop_index("ix_results_job_round_id", table_name="results")
    op.drop_table("results")
    with op.batch_alter_table("attempts") as batch:
        batch.drop_index("ix_attempts_results")
        batch.drop_column("results")
