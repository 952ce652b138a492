"""The values of the ``trigger`` and ``outcome`` columns (SPEC section 4), importable cheaply."""

from __future__ import annotations

TRIGGERS = ("schedule", "manual", "catch-up")
OUTCOMES = (
    "pending",
    "success",
    "http_error",
    "rate_limited",
    "network_error",
    "timeout",
    "interrupted",
    "skipped",
    "missed",
)
