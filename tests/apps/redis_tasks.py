"""Tasks for the Redis worker and fault tests: `celeriac -A tests.apps.redis_tasks worker`.

The test passes the broker with ``-b`` and the result backend and small timeouts through
the environment. Tasks report to the test through files in a directory it passes (``d``),
one line per event, so tests wait on conditions rather than sleep.
"""

from __future__ import annotations

import os
import time

from celeriac import Celery
from tests.apps.events import append, wait_file

app = Celery("tests.apps.redis_tasks")
app.conf.task_max_redeliveries = 3
if os.environ.get("CELERIAC_TEST_RECOVERY_TIMEOUT"):
    app.conf.broker_recovery_timeout = float(os.environ["CELERIAC_TEST_RECOVERY_TIMEOUT"])
    # The recovery timeout must cover three heartbeats (the worker refuses less).
    app.conf.worker_heartbeat_interval = min(2.0, app.conf.broker_recovery_timeout / 3)
if os.environ.get("CELERIAC_TEST_PREFETCH"):
    app.conf.worker_prefetch_multiplier = int(os.environ["CELERIAC_TEST_PREFETCH"])
if os.environ.get("CELERIAC_TEST_KEEP_PREFETCHED"):
    # Tests that count what a worker holds: it keeps prefetched messages behind long tasks.
    app.conf.worker_prefetch_release_after = 0
if os.environ.get("CELERIAC_TEST_PUBLISH_FOREVER"):
    app.conf.task_publish_retry_policy = {"max_retries": None, "interval_start": 0,
                                          "interval_step": 0.2, "interval_max": 1.0}


class CustomError(Exception):
    pass


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def echo(*args: object, **kwargs: object) -> dict[str, object]:
    return {"args": list(args), "kwargs": kwargs}


@app.task
def fail(message: str = "bad thing") -> None:
    raise ValueError(message)


@app.task
def fail_custom() -> None:
    raise CustomError("custom", 42)


@app.task
def record(d: str, name: str, value: str) -> str:
    append(d, name, f"{value} {time.time()!r} {os.getpid()}")
    return value


@app.task(bind=True, max_retries=5)
def flaky(self, d: str, fails: int, countdown: float = 0.2) -> int:  # type: ignore[no-untyped-def]
    append(d, "attempts", f"{self.request.retries} {time.time()!r}")
    if self.request.retries < fails:
        raise self.retry(exc=KeyError(f"again {self.request.retries}"), countdown=countdown)
    return int(self.request.retries)


@app.task(bind=True, acks_late=True)
def long_task(self, d: str, release: str = "release") -> int:  # type: ignore[no-untyped-def]
    """Logs its start, waits for the test's ``release`` file (however long), logs its end."""
    append(d, "long", f"start {os.getpid()} {self.request.id}")
    if not wait_file(d, release, timeout=300):
        raise RuntimeError("never released")
    append(d, "long", f"done {os.getpid()} {self.request.id}")
    return os.getpid()


def _redelivered(task: object) -> bool:
    info = getattr(task, "request").delivery_info or {}  # noqa: B009
    return bool(info.get("redelivered"))


@app.task(bind=True, acks_late=True)
def late_work(self, d: str, n: int) -> int:  # type: ignore[no-untyped-def]
    """Logs each run; blocks while ``hold`` exists (so the test can kill mid-batch)."""
    append(d, "runs", f"{n} {os.getpid()} {_redelivered(self)} {time.time()!r}")
    while os.path.exists(os.path.join(d, "hold")):
        time.sleep(0.01)
    return n


@app.task(bind=True)
def work(self, d: str, n: int) -> int:  # type: ignore[no-untyped-def]
    append(d, "runs", f"{n} {os.getpid()} {_redelivered(self)}")
    return n


@app.task
def slow_work(d: str, n: int, seconds: float = 0.01) -> int:
    append(d, "runs", f"{n} {os.getpid()}")
    time.sleep(seconds)
    return n
