"""Scenario 1: firing lag with 1, 100 and 1,000 calls due in the same second, 16 workers.

Lag is the server's receive time minus the slot the call belonged to; the k-th request of a
test is that test's round k. te-scheduler writes every attempt (pending, then final) to SQLite.
"""

from __future__ import annotations

from typing import Any

from bench.common import ratio, spread
from bench.report import Section, fmt
from bench.server import Record
from bench.settings import Settings, run_sides

TARGET = 1.25


def lags(records: list[Record], t0: float, every: float, rounds: int) -> list[float]:
    """Seconds from each call's slot to its arrival, for the first ``rounds`` rounds."""
    by_test: dict[str, list[float]] = {}
    for received, test, _status, _te in sorted(records):
        by_test.setdefault(test, []).append(received)
    out = []
    for times in by_test.values():
        out += [received - (t0 + k * every) for k, received in enumerate(times[:rounds])]
    return out


def run(settings: Settings) -> Section:
    section = Section(
        "lag",
        "1. Firing lag",
        "python -m bench",
        intro=(
            f"N calls due at the same instant, {settings.workers} workers (te-scheduler: "
            f"`api.concurrency: {settings.workers}`), against the fast local server. Lag = "
            "request received by the server - scheduled time, over every call of every round."
        ),
    )
    cases = {
        (n, side): (
            f"lag-{side}-{n}",
            {"side": side, "tests": n, "rounds": rounds, "every": every, "wait": 60.0 + n * 0.1},
        )
        for n, rounds, every in settings.lag_cases
        for side in ("bare", "te")
    }
    runs = run_sides(settings, cases)
    rows: list[list[Any]] = []
    for n, rounds, every in settings.lag_cases:
        stats = {}
        for side in ("bare", "te"):
            run_ = runs[(n, side)]
            values = lags(run_.records, run_.result["t0"], every, rounds)
            s = spread([v * 1000 for v in values])
            stats[side] = s
            lost = n * rounds - s["n"]
            rows.append(
                [
                    n,
                    rounds,
                    _label(side),
                    s["p50"],
                    s["p99"],
                    s["max"],
                    lost,
                    _history(run_.result),
                    f"{run_.server_busy * 100:.0f}%",
                ]
            )
            section.data[f"{side}-{n}"] = {
                "lag_ms": s,
                "worker": run_.result,
                "server_busy": run_.server_busy,
            }
        r = ratio(stats["te"]["p99"], stats["bare"]["p99"])
        section.ratio(f"te-scheduler p99 / bare p99 with {n} call(s) due", r, f"<= {TARGET}")
        section.target(
            f"1. lag p99 ratio, {n} due",
            f"<= {TARGET}x",
            f"{fmt(r, 2)}x ({fmt(stats['te']['p99'])} vs {fmt(stats['bare']['p99'])} ms)",
            r <= TARGET,
        )
    section.table(
        [
            "due at once",
            "rounds",
            "side",
            "p50 ms",
            "p99 ms",
            "max ms",
            "lost",
            "history rows",
            "server busy",
        ],
        rows,
    )
    biggest = max(n for n, _, _ in settings.lag_cases)
    te, floor = section.data[f"te-{biggest}"], section.data[f"bare-{biggest}"]
    section.notes.append(
        f"With {biggest} calls due, the last call waits for the ones before it: p99 lag per "
        f"call due is {te['lag_ms']['p99'] / biggest:.2f} ms for te-scheduler and "
        f"{floor['lag_ms']['p99'] / biggest:.2f} ms for the bare script, close to each side's "
        "CPU per attempt (scenario 2): the lag is the queue draining at that speed."
    )
    section.notes.append(
        "history rows: te-scheduler's attempts table after the run, by outcome (each row was "
        "inserted as pending before its request and completed after it). Server busy: the "
        "server's CPU over the measured interval, as a share of one core."
    )
    return section


def _label(side: str) -> str:
    return {"bare": "bare script", "te": "te-scheduler", "sdk": "SDK way"}[side]


def _history(result: dict[str, Any]) -> str:
    rows = result.get("rows")
    if rows is None:
        return "-"
    return ", ".join(f"{count} {outcome}" for outcome, count in sorted(rows.items()))
