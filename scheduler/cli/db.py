"""`te-scheduler db upgrade | current | downgrade REV`: the history database's migrations."""

from __future__ import annotations

import re
from typing import Any

import click

from scheduler.cli.base import State, cli, pass_state, require_existing_sqlite
from scheduler.config.wording import short
from scheduler.errors import UsageError


@cli.group(name="db")
def db_group() -> None:
    """Alembic migrations of the history database."""


@db_group.command()
@pass_state
def upgrade(state: State) -> None:
    """Migrate the history database to the newest schema (creates it if missing)."""
    from scheduler.store import db

    engine = db.make_engine(state.database_url())
    db.upgrade(engine)


@db_group.command()
@pass_state
def current(state: State) -> None:
    """Print the database's schema revision (and whether it is the newest)."""
    from scheduler.store import db

    url = state.database_url()
    require_existing_sqlite(url)
    engine = db.make_engine(url)
    revision = db.current(engine)
    marker = "(head)" if revision == db.head() else f"(head is {db.head()})"
    click.echo(f"{revision or 'empty'} {marker}")


@db_group.command()
@click.argument("revision")
@pass_state
def downgrade(state: State, revision: str) -> None:
    """Migrate the history database down to REVISION ('base' removes every table).

    REVISION is a revision id (see `te-scheduler db current`), `base`, or `-N` for N steps
    down (after `--`: `te-scheduler db downgrade -- -1`).
    """
    from scheduler.store import db

    scripts = _migration_scripts()
    chain = [script.revision for script in scripts.walk_revisions()]  # newest first, one line
    target = _downgrade_target(scripts, revision, chain)  # exit 2 before any database work
    url = state.database_url()
    require_existing_sqlite(url)
    engine = db.make_engine(url)
    _require_below(revision, target, db.current(engine), chain)
    db.downgrade(engine, revision)


def _migration_scripts() -> Any:
    """Alembic's ScriptDirectory of te-scheduler's migrations."""
    from alembic.script import ScriptDirectory

    from scheduler.store import db

    return ScriptDirectory.from_config(db.alembic_config())


def _downgrade_target(scripts: Any, revision: str, chain: list[str]) -> str | None:
    """The revision id REVISION names (None for base, or for -N until the database is read).

    Alembic would say the same after connecting and then fail as a database error (exit 3);
    a revision that does not exist is a bad argument (exit 2).
    """
    if revision == "base" or re.fullmatch(r"-[1-9][0-9]{0,5}", revision):
        return None
    try:
        found = scripts.get_revision(revision) if revision else None
    except Exception:  # CommandError, RevisionError, even AssertionError for "@": all "no such"
        found = None
    if found is None or found.revision not in chain:
        raise UsageError(
            f"unknown revision {short(revision, 40)}; known: base, "
            f"{', '.join(reversed(chain))} (or -N for N steps down)"
        )
    return str(found.revision)


def _require_below(revision: str, target: str | None, at: str | None, chain: list[str]) -> None:
    """Refuse a downgrade REVISION that is not at or below the database's revision ``at``.

    A database at a revision these scripts do not know is left to Alembic (exit 3).
    """
    if at is not None and at not in chain:
        return
    below = chain[chain.index(at) :] if at is not None else []  # ``at`` and what lies under it
    if revision.startswith("-"):
        if int(revision[1:]) > len(below):
            raise UsageError(
                f"cannot go {revision[1:]} step(s) down: the database is at "
                f"{at or 'base'}, {len(below)} step(s) above base"
            )
    elif target is not None and target not in below:
        raise UsageError(
            f"the database is at {at or 'base'}, below {target}; downgrade only "
            "goes down (`te-scheduler db upgrade` goes up)"
        )
