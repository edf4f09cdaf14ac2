"""A RabbitMQ node restart under load, on a private node (``tests/rabbitmq_node.py``).

A worker consumes while a client publishes with confirms; the node is stopped (a clean
``rabbitmqctl stop``, or SIGKILL: a crash), restarted on the same data directory, and:
every task whose publish was confirmed runs at least once (durable queues and persistent
messages survive the restart, the worker reconnects and resumes consuming), and tasks
published after the restart run too. The machine's RabbitMQ is not touched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from celeriac import Celery
from celeriac.brokers.amqp_client import AMQPError
from tests.apps import amqp_routing_app
from tests.conftest import WorkerProcess, bind_app, wait_for
from tests.rabbitmq_node import RabbitNode

StartWorker = Callable[..., WorkerProcess]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    n = RabbitNode(tmp_path_factory.mktemp("rabbitmq-restart") / "node")
    try:
        took = n.start()
        print(f"private RabbitMQ node {n.nodename} booted in {took:.1f}s")
        yield n
    finally:
        n.cleanup()


class Publisher(threading.Thread):
    """Publishes ``mark`` tasks one by one until stopped; remembers which were confirmed."""

    def __init__(self, app: Celery, path: Path) -> None:
        super().__init__(daemon=True, name="publisher")
        self.app, self.path = app, path
        self.confirmed: list[str] = []
        self.failed = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            key = f"t{i}"
            i += 1
            try:
                amqp_routing_app.mark.apply_async((str(self.path), key, 0.005))
            except (AMQPError, TimeoutError, OSError):
                self.failed += 1  # not confirmed: it may or may not run
                time.sleep(0.05)
                continue
            self.confirmed.append(key)


def _runs(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_node_restart_loses_no_confirmed_task(node: RabbitNode, how: str,
                                             start_worker: StartWorker,
                                             tmp_path: Path) -> None:
    vhost = node.add_vhost(f"restart-{how}")
    app = bind_app(amqp_routing_app.app, node.url(vhost), result_backend="rpc://",
                   broker_use_ssl=None, task_queues=None, task_routes=None,
                   task_publish_retry_policy={"max_retries": 2, "interval_start": 0,
                                              "interval_step": 0.1, "interval_max": 0.1})
    runs = tmp_path / "runs"
    publisher = Publisher(app, runs)
    try:
        worker = start_worker(app, "-c", "2", wait=False)
        publisher.start()
        # Load with a backlog: tasks run while more are queued.
        wait_for(lambda: len(_runs(runs)) >= 50 and len(publisher.confirmed) >= 300,
                 timeout=60, message="tasks flowing")
        confirmed_before = len(publisher.confirmed)
        backlog = confirmed_before - len(_runs(runs))
        if how == "stop":
            node.stop()
        else:
            node.kill()
        assert backlog > 0, "nothing was queued when the node went down"
        took = node.start()
        print(f"{how}: backlog ~{backlog}, node back in {took:.1f}s")
        # The publisher goes on after the restart...
        wait_for(lambda: len(publisher.confirmed) >= confirmed_before + 200, timeout=60,
                 message="publishing after the restart")
        publisher.stopping.set()
        publisher.join(30)
        confirmed = set(publisher.confirmed)
        # ...and every confirmed task runs (at least once), before and after the restart.
        wait_for(lambda: confirmed <= set(_runs(runs)), timeout=120,
                 message="every confirmed task to run")
        ran = _runs(runs)
        print(f"{how}: {len(confirmed)} confirmed, {publisher.failed} publishes failed "
              f"while the node was down, {len(ran)} runs, "
              f"{len(ran) - len(set(ran))} ran twice")
        assert worker.proc.poll() is None, worker.log()
    finally:
        publisher.stopping.set()
        publisher.join(30)
        app.close()
