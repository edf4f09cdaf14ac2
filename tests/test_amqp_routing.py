"""RabbitMQ routing and topology: task_queues exchanges and bindings (direct, topic, fanout),
task_routes and apply_async naming an exchange and routing key, broadcast queues, per-worker
direct queues (worker_direct), priorities, quorum queues.

The end-to-end tests run real worker processes (``tests/apps/amqp_routing_app.py``, which
reads its routing settings from the environment)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celery, brokers
from celeriac.brokers import amqp_client as wire
from celeriac.brokers.amqp_routing import (
    Broadcast,
    destination,
    specs_by_name,
    topic_matches,
    worker_queues,
)
from celeriac.brokers.base import Delivery
from celeriac.exceptions import ImproperlyConfigured
from celeriac.protocol.message import Message
from tests.apps import amqp_app, amqp_routing_app, amqp_support
from tests.conftest import WorkerProcess, bind_app, wait_for

StartWorker = Callable[..., WorkerProcess]


rabbitmqctl = amqp_support.rabbitmqctl_rows


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
        # The app is shared by the other AMQP test modules: leave it as found (a quorum
        # default leaking into them changed what they test).
        app.conf.task_default_queue_type = None
        app.close()


def test_closing_consumer_gives_back_once_on_a_quorum_queue() -> None:
    """What a closing consumer read ahead goes back once, on a quorum queue too.

    A quorum queue's channel keeps acks to itself beyond 32 commands in flight until
    RabbitMQ applied some; the give-back's acks used to follow the republish with nothing
    after them, so a close often came before they were sent, and RabbitMQ returned the
    originals next to the copies (263 duplicates in 27 closes of 40 here, about 1 in 4
    with the two cores busy). 40 closes of a consumer holding ~300 messages each.
    """
    url = amqp_support.url()
    [params] = wire.parse_url(url)
    conn = wire.Connection(params).connect()
    ctl = conn.channel()
    broker = brokers.connect(url + "?queue_type=quorum")
    n = 300
    try:
        for cycle in range(40):
            queue = f"quorum-close-{cycle}"
            broker.publish(queue, [Message({"id": str(i)}, {}, b"x") for i in range(n)])
            consumer = broker.consumer([queue])
            acked = 0
            for _ in range(2):  # the first fetch measures the pace, the second reads ahead
                got = consumer.fetch(2, 5)
                consumer.ack(got)
                acked += len(got)
            # Handed out, not acked (a worker's running and prefetched tasks), and what was
            # read ahead besides: all given back at the close.
            held: list[Delivery] = []
            deadline = time.monotonic() + 30
            while len(held) < 200 and time.monotonic() < deadline:
                held += consumer.fetch(200 - len(held), 5)  # (may come in parts)
            assert len(held) == 200
            consumer.close()

            def settled(queue: str = queue) -> tuple[int] | None:
                # No consumer left: RabbitMQ has returned what the closed one still had.
                _q, count, consumers = ctl.queue_declare(queue, passive=True)
                return (count,) if consumers == 0 else None

            found = wait_for(settled, 30, message=f"no consumer on {queue}")
            assert isinstance(found, tuple)
            assert found[0] == n - acked, (
                f"close {cycle}: {found[0]} messages in the queue, {n - acked} expected")
            ctl.queue_delete(queue)
    finally:
        broker.close()
        conn.close()


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


# -- pure routing rules (no server) ----------------------------------------------------------


def test_topic_matching() -> None:
    assert topic_matches("tasks.#", "tasks.video.encode")
    assert topic_matches("tasks.#", "tasks")
    assert topic_matches("tasks.*", "tasks.video")
    assert not topic_matches("tasks.*", "tasks.video.encode")
    assert topic_matches("*.video.#", "tasks.video")
    assert not topic_matches("tasks.audio", "tasks.video")
    assert topic_matches("#", "")


def test_destination_follows_celerys_rule() -> None:
    specs = specs_by_name([
        {"name": "media", "exchange": "media", "exchange_type": "topic",
         "routing_key": "media.#"},
        "plain",
        Broadcast("bc"),
    ])
    # A direct queue without an explicit exchange and key: default exchange, queue name.
    assert destination(specs, "plain", None, None, None, "celery") == ("plain", None)
    assert destination(specs, None, None, None, None, "celery") == ("celery", None)
    # A topic queue goes through its exchange with its routing key.
    assert destination(specs, "media", None, None, None, "celery") == (
        "media", ("media", "media.#", "topic"))
    # The routing key given wins.
    assert destination(specs, "media", None, "media.video", None, "celery") == (
        "media", ("media", "media.video", "topic"))
    # Exchange + key without a queue: that exchange, its type from task_queues.
    assert destination(specs, None, "media", "media.audio", None, "celery") == (
        "", ("media", "media.audio", "topic"))
    # Direct exchange with both given: through it (C.dq2, worker direct).
    assert destination(specs, None, "C.dq2", "w1@h", None, "celery") == (
        "", ("C.dq2", "w1@h", "direct"))
    # A broadcast name: its fanout exchange.
    assert destination(specs, "bc", None, None, None, "celery") == ("bc", ("bc", "", "fanout"))


def test_worker_queue_names() -> None:
    specs = specs_by_name([Broadcast("bc"), Broadcast("fixed", queue="shared"), "celery"])
    assert worker_queues(specs, ["celery", "bc", "fixed"], "w1@h", direct=True) == [
        "celery", "bcast.bc.w1@h", "shared", "w1@h.dq2"]


def test_kombu_broadcast_and_queue_objects_are_read() -> None:
    from kombu import Exchange, Queue
    from kombu.common import Broadcast as KombuBroadcast

    specs = specs_by_name([KombuBroadcast("news"),
                           Queue("video", Exchange("media", type="topic"), "media.video.#")])
    assert specs["news"]["broadcast"] and specs["news"]["exchange"] == "news"
    assert specs["news"]["queue"] is None  # kombu's bcast.<uuid>: one queue per worker
    assert specs["video"]["exchange_type"] == "topic"
    assert worker_queues(specs, ["news"], "w@h") == ["bcast.news.w@h"]


def test_routes_give_exchange_and_routing_key() -> None:
    app = Celery("routes", broker="memory://", set_as_current=False)
    app.conf.task_routes = [
        {"proj.video.*": {"exchange": "media", "exchange_type": "topic",
                          "routing_key": "media.video"}},
        lambda name, args, kwargs, options, task=None, **kw: (
            {"queue": "bulk"} if name == "proj.bulk" else None),
    ]
    assert app._route("proj.video.encode") == ("", ("media", "media.video", "topic"))
    assert app._route("proj.bulk") == ("bulk", None)
    assert app._route("proj.other") == ("celery", None)
    # apply_async(exchange=..., routing_key=...) wins over the route.
    assert app._route("proj.video.encode", options={"routing_key": "media.hd"}) == (
        "", ("media", "media.hd", "topic"))
    assert app._route("proj.x", options={"exchange": "C.dq2", "routing_key": "w1@h"}) == (
        "", ("C.dq2", "w1@h", "direct"))
    # No -Q: a worker consumes every task_queues entry (Celery), else the default queue.
    assert app.default_worker_queues() == ["celery"]
    app.conf.task_queues = ["a", {"name": "b"}]
    assert app.default_worker_queues() == ["a", "b"]


def test_brokers_without_exchanges_get_the_bound_queues() -> None:
    app = Celery("emulated", broker="memory://", set_as_current=False)
    app.conf.task_queues = [
        {"name": "video", "exchange": "media", "exchange_type": "topic",
         "routing_key": "media.video.#"},
        {"name": "all", "exchange": "media", "exchange_type": "topic", "routing_key": "media.#"},
        Broadcast("bc"),
    ]
    app.send_task("t", exchange="media", routing_key="media.video.hd")
    app.send_task("t", exchange="media", routing_key="media.audio")
    assert app.broker.queue_size("video") == 1
    assert app.broker.queue_size("all") == 2
    [d] = app.broker.consumer(["video"]).fetch(1, 1)
    assert d.message.properties["delivery_info"] == {"exchange": "media",
                                                     "routing_key": "media.video.hd"}
    app.send_task("t", exchange="C.dq2", routing_key="w1@h")
    assert app.broker.queue_size("w1@h.dq2") == 1
    with pytest.raises(ImproperlyConfigured, match="broadcast queues need RabbitMQ"):
        app.send_task("t", queue="bc")
    with pytest.raises(ImproperlyConfigured, match="need a broker with exchanges"):
        app.worker_queues(["bc"], "w1@h")
    app.conf.worker_direct = True
    assert app.worker_queues(["video"], "w1@h") == ["video", "w1@h.dq2"]


# -- on RabbitMQ -----------------------------------------------------------------------------


def _raw(url: str) -> wire.Connection:
    [params] = wire.parse_url(url)
    return wire.Connection(params).connect()


def _drain(url: str, queue: str) -> list[wire.Incoming]:
    """Every message in ``queue`` (taken and acked), with its exchange and routing key."""
    conn = _raw(url)
    try:
        ch = conn.channel()
        out = []
        while True:
            got = ch.get(queue, no_ack=True)
            if got is None:
                return out
            out.append(got)
    finally:
        conn.close()


def _wait_queue(url: str, queue: str, timeout: float = 30.0) -> None:
    """Wait until ``queue`` exists (a worker declares its queues when it starts)."""
    conn = _raw(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            ch = conn.channel()
            try:
                ch.queue_declare(queue, passive=True)
                ch.close()
                return
            except wire.ChannelClosed:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"queue {queue!r} never appeared") from None
                time.sleep(0.05)
    finally:
        conn.close()


TOPIC_QUEUES = [
    {"name": "video", "exchange": "media", "exchange_type": "topic",
     "routing_key": "media.video.#"},
    {"name": "everything", "exchange": "media", "exchange_type": "topic",
     "routing_key": "media.#"},
    {"name": "fan-a", "exchange": "fan", "exchange_type": "fanout"},
    {"name": "fan-b", "exchange": "fan", "exchange_type": "fanout"},
]


@pytest.fixture
def routed() -> Iterator[tuple[Celery, str]]:
    url = amqp_support.url()
    app = bind_app(amqp_routing_app.app, url, result_backend="rpc://",
                   task_queues=TOPIC_QUEUES,
                   task_routes={"tests.apps.amqp_routing_app.add": {
                       "exchange": "media", "routing_key": "media.video.sd"}})
    try:
        yield app, url
    finally:
        app.conf.task_queues = None
        app.conf.task_routes = None
        app.close()


def test_topic_and_fanout_exchanges_deliver_to_the_bound_queues(
        routed: tuple[Celery, str]) -> None:
    _app, url = routed
    t = amqp_routing_app.where
    t.apply_async(("p", "k1"), exchange="media", routing_key="media.video.hd")
    t.apply_async(("p", "k2"), exchange="media", routing_key="media.audio")
    t.apply_async(("p", "k3"), queue="fan-a")  # a fanout queue: through its exchange
    amqp_routing_app.add.delay(1, 2)  # task_routes: exchange + routing key
    video = _drain(url, "video")
    everything = _drain(url, "everything")
    assert [(m.exchange, m.routing_key) for m in video] == [
        ("media", "media.video.hd"), ("media", "media.video.sd")]
    assert [(m.exchange, m.routing_key) for m in everything] == [
        ("media", "media.video.hd"), ("media", "media.audio"), ("media", "media.video.sd")]
    for name in ("fan-a", "fan-b"):
        [m] = _drain(url, name)
        assert (m.exchange, m.routing_key) == ("fan", "fan-a")
    # Celery's message: headers and properties as published to the default exchange.
    m = everything[0]
    assert m.properties["headers"]["task"] == "tests.apps.amqp_routing_app.where"
    assert m.properties["correlation_id"] == m.properties["headers"]["id"]
    assert m.properties["delivery_mode"] == 2
    assert not any(k.startswith("x-celeriac") for k in m.properties["headers"])


def test_unroutable_topic_publish_raises(routed: tuple[Celery, str]) -> None:
    with pytest.raises(wire.Unroutable, match="no queue is bound to exchange 'media'"):
        amqp_routing_app.where.apply_async(("p", "k"), exchange="media",
                                           routing_key="other.thing")


def test_delayed_publish_through_an_exchange(routed: tuple[Celery, str]) -> None:
    app, _url = routed
    start = time.time()
    amqp_routing_app.where.apply_async(("p", "late"), exchange="media",
                                       routing_key="media.video.x", countdown=1.0)
    consumer = app.broker.consumer(["video"])
    try:
        got = consumer.fetch(1, 10)
        assert got and time.time() - start >= 0.99
        assert got[0].message.headers["id"]
        consumer.ack(got)
    finally:
        consumer.close()


def _env(**conf: Any) -> dict[str, str]:
    return {"CELERIAC_TEST_CONF": json.dumps(conf)}


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_worker_consumes_topic_routed_tasks(start_worker: StartWorker,
                                            routed: tuple[Celery, str],
                                            tmp_path: Path) -> None:
    app, _url = routed
    log = tmp_path / "runs"
    start_worker(app, "-Q", "video", "-n", "w1@routing", wait=False,
                 env=_env(task_queues=TOPIC_QUEUES))
    r = amqp_routing_app.where.apply_async((str(log), "t1"), exchange="media",
                                           routing_key="media.video.hd")
    assert r.get(timeout=30) == "w1@routing"
    assert amqp_routing_app.add.delay(2, 3).get(timeout=30) == 5  # via task_routes


@pytest.mark.parametrize("client_form", ["dict", "kombu"])
def test_broadcast_reaches_every_worker_once(start_worker: StartWorker, tmp_path: Path,
                                             client_form: str) -> None:
    url = amqp_support.url()
    log = tmp_path / "runs"
    from kombu.common import Broadcast as KombuBroadcast

    queues: list[Any] = [KombuBroadcast("bc") if client_form == "kombu" else Broadcast("bc")]
    app = bind_app(amqp_routing_app.app, url, result_backend="rpc://", task_queues=queues)
    try:
        # One worker with kombu's Broadcast, one with our dict form: same exchange.
        start_worker(app, "-Q", "celery,bc", "-n", "w1@bc", "-c", "2", wait=False,
                     env={"CELERIAC_TEST_KOMBU_BROADCAST": "bc"})
        start_worker(app, "-n", "w2@bc", wait=False,  # no -Q: every task_queues entry
                     env=_env(task_queues=[Broadcast("bc"), "celery"]))
        for host in ("w1@bc", "w2@bc"):
            _wait_queue(url, f"bcast.bc.{host}")
        for i in range(3):
            amqp_routing_app.where.apply_async((str(log), f"b{i}"), queue="bc")
        wait_for(lambda: len(_lines(log)) >= 6, timeout=30)
        time.sleep(0.3)  # nothing more arrives
        runs = sorted((line[0], line[1]) for line in _lines(log))
        assert runs == sorted((f"b{i}", h) for i in range(3) for h in ("w1@bc", "w2@bc"))
        # Both workers still take plain tasks from the shared queue.
        assert amqp_routing_app.add.delay(1, 1).get(timeout=30) == 2
        # A real Celery client with kombu's Broadcast reaches both workers too.
        capp = _celery_client(url, task_queues=[KombuBroadcast("bc")])
        try:
            capp.send_task("tests.apps.amqp_routing_app.where", (str(log), "celery"),
                           queue="bc")
        finally:
            capp.close()
        wait_for(lambda: len(_lines(log)) >= 8, timeout=30)
        assert sorted(line[1] for line in _lines(log) if line[0] == "celery") == [
            "w1@bc", "w2@bc"]
        bindings = rabbitmqctl("list_bindings", "-p", url.rsplit("/", 1)[1], "source_name",
                               "destination_name")
        assert ["bc", "bcast.bc.w1@bc"] in bindings and ["bc", "bcast.bc.w2@bc"] in bindings
    finally:
        app.conf.task_queues = None
        app.close()


def _celery_client(url: str, **conf: Any) -> Any:
    import celery

    capp = celery.Celery("celery-client", broker=url, backend="rpc://", set_as_current=False)
    capp.conf.update(conf)
    return capp


def test_broadcast_queue_outlives_a_busy_worker(start_worker: StartWorker,
                                                tmp_path: Path) -> None:
    """A broadcast queue expires when unused (x-expires), but not while its worker lives:
    the supervisor redeclares it while the only child runs a task longer than the expiry."""
    url = amqp_support.url()
    log = tmp_path / "runs"
    conf = {"task_queues": [Broadcast("bc"), "celery"],
            "broker_transport_options": {"broadcast_queue_expires": 3}}
    app = bind_app(amqp_routing_app.app, url, result_backend="rpc://", **conf)
    try:
        start_worker(app, "-n", "w1@busy", wait=False, env=_env(**conf))
        _wait_queue(url, "bcast.bc.w1@busy")
        queues = {row[0]: row[1] for row in rabbitmqctl(
            "list_queues", "-p", url.rsplit("/", 1)[1], "name", "arguments")}
        assert "x-expires" in queues["bcast.bc.w1@busy"] and "3000" in queues[
            "bcast.bc.w1@busy"]
        amqp_routing_app.mark.delay(str(log), "long", 7.0)  # the only child: busy 7 s
        time.sleep(8.0)  # longer than the expiry, with no consumer on the queue
        _wait_queue(url, "bcast.bc.w1@busy", timeout=0.1)  # still there
        amqp_routing_app.where.apply_async((str(log), "after"), queue="bc")
        wait_for(lambda: any(line[0] == "after" for line in _lines(log)), timeout=30)
    finally:
        app.conf.task_queues = None
        app.conf.broker_transport_options = {}
        app.close()


def test_worker_direct_queues(start_worker: StartWorker, tmp_path: Path) -> None:
    url = amqp_support.url()
    log = tmp_path / "runs"
    app = bind_app(amqp_routing_app.app, url, result_backend="rpc://")
    try:
        for host in ("w1@direct", "w2@direct"):
            start_worker(app, "-n", host, wait=False, env=_env(worker_direct=True))
        for host in ("w1@direct", "w2@direct"):
            _wait_queue(url, f"{host}.dq2")
        t = amqp_routing_app.where
        assert t.apply_async((str(log), "q"), queue="w1@direct.dq2").get(timeout=30) == \
            "w1@direct"
        assert t.apply_async((str(log), "x"), exchange="C.dq2",
                             routing_key="w2@direct").get(timeout=30) == "w2@direct"
        from celery.utils.nodenames import worker_direct as celery_worker_direct

        # Celery's own helper (a kombu Queue bound to C.dq2) works as ``queue=``.
        assert t.apply_async((str(log), "k"), queue=celery_worker_direct("w2@direct")).get(
            timeout=30) == "w2@direct"
        # A real Celery client's worker_direct queue reaches the celeriac worker.
        capp = _celery_client(url)
        try:
            r = capp.send_task("tests.apps.amqp_routing_app.where", (str(log), "c"),
                               queue=celery_worker_direct("w1@direct"))
            assert r.get(timeout=30) == "w1@direct"
        finally:
            capp.close()
        for i in range(6):
            t.apply_async((str(log), f"d{i}"), queue="w1@direct.dq2")
        wait_for(lambda: len(_lines(log)) >= 10, timeout=30)
        assert {line[1] for line in _lines(log) if line[0].startswith("d")} == {"w1@direct"}
        vhost = url.rsplit("/", 1)[1]
        bindings = rabbitmqctl("list_bindings", "-p", vhost, "source_name", "destination_name",
                               "routing_key")
        assert ["C.dq2", "w1@direct.dq2", "w1@direct"] in bindings
        queues = {row[0]: row[1:] for row in rabbitmqctl("list_queues", "-p", vhost, "name",
                                                         "durable", "auto_delete")}
        assert queues["w1@direct.dq2"] == ["true", "false"]  # as Celery declares it
    finally:
        app.close()
