"""Fixtures shared by tests/test_worker_*.py (import them into the test module)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from celeriac import Celery
from tests.apps import worker_tasks
from tests.conftest import WorkerProcess, bind_app

StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def start_worker(start_worker: StartWorker) -> Iterator[StartWorker]:
    """conftest's ``start_worker``, printing every worker's log at teardown.

    pytest shows captured output only for a test that failed, so a failure comes with
    what the workers logged.
    """
    started: list[WorkerProcess] = []

    def start(*args: object, wait: bool = True, **kwargs: object) -> WorkerProcess:
        worker = start_worker(*args, wait=False, **kwargs)
        started.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for index, worker in enumerate(started):
        print(f"\n----- worker {index} (pid {worker.pid}) log -----\n{worker.log()}")


@pytest.fixture
def app(db_url: str) -> Celery:
    return bind_app(worker_tasks.app, db_url)


@pytest.fixture
def d(tmp_path: Path) -> str:
    """The directory tasks and test share files in."""
    return str(tmp_path)
