"""Rows -> text for people (an aligned table) or scripts (JSON, CSV); no printing here."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

FORMATS = ("table", "json", "csv")


def cell(value: Any) -> str:
    """One value as table text: times in UTC to the second, floats short, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def number(value: Any) -> Any:
    """A float as short decimal text (``1``, ``0.6667``), the same in a table and in CSV;
    anything else unchanged. Four places: a success rate to 0.01 %."""
    if not isinstance(value, float):
        return value
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def with_columns(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Each row with exactly ``columns`` as keys, in that order (missing ones None)."""
    return [{c: row.get(c) for c in columns} for row in rows]


def local_time(moment: datetime, zone: str) -> str:
    """``2026-11-27 08:00:00 CET``: a time as the people in ``zone`` read it."""
    return moment.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M:%S %Z")


def table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """An aligned plain-text table with a header line, which is there even with no rows.

    Like ``ps`` and ``docker ps``: the header alone says "nothing matched" where silence
    could be a failure, and a script skipping the first line works the same either way.
    """
    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in body)]) for i, c in enumerate(columns)]
    lines = [columns, *body]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def json_text(data: Any) -> str:
    """JSON with times as ISO-8601 strings."""
    return json.dumps(data, default=_json_default, indent=2)


def csv_text(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV with a header; times ISO-8601, None empty."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else _plain(row.get(c)) for c in columns])
    return out.getvalue().rstrip("\n")


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")
