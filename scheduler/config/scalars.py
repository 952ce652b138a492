"""The scalar values of jobs.yaml: durations, rates, times, ids, names, timezones, cron.

Each ``as_*`` converter takes what the YAML held and returns the typed value or raises
:class:`Invalid` saying what is allowed; the checker adds where. ``parse_duration``,
``parse_rate`` and ``parse_when`` are the same rules for the CLI, raising ``ValueError``.
"""

from __future__ import annotations

import difflib
import functools
import re
import zoneinfo
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, TypeVar

from scheduler.config.model import Rate
from scheduler.config.wording import describe, short
from scheduler.timing.cron import check_cron

T = TypeVar("T")
Convert = Callable[[Any], T]

ZERO = timedelta(0)
DURATION_HELP = "must be a duration like 30s, 5m, 2h (units ms s m h d w)"
_RATE_HELP = (
    "must be a rate <count>/<period> like 24/min or 5/4s (the period a duration or sec, min, hour)"
)
_TIME_HELP = "must be an ISO-8601 time like 2026-12-01T09:00:00+01:00"
_UNIT_MICROS = {
    "ms": 1_000,
    "s": 10**6,
    "m": 60 * 10**6,
    "h": 3600 * 10**6,
    "d": 86400 * 10**6,
    "w": 604800 * 10**6,
}
_DURATION_RE = re.compile(r"(\d{1,15}(?:\.\d{0,9})?|\.\d{1,9})\s*(ms|s|m|h|d|w)", re.ASCII)
_RATE_RE = re.compile(r"(\d{1,9})\s*/\s*(\S{1,40})", re.ASCII)
_PERIOD_WORDS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
}
MAX_ID_DIGITS = 20  # ids are stored in String(32) columns; 20 digits hold any 64-bit id
_ID_RE = re.compile(rf"[0-9]{{1,{MAX_ID_DIGITS}}}", re.ASCII)
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,100}")
_ID_HELP = "must be digits only (an id like 105)"
_ID_TOO_LONG = f"must be an id of at most {MAX_ID_DIGITS} digits"


class Invalid(ValueError):
    """A value that breaks a rule; the message says what is allowed."""

    def __init__(self, message: str, *, quoted: bool = False) -> None:
        super().__init__(message)
        self.quoted = quoted  # the message already shows the value


# -- the public parsers (also used by the CLI) ----------------------------------------------------


def parse_duration(text: str) -> timedelta:
    """``15m`` -> 15 minutes: ``<number><unit>`` with units ms s m h d w; ``0`` is zero."""
    try:
        return duration(text)
    except Invalid as exc:
        raise ValueError(f"{describe(text)}: {exc}") from None


def parse_rate(text: str) -> Rate:
    """``24/min`` -> Rate(24, 60.0); the period a duration or sec, min, hour."""
    try:
        return rate(text)
    except Invalid as exc:
        raise ValueError(f"{describe(text)}: {exc}") from None


def parse_when(text: str, now: datetime) -> datetime:
    """An ISO-8601 time (naive means UTC) or a duration back from ``now``, as aware UTC."""
    try:
        return (now - duration(text)).astimezone(timezone.utc)
    except Invalid:
        pass
    except OverflowError:
        raise ValueError(f"{describe(text)}: reaches back before the year 1") from None
    try:
        moment = iso_time(text) if isinstance(text, str) else None
    except Invalid:
        moment = None
    if moment is None:
        raise ValueError(
            f"{describe(text)} is not a time: use an ISO-8601 time like 2026-01-31T08:00:00Z "
            "or a duration back from now like 15m, 24h, 7d"
        )
    try:
        return aware(moment, timezone.utc)
    except Invalid as exc:
        raise ValueError(f"{describe(text)}: {exc}") from None


def duration(text: object) -> timedelta:
    """The duration ``text`` stands for; Invalid when it is not one."""
    return _duration(text.strip() if isinstance(text, str) else "")


@functools.lru_cache(maxsize=1024)  # a big config repeats a few durations thousands of times
def _duration(stripped: str) -> timedelta:
    match = _DURATION_RE.fullmatch(stripped)
    if match is None:
        if stripped == "0":
            return ZERO
        if stripped.startswith("-"):
            raise Invalid("must not be negative (a duration like 30s, 5m, 2h; units ms s m h d w)")
        raise Invalid(DURATION_HELP)
    micros = Decimal(match[1]) * _UNIT_MICROS[match[2]]
    try:
        return timedelta(microseconds=int(micros))
    except OverflowError:
        raise Invalid("is too long (the limit is 999999999 days)") from None


def rate(text: object) -> Rate:
    """The rate ``text`` stands for; Invalid when it is not one."""
    match = _RATE_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise Invalid(_RATE_HELP)
    count, word = int(match[1]), match[2]
    if count < 1:
        raise Invalid("needs a count of at least 1, like 24/min")
    try:
        period = _PERIOD_WORDS.get(word) or duration(word).total_seconds()
    except Invalid:
        raise Invalid(_RATE_HELP) from None
    if period <= 0:
        raise Invalid("needs a period longer than 0s, like 24/min")
    return Rate(count, float(period))


def iso_time(text: str) -> datetime:
    """An ISO-8601 time, naive or aware, with ``Z`` accepted for UTC."""
    value = text.strip()
    if value.endswith(("Z", "z")):  # Python 3.10's fromisoformat has no "Z"
        value = value[:-1] + "+00:00"
    try:
        if len(value) > 64:
            raise ValueError
        return datetime.fromisoformat(value)
    except ValueError:
        raise Invalid(_TIME_HELP) from None


def aware(moment: datetime, tz: zoneinfo.ZoneInfo | timezone) -> datetime:
    """``moment`` with a timezone (naive means ``tz``), checked to be a usable instant."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    try:
        in_utc = moment.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise Invalid("must be a time between the years 1970 and 9999") from None
    if not 1970 <= in_utc.year <= 9998:
        raise Invalid("must be a time between the years 1970 and 9999")
    return moment if tz is not timezone.utc else in_utc


# -- converters -----------------------------------------------------------------------------------


def as_int(low: int, high: int) -> Convert[int]:
    """A whole number from ``low`` to ``high`` (true and false are not numbers)."""

    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise Invalid(f"must be a whole number from {low} to {high}")
        return value

    return convert


def as_bool(value: Any) -> bool:
    """true or false, nothing else."""
    if not isinstance(value, bool):
        raise Invalid("must be true or false")
    return value


def as_duration(minimum: timedelta = ZERO, too_small: str = "") -> Convert[timedelta]:
    """A duration with a unit (a bare 0 too) of at least ``minimum``."""

    def convert(value: Any) -> timedelta:
        if value == 0 and type(value) is int:
            delta = ZERO  # a bare 0 needs no unit
        elif isinstance(value, str):
            delta = duration(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            raise Invalid(f"{DURATION_HELP}; a bare number has no unit")
        else:
            raise Invalid(DURATION_HELP)
        if delta < minimum:
            raise Invalid(too_small)
        return delta

    return convert


def as_seconds(minimum: timedelta = ZERO, too_small: str = "") -> Convert[float]:
    """A duration as seconds."""
    convert = as_duration(minimum, too_small)
    return lambda value: convert(value).total_seconds()


def as_retention(value: Any) -> timedelta | None:
    """A duration, where null and 0 both mean forever."""
    delta = None if value is None else as_duration()(value)
    return delta or None  # 0 keeps rows forever, like null


def as_rate(value: Any) -> Rate:
    """A rate like 24/min."""
    return rate(value)


def as_id(value: Any) -> str:
    """An id (test or account group) as its digits; YAML's octal reading is undone already."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise Invalid(_ID_HELP)
    if isinstance(value, int):
        if value < 0:
            raise Invalid(_ID_HELP)
        if value >= 10**MAX_ID_DIGITS:
            raise Invalid(_ID_TOO_LONG)
        return str(value)
    if _ID_RE.fullmatch(value):
        return value
    raise Invalid(_ID_TOO_LONG if value.isascii() and value.isdigit() else _ID_HELP)


def as_optional_id(value: Any) -> str | None:
    """An id or null."""
    return None if value is None else as_id(value)


def as_name(value: Any) -> str:
    """A job name: 1 to 100 of letters, digits, '.', '_', '-' (the history column's size)."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise Invalid("must be 1 to 100 letters, digits, '.', '_' or '-'")
    return value


def as_version(value: Any) -> int:
    """The config version: 1."""
    if type(value) is not int or value != 1:
        raise Invalid("must be 1 (the only config version so far)")
    return value


@functools.lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones() | {"UTC"})


def as_timezone(value: Any) -> str:
    """An IANA timezone name, with a did-you-mean for a near miss."""
    if not isinstance(value, str) or not value:
        raise Invalid("must be an IANA timezone name like UTC or Europe/Berlin")
    if value in _zones():
        return value
    same_case = {zone.lower(): zone for zone in _zones()}.get(value.lower())
    close = [same_case] if same_case else difflib.get_close_matches(value[:60], _zones(), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "use an IANA name like Europe/Berlin"
    raise Invalid(f"unknown timezone {short(value)}; {hint}", quoted=True)


def as_cron(value: Any) -> str:
    """A cron expression that can fire, or an @alias."""
    if not isinstance(value, str) or not value.strip():
        raise Invalid("must be a cron expression like '*/15 8-18 * * mon-fri' or @daily")
    if len(value) > 200:
        raise Invalid("is too long for a cron expression (5 fields or an @alias)")
    try:
        _check_cron(value)
    except ValueError as exc:
        raise Invalid(str(exc), quoted=True) from None
    return value


@functools.lru_cache(maxsize=4096)  # crons repeat: one check per distinct expression
def _check_cron(expr: str) -> str:
    return check_cron(expr)


def as_time(tz: str) -> Convert[datetime]:
    """An ISO-8601 time (or a YAML timestamp); naive means ``tz``."""

    def convert(value: Any) -> datetime:
        if isinstance(value, datetime):
            moment = value
        elif isinstance(value, date):
            moment = datetime(value.year, value.month, value.day)
        elif isinstance(value, str):
            moment = iso_time(value)
        else:
            raise Invalid(_TIME_HELP)
        return aware(moment, zoneinfo.ZoneInfo(tz))

    return convert
