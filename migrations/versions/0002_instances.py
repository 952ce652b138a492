"""Several instances on one database: their heartbeats and their shared rate-limit state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``instances`` (one row per daemon) and ``rate_limits`` (per token and bucket)."""
    op.create_table(
        "instances",
        sa.Column("instance", sa.String(200), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "rate_limits",
        sa.Column("token_key", sa.String(64), primary_key=True),
        sa.Column("bucket", sa.String(32), primary_key=True),
        sa.Column("remaining", sa.Integer(), nullable=True),
        sa.Column("reset", sa.Double(), nullable=True),
        sa.Column("paused_until", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=False),
    )


def downgrade() -> None:
    """Drop both tables; ``attempts`` is untouched."""
    op.drop_table("rate_limits")
    op.drop_table("instances")
