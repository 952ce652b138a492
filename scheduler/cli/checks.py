"""What ``validate`` checks beyond the file: past one-off times, and (``--online``) the token."""

from __future__ import annotations

import difflib
from datetime import datetime
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import requests
from sqlalchemy.engine import Engine

from scheduler.api.client import build_session
from scheduler.config.model import ApiConfig, Config
from scheduler.errors import SchedulerError, TokenError
from scheduler.store import status

if TYPE_CHECKING:
    from scheduler.cli.base import State


def past_at_warnings(config: Config, now: datetime) -> list[str]:
    """One warning per enabled ``at:`` job whose time has passed: it will never fire."""
    return [
        f"job {job.name!r}: at {job.schedule.at.isoformat()} is in the past, so it will never "
        "fire; set a later time, or `enabled: false`"
        for job in config.jobs
        if job.enabled and job.schedule.at is not None and job.schedule.at <= now
    ]


def check_online(config: Config, token: str) -> str:
    """One ``GET {base_url}/tests`` per distinct ``aid``; a one-line summary when all pass.

    Raises TokenError (exit 2) when the API refuses the token (401/403), SchedulerError
    (exit 1) when it cannot be reached or answers otherwise. Messages never hold the token.
    """
    distinct = {job.aid for job in config.jobs} or {None}
    aids = sorted(distinct, key=lambda aid: (aid is not None, aid or ""))
    session = build_session(config.api)
    try:
        for aid in aids:
            _read_tests(session, config.api, token, aid)
    finally:
        session.close()
    groups = ", ".join("the default account group" if a is None else f"aid {a}" for a in aids)
    return f"online: {config.api.base_url} accepted the token for {groups}"


def _read_tests(session: requests.Session, api: ApiConfig, token: str, aid: str | None) -> None:
    url = f"{api.base_url.rstrip('/')}/tests" + (f"?{urlencode({'aid': aid})}" if aid else "")
    where = f" for aid {aid}" if aid else ""
    try:
        response = session.get(
            url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=(api.timeout, api.timeout),
            allow_redirects=False,
        )
    except requests.RequestException as exc:
        raise SchedulerError(f"cannot reach {url}: {type(exc).__name__}") from None
    code = response.status_code
    response.close()
    if code in (401, 403):
        raise TokenError(
            f"the token was refused{where} (HTTP {code} from GET {url}); check the token, "
            "and that it may see this account group"
        )
    if not 200 <= code <= 299:
        raise SchedulerError(f"GET {url} answered HTTP {code}; the token could not be checked")


def unknown_job_note(state: State, engine: Engine, name: str) -> str | None:
    """Why ``history --job NAME`` found nothing, when NAME is neither in the config nor the
    history (a typo, most likely); None when the job is known."""
    names = _config_job_names(state)
    if name in names or status.known_jobs(engine, name):
        return None
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = "the config or the history" if names else "the history"
    return f"no job {name!r} in {where}{hint}"


def _config_job_names(state: State) -> list[str]:
    """The config's job names; none when history is read without a (valid) jobs.yaml."""
    try:
        return [job.name for job in state.load().jobs]
    except SchedulerError:
        return []
