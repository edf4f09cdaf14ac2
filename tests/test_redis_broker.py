"""What the Redis broker does beyond the conformance suite: kombu's envelopes and keys,
Celery's revoke broadcast, lost replies, outages and the recovery rules around them.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from celeriac.brokers.redis import (
    FETCH,
    REVOKE_CHANNEL,
    RedisBroker,
    RedisConsumer,
    decode_envelope,
    encode_envelope,
)
from celeriac.protocol.message import Message, build_task_message
from tests.redis_support import PrivateRedis, delete_prefix, new_prefix, shared_url, wait_for


@pytest.fixture
def prefix() -> Iterator[str]:
    found = new_prefix("broker")
    yield found
    delete_prefix(found)


@pytest.fixture
def broker(prefix: str) -> Iterator[RedisBroker]:
    b = RedisBroker(shared_url(prefix=prefix))
    yield b
    b.close()


def raw_envelope(task_id: str = "c96f715f-4a13-4f86-b861-d5b73e798424") -> dict[str, Any]:
    """A message exactly as a Celery 5.7 client LPUSHes it (PROTOCOL.md §1.5)."""
    body = [[2, 2], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    env: dict[str, Any] = {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "tasks.add", "id": task_id, "shadow": None,
                    "eta": None, "expires": None, "group": None, "group_index": None,
                    "retries": 0, "timelimit": [None, None], "root_id": task_id,
                    "parent_id": None, "argsrepr": "(2, 2)", "kwargsrepr": "{}",
                    "origin": "gen7678@vm", "ignore_result": False,
                    "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}},
        "properties": {"correlation_id": task_id, "reply_to": "82429d51",
                       "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": "celery"},
                       "priority": 0, "body_encoding": "base64",
                       "delivery_tag": "0e584438-c1b2-48f0-9f24-745c37e46529"},
    }
    return env


# -- envelopes and keys ----------------------------------------------------------------------


def test_our_envelope_is_kombus(broker: RedisBroker, prefix: str) -> None:
    message = build_task_message("tasks.add", "t-1", (2, 2), priority=5)
    broker.publish("celery", [message])
    client = broker.connector.client
    # priority 5 goes to kombu's bucket 3: <queue>\x06\x163.
    assert client.llen(f"{prefix}celery") == 0
    [raw] = client.lrange(f"{prefix}celery\x06\x163", 0, -1)
    env = json.loads(raw)
    assert set(env) >= {"body", "content-encoding", "content-type", "headers", "properties"}
    assert env["content-type"] == "application/json"
    assert env["content-encoding"] == "utf-8"
    assert env["headers"]["task"] == "tasks.add" and env["headers"]["id"] == "t-1"
    props = env["properties"]
    assert props["body_encoding"] == "base64"
    assert props["delivery_info"] == {"exchange": "", "routing_key": "celery"}
    assert len(props["delivery_tag"]) == 36
    assert props["priority"] == 5 and props["correlation_id"] == "t-1"
    assert json.loads(base64.b64decode(env["body"])) == [
        [2, 2], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    # kombu reads it as its own.
    from kombu.transport.virtual import Message as KombuMessage

    class Channel:
        def decode_body(self, body: str, encoding: str | None) -> bytes:
            return base64.b64decode(body) if encoding == "base64" else body.encode()

    km = KombuMessage(env, channel=Channel())
    assert km.headers["id"] == "t-1" and km.content_type == "application/json"
    assert km.delivery_info["routing_key"] == "celery"
    assert json.loads(km.body)[0] == [2, 2]


@pytest.mark.parametrize(
    "variant",
    ["full", "minimal-headers", "plain-body", "restored-by-kombu"],
)
def test_celery_envelopes_are_read(broker: RedisBroker, prefix: str, variant: str) -> None:
    env = raw_envelope()
    if variant == "minimal-headers":
        env["headers"] = {"lang": "py", "task": "tasks.add", "id": "x1"}
    elif variant == "plain-body":
        del env["properties"]["body_encoding"]
        env["body"] = json.dumps([[2, 2], {}, {}])
    elif variant == "restored-by-kombu":
        env["headers"]["redelivered"] = True
        env["properties"]["delivery_info"]["redelivered"] = True
    broker.connector.client.lpush(f"{prefix}celery", json.dumps(env))
    consumer = broker.consumer(["celery"])
    [d] = consumer.fetch(1, 5)
    assert d.message.headers == env["headers"]
    assert d.message.properties == env["properties"]
    assert json.loads(d.message.body)[0] == [2, 2]
    assert d.delivery_count == (2 if variant == "restored-by-kombu" else 1)
    consumer.ack([d])
    consumer.close()


def test_round_trip_keeps_properties_exact() -> None:
    for props in ({}, {"priority": 3}, {"body_encoding": "utf-8", "x": 1},
                  {"delivery_tag": "t", "delivery_info": {"exchange": "e", "routing_key": "r"}}):
        message = Message({"a": 1}, dict(props), b"\x00\xff", "application/data", "binary")
        back, count = decode_envelope(encode_envelope(message, "q"))
        assert back == message and count == 0


def test_garbage_in_a_queue_is_handed_over_for_dead_lettering(broker: RedisBroker,
                                                              prefix: str) -> None:
    broker.connector.client.lpush(f"{prefix}celery", b"\xff not json")
    consumer = broker.consumer(["celery"])
    [d] = consumer.fetch(1, 5)
    assert d.message.body == b"\xff not json"
    assert d.message.content_type == "application/x-redis-envelope"
    consumer.ack([d])
    consumer.close()


def test_keys_are_celerys_and_ours_are_prefixed(broker: RedisBroker, prefix: str) -> None:
    broker.publish("q", [Message({}, {"priority": p}, b"") for p in (0, 2, 3, 6, 9)])
    client = broker.connector.client
    consumer = broker.consumer(["q"])
    got = consumer.fetch(2, 5)
    keys = {k.decode() for k in client.scan_iter(match=f"{prefix}*")}
    assert keys == {f"{prefix}q\x06\x163", f"{prefix}q\x06\x166", f"{prefix}q\x06\x169",
                    f"{prefix}celeriac.inflight.{consumer.consumer_id}",
                    f"{prefix}celeriac.consumers", f"{prefix}celeriac.consumer_info"}
    consumer.ack(got)
    consumer.close()


# -- revoke, Celery's way ----------------------------------------------------------------------


def test_revocations_are_also_sent_as_celery_pidbox_revokes(broker: RedisBroker,
                                                            prefix: str) -> None:
    listener = broker.connector.client.pubsub()
    listener.psubscribe(f"{prefix}/9.celery.pidbox")
    wait_for(lambda: listener.get_message(timeout=0.1), message="psubscribe confirmation")
    broker.broadcast(REVOKE_CHANNEL, {"ids": ["a", "b"], "terminate": True, "signal": "SIGKILL"},
                     ttl=60)
    msg = wait_for(lambda: listener.get_message(timeout=0.1), message="the pidbox message")
    env = json.loads(msg["data"])
    assert env["properties"]["delivery_info"] == {"exchange": "celery.pidbox",
                                                  "routing_key": ""}
    assert json.loads(base64.b64decode(env["body"])) == {
        "method": "revoke", "arguments": {"task_id": ["a", "b"], "terminate": True,
                                          "signal": "SIGKILL"},
        "destination": None, "pattern": None, "matcher": None}
    listener.close()
    # Our own subscribers see it once (from the broadcast stream, not the pidbox echo).
    sub = broker.subscribe(REVOKE_CHANNEL)
    assert [p["ids"] for p in sub.poll()] == [["a", "b"]]
    assert sub.poll() == []
    sub.close()


def test_celery_pidbox_revoke_reaches_our_subscribers(broker: RedisBroker, prefix: str) -> None:
    sub = broker.subscribe(REVOKE_CHANNEL)
    body = {"method": "revoke", "arguments": {"task_id": "t-9", "terminate": False,
                                              "signal": None},
            "destination": None, "pattern": None, "matcher": None}
    env = {"body": base64.b64encode(json.dumps(body).encode()).decode(),
           "content-encoding": "utf-8", "content-type": "application/json",
           "headers": {"clock": 3, "expires": 0},
           "properties": {"delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                          "delivery_info": {"exchange": "celery.pidbox", "routing_key": ""},
                          "delivery_tag": "x"}}
    other = RedisBroker(broker.url)
    other.connector.client.publish(f"{prefix}/9.celery.pidbox", json.dumps(env))
    found = wait_for(sub.poll, message="the revocation")
    assert found[0]["ids"] == ["t-9"] and found[0]["terminate"] is False
    # Other control commands are not revocations.
    body["method"] = "ping"
    env["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    other.connector.client.publish(f"{prefix}/9.celery.pidbox", json.dumps(env))
    time.sleep(0.1)  # give a wrong translation the chance to show up
    assert sub.poll() == []
    other.close()
    sub.close()


# -- lost replies ------------------------------------------------------------------------------


def test_a_fetch_whose_reply_was_lost_is_given_back(broker: RedisBroker) -> None:
    broker.publish("q", [Message({"n": n}, {}, b"") for n in range(3)])
    consumer = broker.consumer(["q"])
    assert isinstance(consumer, RedisConsumer)
    # The script ran in Redis but its reply never came back (as after a cut connection):
    # two messages sit in the consumer's in-flight hash unknown to it.
    keys, _ = consumer._plans[0]
    broker._run("fetch", FETCH, keys, [2, 1000, repr(time.time()), 1, consumer.consumer_id, "x"])
    consumer._suspect = True
    got = consumer.fetch(10, 5)
    assert [d.message.headers["n"] for d in got] == [0, 1, 2]  # back at the front, in order
    assert [d.delivery_count for d in got] == [1, 1, 1]  # never started: not counted
    consumer.ack(got)
    consumer.close()
    assert broker.queue_size("q") == 0


def inflight(broker: RedisBroker, consumer: RedisConsumer) -> int:
    return int(broker.connector.client.hlen(consumer.inflight))


def test_acks_after_results_ride_with_the_next_fetches(broker: RedisBroker) -> None:
    """ack_after: the finisher runs inside the next fetch, the acks go with the one after;
    close() runs what is still pending, so nothing finished is given back."""
    broker.publish("q", [Message({"n": n}, {}, b"") for n in range(6)])
    consumer = broker.consumer(["q"])
    assert isinstance(consumer, RedisConsumer)
    first = consumer.fetch(2, 5)
    finished: list[int] = []

    def finish() -> None:  # a result store's finisher: its messages are still held
        finished.append(inflight(broker, consumer))

    consumer.ack_after(finish, first)
    assert finished == [] and inflight(broker, consumer) == 2
    second = consumer.fetch(2, 5)
    # It ran during the fetch: after the fetch script (which took two more) was sent,
    # before its reply was read; the first batch was still held.
    assert finished == [4]
    assert [d.message.headers["n"] for d in second] == [2, 3]
    assert inflight(broker, consumer) == 4  # the first batch's acks wait for the next fetch
    consumer.ack_soon(second)
    third = consumer.fetch(2, 5)
    assert [d.message.headers["n"] for d in third] == [4, 5]
    assert inflight(broker, consumer) == 2  # both earlier batches acked with this fetch
    consumer.ack_after(finish, third)
    consumer.close()
    assert finished == [4, 2]  # close() ran it, then acked
    assert inflight(broker, consumer) == 0 and broker.queue_size("q") == 0


@pytest.mark.parametrize("how", ["ack_soon", "ack_after"])
def test_acks_kept_for_later_are_sent_before_a_consumer_waits(broker: RedisBroker,
                                                              how: str) -> None:
    consumer = broker.consumer(["q"])
    assert isinstance(consumer, RedisConsumer)
    assert consumer.fetch(4, 0.05) == []  # its waiter is set up: the next empty fetch waits
    broker.publish("q", [Message({"n": 1}, {}, b"")])
    got = consumer.fetch(4, 5)
    consumer.fetch(4, 0.1)  # reads the wake-up the publish caused; re-arms the wait
    if how == "ack_soon":
        consumer.ack_soon(got)
    else:
        consumer.ack_after(lambda: None, got)  # due only once the next fetch is under way
    seen: list[int] = []
    # While the empty fetch waits, the ack is already done.
    timer = threading.Timer(0.3, lambda: seen.append(inflight(broker, consumer)))
    timer.start()
    assert consumer.fetch(4, 0.6) == []
    timer.join()
    assert seen == [0]
    consumer.close()
    assert broker.queue_size("q") == 0


# -- outages -----------------------------------------------------------------------------------


def test_publish_never_reports_success_while_redis_is_down(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "srv")
    broker = RedisBroker(server.url)
    broker.publish_retry_policy = {"max_retries": 2, "interval_start": 0,
                                   "interval_step": 0.05, "interval_max": 0.1}
    try:
        server.stop()
        with pytest.raises(redis.ConnectionError):
            broker.publish("q", [Message({"n": 1}, {}, b"")])
        # With retries without limit the publish waits for Redis and then succeeds.
        broker.publish_retry_policy = {"max_retries": None, "interval_start": 0,
                                       "interval_step": 0.05, "interval_max": 0.2}
        done = threading.Event()

        def publish() -> None:
            broker.publish("q", [Message({"n": 2}, {}, b"")])
            done.set()

        thread = threading.Thread(target=publish)
        thread.start()
        assert not done.wait(0.5)  # Redis is down: it is still retrying
        server.start()
        thread.join(10)
        assert done.is_set()
        assert broker.queue_size("q") == 1
    finally:
        broker.close()
        server.crash()


def test_recovery_waits_after_a_redis_restart(tmp_path: Path) -> None:
    """Right after Redis restarts, every heartbeat looks old: nobody is declared dead yet."""
    server = PrivateRedis(tmp_path / "srv")
    try:
        broker = RedisBroker(server.url)
        broker.host_id = "elsewhere"  # the consumer's pid cannot be checked from here
        broker.publish("q", [Message({"n": 1}, {}, b"")])
        consumer = broker.consumer(["q"])
        assert len(consumer.fetch(1, 5)) == 1
        # The consumer stays silent for longer than the timeout below (3 s: a restart on a
        # loaded machine can take over a second, and the first check must come before the
        # new server has been up that long).
        time.sleep(3.2)
        server.restart()
        fresh = RedisBroker(server.url)
        assert fresh.connector.server_uptime() < 3.0
        assert fresh.recover_stale(3.0) == 0  # the server has been up for less than 3 s
        wait_for(lambda: fresh.connector.server_uptime() >= 3, 10, 0.1, "an uptime of 3 s")
        assert fresh.recover_stale(3.0) == 1
        fresh.close()
        broker.close()
    finally:
        server.crash()


def test_recovery_requested_while_redis_is_down_happens_later(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "srv")
    try:
        broker = RedisBroker(server.url)
        broker.publish("q", [Message({"n": 1}, {}, b""), Message({"n": 2}, {}, b"")])
        consumer = broker.consumer(["q"])
        held = consumer.fetch(10, 5)
        assert len(held) == 2
        server.stop()
        # A supervisor recovering a dead child while Redis is away is not stopped by it.
        assert broker.recover(consumer.consumer_id, held[0].tag, requeue_running=False) == 0
        server.start()
        broker.heartbeat(["someone"])  # the next beat carries the recovery out
        assert broker.queue_size("q") == 1  # the running one was dropped, as asked
        fresh = broker.consumer(["q"])
        [d] = fresh.fetch(1, 5)
        assert d.message.headers["n"] == 2 and d.delivery_count == 1
        fresh.ack([d])
        fresh.close()
        broker.close()
    finally:
        server.crash()


def test_consumer_keeps_fetching_across_a_restart(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "srv")
    try:
        broker = RedisBroker(server.url)
        consumer = broker.consumer(["q"])
        assert consumer.fetch(1, 0.1) == []  # blocked once: its waiter connections exist
        server.stop()
        assert consumer.fetch(1, 0.3) == []  # no error, just nothing
        server.start()
        RedisBroker(server.url).publish("q", [Message({"n": 1}, {}, b"")])
        got = consumer.fetch(1, 5)
        assert [d.message.headers["n"] for d in got] == [1]
        consumer.ack(got)
        consumer.close()
        broker.close()
    finally:
        server.crash()


def test_envelope_meta_counts_deliveries() -> None:
    raw = encode_envelope(Message({"id": "x"}, {}, b"b"), "q")
    from celeriac.brokers.redis import count_delivery

    twice = count_delivery(count_delivery(raw))
    message, count = decode_envelope(twice)
    assert count == 2 and message == Message({"id": "x"}, {}, b"b")
    assert orjson.loads(twice)["celeriac"]["n"] == 2
