"""Scenario 3: rate-limited makespan. N calls due at once against the simulator at L per window.

Three ways to send them, each against its own fresh simulator process: the bare script (fire
and forget: what the limit refuses is lost), the official SDK's way (on a 429 sleep until the
later Reset, retry once) and te-scheduler (its limiter, fed by the budget and the headers).
Makespan = the last accepted call's arrival - the slot. Ideal = (ceil(N/L) - 1) windows.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.report import Section, fmt, prose
from bench.settings import Settings, SideRun, run_side

SIDES = ("bare", "sdk", "te")
LABELS = {"bare": "bare script", "sdk": "SDK way (429: wait, retry once)", "te": "te-scheduler"}


def ideal(n: int, limit: int, window: float) -> float:
    """Seconds from the slot to the first moment the last call may be sent."""
    return (math.ceil(n / limit) - 1) * window


def outcome(run_: SideRun, n: int) -> dict[str, Any]:
    """Accepted, refused and lost calls and the makespan, from the server's records."""
    t0 = run_.result["t0"]
    accepted = [r[0] for r in run_.records if r[2] == 200]
    refused = sum(1 for r in run_.records if r[2] == 429)
    return {
        "accepted": len(accepted),
        "refused": refused,
        "lost": n - len(accepted),
        "makespan": (max(accepted) - t0) if accepted else math.nan,
        "rows": run_.result.get("rows"),
    }


def run(settings: Settings) -> Section:
    window, limit = settings.makespan_window, settings.makespan_limit
    section = Section(
        "makespan",
        "3. Rate-limited makespan",
        "python -m bench",
        intro=prose(__doc__)
        + f" Here L = {limit} per {window:g} s (the simulator's instant-test bucket; its "
        f"organization bucket is {limit * 10}).",
    )
    cases = [(n, side) for n in settings.makespan_sizes for side in SIDES]
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {case: pool.submit(_one, settings, *case) for case in cases}
        results = {case: future.result() for case, future in futures.items()}
    rows: list[list[Any]] = []
    for n in settings.makespan_sizes:
        best = ideal(n, limit, window)
        for side in SIDES:
            o = results[(n, side)]
            section.data[f"{side}-{n}"] = o
            over = (o["makespan"] - best) / window if not o["lost"] else math.nan
            rows.append(
                [n, LABELS[side], o["accepted"], o["refused"], o["lost"], o["makespan"], best, over]
            )
        te, sdk = results[(n, "te")], results[(n, "sdk")]
        section.ratio(
            f"te-scheduler / ideal makespan + one window with N={n}",
            te["makespan"] / (best + window),
            "<= 1",
        )
        section.ratio(
            f"te-scheduler / SDK way makespan with N={n} (SDK lost {sdk['lost']})",
            te["makespan"] / sdk["makespan"] if sdk["accepted"] else math.nan,
        )
        ok = te["refused"] == 0 and te["lost"] == 0 and te["makespan"] <= best + window
        section.target(
            f"3. makespan, N={n}",
            f"0 x 429, all sent, <= {fmt(best + window)} s",
            f"{te['refused']} x 429, {te['lost']} lost, {fmt(te['makespan'])} s",
            ok,
        )
    section.table(
        ["N", "side", "accepted", "429s", "lost", "makespan s", "ideal s", "windows over ideal"],
        rows,
    )
    _per_window(section, settings)
    section.notes.append(
        "windows over ideal: (makespan - ideal) / window, shown only where every call got "
        "through. The cases run side by side, each with its own simulator process (and "
        "alongside the history generation of scenario 5): they are bound by the rate-limit "
        "windows, not by CPU. The simulator's Reset header is a whole second (as the "
        "API's), so a client that waits for it starts each window up to a second late; "
        "te-scheduler closes a window at the earlier of Reset and its first own answer in "
        "that window plus the window length it learned, then adds a 0.1 s margin."
    )
    return section


def _one(settings: Settings, n: int, side: str) -> dict[str, Any]:
    window, limit = settings.makespan_window, settings.makespan_limit
    spec = {
        "side": side,
        "tests": n,
        "rounds": 1,
        "every": 3600.0,
        "rate_limit": f"{limit}/{window:g}s",
        "margin": settings.margin + (0.5 if settings.quick else 2.0),
        "wait": ideal(n, limit, window) + 6 * window + 60.0,
    }
    run_ = run_side(
        settings,
        f"makespan-{side}-{n}",
        spec,
        "sim",
        org_limit=limit * 10,
        instant_limit=limit,
        window=window,
    )
    return outcome(run_, n)


def _per_window(section: Section, settings: Settings) -> None:
    """How late te-scheduler opens each window, and what that means with the API's 60 s."""
    window, limit = settings.makespan_window, settings.makespan_limit
    n = max(settings.makespan_sizes)
    windows = math.ceil(n / limit) - 1
    te = section.data.get(f"te-{n}", {})
    if windows < 1 or te.get("lost") or not te.get("accepted"):
        return
    late = (te["makespan"] - ideal(n, limit, window)) / windows
    section.notes.append(
        f"te-scheduler opened each of the {windows} later windows {late:.2f} s late on "
        f"average with N={n} (the 0.1 s margin, the round trip and the firing threads). "
        f"With the API's 60 s windows the same delay would be {late * windows / 60:.2f} "
        "windows over ideal."
    )
