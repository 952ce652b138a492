"""`python -m bench --quick` runs every scenario at tiny sizes and writes its report.

Only that it runs and reports is checked, never a timing: CI machines vary too much. Not part of
the product's suite (``make test``); ``make bench-check`` runs it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

SECTIONS = {
    "server": "## 0. The local servers' ceilings",
    "lag": "## 1. Firing lag",
    "cost": "## 2. Per-attempt cost",
    "makespan": "## 3. Rate-limited makespan",
    "scale": "## 4. Scale and idle",
    "history": "## 5. History at size",
    "profile": "## 7. Where te-scheduler's time goes",
}


def _sections(text: str) -> dict[str, str]:
    """Each '## ' section of the report by its heading line."""
    parts = re.split(r"^(?=## )", text, flags=re.MULTILINE)
    return {part.splitlines()[0]: part for part in parts if part.startswith("## ")}


@pytest.mark.timeout(120)
def test_quick_mode_reports_every_scenario_with_tables_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "report"
    # Its own process group, so a timeout also ends the servers and daemons it started.
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--output", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=110)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("python -m bench --quick did not finish in 110 s")
    assert proc.returncode == 0, stderr[-3000:]
    report = (out / "RESULTS.md").read_text()
    assert "Machine:" in report and "Date:" in report and "python -m bench --quick" in report
    sections = _sections(report)
    for heading in SECTIONS.values():
        assert heading in sections, f"missing {heading!r}"
        body = sections[heading]
        assert re.search(r"^\| .+ \|$", body, re.MULTILINE), f"no table in {heading!r}"
        assert re.search(r"^\|---", body, re.MULTILINE), f"no table rule in {heading!r}"
        assert re.search(r"^- Ratio, .+: (\d[\d,]*\.\d\d|-)x", body, re.MULTILINE), (
            f"no ratio line in {heading!r}"
        )
    # The same figures are kept as JSON beside the report, one entry per scenario.
    data = json.loads((out / "RESULTS.json").read_text())
    assert set(data["sections"]) == set(SECTIONS)
    # The ratios are printed as the run goes, too.
    assert stdout.count("- Ratio, ") >= len(SECTIONS)
    # No scenario's target table is missing its verdicts.
    assert "## Targets at a glance" in report
    assert re.search(r"\*\*(met|MISSED)\*\*", report)
