"""Scenario results: N runs due at once, at the instant-test limit, with their results read back.

Two real daemons (``te-scheduler run``) side by side, each against its own in-process
simulator (instant-test bucket L per window, organization bucket 10 L, 3 agents, results
readable after the default 5 s, two results a page): one with ``results: {fetch: true}``, one
with ``fetch: false``. A job of N = L tests of mixed types fires every window for a few rounds,
so the reads of one round overlap the next round's run calls. Measured from the simulators'
own records: HTTP results requests and round reads per accepted run, 429s of run calls and of
reads, and each run call's lateness (arrival - its slot) with and without reading results.
"""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from bench import common
from bench.report import Section, fmt, prose
from bench.settings import Settings
from scheduler.api.simulator import ReceivedRequest, Simulator

TAIL = 150.0  # seconds after the last round for follow-ups to end (page-load: 60 s + settle)


class CountingSimulator(Simulator):
    """The simulator, also keeping each answer's status (429s are what this scenario counts)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.answers: list[tuple[str, str, int, float]] = []  # method, path, status, arrival

    def _answer(self, request: ReceivedRequest) -> Any:
        answer = super()._answer(request)
        self.answers.append((request.method, request.path, answer.status, request.received_at))
        return answer


@dataclass(frozen=True)
class Case:
    limit: int
    window: float
    rounds: int


def case_of(settings: Settings) -> Case:
    return Case(6, 10.0, 2) if settings.quick else Case(24, 60.0, 3)


def run(settings: Settings) -> Section:
    case = case_of(settings)
    section = Section(
        "results",
        "Results of each rerun: read cost and run-call lateness",
        "python -m bench --only results",
        intro=prose(__doc__)
        + f" Here N = L = {case.limit} per {case.window:g} s, {case.rounds} rounds.",
    )
    found: dict[bool, dict[str, Any]] = {}
    threads = [
        threading.Thread(target=lambda f=fetch: found.__setitem__(f, _side(settings, case, f)))
        for fetch in (True, False)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    on, off = found[True], found[False]
    section.data = {"fetch": on, "no-fetch": off}
    rows = []
    for label, o in (("results fetched", on), ("results off", off)):
        rows.append(
            [
                label,
                o["runs"],
                o["run_429"],
                o["read_requests"],
                o["read_429"],
                o["requests_per_run"],
                o["round_reads_per_run"],
                o["lag_p50"],
                o["lag_max"],
                o["states"],
            ]
        )
    section.table(
        [
            "side",
            "accepted runs",
            "run 429s",
            "results requests",
            "read 429s",
            "requests/run",
            "round reads/run",
            "run lag p50 s",
            "run lag max s",
            "results states",
        ],
        rows,
    )
    worse = on["lag_max"] - off["lag_max"]
    section.target(
        "results: round reads per run",
        "<= 3 on average",
        fmt(on["round_reads_per_run"], 2),
        on["round_reads_per_run"] <= 3,
    )
    section.target(
        "results: reads never delay a run call",
        "0 run 429s; max run lag within 0.5 s of the side without results",
        f"{on['run_429']} x 429; max lag {fmt(on['lag_max'], 2)} s vs {fmt(off['lag_max'], 2)} s",
        on["run_429"] == 0 and worse <= 0.5,
    )
    section.notes.append(
        "requests/run counts every HTTP request of the reader (each page, GET /tests) per "
        "accepted run; round reads/run counts reads of a run's round (followups.reads). Run "
        "lag is the simulator's arrival time of a run call minus its slot (the job's anchor "
        "plus whole windows), so it includes the limiter's waits for the instant-test bucket."
    )
    return section


def _side(settings: Settings, case: Case, fetch: bool) -> dict[str, Any]:
    folder = settings.case_dir(f"results-{'on' if fetch else 'off'}")
    folder.mkdir(parents=True, exist_ok=True)
    sim = CountingSimulator(
        token=common.TOKEN,
        org_limit=case.limit * 10,
        instant_limit=case.limit,
        window=case.window,
    )
    sim.start()
    start = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=5)
    tests = ", ".join(str(1000 + i) for i in range(case.limit))
    config = folder / "jobs.yaml"
    text = (
        "version: 1\n"
        f"api:\n  base_url: {sim.url}\n  token_env: BENCH_TOKEN\n"
        f"  rate_limit: {case.limit}/{case.window:g}s\n"
        f"history:\n  url: sqlite:///{folder / 'history.db'}\n"
        f"defaults:\n  retry: {{attempts: 1}}\n  results: {{fetch: {str(fetch).lower()}}}\n"
        "jobs:\n  - name: burst\n"
        f"    tests: [{tests}]\n"
        f'    schedule: {{every: {case.window:g}s, start: "{start.isoformat()}"}}\n'
    )
    config.write_text(text)
    log = (folder / "daemon.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "scheduler", "-c", str(config), "run"],
        cwd=folder,
        env=common.env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        last_slot = start.timestamp() + (case.rounds - 1) * case.window
        cut = last_slot + case.window * 0.9
        _sleep_until(cut)
        # No more rounds: the job is disabled by a reload; its follow-ups go on.
        config.write_text(
            text.replace("  - name: burst\n", "  - name: burst\n    enabled: false\n")
        )
        proc.send_signal(signal.SIGHUP)
        deadline = time.time() + TAIL
        while fetch and time.time() < deadline and _waiting(folder / "history.db"):
            time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        sim.stop()
    return _figures(sim, folder / "history.db", start.timestamp(), case, cut)


def _sleep_until(when: float) -> None:
    while (left := when - time.time()) > 0:
        time.sleep(min(left, 1.0))


def _waiting(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(
            conn.execute("SELECT count(*) FROM attempts WHERE results = 'waiting'").fetchone()[0]
        )


def _figures(
    sim: CountingSimulator, db: Path, start: float, case: Case, cut: float
) -> dict[str, Any]:
    runs = [a for a in sim.answers if a[0] == "POST" and a[1].endswith("/run") and a[3] < cut]
    reads = [a for a in sim.answers if a[0] == "GET"]
    accepted = sum(1 for a in runs if a[2] == 200)
    lags = sorted(
        a[3] - (start + math.floor((a[3] - start) / case.window) * case.window) for a in runs
    )
    with sqlite3.connect(db) as conn:
        round_reads = conn.execute("SELECT coalesce(sum(reads), 0) FROM followups").fetchone()[0]
        states = dict(
            conn.execute(
                "SELECT coalesce(results, '-'), count(*) FROM attempts "
                "WHERE outcome = 'success' GROUP BY 1"
            ).fetchall()
        )
    all_runs = max(1, sum(states.values()))
    return {
        "runs": accepted,
        "run_429": sum(1 for a in runs if a[2] == 429),
        "read_requests": len(reads),
        "read_429": sum(1 for a in reads if a[2] == 429),
        "requests_per_run": len(reads) / all_runs,
        "round_reads_per_run": round_reads / all_runs,
        "lag_p50": common.percentile(lags, 50) if lags else math.nan,
        "lag_max": lags[-1] if lags else math.nan,
        "states": ", ".join(f"{k} {v}" for k, v in sorted(states.items())),
    }


if __name__ == "__main__":  # a quick look without the report: python -m bench.results
    import tempfile

    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        base = Settings.quick_run(Path(tmp)) if quick else Settings(workdir=Path(tmp))
        from bench.report import render_section

        print(render_section(run(base)))
