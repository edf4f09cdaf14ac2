"""Time limits and child recycling, through real worker processes on SQLite."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from celeriac import Celery, states
from celeriac.exceptions import TimeLimitExceeded
from tests.apps import worker_support
from tests.apps import worker_tasks as wt
from tests.apps.events import lines
from tests.apps.worker_support import StartWorker
from tests.conftest import wait_for

# Fixtures: the test app on this test's database, a shared directory, logged workers.
app, d, start_worker = worker_support.app, worker_support.d, worker_support.start_worker


def test_soft_time_limit_raises_inside_the_task(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    worker = start_worker(app)
    children = worker.children()
    started = time.monotonic()
    assert wt.soft_limited.delay(d).get(timeout=10) == "soft limit caught"
    assert time.monotonic() - started < 5  # not the 10 s it would sleep
    # Per call, too; and the child lives on.
    assert wt.soft_limited.apply_async((d,), soft_time_limit=0.1).get(timeout=10) == (
        "soft limit caught"
    )
    assert wt.add.delay(1, 1).get(timeout=10) == 2
    assert worker.children() == children


def test_soft_time_limit_covers_only_the_task_body(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    # The task returns at once; its on_success hook then runs past the soft limit. The
    # limit must not fire inside the worker's own bookkeeping and lose the result.
    start_worker(app)
    assert wt.quick_with_slow_hook.delay(d, 7).get(timeout=10) == 7
    assert lines(d, "hook") == ["done"]  # the hook was not cut short
    assert app.broker.dead_letters() == []


def test_hard_time_limit_kills_and_replaces_the_child(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    worker = start_worker(app)
    first = wt.whoami.delay().get(timeout=10)["pid"]
    started = time.monotonic()
    result = wt.hard_limited.delay(d)
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=10)
    # Enforced close to the limit (0.3 s), not at the supervisor's next routine wake-up.
    assert time.monotonic() - started < 1.5
    assert result.state == states.FAILURE
    assert "TimeLimitExceeded" in (result.traceback or "")
    assert lines(d, "hard") == [f"start {first}"]  # killed before it could finish

    # The worker goes on with a new child.
    second = wt.whoami.delay().get(timeout=10)["pid"]
    assert second != first
    assert worker.children() == [second]
    # A per-call limit works the same way, and a task within its limit is not touched.
    assert wt.sleeper.apply_async((0.05,), time_limit=5).get(timeout=10) == 0.05
    killed = wt.sleeper.apply_async((10,), time_limit=0.2)
    with pytest.raises(TimeLimitExceeded):
        killed.get(timeout=10)
    assert wt.add.delay(2, 3).get(timeout=10) == 5
    assert worker.proc.poll() is None


def test_max_tasks_per_child_recycles_children(
    app: Celery, start_worker: StartWorker
) -> None:
    start_worker(app, "--max-tasks-per-child", "2")
    results = [wt.whoami.delay() for _ in range(6)]
    pids = [r.get(timeout=15)["pid"] for r in results]
    counts = Counter(pids)
    assert len(counts) == 3, pids
    assert set(counts.values()) == {2}, pids
    # In order, too: what a child fetched but could not run went back ahead of later work.
    assert pids == sorted(pids, key=pids.index)


def test_max_tasks_per_child_with_several_children(
    app: Celery, start_worker: StartWorker
) -> None:
    worker = start_worker(app, "--max-tasks-per-child", "3", concurrency=2)
    results = [wt.add.delay(i, i) for i in range(30)]
    assert [r.get(timeout=20) for r in results] == [2 * i for i in range(30)]
    pids = [wt.whoami.delay().get(timeout=10)["pid"] for _ in range(6)]
    assert max(Counter(pids).values()) <= 3
    wait_for(lambda: len(worker.children()) == 2, message="two children")
