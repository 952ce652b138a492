"""A hard deadline on a whole HTTP exchange: a watchdog shuts the socket of a call that overran.

requests' timeouts bound each socket operation, not the exchange: a server sending its
status line, headers or body one byte a second never trips a read timeout and can hold a
call for ever. Sessions built with :func:`mount_watched` use connections that report their
socket to the deadline armed on the calling thread (:meth:`Watchdog.watch`); at the deadline
the watchdog's thread shuts that socket down, which wakes the blocked read with an EOF.

Deadlines are real monotonic time, not ``scheduler.clock``: they bound real socket waits.
A SOCKS proxy's connections are not watched (their per-read timeouts still apply).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

log = logging.getLogger(__name__)

_current = threading.local()  # the Deadline armed by the call running on this thread


@dataclass(eq=False)
class Deadline:
    """One armed exchange; ``expired`` tells whether the watchdog had to cut it."""

    at: float  # time.monotonic() value
    expired: bool = False
    done: bool = False
    sockets: list[socket.socket] = field(default_factory=list)


class Watchdog:
    """One thread that cuts every exchange still running at its deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, seconds: float) -> Iterator[Deadline]:
        """Arm a deadline ``seconds`` from now for the exchange run inside the block."""
        deadline = Deadline(time.monotonic() + seconds)
        with self._cond:
            heapq.heappush(self._heap, (deadline.at, next(self._seq), deadline))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="http-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is deadline:
                self._cond.notify()
        previous, _current.deadline = getattr(_current, "deadline", None), deadline
        try:
            yield deadline
        finally:
            _current.deadline = previous
            with self._cond:
                deadline.done = True
                deadline.sockets.clear()

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)  # finished in time
                if not self._heap:
                    self._cond.wait()
                    continue
                left = self._heap[0][0] - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                _expire(heapq.heappop(self._heap)[2])

    def attach(self, sock: socket.socket | None) -> None:
        """Watch ``sock`` for the exchange armed on this thread (none armed: nothing)."""
        deadline: Deadline | None = getattr(_current, "deadline", None)
        if deadline is None or sock is None:
            return
        with self._cond:
            if deadline.done:
                return
            deadline.sockets.append(sock)
            if deadline.expired or time.monotonic() >= deadline.at:  # connecting took it all
                _expire(deadline)


def _expire(deadline: Deadline) -> None:
    """Shut the exchange's sockets down (caller holds the watchdog's lock)."""
    deadline.expired = True
    for sock in deadline.sockets:
        try:
            # socket.socket's own shutdown: SSLSocket's would drop its SSL object under a
            # thread that is reading through it.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed: nothing left to cut


WATCHDOG = Watchdog()  # one thread serves every caller and notifier in the process


class _WatchedHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        super().connect()
        WATCHDOG.attach(self.sock)

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        WATCHDOG.attach(self.sock)  # a kept-alive connection does not connect again
        return super().getresponse(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        WATCHDOG.attach(self.sock)

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        WATCHDOG.attach(self.sock)
        return super().getresponse(*args, **kwargs)


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class WatchedAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections report their sockets to :data:`WATCHDOG`."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = _POOLS
        return manager


def mount_watched(session: requests.Session, **adapter: Any) -> requests.Session:
    """Mount a :class:`WatchedAdapter` (built with ``adapter``) for http and https; return it."""
    watched = WatchedAdapter(**adapter)
    session.mount("https://", watched)
    session.mount("http://", watched)
    return session
