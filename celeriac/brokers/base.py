"""The broker interface: move opaque messages between queues, nothing more.

A broker knows nothing of tasks. Every implementation passes ``tests/conformance``.
"""

from __future__ import annotations

import os
import socket
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from celeriac.protocol.message import Message


@dataclass(slots=True)
class Delivery:
    """A message handed to one consumer, which must ack, reject or park it."""

    message: Message
    queue: str
    tag: str
    delivery_count: int = 1  # times the broker handed this message out, this one included

    @property
    def redelivered(self) -> bool:
        return self.delivery_count > 1


@dataclass(slots=True)
class DeadLetter:
    id: str
    queue: str
    reason: str
    time: float
    message: Message


def new_consumer_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class Consumer(ABC):
    """One consumer's view of some queues. Not thread-safe: one thread fetches and settles."""

    consumer_id: str

    @abstractmethod
    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        """Up to ``max_count`` ready messages, waiting at most ``timeout`` s for the first."""

    @abstractmethod
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Remove the messages for good (one round trip for the batch)."""

    def ack_soon(self, deliveries: Sequence[Delivery]) -> None:
        """Ack, possibly together with the next call's round trip (``fetch``, ``ack``,
        ``close``) rather than in one of its own. Until then the messages stay held by this
        consumer: if it dies first they are given back (and may run again). Default: ack
        now."""
        self.ack(deliveries)

    def ack_after(self, finish: Callable[[], None], deliveries: Sequence[Delivery]) -> None:
        """``ack_soon`` the deliveries once ``finish()`` (a result store's finisher, see
        ``ResultBackend.store_soon``) returned. A broker may call ``finish`` inside its next
        ``fetch`` of this thread, between sending and reading (the two round trips then
        overlap), and calls it at the latest in that ``fetch`` or in ``close``. Default:
        now."""
        finish()
        self.ack_soon(deliveries)

    @abstractmethod
    def reject(self, deliveries: Sequence[Delivery], requeue: bool) -> None:
        """Give the messages back (``requeue``: not counted as a delivery) or drop them."""

    @abstractmethod
    def park(self, delivery: Delivery, not_before: float) -> None:
        """Hold the message in the broker until the epoch time ``not_before``."""

    def heartbeat(self) -> None:  # noqa: B027 - optional for brokers that need it
        """Tell the broker this consumer is alive (brokers with leases need it)."""

    def wake(self) -> None:  # noqa: B027 - optional
        """Make a blocked ``fetch`` return early; safe from a signal handler or thread."""

    # Set by a worker that calls ``ack_started`` while a task runs (its flusher thread):
    # ``started`` may then leave its ack for later.
    defer_started: bool = False

    def started(self, delivery: Delivery, requeue_if_lost: bool,  # noqa: B027
                ack_now: bool = False) -> None:
        """The delivery's task starts now (called from the thread that runs it).

        Brokers whose server takes back everything a dead consumer's connection held
        (AMQP) ack here a message that must not run again if this process dies (with
        ``defer_started``: by the next ``ack``/``ack_started``, unless ``ack_now``).
        """

    def ack_started(self) -> None:  # noqa: B027 - optional
        """Send the acks ``started`` left for later (called while their tasks run)."""

    def give_back_read_ahead(self) -> int:
        """Give back messages read ahead of ``fetch`` and not handed out yet (a worker
        whose task runs long). Default: a consumer that reads nothing ahead has none."""
        return 0

    @abstractmethod
    def close(self) -> None:
        """Stop consuming; deliveries not acked go back to their queues."""


class Subscriber(ABC):
    """Reads a broadcast channel."""

    @abstractmethod
    def poll(self) -> list[dict[str, Any]]:
        """Messages broadcast since the last poll (non-blocking)."""

    def close(self) -> None:  # noqa: B027
        pass


class Broker(ABC):
    """Queues of opaque messages. One instance per process; create with ``brokers.connect``."""

    url: str
    # How ``publish`` retries when the connection fails (Celery's task_publish_retry_policy:
    # max_retries, interval_start, interval_step, interval_max); the app sets it. Brokers
    # that cannot lose a connection ignore it.
    publish_retry_policy: dict[str, Any] | None = None

    @abstractmethod
    def publish(
        self, queue: str, messages: Sequence[Message], *, not_before: float | None = None
    ) -> None:
        """Store the messages durably before returning; ``not_before`` delays delivery."""

    @abstractmethod
    def consumer(self, queues: Sequence[str], consumer_id: str | None = None) -> Consumer:
        """A consumer of ``queues`` (earlier queues are not preferred: they are served in turn)."""

    @abstractmethod
    def recover(
        self, consumer_id: str, running_tag: str | None = None, requeue_running: bool = True
    ) -> int:
        """Give back what a dead consumer held; returns how many messages went back.

        ``running_tag`` names the message that consumer was running: it keeps its delivery
        count when requeued (the others were never started, so theirs is undone), or is
        dropped when ``requeue_running`` is false.
        """

    @abstractmethod
    def recover_stale(self, timeout: float) -> int:
        """Give back what consumers silent for ``timeout`` s (or whose process is gone) held."""

    @abstractmethod
    def dead_letter(self, message: Message, queue: str, reason: str) -> None:
        """Keep the message with a reason, out of every queue."""

    @abstractmethod
    def dead_letters(self, limit: int = 100) -> list[DeadLetter]: ...

    @abstractmethod
    def replay_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        """Put dead letters (all, or those named) back on their queues."""

    @abstractmethod
    def purge_dead_letters(self, ids: Sequence[str] | None = None) -> int: ...

    @abstractmethod
    def purge(self, queue: str) -> int:
        """Drop every ready message of ``queue``; returns how many."""

    @abstractmethod
    def queue_size(self, queue: str) -> int:
        """Messages waiting in ``queue`` (ready or delayed, not held by a consumer)."""

    @abstractmethod
    def broadcast(self, channel: str, payload: dict[str, Any], ttl: float) -> None:
        """Send to every subscriber of ``channel``; kept ``ttl`` s for late subscribers."""

    @abstractmethod
    def subscribe(self, channel: str) -> Subscriber:
        """Subscribe to a channel, first replaying what is still kept."""

    def heartbeat(self, consumer_ids: Sequence[str]) -> None:  # noqa: B027 - optional
        """Mark these consumers alive (a supervisor beats for its children)."""

    def configure(self, conf: Any) -> None:  # noqa: B027 - optional
        """Read the app's settings that concern this broker (called once, after connect)."""

    def close(self) -> None:  # noqa: B027
        """Release connections."""
