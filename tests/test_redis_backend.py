"""The Redis result backend beyond the conformance suite: Celery's keys, expiry, waiting
by pub/sub (not polling), chord bookkeeping shared with Celery's own Redis backend.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from celeriac.backends.base import ChordJoin
from celeriac.backends.redis import RedisBackend
from celeriac.brokers.redis import RedisBroker
from tests.interop.celery_tasks import make_app
from tests.redis_support import (
    REDIS_DB,
    PrivateRedis,
    delete_prefix,
    new_prefix,
    shared_url,
)


@pytest.fixture
def prefix() -> Iterator[str]:
    found = new_prefix("backend")
    yield found
    delete_prefix(found)


@pytest.fixture
def backend(prefix: str) -> Iterator[RedisBackend]:
    b = RedisBackend(shared_url(prefix=prefix))
    yield b
    b.close()


def doc(task_id: str, status: str = "SUCCESS", result: Any = 4) -> dict[str, Any]:
    return {"status": status, "result": result, "traceback": None, "children": [],
            "date_done": "2026-11-24T20:27:21.417982+00:00", "task_id": task_id}


def test_celery_keys_ttl_and_publish(backend: RedisBackend, prefix: str) -> None:
    client = backend.connector.client
    listener = client.pubsub()
    listener.subscribe(f"{prefix}celery-task-meta-k1")
    listener.get_message(timeout=1)
    backend.store([doc("k1")])
    assert json.loads(client.get(f"{prefix}celery-task-meta-k1") or b"") == doc("k1")
    assert 86_000_000 < client.pttl(f"{prefix}celery-task-meta-k1") <= 86_400_000
    msg = listener.get_message(timeout=2)
    assert msg is not None and json.loads(msg["data"]) == doc("k1")
    listener.close()
    short = RedisBackend(shared_url(prefix=prefix), expires=5)
    short.store([doc("k2")])
    assert 0 < client.pttl(f"{prefix}celery-task-meta-k2") <= 5000
    forever = RedisBackend(shared_url(prefix=prefix), expires=None)
    forever.store([doc("k3")])
    assert client.pttl(f"{prefix}celery-task-meta-k3") == -1
    short.close()
    forever.close()


def test_a_real_celery_client_reads_our_results(backend: RedisBackend, prefix: str) -> None:
    celery_app = make_app(shared_url(), shared_url(REDIS_DB), prefix)
    try:
        backend.store([doc("c1", result={"x": [1, 2]})])
        assert celery_app.AsyncResult("c1").get(timeout=5) == {"x": [1, 2]}
        backend.store([doc("c2", "FAILURE", {"exc_type": "KeyError", "exc_message": ["k"],
                                             "exc_module": "builtins"})])
        with pytest.raises(KeyError):
            celery_app.AsyncResult("c2").get(timeout=5)
        # ... and we read Celery's.
        celery_app.backend.store_result("c3", 99, "SUCCESS")
        assert backend.get("c3")["result"] == 99  # type: ignore[index]
    finally:
        celery_app.close()


def test_waiting_is_pushed_not_polled(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "srv")
    try:
        backend = RedisBackend(server.url)
        writer = RedisBackend(server.url)
        admin = server.client()
        admin.config_resetstat()
        threading.Timer(1.5, lambda: writer.store([doc("w1")])).start()
        start = time.monotonic()
        got = list(backend.wait(["w1"], timeout=10, interval=30))
        took = time.monotonic() - start
        assert got == [doc("w1")]
        assert 1.4 <= took < 2.0
        stats = admin.info("commandstats")
        # One read after subscribing; the document itself came by pub/sub.
        assert stats["cmdstat_mget"]["calls"] == 1
        assert "cmdstat_get" not in stats
        backend.close()
        writer.close()
    finally:
        server.crash()


def test_waiting_survives_a_redis_restart(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "srv")
    try:
        backend = RedisBackend(server.url)
        writer = RedisBackend(server.url)

        def later() -> None:
            server.restart()
            writer.store([doc("r1")])

        threading.Timer(0.5, later).start()
        assert list(backend.wait(["r1"], timeout=20)) == [doc("r1")]
        backend.close()
        writer.close()
    finally:
        server.crash()


def test_results_written_during_an_outage_are_retried(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "srv")
    try:
        backend = RedisBackend(server.url)
        server.stop()
        stored = threading.Event()

        def store() -> None:
            backend.store([doc("o1")])
            stored.set()

        thread = threading.Thread(target=store)
        thread.start()
        assert not stored.wait(1.0)  # still trying
        server.start()
        thread.join(15)
        assert stored.is_set()
        assert RedisBackend(server.url).get("o1") == doc("o1")
        backend.close()
    finally:
        server.crash()


# -- chords ------------------------------------------------------------------------------------


def test_chord_join_is_handed_out_once(backend: RedisBackend, prefix: str) -> None:
    backend.chord_set_size("g1", 3)
    assert backend.chord_part_done("g1", "t2", 2, "SUCCESS", 20) is None
    assert backend.chord_part_done("g1", "t0", 0, "SUCCESS", 0) is None
    assert backend.chord_part_done("g1", "t0", 0, "SUCCESS", 0) is None  # a duplicate run
    join = backend.chord_part_done("g1", "t1", 1, "FAILURE", {"exc_type": "KeyError"})
    assert isinstance(join, ChordJoin)
    assert join.parts == [("t0", "SUCCESS", 0), ("t1", "FAILURE", {"exc_type": "KeyError"}),
                          ("t2", "SUCCESS", 20)]
    # Another copy of a header task finishing now gets nothing.
    assert backend.chord_part_done("g1", "t1", 1, "SUCCESS", 10) is None
    assert backend.chord_extend(join, 60)
    assert backend.chord_finish(join)
    client = backend.connector.client
    assert client.get(f"{prefix}celery-taskset-meta-g1.c") == b"done"
    for suffix in (".j", ".s", ".d", ".t"):
        assert not client.exists(f"{prefix}celery-taskset-meta-g1{suffix}")
    assert backend.chord_part_done("g1", "t2", 2, "SUCCESS", 20) is None  # finished for good
    assert not backend.chord_finish(join)


def test_chord_parts_racing_yield_one_join(backend: RedisBackend) -> None:
    backend.chord_set_size("g2", 40)
    joins: list[ChordJoin] = []
    lock = threading.Lock()

    def part(i: int) -> None:
        found = backend.chord_part_done("g2", f"t{i}", i, "SUCCESS", i)
        if found is not None:
            with lock:
                joins.append(found)

    threads = [threading.Thread(target=part, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(joins) == 1
    assert [p[2] for p in joins[0].parts] == list(range(40))


def test_an_abandoned_chord_claim_is_taken_again(backend: RedisBackend) -> None:
    backend.chord_set_size("g3", 1)
    first = backend.chord_part_done("g3", "t0", 0, "SUCCESS", 1, claim_seconds=1)
    assert first is not None  # ... and its holder dies before sending the body
    assert backend.chord_part_done("g3", "t0", 0, "SUCCESS", 1) is None  # still claimed
    time.sleep(1.1)  # the claim expires: that is what is tested
    again = backend.chord_part_done("g3", "t0", 0, "SUCCESS", 1)
    assert again is not None and again.parts == [("t0", "SUCCESS", 1)]
    assert not backend.chord_finish(first)
    assert backend.chord_finish(again)


def test_chord_shared_with_celerys_backend(backend: RedisBackend, prefix: str) -> None:
    """Header parts recorded by Celery's Redis backend and ours add up to one chord."""
    celery_app = make_app(shared_url(), shared_url(REDIS_DB), prefix)
    broker = RedisBroker(shared_url(prefix=prefix))
    try:
        celery_backend = celery_app.backend
        callback = celery_app.signature("interop.echo", args=(), options={"task_id": "cb-1"})

        def celery_part(task_id: str, index: int, value: int) -> None:
            request = SimpleNamespace(id=task_id, group="g4", group_index=index,
                                      chord=dict(callback))
            celery_backend.on_chord_part_return(request, "SUCCESS", value)

        # Celery sets the size (its client does, before sending the header).
        celery_backend.set_chord_size("g4", 3)
        celery_part("t0", 0, 10)
        assert backend.chord_part_done("g4", "t1", 1, "SUCCESS", 11) is None
        celery_part("t2", 2, 12)  # Celery's worker completes it: it sends the body
        consumer = broker.consumer(["celery"])
        [body] = consumer.fetch(1, 5)
        assert body.message.headers["task"] == "interop.echo"
        assert json.loads(body.message.body)[0] == [[10, 11, 12]]
        consumer.ack([body])
        # The other way round: Celery's parts, our completion.
        celery_backend.set_chord_size("g5", 2)
        request = SimpleNamespace(id="u0", group="g5", group_index=0, chord=dict(callback))
        celery_backend.on_chord_part_return(request, "SUCCESS", "a")
        join = backend.chord_part_done("g5", "u1", 1, "SUCCESS", "b")
        assert join is not None and [p[2] for p in join.parts] == ["a", "b"]
        assert backend.chord_finish(join)
        consumer.close()
    finally:
        broker.close()
        celery_app.close()
