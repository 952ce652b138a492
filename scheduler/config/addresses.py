"""The jobs.yaml values that point somewhere: URLs, host:port, file paths, variable names.

Converters in the style of :mod:`scheduler.config.scalars`: the typed value, or :class:`Invalid`
saying what is allowed, never repeating the value itself (URLs may carry credentials).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from scheduler.config.scalars import Convert, Invalid

_HTTP = ("http", "https")
_PLAIN_HTTP = "plain http is only allowed for a loopback host such as 127.0.0.1 or localhost"


def _split_url(value: Any, schemes: tuple[str, ...], what: str) -> SplitResult:
    if not isinstance(value, str) or len(value) > 2000:
        raise Invalid(what)
    try:
        parts = urlsplit(value.strip())
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise Invalid(what) from None
    if parts.scheme.lower() not in schemes or not parts.hostname:
        raise Invalid(what)
    return parts


def is_loopback(host: str) -> bool:
    """Whether ``host`` is localhost or a loopback address (plain http is safe there)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def as_base_url(value: Any) -> str:
    """The API's https URL (http for a loopback host), without a trailing slash."""
    parts = _split_url(value, _HTTP, "must be an https:// URL like https://api.thousandeyes.com/v7")
    if parts.username is not None or parts.query or parts.fragment:
        raise Invalid("must be a plain https:// URL without credentials, query or fragment")
    if parts.scheme.lower() == "http" and not is_loopback(parts.hostname or ""):
        raise Invalid(f"must use https ({_PLAIN_HTTP})")
    return str(value).strip().rstrip("/")


def as_notify_url(value: Any) -> str | None:
    """null, or a webhook or ping URL: https (http for a loopback host); may hold a secret."""
    if value is None:
        return None
    parts = _split_url(
        value, _HTTP, "must be null or an https:// URL like https://hooks.example.com/..."
    )
    if parts.scheme.lower() == "http" and not is_loopback(parts.hostname or ""):
        raise Invalid(f"must use https ({_PLAIN_HTTP})")
    return str(value).strip()


def as_proxy(value: Any) -> str | None:
    """null, or a proxy URL (http, https or socks)."""
    if value is None:
        return None
    schemes = ("http", "https", "socks4", "socks4a", "socks5", "socks5h")
    _split_url(
        value,
        schemes,
        f"must be null or a proxy URL like http://proxy:3128 (schemes {', '.join(schemes)})",
    )
    return str(value).strip()


def as_env_name(value: Any) -> str | None:
    """null, or the name of an environment variable (never the token itself)."""
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,99}", value):
        raise Invalid(
            "must be the name of an environment variable (letters, digits, _), not the token itself"
        )
    return value


def as_path(base: Path) -> Convert[Path]:
    """A file path, made absolute against ``base`` (the config file's folder)."""

    def convert(value: Any) -> Path:
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            raise Invalid("must be the path of a file holding the token")
        return Path(os.path.abspath(base / Path(value.strip()).expanduser()))

    return convert


def as_db_url(base: Path) -> Convert[str]:
    """A sqlite or postgresql SQLAlchemy URL; relative sqlite paths resolved against ``base``."""

    def convert(value: Any) -> str:
        from sqlalchemy.engine import make_url  # heavy import, only when a URL is given

        help_ = "must be a database URL like sqlite:///history.db or postgresql+psycopg://host/db"
        if not isinstance(value, str) or not value.strip():
            raise Invalid(help_)
        try:
            backend = make_url(value.strip()).get_backend_name()
        except Exception:  # SQLAlchemy raises ArgumentError, ValueError or KeyError here
            raise Invalid(help_) from None
        if backend == "postgres":
            raise Invalid("must start with postgresql:// (SQLAlchemy does not know postgres://)")
        if backend not in ("sqlite", "postgresql"):
            raise Invalid(f"{help_} (sqlite or postgresql)")
        return resolve_sqlite(value.strip(), base) if backend == "sqlite" else value.strip()

    return convert


def resolve_sqlite(url: str, base: Path) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db`` against the config file's folder."""
    prefix, sep, rest = url.partition(":///")
    database, query_sep, query = rest.partition("?")
    if not sep or not database or database.startswith(("/", ":memory:", "file:")):
        return url
    absolute = os.path.abspath(base / Path(database).expanduser())
    return f"{prefix}:///{absolute}{query_sep}{query}"


def as_listen(value: Any) -> tuple[str, int] | None:
    """null, or host:port for /metrics; a bare port means 127.0.0.1."""
    help_ = "must be null or host:port like 127.0.0.1:9464, [::1]:9464 or :9464"
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = f":{value}"
    match = (
        re.fullmatch(
            r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]*):(\d{1,5})", value.strip(), re.ASCII
        )
        if isinstance(value, str)
        else None
    )
    if match is None:
        raise Invalid(help_)
    host, port = match[1] or match[3] or "127.0.0.1", int(match[2] or match[4])
    if match[1]:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise Invalid(help_) from None
    if not 1 <= port <= 65535:
        raise Invalid("port must be from 1 to 65535")
    return host, port
