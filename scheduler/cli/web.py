"""``te-scheduler web``: the status page from the config and the database alone, no daemon."""

from __future__ import annotations

import logging
import signal
import threading

import click
from sqlalchemy import Engine

from scheduler.cli.base import State, cli, pass_state
from scheduler.config.addresses import as_listen
from scheduler.config.scalars import Invalid
from scheduler.errors import UsageError
from scheduler.web.api import status_routes
from scheduler.web.health import Health, database_health
from scheduler.web.server import MetricsServer

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9465"


@cli.command()
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    metavar="ADDR",
    help="host:port to serve on; keep it on loopback unless a proxy guards it.",
)
@pass_state
def web(state: State, listen: str) -> None:
    """Serve the read-only status page until SIGTERM or SIGINT.

    Reads only the config and the history database: no daemon needs to run, no token is
    read, nothing is written. Rate limits come from the daemons' shared `rate_limits`
    table, or show as unknown.
    """
    state.logging("info")
    address = _address(listen)
    config = state.load()
    engine = state.engine(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = MetricsServer(
        None, address, _health(engine), routes=status_routes(engine, lambda: config)
    ).start()
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    log.info("Status page on http://%s:%d/", host, server.port)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        engine.dispose()
    log.info("Stopped")


def _address(listen: str) -> tuple[str, int]:
    try:
        address = as_listen(listen)
    except Invalid as exc:
        raise UsageError(f"--listen {listen!r}: {exc}") from None
    assert address is not None  # a string is never null
    return address


def _health(engine: Engine) -> Health:
    def health() -> tuple[bool, dict[str, str]]:
        ok, detail = database_health(engine)
        return ok, {"database": detail}

    return health
