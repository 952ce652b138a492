"""A real PostgreSQL server for tests: a throwaway cluster, one fresh database per test.

A pytest plugin: tests/conftest.py loads it (``pytest_plugins = ["tests.postgres"]``), so every
test module can ask for ``postgres_server``, ``postgres_url`` and ``any_engine`` without
importing them; the server is shared by the whole session.

``postgres_url`` is a ``postgresql+psycopg://USER@127.0.0.1:PORT/te_<hex>`` URL of an empty
database made for the test and dropped after it. The cluster is started once per session with
``initdb``/``pg_ctl`` from PATH or ``/usr/lib/postgresql/*/bin`` (``.ci/ensure-postgres``
installs them), as a non-root user (PostgreSQL refuses to run as root), on a free loopback
port with trust auth and ``fsync=off``. Without PostgreSQL the tests are skipped, unless
``TE_REQUIRE_POSTGRES=1``, which turns the skip into a failure (for CI).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import URL

# A role that must log in with a password (scram), for testing authentication failures;
# every other role is trusted on loopback.
PASSWORD_ROLE = "te_password_user"
THROWAWAY_USER = "te-pgtest"
_SERVER_USERS = ("postgres", THROWAWAY_USER)  # the first that exists, else THROWAWAY_USER is made
_START_TRIES = 3


@dataclass(frozen=True)
class PostgresServer:
    """Where the test server listens; ``url(db)`` is the SQLAlchemy URL of one database."""

    host: str
    port: int
    user: str
    password: str | None = None

    def url(self, database: str, *, user: str | None = None, password: str | None = None) -> str:
        """A ``postgresql+psycopg://`` URL of ``database`` (as ``user``, default the admin)."""
        return URL.create(
            "postgresql+psycopg",
            username=user or self.user,
            password=password if user else self.password,
            host=self.host,
            port=self.port,
            database=database,
        ).render_as_string(hide_password=False)

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection to the ``postgres`` database (CREATE/DROP DATABASE)."""
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname="postgres",
            autocommit=True,
            connect_timeout=5,
        )

    def create_database(self) -> str:
        """Create an empty ``te_<hex>`` database; its name."""
        name = f"te_{uuid.uuid4().hex}"
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting whatever a test left connected."""
        with self.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def find_bin_dir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: PATH first, then the newest Debian one."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    candidates.sort(key=lambda p: _version_key(Path(p).parent.parent.name))
    for initdb in reversed(candidates):
        folder = Path(initdb).parent
        if (folder / "pg_ctl").is_file():
            return folder
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _server_user() -> str:
    """The account the cluster runs as: ourselves, or a non-root one when we are root."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    for name in _SERVER_USERS:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", THROWAWAY_USER],
        check=True,
        capture_output=True,
    )
    return THROWAWAY_USER


def _as_user(user: str, argv: list[str]) -> list[str]:
    """``argv`` run as ``user`` (runuser, else su), or unchanged when that is us already."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--", *argv]
    import shlex

    return ["su", "-s", "/bin/sh", user, "-c", shlex.join(argv)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run(argv: list[str], cwd: Path) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")


class LocalCluster:
    """A cluster in a temporary folder, owned and run by a non-root user."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.user = _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="te-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self.started = False
        if os.geteuid() == 0:
            account = pwd.getpwnam(self.user)
            os.chown(self.root, account.pw_uid, account.pw_gid)

    def start(self) -> PostgresServer:
        """initdb, then pg_ctl start on a free port (a port taken meanwhile is retried)."""
        self._pg(
            "initdb", "-D", str(self.data), "-U", self.user, "-E", "UTF8", "--no-locale",
            "--auth=trust", "--no-sync",
        )  # fmt: skip
        self._require_password_for(PASSWORD_ROLE)
        for attempt in range(_START_TRIES):
            self.port = _free_port()
            try:
                self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                         "-o", self._options(), "start")  # fmt: skip
                self.started = True
                return PostgresServer("127.0.0.1", self.port, self.user)
            except RuntimeError:
                if attempt == _START_TRIES - 1:
                    raise RuntimeError(f"PostgreSQL did not start:\n{self.log_tail()}") from None
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop at once (nothing here needs a clean shutdown) and remove the folder."""
        try:
            if self.started:
                self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _options(self) -> str:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            "fsync": "off",  # a throwaway cluster: durability buys nothing, speed matters
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        return " ".join(f"-c {key}={value}" for key, value in settings.items())

    def _require_password_for(self, role: str) -> None:
        hba = self.data / "pg_hba.conf"
        rule = f"host all {role} 127.0.0.1/32 scram-sha-256\n"
        hba.write_text(rule + hba.read_text())  # first match wins

    def _pg(self, program: str, *args: str) -> None:
        _run(_as_user(self.user, [str(self.bin_dir / program), *args]), cwd=self.root)


# One server for the session even when a module also imports the fixtures by name: pytest then
# holds a session fixture per such module, so they count references to start and stop it once.
_lock = threading.Lock()
_shared: dict[str, object] = {"users": 0}


def _acquire() -> PostgresServer:
    with _lock:
        if "server" not in _shared:
            _shared["server"], _shared["cluster"] = _start_server()
        _shared["users"] = int(_shared["users"]) + 1  # type: ignore[call-overload]
        server = _shared["server"]
        assert isinstance(server, PostgresServer)
        return server


def _release() -> None:
    with _lock:
        _shared["users"] = int(_shared["users"]) - 1  # type: ignore[call-overload]
        if _shared["users"] == 0:
            cluster = _shared.pop("cluster", None)
            _shared.pop("server", None)
            if isinstance(cluster, LocalCluster):
                cluster.stop()


def _start_server() -> tuple[PostgresServer, LocalCluster]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        message = (
            "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); "
            "run .ci/ensure-postgres as root"
        )
        if os.environ.get("TE_REQUIRE_POSTGRES") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    cluster = LocalCluster(bin_dir)
    try:
        return cluster.start(), cluster
    except BaseException:
        cluster.stop()
        raise


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (started on first use, stopped at the end)."""
    server = _acquire()
    try:
        yield server
    finally:
        _release()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database on the test server, dropped after the test."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """An Engine on a database of each kind (a SQLite file, a PostgreSQL database), migrated."""
    from scheduler.store import db

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'history.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = db.make_engine(url)
    db.upgrade(engine)
    yield engine
    engine.dispose()
