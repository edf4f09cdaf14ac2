"""Early acks on RabbitMQ (tasks without acks_late).

A task started without ``acks_late`` must not run again if its process dies. A worker
whose tasks run on the loop thread (prefork, solo) lets the consumer send that ack with
the batch's other acks (one frame) or from the flusher while the task still runs; these
tests pin down what is sent when. A process death is a connection that drops: RabbitMQ
then puts back whatever the consumer had not acked.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from celeriac import brokers
from celeriac.brokers.amqp import AMQPBroker, AMQPConsumer
from celeriac.brokers.base import Delivery
from celeriac.protocol.message import Message
from tests.apps import amqp_support
from tests.conftest import wait_for


@pytest.fixture
def broker() -> Iterator[AMQPBroker]:
    b = brokers.connect(amqp_support.url())
    assert isinstance(b, AMQPBroker)
    yield b
    b.close()


def fetch(broker: AMQPBroker, n: int) -> tuple[AMQPConsumer, list[Delivery]]:
    for i in range(n):
        broker.publish("q", [Message({"n": i}, {}, str(i).encode())])
    consumer = broker.consumer(["q"])
    assert isinstance(consumer, AMQPConsumer)
    got: list[Delivery] = []
    wait_for(lambda: got.extend(consumer.fetch(n - len(got), 0.2)) or len(got) == n, 10,
             message=f"{n} deliveries")
    return consumer, got


def die(consumer: AMQPConsumer) -> None:
    """The consumer's process dies: its connection drops without a goodbye.

    First a round trip on its channel, so what it sent before has been processed: the
    tests look at what was sent (a socket closed with unread data in it is reset, and a
    reset may discard frames the server had not read yet).
    """
    assert consumer._conn is not None and consumer._ch is not None
    consumer._ch.queue_declare("q", passive=True)
    consumer._conn.abort()


def back_in_queue(broker: AMQPBroker, n: int) -> None:
    """Wait until RabbitMQ has put ``n`` messages back (it requeues asynchronously)."""
    wait_for(lambda: broker.queue_size("q") == n, 10, message=f"{n} message(s) in the queue")


def the_one_left(broker: AMQPBroker) -> Delivery:
    """Fetch (and ack) the one message the queue holds, with a fresh consumer."""
    probe = broker.consumer(["q"])
    try:
        [d] = probe.fetch(5, 2.0)
        probe.ack([d])
        return d
    finally:
        probe.close()


def test_deferred_early_acks_go_with_the_batch_acks(broker: AMQPBroker) -> None:
    consumer, got = fetch(broker, 3)
    consumer.defer_started = True
    for d in got:
        consumer.started(d, requeue_if_lost=False)
    consumer.ack(got[:2])  # two finished; their early acks and these are one and the same
    die(consumer)
    back_in_queue(broker, 1)  # the third was running: its ack was still to come
    d = the_one_left(broker)
    assert d.message.body == b"2"


def test_ack_started_acks_the_running_task(broker: AMQPBroker) -> None:
    consumer, got = fetch(broker, 2)
    consumer.defer_started = True
    consumer.started(got[0], requeue_if_lost=False)
    consumer.ack_started()  # the flusher: the task has run a while
    die(consumer)
    back_in_queue(broker, 1)  # only the one that had not started
    d = the_one_left(broker)
    assert d.message.body == b"1"


def test_without_deferral_the_ack_is_sent_at_start() -> None:
    broker = brokers.connect(amqp_support.url(query="defer_early_acks=false"))
    assert isinstance(broker, AMQPBroker) and broker.defer_early_acks is False
    try:
        strict(broker)
    finally:
        broker.close()


def queue_state(broker: AMQPBroker) -> tuple[int, int]:
    """(messages ready, consumers) of the queue, from a passive declare."""
    conn = broker.new_connection()
    try:
        _name, ready, consumers = conn.channel().queue_declare("q", passive=True)
        return ready, consumers
    finally:
        conn.close()


def strict(broker: AMQPBroker) -> None:
    consumer, got = fetch(broker, 1)
    consumer.defer_started = True
    consumer.started(got[0], requeue_if_lost=False)
    die(consumer)
    # Once RabbitMQ has seen the connection go (no consumer left), whatever it held is
    # back in the queue: nothing is.
    wait_for(lambda: queue_state(broker)[1] == 0, 10, message="the dead consumer to go")
    assert queue_state(broker) == (0, 0)


def test_a_fetch_stays_subscribed_until_its_task_starts(broker: AMQPBroker) -> None:
    """The fetch's basic.cancel rides with the next write; a task's start sends it."""
    consumer, [d] = fetch(broker, 1)
    assert queue_state(broker)[1] == 1  # still subscribed (nothing more to deliver)
    consumer.started(d, requeue_if_lost=True)  # (acks_late: nothing else to send)
    wait_for(lambda: queue_state(broker)[1] == 0, 10, message="the subscription to end")
    consumer.ack([d])
    consumer.close()


def test_an_early_acked_task_is_never_requeued(broker: AMQPBroker) -> None:
    consumer, got = fetch(broker, 2)
    consumer.defer_started = True
    consumer.started(got[0], requeue_if_lost=False)
    consumer.reject(got, requeue=True)  # e.g. a warm shutdown gives back the batch
    consumer.close()
    back_in_queue(broker, 1)
    d = the_one_left(broker)
    assert d.message.body == b"1"  # the started one was acked, not given back


def test_a_deferred_ack_lost_with_its_process_is_a_counted_redelivery(
    broker: AMQPBroker,
) -> None:
    """The window deferral opens: a process that dies within a task's first few
    milliseconds (before the flusher ran) gets that task back, counted as delivered."""
    consumer, got = fetch(broker, 1)
    consumer.defer_started = True
    consumer.started(got[0], requeue_if_lost=False)
    die(consumer)
    back_in_queue(broker, 1)
    d = the_one_left(broker)
    assert d.delivery_count == 2
