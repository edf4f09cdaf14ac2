"""Fixtures for running celeriac against the real Celery (from PyPI) on one Redis db.

Both sides share the queues and results under a per-test key prefix (kombu's and
Celery's ``global_keyprefix``, celeriac's ``?global_keyprefix=``) in db ``INTEROP_DB``.
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
from tests.apps import interop_tasks
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


@dataclass
class Interop:
    prefix: str
    plain_url: str  # for Celery (the prefix goes in its transport options)
    url: str  # for celeriac (the prefix in the URL)
    dir: str


@pytest.fixture
def interop(tmp_path: Path) -> Iterator[Interop]:
    prefix = new_prefix("interop")
    work = tmp_path / "work"
    work.mkdir()
    yield Interop(prefix, shared_url(INTEROP_DB), shared_url(INTEROP_DB, prefix), str(work))
    delete_prefix(prefix, INTEROP_DB)


@pytest.fixture
def celery_app(interop: Interop) -> Iterator[Any]:
    """A real Celery client app on the shared queues."""
    app = make_app(interop.plain_url, interop.plain_url, interop.prefix)
    yield app
    app.close()


@pytest.fixture
def celeriac_app(interop: Interop) -> Iterator[Celery]:
    """A celeriac client app on the same queues and results."""
    app = bind_app(interop_tasks.app, interop.url, result_backend=interop.url)
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
        env = {**os.environ, "PYTHONPATH": str(ROOT), "INTEROP_BROKER": interop.plain_url,
               "INTEROP_BACKEND": interop.plain_url, "INTEROP_PREFIX": interop.prefix}
        cmd = [sys.executable, "-m", "celery", "-A", "tests.interop.celery_tasks", "worker",
               "--pool", "solo", "-l", "INFO", "--without-gossip", "--without-mingle",
               "-n", f"interop-{len(started)}-{interop.prefix[-13:-1]}@%h", *args]
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


@pytest.fixture
def celeriac_worker(interop: Interop, celeriac_app: Celery,
                    start_worker: Callable[..., WorkerProcess]) -> Callable[..., WorkerProcess]:
    def start(*args: str, **kwargs: Any) -> WorkerProcess:
        env = {"CELERIAC_RESULT_BACKEND": interop.url, **kwargs.pop("env", {})}
        worker = start_worker(celeriac_app, *args, env=env, wait=False, **kwargs)
        wait_worker_ready(worker, interop.url)
        # Celery's revoke is a pub/sub broadcast, not kept: wait until the supervisor and
        # every child listen on the pidbox channel.
        client = redis.Redis(REDIS_HOST, REDIS_PORT, db=INTEROP_DB)
        channel = f"{interop.prefix}/{INTEROP_DB}.celery.pidbox"
        kids = len(worker.children())
        listeners = 1 + kids if kids else 1  # supervisor + children, or one solo process
        try:
            wait_for(lambda: client.pubsub_numsub(channel)[0][1] >= listeners, 20,
                     message="the worker to listen for Celery's control messages")
        finally:
            client.close()
        return worker

    return start
