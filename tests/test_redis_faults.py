"""Faults on Redis with real worker processes: nothing is lost, nothing runs twice needlessly.

* a whole worker is SIGKILLed with acks_late tasks in flight: a live worker gives its
  messages back (at once on the same machine, after ``broker_recovery_timeout`` from
  another), and only the tasks it was running run again;
* a live worker's long task and ETA task are never handed to anybody else;
* the Redis server restarts (or crashes) mid-load, and a proxy cuts every connection
  again and again: every task sent runs and its result is stored.

Outages use a private ``redis-server`` started by the test on a free port (append-only
file, ``appendfsync always``) and stopped by pid.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from celeriac import Celery
from celeriac.brokers.redis import RedisBroker
from tests.apps import redis_tasks as rt
from tests.apps.events import lines
from tests.conftest import WorkerProcess, bind_app
from tests.redis_support import (
    CuttingProxy,
    PrivateRedis,
    delete_prefix,
    new_prefix,
    shared_url,
    wait_for,
    wait_worker_ready,
)

StartWorker = Callable[..., WorkerProcess]
RECOVERY = 3.0  # broker_recovery_timeout of the workers in these tests


@pytest.fixture
def d(tmp_path: Path) -> str:
    work = tmp_path / "work"
    work.mkdir()
    return str(work)


@pytest.fixture
def shared() -> Iterator[str]:
    prefix = new_prefix("fault")
    yield shared_url(prefix=prefix)
    delete_prefix(prefix)


def make_app(broker_url: str, backend_url: str | None = None, **settings: object) -> Celery:
    return bind_app(rt.app, broker_url, result_backend=backend_url or broker_url, **settings)


def launch(start_worker: StartWorker, app: Celery, backend_url: str, *args: str,
           host: str | None = None, prefetch: int = 1, concurrency: int = 1,
           ready_url: str | None = None, recovery: float = RECOVERY) -> WorkerProcess:
    env = {"CELERIAC_RESULT_BACKEND": backend_url,
           "CELERIAC_TEST_RECOVERY_TIMEOUT": str(recovery),
           "CELERIAC_TEST_PREFETCH": str(prefetch),
           # What a worker prefetched stays with it (the tests count what it holds).
           "CELERIAC_TEST_KEEP_PREFETCHED": "1"}
    if host:
        env["CELERIAC_HOST_ID"] = host
    worker = start_worker(app, *args, concurrency=concurrency, env=env, wait=False)
    return wait_worker_ready(worker, ready_url or app.broker_url)


def runs(d: str) -> list[list[str]]:
    return [line.split() for line in lines(d, "runs")]


def inflight_total(broker: RedisBroker) -> int:
    client = broker.connector.client
    keys = list(client.scan_iter(match=f"{broker.prefix}celeriac.inflight.*"))
    return sum(int(client.hlen(k)) for k in keys)


# -- a whole worker dies ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["same-machine", "other-machine"])
def test_killed_worker_is_recovered_by_a_live_one(
    shared: str, d: str, start_worker: StartWorker, where: str
) -> None:
    app = make_app(shared)
    broker = app.broker
    assert isinstance(broker, RedisBroker)
    hold = Path(d) / "hold"
    hold.touch()
    host_a, host_b = ("one", "one") if where == "same-machine" else ("a", "b")
    results = [rt.late_work.delay(d, n) for n in range(12)]
    doomed = launch(start_worker, app, shared, host=host_a, concurrency=2, prefetch=2)
    # Each of A's two children runs one task and holds one more (prefetch 2).
    wait_for(lambda: len(runs(d)) == 2 and inflight_total(broker) == 4,
             message="worker A to take its share")
    a_running = {int(r[0]) for r in runs(d)}
    survivor = launch(start_worker, app, shared, host=host_b)
    wait_for(lambda: len(runs(d)) == 3, message="worker B to start a task")
    killed_at = time.time()
    doomed.kill()
    hold.unlink()
    assert sorted(r.get(timeout=30) for r in results) == list(range(12))
    log = runs(d)
    per_task = Counter(int(r[0]) for r in log)
    # Only what A was running when it died ran twice; the rest exactly once.
    assert {n for n, c in per_task.items() if c > 1} == a_running
    assert all(c <= 2 for c in per_task.values())
    # Everything A held came back flagged as redelivered (A's process could have started
    # any of it): its two running tasks and its two prefetched ones.
    again = [r for r in log if r[2] == "True"]
    assert len(again) == 4 and a_running <= {int(r[0]) for r in again}
    first_redelivery = min(float(r[3]) for r in again)
    took = first_redelivery - killed_at
    if where == "same-machine":
        # A's processes are gone: B sees it at its next sweep.
        assert took < RECOVERY / 6 + 2.0, took
    else:
        # Only A's silent heartbeat tells B (A beat last at most 2 s before it died).
        assert RECOVERY - 2.2 <= took <= RECOVERY + RECOVERY / 6 + 2.0, took
    wait_for(lambda: inflight_total(broker) == 0, message="every message to be acked")
    assert broker.queue_size("celery") == 0
    assert survivor.proc.poll() is None
    app.close()


def test_live_workers_long_and_eta_tasks_are_never_taken_back(
    shared: str, d: str, start_worker: StartWorker
) -> None:
    app = make_app(shared)
    broker = app.broker
    assert isinstance(broker, RedisBroker)
    busy = launch(start_worker, app, shared, host="busy")
    long = rt.long_task.delay(d)
    wait_for(lambda: lines(d, "long"), message="the long task to start")
    eta_sent = time.monotonic()
    eta = rt.record.apply_async((d, "eta", "x"), countdown=3 * RECOVERY)
    other = launch(start_worker, app, shared, host="other")
    # Well past two recovery timeouts: the long task is still held by its live worker (the
    # supervisor beats for the busy child) and the ETA task waits in Redis, held by nobody.
    while time.monotonic() < eta_sent + 3 * RECOVERY - 0.5:
        assert len(lines(d, "long")) == 1
        assert lines(d, "eta") == []
        assert inflight_total(broker) == 1
        time.sleep(0.1)
    assert eta.get(timeout=10) == "x"
    (Path(d) / "release").touch()
    assert long.get(timeout=10) == busy.children()[0]
    assert [line.split()[0] for line in lines(d, "long")] == ["start", "done"]
    assert len(lines(d, "eta")) == 1
    assert other.proc.poll() is None and busy.proc.poll() is None
    app.close()


# -- the server goes away -------------------------------------------------------------------


def _send_in_background(app: Celery, d: str, total: int, sent: list[object],
                        pace: float = 0.0) -> threading.Thread:
    def send() -> None:
        for n in range(total):
            sent.append(app.send_task(rt.work.name, (d, n)))
            if pace:
                time.sleep(pace)  # spread the load over the outage

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("how", ["restart", "crash"])
def test_redis_restart_mid_load_loses_nothing(
    tmp_path: Path, d: str, start_worker: StartWorker, how: str
) -> None:
    server = PrivateRedis(tmp_path / "redis")
    try:
        app = make_app(server.url, task_publish_retry_policy={
            "max_retries": None, "interval_start": 0, "interval_step": 0.1,
            "interval_max": 0.5})
        worker = launch(start_worker, app, server.url, concurrency=2, prefetch=4)
        total = 400
        sent: list[object] = []
        sender = _send_in_background(app, d, total, sent, pace=0.005)
        wait_for(lambda: len(runs(d)) >= 100, message="the load to get going")
        server.restart(down_for=1.0, sig=signal.SIGKILL if how == "crash" else signal.SIGTERM)
        sender.join(120)
        assert len(sent) == total
        values = [r.get(timeout=60) for r in sent]  # type: ignore[attr-defined]
        assert values == list(range(total))
        log = runs(d)
        per_task = Counter(int(r[0]) for r in log)
        assert set(per_task) == set(range(total))
        # No worker died, so nothing was redelivered; a publish whose reply the outage
        # swallowed may have been sent twice (at-least-once), and only that.
        assert all(r[2] == "False" for r in log)
        assert sum(c - 1 for c in per_task.values()) <= 1
        assert worker.proc.poll() is None
        wait_for(lambda: app.broker.queue_size("celery") == 0, message="the queue to drain")
        app.close()
    finally:
        server.crash()


def test_cut_connections_lose_nothing(tmp_path: Path, d: str, start_worker: StartWorker) -> None:
    """Workers reach Redis through a proxy that resets every connection again and again."""
    server = PrivateRedis(tmp_path / "redis")
    proxy = CuttingProxy(server.port)
    stop = threading.Event()
    try:
        worker_app = make_app(proxy.url())
        # The client has its own app, straight to Redis.
        client = Celery("client", broker=server.url, backend=server.url)
        worker = launch(start_worker, worker_app, proxy.url(), concurrency=2, prefetch=4,
                        ready_url=server.url)

        def cutter() -> None:
            while not stop.wait(0.15):
                proxy.cut()

        threading.Thread(target=cutter, daemon=True).start()
        total = 400
        sent: list[object] = []
        sender = _send_in_background(client, d, total, sent, pace=0.003)
        sender.join(120)
        values = [r.get(timeout=60) for r in sent]  # type: ignore[attr-defined]
        stop.set()
        assert values == list(range(total))
        assert proxy.cuts >= 5
        log = runs(d)
        # The client's publishes did not go through the proxy: every task ran exactly once.
        assert sorted(int(r[0]) for r in log) == list(range(total))
        assert all(r[2] == "False" for r in log)
        assert worker.proc.poll() is None, worker.log()
        client.close()
    finally:
        stop.set()
        proxy.close()
        server.crash()


def test_cut_connections_of_the_client_lose_nothing(tmp_path: Path, d: str,
                                                    start_worker: StartWorker) -> None:
    """Client and workers through the cutting proxy: every task runs, every result arrives."""
    server = PrivateRedis(tmp_path / "redis")
    proxy = CuttingProxy(server.port)
    stop = threading.Event()
    try:
        app = make_app(proxy.url(), task_publish_retry_policy={
            "max_retries": None, "interval_start": 0, "interval_step": 0.05,
            "interval_max": 0.2})
        worker = launch(start_worker, app, proxy.url(), concurrency=2, prefetch=4,
                        ready_url=server.url)

        def cutter() -> None:
            while not stop.wait(0.2):
                proxy.cut()

        threading.Thread(target=cutter, daemon=True).start()
        total = 300
        sent: list[object] = []
        sender = _send_in_background(app, d, total, sent, pace=0.003)
        sender.join(120)
        values = [r.get(timeout=60) for r in sent]  # type: ignore[attr-defined]
        stop.set()
        assert values == list(range(total))
        log = runs(d)
        per_task = Counter(int(r[0]) for r in log)
        assert set(per_task) == set(range(total))
        assert all(r[2] == "False" for r in log)
        # Only a publish cut after Redis took it but before the reply can be sent twice.
        assert sum(c - 1 for c in per_task.values()) <= proxy.cuts
        assert worker.proc.poll() is None, worker.log()
        app.close()
    finally:
        stop.set()
        proxy.close()
        server.crash()


def test_worker_started_while_redis_is_down_waits_for_it(
    tmp_path: Path, d: str, start_worker: StartWorker
) -> None:
    server = PrivateRedis(tmp_path / "redis")
    try:
        app = make_app(server.url)
        server.stop()
        env = {"CELERIAC_RESULT_BACKEND": server.url}
        worker = start_worker(app, env=env, wait=False)
        time.sleep(1.0)  # the worker runs without Redis for a while: the point of the test
        assert worker.proc.poll() is None, worker.log()
        server.start()
        assert rt.add.delay(2, 3).get(timeout=30) == 5
        assert worker.proc.poll() is None
        assert os.path.exists(worker.log_path)
        app.close()
    finally:
        server.crash()
