"""Fixtures for running celeriac against the real Celery (from PyPI), on every broker.

Every interop test runs on Redis and on RabbitMQ (``interop`` is parametrised); a test
that only makes sense on one names it with
``@pytest.mark.parametrize("interop", ["redis"], indirect=True)``.

* Redis: both sides share the queues and results under a per-test key prefix (kombu's and
  Celery's ``global_keyprefix``, celeriac's ``?global_keyprefix=``) in db ``INTEROP_DB``.
* RabbitMQ: both sides share a fresh vhost; results travel over ``rpc://``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from celeriac import Celery
from tests.apps import amqp_support, interop_tasks
from tests.conftest import ROOT, WorkerProcess, bind_app
from tests.interop.celery_tasks import make_app
from tests.redis_support import (
    INTEROP_DB,
    REDIS_HOST,
    REDIS_PORT,
    delete_prefix,
    new_prefix,
    shared_url,
    wait_for,
    wait_worker_ready,
)

BROKERS = ["redis", "rabbitmq"]


@dataclass
class Interop:
    broker: str  # "redis" or "rabbitmq"
    celery_broker: str  # Celery's URLs (on Redis the prefix goes in its transport options)
    celery_backend: str
    prefix: str  # the Redis key prefix ("" on RabbitMQ)
    url: str  # celeriac's broker URL
    backend: str  # celeriac's result backend URL
    dir: str  # where tasks record what they did (tests.apps.events)
    vhost: str = ""


@pytest.fixture(params=BROKERS)
def interop(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Interop]:
    work = tmp_path / "work"
    work.mkdir()
    if request.param == "rabbitmq":
        vhost = amqp_support.vhost()
        url = amqp_support.url(vhost)
        yield Interop("rabbitmq", url, "rpc://", "", url, "rpc://", str(work), vhost)
        return
    prefix = new_prefix("interop")
    plain, prefixed = shared_url(INTEROP_DB), shared_url(INTEROP_DB, prefix)
    yield Interop("redis", plain, plain, prefix, prefixed, prefixed, str(work))
    delete_prefix(prefix, INTEROP_DB)


@pytest.fixture
def celery_app(interop: Interop) -> Iterator[Any]:
    """A real Celery client app on the shared queues."""
    app = make_app(interop.celery_broker, interop.celery_backend, interop.prefix)
    yield app
    app.close()


@pytest.fixture
def celeriac_app(interop: Interop) -> Iterator[Celery]:
    """A celeriac client app on the same queues and results."""
    app = bind_app(interop_tasks.app, interop.url, result_backend=interop.backend)
    yield app
    app.close()


class CeleryWorker:
    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def celery_worker(interop: Interop, tmp_path: Path) -> Iterator[Callable[..., CeleryWorker]]:
    """Start ``celery -A tests.interop.celery_tasks worker --pool solo`` (the real one)."""
    started: list[CeleryWorker] = []

    def start(*args: str) -> CeleryWorker:
        log_path = tmp_path / f"celery-worker-{len(started)}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "INTEROP_BROKER": interop.celery_broker,
               "INTEROP_BACKEND": interop.celery_backend, "INTEROP_PREFIX": interop.prefix}
        name = f"interop-{len(started)}-{os.getpid()}-{tmp_path.name[-12:]}@%h"
        cmd = [sys.executable, "-m", "celery", "-A", "tests.interop.celery_tasks", "worker",
               "--pool", "solo", "-l", "INFO", "--without-gossip", "--without-mingle",
               "-n", name, *args]
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                cwd=str(tmp_path))
        worker = CeleryWorker(proc, log_path)
        started.append(worker)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"celery worker exited:\n{worker.log()}")
            return " ready." in worker.log()

        wait_for(ready, 60, interval=0.1, message="the Celery worker to be ready")
        return worker

    yield start
    for worker in started:
        worker.stop()


def pidbox_listeners(vhost: str) -> int:
    """Queues bound to Celery's ``celery.pidbox`` exchange (who hears a revoke)."""
    rows = amqp_support.rabbitmqctl_rows("list_bindings", "-p", vhost, "source_name",
                                         "destination_name")
    return sum(1 for row in rows if row[0] == "celery.pidbox")


def _redis_pidbox_listeners(interop: Interop) -> int:
    client = redis.Redis(REDIS_HOST, REDIS_PORT, db=INTEROP_DB)
    try:
        channel = f"{interop.prefix}/{INTEROP_DB}.celery.pidbox"
        return int(client.pubsub_numsub(channel)[0][1])
    finally:
        client.close()


@pytest.fixture
def celeriac_worker(interop: Interop, celeriac_app: Celery,
                    start_worker: Callable[..., WorkerProcess]) -> Callable[..., WorkerProcess]:
    """A celeriac worker on the shared queues, ready: it runs tasks and hears revokes."""

    def start(*args: str, **kwargs: Any) -> WorkerProcess:
        env = {"CELERIAC_RESULT_BACKEND": interop.backend, **kwargs.pop("env", {})}
        worker = start_worker(celeriac_app, *args, env=env, wait=False, **kwargs)
        try:
            if interop.broker == "redis":
                wait_worker_ready(worker, interop.url)
            else:
                assert interop_tasks.add.delay(1, 1).get(timeout=30) == 2
            # Celery's revoke is a broadcast that is not kept for a late listener: wait
            # until the supervisor and every child listen.
            kids = len(worker.children())
            listeners = 1 + kids if kids else 1  # supervisor + children, or one solo process
            if interop.broker == "redis":
                wait_for(lambda: _redis_pidbox_listeners(interop) >= listeners, 30,
                         message="the worker to listen for Celery's control messages")
            else:  # rabbitmqctl takes a while per call: ask less often
                wait_for(lambda: pidbox_listeners(interop.vhost) >= listeners, 30,
                         interval=0.2, message="the worker to listen for Celery's revokes")
        except BaseException:
            print(worker.log())
            raise
        return worker

    return start
