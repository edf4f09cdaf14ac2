"""A real Celery client sends; a celeriac worker runs; Celery's AsyncResult.get() reads.

On Redis and on RabbitMQ (tests/interop/conftest.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import celery.exceptions
import pytest
from celery import chain, chord, group

from celeriac import brokers
from tests.conftest import WorkerProcess
from tests.interop.conftest import Interop

Start = Callable[..., WorkerProcess]
redis_only = pytest.mark.parametrize("interop", ["redis"], indirect=True)


def lines(d: str, name: str) -> list[list[str]]:
    try:
        with open(f"{d}/{name}") as f:
            return [line.split() for line in f.read().splitlines()]
    except FileNotFoundError:
        return []


def test_calls_kwargs_and_results(celery_app: Any, celeriac_worker: Start) -> None:
    celeriac_worker("-c", "2")
    add, echo = celery_app.tasks["interop.add"], celery_app.tasks["interop.echo"]
    assert add.delay(2, 2).get(timeout=10) == 4
    assert echo.apply_async((1, "two"), {"k": [3, {"x": None}]}).get(timeout=10) == {
        "args": [1, "two"], "kwargs": {"k": [3, {"x": None}]}, "impl": "celeriac"}
    assert celery_app.send_task("interop.add", (20, 22)).get(timeout=10) == 42
    results = [add.delay(i, 1) for i in range(50)]
    assert [r.get(timeout=20) for r in results] == [i + 1 for i in range(50)]
    assert results[0].state == "SUCCESS"


def test_failure_keeps_exception_type(celery_app: Any, celeriac_worker: Start) -> None:
    celeriac_worker()
    result = celery_app.tasks["interop.fail"].delay("no way")
    with pytest.raises(ValueError, match="no way"):
        result.get(timeout=10)
    assert result.state == "FAILURE"
    assert "ValueError" in result.traceback


def test_retries(celery_app: Any, celeriac_worker: Start) -> None:
    celeriac_worker()
    result = celery_app.tasks["interop.retrying"].delay(2)
    assert result.get(timeout=20) == {"retries": 2, "impl": "celeriac"}


def test_countdown_and_eta(celery_app: Any, interop: Interop, celeriac_worker: Start) -> None:
    celeriac_worker()
    record = celery_app.tasks["interop.record"]
    sent = time.time()
    result = record.apply_async((interop.dir, "eta", "later"), countdown=1.5)
    assert result.get(timeout=10) == "later"
    [[_, ran, impl]] = lines(interop.dir, "eta")
    assert impl == "celeriac" and float(ran) - sent >= 1.45


def test_expires_while_waiting_for_its_countdown(celery_app: Any, interop: Interop,
                                                 celeriac_worker: Start) -> None:
    celeriac_worker()
    record = celery_app.tasks["interop.record"]
    # Due after it expires: the worker parks it, then finds it expired.
    result = record.apply_async((interop.dir, "exp", "x"), countdown=1, expires=0.5)
    with pytest.raises(celery.exceptions.TaskRevokedError):
        result.get(timeout=10)
    assert result.state == "REVOKED"
    assert lines(interop.dir, "exp") == []


@redis_only  # RabbitMQ may drop an expired message itself (its TTL): no state to read
def test_expired_before_a_worker_starts(celery_app: Any, interop: Interop,
                                        celeriac_worker: Start) -> None:
    result = celery_app.tasks["interop.record"].apply_async((interop.dir, "exp", "x"),
                                                            expires=0.1)
    time.sleep(0.3)  # expire before a worker exists: the point of the test
    celeriac_worker()
    with pytest.raises(celery.exceptions.TaskRevokedError):
        result.get(timeout=10)
    assert result.state == "REVOKED"
    assert lines(interop.dir, "exp") == []


def test_revoke_with_celery_control(celery_app: Any, interop: Interop,
                                    celeriac_worker: Start) -> None:
    celeriac_worker("-c", "2")
    record = celery_app.tasks["interop.record"]
    doomed = record.apply_async((interop.dir, "rev", "doomed"), countdown=2)
    celery_app.control.revoke(doomed.id)  # kombu's pidbox broadcast
    after = record.apply_async((interop.dir, "rev", "after"), countdown=2.5)
    assert after.get(timeout=10) == "after"
    with pytest.raises(celery.exceptions.TaskRevokedError):
        doomed.get(timeout=10)
    assert [r[0] for r in lines(interop.dir, "rev")] == ["after"]


@redis_only  # kombu's Redis priority sub-queues (RabbitMQ: x-max-priority, tested apart)
def test_priorities_follow_kombu(celery_app: Any, interop: Interop,
                                 celeriac_worker: Start) -> None:
    record = celery_app.tasks["interop.record"]
    sent = [("a", 9), ("b", 6), ("c", 0), ("d", 3), ("e", 9), ("f", 0)]
    results = [record.apply_async((interop.dir, "prio", v), priority=p) for v, p in sent]
    celeriac_worker("-P", "solo", env={"CELERIAC_TEST_PREFETCH": "1"})
    for r in results:
        r.get(timeout=10)
    assert [r[0] for r in lines(interop.dir, "prio")] == ["c", "f", "d", "b", "a", "e"]


def test_chain_and_group(celery_app: Any, celeriac_worker: Start) -> None:
    celeriac_worker("-c", "2")
    add, mul = celery_app.tasks["interop.add"], celery_app.tasks["interop.mul"]
    assert chain(add.s(2, 2), mul.s(5), add.s(1))().get(timeout=15) == 21
    grp = group(add.s(i, i) for i in range(5))()
    assert grp.get(timeout=15) == [0, 2, 4, 6, 8]


@redis_only  # Celery's rpc:// backend refuses chords on the client side
def test_chord(celery_app: Any, celeriac_worker: Start) -> None:
    celeriac_worker("-c", "2")
    # A Celery client's chord (its .s key, header messages with embed.chord): celeriac
    # workers record the parts in Celery's .j/.d keys and the last one sends the body.
    add, xsum = celery_app.tasks["interop.add"], celery_app.tasks["interop.xsum"]
    assert chord([add.s(i, i) for i in range(4)], xsum.s())().get(timeout=20) == 12


def test_celery_worker_and_celeriac_worker_share_a_queue(
    celery_app: Any, celery_worker: Callable[..., Any], celeriac_worker: Start,
    interop: Interop,
) -> None:
    celeriac_worker()
    celery_worker()
    echo = celery_app.tasks["interop.echo"]
    results = [echo.delay(i) for i in range(60)]
    values = [r.get(timeout=30) for r in results]
    assert [v["args"] for v in values] == [[i] for i in range(60)]
    # Both kinds of worker took part, and nothing is left behind in the queue.
    assert {v["impl"] for v in values} == {"celery", "celeriac"}
    broker = brokers.connect(interop.url)
    try:
        assert broker.queue_size("celery") == 0
    finally:
        broker.close()


@redis_only  # Celery's rpc:// backend refuses chords on the client side
def test_a_chord_run_by_both_kinds_of_worker(celery_app: Any, celery_worker: Callable[..., Any],
                                            celeriac_worker: Start) -> None:
    celeriac_worker()
    celery_worker()
    # Header tasks run by both kinds of worker: one join, one body.
    add, xsum = celery_app.tasks["interop.add"], celery_app.tasks["interop.xsum"]
    assert chord([add.s(i, i) for i in range(30)], xsum.s())().get(timeout=30) == 870
