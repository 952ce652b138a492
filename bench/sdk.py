"""The official SDK's way with a 429, on top of the bare script: wait for the reset, retry once.

``thousandeyes-sdk-instant-tests`` hides this inside urllib3; here it is written out so the
makespan scenario can run it against the same simulator as te-scheduler.
"""

from __future__ import annotations

import time

from bench.bare import session

RESET_HEADERS = ("X-Organization-Rate-Limit-Reset", "X-Instant-Test-Rate-Limit-Reset")


def run_test_sdk_style(base_url: str, test_id: str) -> int:
    """POST; on a 429 sleep until the later Reset of the two header sets and POST once more."""
    url = f"{base_url}/tests/{test_id}/run"
    response = session.post(url, timeout=30)
    if response.status_code != 429:
        return response.status_code
    resets = [float(response.headers.get(name) or 0) for name in RESET_HEADERS]
    time.sleep(max(0.0, max(resets) - time.time()))
    return session.post(url, timeout=30).status_code
