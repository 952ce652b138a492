"""History writes that failed, kept in memory and retried until the database answers again.

An answer from the API is a fact. When the database is away as it arrives, the row's
completion waits here (its log line already says what happened) instead of being lost; the
slots that came due meanwhile wait here as ``missed`` rows. Shutdown flushes what it can and
logs, row by row, what it could not record. The backlog also tells /healthz the truth: history
writes are failing from the first write that gave up until the backlog is written out.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from scheduler import clock

log = logging.getLogger(__name__)

MAX_ITEMS = 100_000  # beyond this the oldest are dropped (and logged): memory stays bounded
# A write waiting this long counts as failing: a locked SQLite file makes writes wait (its
# 10 s busy timeout, then retries) without an error, while reads, and so a read-only health
# check, still work. Healthy writes take milliseconds; a WAL checkpoint well under a second.
STALLED_AFTER = 5.0


@dataclass(frozen=True)
class Item:
    """One write to do again; ``what`` says it in full for the log should it never succeed."""

    what: str
    write: Callable[[], object]


class Backlog:
    """A thread-safe queue of failed writes, written out in order by :meth:`flush`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one flush at a time: a missed row is inserted once
        self._items: deque[Item] = deque()
        self._failing_since: datetime | None = None
        self._last_error = ""
        self._writing: dict[object, float] = {}  # writes in progress -> monotonic start

    def add(self, item: Item, error: BaseException | str) -> None:
        """Keep ``item`` for later; history writes count as failing from now on."""
        with self._lock:
            if len(self._items) >= MAX_ITEMS:
                dropped = self._items.popleft()
                log.error("History backlog full; giving up on: %s", dropped.what)
            self._items.append(item)
            self._note_failure(error)
        log.warning("History write kept for later (%s): %s", error, item.what)

    def failed(self, error: BaseException | str) -> None:
        """A write failed (and is not kept here): history writes are failing."""
        with self._lock:
            self._note_failure(error)

    def succeeded(self) -> None:
        """A write went through: with nothing kept, history writes work again."""
        if self._failing_since is None:
            return  # the common case: no lock taken
        with self._lock:
            if not self._items:
                self._failing_since = None

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Mark one history write in progress, so a write stuck waiting shows in /healthz."""
        token = object()
        with self._lock:
            self._writing[token] = clock.monotonic()
        try:
            yield
        finally:
            with self._lock:
                del self._writing[token]

    def flush(self) -> bool:
        """Write out what is kept, oldest first, until one fails; True when nothing is left."""
        with self._flushing:
            return self._flush()

    def _flush(self) -> bool:
        while True:
            with self._lock:
                if not self._items:
                    self._failing_since = None
                    return True
                item = self._items[0]
            try:
                with self.writing():
                    item.write()
            except Exception as exc:  # the database is still away: try again later
                with self._lock:
                    self._note_failure(exc)
                return False
            with self._lock:
                if self._items and self._items[0] is item:
                    self._items.popleft()
            log.info("History write done after all: %s", item.what)

    def problem(self) -> str | None:
        """Why history writes are failing, for /healthz; None while they work."""
        with self._lock:
            if self._failing_since is None:
                return self._stalled()
            waiting = f"; {len(self._items)} write(s) waiting" if self._items else ""
            return (
                f"history writes failing since {self._failing_since.isoformat()}: "
                f"{self._last_error}{waiting}"
            )

    def give_up(self) -> list[str]:
        """Empty the backlog and return what each kept write would have recorded."""
        with self._lock:
            lost = [item.what for item in self._items]
            self._items.clear()
            return lost

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _stalled(self) -> str | None:
        if not self._writing:
            return None
        waited = clock.monotonic() - min(self._writing.values())
        if waited < STALLED_AFTER:
            return None
        return (
            f"history writes stalled: one has waited {waited:.0f}s for the database "
            "(locked by another process, or not answering)"
        )

    def _note_failure(self, error: BaseException | str) -> None:
        if self._failing_since is None:
            self._failing_since = clock.now()
        self._last_error = str(error).splitlines()[0][:300] if str(error) else repr(error)
