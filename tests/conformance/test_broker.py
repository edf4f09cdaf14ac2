"""Broker conformance: every broker in ``conftest.BROKERS`` must pass all of this."""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from celeriac.brokers.base import Consumer, Delivery
from celeriac.protocol.message import Message

from .conftest import BrokerHarness, Child

WAIT = 5.0  # fetch timeout when something is expected; never reached when things work
QUICK = 0.5  # a wake-up must arrive well within this


def msg(n: int, *, priority: int | None = None, body: bytes | None = None) -> Message:
    props: dict[str, Any] = {"correlation_id": f"id-{n}", "delivery_tag": f"t{n}"}
    if priority is not None:
        props["priority"] = priority
    return Message(
        {"id": f"id-{n}", "task": "tests.add", "n": n},
        props,
        body if body is not None else f"body-{n}".encode(),
    )


def ns(deliveries: Sequence[Delivery]) -> list[int]:
    return [d.message.headers["n"] for d in deliveries]


def drain(c: Consumer, expected: int, max_count: int = 100) -> list[Delivery]:
    """Fetch until ``expected`` deliveries arrived (or a fetch waits WAIT s in vain)."""
    out: list[Delivery] = []
    while len(out) < expected:
        got = c.fetch(max_count, WAIT)
        assert got, f"only {len(out)} of {expected} messages arrived"
        out.extend(got)
    return out


def assert_empty(c: Consumer, timeout: float = 0.05) -> None:
    got = c.fetch(10, timeout)
    assert got == [], f"unexpected deliveries: {ns(got)}"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    result = fn()
    return result, time.monotonic() - start


def later(delay: float, fn: Callable[[], Any]) -> threading.Thread:
    """Run ``fn`` in a thread after ``delay`` s (so a fetch is likely blocked by then)."""

    def run() -> None:
        time.sleep(delay)
        fn()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# -- publish and fetch -------------------------------------------------------------------


def test_round_trip_preserves_message(bh: BrokerHarness) -> None:
    body = bytes(range(256)) * 4 + "ünïcødé ✓".encode()
    sent = Message(
        headers={
            "lang": "py",
            "task": "proj.tasks.add",
            "id": "6f1c2a7e-8d7b-4a55-9d6a-1b2c3d4e5f60",
            "eta": None,
            "retries": 3,
            "timelimit": [None, 10.5],
            "argsrepr": "(2, 2)",
            "nested": {"a": [1, 2, {"b": True}], "c": "ü", "f": 1.25},
        },
        properties={
            "correlation_id": "6f1c2a7e-8d7b-4a55-9d6a-1b2c3d4e5f60",
            "reply_to": "c0ffee",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": "celery"},
            "priority": 3,
            "body_encoding": "base64",
        },
        body=body,
        content_type="application/x-msgpack",
        content_encoding="binary",
    )
    bh.broker.publish("q", [sent])
    c = bh.consumer(["q"])
    [d] = c.fetch(10, WAIT)
    assert d.message == sent
    assert isinstance(d.message.body, bytes)
    assert d.message.body == body
    assert d.message.content_type == "application/x-msgpack"
    assert d.message.content_encoding == "binary"
    assert d.queue == "q"
    assert isinstance(d.tag, str)
    assert d.delivery_count == 1
    assert not d.redelivered


def test_empty_body_and_defaults(bh: BrokerHarness) -> None:
    sent = Message({}, {}, b"")
    bh.broker.publish("q", [sent])
    [d] = bh.consumer(["q"]).fetch(1, WAIT)
    assert d.message == sent
    assert d.message.content_type == "application/json"
    assert d.message.content_encoding == "utf-8"


def test_fifo_within_a_priority(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(i) for i in range(20)])
    bh.broker.publish("q", [msg(i) for i in range(20, 50)])
    c = bh.consumer(["q"])
    got: list[Delivery] = []
    while len(got) < 50:
        batch = c.fetch(7, WAIT)
        assert 0 < len(batch) <= 7
        got.extend(batch)
    assert ns(got) == list(range(50))
    assert len({d.tag for d in got}) == 50


def test_higher_priority_fetched_first(bh: BrokerHarness) -> None:
    prios = [0, 5, 1, 5, 9, 0, 1, 9, 3]
    bh.broker.publish("q", [msg(i, priority=p) for i, p in enumerate(prios[:5])])
    bh.broker.publish("q", [msg(i, priority=p) for i, p in enumerate(prios) if i >= 5])
    rank = bh.impl.priority_rank  # e.g. -p: [4, 7, 1, 3, 8, 2, 6, 0, 5]
    expected = [i for _, i in sorted((rank(p), i) for i, p in enumerate(prios))]
    if rank(9) < rank(0):
        assert expected == [4, 7, 1, 3, 8, 2, 6, 0, 5]
    # In one batch ...
    c = bh.consumer(["q"])
    batch = c.fetch(100, WAIT)
    assert ns(batch) == expected
    c.reject(batch, requeue=True)
    # ... and one at a time.
    one_by_one = [c.fetch(1, WAIT)[0] for _ in prios]
    assert ns(one_by_one) == expected


def test_priority_beats_age(bh: BrokerHarness) -> None:
    rank = bh.impl.priority_rank
    urgent, ordinary = min(range(10), key=rank), max(range(10), key=rank)
    c = bh.consumer(["q"])
    bh.broker.publish("q", [msg(0, priority=ordinary), msg(1, priority=ordinary)])
    [first] = c.fetch(1, WAIT)
    assert ns([first]) == [0]
    bh.broker.publish("q", [msg(2, priority=urgent)])
    assert ns(c.fetch(1, WAIT)) == [2]
    assert ns(c.fetch(1, WAIT)) == [1]


def test_fetch_respects_max_count(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(i) for i in range(10)])
    c = bh.consumer(["q"])
    assert ns(c.fetch(3, WAIT)) == [0, 1, 2]
    assert ns(c.fetch(1, WAIT)) == [3]
    assert ns(c.fetch(100, WAIT)) == [4, 5, 6, 7, 8, 9]


def test_fetch_on_empty_queue_waits_for_timeout(bh: BrokerHarness) -> None:
    c = bh.consumer(["q"])
    cpu = time.thread_time()
    got, elapsed = timed(lambda: c.fetch(10, 0.5))
    assert got == []
    assert 0.48 <= elapsed < 2.0
    assert time.thread_time() - cpu < 0.15, "a blocked fetch must sleep, not poll"
    got, elapsed = timed(lambda: c.fetch(10, 0))
    assert got == []
    assert elapsed < 0.5


def test_publish_from_another_thread_wakes_blocked_fetch(bh: BrokerHarness) -> None:
    c = bh.consumer(["q"])
    published: list[float] = []

    def publish() -> None:
        bh.broker.publish("q", [msg(1)])
        published.append(time.monotonic())

    t = later(0.15, publish)
    got, elapsed = timed(lambda: c.fetch(10, WAIT))
    t.join(WAIT)
    assert ns(got) == [1]
    assert elapsed < QUICK
    assert time.monotonic() - published[0] < QUICK


def test_publish_through_other_instance_wakes_blocked_fetch(bh: BrokerHarness) -> None:
    other = bh.connect()
    c = bh.consumer(["q"])
    t = later(0.15, lambda: other.publish("q", [msg(1)]))
    got, elapsed = timed(lambda: c.fetch(10, WAIT))
    t.join(WAIT)
    assert ns(got) == [1]
    assert elapsed < QUICK


def test_wake_interrupts_blocked_fetch(bh: BrokerHarness) -> None:
    c = bh.consumer(["q"])
    t = later(0.15, c.wake)
    got, elapsed = timed(lambda: c.fetch(10, WAIT))
    t.join(WAIT)
    assert got == []
    assert elapsed < QUICK
    # The wake-up is spent: the next fetch delivers normally.
    bh.broker.publish("q", [msg(1)])
    assert ns(c.fetch(10, WAIT)) == [1]
    got, elapsed = timed(lambda: c.fetch(10, 0.2))
    assert got == [] and elapsed >= 0.18


def test_fetch_blocks_and_wakes_with_many_open_descriptors(bh: BrokerHarness) -> None:
    # select() cannot watch descriptors past 1024; a busy worker process has that many.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1500, hard), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        c = bh.consumer(["q"])
        cpu = time.thread_time()
        got, elapsed = timed(lambda: c.fetch(10, 0.5))
        assert got == [] and elapsed >= 0.48
        assert time.thread_time() - cpu < 0.15, "a blocked fetch must sleep, not poll"
        t = later(0.15, lambda: bh.broker.publish("q", [msg(1)]))
        got, elapsed = timed(lambda: c.fetch(10, WAIT))
        t.join(WAIT)
        assert ns(got) == [1] and elapsed < QUICK
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_second_instance_sees_messages(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(1)])
    other = bh.connect()
    assert other.queue_size("q") == 1
    other.publish("q", [msg(2)])
    c = bh.consumer(["q"])
    assert ns(drain(c, 2)) == [1, 2]


def test_messages_outlive_the_publishing_instance(bh: BrokerHarness) -> None:
    first = bh.connect()
    first.publish("q", [msg(1)])
    first.close()
    bh.instances.remove(first)
    c = bh.consumer(["q"], broker=bh.connect())
    assert ns(c.fetch(10, WAIT)) == [1]


# -- settling ------------------------------------------------------------------------


def test_ack_removes_for_good(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(i) for i in range(5)])
    c = bh.consumer(["q"])
    got = c.fetch(10, WAIT)
    assert len(got) == 5
    assert bh.broker.queue_size("q") == 0  # held, not waiting
    c.ack(got[:3])
    c.close()
    c2 = bh.consumer(["q"])
    assert ns(drain(c2, 2)) == [3, 4]
    c2.ack([])  # acking nothing is fine
    assert bh.broker.recover(c.consumer_id) == 0


def test_acked_messages_do_not_come_back_after_close(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(1), msg(2)])
    c = bh.consumer(["q"])
    c.ack(drain(c, 2))
    c.close()
    assert bh.broker.queue_size("q") == 0
    assert_empty(bh.consumer(["q"]), 0.1)


def test_reject_requeue_puts_back_without_counting(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(1)])
    c = bh.consumer(["q"])
    [d] = c.fetch(1, WAIT)
    assert d.delivery_count == 1
    c.reject([d], requeue=True)
    assert bh.broker.queue_size("q") == 1
    for _ in range(3):
        [d] = c.fetch(1, WAIT)
        assert ns([d]) == [1]
        assert d.delivery_count == 1
        assert not d.redelivered
        c.reject([d], requeue=True)
    # Another consumer gets it too.
    [d] = bh.consumer(["q"]).fetch(1, WAIT)
    assert ns([d]) == [1] and d.delivery_count == 1


def test_requeue_wakes_blocked_fetch(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(1)])
    holder = bh.consumer(["q"])
    [d] = holder.fetch(1, WAIT)
    waiter = bh.consumer(["q"])
    t = later(0.15, lambda: holder.reject([d], requeue=True))
    got, elapsed = timed(lambda: waiter.fetch(1, WAIT))
    t.join(WAIT)
    assert ns(got) == [1]
    assert elapsed < QUICK


def test_reject_without_requeue_drops(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(1), msg(2)])
    c = bh.consumer(["q"])
    got = c.fetch(10, WAIT)
    c.reject(got[:1], requeue=False)
    c.close()
    assert bh.broker.queue_size("q") == 1
    assert ns(bh.consumer(["q"]).fetch(10, WAIT)) == [2]


def test_park_hides_until_due(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(1)])
    c = bh.consumer(["q"])
    [d] = c.fetch(1, WAIT)
    due = time.time() + 0.3
    c.park(d, not_before=due)
    assert bh.broker.queue_size("q") == 1  # waiting in the broker, not held
    assert_empty(c)
    assert_empty(bh.consumer(["q"]))
    got = c.fetch(1, WAIT)
    assert time.time() >= due - 0.01
    assert time.time() < due + QUICK
    assert ns(got) == [1]
    # Parking is not a delivery: the message was not run.
    assert got[0].delivery_count == 1
    c.ack(got)
    assert bh.broker.queue_size("q") == 0


def test_park_in_the_past_is_ready_at_once(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(1)])
    c = bh.consumer(["q"])
    [d] = c.fetch(1, WAIT)
    c.park(d, not_before=time.time() - 10)
    got, elapsed = timed(lambda: c.fetch(1, WAIT))
    assert ns(got) == [1] and elapsed < QUICK


def test_parked_message_wakes_consumer_blocked_on_other_instance(bh: BrokerHarness) -> None:
    other = bh.connect()
    waiter = bh.consumer(["q"], broker=other)
    bh.broker.publish("q", [msg(1)])
    holder = bh.consumer(["q"])
    [d] = holder.fetch(1, WAIT)
    assert_empty(waiter)  # started blocking before the park was known
    due = time.time() + 0.3
    t = later(0, lambda: holder.park(d, not_before=due))
    got = waiter.fetch(1, WAIT)
    t.join(WAIT)
    assert ns(got) == [1]
    assert due - 0.01 <= time.time() < due + QUICK


def test_publish_with_not_before_delays(bh: BrokerHarness) -> None:
    c = bh.consumer(["q"])
    due = time.time() + 0.3
    bh.broker.publish("q", [msg(1)], not_before=due)
    bh.broker.publish("q", [msg(2)])
    assert bh.broker.queue_size("q") == 2
    assert ns(c.fetch(10, WAIT)) == [2]
    assert_empty(c)
    got = c.fetch(10, WAIT)
    assert ns(got) == [1]
    assert due - 0.01 <= time.time() < due + QUICK
    assert got[0].delivery_count == 1


def test_publish_with_past_not_before_is_ready(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(1)], not_before=time.time() - 5)
    got, elapsed = timed(lambda: bh.consumer(["q"]).fetch(1, WAIT))
    assert ns(got) == [1] and elapsed < QUICK


def test_delayed_messages_keep_priority_order(bh: BrokerHarness) -> None:
    due = time.time() + 0.2
    bh.broker.publish("q", [msg(0, priority=1), msg(1, priority=8)], not_before=due)
    c = bh.consumer(["q"])
    got = c.fetch(1, WAIT)
    assert time.time() >= due - 0.01
    got += drain(c, 1)
    rank = bh.impl.priority_rank
    assert ns(got) == ([1, 0] if rank(8) < rank(1) else [0, 1])


# -- consumers going away ------------------------------------------------------------


def test_close_returns_unacked(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(i) for i in range(4)])
    c = bh.consumer(["q"])
    got = c.fetch(10, WAIT)
    assert len(got) == 4
    c.ack([got[1]])
    c.close()
    assert bh.broker.queue_size("q") == 3
    back = drain(bh.consumer(["q"]), 3)
    assert ns(back) == [0, 2, 3]
    # Fetched but never settled: giving them back undoes that delivery.
    assert [d.delivery_count for d in back] == [1, 1, 1]


def test_close_wakes_blocked_consumer(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(1)])
    holder = bh.consumer(["q"])
    assert ns(holder.fetch(1, WAIT)) == [1]
    waiter = bh.consumer(["q"], broker=bh.connect())
    t = later(0.15, holder.close)
    got, elapsed = timed(lambda: waiter.fetch(1, WAIT))
    t.join(WAIT)
    assert ns(got) == [1] and elapsed < QUICK


@pytest.mark.parametrize("requeue_running", [True, False])
def test_recover_dead_consumer(bh: BrokerHarness, requeue_running: bool) -> None:
    bh.broker.publish("q", [msg(i) for i in range(4)])
    dead = bh.consumer(["q"])
    got = dead.fetch(10, WAIT)
    assert ns(got) == [0, 1, 2, 3]
    dead.ack([got[3]])
    running = got[1]
    back = bh.broker.recover(dead.consumer_id, running.tag, requeue_running=requeue_running)
    assert back == (3 if requeue_running else 2)
    assert bh.broker.queue_size("q") == back
    c = bh.consumer(["q"])
    again = drain(c, back)
    assert_empty(c)
    counts = {d.message.headers["n"]: d.delivery_count for d in again}
    if requeue_running:
        # The running one was really delivered (it counts), the others never started.
        assert counts == {0: 1, 1: 2, 2: 1}
        assert [d.redelivered for d in again if d.message.headers["n"] == 1] == [True]
    else:
        assert counts == {0: 1, 2: 1}
    # Nothing left to recover, and recovering again changes nothing.
    assert bh.broker.recover(dead.consumer_id, running.tag) == 0


def test_recover_counts_only_what_went_back(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(1), msg(2)])
    dead = bh.consumer(["q"])
    first, _second = dead.fetch(10, WAIT)
    dead.ack([first])  # the running one finished and was acked before the crash
    assert bh.broker.recover(dead.consumer_id, first.tag) == 1
    assert ns(drain(bh.consumer(["q"]), 1)) == [2]


def test_recover_without_running_tag(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(1), msg(2)])
    dead = bh.consumer(["q"])
    assert len(dead.fetch(10, WAIT)) == 2
    assert bh.broker.recover(dead.consumer_id) == 2
    again = drain(bh.consumer(["q"]), 2)
    assert [d.delivery_count for d in again] == [1, 1]


def test_recover_unknown_consumer(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(1)])
    assert bh.broker.recover("nobody:0:000") == 0
    assert bh.broker.queue_size("q") == 1


def test_recover_stale_leaves_live_consumers_alone(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(1)])
    c = bh.consumer(["q"])
    [d] = c.fetch(1, WAIT)
    c.heartbeat()
    bh.broker.heartbeat([c.consumer_id])  # a supervisor beating for its children
    assert bh.broker.recover_stale(3600) == 0
    assert bh.broker.queue_size("q") == 0
    c.ack([d])


def test_silent_consumer_loses_its_messages(leased_bh: BrokerHarness) -> None:
    bh = leased_bh
    bh.broker.publish("q", [msg(1), msg(2), msg(3)])
    silent, beating, by_supervisor = (bh.consumer(["q"]) for _ in range(3))
    [lost] = silent.fetch(1, WAIT)
    [kept] = beating.fetch(1, WAIT)
    [kept2] = by_supervisor.fetch(1, WAIT)
    start = time.monotonic()
    recovered = 0
    while recovered == 0:
        assert time.monotonic() - start < WAIT, "the silent consumer was never recovered"
        beating.heartbeat()
        bh.broker.heartbeat([by_supervisor.consumer_id])
        recovered = bh.broker.recover_stale(0.3)
        time.sleep(0.02)
    assert recovered == 1
    assert time.monotonic() - start >= 0.25
    [again] = bh.consumer(["q"]).fetch(10, WAIT)
    assert ns([again]) == ns([lost])
    assert again.delivery_count == 2  # it may have been running: the delivery counts
    assert bh.broker.queue_size("q") == 0
    beating.ack([kept])
    by_supervisor.ack([kept2])


def test_two_consumers_never_share_a_message(bh: BrokerHarness) -> None:
    total = 200
    consumers = [bh.consumer(["q"]), bh.consumer(["q"], broker=bh.connect())]
    seen: list[list[int]] = [[], []]
    errors: list[BaseException] = []
    lock = threading.Lock()
    done = threading.Event()
    ready = threading.Barrier(3)

    def work(i: int) -> None:
        try:
            ready.wait(WAIT)
            deadline = time.monotonic() + 30
            while not done.is_set() and time.monotonic() < deadline:
                got = consumers[i].fetch(3, 0.05)
                if got:
                    seen[i].extend(ns(got))
                    time.sleep(0.002)  # "run" the batch, as a worker would, before acking
                    consumers[i].ack(got)
                with lock:
                    if len(seen[0]) + len(seen[1]) >= total:
                        done.set()
        except BaseException as exc:
            errors.append(exc)
            done.set()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    ready.wait(WAIT)
    # Publish while both consumers are fetching, so they compete for every batch.
    for start in range(0, total, 5):
        bh.broker.publish("q", [msg(i) for i in range(start, start + 5)])
    for t in threads:
        t.join(40)
    assert not errors, errors
    both = seen[0] + seen[1]
    assert len(both) == total, f"{len(both)} deliveries"
    assert sorted(both) == list(range(total))
    assert seen[0] and seen[1], "one consumer got nothing: the test shows nothing"
    assert bh.broker.queue_size("q") == 0


# -- queues --------------------------------------------------------------------------


def test_consumer_gets_only_its_queues(bh: BrokerHarness) -> None:
    bh.broker.publish("a", [msg(1)])
    bh.broker.publish("b", [msg(2)])
    bh.broker.publish("c", [msg(3)])
    both = bh.consumer(["a", "b"])
    got = drain(both, 2)
    assert sorted((d.queue, d.message.headers["n"]) for d in got) == [("a", 1), ("b", 2)]
    assert_empty(both)
    assert bh.broker.queue_size("c") == 1
    assert ns(bh.consumer(["c"]).fetch(10, WAIT)) == [3]


def test_queues_are_served_in_turn(bh: BrokerHarness) -> None:
    bh.broker.publish("a", [msg(i) for i in range(5)])
    bh.broker.publish("b", [msg(i) for i in range(10, 15)])
    c = bh.consumer(["a", "b"])
    first_two = [c.fetch(1, WAIT)[0] for _ in range(2)]
    assert {d.queue for d in first_two} == {"a", "b"}
    rest = drain(c, 8)
    by_queue: dict[str, list[int]] = {"a": [], "b": []}
    for d in [*first_two, *rest]:
        by_queue[d.queue].append(d.message.headers["n"])
    assert by_queue == {"a": [0, 1, 2, 3, 4], "b": [10, 11, 12, 13, 14]}


def test_a_blocked_multi_queue_fetch_wakes_for_any_queue(bh: BrokerHarness) -> None:
    c = bh.consumer(["a", "b"])
    t = later(0.15, lambda: bh.broker.publish("b", [msg(1)]))
    got, elapsed = timed(lambda: c.fetch(10, WAIT))
    t.join(WAIT)
    assert [(d.queue, d.message.headers["n"]) for d in got] == [("b", 1)]
    assert elapsed < QUICK


def test_queue_size(bh: BrokerHarness) -> None:
    assert bh.broker.queue_size("q") == 0
    bh.broker.publish("q", [msg(i) for i in range(3)])
    bh.broker.publish("q", [msg(9)], not_before=time.time() + 60)
    bh.broker.publish("other", [msg(5)])
    assert bh.broker.queue_size("q") == 4  # delayed ones count
    c = bh.consumer(["q"])
    got = c.fetch(2, WAIT)
    assert bh.broker.queue_size("q") == 2  # held ones do not
    c.reject(got, requeue=True)
    assert bh.broker.queue_size("q") == 4
    assert bh.broker.queue_size("other") == 1


def test_purge(bh: BrokerHarness) -> None:
    bh.broker.publish("q", [msg(i) for i in range(5)])
    bh.broker.publish("q", [msg(9)], not_before=time.time() + 60)
    bh.broker.publish("other", [msg(7)])
    c = bh.consumer(["q"])
    [held] = c.fetch(1, WAIT)
    assert bh.broker.purge("q") == 5
    assert bh.broker.queue_size("q") == 0
    assert bh.broker.purge("q") == 0
    assert bh.broker.purge("never-used") == 0
    assert_empty(c)
    # A message held by a consumer is not waiting, so purge leaves it to its consumer.
    c.reject([held], requeue=True)
    assert ns(c.fetch(10, WAIT)) == [0]
    assert bh.broker.queue_size("other") == 1


# -- dead letters --------------------------------------------------------------------


def test_dead_letters_keep_raw_message(bh: BrokerHarness) -> None:
    raw = bytes(range(256))[::-1]
    m = Message({"id": "x1", "n": 1}, {"priority": 4}, raw, "application/data", "binary")
    before = time.time()
    bh.broker.dead_letter(m, "q", "poison: cannot decode")
    bh.broker.dead_letter(msg(2), "other", "expired")
    assert bh.broker.queue_size("q") == 0
    dls = bh.broker.dead_letters()
    assert [(d.queue, d.reason) for d in dls] == [
        ("q", "poison: cannot decode"),
        ("other", "expired"),
    ]
    assert dls[0].message == m
    assert dls[0].message.body == raw
    assert before - 1 <= dls[0].time <= time.time() + 1
    assert len({d.id for d in dls}) == 2
    assert [d.id for d in bh.broker.dead_letters(limit=1)] == [dls[0].id]
    # Visible through another instance.
    assert [d.id for d in bh.connect().dead_letters()] == [d.id for d in dls]


def test_replay_dead_letters(bh: BrokerHarness) -> None:
    raw = b"\x00\x01\xfe\xff raw"
    m = Message({"n": 1}, {"priority": 2}, raw, "application/octet-stream", "binary")
    bh.broker.dead_letter(m, "q", "r1")
    bh.broker.dead_letter(msg(2), "q", "r2")
    bh.broker.dead_letter(msg(3), "other", "r3")
    first, second, third = bh.broker.dead_letters()
    assert bh.broker.replay_dead_letters([first.id]) == 1
    assert [d.id for d in bh.broker.dead_letters()] == [second.id, third.id]
    c = bh.consumer(["q"])
    [d] = c.fetch(10, WAIT)
    assert d.message == m and d.message.body == raw
    assert d.delivery_count == 1
    c.ack([d])
    assert bh.broker.replay_dead_letters([first.id]) == 0  # already replayed
    assert bh.broker.replay_dead_letters([]) == 0
    assert bh.broker.replay_dead_letters(["no-such-id"]) == 0
    assert bh.broker.replay_dead_letters() == 2
    assert bh.broker.dead_letters() == []
    assert ns(c.fetch(10, WAIT)) == [2]
    assert ns(bh.consumer(["other"]).fetch(10, WAIT)) == [3]


def test_replayed_dead_letter_wakes_blocked_fetch(bh: BrokerHarness) -> None:
    bh.broker.dead_letter(msg(1), "q", "r")
    c = bh.consumer(["q"])
    t = later(0.15, bh.broker.replay_dead_letters)
    got, elapsed = timed(lambda: c.fetch(1, WAIT))
    t.join(WAIT)
    assert ns(got) == [1] and elapsed < QUICK


def test_purge_dead_letters(bh: BrokerHarness) -> None:
    for i in range(4):
        bh.broker.dead_letter(msg(i), "q", f"r{i}")
    ids = [d.id for d in bh.broker.dead_letters()]
    assert bh.broker.purge_dead_letters([ids[0], ids[2]]) == 2
    assert [d.id for d in bh.broker.dead_letters()] == [ids[1], ids[3]]
    assert bh.broker.purge_dead_letters([ids[0]]) == 0
    assert bh.broker.purge_dead_letters([]) == 0
    assert bh.broker.purge_dead_letters(["no-such-id"]) == 0
    assert bh.broker.purge_dead_letters() == 2
    assert bh.broker.dead_letters() == []
    assert bh.broker.queue_size("q") == 0


def test_dead_letter_of_a_fetched_message(bh: BrokerHarness) -> None:
    # The worker's way: dead-letter the message, then ack the delivery.
    bh.broker.publish("q", [msg(1, body=b"\xff\x00bad")])
    c = bh.consumer(["q"])
    [d] = c.fetch(1, WAIT)
    bh.broker.dead_letter(d.message, d.queue, "undecodable")
    c.ack([d])
    c.close()
    assert_empty(bh.consumer(["q"]))
    [dl] = bh.broker.dead_letters()
    assert dl.message == d.message and dl.queue == "q"


# -- broadcast -----------------------------------------------------------------------


def test_broadcast_reaches_every_subscriber_once(bh: BrokerHarness) -> None:
    early = bh.broker.subscribe("control")
    bh.broker.broadcast("control", {"method": "ping", "arguments": {"x": [1, "ü"]}}, ttl=30)
    late = bh.broker.subscribe("control")  # subscribed after: still sees it within ttl
    remote = bh.connect().subscribe("control")
    for sub in (early, late, remote):
        assert sub.poll() == [{"method": "ping", "arguments": {"x": [1, "ü"]}}]
        assert sub.poll() == []
    bh.broker.broadcast("control", {"n": 2}, ttl=30)
    bh.broker.broadcast("control", {"n": 3}, ttl=30)
    for sub in (early, late, remote):
        assert sub.poll() == [{"n": 2}, {"n": 3}]
        assert sub.poll() == []
    for sub in (early, late, remote):
        sub.close()


def test_broadcast_channels_are_separate(bh: BrokerHarness) -> None:
    events = bh.broker.subscribe("events")
    bh.broker.broadcast("control", {"n": 1}, ttl=30)
    assert events.poll() == []
    bh.broker.broadcast("events", {"n": 2}, ttl=30)
    assert events.poll() == [{"n": 2}]


def test_expired_broadcasts_are_not_seen(bh: BrokerHarness) -> None:
    bh.broker.broadcast("control", {"n": 1}, ttl=-1)  # already expired
    assert bh.broker.subscribe("control").poll() == []
    sent = time.monotonic()
    bh.broker.broadcast("control", {"n": 2}, ttl=0.3)
    early = bh.broker.subscribe("control")
    assert early.poll() == [{"n": 2}]
    deadline = sent + 5
    while True:
        seen = bh.broker.subscribe("control").poll()
        if not seen:
            break
        assert seen == [{"n": 2}]
        assert time.monotonic() < deadline, "the broadcast never expired"
        time.sleep(0.02)
    assert time.monotonic() - sent >= 0.28
    bh.broker.broadcast("control", {"n": 3}, ttl=30)
    assert early.poll() == [{"n": 3}]


# -- several processes on one machine (brokers that support it) -------------------------

CHILD_PRELUDE = """
    import sys, time
    from celeriac import brokers
    from celeriac.protocol.message import Message
    broker = brokers.connect({url!r})
"""


def test_process_killed_while_holding_is_recovered(
    shared_bh: BrokerHarness, child: Callable[[str], Child]
) -> None:
    bh = shared_bh
    bh.broker.publish("q", [msg(1), msg(2)])
    proc = child(
        CHILD_PRELUDE.format(url=bh.url)
        + """
    c = broker.consumer(["q"])
    got = c.fetch(1, 5)
    print(got[0].message.headers["n"], flush=True)
    time.sleep(60)
    """
    )
    assert proc.readline() == "1"
    live = bh.consumer(["q"])
    [mine] = live.fetch(1, WAIT)
    assert ns([mine]) == [2]
    assert bh.broker.recover_stale(3600) == 0  # the child is alive
    assert bh.broker.queue_size("q") == 0
    proc.kill()
    if bh.impl.server_recovers:
        # The server took the message back when the process's connection closed.
        assert bh.broker.recover_stale(3600) == 0
    else:
        assert bh.broker.recover_stale(3600) == 1
    assert bh.broker.recover_stale(3600) == 0
    [again] = bh.consumer(["q"]).fetch(10, WAIT)
    # It may have been running when the process died: that delivery counts.
    assert ns([again]) == [1]
    assert again.delivery_count == 2 and again.redelivered
    # The live consumer's message was left alone.
    live.ack([mine])
    assert bh.broker.queue_size("q") == 0


def test_publish_from_another_process_wakes_blocked_fetch(
    shared_bh: BrokerHarness, child: Callable[[str], Child]
) -> None:
    bh = shared_bh
    c = bh.consumer(["q"])
    proc = child(
        CHILD_PRELUDE.format(url=bh.url)
        + """
    sys.stdin.readline()
    broker.publish("q", [Message({"n": 1}, {}, b"from child")])
    print(time.time(), flush=True)
    """
    )
    assert proc.proc.stdin is not None
    proc.proc.stdin.write("go\n")
    proc.proc.stdin.flush()
    got = c.fetch(1, 10)
    received = time.time()
    published = float(proc.readline())
    assert [d.message.body for d in got] == [b"from child"]
    assert received - published < QUICK


def test_processes_never_share_a_message(
    shared_bh: BrokerHarness, child: Callable[[str], Child]
) -> None:
    bh = shared_bh
    total = 300
    bh.broker.publish("q", [msg(i) for i in range(total)])
    code = (
        CHILD_PRELUDE.format(url=bh.url)
        + """
    c = broker.consumer(["q"])
    while True:
        got = c.fetch(5, 0.3)
        if not got:
            break
        print(" ".join(str(d.message.headers["n"]) for d in got), flush=True)
        c.ack(got)
    c.close()
    print("done", flush=True)
    """
    )
    procs = [child(code) for _ in range(3)]
    seen: list[int] = []
    for p in procs:
        while (line := p.readline()) != "done":
            seen.extend(int(n) for n in line.split())
    assert sorted(seen) == list(range(total))
    assert bh.broker.queue_size("q") == 0
