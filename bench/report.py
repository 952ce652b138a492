"""Sections of the report: built by the scenarios, printed as they finish, kept as JSON, rendered.

A section is plain data (so ``results.json`` holds everything and a later run can re-render a
section it did not run, such as the soak): a title, the command, what was measured, tables,
ratio lines, targets with their verdicts, and notes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ORDER = ("server", "lag", "cost", "makespan", "scale", "history", "profile", "results", "soak")


@dataclass
class Target:
    """One target of the issue and what was measured against it."""

    what: str
    target: str
    measured: str
    ok: bool | None  # None: not measured in this run


@dataclass
class Section:
    """One scenario's results."""

    key: str
    title: str
    command: str
    intro: str = ""
    tables: list[dict[str, Any]] = field(default_factory=list)
    ratios: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))

    def table(self, columns: list[str], rows: list[list[Any]], caption: str = "") -> None:
        self.tables.append({"caption": caption, "columns": columns, "rows": rows})

    def ratio(self, what: str, value: float, target: str = "") -> None:
        suffix = f" (target {target})" if target else ""
        self.ratios.append(f"{what}: {fmt(value, 2)}x{suffix}")

    def target(self, what: str, target: str, measured: str, ok: bool | None) -> None:
        self.targets.append(Target(what, target, measured, ok))


def fmt(value: Any, digits: int = 1) -> str:
    """A number for a table: fixed digits, thousands separated; text passes through."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def verdict(ok: bool | None) -> str:
    return {True: "**met**", False: "**MISSED**", None: "not run"}[ok]


def render_section(section: Section) -> str:
    """The section as Markdown."""
    out = [f"## {section.title}", "", f"`{section.command}` ({section.date})", ""]
    if section.intro:
        out += [section.intro, ""]
    for table in section.tables:
        if table["caption"]:
            out += [f"*{table['caption']}*", ""]
        out.append("| " + " | ".join(table["columns"]) + " |")
        out.append("|" + "|".join("---" for _ in table["columns"]) + "|")
        for row in table["rows"]:
            out.append("| " + " | ".join(fmt(cell) for cell in row) + " |")
        out.append("")
    for line in section.ratios:
        out.append(f"- Ratio, {line}")
    if section.ratios:
        out.append("")
    if section.targets:
        out += ["| target | wanted | measured | verdict |", "|---|---|---|---|"]
        for t in section.targets:
            out.append(f"| {t.what} | {t.target} | {t.measured} | {verdict(t.ok)} |")
        out.append("")
    for note in section.notes:
        out.append(f"- {note}")
    if section.notes:
        out.append("")
    return "\n".join(out)


def render(sections: dict[str, Section], header: dict[str, Any]) -> str:
    """The whole RESULTS.md."""
    machine = header["machine"]
    out = [
        "# te-scheduler benchmarks: against the bare minimum, side by side",
        "",
        "Written by `python -m bench` (every table but the soak) and `python -m bench --soak`"
        " (the soak). Do not edit by hand; rerun instead.",
        "",
        f"- Date: {header['date']}",
        f"- Commands: {', '.join(f'`{c}`' for c in header['commands'])}",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB; "
        f"{machine['os']}; Python {machine['python']}, SQLite {machine['sqlite']}, "
        f"APScheduler {machine['apscheduler']}, requests {machine['requests']}, "
        f"SQLAlchemy {machine['sqlalchemy']}; te-scheduler at {machine['commit']}",
        f"- Other load on the machine: {header.get('load', 'not measured')}",
        f"- Wall time of the run: {fmt(header.get('wall_s'), 0)} s",
        "",
        *(
            [
                "**Quick mode**: smoke-test sizes; the figures and verdicts below only show that "
                "every scenario runs and reports.",
                "",
            ]
            if header.get("quick")
            else []
        ),
        "The floor is `bench/bare.py`: APScheduler `BackgroundScheduler` + `ThreadPoolExecutor(16)`"
        " + `requests.post` on one `Session`, no history, no limits. te-scheduler is the real"
        " product code (its `Daemon`, or the `te-scheduler run` process for start-up and memory)."
        " Each side runs in its own process against a server in a third process.",
        "",
    ]
    summary = [t for key in ORDER if key in sections for t in sections[key].targets]
    if summary:
        out += [
            "## Targets at a glance",
            "",
            "| target | wanted | measured | verdict |",
            "|---|---|---|---|",
        ]
        out += [f"| {t.what} | {t.target} | {t.measured} | {verdict(t.ok)} |" for t in summary]
        out.append("")
    for key in ORDER:
        if key in sections:
            out.append(render_section(sections[key]))
    return "\n".join(out).rstrip() + "\n"


def load_sections(path: Path) -> tuple[dict[str, Section], dict[str, Any]]:
    """Sections and header kept by an earlier run (nothing when there is no file)."""
    if not path.exists():
        return {}, {}
    try:
        raw = json.loads(path.read_text())
        sections = {}
        for key, value in raw.get("sections", {}).items():
            value["targets"] = [Target(**t) for t in value.get("targets", [])]
            sections[key] = Section(**value)
        return sections, raw.get("header", {})
    except (ValueError, TypeError, KeyError):
        return {}, {}


def save(path: Path, sections: dict[str, Section], header: dict[str, Any]) -> None:
    """Write the JSON results and the Markdown report beside it."""
    data = {"header": header, "sections": {k: asdict(v) for k, v in sections.items()}}
    path.with_suffix(".json").write_text(json.dumps(data, indent=1, default=_plain) + "\n")
    path.write_text(render(sections, header))


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def prose(doc: str | None) -> str:
    """A module docstring, less its summary line, as Markdown (``x`` -> `x`, * bullets kept)."""
    paragraphs = (doc or "").strip().split("\n\n")[1:]
    out = []
    for paragraph in paragraphs:
        items: list[str] = []
        for line in paragraph.splitlines():
            text = line.strip()
            if text.startswith("* ") or not items:
                items.append(text)
            else:
                items[-1] += " " + text
        joined = "\n".join(f"- {i[2:]}" if i.startswith("* ") else i for i in items)
        out.append(joined.replace("``", "`"))
    return "\n\n".join(out)
