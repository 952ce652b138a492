"""The simulator's results side: test types, rounds of accepted runs, results pages.

* ``GET /v7/tests`` lists every test id the simulator has seen a run call for, each with
  the type ``TYPES[int(id) % 12]`` (:func:`type_of`: 108 is ``agent-to-server``, 110
  ``http-server``, 111 ``page-load``), which never changes.
* Each accepted run makes one round (``roundId`` = the run's Unix second) of ``agents``
  agents (ids ``"1001"``, ``"1002"`` ...), readable ``delay`` seconds later. Figures are
  drawn from a generator seeded by (test, round, agent), so a round reads the same every
  time; ``fail_rate`` of the agents report an error (and 100 % loss where loss exists).
* ``GET /v7/test-results/{id}/{endpoint}?startDate=&endDate=`` answers the rounds whose
  start lies in ``[startDate - 60 s, endDate]`` (like the API, a round that started just
  before the start is included), two results a page, paged with an opaque ``cursor`` in
  ``_links.next``. The endpoint must be the test's (``network`` for agent-to-server ...),
  else 404.
"""

from __future__ import annotations

import base64
import math
import random
import threading
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode

from scheduler.config.model import RESULT_TYPES

TYPES = RESULT_TYPES  # the simulated test id N has type TYPES[N % len(TYPES)]
PAGE_SIZE = 2
EARLY = 60  # seconds before startDate from which a round is still answered
_ENDPOINT = {"agent-to-server": "network", "agent-to-agent": "network", "voice": "rtp-server"}


def type_of(test_id: str) -> str:
    """The simulated type of a digit test id: ``TYPES[int(id) % 12]``."""
    return TYPES[int(test_id) % len(TYPES)]


def endpoint_for(test_id: str) -> str:
    kind = type_of(test_id)
    return _ENDPOINT.get(kind, kind)


class Rounds:
    """Rounds made by accepted runs, and the pages that show them (thread-safe)."""

    def __init__(self, agents: int = 3, delay: float = 5.0, fail_rate: float = 0.0) -> None:
        self.agents, self.delay, self.fail_rate = agents, delay, fail_rate
        self._rounds: dict[str, list[int]] = {}
        self._seen: dict[str, None] = {}
        self._lock = threading.Lock()

    def seen(self, test_id: str) -> None:
        with self._lock:
            self._seen.setdefault(test_id, None)

    def accepted(self, test_id: str, now: float) -> None:
        """An accepted run of ``test_id`` at ``now``: one round starting at that second."""
        with self._lock:
            self._seen.setdefault(test_id, None)
            self._rounds.setdefault(test_id, []).append(math.floor(now))

    def tests(self, base: str) -> dict[str, Any]:
        with self._lock:
            ids = list(self._seen)
        tests = [
            {
                "testId": test_id,
                "testName": f"Simulated test {test_id}",
                "type": type_of(test_id),
                "interval": 0,
                "enabled": True,
                "_links": {
                    "testResults": [
                        {"href": f"{base}/test-results/{test_id}/{endpoint_for(test_id)}"}
                    ]
                },
            }
            for test_id in ids
        ]
        return {"tests": tests, "_links": {"self": {"href": f"{base}/tests"}}}

    def page(
        self, base: str, test_id: str, endpoint: str, query: dict[str, list[str]], now: float
    ) -> tuple[int, dict[str, Any]]:
        """(status, document) of one results page."""
        if endpoint != endpoint_for(test_id):
            return 404, {"title": "Not Found", "detail": f"Test {test_id} has no {endpoint}"}
        start = _when(query.get("startDate"), now - 600)
        end = _when(query.get("endDate"), now)
        with self._lock:
            rounds = [
                r
                for r in self._rounds.get(test_id, [])
                if start - EARLY <= r <= end and r + self.delay <= now
            ]
        results = [
            self._result(base, test_id, endpoint, r, i)
            for r in sorted(rounds)
            for i in range(self.agents)
        ]
        offset = _cursor(query.get("cursor"))
        doc: dict[str, Any] = {
            "results": results[offset : offset + PAGE_SIZE],
            "test": {"testId": test_id, "type": type_of(test_id)},
            "_links": {"self": {"href": f"{base}/test-results/{test_id}/{endpoint}"}},
        }
        if offset + PAGE_SIZE < len(results):
            params = {k: v[0] for k, v in query.items() if k != "cursor" and v}
            params["cursor"] = base64.urlsafe_b64encode(str(offset + PAGE_SIZE).encode()).decode()
            href = f"{base}/test-results/{test_id}/{endpoint}?{urlencode(params)}"
            doc["_links"]["next"] = {"href": href}
        return 200, doc

    def _result(
        self, base: str, test_id: str, endpoint: str, round_id: int, i: int
    ) -> dict[str, Any]:
        agent_id = str(1001 + i)
        rng = random.Random(f"{test_id}:{round_id}:{agent_id}")
        failed = rng.random() < self.fail_rate
        latency = round(rng.uniform(5, 80), 1)
        result: dict[str, Any] = {
            "date": datetime.fromtimestamp(round_id, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "roundId": round_id,
            "agent": {
                "agentId": agent_id,
                "agentName": f"Simulated Agent {i + 1}",
                "countryId": "DE",
                "location": "Frankfurt, Germany",
            },
            "_links": {
                "appLink": f"https://app.thousandeyes.com/view/tests/?testId={test_id}"
                f"&roundId={round_id}&agentId={agent_id}"
            },
        }
        if endpoint == "network":
            result.update(
                loss=100.0 if failed else 0.0,
                avgLatency=latency,
                minLatency=round(latency * 0.8, 1),
                maxLatency=round(latency * 1.3, 1),
                jitter=round(rng.uniform(0, 3), 2),
            )
        else:
            result.update(responseTime=latency)
            if endpoint in ("http-server", "ftp-server", "sip-server"):
                result["responseCode"] = 0 if failed else 200
        if failed:
            result.update(errorType="Connect", errorDetails="Connection timed out (simulated)")
        return result


def _when(values: list[str] | None, default: float) -> float:
    if not values:
        return default
    try:
        return datetime.fromisoformat(values[0].replace("Z", "+00:00")).timestamp()
    except ValueError:
        return default


def _cursor(values: list[str] | None) -> int:
    if not values:
        return 0
    try:
        return max(0, int(base64.urlsafe_b64decode(values[0].encode()).decode()))
    except ValueError:
        return 0
