"""Chord-join conformance: every backend in ``conftest.BACKENDS`` must pass all of this.

The join is the one atomic operation chords need: each header task reports its outcome
with ``chord_part_done``; exactly one caller, the one whose part completes the chord, gets
the results in header order, sends the body and calls ``chord_finish``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any
from uuid import uuid4

from celeriac.backends.base import ChordJoin

from .conftest import BackendHarness, Child

FAILURE = {"exc_type": "ValueError", "exc_message": ["bad"], "exc_module": "builtins"}


def gid() -> str:
    return str(uuid4())


def ids(n: int) -> list[str]:
    return [str(uuid4()) for _ in range(n)]


def test_the_last_part_gets_every_result_in_header_order(rh: BackendHarness) -> None:
    backend, group_id, tasks = rh.backend, gid(), ids(5)
    backend.chord_set_size(group_id, 5)
    order = [3, 0, 4, 1, 2]
    joins = [backend.chord_part_done(group_id, tasks[i], i, "SUCCESS", {"n": i}) for i in order]
    assert joins[:-1] == [None] * 4
    join = joins[-1]
    assert isinstance(join, ChordJoin) and join.group_id == group_id and join.token
    assert join.parts == [(tasks[i], "SUCCESS", {"n": i}) for i in range(5)]
    assert backend.chord_finish(join) is True


def test_failures_are_parts_like_any_other(rh: BackendHarness) -> None:
    backend, group_id, tasks = rh.backend, gid(), ids(3)
    backend.chord_set_size(group_id, 3)
    assert backend.chord_part_done(group_id, tasks[1], 1, "FAILURE", FAILURE) is None
    assert backend.chord_part_done(group_id, tasks[0], 0, "SUCCESS", [1, "two"]) is None
    join = backend.chord_part_done(group_id, tasks[2], 2, "REVOKED", FAILURE)
    assert join is not None
    assert join.parts == [(tasks[0], "SUCCESS", [1, "two"]), (tasks[1], "FAILURE", FAILURE),
                          (tasks[2], "REVOKED", FAILURE)]


def test_duplicate_deliveries_count_once(rh: BackendHarness) -> None:
    backend, group_id, tasks = rh.backend, gid(), ids(3)
    backend.chord_set_size(group_id, 3)
    for _ in range(3):  # the same header task delivered three times
        assert backend.chord_part_done(group_id, tasks[0], 0, "SUCCESS", 0) is None
    assert backend.chord_part_done(group_id, tasks[1], 1, "SUCCESS", 1) is None
    assert backend.chord_part_done(group_id, tasks[1], 1, "SUCCESS", 1) is None
    join = backend.chord_part_done(group_id, tasks[2], 2, "SUCCESS", 2)
    assert join is not None and [p[2] for p in join.parts] == [0, 1, 2]
    # A late duplicate, while the winner still sends the body and once it has finished.
    assert backend.chord_part_done(group_id, tasks[2], 2, "SUCCESS", 2) is None
    assert backend.chord_finish(join) is True
    for i in range(3):
        assert backend.chord_part_done(group_id, tasks[i], i, "SUCCESS", i) is None


def test_a_part_without_index_sorts_last(rh: BackendHarness) -> None:
    backend, group_id, tasks = rh.backend, gid(), ids(3)
    backend.chord_set_size(group_id, 3)
    assert backend.chord_part_done(group_id, tasks[0], None, "SUCCESS", "last") is None
    assert backend.chord_part_done(group_id, tasks[1], 1, "SUCCESS", "second") is None
    join = backend.chord_part_done(group_id, tasks[2], 0, "SUCCESS", "first")
    assert join is not None and [p[2] for p in join.parts] == ["first", "second", "last"]


def test_chord_add_raises_the_size(rh: BackendHarness) -> None:
    backend, group_id, tasks = rh.backend, gid(), ids(3)
    backend.chord_set_size(group_id, 2)
    backend.chord_add(group_id, 1)
    assert backend.chord_part_done(group_id, tasks[0], 0, "SUCCESS", 0) is None
    assert backend.chord_part_done(group_id, tasks[1], 1, "SUCCESS", 1) is None
    join = backend.chord_part_done(group_id, tasks[2], 2, "SUCCESS", 2)
    assert join is not None and len(join.parts) == 3


def test_finish_and_extend_need_the_claim(rh: BackendHarness) -> None:
    backend, group_id, tasks = rh.backend, gid(), ids(1)
    backend.chord_set_size(group_id, 1)
    join = backend.chord_part_done(group_id, tasks[0], 0, "SUCCESS", 1)
    assert join is not None
    forged = ChordJoin(group_id, "not-the-token", join.parts)
    assert backend.chord_extend(forged, 30) is False
    assert backend.chord_finish(forged) is False
    assert backend.chord_extend(join, 30) is True
    assert backend.chord_finish(join) is True
    assert backend.chord_finish(join) is False  # finished once


def test_a_dead_winners_claim_is_taken_by_a_redelivered_part(rh: BackendHarness) -> None:
    """The winner died before sending the body: a redelivered header task takes over.

    A claim ends when its holder's lease runs out (``claim_seconds``) or, where the store
    ties it to the holder's connection, when that connection goes.
    """
    backend, group_id, tasks = rh.backend, gid(), ids(2)
    winner = rh.connect()
    backend.chord_set_size(group_id, 2)
    assert backend.chord_part_done(group_id, tasks[0], 0, "SUCCESS", 0, claim_seconds=1) is None
    first = winner.chord_part_done(group_id, tasks[1], 1, "SUCCESS", 1, claim_seconds=1)
    assert first is not None
    # While the winner lives, the redelivery gets nothing.
    assert backend.chord_part_done(group_id, tasks[1], 1, "SUCCESS", 1, claim_seconds=1) is None
    winner.close()  # it dies without sending the body
    started = time.monotonic()
    second = None
    while second is None:
        assert time.monotonic() - started < 10, "the dead winner's claim was never taken over"
        second = backend.chord_part_done(group_id, tasks[1], 1, "SUCCESS", 1, claim_seconds=1)
        time.sleep(0.05)
    assert second.token != first.token and second.parts == first.parts
    assert backend.chord_finish(first) is False  # the dead winner's claim is gone
    assert backend.chord_finish(second) is True


def test_set_size_starts_a_new_run_of_the_same_group(rh: BackendHarness) -> None:
    backend, group_id, tasks = rh.backend, gid(), ids(1)
    backend.chord_set_size(group_id, 1)
    join = backend.chord_part_done(group_id, tasks[0], 0, "SUCCESS", "run 1")
    assert join is not None and backend.chord_finish(join)
    backend.chord_set_size(group_id, 1)  # a frozen chord applied again
    again = backend.chord_part_done(group_id, tasks[0], 0, "SUCCESS", "run 2")
    assert again is not None and again.parts == [(tasks[0], "SUCCESS", "run 2")]


def test_chords_do_not_share_state(rh: BackendHarness) -> None:
    backend, a, b = rh.backend, gid(), gid()
    backend.chord_set_size(a, 2)
    backend.chord_set_size(b, 1)
    shared_task = str(uuid4())
    assert backend.chord_part_done(a, shared_task, 0, "SUCCESS", "a") is None
    join = backend.chord_part_done(b, shared_task, 0, "SUCCESS", "b")
    assert join is not None and join.parts == [(shared_task, "SUCCESS", "b")]


def test_concurrent_parts_from_many_clients_complete_once(rh: BackendHarness) -> None:
    size, workers = 200, 8
    group_id, tasks = gid(), ids(size)
    rh.backend.chord_set_size(group_id, size)
    instances = [rh.connect() for _ in range(workers)]
    joins: list[ChordJoin] = []
    lock = threading.Lock()
    start = threading.Barrier(workers)
    indexes = list(range(size))
    random.shuffle(indexes)

    def report(w: int) -> None:
        start.wait()
        # Every part is reported twice, by two different clients (duplicate deliveries).
        for i in indexes[w::workers] + indexes[(w + 1) % workers::workers]:
            found = instances[w].chord_part_done(group_id, tasks[i], i, "SUCCESS", i)
            if found is not None:
                with lock:
                    joins.append(found)

    threads = [threading.Thread(target=report, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(joins) == 1
    assert [p[2] for p in joins[0].parts] == list(range(size))
    assert [p[0] for p in joins[0].parts] == tasks


def test_parts_from_other_processes(shared_rh: BackendHarness,
                                    child: Callable[[str], Child]) -> None:
    size, procs = 60, 3
    group_id, tasks = gid(), ids(size)
    shared_rh.backend.chord_set_size(group_id, size)
    children = []
    for p in range(procs):
        mine = [(i, tasks[i]) for i in range(p, size, procs)]
        children.append(child(f"""
            from celeriac import backends
            b = backends.connect({shared_rh.url!r})
            won = 0
            for i, t in {mine!r}:
                j = b.chord_part_done({group_id!r}, t, i, "SUCCESS", i * 10)
                if j is not None:
                    won += 1
                    assert [p[2] for p in j.parts] == [n * 10 for n in range({size})]
                    assert b.chord_finish(j)
            print(won)
        """))
    wins = [int(c.readline()) for c in children]
    assert sum(wins) == 1


def test_a_large_chord_costs_linear_time(rh: BackendHarness) -> None:
    backend, size = rh.backend, 5000
    group_id, tasks = gid(), ids(size)
    backend.chord_set_size(group_id, size)
    started = time.monotonic()
    join: Any = None
    for i in reversed(range(size)):
        found = backend.chord_part_done(group_id, tasks[i], i, "SUCCESS", i)
        if found is not None:
            join = found
    elapsed = time.monotonic() - started
    assert join is not None and [p[2] for p in join.parts] == list(range(size))
    assert backend.chord_finish(join)
    assert elapsed < 30, f"{size} parts took {elapsed:.1f}s"
