"""Logging set-up: grep-friendly text by default, one JSON object per line with ``json``.

Attempt lines carry structured fields (job, test, run_id, attempt, status, outcome,
duration, lag) through ``extra=``; the JSON formatter emits them as keys. A filter scrubs
every secret we know of (the API token) from every record, whatever logged it: a long
secret wherever it occurs, a short one only as a whole token.

Text lines carry untrusted text (API error bodies, exception messages), so the text formatter
keeps each record on one line of printable characters: controls, bidi overrides and line
breaks are written as ``\\xNN``/``\\uNNNN`` escapes. A value logged inside double quotes
(``job="%s"``, or an argument that is a whole `` key="value"`` field) has its ``"`` and ``\\``
escaped, so it cannot close its quotes and forge another field. JSON lines need none of
this: ``json.dumps`` escapes them (``ensure_ascii``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")

# A record's message and arguments as logged, kept by SecretFilter for the text formatter.
_ORIGINAL = "_te_original"
# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    _ORIGINAL,
}


# A secret this long cannot turn up inside other text by chance, so it is masked wherever
# it occurs (also glued to other characters, as in a percent-encoded header). A shorter one
# (a test token like "abc") would garble every word that contains it: masked only as a
# whole token. ThousandEyes tokens are 36-character UUIDs.
MASK_ANYWHERE = 8
# RFC 6750 b64token characters: a short secret counts only where none of them touch it.
_TOKEN_CHAR = r"A-Za-z0-9\-._~+/"


class SecretFilter(logging.Filter):
    """Replaces known secrets with ``***`` in a record's message, fields and traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, secret: str) -> None:
        """Mask ``secret`` from now on."""
        self.secrets.add(secret)
        self._pattern = secrets_pattern(self.secrets)

    def scrub(self, text: str) -> str:
        """``text`` with every known secret replaced by ``***``."""
        return self._pattern.sub("***", text) if self._pattern else text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._pattern is None:
            return True
        if not hasattr(record, _ORIGINAL):  # the text formatter rebuilds the message from these
            setattr(record, _ORIGINAL, (record.msg, record.args, self.scrub))
        record.msg, record.args = self.scrub(record.getMessage()), None
        for key, value in vars(record).items():
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, self.scrub(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = _PLAIN.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        return True


def secrets_pattern(secrets: set[str]) -> re.Pattern[str]:
    """One regex for all secrets, longest first so a secret inside another is not cut."""
    ordered = sorted(secrets, key=len, reverse=True)
    anywhere = [re.escape(s) for s in ordered if len(s) >= MASK_ANYWHERE]
    whole = [re.escape(s) for s in ordered if len(s) < MASK_ANYWHERE]
    if whole:
        anywhere.append(f"(?<![{_TOKEN_CHAR}])(?:{'|'.join(whole)})(?![{_TOKEN_CHAR}])")
    return re.compile("|".join(anywhere))


_secrets = SecretFilter()
_PLAIN = logging.Formatter()


def add_secret(secret: str) -> None:
    """Never let ``secret`` reach a log line."""
    if secret:
        _secrets.add(secret)


class TextFormatter(logging.Formatter):
    """``2026-11-27T06:00:00.123Z INFO scheduler.runner message``, one line, fields unforgeable."""

    converter = time.gmtime  # type: ignore[assignment]  # typeshed narrows gmtime's argument

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )

    def format(self, record: logging.LogRecord) -> str:
        msg, args, scrub = getattr(record, _ORIGINAL, (record.msg, record.args, _no_secrets))
        saved = record.msg, record.args
        record.msg, record.args = safe_message(msg, args, scrub), None
        try:
            return super().format(record)
        finally:
            record.msg, record.args = saved


# A printf conversion, to find the ones written between double quotes (``job="%s"``).
_CONVERSION = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?([a-zA-Z%])")
# An argument that is a whole optional field, as the runner logs `` error="..."``.
_FIELD = re.compile(r'( ?[A-Za-z_]+=)"(.*)"', re.DOTALL)


def _no_secrets(text: str) -> str:
    return text


def safe_message(msg: object, args: Any, scrub: Callable[[str], str] = _no_secrets) -> str:
    """``msg % args`` on one printable line, quoted values escaped (see the module docstring).

    ``scrub`` masks secrets; it runs before anything is escaped, which could split a secret.
    """
    text = str(msg)
    if isinstance(args, tuple) and args:
        quoted = _quoted_arguments(text)
        args = tuple(_safe_argument(arg, i in quoted, scrub) for i, arg in enumerate(args))
    if args:
        text = text % args
    return printable(scrub(text))


def _quoted_arguments(fmt: str) -> set[int]:
    """Indexes of the ``%s`` arguments that ``fmt`` writes between double quotes."""
    found, index = set(), 0
    for match in _CONVERSION.finditer(fmt):
        if match[1] == "%":
            continue
        index += match[0].count("*")  # a ``*`` width or precision takes an argument first
        before, after = fmt[match.start() - 1 : match.start()], fmt[match.end() : match.end() + 1]
        if match[1] == "s" and before == after == '"':
            found.add(index)
        index += 1
    return found


def _safe_argument(arg: object, quoted: bool, scrub: Callable[[str], str]) -> object:
    if quoted:
        return _escape_quotes(scrub(str(arg)))
    if isinstance(arg, str):
        field = _FIELD.fullmatch(arg)
        if field:
            return f'{field[1]}"{_escape_quotes(scrub(field[2]))}"'
    return arg


def _escape_quotes(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def printable(text: str) -> str:
    """``text`` with every non-printable character (controls, bidi overrides, zero-width and
    other format characters, line breaks) written as a ``\\xNN``/``\\uNNNN`` escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info and not record.exc_text:  # as logging.Formatter caches it
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # SecretFilter has scrubbed it
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Send te-scheduler's logs to stderr at ``level`` in ``fmt``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_secrets)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries are chatty at INFO; their warnings still come through.
    for noisy in ("apscheduler", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
