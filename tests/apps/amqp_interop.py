"""Fixtures for the RabbitMQ interop tests (real Celery from PyPI against celeriac).

Both sides share a private vhost; results travel over ``rpc://``. Import the fixtures
into a test module: ``from tests.apps.amqp_interop import *  # noqa: F403``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celery
from tests.apps import amqp_support, interop_tasks
from tests.conftest import ROOT, WorkerProcess, bind_app, wait_for

__all__ = ["AmqpInterop", "amqp_interop", "celeriac_amqp_app", "celeriac_amqp_worker",
           "celery_amqp_app", "celery_amqp_worker", "pidbox_listeners"]


@dataclass
class AmqpInterop:
    vhost: str
    url: str
    dir: str


@pytest.fixture
def amqp_interop(tmp_path: Path) -> AmqpInterop:
    vhost = amqp_support.vhost()
    work = tmp_path / "work"
    work.mkdir()
    return AmqpInterop(vhost, amqp_support.url(vhost), str(work))


@pytest.fixture
def celery_amqp_app(amqp_interop: AmqpInterop) -> Iterator[Any]:
    """A real Celery client app: py-amqp transport, rpc results."""
    from tests.interop.celery_tasks import make_app

    app = make_app(amqp_interop.url, "rpc://", "")
    app.conf.broker_transport_options = {}
    app.conf.result_backend_transport_options = {}
    yield app
    app.close()


@pytest.fixture
def celeriac_amqp_app(amqp_interop: AmqpInterop) -> Iterator[Celery]:
    app = bind_app(interop_tasks.app, amqp_interop.url, result_backend="rpc://")
    yield app
    app.close()


class CeleryWorker:
    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, name: str) -> None:
        self.proc, self.log_path, self.name = proc, log_path, name

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
def celery_amqp_worker(amqp_interop: AmqpInterop,
                       tmp_path: Path) -> Iterator[Callable[..., CeleryWorker]]:
    """Start ``celery -A tests.interop.celery_tasks worker --pool solo`` on the vhost."""
    started: list[CeleryWorker] = []

    def start(*args: str) -> CeleryWorker:
        log_path = tmp_path / f"celery-worker-{len(started)}.log"
        name = f"amqp-interop-{uuid.uuid4().hex[:8]}@%h"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "INTEROP_BROKER": amqp_interop.url,
               "INTEROP_BACKEND": "rpc://", "INTEROP_PREFIX": ""}
        cmd = [sys.executable, "-m", "celery", "-A", "tests.interop.celery_tasks", "worker",
               "--pool", "solo", "-l", "INFO", "--without-gossip", "--without-mingle",
               "-n", name, *args]
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                cwd=str(tmp_path))
        worker = CeleryWorker(proc, log_path, name)
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
    out = subprocess.run(["rabbitmqctl", "-q", "list_bindings", "-p", vhost, "source_name",
                          "destination_name"], capture_output=True, text=True, check=True)
    return sum(1 for line in out.stdout.splitlines() if line.split("\t")[0] == "celery.pidbox")


@pytest.fixture
def celeriac_amqp_worker(amqp_interop: AmqpInterop, celeriac_amqp_app: Celery,
                         start_worker: Callable[..., WorkerProcess]
                         ) -> Callable[..., WorkerProcess]:
    """A celeriac worker on the vhost, ready: it answered a task and hears revokes."""

    def start(*args: str, **kwargs: Any) -> WorkerProcess:
        env = {"CELERIAC_RESULT_BACKEND": "rpc://", **kwargs.pop("env", {})}
        worker = start_worker(celeriac_amqp_app, *args, env=env, wait=False, **kwargs)
        try:
            assert interop_tasks.add.delay(1, 1).get(timeout=30) == 2
            # Every child and the supervisor bind a queue to celery.pidbox (a Celery revoke
            # is not kept for a late listener, unlike celeriac's own).
            listeners = len(worker.children()) + 1
            wait_for(lambda: pidbox_listeners(amqp_interop.vhost) >= listeners, 30,
                     interval=0.2, message="the worker to listen for Celery's revokes")
        except BaseException:
            print(worker.log())
            raise
        return worker

    return start
