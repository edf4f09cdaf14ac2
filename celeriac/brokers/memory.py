"""An in-process broker for tests and single-process use (``memory://``).

Brokers with the same URL in one process share their queues, so a client and a worker
thread in one test talk to each other.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from celeriac.brokers.base import (
    Broker,
    Consumer,
    DeadLetter,
    Delivery,
    Subscriber,
    new_consumer_id,
)
from celeriac.exceptions import ImproperlyConfigured
from celeriac.protocol.message import Message


@dataclass
class _Entry:
    seq: int
    queue: str
    message: Message
    deliveries: int = 0


@dataclass
class _State:
    cond: threading.Condition = field(default_factory=threading.Condition)
    seq: itertools.count = field(default_factory=itertools.count)
    # queue -> heap of (-priority, seq, entry)
    ready: dict[str, list[tuple[int, int, _Entry]]] = field(default_factory=dict)
    delayed: list[tuple[float, int, _Entry]] = field(default_factory=list)
    held: dict[str, dict[str, _Entry]] = field(default_factory=dict)
    dead: dict[str, DeadLetter] = field(default_factory=dict)
    broadcasts: list[tuple[int, str, float, dict[str, Any]]] = field(default_factory=list)


_STATES: dict[str, _State] = {}
_STATES_LOCK = threading.Lock()


class MemoryBroker(Broker):
    def __init__(self, url: str = "memory://", **_: Any) -> None:
        self.url = url
        with _STATES_LOCK:
            self._state = _STATES.setdefault(url, _State())

    def _push(self, entry: _Entry) -> None:
        heapq.heappush(
            self._state.ready.setdefault(entry.queue, []),
            (-entry.message.priority, entry.seq, entry),
        )

    def publish(
        self, queue: str, messages: Sequence[Message], *, not_before: float | None = None
    ) -> None:
        st = self._state
        with st.cond:
            for message in messages:
                entry = _Entry(next(st.seq), queue, message)
                if not_before is not None and not_before > time.time():
                    heapq.heappush(st.delayed, (not_before, entry.seq, entry))
                else:
                    self._push(entry)
            st.cond.notify_all()

    def _promote(self) -> float | None:
        st, now = self._state, time.time()
        while st.delayed and st.delayed[0][0] <= now:
            self._push(heapq.heappop(st.delayed)[2])
        return st.delayed[0][0] if st.delayed else None

    def consumer(self, queues: Sequence[str], consumer_id: str | None = None) -> Consumer:
        if not queues:
            raise ImproperlyConfigured("a consumer needs at least one queue")
        cid = consumer_id or new_consumer_id()
        with self._state.cond:
            self._state.held.setdefault(cid, {})
        return MemoryConsumer(self, list(queues), cid)

    def recover(
        self, consumer_id: str, running_tag: str | None = None, requeue_running: bool = True
    ) -> int:
        st = self._state
        with st.cond:
            held = st.held.pop(consumer_id, {})
            count = 0
            for tag, entry in held.items():
                if tag == running_tag:
                    if not requeue_running:
                        continue
                else:
                    entry.deliveries = max(0, entry.deliveries - 1)
                self._push(entry)
                count += 1
            st.cond.notify_all()
        return count

    def recover_stale(self, timeout: float) -> int:
        return 0  # consumers live in this process; they cannot die without it

    def dead_letter(self, message: Message, queue: str, reason: str) -> None:
        st = self._state
        with st.cond:
            dl_id = str(next(st.seq))
            st.dead[dl_id] = DeadLetter(dl_id, queue, reason, time.time(), message)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        with self._state.cond:
            return list(self._state.dead.values())[:limit]

    def _take_dead(self, ids: Sequence[str] | None) -> list[DeadLetter]:
        st = self._state
        keys = list(st.dead) if ids is None else [i for i in ids if i in st.dead]
        return [st.dead.pop(k) for k in keys]

    def replay_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        st = self._state
        with st.cond:
            taken = self._take_dead(ids)
            for dl in taken:
                self._push(_Entry(next(st.seq), dl.queue, dl.message))
            st.cond.notify_all()
        return len(taken)

    def purge_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        with self._state.cond:
            return len(self._take_dead(ids))

    def purge(self, queue: str) -> int:
        st = self._state
        with st.cond:
            count = len(st.ready.pop(queue, []))
            kept = [d for d in st.delayed if d[2].queue != queue]
            count += len(st.delayed) - len(kept)
            st.delayed = kept
            heapq.heapify(st.delayed)
            return count

    def queue_size(self, queue: str) -> int:
        st = self._state
        with st.cond:
            return len(st.ready.get(queue, [])) + sum(1 for d in st.delayed if d[2].queue == queue)

    def broadcast(self, channel: str, payload: dict[str, Any], ttl: float) -> None:
        st = self._state
        with st.cond:
            now = time.time()
            st.broadcasts = [b for b in st.broadcasts if b[2] >= now]
            st.broadcasts.append((next(st.seq), channel, now + ttl, payload))
            st.cond.notify_all()

    def subscribe(self, channel: str) -> Subscriber:
        return MemorySubscriber(self._state, channel)


class MemorySubscriber(Subscriber):
    def __init__(self, state: _State, channel: str) -> None:
        self.state, self.channel, self.cursor = state, channel, -1

    def poll(self) -> list[dict[str, Any]]:
        with self.state.cond:
            now = time.time()
            found = [
                b
                for b in self.state.broadcasts
                if b[0] > self.cursor and b[1] == self.channel and b[2] >= now
            ]
        if found:
            self.cursor = found[-1][0]
        return [b[3] for b in found]


class MemoryConsumer(Consumer):
    def __init__(self, broker: MemoryBroker, queues: list[str], consumer_id: str) -> None:
        self.broker, self.queues, self.consumer_id = broker, queues, consumer_id
        self._woken = False
        self._rotation = 0

    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        st = self.broker._state
        deadline = time.monotonic() + timeout
        with st.cond:
            while True:
                next_due = self.broker._promote()
                out: list[Delivery] = []
                order = self.queues[self._rotation :] + self.queues[: self._rotation]
                self._rotation = (self._rotation + 1) % len(self.queues)
                held = st.held.setdefault(self.consumer_id, {})
                for queue in order:
                    heap = st.ready.get(queue)
                    while heap and len(out) < max_count:
                        entry = heapq.heappop(heap)[2]
                        entry.deliveries += 1
                        tag = str(entry.seq)
                        held[tag] = entry
                        out.append(Delivery(entry.message, queue, tag, entry.deliveries))
                if out:
                    return out
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._woken:
                    self._woken = False
                    return []
                if next_due is not None:
                    remaining = min(remaining, max(0.0, next_due - time.time()) + 0.001)
                st.cond.wait(remaining)

    def _take(self, deliveries: Sequence[Delivery]) -> list[_Entry]:
        held = self.broker._state.held.get(self.consumer_id, {})
        return [e for e in (held.pop(d.tag, None) for d in deliveries) if e is not None]

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        with self.broker._state.cond:
            self._take(deliveries)

    def reject(self, deliveries: Sequence[Delivery], requeue: bool) -> None:
        st = self.broker._state
        with st.cond:
            for entry in self._take(deliveries):
                if requeue:
                    entry.deliveries = max(0, entry.deliveries - 1)
                    self.broker._push(entry)
            st.cond.notify_all()

    def park(self, delivery: Delivery, not_before: float) -> None:
        st = self.broker._state
        with st.cond:
            for entry in self._take([delivery]):
                entry.deliveries = max(0, entry.deliveries - 1)
                heapq.heappush(st.delayed, (not_before, entry.seq, entry))
            st.cond.notify_all()

    def wake(self) -> None:
        # Also called from signal handlers: the condition's RLock is re-entrant, so taking it
        # while this thread already holds it cannot deadlock.
        self._woken = True
        with self.broker._state.cond:
            self.broker._state.cond.notify_all()

    def close(self) -> None:
        self.broker.recover(self.consumer_id)
