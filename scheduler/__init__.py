"""te-scheduler: rerun ThousandEyes instant tests on your own schedules.

A long-running daemon reads ``jobs.yaml``, fires each job's tests on its schedule
(cron, interval or one-off, in any timezone), calls ``POST /tests/{testId}/run`` on the
ThousandEyes API v7 and records every attempt in an ``attempts`` table.

Usage::

    export THOUSANDEYES_TOKEN=...           # a bearer token with Account Admin rights
    te-scheduler validate                   # check ./jobs.yaml
    te-scheduler plan --count 10            # what fires next
    te-scheduler run                        # the daemon, until SIGTERM
    te-scheduler run --simulate             # the same against a built-in fake API
    te-scheduler history --limit 20         # what happened
"""

__version__ = "0.1.0"
USER_AGENT = f"te-scheduler/{__version__}"  # on every request we send
