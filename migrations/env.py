"""Alembic environment: migrates the connection scheduler.store.db puts in config.attributes."""

from __future__ import annotations

from alembic import context

import scheduler.store.results  # noqa: F401  (its tables join the metadata below)
from scheduler.store.tables import metadata

# No fileConfig here on purpose: te-scheduler configures logging itself.


def run_migrations() -> None:
    """Run the migrations (or autogenerate comparison) on the shared connection."""
    connection = context.config.attributes.get("connection")
    if context.is_offline_mode() or connection is None:
        raise RuntimeError(
            "te-scheduler migrations run through `te-scheduler db upgrade` (scheduler.store.db), "
            "which passes a live connection; offline SQL generation is not supported"
        )
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
