"""Where te-scheduler's time goes: cProfile of one attempt and of start-up, in their own processes.

* Attempt: ``Runner.fire`` run back to back in one thread against the fast server (a real
  SQLite history, the real Limiter and Caller, logging as ``te-scheduler run`` sets it up), next
  to the bare script's ``run_test`` under the same profiler;
* Start-up: ``config.load`` of a jobs file with N jobs, ``Daemon(...)`` and ``Daemon.start()``
  (the jobs of scenario 4, so nothing fires).

The tables list te-scheduler's own functions by cumulative time (callers include their callees)
and the library functions with the most time of their own. ``python -m bench.profile KIND OUT N``.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from bench.common import env
from bench.report import Section, prose
from bench.server import Server
from bench.settings import Settings

TOP_PRODUCT, TOP_LIBRARY = 14, 6


def _summary(profiler: cProfile.Profile, divide: int) -> dict[str, Any]:
    stats = pstats.Stats(profiler)
    product, library = [], []
    for (file, _line, name), (_cc, calls, tot, cum, _callers) in stats.stats.items():
        where = f"{_short(file)}:{name}"
        if "/scheduler/" in file and "site-packages" not in file:
            product.append([where, calls, cum / divide * 1e6, tot / divide * 1e6])
        elif file != "~":
            library.append([where, calls, tot / divide * 1e6])
    product.sort(key=lambda row: -row[2])
    library.sort(key=lambda row: -row[2])
    return {
        "product": product[:TOP_PRODUCT],
        "library": library[:TOP_LIBRARY],
        "total_us": stats.total_tt / divide * 1e6,
    }


def _short(file: str) -> str:
    for marker in ("/scheduler/", "/site-packages/", "/lib/python3"):
        if marker in file:
            return (
                file.split(marker, 1)[1]
                if marker != "/scheduler/"
                else "scheduler/" + file.split(marker, 1)[1]
            )
    return Path(file).name


def _cpu_us(fn: Any, n: int) -> float:
    """CPU microseconds per call of ``fn(i)`` over ``n`` calls in this thread."""
    started = time.thread_time()
    for i in range(n):
        fn(i)
    return (time.thread_time() - started) / n * 1e6


def profile_attempt(base_url: str, n: int, workdir: Path) -> dict[str, Any]:
    from bench import bare
    from scheduler import clock
    from scheduler.api.client import Caller
    from scheduler.api.limiter import Limiter
    from scheduler.config import ApiConfig, Job, Schedule
    from scheduler.config.model import Rate
    from scheduler.logs import setup_logging
    from scheduler.runner import Firing, Runner
    from scheduler.store import db, history

    setup_logging("info", "text")
    engine = db.make_engine(f"sqlite:///{workdir / 'profile.db'}")
    db.upgrade(engine)
    stop = threading.Event()
    caller = Caller(ApiConfig(base_url=base_url, concurrency=16), "bench-token")
    limiter = Limiter(Rate(10**9, 1.0), stop)
    runner = Runner(engine, caller.send, limiter, stop, concurrency=16)
    job = Job(name="profile", tests=("1",), schedule=Schedule(every=timedelta(hours=1)))
    slot = datetime.now(timezone.utc).replace(microsecond=0)

    def fire(i: int, base: int = 0) -> None:
        runner.fire(Firing(job, str(base + i), slot))

    def write(i: int) -> None:
        key = history.AttemptKey(f"p{i}", "profile-w", str(i), None, "schedule", slot, 1, "b:1")
        row = history.start_attempt(engine, key, clock.now())
        history.finish_attempt(
            engine,
            row,
            finished_at=clock.now(),
            outcome="success",
            status_code=200,
            error=None,
            duration_ms=1,
        )

    def pace(i: int) -> None:
        limiter.complete(limiter.acquire(slot), None)  # type: ignore[arg-type]

    for i in range(20):  # warm the pools, the statement cache and the connections
        fire(i, 10**6)
        bare.run_test(base_url, "1")
    parts = [
        [
            "bare script: run_test (requests.post)",
            _cpu_us(lambda i: bare.run_test(base_url, "1"), n),
        ],
        ["te-scheduler: Caller.send", _cpu_us(lambda i: caller.send("1", None), n)],
        ["te-scheduler: history.start_attempt + finish_attempt", _cpu_us(write, n)],
        ["same two statements through sqlite3 directly", _raw_writes(workdir, n)],
        ["te-scheduler: Limiter.acquire + complete", _cpu_us(pace, n)],
        ["te-scheduler: Runner.fire (the whole attempt)", _cpu_us(lambda i: fire(i, 2 * 10**6), n)],
    ]
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(n):
        fire(i, 3 * 10**6)
    profiler.disable()
    return {"parts": parts, "te": _summary(profiler, n)}


def _raw_writes(workdir: Path, n: int) -> float:
    """The floor for a history write: the same INSERT and UPDATE with the sqlite3 module."""
    import sqlite3

    con = sqlite3.connect(workdir / "profile.db", isolation_level=None)
    con.execute("PRAGMA synchronous=NORMAL")
    insert = (
        'INSERT INTO attempts (run_id, job, test_id, aid, "trigger", scheduled_for, attempt, '
        "started_at, finished_at, outcome, error, instance) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
        "ON CONFLICT (job, test_id, scheduled_for, attempt) DO NOTHING RETURNING id"
    )
    update = (
        "UPDATE attempts SET finished_at=?, outcome=?, status_code=?, error=?, "
        "duration_ms=? WHERE id=?"
    )

    def write(i: int) -> None:
        now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
        con.execute("BEGIN IMMEDIATE")
        row = con.execute(
            insert,
            (
                f"r{i}",
                "profile-raw",
                str(i),
                None,
                "schedule",
                now,
                1,
                now,
                None,
                "pending",
                None,
                "b:1",
            ),
        ).fetchone()
        con.execute("COMMIT")
        con.execute("BEGIN IMMEDIATE")
        con.execute(update, (now, "success", 200, None, 1, row[0]))
        con.execute("COMMIT")

    try:
        return _cpu_us(write, n)
    finally:
        con.close()


def profile_startup(base_url: str, n: int, workdir: Path) -> dict[str, Any]:
    from bench.scale import jobs, te_config
    from scheduler.config import load
    from scheduler.daemon import Daemon
    from scheduler.logs import setup_logging
    from scheduler.store import db

    setup_logging("info", "text")
    url = f"sqlite:///{workdir / 'startup.db'}"
    engine = db.make_engine(url)
    db.upgrade(engine)
    path = workdir / "startup.yaml"
    path.write_text(te_config(jobs(n, False, time.time()), base_url, url))
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    daemon = Daemon(load(path), engine)
    daemon.start()
    profiler.disable()
    wall = time.perf_counter() - started
    daemon.shutdown()
    summary = _summary(profiler, 1)
    summary["wall_s"] = wall
    return summary


def run(settings: Settings) -> Section:
    section = Section(
        "profile", "7. Where te-scheduler's time goes", "python -m bench", intro=prose(__doc__)
    )
    workdir = settings.case_dir("profile")
    startup_jobs = 200 if settings.quick else 2_000
    with Server(workdir, "profile") as server:
        attempt = _child("attempt", server.url, settings.profile_attempts, workdir)
        startup = _child("startup", server.url, startup_jobs, workdir)
    section.data = {"attempt": attempt, "startup": startup}
    parts, te = attempt["parts"], attempt["te"]
    section.table(
        ["one attempt, single thread", "CPU us per call"],
        parts,
        "CPU time of each piece, measured without a profiler",
    )
    total = max(te["total_us"], 1e-9)
    section.table(
        [
            "te-scheduler function (Runner.fire under cProfile)",
            "calls",
            "% of the attempt (cumulative)",
            "% (own)",
        ],
        [[w, c, cum / total * 100, tot / total * 100] for w, c, cum, tot in te["product"]],
    )
    section.table(
        ["library function (te-scheduler's attempt)", "calls", "% of the attempt (own)"],
        [[w, c, tot / total * 100] for w, c, tot in te["library"]],
    )
    by_name = {name: value for name, value in parts}
    section.ratio(
        "history write through SQLAlchemy / the same statements through sqlite3",
        by_name["te-scheduler: history.start_attempt + finish_attempt"]
        / max(by_name["same two statements through sqlite3 directly"], 1e-9),
    )
    section.ratio(
        "te-scheduler Runner.fire / bare run_test, CPU per attempt",
        by_name["te-scheduler: Runner.fire (the whole attempt)"]
        / max(by_name["bare script: run_test (requests.post)"], 1e-9),
    )
    section.table(
        ["te-scheduler function", "calls", "s (cumulative)", "s (own)"],
        [[w, c, cum / 1e6, tot / 1e6] for w, c, cum, tot in startup["product"]],
        f"start-up with {startup_jobs:,} jobs: {startup['wall_s']:.2f} s "
        "(config.load + Daemon + Daemon.start, under the profiler)",
    )
    section.table(
        ["library function (start-up)", "calls", "s (own)"],
        [[w, c, tot / 1e6] for w, c, tot in startup["library"]],
    )
    section.ratio(f"profiled start-up with {startup_jobs:,} jobs / 3 s", startup["wall_s"] / 3.0)
    return section


def _child(kind: str, base_url: str, n: int, workdir: Path) -> dict[str, Any]:
    out = workdir / f"{kind}.json"
    with (workdir / f"{kind}.log").open("w") as log:
        subprocess.run(
            [sys.executable, "-m", "bench.profile", kind, str(out), str(n), base_url],
            env=env(),
            cwd=workdir,
            stdout=log,
            stderr=log,
            timeout=600,
            check=True,
        )
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def main() -> None:
    kind, out, n, base_url = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    run_kind = profile_attempt if kind == "attempt" else profile_startup
    out.write_text(json.dumps(run_kind(base_url, n, out.parent)))


if __name__ == "__main__":
    main()
