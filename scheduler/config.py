"""jobs.yaml -> a frozen, validated :class:`Config`; every problem located at FILE:LINE:COL.

The public types below are what the rest of te-scheduler reads; ``load()`` is the only way
to build them from a file. The file is read with libyaml's safe parser event by event, and the
events are turned into Python values here (not by PyYAML's composer), so that depth, alias
expansion and duplicate keys are checked before they can cost memory, time or a silent
overwrite, and every value keeps the line and column it came from.
"""

from __future__ import annotations

import codecs
import difflib
import functools
import ipaddress
import logging
import os
import re
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import SplitResult, urlsplit

import yaml

from scheduler.errors import ConfigError, ConfigProblem, TokenError

log = logging.getLogger(__name__)

MAX_BYTES = 8 * 1024 * 1024  # the file size cap of SPEC section 3
MAX_NODES = 1_000_000  # values after alias expansion; real configs have a few thousand
MAX_DEPTH = 100  # nesting levels; jobs.yaml needs 5
MAX_TOKEN_BYTES = 64 * 1024
DEFAULT_TOKEN_ENV = "THOUSANDEYES_TOKEN"

@dataclass(frozen=True)
class Rate:
    """``count`` calls per ``period`` seconds (``24/min`` -> Rate(24, 60.0))."""

    count: int
    period: float

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}s"


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # total HTTP attempts for one firing, the first included
    backoff: float = 2.0  # seconds; attempt n waits up to backoff * 2**(n-1), full jitter
    max_backoff: float = 300.0


@dataclass(frozen=True)
class Schedule:
    """Exactly one of ``cron``, ``every`` or ``at`` is set."""

    timezone: str = "UTC"
    cron: str | None = None  # 5 fields, or an @alias (@daily ...), as written
    every: timedelta | None = None
    start: datetime | None = None  # anchor for ``every`` (aware); None means the Unix epoch
    at: datetime | None = None  # aware

    @property
    def kind(self) -> str:
        return "cron" if self.cron else "every" if self.every else "at"


@dataclass(frozen=True)
class Job:
    name: str
    tests: tuple[str, ...]
    schedule: Schedule
    aid: str | None = None
    enabled: bool = True
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    catch_up: timedelta = timedelta(hours=1)
    spread: timedelta = timedelta(0)
    line: int = 0  # where the job starts in the file, for log messages


@dataclass(frozen=True)
class ApiConfig:
    base_url: str = "https://api.thousandeyes.com/v7"
    token_env: str | None = "THOUSANDEYES_TOKEN"
    token_file: Path | None = None  # absolute (resolved against the config file's folder)
    timeout: float = 30.0
    concurrency: int = 8
    rate_limit: Rate = Rate(24, 60.0)
    verify_tls: bool = True
    proxy: str | None = None


@dataclass(frozen=True)
class HistoryConfig:
    url: str = "sqlite:///history.db"  # relative sqlite paths already resolved to absolute
    retention: timedelta | None = timedelta(days=90)


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, int] | None = None  # (host, port)


@dataclass(frozen=True)
class Config:
    path: Path
    api: ApiConfig
    history: HistoryConfig
    metrics: MetricsConfig
    jobs: tuple[Job, ...]

    @property
    def enabled_jobs(self) -> tuple[Job, ...]:
        return tuple(j for j in self.jobs if j.enabled)

    def job(self, name: str) -> Job | None:
        return next((j for j in self.jobs if j.name == name), None)


# -- small public parsers (also used by the CLI) ------------------------------------------------

_DURATION_HELP = "must be a duration like 30s, 5m, 2h (units ms s m h d w)"
_RATE_HELP = (
    "must be a rate <count>/<period> like 24/min or 5/4s "
    "(the period a duration or sec, min, hour)"
)
_TIME_HELP = "must be an ISO-8601 time like 2026-12-01T09:00:00+01:00"
_UNIT_MICROS = {"ms": 1_000, "s": 10**6, "m": 60 * 10**6, "h": 3600 * 10**6,
                "d": 86400 * 10**6, "w": 604800 * 10**6}
_DURATION_RE = re.compile(r"(\d{1,15}(?:\.\d{0,9})?|\.\d{1,9})\s*(ms|s|m|h|d|w)", re.ASCII)
_RATE_RE = re.compile(r"(\d{1,9})\s*/\s*(\S{1,40})", re.ASCII)
_PERIOD_WORDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
                 "h": 3600, "hour": 3600}
_ZERO = timedelta(0)


class _Invalid(ValueError):
    """A value that breaks a rule; the message says what is allowed."""

    def __init__(self, message: str, *, quoted: bool = False) -> None:
        super().__init__(message)
        self.quoted = quoted  # the message already shows the value


def parse_duration(text: str) -> timedelta:
    """``15m`` -> 15 minutes: ``<number><unit>`` with units ms s m h d w; ``0`` is zero."""
    try:
        return _duration(text)
    except _Invalid as exc:
        raise ValueError(f"{_describe(text)}: {exc}") from None


def parse_rate(text: str) -> Rate:
    """``24/min`` -> Rate(24, 60.0); the period a duration or sec, min, hour."""
    try:
        return _rate(text)
    except _Invalid as exc:
        raise ValueError(f"{_describe(text)}: {exc}") from None


def parse_when(text: str, now: datetime) -> datetime:
    """An ISO-8601 time (naive means UTC) or a duration back from ``now``, as aware UTC."""
    try:
        return (now - _duration(text)).astimezone(timezone.utc)
    except _Invalid:
        pass
    except OverflowError:
        raise ValueError(f"{_describe(text)}: reaches back before the year 1") from None
    try:
        moment = _iso_time(text) if isinstance(text, str) else None
    except _Invalid:
        moment = None
    if moment is None:
        raise ValueError(
            f"{_describe(text)} is not a time: use an ISO-8601 time like 2026-01-31T08:00:00Z "
            "or a duration back from now like 15m, 24h, 7d"
        )
    try:
        return _aware(moment, timezone.utc)
    except _Invalid as exc:
        raise ValueError(f"{_describe(text)}: {exc}") from None


def _duration(text: object) -> timedelta:
    stripped = text.strip() if isinstance(text, str) else ""
    match = _DURATION_RE.fullmatch(stripped)
    if match is None:
        if stripped == "0":
            return _ZERO
        if stripped.startswith("-"):
            raise _Invalid("must not be negative (a duration like 30s, 5m, 2h; "
                           "units ms s m h d w)")
        raise _Invalid(_DURATION_HELP)
    micros = Decimal(match[1]) * _UNIT_MICROS[match[2]]
    try:
        return timedelta(microseconds=int(micros))
    except OverflowError:
        raise _Invalid("is too long (the limit is 999999999 days)") from None


def _rate(text: object) -> Rate:
    match = _RATE_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise _Invalid(_RATE_HELP)
    count, word = int(match[1]), match[2]
    if count < 1:
        raise _Invalid("needs a count of at least 1, like 24/min")
    try:
        period = _PERIOD_WORDS.get(word) or _duration(word).total_seconds()
    except _Invalid:
        raise _Invalid(_RATE_HELP) from None
    if period <= 0:
        raise _Invalid("needs a period longer than 0s, like 24/min")
    return Rate(count, float(period))


def _iso_time(text: str) -> datetime:
    value = text.strip()
    if value.endswith(("Z", "z")):  # Python 3.10's fromisoformat has no "Z"
        value = value[:-1] + "+00:00"
    try:
        if len(value) > 64:
            raise ValueError
        return datetime.fromisoformat(value)
    except ValueError:
        raise _Invalid(_TIME_HELP) from None


def _aware(moment: datetime, tz: zoneinfo.ZoneInfo | timezone) -> datetime:
    """``moment`` with a timezone (naive means ``tz``), checked to be a usable instant."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    try:
        in_utc = moment.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise _Invalid("must be a time between the years 1970 and 9999") from None
    if not 1970 <= in_utc.year <= 9998:
        raise _Invalid("must be a time between the years 1970 and 9999")
    return moment if tz is not timezone.utc else in_utc


# -- loading ------------------------------------------------------------------------------------


def load(path: str | Path) -> Config:
    """Read, parse and validate ``path``; raise ConfigError listing every problem found."""
    file = str(path)
    absolute = Path(os.path.abspath(path))
    doc = _parse(_read_text(absolute, file), file)
    checker = _Checker(file, doc)
    config = _build_config(checker, absolute, doc.root) if not doc.fatal else None
    if checker.problems or config is None:
        raise ConfigError(sorted(checker.problems, key=lambda p: (p.line, p.col)))
    log.debug("Loaded %s: %d jobs", file, len(config.jobs))
    return config


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
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise TokenError(
            f"cannot read the token file {path}: {exc.strerror or exc}; "
            "put the token there (or use api.token_env instead)"
        ) from None
    if len(data) > MAX_TOKEN_BYTES:
        raise TokenError(f"the token file {path} is larger than 64 KiB; is it the right file?")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TokenError(f"the token file {path} is not UTF-8 text") from None


def _fatal(file: str, message: str, line: int = 1, col: int = 1) -> ConfigError:
    return ConfigError([ConfigProblem(file, line, col, "", message)])


def _read_text(path: Path, file: str) -> str:
    """The file as text, refusing anything over MAX_BYTES before reading it all."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise _fatal(file, f"file is {size} bytes; the limit is 8 MiB")
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)  # a pipe or a growing file has no honest size
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise _fatal(file, f"cannot read the config file: {reason}") from None
    if len(data) > MAX_BYTES:
        raise _fatal(file, f"file is more than {MAX_BYTES} bytes; the limit is 8 MiB")
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        col = len(data[line_start : exc.start].decode("utf-8", "replace")) + 1
        message = f"not UTF-8 text (byte 0x{data[exc.start]:02X}); save the file as UTF-8"
        raise _fatal(file, message, line, col) from None


# -- YAML events -> Python values with positions ---------------------------------------------------

Key = tuple["str | int", ...]
Where = tuple[int, int]
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 15x faster, same rules
_INT_TAG = "tag:yaml.org,2002:int"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"
_SCALAR_TAGS = {f"tag:yaml.org,2002:{name}" for name in (
    "null", "bool", "int", "float", "str", "timestamp", "binary")}
_PLAIN_TAGS = (None, "!", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
_CANONICAL_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_NO_KEY, _BAD_KEY, _MERGE, _UNREADABLE = object(), object(), object(), object()


class _Stop(Exception):
    """A problem after which the rest of the document cannot be read."""

    def __init__(self, where: Where, message: str) -> None:
        super().__init__(message)
        self.where, self.message = where, message


@dataclass
class _Frame:
    """A mapping or sequence being filled."""

    value: dict[str, Any] | list[Any]
    path: Key
    where: Where
    anchor: str | None
    start_nodes: int
    key: Any = _NO_KEY  # a mapping's pending key
    unreadable: bool = False  # an unsupported tag, reported at the start
    merges: list[tuple[Any, Where]] = field(default_factory=list)


@dataclass
class _Doc:
    """The document's values, where each value and key starts, and the problems met on the way."""

    root: Any = None
    values: dict[Key, Where] = field(default_factory=dict)
    keys: dict[Key, Where] = field(default_factory=dict)
    problems: list[tuple[Where, Key, str]] = field(default_factory=list)
    unreadable: set[Key] = field(default_factory=set)  # reported already; the value is None
    fatal: bool = False
    empty: bool = True


def _where(mark: Any) -> Where:
    return (mark.line + 1, mark.column + 1)


def _parse(text: str, file: str) -> _Doc:
    """Build the document's values from parser events; syntax errors end it as ``fatal``."""
    doc = _Doc()
    bad = yaml.reader.Reader.NON_PRINTABLE.search(text)
    if bad is not None:
        line, col = _line_col(text, bad.start())
        raise _fatal(file, f"control character U+{ord(bad.group()):04X} is not allowed; "
                           "is this a text file?", line, col)
    loader = None
    try:
        loader = _Loader(text)
        builder = _Builder(loader, doc)
        while loader.check_event():
            builder.feed(loader.get_event())
    except _Stop as stop:
        doc.problems.append((stop.where, (), stop.message))
        doc.fatal = True
    except yaml.MarkedYAMLError as exc:
        doc.problems.append((_where(exc.problem_mark), (), _syntax_message(exc, text)))
        doc.fatal = True
    except (yaml.YAMLError, ValueError) as exc:  # marks are missing only on reader trouble
        doc.problems.append(((1, 1), (), f"cannot parse the YAML: {_describe(str(exc))}"))
        doc.fatal = True
    finally:
        if loader is not None:
            loader.dispose()
    return doc


def _syntax_message(exc: yaml.MarkedYAMLError, text: str) -> str:
    message = f"YAML syntax error: {exc.problem or 'cannot parse'}"
    if exc.context and exc.context_mark is not None:
        line, col = _where(exc.context_mark)
        message += f", {exc.context} that starts at line {line}, column {col}"
    index = getattr(exc.problem_mark, "index", -1)
    if 0 <= index < len(text) and text[index] == "\t":
        message += "; indent with spaces, YAML does not allow tabs"
    return message[:300]


def _show_tag(tag: str) -> str:
    return _short(tag.replace("tag:yaml.org,2002:", "!!"))


def _line_col(text: str, index: int) -> Where:
    line_start = text.rfind("\n", 0, index) + 1
    return (text.count("\n", 0, index) + 1, index - line_start + 1)


class _Builder:
    """Turns parser events into dicts, lists and scalars, as PyYAML's composer would, but
    counting every value an alias stands for, capping depth, and reporting duplicate keys."""

    def __init__(self, loader: Any, doc: _Doc) -> None:
        self.loader, self.doc = loader, doc
        self.stack: list[_Frame] = []
        self.anchors: dict[str, tuple[Any, int]] = {}
        self.plain: dict[str, Any] = {}
        self.nodes = 0
        self.documents = 0

    def feed(self, event: yaml.Event) -> None:
        if isinstance(event, yaml.ScalarEvent):
            self._scalar(event)
        elif isinstance(event, yaml.CollectionStartEvent):
            self._open(event)
        elif isinstance(event, yaml.CollectionEndEvent):
            self._close()
        elif isinstance(event, yaml.AliasEvent):
            self._alias(event)
        elif isinstance(event, yaml.DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:
                raise _Stop(_where(event.start_mark),
                            "only one YAML document is allowed; remove the second '---'")

    def _count(self, nodes: int, where: Where) -> None:
        self.nodes += nodes
        if self.nodes > MAX_NODES:
            raise _Stop(where, f"the document expands to more than {MAX_NODES:,} values "
                               "(through aliases?); that is far more than a config needs")

    def _problem(self, where: Where, path: Key, message: str) -> None:
        self.doc.problems.append((where, path, message))

    def _alias(self, event: yaml.AliasEvent) -> None:
        where, name = _where(event.start_mark), str(event.anchor)
        if name not in self.anchors:
            inside = any(frame.anchor == name for frame in self.stack)
            why = "refers to a collection that contains it" if inside else "is not defined above"
            self._problem(where, self._child_path(), f"alias *{name[:40]} {why}")
            self.doc.unreadable.add(self._child_path())
            self._add(_UNREADABLE, where, self._child_path())
            return
        value, size = self.anchors[name]
        self._count(size, where)  # what expansion would cost, without expanding anything
        self._add(value, where, self._child_path())

    def _scalar(self, event: Any) -> None:
        mark = event.start_mark
        where = (mark.line + 1, mark.column + 1)
        self._count(1, where)
        path = self._child_path()
        tag, text = event.tag, event.value
        if tag is None or tag == "!":
            if not event.implicit[0]:  # quoted: always text
                value = text
            elif text in self.plain:  # resolving is most of the cost; configs repeat values
                value = self.plain[text]
            else:
                tag = self.loader.resolve(yaml.ScalarNode, text, event.implicit)
                if tag == _MERGE_TAG and self._at_key():
                    self.stack[-1].key = _MERGE
                    return
                if tag == _INT_TAG and not _CANONICAL_INT.fullmatch(text):
                    tag = _STR_TAG  # YAML 1.1 reads 0105 as octal 69 and 1:30 as 90
                value = self._construct(tag, event, where, path)
                if value is not _UNREADABLE:
                    self.plain[text] = value
        else:
            value = self._construct(tag, event, where, path)
        if event.anchor:
            self.anchors[str(event.anchor)] = (value, 1)
        self._add(value, where, path)

    def _construct(self, tag: str, event: Any, where: Where, path: Key) -> Any:
        if tag == _STR_TAG:
            return event.value
        constructor = self.loader.yaml_constructors.get(tag) if tag in _SCALAR_TAGS else None
        if constructor is None:
            self._problem(where, path, f"tag {_show_tag(tag)} is not supported here")
        else:
            node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark)
            try:
                return constructor(self.loader, node)
            except Exception:  # PyYAML's constructors fail with Index-, Key-, ValueError...
                shown = "this value" if _is_secret(path) else _short(event.value)
                self._problem(where, path, f"{shown} is not a valid {tag.rsplit(':', 1)[-1]}")
        self.doc.unreadable.add(path)
        return _UNREADABLE

    def _open(self, event: yaml.CollectionStartEvent) -> None:
        where = _where(event.start_mark)
        if len(self.stack) >= MAX_DEPTH:
            raise _Stop(where, f"nesting is deeper than {MAX_DEPTH} levels")
        path = self._child_path()
        value: dict[str, Any] | list[Any] = (
            {} if isinstance(event, yaml.MappingStartEvent) else [])
        anchor = str(event.anchor) if event.anchor else None
        self.stack.append(_Frame(value, path, where, anchor, self.nodes))
        self._count(1, where)
        if event.tag not in _PLAIN_TAGS:
            self._problem(where, path, f"tag {_show_tag(str(event.tag))} is not supported here")
            self.doc.unreadable.add(path)
            self.stack[-1].unreadable = True

    def _close(self) -> None:
        frame = self.stack.pop()
        if isinstance(frame.value, dict):
            self._merge(frame, frame.value)
        value = _UNREADABLE if frame.unreadable else frame.value
        if frame.anchor:
            self.anchors[frame.anchor] = (value, self.nodes - frame.start_nodes)
        self._add(value, frame.where, frame.path)

    def _merge(self, frame: _Frame, into: dict[str, Any]) -> None:
        """Apply ``<<: *anchor`` merges: explicit keys win, then earlier merges."""
        for value, where in frame.merges:
            for source in value if isinstance(value, list) else [value]:
                if not isinstance(source, dict):
                    self._problem(where, frame.path,
                                  "a merge (<<) takes a mapping or a list of mappings")
                    continue
                self._count(len(source), where)
                for key, item in source.items():
                    if key not in into:
                        into[key] = item
                        path = (*frame.path, key)
                        self.doc.values[path] = where
                        self.doc.keys[path] = where

    def _at_key(self) -> bool:
        return bool(self.stack) and isinstance(self.stack[-1].value, dict) and (
            self.stack[-1].key is _NO_KEY)

    def _child_path(self) -> Key:
        if not self.stack:
            return ()
        top = self.stack[-1]
        if isinstance(top.value, list):
            return (*top.path, len(top.value))
        if isinstance(top.key, str):
            return (*top.path, top.key)
        return (*top.path, "<<") if top.key is _MERGE else top.path

    def _add(self, value: Any, where: Where, path: Key) -> None:
        """Put ``value`` (found at ``path``) into its parent, or make it a key of it."""
        if value is _UNREADABLE:  # reported already; a key is dropped, a value becomes null
            if self._at_key():
                self.stack[-1].key = _BAD_KEY
                return
            value = None
        if not self.stack:
            self.doc.root, self.doc.empty = value, False
            self.doc.values[()] = where
            return
        top = self.stack[-1]
        if isinstance(top.value, list):
            top.value.append(value)
            self.doc.values[path] = where
        elif top.key is _NO_KEY:
            top.key = self._key(top, value, where)
        else:
            key, top.key = top.key, _NO_KEY
            if key is _MERGE:
                top.merges.append((value, where))
            elif key is not _BAD_KEY:
                top.value[key] = value
                self.doc.values[path] = where

    def _key(self, top: _Frame, key: Any, where: Where) -> Any:
        if not isinstance(key, str):
            self._problem(where, top.path, f"keys must be text, got {_describe(key)}")
            return _BAD_KEY
        assert isinstance(top.value, dict)
        path = (*top.path, key)
        if key in top.value:
            first = self.doc.keys[path][0]
            self._problem(where, path, f"duplicate key (first at line {first})")
            return _BAD_KEY
        self.doc.keys[path] = where
        return key


# -- messages ---------------------------------------------------------------------------------

_SAFE_KEY = re.compile(r"[A-Za-z0-9_.<>-]{1,40}", re.ASCII)
_SECRET_KEYS = {"token", "api_token", "access_token", "bearer", "bearer_token", "auth_token",
                "oauth_token", "password", "secret"}
_NO_TOKEN = ("never put the token in the file; set token_env (an environment variable name) "
             "or token_file")


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _describe(value: Any) -> str:
    """A short, bounded rendering of ``value`` for a message; containers are never expanded."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if isinstance(value, str):
        return _short(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 64 else "a very large number"
    if isinstance(value, (date, float)):
        return _short(str(value)).strip("'")
    return f"a {type(value).__name__} value"


def _show_key(key: str) -> str:
    # A key that looks like a credential (long, or many digits) is not repeated back.
    if _SAFE_KEY.fullmatch(key) and sum(c.isdigit() for c in key) <= 4:
        return key
    return "<key>"


def _path_text(path: Key) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + _show_key(part)
    return text


def _is_secret(path: Key) -> bool:
    """Values under ``api`` and the database URL are never quoted: they may hold secrets."""
    return path[:1] == ("api",) or path[:2] == ("history", "url")


# -- validation -----------------------------------------------------------------------------------

T = TypeVar("T")
Convert = Callable[[Any], T]


class _Checker:
    """Collects located problems while sections are read from the document's values."""

    def __init__(self, file: str, doc: _Doc) -> None:
        self.file, self.doc = file, doc
        self.problems = [ConfigProblem(file, line, col, _path_text(path), message)
                         for (line, col), path, message in doc.problems]
        if doc.empty and not doc.fatal:
            self.problems.append(ConfigProblem(
                file, 1, 1, "", "the file is empty; it needs at least a jobs: list"))

    def where(self, path: Key, *, key: bool = False) -> Where:
        if key and path in self.doc.keys:
            return self.doc.keys[path]
        while path and path not in self.doc.values:
            path = path[:-1]  # a missing key is reported where its mapping starts
        return self.doc.values.get(path, (1, 1))

    def error(self, path: Key, message: str, *, key: bool = False) -> None:
        if path in self.doc.unreadable:
            return  # its value could not be read, which is reported already
        line, col = self.where(path, key=key)
        self.problems.append(ConfigProblem(self.file, line, col, _path_text(path), message))

    def mapping(self, path: Key, value: Any, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        """``value`` if it is a mapping (its unknown keys reported), else None (reported)."""
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping with keys {', '.join(allowed)}, "
                             f"got {_describe(value)}")
            return None
        for key in value:
            if key not in allowed:
                self.error((*path, key), _unknown_key(key, allowed), key=True)
        return value

    def section(self, data: dict[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        value = data.get(key)
        return {} if value is None else self.mapping((key,), value, allowed) or {}

    def convert(self, path: Key, value: Any, convert: Convert[T], default: T) -> T:
        try:
            return convert(value)
        except _Invalid as exc:
            message = str(exc)
            if not _is_secret(path) and not exc.quoted:
                message += f", got {_describe(value)}"
            self.error(path, message)
            return default

    def get(self, path: Key, data: dict[str, Any], key: str, convert: Convert[T],
            default: T) -> T:
        if key not in data:
            return default
        return self.convert((*path, key), data[key], convert, default)


def _unknown_key(key: str, allowed: tuple[str, ...]) -> str:
    if key.lower() in _SECRET_KEYS:
        return _NO_TOKEN
    close = difflib.get_close_matches(key[:60], allowed, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; allowed keys are {', '.join(allowed)}"


def _as_int(low: int, high: int) -> Convert[int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _Invalid(f"must be a whole number from {low} to {high}")
        return value
    return convert


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


def _as_duration(minimum: timedelta = _ZERO, too_small: str = "") -> Convert[timedelta]:
    def convert(value: Any) -> timedelta:
        if value == 0 and type(value) is int:
            delta = _ZERO  # a bare 0 needs no unit
        elif isinstance(value, str):
            delta = _duration(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            raise _Invalid(f"{_DURATION_HELP}; a bare number has no unit")
        else:
            raise _Invalid(_DURATION_HELP)
        if delta < minimum:
            raise _Invalid(too_small)
        return delta
    return convert


def _as_seconds(minimum: timedelta = _ZERO, too_small: str = "") -> Convert[float]:
    duration = _as_duration(minimum, too_small)
    return lambda value: duration(value).total_seconds()


def _as_retention(value: Any) -> timedelta | None:
    delta = None if value is None else _as_duration()(value)
    return delta or None  # 0 keeps rows forever, like null


def _as_rate(value: Any) -> Rate:
    return _rate(value)


def _as_id(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**20:
        return str(value)
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,20}", value):
        return value
    raise _Invalid("must be digits only (an id like 105)")


def _as_optional_id(value: Any) -> str | None:
    return None if value is None else _as_id(value)


def _as_name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", value):
        raise _Invalid("must be 1 to 100 letters, digits, '.', '_' or '-'")
    return value


def _as_version(value: Any) -> int:
    if type(value) is not int or value != 1:
        raise _Invalid("must be 1 (the only config version so far)")
    return value


@functools.lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones() | {"UTC"})


def _as_timezone(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid("must be an IANA timezone name like UTC or Europe/Berlin")
    if value in _zones():
        return value
    same_case = {zone.lower(): zone for zone in _zones()}.get(value.lower())
    close = [same_case] if same_case else difflib.get_close_matches(value[:60], _zones(), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "use an IANA name like Europe/Berlin"
    raise _Invalid(f"unknown timezone {_short(value)}; {hint}", quoted=True)


def _as_cron(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("must be a cron expression like '*/15 8-18 * * mon-fri' or @daily")
    if len(value) > 200:
        raise _Invalid("is too long for a cron expression (5 fields or an @alias)")
    try:
        _check_cron(value)
    except ValueError as exc:
        raise _Invalid(str(exc), quoted=True) from None
    return value


@functools.lru_cache(maxsize=512)
def _check_cron(expr: str) -> str:
    from scheduler.triggers import check_cron  # triggers imports this module's types

    return check_cron(expr)


def _as_time(tz: str) -> Convert[datetime]:
    def convert(value: Any) -> datetime:
        if isinstance(value, datetime):
            moment = value
        elif isinstance(value, date):
            moment = datetime(value.year, value.month, value.day)
        elif isinstance(value, str):
            moment = _iso_time(value)
        else:
            raise _Invalid(_TIME_HELP)
        return _aware(moment, zoneinfo.ZoneInfo(tz))
    return convert


def _split_url(value: Any, schemes: tuple[str, ...], what: str) -> SplitResult:
    if not isinstance(value, str) or len(value) > 2000:
        raise _Invalid(what)
    try:
        parts = urlsplit(value.strip())
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise _Invalid(what) from None
    if parts.scheme.lower() not in schemes or not parts.hostname:
        raise _Invalid(what)
    return parts


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _as_base_url(value: Any) -> str:
    parts = _split_url(value, ("http", "https"), "must be an https:// URL like "
                       "https://api.thousandeyes.com/v7")
    if parts.username is not None or parts.query or parts.fragment:
        raise _Invalid("must be a plain https:// URL without credentials, query or fragment")
    if parts.scheme.lower() == "http" and not _is_loopback(parts.hostname or ""):
        raise _Invalid("must use https (plain http is only allowed for a loopback host "
                       "such as 127.0.0.1 or localhost)")
    return str(value).strip().rstrip("/")


def _as_proxy(value: Any) -> str | None:
    if value is None:
        return None
    schemes = ("http", "https", "socks4", "socks4a", "socks5", "socks5h")
    _split_url(value, schemes, "must be null or a proxy URL like http://proxy:3128 "
               f"(schemes {', '.join(schemes)})")
    return str(value).strip()


def _as_env_name(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,99}", value):
        raise _Invalid("must be the name of an environment variable (letters, digits, _), "
                       "not the token itself")
    return value


def _as_path(base: Path) -> Convert[Path]:
    def convert(value: Any) -> Path:
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            raise _Invalid("must be the path of a file holding the token")
        return Path(os.path.abspath(base / Path(value.strip()).expanduser()))
    return convert


def _as_db_url(base: Path) -> Convert[str]:
    def convert(value: Any) -> str:
        from sqlalchemy.engine import make_url  # heavy import, only when a URL is given

        help_ = "must be a database URL like sqlite:///history.db or postgresql+psycopg://host/db"
        if not isinstance(value, str) or not value.strip():
            raise _Invalid(help_)
        try:
            backend = make_url(value.strip()).get_backend_name()
        except Exception:  # SQLAlchemy raises ArgumentError, ValueError or KeyError here
            raise _Invalid(help_) from None
        if backend == "postgres":
            raise _Invalid("must start with postgresql:// (SQLAlchemy does not know postgres://)")
        if backend not in ("sqlite", "postgresql"):
            raise _Invalid(f"{help_} (sqlite or postgresql)")
        return _resolve_sqlite(value.strip(), base) if backend == "sqlite" else value.strip()
    return convert


def _resolve_sqlite(url: str, base: Path) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db`` against the config file's folder."""
    prefix, sep, rest = url.partition(":///")
    database, query_sep, query = rest.partition("?")
    if not sep or not database or database.startswith(("/", ":memory:", "file:")):
        return url
    absolute = os.path.abspath(base / Path(database).expanduser())
    return f"{prefix}:///{absolute}{query_sep}{query}"


def _as_listen(value: Any) -> tuple[str, int] | None:
    help_ = "must be null or host:port like 127.0.0.1:9464, [::1]:9464 or :9464"
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = f":{value}"
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]*):(\d{1,5})",
                         value.strip(), re.ASCII) if isinstance(value, str) else None
    if match is None:
        raise _Invalid(help_)
    host, port = match[1] or match[3] or "127.0.0.1", int(match[2] or match[4])
    if match[1]:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(help_) from None
    if not 1 <= port <= 65535:
        raise _Invalid("port must be from 1 to 65535")
    return host, port


# -- sections -------------------------------------------------------------------------------------

_TOP_KEYS = ("version", "api", "history", "metrics", "defaults", "jobs")
_API_KEYS = ("base_url", "token_env", "token_file", "timeout", "concurrency", "rate_limit",
             "verify_tls", "proxy")
_DEFAULT_KEYS = ("aid", "timezone", "retry", "catch_up", "spread")
_RETRY_KEYS = ("attempts", "backoff", "max_backoff")
_JOB_KEYS = ("name", "tests", "schedule", "enabled", *_DEFAULT_KEYS)
_KINDS = ("cron", "every", "at")
_SCHEDULE_KEYS = (*_KINDS, "timezone", "start")
_SECOND = timedelta(seconds=1)
_TINY = timedelta(microseconds=1)


@dataclass(frozen=True)
class _Defaults:
    """The ``defaults:`` section, merged into every job that does not override a key."""

    aid: str | None = None
    timezone: str = "UTC"
    retry: RetryPolicy = RetryPolicy()
    catch_up: timedelta = timedelta(hours=1)
    spread: timedelta = _ZERO


def _build_config(ck: _Checker, path: Path, root: Any) -> Config | None:
    if root is None and ck.problems:
        return None
    if not isinstance(root, dict):
        ck.error((), f"the top level must be a mapping with keys {', '.join(_TOP_KEYS)}, "
                     f"got {_describe(root)}")
        return None
    top = ck.mapping((), root, _TOP_KEYS) or {}
    ck.get((), top, "version", _as_version, 1)
    base = path.parent
    return Config(
        path=path,
        api=_api(ck, ck.section(top, "api", _API_KEYS), base),
        history=_history(ck, ck.section(top, "history", ("url", "retention")), base),
        metrics=MetricsConfig(ck.get(("metrics",), ck.section(top, "metrics", ("listen",)),
                                     "listen", _as_listen, None)),
        jobs=_jobs(ck, top, _defaults(ck, ck.section(top, "defaults", _DEFAULT_KEYS))),
    )


def _api(ck: _Checker, data: dict[str, Any], base: Path) -> ApiConfig:
    p, d = ("api",), ApiConfig()
    token_env = ck.get(p, data, "token_env", _as_env_name, None)
    token_file = ck.get(p, data, "token_file", _as_path(base), None)
    if token_file is not None and token_env is not None:
        ck.error((*p, "token_file"), "set token_env or token_file, not both", key=True)
    return ApiConfig(
        base_url=ck.get(p, data, "base_url", _as_base_url, d.base_url),
        token_env=None if token_file else token_env or DEFAULT_TOKEN_ENV,
        token_file=token_file,
        timeout=ck.get(p, data, "timeout", _as_seconds(_TINY, "must be longer than 0s"),
                       d.timeout),
        concurrency=ck.get(p, data, "concurrency", _as_int(1, 256), d.concurrency),
        rate_limit=ck.get(p, data, "rate_limit", _as_rate, d.rate_limit),
        verify_tls=ck.get(p, data, "verify_tls", _as_bool, d.verify_tls),
        proxy=ck.get(p, data, "proxy", _as_proxy, d.proxy),
    )


def _history(ck: _Checker, data: dict[str, Any], base: Path) -> HistoryConfig:
    p, d = ("history",), HistoryConfig()
    return HistoryConfig(
        url=ck.get(p, data, "url", _as_db_url(base), None) or _resolve_sqlite(d.url, base),
        retention=ck.get(p, data, "retention", _as_retention, d.retention),
    )


def _defaults(ck: _Checker, data: dict[str, Any]) -> _Defaults:
    p, d = ("defaults",), _Defaults()
    retry = _retry(ck, (*p, "retry"), data["retry"], d.retry) if "retry" in data else d.retry
    return _Defaults(
        aid=ck.get(p, data, "aid", _as_optional_id, d.aid),
        timezone=ck.get(p, data, "timezone", _as_timezone, d.timezone),
        retry=retry,
        catch_up=ck.get(p, data, "catch_up", _as_duration(), d.catch_up),
        spread=ck.get(p, data, "spread", _as_duration(), d.spread),
    )


def _retry(ck: _Checker, path: Key, value: Any, base: RetryPolicy) -> RetryPolicy:
    data = ck.mapping(path, value, _RETRY_KEYS)
    if data is None:
        return base
    attempts = ck.get(path, data, "attempts", _as_int(1, 20), base.attempts)
    backoff = ck.get(path, data, "backoff", _as_seconds(), base.backoff)
    max_backoff = ck.get(path, data, "max_backoff", _as_seconds(), base.max_backoff)
    if max_backoff < backoff:
        key = "max_backoff" if "max_backoff" in data else "backoff"
        ck.error((*path, key), f"max_backoff ({max_backoff:g}s) must be at least "
                               f"backoff ({backoff:g}s)")
        max_backoff = backoff
    return RetryPolicy(attempts, backoff, max_backoff)


def _jobs(ck: _Checker, top: dict[str, Any], defaults: _Defaults) -> tuple[Job, ...]:
    raw = top.get("jobs")
    if not isinstance(raw, list) or not raw:
        shown = "" if raw in (None, []) else f", got {_describe(raw)}"
        ck.error(("jobs",), f"at least one job is required (each with name, tests, schedule)"
                            f"{shown}")
        return ()
    first_lines: dict[str, int] = {}
    jobs = (_job(ck, ("jobs", i), item, defaults, first_lines) for i, item in enumerate(raw))
    return tuple(job for job in jobs if job is not None)


def _job(ck: _Checker, path: Key, value: Any, dflt: _Defaults,
         first_lines: dict[str, int]) -> Job | None:
    data = ck.mapping(path, value, _JOB_KEYS)
    if data is None:
        return None
    before = len(ck.problems)
    name = _job_name(ck, path, data, first_lines)
    tests = _tests(ck, (*path, "tests"), data)
    tz = ck.get(path, data, "timezone", _as_timezone, dflt.timezone)
    schedule = _schedule(ck, (*path, "schedule"), data, tz)
    retry = _retry(ck, (*path, "retry"), data["retry"], dflt.retry) if "retry" in data else (
        dflt.retry)
    job = Job(
        name=name or "", tests=tests, schedule=schedule or Schedule(),
        aid=ck.get(path, data, "aid", _as_optional_id, dflt.aid),
        enabled=ck.get(path, data, "enabled", _as_bool, True),
        retry=retry,
        catch_up=ck.get(path, data, "catch_up", _as_duration(), dflt.catch_up),
        spread=ck.get(path, data, "spread", _as_duration(), dflt.spread),
        line=ck.where(path)[0],
    )
    return job if len(ck.problems) == before else None


def _job_name(ck: _Checker, path: Key, data: dict[str, Any],
              first_lines: dict[str, int]) -> str | None:
    if "name" not in data:
        ck.error((*path, "name"), "is required (letters, digits, '.', '_', '-')")
        return None
    name = ck.get(path, data, "name", _as_name, None)
    line = ck.where((*path, "name"))[0]
    if name is not None and name in first_lines:
        ck.error((*path, "name"), f"duplicate job name {name!r}; the first is at line "
                                  f"{first_lines[name]}")
    elif name is not None:
        first_lines[name] = line
    return name


def _tests(ck: _Checker, path: Key, data: dict[str, Any]) -> tuple[str, ...]:
    raw = data.get("tests")
    if not isinstance(raw, list) or not raw:
        want = "a non-empty list of instant test ids like [105, 106]"
        missing = "tests" not in data
        ck.error(path, f"is required: {want}" if missing else f"must be {want}, got "
                                                              f"{_describe(raw)}")
        return ()
    tests: list[str] = []
    for i, item in enumerate(raw):
        test = ck.convert((*path, i), item, _as_id, None)
        if test is not None and test in tests:
            ck.error((*path, i), f"duplicate test id {test} in this job")
        elif test is not None:
            tests.append(test)
    return tuple(tests)


def _schedule(ck: _Checker, path: Key, job: dict[str, Any], tz: str) -> Schedule | None:
    if "schedule" not in job:
        ck.error(path, "is required: a mapping with one of cron, every or at")
        return None
    data = ck.mapping(path, job["schedule"], _SCHEDULE_KEYS)
    if data is None:
        return None
    kinds = sorted((kind for kind in _KINDS if kind in data),
                   key=lambda kind: ck.where((*path, kind), key=True))
    if len(kinds) != 1:
        where = (*path, kinds[1]) if kinds else path
        both = f"has both {kinds[0]} and {kinds[1]}; it " if kinds else ""
        ck.error(where, f"{both}needs exactly one of cron, every or at", key=bool(kinds))
        return None
    tz = ck.get(path, data, "timezone", _as_timezone, tz)
    if "start" in data and kinds != ["every"]:
        ck.error((*path, "start"), "only goes with every (it anchors the interval)", key=True)
    if "cron" in data:
        cron = ck.get(path, data, "cron", _as_cron, None)
        return Schedule(tz, cron=cron) if cron else None
    if "every" in data:
        every = ck.get(path, data, "every", _as_duration(_SECOND, "must be at least 1s"), None)
        start = ck.get(path, data, "start", _as_time(tz), None)
        return Schedule(tz, every=every, start=start) if every else None
    at = ck.get(path, data, "at", _as_time(tz), None)
    return Schedule(tz, at=at) if at else None
