"""rpc:// beyond the conformance suite: chords (which Celery's rpc backend refuses)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from uuid import uuid4

import pytest

from celeriac import backends, chord, group
from celeriac.backends.rpc import RPCBackend
from tests.apps import amqp_app, amqp_support
from tests.conftest import WorkerProcess, bind_app


@pytest.fixture
def rpc_url() -> str:
    return "rpc+" + amqp_support.url()


def connect(url: str) -> RPCBackend:
    backend = backends.connect(url)
    assert isinstance(backend, RPCBackend)
    return backend


def test_chord_completes_exactly_once_across_clients(rpc_url: str) -> None:
    gid, size = str(uuid4()), 12
    setup = connect(rpc_url)
    setup.chord_set_size(gid, size)
    workers = [connect(rpc_url) for _ in range(4)]
    joins = []
    lock = threading.Lock()

    def finish(w: RPCBackend, indexes: range) -> None:
        for i in indexes:
            join = w.chord_part_done(gid, f"t{i}", i, "SUCCESS", i * 10)
            if join is not None:
                with lock:
                    joins.append(join)
                assert w.chord_finish(join)

    threads = [threading.Thread(target=finish, args=(w, range(k, size, 4)))
               for k, w in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(joins) == 1
    assert joins[0].parts == [(f"t{i}", "SUCCESS", i * 10) for i in range(size)]
    # Finished: a late duplicate of a header task changes nothing.
    assert workers[0].chord_part_done(gid, "t3", 3, "SUCCESS", 30) is None
    for b in [setup, *workers]:
        b.close()


def test_duplicate_parts_count_once(rpc_url: str) -> None:
    gid = str(uuid4())
    b = connect(rpc_url)
    b.chord_set_size(gid, 2)
    assert b.chord_part_done(gid, "a", 0, "SUCCESS", 1) is None
    assert b.chord_part_done(gid, "a", 0, "SUCCESS", 1) is None  # redelivered duplicate
    join = b.chord_part_done(gid, "b", 1, "SUCCESS", 2)
    assert join is not None and [p[2] for p in join.parts] == [1, 2]
    assert b.chord_finish(join)
    b.close()


def test_claim_of_a_dead_holder_is_taken_over(rpc_url: str) -> None:
    gid = str(uuid4())
    holder, other = connect(rpc_url), connect(rpc_url)
    holder.chord_set_size(gid, 1)
    join = holder.chord_part_done(gid, "a", 0, "SUCCESS", 7)
    assert join is not None
    # The holder dies before sending the body: its connection drops, the claim with it.
    holder._pub.drop()
    assert not holder.chord_finish(join)
    again = other.chord_part_done(gid, "a", 0, "SUCCESS", 7)  # the redelivered header task
    assert again is not None and again.parts == [("a", "SUCCESS", 7)]
    assert other.chord_finish(again)
    other.close()
    holder.close()


@pytest.fixture
def app() -> Iterator[amqp_app.Celery]:
    bound = bind_app(amqp_app.app, amqp_support.url(), result_backend="rpc://")
    yield bound
    bound.close()


def test_chord_and_group_through_a_worker(app: amqp_app.Celery,
                                          start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker(app, "-c", "2", wait=False)
    assert amqp_app.add.delay(1, 1).get(timeout=30) == 2
    assert group(amqp_app.add.s(i, i) for i in range(6))().get(timeout=30) == [
        0, 2, 4, 6, 8, 10]
    result = chord([amqp_app.add.s(i, i) for i in range(8)], amqp_app.total.s())()
    assert result.get(timeout=30) == sum(2 * i for i in range(8))
