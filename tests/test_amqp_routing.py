"""RabbitMQ topology from settings: task_queues exchanges and bindings, priorities, quorum."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from celeriac import brokers
from celeriac.brokers import amqp_client as wire
from celeriac.protocol.message import Message
from tests.apps import amqp_app, amqp_support
from tests.conftest import WorkerProcess, bind_app


def rabbitmqctl(*args: str) -> list[list[str]]:
    out = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                         check=True)
    return [line.split("\t") for line in out.stdout.splitlines()[1:]]


def test_task_queues_declare_exchanges_bindings_and_priorities(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    vhost = amqp_support.vhost()
    app = bind_app(amqp_app.app, amqp_support.url(vhost), result_backend="rpc://",
                   task_queues=[{"name": "media", "exchange": "media",
                                 "exchange_type": "topic", "routing_key": "media.#",
                                 "max_priority": 10}])
    try:
        start_worker(app, "-Q", "media", wait=False)
        r = amqp_app.add.apply_async((2, 3), queue="media", priority=5)
        assert r.get(timeout=30) == 5
        queues = {row[0]: row[1] for row in rabbitmqctl("list_queues", "-p", vhost, "name",
                                                        "arguments")}
        assert "x-max-priority" in queues["media"]
        exchanges = {row[0]: row[1] for row in rabbitmqctl("list_exchanges", "-p", vhost,
                                                           "name", "type")}
        assert exchanges["media"] == "topic"
        bindings = rabbitmqctl("list_bindings", "-p", vhost, "source_name", "destination_name",
                               "routing_key")
        assert ["media", "media", "media.#"] in bindings
        # A message routed by the topic exchange reaches the queue (and its worker).
        broker = brokers.connect(amqp_support.url(vhost))
        try:
            assert isinstance(broker, brokers.Broker)
            broker.publish_raw("media", "media.video", [  # type: ignore[attr-defined]
                Message({"n": 1}, {}, b"raw")])
            assert broker.queue_size("media") in (0, 1)  # consumed, or about to be
        finally:
            broker.close()
    finally:
        app.close()


def test_quorum_queues_by_setting(start_worker: Callable[..., WorkerProcess]) -> None:
    vhost = amqp_support.vhost()
    app = bind_app(amqp_app.app, amqp_support.url(vhost), result_backend="rpc://",
                   task_default_queue_type="quorum")
    try:
        start_worker(app, "-c", "2", wait=False)
        results = [amqp_app.add.delay(i, 1) for i in range(20)]
        assert [r.get(timeout=30) for r in results] == [i + 1 for i in range(20)]
        queues = {row[0]: row[1] for row in rabbitmqctl("list_queues", "-p", vhost, "name",
                                                        "type")}
        assert queues["celery"] == "quorum"
    finally:
        app.close()


def test_existing_queue_with_other_arguments_is_used_as_it_is() -> None:
    url = amqp_support.url()
    [params] = wire.parse_url(url)
    conn = wire.Connection(params).connect()
    conn.channel().queue_declare("legacy", durable=True, arguments={"x-max-length": 100})
    conn.close()
    broker = brokers.connect(url + "?max_priority=10")  # would declare other arguments
    try:
        broker.publish("legacy", [Message({"n": 1}, {}, b"x")])
        consumer = broker.consumer(["legacy"])
        [d] = consumer.fetch(1, 5)
        consumer.ack([d])
        consumer.close()
    finally:
        broker.close()
