"""Task module for bench/drain.py: ``celeriac -A bench.celeriac_app worker -c 2``.

The broker URL comes from ``CELERIAC_BROKER_URL`` (set by the bench to a temp SQLite file).
"""

from __future__ import annotations

import time

from celeriac import Celery

app = Celery("bench.celeriac_app")


@app.task
def noop() -> None:
    return None


@app.task
def started_at() -> float:
    """When the task began running (epoch seconds): the bench compares it with the send time."""
    return time.time()
