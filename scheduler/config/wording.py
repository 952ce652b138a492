"""How a jobs.yaml problem is worded: key paths, bounded values, and what must never be shown."""

from __future__ import annotations

import difflib
import re
from datetime import date
from typing import Any

Key = tuple["str | int", ...]  # where a value sits in the document: ("jobs", 0, "name")

SECRET_KEYS = frozenset(
    {
        "token",
        "api_token",
        "access_token",
        "bearer",
        "bearer_token",
        "auth_token",
        "oauth_token",
        "password",
        "secret",
    }
)
NO_TOKEN = (
    "never put the token in the file; set token_env (an environment variable name) or token_file"
)
# Values under these keys, at any depth, are never quoted: they are or may hold credentials.
_SECRET_PARTS = SECRET_KEYS | {"notify", "webhook", "ping_url"}
_SAFE_KEY = re.compile(r"[A-Za-z0-9_.<>-]{1,40}", re.ASCII)


def short(text: str, limit: int = 60) -> str:
    """``text`` quoted, cut to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def describe(value: Any) -> str:
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
        return short(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 64 else "a very large number"
    if isinstance(value, (date, float)):
        return short(str(value)).strip("'")
    return f"a {type(value).__name__} value"


def is_secret(path: Key) -> bool:
    """Whether the value at ``path`` must never be quoted (api, database URL, notify, tokens)."""
    if path[:1] == ("api",) or path[:2] == ("history", "url"):
        return True
    return any(isinstance(part, str) and part.lower() in _SECRET_PARTS for part in path)


def show_key(key: str) -> str:
    """``key`` as written, unless it looks like a credential (long, or many digits)."""
    if _SAFE_KEY.fullmatch(key) and sum(c.isdigit() for c in key) <= 4:
        return key
    return "<key>"


def path_text(path: Key) -> str:
    """``("jobs", 0, "name")`` -> ``jobs[0].name``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + show_key(part)
    return text


def unknown_key(key: str, allowed: tuple[str, ...]) -> str:
    """The message for a key that is not allowed: a did-you-mean, or the allowed keys."""
    if key.lower() in SECRET_KEYS:
        return NO_TOKEN
    close = difflib.get_close_matches(key[:60], allowed, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; allowed keys are {', '.join(allowed)}"
