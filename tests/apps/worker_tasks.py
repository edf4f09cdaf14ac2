"""Tasks for the end-to-end worker tests: `celeriac -A tests.apps.worker_tasks worker`.

Tasks talk to the test through files in a directory the test passes in (``d``): they
append one line per event (``start``, ``done``…) and wait for files the test creates, so
the test can wait on conditions instead of sleeping.
"""

from __future__ import annotations

import os
import time

from celeriac import Celery
from celeriac.exceptions import SoftTimeLimitExceeded
from celeriac.task import Task
from tests.apps.events import append, lines, wait_file

# Worker-side settings live here: the worker process imports this module.
app = Celery("tests.apps.worker_tasks", task_max_redeliveries=2)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(bind=True)
def whoami(self) -> dict:  # type: ignore[type-arg]
    return {"pid": os.getpid(), "hostname": self.request.hostname}


@app.task
def stamp(d: str, name: str = "stamps") -> float:
    """Record when it ran (epoch seconds) and return it."""
    now = time.time()
    append(d, name, repr(now))
    return now


@app.task
def record(d: str, name: str, value: str) -> str:
    append(d, name, value)
    return value


# -- retries ---------------------------------------------------------------------------


@app.task(bind=True, max_retries=5)
def flaky(self, d: str, fails: int, countdown: float = 0.1,  # type: ignore[no-untyped-def]
          log: str = "attempts") -> int:
    """Fails ``fails`` times (retrying after ``countdown``), then succeeds; logs what it saw."""
    retries = self.request.retries
    # The state a client sees while this attempt runs: RETRY after a failed attempt.
    state = (self.app.backend.get(self.request.id) or {}).get("status", "PENDING")
    append(d, log, f"{retries} {state}")
    if retries < fails:
        raise self.retry(exc=ValueError(f"attempt {retries} failed"), countdown=countdown)
    return retries


@app.task(bind=True, max_retries=2)
def always_retry_exc(self, d: str) -> None:  # type: ignore[no-untyped-def]
    append(d, "attempts", str(self.request.retries))
    raise self.retry(exc=KeyError("gone"), countdown=0.01)


@app.task(bind=True, max_retries=1)
def always_retry_plain(self, d: str) -> None:  # type: ignore[no-untyped-def]
    append(d, "attempts", str(self.request.retries))
    raise self.retry(countdown=0.01)


@app.task(bind=True, autoretry_for=(ConnectionError,), retry_backoff=True,
          retry_backoff_max=0.2, retry_jitter=False, max_retries=3)
def auto_flaky(self, d: str, fails: int) -> int:  # type: ignore[no-untyped-def]
    append(d, "attempts", f"{self.request.retries} {time.time()!r}")
    if self.request.retries < fails:
        raise ConnectionError(f"down at attempt {self.request.retries}")
    return self.request.retries


# -- waiting on the test ---------------------------------------------------------------


@app.task(bind=True, track_started=True)
def blocker(self, d: str, release: str = "release", log: str = "blocker") -> int:  # type: ignore[no-untyped-def]
    """Logs its start, waits until the test creates ``release``, logs its end."""
    append(d, log, f"start {os.getpid()} {self.request.id}")
    if not wait_file(d, release):
        raise RuntimeError("never released")
    append(d, log, f"done {os.getpid()} {self.request.id}")
    return os.getpid()


@app.task(bind=True)
def progress(self, d: str) -> str:  # type: ignore[no-untyped-def]
    self.update_state(state="PROGRESS", meta={"current": 1, "total": 2})
    if not wait_file(d, "release"):
        raise RuntimeError("never released")
    return "finished"


# -- time limits -----------------------------------------------------------------------


@app.task(soft_time_limit=0.2)
def soft_limited(d: str, seconds: float = 10) -> str:
    append(d, "soft", f"start {os.getpid()}")
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "soft limit caught"
    return "slept"


@app.task(time_limit=0.3)
def hard_limited(d: str) -> str:
    append(d, "hard", f"start {os.getpid()}")
    time.sleep(10)
    append(d, "hard", "done")
    return "slept"


@app.task
def sleeper(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


# -- faults ----------------------------------------------------------------------------


@app.task(bind=True, acks_late=True, reject_on_worker_lost=True)
def killed_once(self, d: str) -> int:  # type: ignore[no-untyped-def]
    """First run: logs its pid and waits (the test SIGKILLs it). Later runs finish."""
    append(d, "runs", f"start {os.getpid()} {self.request.delivery_info['redelivered']}")
    if len(lines(d, "runs")) == 1:
        wait_file(d, "never")
        raise RuntimeError("the test should have killed this child")
    append(d, "runs", "done")
    return len(lines(d, "runs"))


@app.task
def early_ack_killed(d: str) -> None:
    """Default (early) ack; the test SIGKILLs its child while it waits."""
    append(d, "runs", f"start {os.getpid()}")
    wait_file(d, "never")
    append(d, "runs", "done")


@app.task(acks_late=True)
def late_work(d: str, n: int) -> int:
    append(d, "late", str(n))
    time.sleep(0.002)
    return n


@app.task
def early_work(d: str, n: int) -> int:
    append(d, "early", str(n))
    time.sleep(0.002)
    return n


@app.task(acks_late=True, reject_on_worker_lost=True)
def poison(d: str) -> None:
    append(d, "poison", f"start {os.getpid()}")
    os.kill(os.getpid(), 9)


# -- concurrency -----------------------------------------------------------------------


@app.task
def barrier(d: str, parties: int) -> int:
    """Returns once ``parties`` tasks have started: proves they ran at the same time."""
    append(d, "barrier", str(os.getpid()))
    deadline = time.monotonic() + 10
    while len(lines(d, "barrier")) < parties:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(lines(d, 'barrier'))} of {parties} ran at once")
        time.sleep(0.005)
    return parties


# -- helpers for the tests (not tasks) -------------------------------------------------


def messages_left(app: Celery) -> int:
    """Every message still in the broker: ready, delayed or held by a consumer."""
    import sqlite3

    from celeriac.brokers.sqlite import path_from_url

    conn = sqlite3.connect(path_from_url(app.broker_url), timeout=10)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM celeriac_messages").fetchone()[0])
    finally:
        conn.close()


class SlowOnSuccess(Task):  # type: ignore[type-arg]
    """A task class whose on_success hook outlasts the task's soft time limit."""

    def on_success(self, retval, task_id, args, kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.3)
        append(args[0], "hook", "done")


@app.task(base=SlowOnSuccess, soft_time_limit=0.1)
def quick_with_slow_hook(d: str, x: int) -> int:
    return x
