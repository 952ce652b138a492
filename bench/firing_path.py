"""One firing traced in-process: which of our modules it passes through, and the calls between.

Run from a checkout root: ``python -m bench.firing_path`` (the built-in simulator, a temporary
SQLite file). It also runs on older commits, finding modules by their old flat names, which is
how the architecture issue's before/after figures were taken. An "upward" call goes into a
module that imports the caller: a callback up the layers (a declared hook counts too).
"""

from __future__ import annotations

import ast
import collections
import importlib
import json
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

JOBS = """\
api: {{base_url: "{url}", token_env: TE_PATH_TOKEN, rate_limit: 1000/min}}
history: {{url: "sqlite:///{tmp}/h.db"}}
jobs:
  - name: j
    tests: [1]
    schedule: {{every: 1h}}
"""


def first_module(*names: str) -> Any:
    """The first of ``names`` that imports (the module moved between layouts)."""
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise SystemExit(f"none of {names} can be imported")


def ours(frame: FrameType | None) -> str | None:
    """The te-scheduler module a frame runs in; None for others and for the fake API."""
    name = frame.f_globals.get("__name__", "") if frame else ""
    return name if name.startswith("scheduler") and "simulat" not in name else None


def trace_one_firing() -> tuple[set[str], collections.Counter[tuple[str, str]]]:
    sys.path.insert(0, os.getcwd())
    config = first_module("scheduler.config")
    simulator = first_module("scheduler.api.simulator", "scheduler.simulator")
    db = first_module("scheduler.store.db", "scheduler.db")
    daemon_mod = first_module("scheduler.daemon")
    clock = first_module("scheduler.clock")
    tmp = Path(tempfile.mkdtemp())
    sim = simulator.Simulator(token="t0ken-abc", org_limit=10**6, instant_limit=10**6).start()
    (tmp / "jobs.yaml").write_text(JOBS.format(url=sim.url, tmp=tmp))
    os.environ["TE_PATH_TOKEN"] = "t0ken-abc"
    cfg = config.load(tmp / "jobs.yaml")
    engine = db.make_engine(cfg.history.url)
    db.upgrade(engine)
    daemon = daemon_mod.Daemon(cfg, engine)
    daemon._entries = entries = daemon_mod.entries_of(cfg)
    ((job_id, entry),) = entries.items()
    slot = clock.now().replace(minute=0, second=0, microsecond=0)
    modules: set[str] = set()
    edges: collections.Counter[tuple[str, str]] = collections.Counter()

    def profile(frame: FrameType, event: str, arg: object) -> None:
        callee = ours(frame)
        if event != "call" or callee is None:
            return
        modules.add(callee)
        back = frame.f_back
        while back is not None and not back.f_globals.get("__name__", "").startswith("scheduler"):
            back = back.f_back
        caller = ours(back)
        if caller is not None and caller != callee:
            edges[(caller, callee)] += 1

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        daemon._on_due(job_id, entry, run_times=[slot + entry.offset], submitted=clock.now())
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
        sim.stop()
    return modules, edges


def imports_of(module: ModuleType | None) -> set[str]:
    path = getattr(module, "__file__", None)
    if not path:
        return set()
    found: set[str] = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("scheduler"):
            assert node.module is not None
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("scheduler")}
    return found


def main() -> None:
    modules, edges = trace_one_firing()
    upward = sorted(
        f"{a} -> {b}"
        for a, b in edges
        if a in imports_of(sys.modules.get(b)) and b not in imports_of(sys.modules.get(a))
    )
    report = {
        "modules_on_path": sorted(modules),
        "module_count": len(modules),
        "cross_module_calls": sum(edges.values()),
        "distinct_edges": len(edges),
        "upward_calls": upward,
        "edges": {f"{a} -> {b}": n for (a, b), n in sorted(edges.items())},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
