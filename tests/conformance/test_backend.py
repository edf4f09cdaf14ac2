"""Result-backend conformance: every backend in ``conftest.BACKENDS`` must pass all of this."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from uuid import uuid4

import pytest

from celeriac.backends.base import TaskMeta
from celeriac.exceptions import TimeoutError

from .conftest import BackendHarness, Child

WAIT = 5.0
QUICK = 0.5


def meta(task_id: str, status: str = "SUCCESS", result: Any = 4, **extra: Any) -> TaskMeta:
    doc: TaskMeta = {
        "status": status,
        "result": result,
        "traceback": None,
        "children": [],
        "date_done": "2026-11-24T20:27:21.417982+00:00" if status == "SUCCESS" else None,
        "task_id": task_id,
    }
    doc.update(extra)
    return doc


def tid() -> str:
    return str(uuid4())


def later(delay: float, fn: Callable[[], Any]) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        fn()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> float:
    """Poll ``predicate`` until true; returns the seconds it took. Fails after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.01)
    return time.monotonic() - start


# -- documents -------------------------------------------------------------------------


def test_store_get_round_trip(rh: BackendHarness) -> None:
    t = tid()
    doc = meta(
        t,
        result={"a": [1, 2.5, "ü", None, True], "n": -7, "s": "x" * 1000},
        children=[[["c1", None], None]],
    )
    rh.backend.store([doc])
    assert rh.backend.get(t) == doc


def test_failure_document_round_trip(rh: BackendHarness) -> None:
    t = tid()
    doc = meta(
        t,
        "FAILURE",
        {"exc_type": "ValueError", "exc_message": ["bad"], "exc_module": "builtins"},
        traceback="Traceback (most recent call last):\n  ...\nValueError: bad\n",
    )
    rh.backend.store([doc])
    assert rh.backend.get(t) == doc


def test_get_unknown_is_none(rh: BackendHarness) -> None:
    assert rh.backend.get(tid()) is None


def test_store_many_and_get_many(rh: BackendHarness) -> None:
    ids = [tid() for _ in range(5)]
    docs = [meta(t, result=i) for i, t in enumerate(ids)]
    rh.backend.store(docs)
    rh.backend.store([])  # nothing to do
    missing = tid()
    found = rh.backend.get_many([*ids[:3], missing, ids[4]])
    assert found == {ids[0]: docs[0], ids[1]: docs[1], ids[2]: docs[2], ids[4]: docs[4]}
    assert rh.backend.get_many([]) == {}
    assert rh.backend.get_many([missing]) == {}


def test_get_many_of_many_ids(rh: BackendHarness) -> None:
    ids = [tid() for _ in range(1200)]
    rh.backend.store([meta(t, result=i) for i, t in enumerate(ids)])
    found = rh.backend.get_many(ids)
    assert len(found) == 1200
    assert all(found[t]["result"] == i for i, t in enumerate(ids))


def test_store_overwrites(rh: BackendHarness) -> None:
    t = tid()
    rh.backend.store([meta(t, "STARTED", None, result_extra=1)])
    assert rh.backend.get(t) == meta(t, "STARTED", None, result_extra=1)
    rh.backend.store([meta(t, "SUCCESS", 10)])
    assert rh.backend.get(t) == meta(t, "SUCCESS", 10)


def test_forget(rh: BackendHarness) -> None:
    keep, drop = tid(), tid()
    rh.backend.store([meta(keep), meta(drop)])
    rh.backend.forget(drop)
    assert rh.backend.get(drop) is None
    assert rh.backend.get(keep) == meta(keep)
    rh.backend.forget(tid())  # unknown: no error


def test_second_instance_shares_results(sharing_rh: BackendHarness) -> None:
    rh = sharing_rh
    other = rh.connect()
    t = tid()
    other.store([meta(t)])
    assert rh.backend.get(t) == meta(t)
    rh.backend.forget(t)
    assert other.get(t) is None


# -- waiting ---------------------------------------------------------------------------


def test_wait_yields_ready_documents(rh: BackendHarness) -> None:
    ok, failed, revoked = tid(), tid(), tid()
    docs = {
        ok: meta(ok),
        failed: meta(failed, "FAILURE", {"exc_type": "KeyError"}),
        revoked: meta(revoked, "REVOKED", None),
    }
    rh.backend.store(list(docs.values()))
    got = list(rh.backend.wait([ok, failed, revoked, ok], timeout=1))
    assert sorted(got, key=lambda d: d["task_id"]) == sorted(
        docs.values(), key=lambda d: d["task_id"]
    )
    assert list(rh.backend.wait([ok], timeout=0)) == [docs[ok]]
    assert list(rh.backend.wait([], timeout=0)) == []


def test_wait_times_out_when_not_ready(rh: BackendHarness) -> None:
    ready, started, unknown = tid(), tid(), tid()
    rh.backend.store([meta(ready), meta(started, "STARTED", None)])
    it: Iterator[TaskMeta] = rh.backend.wait([started, ready, unknown], timeout=0.3)
    begin = time.monotonic()
    assert next(it) == meta(ready)  # what is ready comes out before the timeout
    with pytest.raises(TimeoutError):
        next(it)
    assert 0.28 <= time.monotonic() - begin < 2.0
    with pytest.raises(TimeoutError):
        list(rh.backend.wait([unknown], timeout=0))


def test_store_from_another_thread_wakes_wait(rh: BackendHarness) -> None:
    t = tid()
    stored: list[float] = []

    def work() -> None:
        rh.backend.store([meta(t, "STARTED", None)])  # not ready: wait goes on
        time.sleep(0.1)
        rh.backend.store([meta(t, "SUCCESS", 42)])
        stored.append(time.monotonic())

    th = later(0.1, work)
    begin = time.monotonic()
    got = list(rh.backend.wait([t], timeout=WAIT))
    done = time.monotonic()
    th.join(WAIT)
    assert got == [meta(t, "SUCCESS", 42)]
    assert done - begin < 0.2 + QUICK
    assert done - stored[0] < QUICK


def test_store_through_other_instance_wakes_wait(sharing_rh: BackendHarness) -> None:
    rh = sharing_rh
    other = rh.connect()
    a, b = tid(), tid()
    th = later(0.15, lambda: other.store([meta(a)]))
    th2 = later(0.3, lambda: other.store([meta(b, "FAILURE", None)]))
    begin = time.monotonic()
    got = [d["task_id"] for d in rh.backend.wait([a, b], timeout=WAIT)]
    elapsed = time.monotonic() - begin
    th.join(WAIT)
    th2.join(WAIT)
    assert got == [a, b]
    assert elapsed < 0.3 + QUICK


def test_many_waiters_all_wake(rh: BackendHarness) -> None:
    t = tid()
    results: list[tuple[list[TaskMeta], float]] = []
    lock = threading.Lock()

    def waiter() -> None:
        got = list(rh.backend.wait([t], timeout=WAIT))
        with lock:
            results.append((got, time.monotonic()))

    threads = [threading.Thread(target=waiter) for _ in range(4)]
    for th in threads:
        th.start()
    time.sleep(0.15)  # let them block (not needed for correctness, only for the timing)
    stored = time.monotonic()
    rh.backend.store([meta(t)])
    for th in threads:
        th.join(WAIT + 1)
    assert len(results) == 4
    assert all(got == [meta(t)] for got, _ in results)
    assert all(at - stored < QUICK for _, at in results)


# -- expiry ----------------------------------------------------------------------------


def test_documents_expire(rh: BackendHarness) -> None:
    short = rh.connect(expires=0.2)
    t, g = tid(), tid()
    stored = time.monotonic()
    short.store([meta(t)])
    short.save_group(g, [[t, None]])
    assert short.get(t) == meta(t)
    if rh.impl.shared_results:
        assert rh.backend.get(t) == meta(t)
    assert short.restore_group(g) == [[t, None]]
    took = wait_until(lambda: short.get(t) is None)
    assert time.monotonic() - stored >= 0.19
    assert took < 0.2 + 1.0
    if rh.impl.shared_results:
        assert rh.backend.get(t) is None
    assert short.get_many([t]) == {}
    wait_until(lambda: short.restore_group(g) is None)
    with pytest.raises(TimeoutError):
        list(short.wait([t], timeout=0))


def test_no_expiry(rh: BackendHarness) -> None:
    forever = rh.connect(expires=None)
    t = tid()
    forever.store([meta(t)])
    assert forever.cleanup() == 0
    assert forever.get(t) == meta(t)


def test_cleanup_removes_expired(rh: BackendHarness) -> None:
    short = rh.connect(expires=0.2)
    keep = tid()
    rh.backend.store([meta(keep)])  # the default expiry: a day
    ids = [tid() for _ in range(3)]
    short.store([meta(t) for t in ids])
    assert rh.backend.cleanup() == 0  # nothing has expired yet
    wait_until(lambda: short.get_many(ids) == {})
    expected = 0 if rh.impl.self_expiring else 3
    assert rh.backend.cleanup() == expected
    assert rh.backend.cleanup() == 0
    assert rh.backend.get(keep) == meta(keep)
    # A document stored again after its expiry is a new one.
    short.store([meta(ids[0], result=5)])
    reader = rh.backend if rh.impl.shared_results else short
    assert reader.get(ids[0]) == meta(ids[0], result=5)


# -- groups ----------------------------------------------------------------------------


def test_groups(rh: BackendHarness) -> None:
    g = tid()
    assert rh.backend.restore_group(g) is None
    value = [[tid(), None], [tid(), None], [[tid(), None], None]]
    rh.backend.save_group(g, value)
    assert rh.backend.restore_group(g) == value
    assert rh.connect().restore_group(g) == value
    rh.backend.save_group(g, [])
    assert rh.backend.restore_group(g) == []
    rh.backend.delete_group(g)
    assert rh.backend.restore_group(g) is None
    rh.backend.delete_group(g)  # again: no error


def test_groups_and_tasks_do_not_collide(rh: BackendHarness) -> None:
    same = tid()
    rh.backend.store([meta(same)])
    rh.backend.save_group(same, ["x"])
    assert rh.backend.get(same) == meta(same)
    assert rh.backend.restore_group(same) == ["x"]
    rh.backend.forget(same)
    assert rh.backend.restore_group(same) == ["x"]
    rh.backend.delete_group(same)
    rh.backend.store([meta(same)])
    assert rh.backend.get(same) == meta(same)


# -- several processes on one machine --------------------------------------------------


def test_store_from_another_process_wakes_wait(
    shared_rh: BackendHarness, child: Callable[[str], Child]
) -> None:
    rh = shared_rh
    t = tid()
    proc = child(
        f"""
    import sys, time
    from celeriac import backends
    backend = backends.connect({rh.url!r})
    sys.stdin.readline()
    backend.store([{meta(t, "SUCCESS", "from child")!r}])
    print(time.time(), flush=True)
    """
    )
    it = rh.backend.wait([t], timeout=10)
    assert proc.proc.stdin is not None
    proc.proc.stdin.write("go\n")
    proc.proc.stdin.flush()
    got = next(it)
    received = time.time()
    stored = float(proc.readline())
    assert got == meta(t, "SUCCESS", "from child")
    assert received - stored < QUICK
