"""Scenario 0: the local servers' own ceilings, so we know they are not the bottleneck.

Each server is driven for a few seconds by ``bench.load`` (lean asyncio keep-alive clients in
another process). The rate reached is a lower bound of the server's ceiling (the driver shares
the two cores); the server's CPU per request gives the rate one core could serve.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from bench.common import env
from bench.report import Section, prose
from bench.server import HUGE, Server
from bench.settings import Settings


def measure(settings: Settings, mode: str, connections: int, seconds: float) -> dict[str, Any]:
    """Drive one fresh server; answers per second and its CPU per answer."""
    workdir = settings.case_dir(f"ceiling-{mode}")
    limits = {"org_limit": HUGE, "instant_limit": HUGE} if mode == "sim" else {}
    with Server(workdir, f"ceiling-{mode}", mode, **limits) as server:
        cpu0, wall0 = server.cpu_now(), time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "bench.load", str(server.port), str(connections), str(seconds)],
            capture_output=True,
            text=True,
            env=env(),
            timeout=seconds + 60,
            check=True,
        ).stdout
        wall = time.monotonic() - wall0
        cpu = server.cpu_now() - cpu0
    answers = int(out.strip().splitlines()[-1])
    return {
        "answers": answers,
        "per_second": answers / wall,
        "cpu_us": cpu / max(1, answers) * 1e6,
        "one_core": answers / max(cpu, 1e-9),
        "busy": cpu / wall,
    }


def run(settings: Settings) -> Section:
    seconds = 0.5 if settings.quick else 4.0
    section = Section(
        "server",
        "0. The local servers' ceilings",
        "python -m bench",
        intro=prose(__doc__),
    )
    rows = []
    for mode, label, connections in (
        ("fast", "fast (asyncio; scenarios 1, 2, 4)", 16),
        ("sim", "te-scheduler simulator (scenarios 3, 6)", 16),
    ):
        m = measure(settings, mode, connections, seconds)
        section.data[mode] = m
        rows.append(
            [
                label,
                connections,
                m["per_second"],
                m["cpu_us"],
                m["one_core"],
                f"{m['busy'] * 100:.0f}%",
            ]
        )
    section.table(
        [
            "server",
            "connections",
            "answers / s reached",
            "server CPU us / answer",
            "answers / s per core (1 / CPU)",
            "server busy",
        ],
        rows,
    )
    return section


def annotate(sections: dict[str, Section]) -> None:
    """Add the ratio of the server's ceiling to the fastest rate any side reached."""
    server, cost = sections.get("server"), sections.get("cost")
    if server is None or "fast" not in server.data:
        return
    ceiling = server.data["fast"]["per_second"]
    fastest = max(
        (
            v["fired"] / max(1e-9, v["last_done"] - v["t0"])
            for k, v in (cost.data.items() if cost else [])
            if k.startswith("throughput-")
        ),
        default=float("nan"),
    )
    server.ratios = [line for line in server.ratios if "ceiling" not in line]
    server.ratio(
        f"fast server's reached rate ({ceiling:,.0f}/s) / fastest side in scenario 2 "
        f"({fastest:,.0f}/s); above 1 means the server was not the bottleneck",
        ceiling / fastest if fastest == fastest else float("nan"),
    )
