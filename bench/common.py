"""Shared helpers: process readings from /proc, percentiles, machine facts, worker processes."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
TOKEN = "bench-token-7d1e"  # the bearer token every side sends; the servers accept any


@dataclass(frozen=True)
class ProcSample:
    """One reading of a process: CPU seconds so far, memory, threads, open descriptors."""

    at: float  # time.monotonic()
    cpu: float  # user + system seconds, all threads
    rss_mb: float
    hwm_mb: float  # peak resident set
    threads: int
    fds: int


def sample(pid: int) -> ProcSample:
    """Read /proc for ``pid`` (no psutil needed)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)
    status: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return ProcSample(
        at=time.monotonic(),
        cpu=cpu,
        rss_mb=int(status["VmRSS"].split()[0]) / 1024,
        hwm_mb=int(status["VmHWM"].split()[0]) / 1024,
        threads=int(status["Threads"]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
    )


def cpu_seconds() -> float:
    """This process's user + system CPU seconds, every thread included (ns resolution)."""
    return time.process_time()


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``nan`` for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def spread(values: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of ``values`` with their count."""
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
    }


def ratio(ours: float, floor: float) -> float:
    """ours / floor, ``nan`` when the floor is zero or missing."""
    if not floor or math.isnan(floor) or math.isnan(ours):
        return math.nan
    return ours / floor


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    import sqlite3

    import apscheduler
    import requests
    import sqlalchemy

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "apscheduler": apscheduler.__version__,
        "requests": requests.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "scheduler", "migrations"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{out}{' (scheduler/ modified)' if dirty else ''}" or "unknown"


def env() -> dict[str, str]:
    """The environment for child processes: the repo importable, the bench token set."""
    child = {k: v for k, v in os.environ.items() if not k.startswith("TE_SCHEDULER")}
    child["PYTHONPATH"] = str(REPO) + os.pathsep + child.get("PYTHONPATH", "")
    child["BENCH_TOKEN"] = TOKEN
    child["PYTHONUNBUFFERED"] = "1"
    return child


def run_worker(spec: dict[str, Any], workdir: Path, name: str, timeout: float) -> dict[str, Any]:
    """Run ``python -m bench.worker`` on ``spec`` in its own process; its JSON result."""
    spec_path = workdir / f"{name}.spec.json"
    out_path = workdir / f"{name}.out.json"
    log_path = workdir / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.worker", str(spec_path), str(out_path)],
            cwd=workdir,
            env=env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    if proc.returncode != 0 or not out_path.exists():
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"worker {name} exited {proc.returncode}:\n{tail}")
    result: dict[str, Any] = json.loads(out_path.read_text())
    return result


def say(message: str) -> None:
    """Progress on stderr, so a long run shows where it is."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class LoadMeter:
    """How much CPU other processes took while the benchmarks ran (they share the machine)."""

    def __init__(self) -> None:
        self._busy0 = _machine_busy()
        self._ours0 = _our_cpu()
        self._wall0 = time.monotonic()
        self._loadavg = _loadavg()

    def describe(self) -> str:
        wall = time.monotonic() - self._wall0
        other = max(0.0, (_machine_busy() - self._busy0) - (_our_cpu() - self._ours0))
        cores = os.cpu_count() or 1
        return (
            f"processes outside the benchmark used {other:,.0f} CPU-seconds during the "
            f"{wall:,.0f} s run ({other / max(wall, 1e-9) / cores * 100:.0f}% of the "
            f"{cores} cores); load average {self._loadavg} when it started"
        )


def _machine_busy() -> float:
    """CPU seconds spent busy by the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / TICKS


def _our_cpu() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"
