"""jobs.yaml -> a frozen, validated :class:`~scheduler.config.model.Config`, or every problem.

:mod:`~scheduler.config.yamlsource` reads the file into values with positions,
:mod:`~scheduler.config.sections` checks each section through a
:class:`~scheduler.config.checker.Checker`, with the converters of
:mod:`~scheduler.config.scalars` and :mod:`~scheduler.config.addresses`.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scheduler.config import sections
from scheduler.config.checker import Checker
from scheduler.config.model import DEFAULT_TOKEN_ENV, ApiConfig, Config
from scheduler.config.yamlsource import read_document
from scheduler.errors import ConfigError, TokenError

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 64 * 1024


# -- loading --------------------------------------------------------------------------------------


def load(path: str | Path) -> Config:
    """Read, parse and validate ``path``; raise ConfigError listing every problem found."""

    file = str(path)
    absolute = Path(os.path.abspath(path))
    with _collector_paused():
        doc = read_document(absolute, file)
        checker = Checker(file, doc)
        config = sections.build_config(checker, absolute, doc.root) if not doc.fatal else None
    if checker.count or config is None:
        raise ConfigError(checker.report())
    log.debug("Loaded %s: %d jobs", file, len(config.jobs))
    return config


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cycle collector while a config is built.

    Loading makes a few objects per value and frees almost none, which is what sets the
    collector off again and again: it scanned every one of them each time and took 40% of
    the time for 50,000 jobs. The values form no cycles, so there is nothing to collect.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_token(api: ApiConfig) -> str:
    """The bearer token from ``api.token_file`` or the ``api.token_env`` variable, stripped."""
    if api.token_file is not None:
        source = f"the token file {api.token_file}"
        token = _read_token_file(api.token_file)
    else:
        name = api.token_env or DEFAULT_TOKEN_ENV
        source = f"the environment variable {name}"
        token = os.environ.get(name, "").strip()
        if not token:
            raise TokenError(
                f"no API token: set {source} to your ThousandEyes bearer token "
                "(or point api.token_file at a file holding it)"
            )
    if not token:
        raise TokenError(f"no API token: {source} is empty")
    if not re.fullmatch(r"[\x21-\x7e]+", token):
        raise TokenError(f"the API token in {source} has spaces or non-ASCII characters inside")
    return token


def _read_token_file(path: Path) -> str:
    """The token file's text: a regular file only, opened so a FIFO or device cannot block."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise TokenError(
            f"cannot read the token file {path}: {exc.strerror or exc}; "
            "put the token there (or use api.token_env instead)"
        ) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise TokenError(
            f"the token file {path} is not a regular file ({_file_kind(mode)}); "
            "point api.token_file at a file holding the token"
        )
    with os.fdopen(fd, "rb") as handle:
        if mode & 0o044:
            log.warning(
                "The token file %s is readable by %s; chmod 600 it",
                path,
                "group and others" if mode & 0o044 == 0o044 else _reader(mode),
            )
        try:
            data = handle.read(MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            raise TokenError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_TOKEN_BYTES:
        raise TokenError(f"the token file {path} is larger than 64 KiB; is it the right file?")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TokenError(f"the token file {path} is not UTF-8 text") from None


def _reader(mode: int) -> str:
    return "its group" if mode & 0o040 else "others"


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a plain file")
