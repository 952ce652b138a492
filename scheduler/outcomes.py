"""The vocabularies of the history (SPEC section 4), as enums whose values are the SPEC strings.

Both enums mix in ``str``, so a member compares equal to its column value, binds to SQL and
encodes to JSON as that string; ``str()`` of a member is its value too.
"""

from __future__ import annotations

from enum import Enum


class _Word(str, Enum):
    def __str__(self) -> str:
        return str.__str__(self)


class Outcome(_Word):
    """The ``outcome`` column: how one attempt (one row) ended."""

    PENDING = "pending"
    SUCCESS = "success"
    HTTP_ERROR = "http_error"
    RATE_LIMITED = "rate_limited"
    NETWORK_ERROR = "network_error"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"
    SKIPPED = "skipped"
    MISSED = "missed"


class Trigger(_Word):
    """The ``trigger`` column: what started a firing."""

    SCHEDULE = "schedule"
    MANUAL = "manual"
    CATCH_UP = "catch-up"


class NotRun(_Word):
    """How a firing ended without an outcome row of this process's own; never stored."""

    CLAIMED_ELSEWHERE = "claimed-elsewhere"  # another instance inserted attempt 1 first
    NOT_RECORDED = "not-recorded"  # its history row could not be written, so it was not sent


# The ``error`` of every ``missed`` row whose call was never sent begins so; at start such a
# slot may still run as a catch-up (nothing reached the API).
NEVER_SENT = "never sent: "
# The ``error`` of a ``pending`` row whose call still waits for the rate limiter: if its process
# dies, recovery knows the call never left and records it ``missed``, not ``interrupted``.
QUEUED = "queued: waiting for the rate limiter, not sent yet"

# What Runner.fire returns and Hooks.finished receives.
FiringEnd = Outcome | NotRun

OUTCOMES = tuple(o.value for o in Outcome)
TRIGGERS = tuple(t.value for t in Trigger)
