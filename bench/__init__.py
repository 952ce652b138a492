"""Benchmarks: te-scheduler against the bare minimum, side by side, in one run.

The floor is ``bench/bare.py``: APScheduler's BackgroundScheduler, a ThreadPoolExecutor of 16
and ``requests.post`` on one Session, with no history and no limits. Every scenario runs that
script and te-scheduler in the same run, on the same machine, against the same local server,
and prints the ratio::

    python -m bench                 # scenarios 1-5, report in bench/RESULTS.md (~15 min)
    python -m bench --quick         # a smoke run of every scenario (CI), well under a minute
    python -m bench --soak          # scenario 6: 30 min at 20 calls/s with reloads
"""
