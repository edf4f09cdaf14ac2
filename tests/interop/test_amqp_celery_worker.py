"""RabbitMQ: a celeriac client sends; a real Celery worker (py-amqp) runs; rpc:// results."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from celeriac import Celery, chain, group
from celeriac.exceptions import TaskRevokedError
from tests.apps import interop_tasks
from tests.apps.amqp_interop import *  # noqa: F403 - fixtures
from tests.apps.amqp_interop import AmqpInterop

Start = Callable[..., Any]


def lines(d: str, name: str) -> list[list[str]]:
    try:
        with open(f"{d}/{name}") as f:
            return [line.split() for line in f.read().splitlines()]
    except FileNotFoundError:
        return []


def test_calls_and_results(celeriac_amqp_app: Celery, celery_amqp_worker: Start) -> None:
    celery_amqp_worker()
    assert interop_tasks.add.delay(2, 2).get(timeout=10) == 4
    assert interop_tasks.echo.apply_async((1, "two"), {"k": [3, {"x": None}]}).get(
        timeout=10) == {"args": [1, "two"], "kwargs": {"k": [3, {"x": None}]}, "impl": "celery"}
    assert celeriac_amqp_app.send_task("interop.add", (20, 22)).get(timeout=10) == 42
    results = [interop_tasks.add.delay(i, 1) for i in range(50)]
    assert [r.get(timeout=20) for r in results] == [i + 1 for i in range(50)]


def test_failure(celeriac_amqp_app: Celery, celery_amqp_worker: Start) -> None:
    celery_amqp_worker()
    result = interop_tasks.fail.delay("no way")
    with pytest.raises(ValueError, match="no way"):
        result.get(timeout=10)
    assert result.state == "FAILURE"


def test_retries(celeriac_amqp_app: Celery, celery_amqp_worker: Start) -> None:
    celery_amqp_worker()
    assert interop_tasks.retrying.delay(2).get(timeout=20) == {"retries": 2, "impl": "celery"}


def test_countdown(celeriac_amqp_app: Celery, amqp_interop: AmqpInterop,
                   celery_amqp_worker: Start) -> None:
    celery_amqp_worker()
    sent = time.time()
    result = interop_tasks.record.apply_async((amqp_interop.dir, "eta", "later"),
                                              countdown=1.5)
    assert result.get(timeout=10) == "later"
    [[_, ran, impl]] = lines(amqp_interop.dir, "eta")
    assert impl == "celery" and float(ran) - sent >= 1.45


def test_expires(celeriac_amqp_app: Celery, amqp_interop: AmqpInterop,
                 celery_amqp_worker: Start) -> None:
    celery_amqp_worker()
    result = interop_tasks.record.apply_async((amqp_interop.dir, "exp", "x"), countdown=1,
                                              expires=0.5)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=10)
    assert lines(amqp_interop.dir, "exp") == []


def test_revoke_reaches_celery_worker(celeriac_amqp_app: Celery, amqp_interop: AmqpInterop,
                                      celery_amqp_worker: Start) -> None:
    celery_amqp_worker()
    doomed = interop_tasks.record.apply_async((amqp_interop.dir, "rev", "doomed"),
                                              countdown=2)
    celeriac_amqp_app.control.revoke(doomed.id)
    after = interop_tasks.record.apply_async((amqp_interop.dir, "rev", "after"),
                                             countdown=2.5)
    assert after.get(timeout=10) == "after"
    with pytest.raises(TaskRevokedError):
        doomed.get(timeout=10)
    assert [r[0] for r in lines(amqp_interop.dir, "rev")] == ["after"]


def test_chain_and_group(celeriac_amqp_app: Celery, celery_amqp_worker: Start) -> None:
    celery_amqp_worker()
    add, mul = interop_tasks.add, interop_tasks.mul
    assert chain(add.s(2, 2), mul.s(5), add.s(1))().get(timeout=15) == 21
    assert group(add.s(i, i) for i in range(5))().get(timeout=15) == [0, 2, 4, 6, 8]
