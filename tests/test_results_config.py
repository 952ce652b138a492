"""``results:`` in jobs.yaml: defaults, per-job overrides, and the errors (SPEC 7)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from scheduler.config import load
from scheduler.config.model import ResultsConfig
from scheduler.errors import ConfigError


def config(tmp_path: Path, defaults: str, job: str = "") -> Path:
    path = tmp_path / "jobs.yaml"
    path.write_text(
        "version: 1\n"
        f"defaults:\n  results: {defaults}\n"
        "jobs:\n"
        "  - name: a\n    tests: [1]\n    schedule: {every: 15m}\n"
        f"{job}"
    )
    return path


def test_defaults_apply_and_a_job_overrides_key_by_key(tmp_path: Path) -> None:
    job = "  - name: b\n    tests: [2]\n    schedule: {every: 15m}\n    results: {fetch: false}\n"
    loaded = load(config(tmp_path, "{type: http-server, wait: 2m}", job))
    a, b = loaded.jobs
    assert a.results == ResultsConfig(True, "http-server", timedelta(minutes=2))
    assert b.results == ResultsConfig(False, "http-server", timedelta(minutes=2))


def test_without_a_section_results_are_fetched_with_auto_type(tmp_path: Path) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text("version: 1\njobs:\n  - {name: a, tests: [1], schedule: {every: 15m}}\n")
    assert load(path).jobs[0].results == ResultsConfig()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{fetch: yes please}", "defaults.results.fetch: must be true or false"),
        ("{type: http-sever}", "defaults.results.type: did you mean 'http-server'?"),
        ("{type: bgp}", "defaults.results.type: must be one of auto, agent-to-server"),
        ("{type: agent-to-srever}", "did you mean 'agent-to-server'?"),
        ("{wait: 0s}", "defaults.results.wait: must be at least 1s"),
        ("{wiat: 5m}", "defaults.results.wiat: unknown key; did you mean 'wait'?"),
        ("[]", "defaults.results: must be a mapping with keys fetch, type, wait"),
    ],
)
def test_bad_values_are_located_and_explained(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(config(tmp_path, section))
    text = "\n".join(str(p) for p in caught.value.problems)
    assert message in text
    assert ":3:" in text  # the line of the results section
