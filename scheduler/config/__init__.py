"""jobs.yaml: the frozen types (model), and loading them (loader) with every problem located.

The names most callers want are here; modules inside the package import from the submodules.
"""

from __future__ import annotations

from scheduler.config.loader import load, load_token
from scheduler.config.model import (
    ApiConfig,
    Config,
    HistoryConfig,
    Job,
    MetricsConfig,
    NotifyConfig,
    Rate,
    RetryPolicy,
    Schedule,
)
from scheduler.config.scalars import parse_duration, parse_rate, parse_when

__all__ = [
    "ApiConfig",
    "Config",
    "HistoryConfig",
    "Job",
    "MetricsConfig",
    "NotifyConfig",
    "Rate",
    "RetryPolicy",
    "Schedule",
    "load",
    "load_token",
    "parse_duration",
    "parse_rate",
    "parse_when",
]
