"""The writes every attempt makes, as SQL prepared once per engine and run on the driver.

Each attempt inserts its row as 'pending' and completes it after the answer (a call that had
to queue also marks the moment it leaves); these are the only way those rows are written.
Built through SQLAlchemy Core each time, the two statements
cost 0.73 ms a pair on SQLite and 1.67 ms on PostgreSQL (statement construction, cache keys,
execution contexts, BEGIN events, the savepoint): more than the HTTP call itself, and a daemon
is one GIL. Here the SQL text and each column's bind conversion are worked out once, and every
call is a pooled DBAPI connection, one ``execute`` and a commit: 0.19 ms and 0.62 ms
(``python -m bench.history_writes --postgres``).

The values are converted by the columns' own SQLAlchemy types, so a row written here is
byte-for-byte the row Core would write (the firing key's uniqueness depends on it). Driver
errors are re-raised as SQLAlchemy's ``DBAPIError``, so ``db.translate_errors`` reports them
as it reports everything else, and a connection the driver calls broken leaves the pool.

SQLite runs each statement in autocommit: a single INSERT or UPDATE takes the write lock as
its first step (waiting for busy_timeout), which is what ``BEGIN IMMEDIATE`` buys a longer
transaction. PostgreSQL commits explicitly.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

# The databases db.make_engine makes, whose INSERT ... ON CONFLICT DO NOTHING RETURNING and
# paramstyle are written by hand here.
_SUPPORTED = {"sqlite": "named", "postgresql": "pyformat"}
_FINISH_COLUMNS = ("finished_at", "outcome", "status_code", "error", "duration_ms", "results")

_cache: weakref.WeakKeyDictionary[Engine, PreparedWrites] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def prepared_writes(
    engine: Engine, table: sa.Table, *, conflict_key: Sequence[str]
) -> PreparedWrites:
    """The prepared writes of ``table`` for ``engine``, built on first use.

    ValueError for a database other than SQLite and PostgreSQL (db.make_engine makes no other).
    """
    try:
        return _cache[engine]
    except KeyError:
        pass
    with _cache_lock:
        if engine not in _cache:
            _cache[engine] = PreparedWrites(engine, table, conflict_key)
        return _cache[engine]


class PreparedWrites:
    """INSERT-unless-taken and the completing UPDATE of one table, on one engine."""

    def __init__(self, engine: Engine, table: sa.Table, conflict_key: Sequence[str]) -> None:
        if engine.dialect.name not in _SUPPORTED:
            raise ValueError(
                f"history writes support {' and '.join(_SUPPORTED)}, not {engine.dialect.name}"
            )
        self._engine = engine
        self._dialect = engine.dialect
        self._commit = engine.dialect.name != "sqlite"
        # SQLite takes one writer at a time and makes the others poll in its busy handler
        # (sleeps of 1, 2, 5 ... ms); this process's own writers queue on a lock instead.
        self._one_writer = threading.Lock() if engine.dialect.name == "sqlite" else None
        mark = _placeholder(_SUPPORTED[engine.dialect.name])
        columns = [c.name for c in table.columns if c.name != "id"]
        self._insert_columns = columns
        self._insert_sql = (
            f"INSERT INTO {_quote(table.name)} ({', '.join(map(_quote, columns))}) "
            f"VALUES ({', '.join(mark(c) for c in columns)}) "
            f"ON CONFLICT ({', '.join(map(_quote, conflict_key))}) DO NOTHING "
            f"RETURNING {_quote('id')}"
        )
        self._finish_sql = (
            f"UPDATE {_quote(table.name)} SET "
            + ", ".join(f"{_quote(c)} = {mark(c)}" for c in _FINISH_COLUMNS)
            + f" WHERE {_quote('id')} = {mark('id')}"
        )
        # A queued call leaving: its row no longer says QUEUED and started_at is now.
        self._sent_sql = (
            f"UPDATE {_quote(table.name)} SET {_quote('started_at')} = {mark('started_at')}, "
            f"{_quote('error')} = NULL WHERE {_quote('id')} = {mark('id')} "
            f"AND {_quote('outcome')} = 'pending'"
        )
        self._convert: dict[str, Callable[[Any], Any] | None] = {
            c.name: c.type.dialect_impl(engine.dialect).bind_processor(engine.dialect)
            for c in table.columns
        }

    def insert(self, values: dict[str, Any]) -> int | None:
        """Insert ``values`` unless the conflict key is taken; the new id, or None."""
        params = self._params(self._insert_sql, values, self._insert_columns)
        row = self._run(self._insert_sql, params, returns_row=True)
        return None if row is None else int(row[0])

    def finish(self, values: dict[str, Any], row_id: int) -> int:
        """Set the finishing columns of row ``row_id``; how many rows changed (0 or 1)."""
        params = self._params(self._finish_sql, {**values, "id": row_id}, (*_FINISH_COLUMNS, "id"))
        rowcount: int = self._run(self._finish_sql, params, returns_row=False)
        return rowcount

    def sent(self, started_at: Any, row_id: int) -> None:
        """Mark a pending row's call as leaving at ``started_at`` (see history.mark_sent)."""
        params = self._params(
            self._sent_sql, {"started_at": started_at, "id": row_id}, ("started_at", "id")
        )
        self._run(self._sent_sql, params, returns_row=False)

    def _params(self, sql: str, values: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
        params = {}
        for name in names:
            value = values.get(name)  # a column left out is NULL, as in Core
            convert = self._convert[name]
            try:
                params[name] = convert(value) if convert and value is not None else value
            except Exception as exc:  # a value the column refuses (a naive datetime): as Core
                raise sa_exc.StatementError(
                    f"({type(exc).__name__}) {exc}", sql, values, exc
                ) from exc
        return params

    def _run(self, sql: str, params: dict[str, Any], *, returns_row: bool) -> Any:
        if self._one_writer is None:
            return self._execute(sql, params, returns_row=returns_row)
        with self._one_writer:
            return self._execute(sql, params, returns_row=returns_row)

    def _execute(self, sql: str, params: dict[str, Any], *, returns_row: bool) -> Any:
        connection = self._engine.raw_connection()
        cursor = None
        try:
            cursor = connection.cursor()
            cursor.execute(sql, params)
            if returns_row:
                rows = cursor.fetchall()  # exhausting the cursor completes the statement
                answer: Any = rows[0] if rows else None
            else:
                answer = cursor.rowcount
            if self._commit:
                connection.commit()
            return answer
        except self._dialect.loaded_dbapi.Error as exc:
            self._discard(connection, cursor, exc)
            raise sa_exc.DBAPIError.instance(
                sql,
                params,
                exc,
                self._dialect.loaded_dbapi.Error,
                ismulti=False,
                dialect=self._dialect,
            ) from exc
        finally:
            if cursor is not None:
                try:
                    cursor.close()
                except self._dialect.loaded_dbapi.Error:
                    pass
            connection.close()  # back to the pool (rolled back there if still open)

    def _discard(self, connection: Any, cursor: Any, exc: Any) -> None:
        """Drop a connection the driver says is broken, so the pool does not hand it out."""
        if self._dialect.is_disconnect(exc, connection.dbapi_connection, cursor):
            connection.invalidate(exc)


def _placeholder(paramstyle: str) -> Callable[[str], str]:
    if paramstyle == "named":
        return lambda name: f":{name}"
    return lambda name: f"%({name})s"


def _quote(identifier: str) -> str:
    # Quoted, because "trigger" is a keyword; our names never contain a double quote.
    return f'"{identifier}"'
