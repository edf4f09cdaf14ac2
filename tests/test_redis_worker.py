"""Real worker processes on Redis: calls, failures, retries, ETA, expiry, revoke, priorities.

Each test uses its own key prefix on the shared server (db ``REDIS_DB``) and deletes its
keys afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from celeriac import Celery, states
from celeriac.brokers.redis import RedisBroker
from celeriac.exceptions import TaskRevokedError
from tests.apps import redis_tasks as rt
from tests.apps.events import lines
from tests.conftest import WorkerProcess, bind_app
from tests.redis_support import delete_prefix, new_prefix, shared_url, wait_for, wait_worker_ready

StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def url() -> Iterator[str]:
    prefix = new_prefix("worker")
    yield shared_url(prefix=prefix)
    delete_prefix(prefix)


@pytest.fixture
def app(url: str) -> Iterator[Celery]:
    app = bind_app(rt.app, url, result_backend=url)
    yield app
    app.close()


@pytest.fixture
def d(tmp_path: Path) -> str:
    return str(tmp_path)


@pytest.fixture
def start(start_worker: StartWorker, url: str) -> Callable[..., WorkerProcess]:
    def run(app: Celery, *args: str, env: dict[str, str] | None = None,
            **kwargs: object) -> WorkerProcess:
        worker = start_worker(app, *args, env={"CELERIAC_RESULT_BACKEND": url, **(env or {})},
                              wait=False, **kwargs)
        return wait_worker_ready(worker, url)

    return run


def broker_of(app: Celery) -> RedisBroker:
    broker = app.broker
    assert isinstance(broker, RedisBroker)
    return broker


def raw(app: Celery) -> redis.Redis:
    return broker_of(app).connector.client


@pytest.mark.parametrize("pool,concurrency", [("prefork", 2), ("threads", 3), ("solo", 1)])
def test_tasks_run_and_results_come_back(app: Celery, start: Callable[..., WorkerProcess],
                                         pool: str, concurrency: int) -> None:
    worker = start(app, pool=pool, concurrency=concurrency)
    results = [rt.add.delay(i, i) for i in range(200)]
    assert [r.get(timeout=30) for r in results] == [2 * i for i in range(200)]
    assert rt.echo.delay(1, "x", k=[1, 2]).get(timeout=10) == {"args": [1, "x"],
                                                                "kwargs": {"k": [1, 2]}}
    broker = broker_of(app)
    assert broker.queue_size("celery") == 0
    # Everything was acked: nothing is left in any consumer's in-flight hash.
    client = raw(app)
    inflight = list(client.scan_iter(match=f"{broker.prefix}celeriac.inflight.*"))
    wait_for(lambda: sum(client.hlen(k) for k in inflight) == 0, message="the last acks")
    assert worker.proc.poll() is None


def test_failures_keep_their_exception_type(app: Celery, start: Callable[..., WorkerProcess]
                                            ) -> None:
    start(app)
    with pytest.raises(ValueError, match="nope"):
        rt.fail.delay("nope").get(timeout=10)
    result = rt.fail_custom.delay()
    with pytest.raises(Exception) as info:
        result.get(timeout=10)
    assert type(info.value).__name__ == "CustomError"
    assert result.state == states.FAILURE
    assert "CustomError" in (result.traceback or "")


def test_retry_with_countdown(app: Celery, start: Callable[..., WorkerProcess], d: str) -> None:
    start(app)
    result = rt.flaky.delay(d, 2, countdown=0.3)
    assert result.get(timeout=20) == 2
    attempts = [line.split() for line in lines(d, "attempts")]
    assert [int(a[0]) for a in attempts] == [0, 1, 2]
    gaps = [float(attempts[i + 1][1]) - float(attempts[i][1]) for i in range(2)]
    assert all(g >= 0.28 for g in gaps), gaps


def test_countdown_waits_in_redis_not_in_the_worker(app: Celery,
                                                    start: Callable[..., WorkerProcess],
                                                    d: str) -> None:
    start(app)
    broker = broker_of(app)
    client = raw(app)
    sent = time.time()
    result = rt.record.apply_async((d, "eta", "x"), countdown=1.5)
    # The worker fetched it early and parked it in the delayed set: no consumer holds it.
    wait_for(lambda: client.zcard(broker.delayed_key("celery")) == 1,
             message="the message to be parked")
    inflight = list(client.scan_iter(match=f"{broker.prefix}celeriac.inflight.*"))
    assert sum(client.hlen(k) for k in inflight) == 0
    assert result.get(timeout=10) == "x"
    ran_at = float(lines(d, "eta")[0].split()[1])
    assert 1.45 <= ran_at - sent < 3.0
    assert client.zcard(broker.delayed_key("celery")) == 0


def test_eta_in_the_past_runs_at_once(app: Celery, start: Callable[..., WorkerProcess],
                                      d: str) -> None:
    start(app)
    eta = datetime.now(UTC) - timedelta(seconds=30)
    assert rt.add.apply_async((1, 2), eta=eta).get(timeout=10) == 3


def test_expired_task_is_not_run(app: Celery, start: Callable[..., WorkerProcess], d: str
                                 ) -> None:
    result = rt.record.apply_async((d, "expired", "x"), expires=0.2)
    time.sleep(0.4)  # let it expire before any worker exists: the point of the test
    start(app)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=10)
    assert result.state == states.REVOKED
    assert lines(d, "expired") == []


def test_revoked_task_is_not_run(app: Celery, start: Callable[..., WorkerProcess], d: str
                                 ) -> None:
    doomed = rt.record.apply_async((d, "revoked", "doomed"), countdown=2)
    doomed.revoke()
    start(app)
    after = rt.record.delay(d, "revoked", "after")
    assert after.get(timeout=10) == "after"
    with pytest.raises(TaskRevokedError):
        doomed.get(timeout=10)
    wait_for(lambda: broker_of(app).queue_size("celery") == 0, message="the queue to drain")
    assert [line.split()[0] for line in lines(d, "revoked")] == ["after"]


def test_lower_priority_number_runs_first(app: Celery, start: Callable[..., WorkerProcess],
                                          d: str) -> None:
    # kombu's order on Redis: 0 before 3-5 before 6-8 before 9.
    sent = [(0, 9), (1, 6), (2, 0), (3, 3), (4, 9), (5, 0)]
    results = [rt.work.apply_async((d, n), priority=p) for n, p in sent]
    start(app, pool="solo", env={"CELERIAC_TEST_PREFETCH": "1"})
    for r in results:
        r.get(timeout=10)
    ran = [int(line.split()[0]) for line in lines(d, "runs")]
    assert ran == [2, 5, 3, 1, 0, 4]


def test_several_queues(app: Celery, start: Callable[..., WorkerProcess], d: str) -> None:
    start(app, "-Q", "alpha,beta")
    a = rt.add.apply_async((1, 1), queue="alpha")
    b = rt.add.apply_async((2, 2), queue="beta")
    assert (a.get(timeout=10), b.get(timeout=10)) == (2, 4)


def test_warm_shutdown_gives_back_prefetched(app: Celery, start: Callable[..., WorkerProcess],
                                             d: str) -> None:
    worker = start(app, env={"CELERIAC_TEST_PREFETCH": "8", "CELERIAC_TEST_KEEP_PREFETCHED": "1"})
    (Path(d) / "hold").touch()
    results = [rt.late_work.delay(d, n) for n in range(6)]
    wait_for(lambda: lines(d, "runs"), message="the first task to start")
    worker.signal(15)
    (Path(d) / "hold").unlink()
    assert worker.proc.wait(30) == 0
    # The running one finished; the prefetched ones went back to the queue.
    assert results[0].get(timeout=10) == 0
    broker = broker_of(app)
    assert broker.queue_size("celery") == 5
    start(app)
    assert [r.get(timeout=20) for r in results] == list(range(6))
    assert sorted(int(line.split()[0]) for line in lines(d, "runs")) == list(range(6))
