"""Database engines (SQLite pragmas, PostgreSQL) and the Alembic migrations of the history table."""

from __future__ import annotations

import io
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

from scheduler.errors import DatabaseError

log = logging.getLogger(__name__)

# Connections carrying this execution option open their SQLite transaction with BEGIN IMMEDIATE,
# so a writer waits for the lock (busy_timeout) instead of failing on a stale read snapshot.
_IMMEDIATE = "te_begin_immediate"
# Any constant works; it only has to be the same in every te-scheduler process.
_PG_MIGRATION_LOCK = 7_466_001
# Each firing thread (up to max(32, 4 x concurrency)) holds a connection for one short
# statement at a time, so a small pool that lets threads queue for a moment serves them all;
# 5 + 15 connections per instance keep four instances under PostgreSQL's default
# max_connections of 100.
PG_POOL_SIZE = 5
PG_MAX_OVERFLOW = 15
PG_POOL_TIMEOUT = 30  # seconds a thread waits for a pooled connection
PG_CONNECT_TIMEOUT = 5  # seconds; an unreachable server fails fast instead of hanging


def describe_url(url: str | URL) -> str:
    """The URL with its password hidden, for logs and error messages."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        # Unparsable: still never echo what looks like a password.
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def one_line(exc: BaseException, url: URL | None = None) -> str:
    """The driver's message on one line (psycopg messages span several), password hidden."""
    text = str(getattr(exc, "orig", None) or exc)
    text = re.sub(r"^connection failed: |FATAL:\s+", "", text)
    lines = (part.strip() for part in text.splitlines())
    text = "; ".join(line for line in lines if line) or type(exc).__name__
    password = url.password if url is not None else None
    # Drivers do not echo passwords, but a message quoting the DSN must not either. Very short
    # "passwords" would mangle ordinary words and reveal next to nothing, so they are left.
    if isinstance(password, str) and len(password) >= 4:
        text = text.replace(password, "***")
    return text


def _is_missing_table(exc: sa_exc.DBAPIError) -> bool:
    """Whether the driver says a table does not exist (the schema was never migrated)."""
    code = getattr(exc.orig, "sqlstate", None)
    return code == "42P01" or "no such table" in str(exc.orig)


@contextmanager
def translate_errors(engine: Engine, action: str) -> Iterator[None]:
    """Turn SQLAlchemy driver and Alembic errors raised inside the block into DatabaseError."""
    where = describe_url(engine.url)
    try:
        yield
    except sa_exc.DBAPIError as exc:
        if _is_missing_table(exc):
            raise DatabaseError(
                f"database {where} is not migrated ({one_line(exc, engine.url)}); "
                "run `te-scheduler db upgrade`"
            ) from exc
        raise DatabaseError(
            f"database error while {action} ({where}): {one_line(exc, engine.url)}"
        ) from exc
    except sa_exc.TimeoutError as exc:  # every pooled connection stayed busy for pool_timeout
        raise DatabaseError(f"database busy while {action} ({where}): {exc}") from exc
    except CommandError as exc:
        raise DatabaseError(f"migration failed ({where}): {one_line(exc, engine.url)}") from exc


def make_engine(url: str) -> Engine:
    """An Engine for ``url``: SQLite as a private WAL file, PostgreSQL via psycopg 3 (pooled)."""
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        raise DatabaseError(
            f"invalid database URL {describe_url(url)!r} "
            "(expected e.g. sqlite:///history.db or postgresql+psycopg://user@host/db)"
        ) from None
    try:
        if parsed.get_backend_name() == "sqlite":
            return _make_sqlite_engine(parsed)
        if parsed.get_backend_name() in ("postgresql", "postgres"):
            return _make_postgres_engine(parsed)
        return create_engine(parsed, pool_pre_ping=True)
    except sa_exc.NoSuchModuleError:
        raise DatabaseError(
            f"unsupported database URL {describe_url(parsed)!r}: no SQLAlchemy dialect "
            f"{parsed.drivername!r} (use sqlite:///PATH or postgresql+psycopg://...)"
        ) from None
    except ImportError as exc:
        raise DatabaseError(
            f"the database driver for {describe_url(parsed)!r} is not installed ({exc}); "
            "for PostgreSQL install te-scheduler[postgres] and use postgresql+psycopg://"
        ) from None
    except sa_exc.ArgumentError as exc:
        raise DatabaseError(f"invalid database URL {describe_url(parsed)!r}: {exc}") from None


def _make_sqlite_engine(url: URL) -> Engine:
    """SQLite with a private file, WAL, a 10 s busy timeout and explicit transactions."""
    path = _sqlite_file(url)
    if path is not None:
        _create_private_file(path)
    engine = create_engine(url, connect_args={"check_same_thread": False})
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    return engine


def _make_postgres_engine(url: URL) -> Engine:
    """PostgreSQL through psycopg 3 (also for a bare postgresql:// URL), failing fast."""
    if url.drivername in ("postgresql", "postgres"):
        # SQLAlchemy's default PostgreSQL driver is psycopg2, which te-scheduler does not ship.
        url = url.set(drivername="postgresql+psycopg")
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:  # a value in the URL wins
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT
    if "application_name" not in url.query:  # names our sessions in pg_stat_activity
        connect_args["application_name"] = "te-scheduler"
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=PG_POOL_SIZE,
        max_overflow=PG_MAX_OVERFLOW,
        pool_timeout=PG_POOL_TIMEOUT,
        connect_args=connect_args,
    )


def _sqlite_file(url: URL) -> Path | None:
    """The file behind a SQLite URL, or None for in-memory and URI-style databases."""
    database = url.database or ""
    if database in ("", ":memory:") or url.query.get("uri") in ("true", "1"):
        return None
    return Path(database)


def _create_private_file(path: Path) -> None:
    """Create an empty 0600 file before SQLite does (it would use the umask).

    Only the file: a missing folder is far more often a typo in ``history.url`` than a wish,
    and creating it would scatter directories (and a fresh, empty history) around the disk.
    """
    if not path.parent.is_dir():
        why = "is not a directory" if path.parent.exists() else "does not exist"
        raise DatabaseError(
            f"cannot create the database file {path}: {path.parent} {why} "
            "(create the directory, or fix history.url)"
        )
    try:
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise DatabaseError(f"cannot create the database file {path}: {exc.strerror}") from None


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take BEGIN away from the sqlite3 module (it skips it for SELECT and DDL) so transactions,
    # migrations included, mean what they say; _on_sqlite_begin emits it instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=10000")
        _use_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _use_wal(cursor: Any) -> None:
    """Switch the file to WAL (persistent; a no-op once done; in-memory databases ignore it)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            # Two processes opening a brand-new file race for this switch, and SQLite answers
            # "locked" at once instead of using the busy timeout: retry briefly.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _on_sqlite_begin(connection: Connection) -> None:
    immediate = connection.get_execution_options().get(_IMMEDIATE, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection in a write transaction (BEGIN IMMEDIATE on SQLite), committed on exit."""
    with engine.connect() as connection:
        connection.execution_options(**{_IMMEDIATE: True})
        with connection.begin():
            yield connection


def migrations_dir() -> Path:
    """The Alembic scripts: ``scheduler/migrations`` in a wheel, ``migrations/`` in a checkout."""
    package = Path(__file__).resolve().parent.parent  # scheduler/
    for candidate in (package / "migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise DatabaseError(f"the migration scripts are missing (looked in {package}/migrations)")


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config built in code; ``connection`` is what env.py migrates."""
    # Alembic writes command output (e.g. `check`) to stdout; the CLI prints what it needs itself.
    config = Config(stdout=_NullWriter())
    config.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    config.attributes["connection"] = connection
    return config


class _NullWriter(io.StringIO):
    """A text sink for Alembic's stdout messages."""

    def write(self, text: str) -> int:
        return len(text)


def head() -> str:
    """The head revision id of the migration scripts."""
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if revision is None:
        raise DatabaseError("the migration scripts have no head revision")
    return revision


def current(engine: Engine) -> str | None:
    """The database's current revision id, or None when it was never migrated."""
    with _reaching(engine), engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def is_at_head(engine: Engine) -> bool:
    """Whether the database is migrated to the scripts' head revision."""
    return current(engine) == head()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision``, holding a lock so concurrent starts take turns."""
    at = current(engine)
    if revision == "head" and at == head():
        return
    log.info(
        "Upgrading database %s from %s to %s", describe_url(engine.url), at or "base", revision
    )
    with translate_errors(engine, "upgrading"), write_transaction(engine) as connection:
        _lock_for_migration(connection)
        command.upgrade(alembic_config(connection), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Revert migrations down to ``revision`` (``base`` removes every table)."""
    log.info("Downgrading database %s to %s", describe_url(engine.url), revision)
    with translate_errors(engine, "downgrading"), write_transaction(engine) as connection:
        _lock_for_migration(connection)
        command.downgrade(alembic_config(connection), revision)


def _lock_for_migration(connection: Connection) -> None:
    # SQLite is already serialised by BEGIN IMMEDIATE; PostgreSQL needs an explicit lock.
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")


def ensure_ready(engine: Engine) -> None:
    """Raise DatabaseError unless the database answers and is migrated to head."""
    at, wanted = current(engine), head()
    if at == wanted:
        return
    script = ScriptDirectory.from_config(alembic_config())
    if at is not None and _is_unknown(script, at):
        raise DatabaseError(
            f"database is at revision {at}, which this te-scheduler does not know "
            f"(head is {wanted}); upgrade te-scheduler"
        )
    raise DatabaseError(
        f"database is not migrated (at {at or 'base'}, head is {wanted}); "
        "run `te-scheduler db upgrade`"
    )


def _is_unknown(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is None
    except (CommandError, RevisionError):
        return True


@contextmanager
def _reaching(engine: Engine) -> Iterator[None]:
    """Report a database that cannot be opened or answered as 'cannot reach'."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        message = one_line(exc, engine.url)
        raise DatabaseError(
            f"cannot reach database {describe_url(engine.url)}: {message}{_hint(message)}"
        ) from exc


def _hint(message: str) -> str:
    """What to do about the usual connection failures, for the one-line error."""
    if "password authentication failed" in message or "no password supplied" in message:
        return " (check the user and password in the database URL)"
    if re.search(r'database ".*" does not exist', message):
        return " (create it, then run `te-scheduler db upgrade`)"
    if "timeout expired" in message:
        return " (no answer: check the host, the port and any firewall)"
    return ""
