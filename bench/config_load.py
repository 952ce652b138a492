"""``python -m bench.config_load [N ...]``: seconds to load jobs.yaml with N jobs (best of 5).

Two shapes per N: block-style jobs (three tests, a cron or interval schedule, every fifth
one merging an anchored retry block) and the flow-style one-test jobs of bench/scale.py.
Prints the whole ``config.load``, the YAML reading alone (``read_document``), and the floor of
a reader built on PyYAML's ``compose()``: composing with libyaml plus the least walk that makes
values and positions (no caps, no duplicate keys, no merges, no problems), which issue 10 item 4
asked about. The event reader of yamlsource stays because it beats even that floor, and
because compose() cannot say where an alias is used (an alias is the anchored node itself, with
the anchor's position), refuses a redefined anchor, and stops at an undefined alias.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from scheduler.config import load
from scheduler.config.yamlsource import read_document

ROUNDS = 5


def block_jobs(n: int) -> str:
    """N block-style jobs, with anchors and merge keys as a real file has them."""
    lines = ["version: 1", "defaults:", "  retry: &retry {attempts: 3, backoff: 2s}", "jobs:"]
    for i in range(n):
        lines += [f"  - name: job-{i:06d}", f"    tests: [{i}, {10**6 + i}, '{2 * 10**6 + i}']"]
        if i % 2:
            lines.append(f"    schedule: {{cron: '{i % 60} {i % 24} * * *', timezone: UTC}}")
        else:
            lines.append("    schedule: {every: 1h, start: '2026-01-01T00:00:00Z'}")
        if i % 5 == 0:
            lines += ["    retry:", "      <<: *retry", "      max_backoff: 5m"]
    return "\n".join(lines) + "\n"


def flow_jobs(n: int) -> str:
    """N one-test flow-style jobs, the shape bench/scale.py loads."""
    return "jobs:\n" + "".join(
        f"  - {{name: j{i}, tests: ['{i}'], schedule: {{every: 86400s}}}}\n" for i in range(n)
    )


def compose_floor(text: str) -> tuple[Any, dict[tuple[Any, ...], tuple[int, int]]]:
    """What any compose()-based reader must at least do: compose, then build each value and
    record where it starts (keys' positions too)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    assert root is not None
    constructors = yaml.SafeLoader.yaml_constructors
    where: dict[tuple[Any, ...], tuple[int, int]] = {}
    keys: dict[tuple[Any, ...], tuple[int, int]] = {}
    cache: dict[tuple[str, str], Any] = {}

    def walk(node: yaml.Node, path: tuple[Any, ...]) -> Any:
        mark = node.start_mark
        where[path] = (mark.line + 1, mark.column + 1)
        if isinstance(node, yaml.ScalarNode):
            key = (node.tag, node.value)
            if key not in cache:
                cache[key] = constructors[node.tag](loader, node)
            return cache[key]
        if isinstance(node, yaml.MappingNode):
            out = {}
            for key_node, value_node in node.value:
                child = (*path, key_node.value)
                mark = key_node.start_mark
                keys[child] = (mark.line + 1, mark.column + 1)
                out[key_node.value] = walk(value_node, child)
            return out
        return [walk(item, (*path, i)) for i, item in enumerate(node.value)]

    return walk(root, ()), where


def best(action: Callable[[], object]) -> float:
    """The fastest of ROUNDS runs, in seconds."""
    times = []
    gc.disable()  # as config.load does
    for _ in range(ROUNDS):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    gc.enable()
    return min(times)


def main(argv: list[str]) -> None:
    sizes = [int(arg) for arg in argv] or [10_000, 50_000]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "jobs.yaml"
        for n in sizes:
            for shape, make in (("block", block_jobs), ("flow", flow_jobs)):
                text = make(n)
                path.write_text(text, encoding="utf-8")
                assert len(load(path).jobs) == n
                whole = best(lambda: load(path))
                reading = best(lambda: read_document(path, str(path)))
                floor = best(lambda: compose_floor(text))
                print(
                    f"{n:>7,} {shape:5} jobs: load {whole:.3f} s, read_document {reading:.3f} s, "
                    f"compose() floor {floor:.3f} s"
                )


if __name__ == "__main__":
    main(sys.argv[1:])
