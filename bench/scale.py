"""Scenario 4: scale and idle. N jobs: start-up to the first firing, resident memory, idle CPU.

Both sides run as programs: ``te-scheduler run`` (an already migrated SQLite history, logging at
its default, info) and ``python -m bench.bare``. The N jobs (one test each; half daily cron
jobs, half ``every: 24h``) are all hours away, so nothing fires while they idle.

* Start-up: a run whose config also has ten probe jobs, ``every: 1s`` at phases 0.0, 0.1 ...
  0.9 s, listed after the N jobs: time from launching the process to the server receiving the
  first probe call (so it is at most 0.1 s late).
* Memory and idle CPU: a second run without the probes, started alongside the first (each
  start-up has one of the two cores), given 1.5 times that start-up (or until it goes quiet);
  then both sides are sampled over the same idle window (RSS at its end) and stopped before
  the next size.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from bench.common import ProcSample, env, ratio, sample
from bench.report import Section, fmt, prose
from bench.server import Server
from bench.settings import Settings

PROBE_BASE = 99000
PROBES = 10
STARTUP_TIMEOUT = 180.0
TARGET_STARTUP, TARGET_RSS, TARGET_IDLE = 3.0, 2.5, 1.0


def jobs(n: int, probes: bool, now: float) -> list[dict[str, Any]]:
    """The job list both sides load: N far-off jobs, then the probes."""
    out: list[dict[str, Any]] = []
    for i in range(1, n + 1):
        if i % 2:
            out.append({"test": str(i), "every": 86400, "start": now + 6 * 3600 + i})
        else:
            later = datetime.fromtimestamp(now, timezone.utc) + timedelta(hours=3, minutes=i % 600)
            out.append({"test": str(i), "cron": f"{later.minute} {later.hour} * * *"})
    if probes:
        anchor = math.floor(now)
        out += [
            {"test": str(PROBE_BASE + k), "every": 1, "start": anchor + k / PROBES}
            for k in range(PROBES)
        ]
    return out


def te_config(items: list[dict[str, Any]], base_url: str, db_url: str, per_job: int = 1) -> str:
    """The jobs as jobs.yaml; ``per_job`` > 1 groups that many tests under the first's schedule
    (the probes always stay one job each)."""
    lines = [
        "version: 1",
        "api:",
        f"  base_url: {base_url}",
        "  token_env: BENCH_TOKEN",
        "  rate_limit: 999999999/s",
        "history:",
        f"  url: {db_url}",
        "jobs:",
    ]
    probes = [item for item in items if int(item["test"]) >= PROBE_BASE]
    plain = [item for item in items if int(item["test"]) < PROBE_BASE]
    groups = [plain[i : i + per_job] for i in range(0, len(plain), per_job)]
    for group in groups + [[probe] for probe in probes]:
        item = group[0]
        if "cron" in item:
            schedule = f"{{cron: '{item['cron']}'}}"
        else:
            start = datetime.fromtimestamp(item["start"], timezone.utc).isoformat()
            schedule = f"{{every: {item['every']}s, start: '{start}'}}"
        tests = ", ".join(f"'{member['test']}'" for member in group)
        lines.append(f"  - {{name: j{item['test']}, tests: [{tests}], schedule: {schedule}}}")
    return "\n".join(lines) + "\n"


def launch(
    side: str, n: int, probes: bool, base_url: str, workdir: Path, per_job: int = 1
) -> subprocess.Popen:
    """Write the side's job file and start it; stdout and stderr go to a log file."""
    items = jobs(n, probes, time.time())
    tag = f"{side}-{n}-{'probe' if probes else 'idle'}"
    if side == "te":
        from scheduler.store import db

        db_path = workdir / f"{tag}-{per_job}.db"
        engine = db.make_engine(f"sqlite:///{db_path}")
        db.upgrade(engine)  # a normal restart, not a first start
        engine.dispose()
        config = workdir / f"{tag}.yaml"
        config.write_text(te_config(items, base_url, f"sqlite:///{db_path}", per_job))
        args = [sys.executable, "-m", "scheduler", "-c", str(config), "run"]
    else:
        path = workdir / f"{tag}.json"
        path.write_text(json.dumps(items))
        args = [sys.executable, "-m", "bench.bare", str(path), base_url]
    log = (workdir / f"{tag}.log").open("w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=workdir)


def refusal(workdir: Path, side: str, n: int) -> str:
    """The last line the probe run logged (why it exited), for the report."""
    try:
        lines = (workdir / f"{side}-{n}-probe.log").read_text().strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1].split(": ", 1)[-1][:160] if lines else "no output"


def settle(proc: subprocess.Popen, launched: float, startup_s: float) -> None:
    """Wait out the process's start-up: 1.5 times the probe run's, or until it goes quiet."""
    if math.isnan(startup_s):
        startup_s = STARTUP_TIMEOUT / 1.5
    deadline = launched + min(STARTUP_TIMEOUT, 1.5 * startup_s + 3.0)
    try:
        last = sample(proc.pid)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1.0)
            now = sample(proc.pid)
            if now.cpu - last.cpu < 0.02:  # under 2% of a core over a second: started
                return
            last = now
    except (KeyError, OSError):
        return  # it exited (a zombie has no memory figures): the caller sees that


def run(settings: Settings) -> Section:
    section = Section("scale", "4. Scale and idle", "python -m bench", intro=prose(__doc__))
    workdir = settings.case_dir("scale")
    starts: dict[tuple[str, int], float] = {}
    before: dict[tuple[str, int], ProcSample] = {}
    after: dict[tuple[str, int], ProcSample] = {}
    with Server(workdir, "idle") as idle_server:
        for n in settings.scale_sizes:
            _size(settings, n, workdir, idle_server.url, starts, before, after, section.notes)
    _report(section, settings, starts, before, after, len(idle_server.records))
    return section


def _size(
    settings: Settings,
    n: int,
    workdir: Path,
    idle_url: str,
    starts: dict[tuple[str, int], float],
    before: dict[tuple[str, int], ProcSample],
    after: dict[tuple[str, int], ProcSample],
    notes: list[str],
) -> None:
    """Start-up of both sides with N jobs, then their idle CPU and memory side by side."""
    idle: dict[str, subprocess.Popen] = {}
    try:
        for side in ("bare", "te"):
            per_job = 1
            while True:
                start, idle[side] = _start(side, n, workdir, idle_url, per_job)
                if not math.isnan(start) or side != "te" or per_job > 1:
                    break
                # te-scheduler refused the file (e.g. its config size cap): say so, and
                # measure the same number of scheduled tests as jobs of five tests each.
                idle[side].kill()
                idle[side].wait()
                notes.append(
                    f"te-scheduler with {n:,} one-test jobs did not start: "
                    f"{refusal(workdir, side, n)}. Its row is {n // 5:,} jobs of 5 "
                    f"tests ({n:,} scheduled tests)."
                )
                per_job = 5
            starts[(side, n)] = start
        first = {side: sample(proc.pid) for side, proc in idle.items() if proc.poll() is None}
        time.sleep(settings.idle_seconds)
        for side, proc in idle.items():
            if side in first and proc.poll() is None:
                before[(side, n)], after[(side, n)] = first[side], sample(proc.pid)
    finally:
        for proc in idle.values():
            proc.kill()
            proc.wait()


def _start(
    side: str, n: int, workdir: Path, idle_url: str, per_job: int
) -> tuple[float, subprocess.Popen]:
    """Launch the probe run and the idle run; the probe run's start-up (nan if it failed)."""
    with Server(workdir, f"startup-{side}-{n}", announce=str(PROBE_BASE)[:3]) as server:
        launched, mono = time.time(), time.monotonic()
        probe = launch(side, n, True, server.url, workdir, per_job)
        idle = launch(side, n, False, idle_url, workdir, per_job)
        hit = None
        while hit is None and probe.poll() is None and time.monotonic() - mono < STARTUP_TIMEOUT:
            hit = server.wait_announce(1.0)
        probe.kill()
        probe.wait()
    start = hit[0] - launched if hit else math.nan
    if idle.poll() is None:
        settle(idle, mono, start)
    return start, idle


def _report(
    section: Section,
    settings: Settings,
    starts: dict[tuple[str, int], float],
    before: dict[tuple[str, int], ProcSample],
    after: dict[tuple[str, int], ProcSample],
    calls: int,
) -> None:
    rows: list[list[Any]] = []
    for n in settings.scale_sizes:
        for side in ("bare", "te"):
            data = _figures(starts[(side, n)], before.get((side, n)), after.get((side, n)))
            section.data[f"{side}-{n}"] = data
            rows.append(
                [
                    n,
                    "te-scheduler" if side == "te" else "bare script",
                    data["startup_s"],
                    data["rss_mb"],
                    data["peak_mb"],
                    f"{data['idle_cpu_pct']:.2f}",
                    data["threads"],
                ]
            )
        te, bare = section.data[f"te-{n}"], section.data[f"bare-{n}"]
        section.ratio(
            f"te-scheduler / bare start-up with {n:,} jobs",
            ratio(te["startup_s"], bare["startup_s"]),
        )
        section.ratio(
            f"te-scheduler / bare RSS with {n:,} jobs",
            ratio(te["rss_mb"], bare["rss_mb"]),
            f"<= {TARGET_RSS} at 10,000",
        )
    section.table(
        [
            "jobs",
            "side",
            "start-up s",
            "RSS MB",
            "peak RSS MB",
            f"idle CPU % of a core ({settings.idle_seconds:g} s)",
            "threads",
        ],
        rows,
    )
    at = 10_000 if 10_000 in settings.scale_sizes else max(settings.scale_sizes)
    te, bare = section.data[f"te-{at}"], section.data[f"bare-{at}"]
    rss = ratio(te["rss_mb"], bare["rss_mb"])
    section.target(
        f"4. start-up, {at:,} jobs",
        f"< {TARGET_STARTUP:g} s",
        f"{fmt(te['startup_s'], 2)} s",
        te["startup_s"] < TARGET_STARTUP,
    )
    section.target(
        f"4. RSS ratio, {at:,} jobs",
        f"<= {TARGET_RSS}x",
        f"{fmt(rss, 2)}x ({fmt(te['rss_mb'])} vs {fmt(bare['rss_mb'])} MB)",
        rss <= TARGET_RSS,
    )
    section.target(
        f"4. idle CPU, {at:,} jobs",
        f"< {TARGET_IDLE:g}% of a core",
        f"{fmt(te['idle_cpu_pct'], 2)}%",
        te["idle_cpu_pct"] < TARGET_IDLE,
    )
    section.notes.append(f"Calls received while idling: {calls} (expected 0).")


def _figures(startup: float, b: ProcSample | None, a: ProcSample | None) -> dict[str, Any]:
    """One side's figures; nan where its idle run did not survive."""
    if a is None or b is None:
        return {
            "startup_s": startup,
            "rss_mb": math.nan,
            "peak_mb": math.nan,
            "idle_cpu_pct": math.nan,
            "threads": None,
        }
    return {
        "startup_s": startup,
        "rss_mb": a.rss_mb,
        "peak_mb": a.hwm_mb,
        "idle_cpu_pct": (a.cpu - b.cpu) / max(1e-9, a.at - b.at) * 100,
        "threads": a.threads,
    }
