"""Scenario 2: CPU time per attempt at a sustained rate, and attempts per second by concurrency.

The sustained rate is R tests firing every second, spread evenly over the second (te-scheduler's
``spread: 1s``; the bare script's start dates staggered the same way), for D seconds. CPU is the
worker process's own user + system time over that interval, history writes and logging included,
divided by the attempts made. Throughput is a burst of M calls due at once drained with
concurrency C (te-scheduler's ``api.concurrency``; the bare script's pool size).
"""

from __future__ import annotations

from typing import Any

from bench.common import ratio
from bench.report import Section, fmt, prose
from bench.settings import Settings, run_sides

TARGET = 1.5


def run(settings: Settings) -> Section:
    section = Section("cost", "2. Per-attempt cost", "python -m bench", intro=prose(__doc__))
    _sustained(settings, section)
    _throughput(settings, section)
    return section


def _sustained(settings: Settings, section: Section) -> None:
    rate, seconds = settings.cost_rate
    cpu: dict[str, float] = {}
    rows: list[list[Any]] = []
    runs = run_sides(
        settings,
        {
            side: (
                f"cost-{side}",
                {
                    "side": side,
                    "tests": rate,
                    "every": 1.0,
                    "rounds": seconds,
                    "spread": 1.0,
                    "wait": seconds + 60.0,
                },
            )
            for side in ("bare", "te")
        },
    )
    for side, run_ in runs.items():
        result = run_.result
        per = result["cpu_s"] / max(1, result["fired"]) * 1e6
        cpu[side] = per
        rows.append(
            [
                _label(side),
                result["fired"],
                result["cpu_s"],
                per,
                result["cpu_s"] / max(result["wall_s"], 1e-9) * 100,
                f"{run_.server_busy * 100:.0f}%",
            ]
        )
        section.data[f"sustained-{side}"] = result
    section.table(
        ["side", "attempts", "CPU s", "CPU us / attempt", "CPU % of a core", "server busy"],
        rows,
        f"{rate} calls a second for {seconds} s",
    )
    r = ratio(cpu["te"], cpu["bare"])
    section.ratio(f"te-scheduler / bare CPU per attempt at {rate}/s", r, f"<= {TARGET}")
    section.target(
        "2. CPU per attempt ratio",
        f"<= {TARGET}x",
        f"{fmt(r, 2)}x ({fmt(cpu['te'], 0)} vs {fmt(cpu['bare'], 0)} us)",
        r <= TARGET,
    )


def _throughput(settings: Settings, section: Section) -> None:
    burst = settings.cost_burst
    rows: list[list[Any]] = []
    runs = run_sides(
        settings,
        {
            (c, side): (
                f"tput-{side}-{c}",
                {
                    "side": side,
                    "tests": burst,
                    "every": 3600.0,
                    "rounds": 1,
                    "workers": c,
                    "wait": 120.0,
                },
            )
            for c in settings.cost_concurrency
            for side in ("bare", "te")
        },
    )
    for concurrency in settings.cost_concurrency:
        rates: dict[str, float] = {}
        for side in ("bare", "te"):
            result = runs[(concurrency, side)].result
            span = max(1e-9, result["last_done"] - result["t0"])
            rates[side] = result["fired"] / span
            rows.append(
                [
                    concurrency,
                    _label(side),
                    result["fired"],
                    span,
                    rates[side],
                    result["cpu_s"] / max(1, result["fired"]) * 1e6,
                    f"{runs[(concurrency, side)].server_busy * 100:.0f}%",
                ]
            )
            section.data[f"throughput-{side}-{concurrency}"] = result
        r = ratio(rates["bare"], rates["te"])
        section.ratio(
            f"bare / te-scheduler attempts per second at concurrency {concurrency}",
            r,
            f"<= {TARGET}",
        )
        section.target(
            f"2. throughput ratio, concurrency {concurrency}",
            f"<= {TARGET}x",
            f"{fmt(r, 2)}x ({fmt(rates['te'], 0)} vs {fmt(rates['bare'], 0)} /s)",
            r <= TARGET,
        )
    section.table(
        [
            "concurrency",
            "side",
            "attempts",
            "seconds",
            "attempts / s",
            "CPU us / attempt",
            "server busy",
        ],
        rows,
        f"{burst} calls due at once",
    )
    te_cpu = [row[5] for row in rows if row[1] == "te-scheduler"]
    te_rate = [row[4] for row in rows if row[1] == "te-scheduler"]
    if te_cpu:
        ceiling = 1e6 / (sum(te_cpu) / len(te_cpu))
        section.notes.append(
            f"te-scheduler's CPU per attempt in the bursts ({sum(te_cpu) / len(te_cpu):,.0f} "
            f"us) allows at most {ceiling:,.0f} attempts a second on one core (one process, "
            f"one GIL); it reached {min(te_rate):,.0f}-{max(te_rate):,.0f}/s whatever the "
            "concurrency, so it is bound by its own CPU, not by the server or the workers."
        )


def _label(side: str) -> str:
    return "te-scheduler" if side == "te" else "bare script"
