"""Faults on RabbitMQ: killed workers, cut connections, refused publishes. Nothing confirmed
is lost: every task whose ``delay()`` returned runs at least once."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from celeriac import brokers
from celeriac.brokers import amqp_client as wire
from celeriac.protocol.message import Message
from tests.apps import amqp_app, amqp_support
from tests.conftest import WorkerProcess, bind_app, wait_for

StartWorker = Callable[..., WorkerProcess]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def starts(path: Path, key: str) -> list[str]:
    return [line for line in lines(path) if line.startswith(f"start {key} ")]


def test_killed_worker_acks_late_tasks_are_redelivered(start_worker: StartWorker,
                                                       tmp_path: Path) -> None:
    app = bind_app(amqp_app.app, amqp_support.url(), result_backend="rpc://")
    log = tmp_path / "runs.txt"
    try:
        worker = start_worker(app, "-c", "2", wait=False)
        assert amqp_app.add.delay(1, 1).get(timeout=30) == 2
        keys = [f"k{i}" for i in range(6)]
        results = [amqp_app.record_slow.delay(str(log), k, 1.0) for k in keys]
        wait_for(lambda: sum(1 for ln in lines(log) if ln.startswith("start")) >= 2, 20,
                 message="two tasks to start")
        in_flight = {ln.split()[1] for ln in lines(log) if ln.startswith("start")}
        worker.kill()  # supervisor and children, SIGKILL: their connections just drop
        start_worker(app, "-c", "2", wait=False)
        assert sorted(r.get(timeout=60) for r in results) == keys
        for key in keys:
            assert f"end {key}" in lines(log)
        for key in in_flight:
            assert len(starts(log, key)) >= 2, f"{key} was running and must have run again"
    finally:
        app.close()


def test_killed_child_running_acks_late_task_is_redelivered(start_worker: StartWorker,
                                                            tmp_path: Path) -> None:
    app = bind_app(amqp_app.app, amqp_support.url(), result_backend="rpc://")
    log = tmp_path / "runs.txt"
    try:
        worker = start_worker(app, "-c", "1", wait=False)
        assert amqp_app.add.delay(1, 1).get(timeout=30) == 2
        r = amqp_app.record_slow.delay(str(log), "victim", 1.5)
        wait_for(lambda: starts(log, "victim"), 20, message="the task to start")
        pid = int(starts(log, "victim")[0].split()[2])
        os.kill(pid, signal.SIGKILL)
        assert r.get(timeout=60) == "victim"
        runs = starts(log, "victim")
        assert len(runs) == 2 and runs[1].split()[2] != str(pid)
        assert worker.proc.poll() is None
    finally:
        app.close()


def ready_and_unacked(vhost: str, queue: str) -> tuple[int, int]:
    """Messages in ``queue``: ready, and delivered but not acked (rabbitmqctl: ~0.5 s)."""
    rows = amqp_support.rabbitmqctl_rows("list_queues", "-p", vhost, "name", "messages_ready",
                                         "messages_unacknowledged")
    for row in rows:
        if row[0] == queue:
            return int(row[1]), int(row[2])
    raise AssertionError(f"no queue {queue!r} in {vhost}: {rows!r}")


def test_killed_child_running_early_ack_task_is_not_run_again(start_worker: StartWorker,
                                                              tmp_path: Path) -> None:
    """In a batch, a task's early ack may wait for the batch's acks; the child's flusher
    sends it while the task still runs. Once sent, the child's death does not bring the
    task back; the unstarted rest of the batch does come back."""
    vhost = amqp_support.vhost()
    app = bind_app(amqp_app.app, amqp_support.url(vhost), result_backend="rpc://")
    log = tmp_path / "runs.txt"
    try:
        # Both queued before the worker starts: its first fetch takes them as one batch.
        amqp_app.record_slow_early.delay(str(log), "victim", 30)
        follower = amqp_app.record.delay(str(log), "follower")
        # (Prefetch release off: the follower stays held behind the long victim.)
        worker = start_worker(app, "-c", "1", wait=False,
                              env={"CELERIAC_TEST_KEEP_PREFETCHED": "1"})
        wait_for(lambda: starts(log, "victim"), 30, message="the task to start")
        # The follower, handed out with it (one batch: none ready), is all that is left
        # unsettled once the victim's deferred early ack went out.
        wait_for(lambda: ready_and_unacked(vhost, "celery") == (0, 1), 20, interval=0.2,
                 message="the running task's early ack")
        os.kill(int(starts(log, "victim")[0].split()[2]), signal.SIGKILL)
        assert follower.get(timeout=30) == "follower"
        assert len(starts(log, "victim")) == 1
        assert worker.proc.poll() is None
    finally:
        app.close()


def test_connection_cuts_lose_no_confirmed_task(start_worker: StartWorker,
                                                tmp_path: Path) -> None:
    vhost = amqp_support.vhost()
    proxy = amqp_support.TcpProxy()
    app = bind_app(amqp_app.app, proxy.url(vhost), result_backend="rpc://",
                   task_publish_retry_policy={"max_retries": 50, "interval_start": 0.05,
                                              "interval_step": 0.05, "interval_max": 0.2})
    log = tmp_path / "runs.txt"
    stop = threading.Event()

    def cutter() -> None:
        while not stop.wait(0.25) and proxy.cuts < 12:
            proxy.cut()

    try:
        start_worker(app, "-c", "2", wait=False)
        assert amqp_app.add.delay(1, 1).get(timeout=30) == 2
        thread = threading.Thread(target=cutter, daemon=True)
        thread.start()
        confirmed = []
        deadline = time.monotonic() + 60
        i = 0
        while proxy.cuts < 12 and time.monotonic() < deadline:
            key = f"k{i}"
            i += 1
            try:
                amqp_app.record_quiet.delay(str(log), key)
            except wire.ConnectionLost:
                continue  # not confirmed: the caller was told
            confirmed.append(key)
        stop.set()
        thread.join(5)
        assert proxy.cuts >= 12 and len(confirmed) > 100

        def all_ran() -> bool:
            ran = {ln.split()[1] for ln in lines(log)}
            return all(k in ran for k in confirmed)

        wait_for(all_ran, 90, interval=0.2, message="every confirmed task to run")
    finally:
        stop.set()
        app.close()
        proxy.close()


def test_publish_waits_for_the_confirm_and_raises_on_a_nack() -> None:
    url = amqp_support.url()
    vhost = url.rsplit("/", 1)[1]
    [params] = wire.parse_url(url)
    conn = wire.Connection(params).connect()
    ch = conn.channel()
    # A queue that refuses what does not fit: RabbitMQ nacks the publish.
    ch.queue_declare("full", durable=True, arguments={"x-max-length": 1,
                                                      "x-overflow": "reject-publish"})
    conn.close()
    broker = brokers.connect(url)
    try:
        broker.publish("full", [Message({"n": 1}, {}, b"one")])
        with pytest.raises(wire.PublishNacked):
            broker.publish("full", [Message({"n": 2}, {}, b"two")])
        assert broker.queue_size("full") == 1
    finally:
        broker.close()
    assert vhost


def test_publish_through_a_dead_connection_is_retried_then_raised() -> None:
    vhost = amqp_support.vhost()
    proxy = amqp_support.TcpProxy()
    broker = brokers.connect(proxy.url(vhost))
    broker.publish_retry_policy = {"max_retries": 2, "interval_start": 0.05,
                                   "interval_step": 0.05, "interval_max": 0.1}
    try:
        broker.publish("q", [Message({"n": 1}, {}, b"one")])
        proxy.cut()
        # Cut once: the next publish reconnects and goes through.
        broker.publish("q", [Message({"n": 2}, {}, b"two")])
        assert broker.queue_size("q") == 2
        proxy.refuse(True)
        proxy.cut()
        started = time.monotonic()
        with pytest.raises(wire.ConnectionLost):
            broker.publish("q", [Message({"n": 3}, {}, b"three")])
        assert time.monotonic() - started < 10
        proxy.refuse(False)
        broker.publish("q", [Message({"n": 4}, {}, b"four")])
        assert broker.queue_size("q") == 3
    finally:
        broker.close()
        proxy.close()


def test_consumer_survives_a_cut_and_unacked_messages_come_back() -> None:
    vhost = amqp_support.vhost()
    proxy = amqp_support.TcpProxy()
    direct = brokers.connect(amqp_support.url(vhost))
    broker = brokers.connect(proxy.url(vhost))
    try:
        direct.publish("q", [Message({"n": i}, {}, b"x") for i in range(5)])
        consumer = broker.consumer(["q"])
        got = consumer.fetch(2, 5)
        assert [d.message.headers["n"] for d in got] == [0, 1]
        proxy.cut()
        # Held when the connection dropped: back in the queue, counted as delivered.
        wait_for(lambda: direct.queue_size("q") == 5, 10, message="requeue by RabbitMQ")
        consumer.ack(got)  # acks for a dead connection are dropped, not raised
        seen: dict[int, int] = {}
        deadline = time.monotonic() + 20
        while len(seen) < 5 and time.monotonic() < deadline:
            batch = consumer.fetch(10, 1)
            for d in batch:
                seen[d.message.headers["n"]] = d.delivery_count
            consumer.ack(batch)
        assert seen == {0: 2, 1: 2, 2: 1, 3: 1, 4: 1}
        consumer.close()
        assert direct.queue_size("q") == 0
    finally:
        broker.close()
        direct.close()
        proxy.close()
