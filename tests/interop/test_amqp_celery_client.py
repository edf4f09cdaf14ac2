"""RabbitMQ: a real Celery client (py-amqp, rpc://) sends; a celeriac worker runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import celery.exceptions
import pytest
from celery import chain, group

from celeriac import brokers
from tests.apps.amqp_interop import *  # noqa: F403 - fixtures
from tests.apps.amqp_interop import AmqpInterop
from tests.conftest import WorkerProcess

Start = Callable[..., WorkerProcess]


def lines(d: str, name: str) -> list[list[str]]:
    try:
        with open(f"{d}/{name}") as f:
            return [line.split() for line in f.read().splitlines()]
    except FileNotFoundError:
        return []


def test_calls_kwargs_and_results(celery_amqp_app: Any, celeriac_amqp_worker: Start) -> None:
    celeriac_amqp_worker("-c", "2")
    add, echo = celery_amqp_app.tasks["interop.add"], celery_amqp_app.tasks["interop.echo"]
    assert add.delay(2, 2).get(timeout=10) == 4
    assert echo.apply_async((1, "two"), {"k": [3, {"x": None}]}).get(timeout=10) == {
        "args": [1, "two"], "kwargs": {"k": [3, {"x": None}]}, "impl": "celeriac"}
    assert celery_amqp_app.send_task("interop.add", (20, 22)).get(timeout=10) == 42
    results = [add.delay(i, 1) for i in range(50)]
    assert [r.get(timeout=20) for r in results] == [i + 1 for i in range(50)]
    assert results[0].state == "SUCCESS"


def test_failure_keeps_exception_type(celery_amqp_app: Any,
                                      celeriac_amqp_worker: Start) -> None:
    celeriac_amqp_worker()
    result = celery_amqp_app.tasks["interop.fail"].delay("no way")
    with pytest.raises(ValueError, match="no way"):
        result.get(timeout=10)
    assert result.state == "FAILURE"


def test_retries(celery_amqp_app: Any, celeriac_amqp_worker: Start) -> None:
    celeriac_amqp_worker()
    result = celery_amqp_app.tasks["interop.retrying"].delay(2)
    assert result.get(timeout=20) == {"retries": 2, "impl": "celeriac"}


def test_countdown_and_eta(celery_amqp_app: Any, amqp_interop: AmqpInterop,
                           celeriac_amqp_worker: Start) -> None:
    celeriac_amqp_worker()
    record = celery_amqp_app.tasks["interop.record"]
    sent = time.time()
    result = record.apply_async((amqp_interop.dir, "eta", "later"), countdown=1.5)
    assert result.get(timeout=10) == "later"
    [[_, ran, impl]] = lines(amqp_interop.dir, "eta")
    assert impl == "celeriac" and float(ran) - sent >= 1.45


def test_expires(celery_amqp_app: Any, amqp_interop: AmqpInterop,
                 celeriac_amqp_worker: Start) -> None:
    celeriac_amqp_worker()
    record = celery_amqp_app.tasks["interop.record"]
    # Due after it expires: the worker holds it (parked), then finds it expired.
    result = record.apply_async((amqp_interop.dir, "exp", "x"), countdown=1, expires=0.5)
    with pytest.raises(celery.exceptions.TaskRevokedError):
        result.get(timeout=10)
    assert result.state == "REVOKED"
    assert lines(amqp_interop.dir, "exp") == []


def test_revoke_with_celery_control(celery_amqp_app: Any, amqp_interop: AmqpInterop,
                                    celeriac_amqp_worker: Start) -> None:
    celeriac_amqp_worker("-c", "2")
    record = celery_amqp_app.tasks["interop.record"]
    doomed = record.apply_async((amqp_interop.dir, "rev", "doomed"), countdown=2)
    celery_amqp_app.control.revoke(doomed.id)  # kombu pidbox: fanout celery.pidbox
    after = record.apply_async((amqp_interop.dir, "rev", "after"), countdown=2.5)
    assert after.get(timeout=10) == "after"
    with pytest.raises(celery.exceptions.TaskRevokedError):
        doomed.get(timeout=10)
    assert [r[0] for r in lines(amqp_interop.dir, "rev")] == ["after"]


def test_chain_and_group(celery_amqp_app: Any, celeriac_amqp_worker: Start) -> None:
    celeriac_amqp_worker("-c", "2")
    add, mul = celery_amqp_app.tasks["interop.add"], celery_amqp_app.tasks["interop.mul"]
    assert chain(add.s(2, 2), mul.s(5), add.s(1))().get(timeout=15) == 21
    grp = group(add.s(i, i) for i in range(5))()
    assert grp.get(timeout=15) == [0, 2, 4, 6, 8]


def test_celery_worker_and_celeriac_worker_share_a_queue(
    celery_amqp_app: Any, celery_amqp_worker: Callable[..., Any],
    celeriac_amqp_worker: Start, amqp_interop: AmqpInterop,
) -> None:
    celeriac_amqp_worker()
    celery_amqp_worker()
    echo = celery_amqp_app.tasks["interop.echo"]
    results = [echo.delay(i) for i in range(60)]
    values = [r.get(timeout=30) for r in results]
    assert [v["args"] for v in values] == [[i] for i in range(60)]
    assert {v["impl"] for v in values} == {"celery", "celeriac"}
    broker = brokers.connect(amqp_interop.url)
    try:
        assert broker.queue_size("celery") == 0
    finally:
        broker.close()
