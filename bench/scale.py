"""Scenario 4: scale and idle. N jobs: start-up to the first firing, resident memory, idle CPU.

Both sides run as programs: ``te-scheduler run`` (an already migrated SQLite history, logging at
its default, info) and ``python -m bench.bare``. The N jobs (one test each; half daily cron
jobs, half ``every: 24h``) are all hours away, so nothing fires while they idle.

* Start-up: a run whose config also has ten probe jobs, ``every: 1s`` at phases 0.0, 0.1 ...
  0.9 s, listed after the N jobs: time from launching the process to the server receiving the
  first probe call (so it is at most 0.1 s late).
* Memory and idle CPU: a second run without the probes, left to settle; then every such
  process is sampled at once over the same idle window (RSS at its end).
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
        out += [{"test": str(PROBE_BASE + k), "every": 1, "start": anchor + k / PROBES}
                for k in range(PROBES)]
    return out


def te_config(items: list[dict[str, Any]], base_url: str, db_url: str) -> str:
    lines = ["version: 1", "api:", f"  base_url: {base_url}", "  token_env: BENCH_TOKEN",
             "  rate_limit: 999999999/s", "history:", f"  url: {db_url}", "jobs:"]
    for item in items:
        name = f"j{item['test']}"
        if "cron" in item:
            schedule = f"{{cron: '{item['cron']}'}}"
        else:
            start = datetime.fromtimestamp(item["start"], timezone.utc).isoformat()
            schedule = f"{{every: {item['every']}s, start: '{start}'}}"
        lines.append(f"  - {{name: {name}, tests: ['{item['test']}'], schedule: {schedule}}}")
    return "\n".join(lines) + "\n"


def launch(side: str, n: int, probes: bool, base_url: str, workdir: Path) -> subprocess.Popen:
    """Write the side's job file and start it; stdout and stderr go to a log file."""
    items = jobs(n, probes, time.time())
    tag = f"{side}-{n}-{'probe' if probes else 'idle'}"
    if side == "te":
        from scheduler import db

        db_path = workdir / f"{tag}.db"
        engine = db.make_engine(f"sqlite:///{db_path}")
        db.upgrade(engine)  # a normal restart, not a first start
        engine.dispose()
        config = workdir / f"{tag}.yaml"
        config.write_text(te_config(items, base_url, f"sqlite:///{db_path}"))
        args = [sys.executable, "-m", "scheduler", "-c", str(config), "run"]
    else:
        path = workdir / f"{tag}.json"
        path.write_text(json.dumps(items))
        args = [sys.executable, "-m", "bench.bare", str(path), base_url]
    log = (workdir / f"{tag}.log").open("w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=workdir)


def startup(side: str, n: int, workdir: Path) -> float:
    """Seconds from launch to the first probe call reaching the server."""
    with Server(workdir, f"startup-{side}-{n}", announce=str(PROBE_BASE)[:3]) as server:
        launched = time.time()
        proc = launch(side, n, True, server.url, workdir)
        hit = server.wait_announce(STARTUP_TIMEOUT)
        proc.kill()
        proc.wait()
    return hit[0] - launched if hit else math.nan


def settle(proc: subprocess.Popen, timeout: float = STARTUP_TIMEOUT) -> None:
    """Wait until the process uses under 2% of a core over a second (its start-up is over)."""
    deadline = time.monotonic() + timeout
    last = sample(proc.pid)
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(1.0)
        now = sample(proc.pid)
        if now.cpu - last.cpu < 0.02:
            return
        last = now


def run(settings: Settings) -> Section:
    section = Section("scale", "4. Scale and idle", "python -m bench",
                      intro=prose(__doc__))
    workdir = settings.case_dir("scale")
    starts: dict[tuple[str, int], float] = {}
    idle: dict[tuple[str, int], subprocess.Popen] = {}
    with Server(workdir, "idle") as idle_server:
        try:
            for n in settings.scale_sizes:
                for side in ("bare", "te"):
                    starts[(side, n)] = startup(side, n, workdir)
                for side in ("bare", "te"):
                    idle[(side, n)] = launch(side, n, False, idle_server.url, workdir)
                for proc in idle.values():
                    settle(proc)
            before = {key: sample(proc.pid) for key, proc in idle.items()}
            time.sleep(settings.idle_seconds)
            after = {key: sample(proc.pid) for key, proc in idle.items()}
        finally:
            for proc in idle.values():
                proc.kill()
                proc.wait()
    calls = len(idle_server.records)
    _report(section, settings, starts, before, after, calls)
    return section


def _report(section: Section, settings: Settings, starts: dict[tuple[str, int], float],
            before: dict[tuple[str, int], ProcSample], after: dict[tuple[str, int], ProcSample],
            calls: int) -> None:
    rows: list[list[Any]] = []
    for n in settings.scale_sizes:
        for side in ("bare", "te"):
            b, a = before[(side, n)], after[(side, n)]
            idle_pct = (a.cpu - b.cpu) / max(1e-9, a.at - b.at) * 100
            data = {"startup_s": starts[(side, n)], "rss_mb": a.rss_mb, "peak_mb": a.hwm_mb,
                    "idle_cpu_pct": idle_pct, "threads": a.threads}
            section.data[f"{side}-{n}"] = data
            rows.append([n, "te-scheduler" if side == "te" else "bare script",
                         data["startup_s"], a.rss_mb, a.hwm_mb, f"{idle_pct:.2f}", a.threads])
        te, bare = section.data[f"te-{n}"], section.data[f"bare-{n}"]
        section.ratio(f"te-scheduler / bare start-up with {n:,} jobs",
                      ratio(te["startup_s"], bare["startup_s"]))
        section.ratio(f"te-scheduler / bare RSS with {n:,} jobs",
                      ratio(te["rss_mb"], bare["rss_mb"]), f"<= {TARGET_RSS} at 10,000")
    section.table(["jobs", "side", "start-up s", "RSS MB", "peak RSS MB",
                   f"idle CPU % of a core ({settings.idle_seconds:g} s)", "threads"], rows)
    at = 10_000 if 10_000 in settings.scale_sizes else max(settings.scale_sizes)
    te, bare = section.data[f"te-{at}"], section.data[f"bare-{at}"]
    rss = ratio(te["rss_mb"], bare["rss_mb"])
    section.target(f"4. start-up, {at:,} jobs", f"< {TARGET_STARTUP:g} s",
                   f"{fmt(te['startup_s'], 2)} s", te["startup_s"] < TARGET_STARTUP)
    section.target(f"4. RSS ratio, {at:,} jobs", f"<= {TARGET_RSS}x",
                   f"{fmt(rss, 2)}x ({fmt(te['rss_mb'])} vs {fmt(bare['rss_mb'])} MB)",
                   rss <= TARGET_RSS)
    section.target(f"4. idle CPU, {at:,} jobs", f"< {TARGET_IDLE:g}% of a core",
                   f"{fmt(te['idle_cpu_pct'], 2)}%", te["idle_cpu_pct"] < TARGET_IDLE)
    section.notes.append(f"Calls received while idling: {calls} (expected 0).")
