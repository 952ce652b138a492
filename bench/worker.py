"""One side of one measurement, in its own process: ``python -m bench.worker SPEC.json OUT.json``.

The spec says which side (``bare``, ``sdk`` or ``te``), how many tests, their interval, how
many rounds, the spread within a round and the workers. The worker sets up, picks the first
slot ``t0`` a safe margin ahead, lets its scheduler fire every round, and writes what it saw:
its own CPU seconds from just before ``t0`` to the last firing's end, the status codes, and
for te-scheduler the history rows by outcome. Request times come from the server's records.

The te side is the real product in-process: ``config.load`` of a written jobs.yaml, the
``Daemon`` (APScheduler, FiringExecutor, Runner, Limiter, Caller, SQLite history through
``db.make_engine``/``db.upgrade``) with logging set up as ``te-scheduler run`` does.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds, sample

TEST_BASE = 1000  # test ids are TEST_BASE + i


class _Tally:
    """Firings finished and status codes seen, waited on by the main thread."""

    def __init__(self) -> None:
        self.done = 0
        self.last_done = 0.0  # epoch seconds when the latest firing finished
        self.codes: Counter[str] = Counter()
        self.cond = threading.Condition()

    def code(self, status: int | None) -> None:
        with self.cond:
            self.codes[str(status)] += 1

    def finished(self) -> None:
        with self.cond:
            self.done += 1
            self.last_done = time.time()
            self.cond.notify_all()

    def wait(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.done < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True


def first_slot(margin: float) -> float:
    """A whole second at least ``margin`` seconds from now."""
    return float(math.ceil(time.time() + margin))


def offsets(spec: dict[str, Any]) -> list[float]:
    """Test i's start within a round: ``i * spread / n`` (te-scheduler's rule)."""
    n = spec["tests"]
    return [i * spec.get("spread", 0.0) / n for i in range(n)]


# -- the bare script and the SDK's way ---------------------------------------------------------


def run_bare(spec: dict[str, Any], tally: _Tally) -> dict[str, Any]:
    from bench import bare, sdk

    post = sdk.run_test_sdk_style if spec["side"] == "sdk" else bare.run_test

    def call(base_url: str, test_id: str) -> None:
        try:
            tally.code(post(base_url, test_id))
        except Exception as exc:  # a lost call is data here, as in the real script's logs
            tally.code(None)
            print(f"call failed: {exc!r}", file=sys.stderr)
        finally:
            tally.finished()

    t0 = first_slot(spec.get("margin", 1.5))
    jobs = [
        {"test": str(TEST_BASE + i), "every": spec["every"], "start": t0 + offset}
        for i, offset in enumerate(offsets(spec))
    ]
    scheduler = bare.build(jobs, spec["base_url"], spec["workers"], call)
    scheduler.start()
    result = _measure(spec, tally, t0)
    scheduler.shutdown(wait=True)
    return result


# -- te-scheduler -----------------------------------------------------------------------------


def _jobs_yaml(spec: dict[str, Any], t0: float, db_url: str) -> str:
    from datetime import datetime, timezone

    start = datetime.fromtimestamp(t0, timezone.utc).isoformat()
    tests = ", ".join(str(TEST_BASE + i) for i in range(spec["tests"]))
    retry = spec.get("retry", {"attempts": 4, "backoff": "2s"})
    return (
        "version: 1\n"
        "api:\n"
        f"  base_url: {spec['base_url']}\n"
        "  token_env: BENCH_TOKEN\n"
        "  timeout: 30s\n"
        f"  concurrency: {spec['workers']}\n"
        f"  rate_limit: {spec.get('rate_limit', '999999999/s')}\n"
        "history:\n"
        f"  url: {db_url}\n"
        "  retention: 90d\n"
        "jobs:\n"
        "  - name: bench\n"
        f"    tests: [{tests}]\n"
        f"    schedule: {{every: {round(spec['every'] * 1000)}ms, start: '{start}'}}\n"
        f"    spread: {round(spec.get('spread', 0.0) * 1000)}ms\n"
        f"    retry: {{attempts: {retry['attempts']}, backoff: {retry['backoff']}}}\n"
        # The run path is what these scenarios weigh against the bare script; reading results
        # back is a feature of its own, measured by the results scenario.
        "    results: {fetch: false}\n"
    )


def run_te(spec: dict[str, Any], tally: _Tally, workdir: Path) -> dict[str, Any]:
    from scheduler.config import load
    from scheduler.daemon import Daemon
    from scheduler.logs import setup_logging
    from scheduler.store import db

    setup_logging("info", "text")  # as `te-scheduler run`: one line per attempt (to a file)
    db_url = f"sqlite:///{workdir / (spec['name'] + '.db')}"
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    t0 = first_slot(spec.get("margin", 2.0))
    config_path = workdir / f"{spec['name']}.jobs.yaml"
    config_path.write_text(_jobs_yaml(spec, t0, db_url))
    daemon = Daemon(load(config_path), engine)
    _instrument(daemon, tally)
    daemon.start()
    result = _measure(spec, tally, t0)
    daemon.shutdown()
    result["rows"] = _rows_by_outcome(engine)
    engine.dispose()
    return result


def _instrument(daemon: Any, tally: _Tally) -> None:
    """Count attempts (the runner's ``attempted`` hook) and firings (around ``Runner.fire``)."""
    runner = daemon.runner
    attempted = runner.hooks.attempted

    def counted_attempt(firing: Any, attempt: int, result: Any, lag: float) -> None:
        tally.code(result.status_code)
        attempted(firing, attempt, result, lag)

    runner.hooks.attempted = counted_attempt  # type: ignore[method-assign]
    fire: Callable[[Any], str] = runner.fire

    def counted(firing: Any) -> str:
        try:
            return fire(firing)
        finally:
            tally.finished()

    runner.fire = counted


def _rows_by_outcome(engine: Any) -> dict[str, int]:
    import sqlalchemy as sa

    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT outcome, count(*) FROM attempts GROUP BY outcome"))
        return {outcome: count for outcome, count in rows}


# -- the measurement ---------------------------------------------------------------------------


def _measure(spec: dict[str, Any], tally: _Tally, t0: float) -> dict[str, Any]:
    """Wait for every round's firings; CPU and wall time from just before ``t0``."""
    ready = time.time()
    time.sleep(max(0.0, t0 - 0.1 - time.time()))
    cpu0, wall0 = cpu_seconds(), time.time()
    expected = spec["tests"] * spec["rounds"]
    complete = tally.wait(expected, spec.get("wait", 120.0))
    cpu1, wall1 = cpu_seconds(), time.time()
    return {
        "t0": t0,
        "ready_before_t0_s": t0 - ready,
        "complete": complete,
        "expected": expected,
        "fired": tally.done,
        "last_done": tally.last_done,
        "codes": dict(tally.codes),
        "cpu_s": cpu1 - cpu0,
        "wall_s": wall1 - wall0,
        "rss_mb": sample(_pid()).rss_mb,
    }


def _pid() -> int:
    import os

    return os.getpid()


def main() -> None:
    spec_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    tally = _Tally()
    if spec["side"] == "te":
        result = run_te(spec, tally, spec_path.parent)
    else:
        result = run_bare(spec, tally)
    out_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
