"""Fixtures for the broker and result-backend conformance suites.

Every implementation is one entry in ``BROKERS`` or ``BACKENDS``: a name, a function that
makes a fresh URL for one test, and what the implementation can do. Tests that need a
capability (several processes sharing the store, ...) are parametrised over the entries
that have it, so nothing is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from celeriac import backends, brokers
from celeriac.backends.base import ResultBackend
from celeriac.brokers.base import Broker, Consumer
from tests import redis_support


@dataclass(frozen=True)
class Impl:
    name: str
    make_url: Callable[[Path], str]
    # Other processes on this machine reach the same queues / results through the URL.
    cross_process: bool = False
    # Consumers hold messages on a lease: silent ones (no heartbeat) lose them.
    leases: bool = False
    # The store drops expired documents itself, so ``cleanup()`` has nothing to do.
    self_expiring: bool = False
    # The server takes back what a dead consumer's connection held, by itself (RabbitMQ):
    # ``recover_stale`` has nothing left to do.
    server_recovers: bool = False
    # Any client reads any result (not so for rpc://: results go to the caller that
    # sent the task, and each instance is such a caller).
    shared_results: bool = True
    # Sort key of a priority: lower is served first. Most brokers serve higher numbers
    # first; Redis follows kombu (lower numbers first, in buckets 0/3/6/9) so Celery
    # clients and workers on the same queues agree with it.
    priority_rank: Callable[[int], int] = lambda p: -p
    # Removes what a test left in a shared server (called with the test's URL).
    cleanup: Callable[[str], None] | None = None


def _redis_url(tmp: Path) -> str:
    return redis_support.shared_url(prefix=redis_support.new_prefix("conf"))


def _rabbitmq_url(tmp: Path) -> str:
    from tests.apps import amqp_support

    # A private vhost per test; priority queues (x-max-priority) as the suite expects.
    return amqp_support.url(query="max_priority=10")


def _rpc_url(tmp: Path) -> str:
    from tests.apps import amqp_support

    return "rpc+" + amqp_support.url()


def _kombu_rank(priority: int) -> int:
    return (0, 0, 0, 3, 3, 3, 6, 6, 6, 9)[min(max(priority, 0), 9)]


BROKERS: list[Impl] = [
    Impl("memory", lambda tmp: f"memory://{uuid4().hex}"),
    Impl("sqlite", lambda tmp: f"sqlite:///{tmp}/b.db", cross_process=True, leases=True),
    Impl("redis", _redis_url, cross_process=True, leases=True, priority_rank=_kombu_rank,
         cleanup=redis_support.cleanup_url),
    Impl("rabbitmq", _rabbitmq_url, cross_process=True, server_recovers=True),
]

BACKENDS: list[Impl] = [
    Impl("memory", lambda tmp: f"memory://{uuid4().hex}"),
    Impl("sqlite", lambda tmp: f"sqlite:///{tmp}/r.db", cross_process=True),
    Impl("redis", _redis_url, cross_process=True, self_expiring=True,
         cleanup=redis_support.cleanup_url),
    Impl("rpc", _rpc_url, self_expiring=True, shared_results=False),
]


def params(impls: Sequence[Impl], **needs: bool) -> list[Any]:
    chosen = [i for i in impls if all(getattr(i, k) == v for k, v in needs.items())]
    assert chosen, f"no implementation has {needs}"
    return [pytest.param(i, id=i.name) for i in chosen]


@dataclass
class BrokerHarness:
    """A broker for one test, plus more instances and consumers closed at teardown."""

    impl: Impl
    url: str
    broker: Broker
    instances: list[Broker] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)

    def connect(self) -> Broker:
        """Another instance on the same URL (another client, or another process's view)."""
        other = brokers.connect(self.url)
        self.instances.append(other)
        return other

    def consumer(self, queues: Sequence[str], broker: Broker | None = None) -> Consumer:
        c = (broker or self.broker).consumer(list(queues))
        self.consumers.append(c)
        return c

    def close(self) -> None:
        for c in self.consumers:
            c.close()  # closing twice must be harmless
        for b in [*self.instances, self.broker]:
            b.close()


@dataclass
class BackendHarness:
    impl: Impl
    url: str
    backend: ResultBackend
    instances: list[ResultBackend] = field(default_factory=list)

    def connect(self, **options: Any) -> ResultBackend:
        other = backends.connect(self.url, **options)
        self.instances.append(other)
        return other

    def close(self) -> None:
        for b in [*self.instances, self.backend]:
            b.close()


def _broker_harness(impl: Impl, tmp_path: Path) -> Iterator[BrokerHarness]:
    url = impl.make_url(tmp_path)
    h = BrokerHarness(impl, url, brokers.connect(url))
    try:
        yield h
    finally:
        h.close()
        if impl.cleanup is not None:
            impl.cleanup(url)


def _backend_harness(impl: Impl, tmp_path: Path) -> Iterator[BackendHarness]:
    url = impl.make_url(tmp_path)
    h = BackendHarness(impl, url, backends.connect(url))
    try:
        yield h
    finally:
        h.close()
        if impl.cleanup is not None:
            impl.cleanup(url)


@pytest.fixture(params=params(BROKERS))
def bh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerHarness]:
    yield from _broker_harness(request.param, tmp_path)


@pytest.fixture(params=params(BROKERS, cross_process=True))
def shared_bh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerHarness]:
    """A broker whose queues other processes reach through its URL."""
    yield from _broker_harness(request.param, tmp_path)


@pytest.fixture(params=params(BROKERS, leases=True))
def leased_bh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerHarness]:
    """A broker that takes messages back from consumers whose heartbeats stop."""
    yield from _broker_harness(request.param, tmp_path)


@pytest.fixture(params=params(BACKENDS))
def rh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendHarness]:
    yield from _backend_harness(request.param, tmp_path)


@pytest.fixture(params=params(BACKENDS, shared_results=True))
def sharing_rh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendHarness]:
    """A backend whose results every instance on the URL reads."""
    yield from _backend_harness(request.param, tmp_path)


@pytest.fixture(params=params(BACKENDS, cross_process=True))
def shared_rh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendHarness]:
    yield from _backend_harness(request.param, tmp_path)


class Child:
    """A Python subprocess running ``code``; it reports with lines on stdout."""

    def __init__(self, code: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            stderr = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"child exited ({self.proc.returncode}) early:\n{stderr}")
        return line.strip()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)  # reaped: its pid no longer names a process

    def finish(self) -> None:
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def child() -> Iterator[Callable[[str], Child]]:
    started: list[Child] = []

    def start(code: str) -> Child:
        c = Child(code)
        started.append(c)
        return c

    yield start
    for c in started:
        if c.proc.poll() is None:
            c.kill()
        c.finish()
