"""Tasks for the RabbitMQ tests: ``celeriac -A tests.apps.amqp_app worker -b amqp://...``.

The result backend comes from ``CELERIAC_TEST_RESULT_BACKEND`` (default ``rpc://``, which
rides on the broker given with ``-b``). Tasks that record their runs append a line to
the file they are given, so a test can count how often each ran.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celeriac import Celery

app = Celery("tests.apps.amqp_app")
app.conf.result_backend = os.environ.get("CELERIAC_TEST_RESULT_BACKEND", "rpc://")
if os.environ.get("CELERIAC_TEST_KEEP_PREFETCHED"):
    # Tests of what a worker's read-ahead holds: nothing is given back behind long tasks.
    app.conf.worker_prefetch_release_after = 0


def _record(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def fail(message: str = "bad thing") -> None:
    raise ValueError(message)


@app.task
def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


@app.task
def when() -> float:
    return time.time()


@app.task(bind=True, max_retries=3)
def retrying(self: Any, fail_times: int) -> int:
    if self.request.retries < fail_times:
        raise self.retry(exc=KeyError(f"again {self.request.retries}"), countdown=0.2)
    return int(self.request.retries)


@app.task(bind=True, track_started=True)
def progress(self: Any, release: str) -> str:
    self.update_state(state="PROGRESS", meta={"step": 1})
    deadline = time.monotonic() + 30
    while not Path(release).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.01)
    return "done"


@app.task(acks_late=True, reject_on_worker_lost=True)
def record_slow(path: str, key: str, seconds: float) -> str:
    """Appends ``start <key> <pid>``, sleeps, appends ``end <key>``."""
    _record(path, f"start {key} {os.getpid()}")
    time.sleep(seconds)
    _record(path, f"end {key}")
    return key


@app.task
def record_slow_early(path: str, key: str, seconds: float) -> str:
    """``record_slow`` with an early ack (the default)."""
    _record(path, f"start {key} {os.getpid()}")
    time.sleep(seconds)
    _record(path, f"end {key}")
    return key


@app.task
def record(path: str, key: str) -> str:
    _record(path, f"run {key} {os.getpid()}")
    return key


@app.task(ignore_result=True)
def record_quiet(path: str, key: str) -> None:
    _record(path, f"run {key}")


@app.task
def noop() -> None:
    return None


@app.task
def total(values: list[int]) -> int:
    return sum(values)
