"""Each instance keeps the latest wall-clock jump it noticed, for ``te-scheduler status``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``instances.last_clock_jump`` (null until a jump is noticed)."""
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("last_clock_jump", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop ``instances.last_clock_jump``."""
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("last_clock_jump")
