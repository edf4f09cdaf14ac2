"""celeriac sends; a real Celery worker runs; celeriac's AsyncResult.get() reads.

On Redis and on RabbitMQ (tests/interop/conftest.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from celeriac import Celery, chain, chord, group
from celeriac.exceptions import TaskRevokedError
from tests.apps import interop_tasks as it
from tests.conftest import wait_for
from tests.interop.conftest import Interop

Start = Callable[..., Any]
redis_only = pytest.mark.parametrize("interop", ["redis"], indirect=True)


def lines(d: str, name: str) -> list[list[str]]:
    try:
        with open(f"{d}/{name}") as f:
            return [line.split() for line in f.read().splitlines()]
    except FileNotFoundError:
        return []


def test_calls_kwargs_and_results(celeriac_app: Celery, celery_worker: Start) -> None:
    celery_worker()
    assert it.add.delay(2, 2).get(timeout=10) == 4
    assert it.echo.apply_async((1, "two"), {"k": [3, {"x": None}]}).get(timeout=10) == {
        "args": [1, "two"], "kwargs": {"k": [3, {"x": None}]}, "impl": "celery"}
    assert celeriac_app.send_task("interop.add", (20, 22)).get(timeout=10) == 42
    results = [it.add.delay(i, 1) for i in range(50)]
    assert [r.get(timeout=20) for r in results] == [i + 1 for i in range(50)]


def test_failure_keeps_exception_type(celeriac_app: Celery, celery_worker: Start) -> None:
    celery_worker()
    result = it.fail.delay("no way")
    with pytest.raises(ValueError, match="no way"):
        result.get(timeout=10)
    assert result.state == "FAILURE"
    assert "ValueError" in (result.traceback or "")


def test_retries(celeriac_app: Celery, celery_worker: Start) -> None:
    celery_worker()
    assert it.retrying.delay(2).get(timeout=20) == {"retries": 2, "impl": "celery"}


def test_countdown_and_eta(celeriac_app: Celery, interop: Interop, celery_worker: Start) -> None:
    celery_worker()
    sent = time.time()
    result = it.record.apply_async((interop.dir, "eta", "later"), countdown=1.5)
    assert result.get(timeout=10) == "later"
    [[_, ran, impl]] = lines(interop.dir, "eta")
    assert impl == "celery" and float(ran) - sent >= 1.45


def test_expires_while_waiting_for_its_countdown(celeriac_app: Celery, interop: Interop,
                                                 celery_worker: Start) -> None:
    celery_worker()
    result = it.record.apply_async((interop.dir, "exp", "x"), countdown=1, expires=0.5)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=10)
    assert lines(interop.dir, "exp") == []


@redis_only  # RabbitMQ drops a message past its TTL itself: no state to read
def test_expired_before_a_worker_starts(celeriac_app: Celery, interop: Interop,
                                        celery_worker: Start) -> None:
    result = it.record.apply_async((interop.dir, "exp", "x"), expires=0.1)
    time.sleep(0.3)  # expire before a worker exists: the point of the test
    celery_worker()
    with pytest.raises(TaskRevokedError):
        result.get(timeout=10)
    assert result.state == "REVOKED"
    assert lines(interop.dir, "exp") == []


def test_revoke_reaches_celery_workers(celeriac_app: Celery, interop: Interop,
                                       celery_worker: Start) -> None:
    worker = celery_worker()
    doomed = it.record.apply_async((interop.dir, "rev", "doomed"), countdown=2)
    # The Celery worker holds it in memory until its ETA; a revoke must reach it there.
    wait_for(lambda: f"[{doomed.id}] received" in worker.log(), 10,
             message="the Celery worker to receive the task first (the case tested)")
    doomed.revoke()
    after = it.record.apply_async((interop.dir, "rev", "after"), countdown=2.5)
    assert after.get(timeout=10) == "after"
    with pytest.raises(TaskRevokedError):
        doomed.get(timeout=10)
    assert [r[0] for r in lines(interop.dir, "rev")] == ["after"]


@redis_only  # kombu's Redis priority sub-queues (RabbitMQ: x-max-priority, tested apart)
def test_priorities_follow_kombu(celeriac_app: Celery, interop: Interop,
                                 celery_worker: Start) -> None:
    sent = [("a", 9), ("b", 6), ("c", 0), ("d", 3), ("e", 9), ("f", 0)]
    results = [it.record.apply_async((interop.dir, "prio", v), priority=p) for v, p in sent]
    celery_worker("--prefetch-multiplier", "1")
    for r in results:
        r.get(timeout=10)
    assert [r[0] for r in lines(interop.dir, "prio")] == ["c", "f", "d", "b", "a", "e"]


@redis_only  # reads the members' stored documents; rpc:// results are messages
def test_group_members(celeriac_app: Celery, celery_worker: Start) -> None:
    """Group members as the canvas sends them (group id and index in the headers)."""
    celery_worker()
    group_id = str(uuid.uuid4())
    members = [it.add.apply_async((i, i), group_id=group_id, group_index=i) for i in range(5)]
    assert celeriac_app.GroupResult(group_id, members).get(timeout=15) == [0, 2, 4, 6, 8]
    assert all(m.backend.get(m.id)["group_id"] == group_id for m in members)


def test_chain_and_group(celeriac_app: Celery, celery_worker: Start) -> None:
    celery_worker()
    assert chain(it.add.s(2, 2), it.mul.s(5), it.add.s(1))().get(timeout=15) == 21
    assert group(it.add.s(i, i) for i in range(5))().get(timeout=15) == [0, 2, 4, 6, 8]


@redis_only  # a Celery worker on rpc:// cannot count a chord's parts
def test_chord(celeriac_app: Celery, celery_worker: Start) -> None:
    celery_worker()
    # Celery's worker joins the chord through the keys our client set up (.s) and runs
    # the body once the last header task is recorded.
    assert chord([it.add.s(i, i) for i in range(4)], it.xsum.s())().get(timeout=20) == 12
