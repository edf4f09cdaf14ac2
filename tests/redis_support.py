"""Redis for the tests: the shared server, private servers, a connection-cutting proxy.

Tests on the shared server (127.0.0.1:6379) use db ``REDIS_DB`` and a fresh key prefix
per test (``global_keyprefix``), and delete their keys afterwards; nothing flushes a
database. Fault tests start a private ``redis-server`` on a free port and stop it by pid.
A missing Redis is an error, never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import redis

from tests import tcp_proxy
from tests.conftest import wait_for

REDIS_HOST = "127.0.0.1"
REDIS_PORT = int(os.environ.get("CELERIAC_TEST_REDIS_PORT", "6379"))
REDIS_DB = int(os.environ.get("CELERIAC_TEST_REDIS_DB", "9"))  # bench uses 11 and 12
INTEROP_DB = int(os.environ.get("CELERIAC_TEST_INTEROP_DB", "10"))


def shared_url(db: int = REDIS_DB, prefix: str | None = None) -> str:
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    return f"{url}?global_keyprefix={prefix}" if prefix else url


def new_prefix(tag: str = "t") -> str:
    return f"celeriac-test-{tag}-{uuid4().hex[:12]}:"


def delete_prefix(prefix: str, db: int = REDIS_DB, port: int = REDIS_PORT) -> int:
    """Delete every key under ``prefix`` (and Celery result keys under it)."""
    client = redis.Redis(REDIS_HOST, port, db=db)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


def cleanup_url(url: str) -> None:
    """Delete the keys of a test URL made by ``shared_url(prefix=...)``."""
    if "global_keyprefix=" not in url:
        return
    prefix = url.split("global_keyprefix=", 1)[1].split("&", 1)[0]
    db = int(url.split("?", 1)[0].rsplit("/", 1)[1])
    delete_prefix(prefix, db)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own, on a free port, with an append-only file.

    ``appendfsync always``: what Redis acknowledged survives ``restart()`` (SIGTERM) and
    ``crash()`` (SIGKILL).
    """

    def __init__(self, directory: Path, *extra: str, port: int | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert shutil.which("redis-server"), "redis-server is not installed"
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", "--daemonize", "no", *self.extra],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for(self.ping, 10, message=f"redis-server on port {self.port}")

    def ping(self) -> bool:
        try:
            client = redis.Redis("127.0.0.1", self.port, socket_connect_timeout=0.5)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError):
            return False

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis("127.0.0.1", self.port, db=db)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)
            proc.wait(20)
        self.proc = None

    def crash(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, down_for: float = 0.0, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        if down_for:
            time.sleep(down_for)  # the outage itself is what is being tested
        self.start()


@contextlib.contextmanager
def private_redis(directory: Path, *extra: str) -> Iterator[PrivateRedis]:
    server = PrivateRedis(directory, *extra)
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


class CuttingProxy(tcp_proxy.CuttingProxy):
    """A cutting TCP relay to a Redis on this machine (tests/tcp_proxy.py)."""

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


def consumer_pids(url: str) -> set[int]:
    """Pids of the consumers registered with a Redis broker at ``url``."""
    from celeriac.brokers.redis import RedisBroker

    broker = RedisBroker(url)
    try:
        info = broker.connector.client.hgetall(broker.info_key)
    finally:
        broker.close()
    pids = set()
    for value in info.values():
        text = value.decode() if isinstance(value, bytes) else str(value)
        pid = text.rpartition("\n")[2]
        if pid.isdigit():
            pids.add(int(pid))
    return pids


def wait_worker_ready(worker: Any, url: str, timeout: float = 20.0) -> Any:
    """Wait until every consuming process of a started worker registered with Redis."""

    def ready() -> bool:
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited early:\n{worker.log()}")
        kids = set(worker.children()) or {worker.proc.pid}
        return len(kids & consumer_pids(url)) >= worker.processes

    wait_for(ready, timeout, interval=0.05, message="worker children to start consuming")
    return worker
