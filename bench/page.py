"""The status page at size: ``python -m bench.page [--jobs 10000] [--rows 10000000] [--db PATH]``.

Builds (once, or reuses ``--db``) a SQLite history of ``--rows`` attempts over 90 days spread
over ``--jobs`` jobs of one test each, with bench.history_tool's generator, writes a jobs.yaml
of those jobs, and times the status page's answers through its WSGI app in this process
(query, planner and template included; no socket): the overview's first, a middle and a
filtered page, a job page, its tenth page of attempts (``?before=``) and the JSON API. Each
is asked ``--repeat`` times after one warm-up; the median and the worst are printed, with the
targets (overview < 300 ms, job page < 100 ms). A number, not a timed test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import history_tool

TARGETS_MS = {"overview": 300.0, "job": 100.0}


def build(db: Path, jobs: int, rows: int) -> None:
    """A migrated history of ``rows`` attempts over 90 days: job-0 .. job-{jobs-1}."""
    history_tool.PAIRS, history_tool.TESTS_PER_JOB = jobs, 1  # job-N has one test
    result = history_tool.generate(db, rows)
    print(f"generated {rows:,} rows for {jobs:,} jobs in {result['seconds']:.0f} s")


def write_config(path: Path, db: Path, jobs: int) -> Path:
    """jobs.yaml with the generated jobs on assorted schedules."""
    lines = ["version: 1", "history:", f"  url: sqlite:///{db}", "jobs:"]
    schedules = ("{every: 5m}", '{cron: "*/15 * * * *", timezone: Europe/Berlin}', "{every: 1h}")
    for n in range(jobs):
        lines += [
            f"  - name: job-{n}",
            f'    tests: ["{100000 + n}"]',
            f"    schedule: {schedules[n % len(schedules)]}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(app: Any, path: str, repeat: int) -> tuple[list[float], int]:
    """Milliseconds of each of ``repeat`` GETs of ``path`` (after one warm-up), body size."""
    route, _, query = path.partition("?")
    size = 0
    times = []
    for i in range(repeat + 1):
        status: list[str] = []
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": route, "QUERY_STRING": query}
        began = time.perf_counter()
        body = b"".join(app(environ, lambda s, h, e=None: status.append(s)))
        elapsed = (time.perf_counter() - began) * 1000
        if not status[0].startswith("200"):
            raise SystemExit(f"{path}: {status[0]} {body[:200]!r}")
        size = len(body)
        if i:
            times.append(elapsed)
    return times, size


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.page")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--db", type=Path, help="reuse (or build here) this history file")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()

    from scheduler import config as config_mod
    from scheduler.store import db
    from scheduler.web.api import status_routes
    from scheduler.web.app import Router

    work = Path(tempfile.mkdtemp(prefix="bench-page-"))
    path = args.db or work / "history.db"
    if not path.exists():
        build(path, args.jobs, args.rows)
    config = config_mod.load(write_config(work / "jobs.yaml", path.resolve(), args.jobs))
    engine = db.make_engine(f"sqlite:///{path}")
    app = Router(status_routes(engine, lambda: config))
    middle = max(1, args.jobs // 200)
    job = f"job-{args.jobs // 2}"
    before = _tenth_page_anchor(app, job)
    cases = [
        ("overview", "/"),
        ("overview", f"/?page={middle}"),
        ("overview", "/?q=job-12"),
        ("overview", "/api/v1/jobs"),
        ("job", f"/jobs/{job}"),
        ("job", f"/jobs/{job}?before={before}"),
        ("job", f"/api/v1/jobs/{job}/attempts?limit=50"),
    ]
    print(f"{args.jobs:,} jobs, history {path} ({path.stat().st_size / 1e9:.1f} GB)")
    for kind, url in cases:
        times, size = timed(app, url, args.repeat)
        median, worst = statistics.median(times), max(times)
        verdict = "ok" if median < TARGETS_MS[kind] else "SLOW"
        print(
            f"{url:<45} median {median:7.1f} ms  worst {worst:7.1f} ms  "
            f"{size / 1024:6.0f} KiB  target < {TARGETS_MS[kind]:.0f} ms  {verdict}"
        )


def _tenth_page_anchor(app: Any, job: str) -> int:
    """The ``before=`` id that shows the job's tenth page of 50 attempts."""
    import json

    before = ""
    for _ in range(9):
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": f"/api/v1/jobs/{job}/attempts",
            "QUERY_STRING": f"limit=50{before}",
        }
        data = json.loads(b"".join(app(environ, lambda s, h, e=None: None)))
        if data["next_before"] is None:
            break
        before = f"&before={data['next_before']}"
    return int(before.rpartition("=")[2] or 1)


if __name__ == "__main__":
    main()
