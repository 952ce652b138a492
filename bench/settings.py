"""How big each scenario is in a full run and in ``--quick``, and one helper to run a side."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import run_worker
from bench.server import Record, Server


@dataclass
class Settings:
    """Sizes of every scenario; ``quick()`` shrinks them to a smoke run."""

    workdir: Path
    quick: bool = False
    margin: float = 2.0  # seconds between a worker's set-up and its first slot
    # (calls due at once, rounds, seconds between rounds)
    lag_cases: list[tuple[int, int, float]] = field(
        default_factory=lambda: [(1, 10, 1.0), (100, 5, 2.0), (1000, 1, 3600.0)]
    )
    workers: int = 16
    cost_rate: tuple[int, int] = (100, 10)  # calls a second, seconds
    cost_burst: int = 1000
    cost_concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    makespan_window: float = 6.0
    makespan_limit: int = 24
    makespan_sizes: list[int] = field(default_factory=lambda: [24, 120, 600])
    scale_sizes: list[int] = field(default_factory=lambda: [100, 1000, 10_000, 50_000])
    idle_seconds: float = 30.0
    history_rows: list[int] = field(default_factory=lambda: [1_000_000, 10_000_000])
    history_cap: float = 45.0  # seconds a stats or prune call may run before it is stopped
    profile_attempts: int = 400
    soak_minutes: float = 30.0
    soak_rate: int = 20

    @classmethod
    def quick_run(cls, workdir: Path) -> Settings:
        return cls(
            workdir=workdir,
            quick=True,
            margin=0.5,
            lag_cases=[(1, 1, 3600.0), (20, 1, 3600.0)],
            cost_rate=(20, 1),
            cost_burst=60,
            cost_concurrency=[8],
            makespan_window=1.0,
            makespan_sizes=[24, 48],
            scale_sizes=[100],
            idle_seconds=1.0,
            history_rows=[20_000],
            history_cap=20.0,
            profile_attempts=40,
            soak_minutes=0.5,
        )

    def case_dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class SideRun:
    """One side's run: the worker's own report and what the server saw."""

    result: dict[str, Any]
    records: list[Record]
    server_cpu: float
    server_busy: float  # server CPU over the worker's measured wall time, share of a core


def run_side(
    settings: Settings, name: str, spec: dict[str, Any], mode: str = "fast", **limits: Any
) -> SideRun:
    """Start a fresh server, run one worker against it, stop the server."""
    workdir = settings.case_dir(name)
    with Server(workdir, name, mode, **limits) as server:
        spec = {
            "name": name,
            "base_url": server.url,
            "workers": settings.workers,
            "margin": settings.margin,
            **spec,
        }
        cpu0 = server.cpu_now()
        started = time.monotonic()
        result = run_worker(spec, workdir, name, timeout=spec.get("wait", 120.0) + 120.0)
        wall = max(1e-9, min(time.monotonic() - started, result.get("wall_s") or 1e9))
        cpu = server.cpu_now() - cpu0
    return SideRun(result, server.records, cpu, cpu / wall)


def run_sides(
    settings: Settings,
    cases: dict[Any, tuple[str, dict[str, Any]]],
    mode: str = "fast",
    **limits: Any,
) -> dict[Any, SideRun]:
    """Run each case's worker against its own server: one after the other in a full run (the
    timings must not disturb each other), all at once in a quick run (only the report counts).
    ``cases`` maps a key to (name, spec)."""
    if not settings.quick:
        return {
            key: run_side(settings, name, spec, mode, **limits)
            for key, (name, spec) in cases.items()
        }
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, len(cases))) as pool:
        futures = {
            key: pool.submit(run_side, settings, name, spec, mode, **limits)
            for key, (name, spec) in cases.items()
        }
        return {key: future.result() for key, future in futures.items()}
