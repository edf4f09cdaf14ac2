"""Shared fixtures: a fresh SQLite database per test and real worker processes."""

from __future__ import annotations

import os
import signal as signals
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from celeriac import Celery

ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.01,
             message: str = "condition") -> object:
    """Poll ``condition`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/celeriac.db"


def bind_app(app: Celery, url: str, **settings: object) -> Celery:
    """Point an app (e.g. one from tests/apps) at ``url`` for this test."""
    app.close()
    app.conf.broker_url = url
    app.conf.result_backend = None
    for key, value in settings.items():
        app.conf[key] = value
    return app


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, processes: int,
                 app: Celery | None) -> None:
        self.proc = proc
        self.log_path = log_path
        self.processes = processes
        self.app = app

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def wait_ready(self, timeout: float = 20.0) -> WorkerProcess:
        """Wait until every child has registered its consumer with the broker."""
        import sqlite3

        from celeriac.brokers.sqlite import path_from_url

        assert self.app is not None
        path = path_from_url(self.app.broker_url)
        pids = set()

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.log()}")
            kids = set(self.children()) or {self.proc.pid}
            try:
                conn = sqlite3.connect(path, timeout=5)
                try:
                    rows = conn.execute("SELECT pid FROM celeriac_consumers").fetchall()
                finally:
                    conn.close()
            except sqlite3.OperationalError:
                return False
            pids.clear()
            pids.update(r[0] for r in rows)
            return len(kids & pids) >= self.processes

        wait_for(ready, timeout, message="worker children to start consuming")
        return self

    def signal(self, sig: int) -> None:
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, sig: int = signals.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                message = f"worker did not stop within {timeout}s:\n{self.log()}"
                raise AssertionError(message) from None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole worker: supervisor and children at once."""
        pids = [self.proc.pid, *self.children()]
        for pid in pids:
            try:
                os.kill(pid, signals.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``celeriac -A MODULE worker ARGS`` as a real process against the test database.

    ``start_worker(app, "-c", "2")`` uses the app's module and broker URL (bind it first
    with ``bind_app``); logs go to a file shown when an assertion fails.
    """
    started: list[WorkerProcess] = []

    def start(app: Celery, *args: str, concurrency: int = 1, pool: str = "prefork",
              loglevel: str = "INFO", env: dict[str, str] | None = None,
              wait: bool = True) -> WorkerProcess:
        module = app.main
        assert module, "the app needs a main module name"
        log_path = tmp_path / f"worker-{len(started)}.log"
        cmd = [sys.executable, "-m", "celeriac", "-A", module, "-b", app.broker_url,
               "worker", "-c", str(concurrency), "-P", pool, "-l", loglevel, *args]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env,
                                cwd=str(tmp_path))
        processes = 1 if pool in ("threads", "solo") else concurrency
        worker = WorkerProcess(proc, log_path, processes, app)
        started.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.kill()
