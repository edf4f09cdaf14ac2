"""RabbitMQ (AMQP 0-9-1): Celery's topology and message format, durable by default.

Topology (what Celery 5.7 declares, docs/amqp.md): a durable queue per task queue, a
durable direct exchange of the same name bound with the queue name as routing key, and
messages published to the default exchange with the queue name as routing key. Messages
are persistent, every publish waits for the publisher confirm, consumers ack manually.

How the broker interface maps onto RabbitMQ:

* ``fetch(n)``: ``basic.qos(n)`` + ``basic.consume`` (no-wait) on each queue, the deliveries,
  then ``basic.cancel``. A consumer holds only what it fetched: nothing streams into a
  local buffer between fetches, so priorities, ``queue_size`` and ``purge`` stay exact
  and a long task never holds other messages hostage. When a fetch fills its batch the
  cancel needs no reply, so a busy consumer pays no extra round trip.
* Delivery counts: RabbitMQ only says "redelivered". A message that comes back after its
  consumer's connection died is republished with the count in a header
  (``x-celeriac-deliveries``) and the original acked, so the count survives further
  crashes; returns that must not count (reject with requeue, close, park) republish the
  message unchanged and ack the original (``basic.reject(requeue)`` would mark it
  redelivered).
* Delays (ETA, countdown, ``park``): per-queue delay tiers ``celeriac.delay.<queue>.<k>``,
  each with a queue TTL of 2**k ms that dead-letters back to the queue. A message waits in
  the largest tier not longer than its remaining time, and the consumer that receives it
  early puts it in the next tier; the last 200 ms it waits in the consumer.
  Tiers have a fixed TTL, so they expire strictly in order (per-message TTLs would not).
* A dead consumer: its connection closes and RabbitMQ requeues what it held. So
  ``recover``/``recover_stale`` have nothing to do across processes; within a process
  ``recover`` settles a consumer that is still connected (tests, solo workers).
* Broadcast: a fanout exchange per channel; a stream queue keeps recent broadcasts for
  late subscribers; each subscriber reads the stream once, then its own exclusive queue.
* Dead letters: the durable queue ``celeriac.dead_letters`` behind the fanout exchange
  ``celeriac.dlx`` (also usable as ``x-dead-letter-exchange`` of your queues).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import orjson

from celeriac.brokers import amqp_client as wire
from celeriac.brokers.amqp_client import (
    AMQPError,
    Channel,
    ChannelClosed,
    Connection,
    ConnectionLost,
    Incoming,
)
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

log = logging.getLogger("celeriac.amqp")

# Our headers (stripped before a message is handed out).
H_PROPS = "x-celeriac-props"  # {"extra": non-AMQP properties, "added": [names we set]}
H_COUNT = "x-celeriac-deliveries"  # counted deliveries before this one
H_DUE = "x-celeriac-not-before"  # epoch seconds: not to be handed out before
H_EXPIRATION = "x-celeriac-expiration"  # the expiration property, set aside while delayed
H_SAVED_DEATH = "x-celeriac-death"  # x-death headers the message had before it was delayed
H_DEAD = "x-celeriac-dead-letter"  # {"id", "queue", "reason", "time"}
H_EXPIRES = "x-celeriac-expires"  # broadcasts: epoch seconds
H_BID = "x-celeriac-bid"  # broadcasts: id
H_MARKER = "x-celeriac-marker"  # broadcasts: a subscriber's end-of-replay marker
DEATH_HEADERS = ("x-death", "x-first-death-exchange", "x-first-death-queue",
                 "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue",
                 "x-last-death-reason", "x-delivery-count")

DEAD_LETTER_QUEUE = "celeriac.dead_letters"
DEAD_LETTER_EXCHANGE = "celeriac.dlx"
DELAY_PREFIX = "celeriac.delay."
BROADCAST_PREFIX = "celeriac.broadcast."
MIN_TIER, MAX_TIER = 5, 32  # 32 ms .. 49.7 days per hop
HOLD_WINDOW = 0.2  # due this soon: the consumer keeps it rather than another hop
EARLY_SLACK = 0.0005
# Read-ahead (queues without priorities): a consumer whose recent tasks were short asks
# RabbitMQ for up to this many seconds' worth of them beyond what fetch() was asked for
# (at most READ_AHEAD_MAX messages), so a round trip is paid per batch of short tasks, not
# per few. A long task makes it stop at once: the estimate is per task handed out.
READ_AHEAD_SECONDS = 0.04  # (0.01 measured worse: under CPU contention batches shrank to ~30)
READ_AHEAD_MAX = 512
# Revocations: a poll without a round trip is enough when every delivery this process
# handed out was received before a barrier through the subscriber's queue that is younger
# than this (seconds). Otherwise a poll makes its own round trip.
REVOKE_FRESH = 0.02
QUIET = 0.002  # a fetch with deliveries still counted as on their way waits this long for more

DEFAULT_RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2,
                        "interval_max": 0.2}

_CONSUMERS: weakref.WeakValueDictionary[str, AMQPConsumer] = weakref.WeakValueDictionary()
_REVOKE_SUBSCRIBERS: weakref.WeakSet[AMQPSubscriber] = weakref.WeakSet()
# (pid, monotonic): the latest time a delivery handed out by this process's consumers
# had come in. A revocation poll may skip its round trip only if a barrier was sent
# after that.
_handed_receipt: list[tuple[int, float]] = [(0, 0.0)]


def _received() -> None:
    """A consumer of this process received deliveries: start the revocation barriers now
    (their replies are read by the next poll), so a poll rarely waits a full round trip.

    Called after the deliveries came in (their ``_Held.received`` is earlier): a barrier
    sent before does not cover them, and a poll then makes its own round trip.
    """
    for sub in list(_REVOKE_SUBSCRIBERS):
        sub.kick()


def tier_name(queue: str, k: int) -> str:
    return f"{DELAY_PREFIX}{queue}.{k}"


def tier_for(remaining: float) -> int:
    return max(MIN_TIER, min(MAX_TIER, int(math.log2(max(remaining * 1000.0, 1.0)))))


def _opt_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")


# -- messages <-> AMQP --------------------------------------------------------------------------


def to_wire(message: Message, extra_headers: dict[str, Any] | None = None,
            persistent: bool = True) -> tuple[dict[str, Any], bytes]:
    """AMQP properties for ``message`` (non-AMQP properties ride in a header)."""
    headers = dict(message.headers)
    props: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in message.properties.items():
        if key in wire.PROPERTY_NAMES and key != "headers" and _fits(key, value):
            props[key] = value
        else:
            extra[key] = value
    added = []
    if persistent and props.get("delivery_mode") is None:
        props["delivery_mode"] = 2
        added.append("delivery_mode")
    if extra or added:
        headers[H_PROPS] = {"extra": extra, "added": added}
    if extra_headers:
        headers.update(extra_headers)
    props["content_type"] = message.content_type
    props["content_encoding"] = message.content_encoding
    props["headers"] = headers
    return props, message.body


def _fits(key: str, value: Any) -> bool:
    if value is None:
        return False
    if key in ("delivery_mode", "priority"):
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255
    if key == "timestamp":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str) and len(value.encode()) <= 255


_OURS = "x-celeriac-"  # the prefix of our own headers (H_* above)


def from_wire(props: dict[str, Any], body: bytes) -> tuple[Message, dict[str, Any]]:
    """The Message, and our own headers taken out of it."""
    headers = props.pop("headers", None) or {}
    ours: dict[str, Any] = {}
    # One substring search over the joined names first: most messages carry none of ours,
    # and that is cheaper than a startswith per header (a hit is then looked at exactly).
    if _OURS in "\n".join(headers):
        for key in [k for k in headers if k.startswith(_OURS)]:
            ours[key] = headers.pop(key)
    content_type = props.pop("content_type", None) or "application/json"
    content_encoding = props.pop("content_encoding", None) or "utf-8"
    packed = ours.get(H_PROPS)
    if packed:
        for name in packed.get("added") or ():
            props.pop(name, None)
        props.update(packed.get("extra") or {})
    return Message(headers, props, body, content_type, content_encoding), ours


def _strip_delay(message: Message, ours: dict[str, Any]) -> None:
    """Undo what the trip through the delay tiers added."""
    for key in DEATH_HEADERS:
        message.headers.pop(key, None)
    saved = ours.get(H_SAVED_DEATH)
    if saved:
        message.headers.update(saved)
    expiration = ours.get(H_EXPIRATION)
    if expiration is not None:
        message.properties["expiration"] = expiration


# -- configuration ------------------------------------------------------------------------------


class QueueOptions:
    """How new queues are declared (existing queues are used as they are)."""

    def __init__(self) -> None:
        self.max_priority: int | None = None
        self.queue_type: str | None = None  # "classic" | "quorum"
        self.arguments: dict[str, Any] = {}
        self.dead_letter_exchange = False
        self.durable = True
        self.per_queue: dict[str, dict[str, Any]] = {}  # from task_queues
        self.broadcast_expires = 300.0  # s: x-expires of a worker's broadcast queue

    def for_queue(self, queue: str) -> tuple[dict[str, Any], bool]:
        spec = self.per_queue.get(queue, {})
        args: dict[str, Any] = dict(self.arguments)
        max_priority = spec.get("max_priority", self.max_priority)
        if max_priority:
            args["x-max-priority"] = int(max_priority)
        queue_type = spec.get("queue_type", self.queue_type)
        if queue_type and queue_type != "classic":
            args["x-queue-type"] = queue_type
            args.pop("x-max-priority", None)  # quorum queues have no priorities
        if self.dead_letter_exchange:
            args.setdefault("x-dead-letter-exchange", DEAD_LETTER_EXCHANGE)
        if spec.get("broadcast") and self.broadcast_expires:
            # Not auto-delete: consumers come and go with every fetch. It goes once no
            # worker used it for this long (the worker's supervisor keeps it alive).
            args["x-expires"] = int(self.broadcast_expires * 1000)
        args.update(spec.get("arguments") or {})
        return args, bool(spec.get("durable", self.durable))


class Topology:
    """What one connection has declared (kept per connection: a new one declares again)."""

    def __init__(self) -> None:
        self.queues: set[str] = set()
        self.tiers: dict[str, float] = {}  # tier name -> when declared
        self.exchanges: set[str] = set()


# -- the broker ---------------------------------------------------------------------------------


class AMQPBroker(Broker):
    def __init__(self, url: str = "amqp://", **options: Any) -> None:
        self.url = url
        self.options = options
        query = url.partition("?")[2]
        qopts = dict(p.split("=", 1) for p in query.split("&") if "=" in p) if query else {}
        self.queue_options = QueueOptions()
        self.confirm_publish = True  # a publish returns once RabbitMQ has the message
        # A task's early ack goes with its batch's acks, or within FLUSH_AFTER of its start
        # (docs/amqp.md, "Acks"); False: each one is sent as its task starts.
        self.defer_early_acks = True
        self._apply_options({**qopts, **options})
        self.ssl_options = options.get("ssl")
        self._params = wire.parse_url(
            ";".join(u for u in url.split(";")), self.ssl_options,
            heartbeat=_float_or_none(options.get("heartbeat")),
            connect_timeout=_float_or_none(options.get("connect_timeout")),
        )
        if options.get("publish_retry_policy"):
            self.publish_retry_policy = dict(options["publish_retry_policy"])
        self._lock = threading.RLock()
        self._conn: Connection | None = None
        self._ch: Channel | None = None
        self._topology = Topology()
        self._fast: Channel | None = None  # confirm_publish=False: a channel without confirms
        self._address = 0
        self._pid = os.getpid()
        self.exchanges: dict[str, tuple[str, str]] = {}  # queue -> (exchange, routing key)
        self.routing_specs: dict[str, dict[str, Any]] = {}  # task_queues by name
        self._keep_alive: list[str] = []  # this worker's broadcast queues
        self._kept_alive = 0.0

    def _apply_options(self, opts: dict[str, Any]) -> None:
        qo = self.queue_options
        for key in ("max_priority", "x-max-priority", "queue_max_priority"):
            if opts.get(key) not in (None, ""):
                qo.max_priority = int(opts[key])
        for key in ("queue_type", "x-queue-type"):
            if opts.get(key):
                qo.queue_type = str(opts[key])
        if opts.get("queue_arguments"):
            qo.arguments.update(opts["queue_arguments"])
        if "confirm_publish" in opts:
            self.confirm_publish = _opt_bool(opts["confirm_publish"])
        if "defer_early_acks" in opts:
            self.defer_early_acks = _opt_bool(opts["defer_early_acks"])
        if "dead_letter_exchange" in opts:
            qo.dead_letter_exchange = _opt_bool(opts["dead_letter_exchange"])
        if opts.get("broadcast_queue_expires") not in (None, ""):
            qo.broadcast_expires = float(opts["broadcast_queue_expires"])

    def configure(self, conf: Any) -> None:
        """Settings from the app (the transport options given to the broker win)."""
        qo = self.queue_options
        opts = self.options
        if conf.get("task_queue_max_priority") and "max_priority" not in opts:
            qo.max_priority = int(conf["task_queue_max_priority"])
        if conf.get("task_default_queue_type") and "queue_type" not in opts:
            qo.queue_type = str(conf["task_default_queue_type"])
        heartbeat = conf.get("broker_heartbeat")
        timeout = conf.get("broker_connection_timeout")
        use_ssl = conf.get("broker_use_ssl")
        from urllib.parse import urlsplit

        explicit_ports = [urlsplit(u.strip()).port for u in self.url.split(";") if u.strip()]
        for i, p in enumerate(self._params):
            if (use_ssl and p.ssl is None and p.port == 5672 and i < len(explicit_ports)
                    and explicit_ports[i] is None):
                p.port = 5671  # TLS without a port in the URL: the TLS port (kombu's rule)
            if heartbeat is not None and "heartbeat" not in opts and "heartbeat=" not in self.url:
                p.heartbeat = float(heartbeat)
            if timeout is not None and "connect_timeout" not in opts:
                p.connect_timeout = float(timeout)
            if use_ssl and (p.ssl is None or not self.ssl_options):
                # (amqps:// alone made a default context: broker_use_ssl says which CA, cert)
                p.ssl = wire.make_ssl_context(use_ssl)
                p.server_hostname = p.host
        queues = conf.get("task_queues")
        if queues:
            from celeriac.brokers.amqp_routing import queue_specs

            for spec in queue_specs(queues):
                self.routing_specs[spec["name"]] = spec
                if spec.get("broadcast") and not spec.get("queue"):
                    continue  # a name for workers' own queues (worker_queues), not a queue
                name = spec.get("queue") or spec["name"]
                qo.per_queue[name] = spec
                if spec.get("exchange") is not None:
                    self.exchanges[name] = (spec["exchange"], spec["routing_key"])

    def _learn(self, queue: str) -> None:
        """How to declare a queue not in task_queues: a worker's ``.dq2`` or broadcast queue."""
        if queue in self.queue_options.per_queue:
            return
        from celeriac.brokers.amqp_routing import spec_for

        spec = spec_for(self.routing_specs, queue)
        if spec is not None:
            self.queue_options.per_queue[queue] = spec
            self.exchanges[queue] = (spec["exchange"], spec["routing_key"])

    def worker_queues(self, queues: Sequence[str], hostname: str, direct: bool) -> list[str]:
        """The queues a worker named ``hostname`` consumes for ``-Q queues``, declared.

        A broadcast name becomes the worker's own queue bound to the fanout exchange; with
        ``worker_direct``, ``<hostname>.dq2`` bound to ``C.dq2`` is added (Celery's names).
        Declared here, before the worker starts consuming, so nothing sent after the worker
        is up misses them. This process (the supervisor) then keeps the broadcast queues
        from expiring (``heartbeat``).
        """
        from celeriac.brokers.amqp_routing import worker_queues

        names = worker_queues(self.routing_specs, queues, hostname, direct)
        for name in names:
            self._learn(name)
        self._keep_alive = [n for n in names
                            if self.queue_options.per_queue.get(n, {}).get("broadcast")]

        def action(ch: Channel) -> None:
            for name in names:
                ch = self._ensure_queue(ch, name, self._topology)
                self._ch = ch

        try:
            self._retrying(action, "declare the worker's queues")
            self._kept_alive = time.monotonic()
        except (AMQPError, TimeoutError) as exc:
            # RabbitMQ not reachable yet: the consumers declare them when they connect.
            log.warning("could not declare the queues %s now (%s); the worker's consumers "
                        "will when they connect", names, exc)
        return names

    def heartbeat(self, consumer_ids: Sequence[str]) -> None:
        """Keep this worker's broadcast queues from expiring while the worker lives."""
        expires = self.queue_options.broadcast_expires
        if not self._keep_alive or not expires or (
                time.monotonic() - self._kept_alive < expires / 6):
            return
        self._kept_alive = time.monotonic()

        def action(ch: Channel) -> None:
            for name in self._keep_alive:
                args, durable = self.queue_options.for_queue(name)
                ch.queue_declare(name, durable=durable, arguments=args or None)

        try:
            self._retrying(action, "keep the broadcast queues")
        except AMQPError as exc:
            log.warning("could not redeclare the broadcast queues %s: %s", self._keep_alive, exc)

    # -- connections -----------------------------------------------------------------------------

    def new_connection(self) -> Connection:
        conn, self._address = wire.connect_any(self._params, self._address)
        return conn

    def _channel(self) -> Channel:
        """The publishing channel (confirm mode), connecting if needed. Hold ``_lock``."""
        if os.getpid() != self._pid:  # forked: the parent's socket is not ours
            if self._conn is not None:
                self._conn.abort()
            self._conn = self._ch = None
            self._pid = os.getpid()
        ch = self._ch
        if ch is not None and ch.is_open and not ch.conn.closed:
            return ch
        if self._conn is None or self._conn.closed:
            self._conn = self.new_connection()
            self._topology = Topology()
        ch = self._conn.channel()
        ch.confirm_select()
        self._ch = ch
        return ch

    def _retrying(self, action: Callable[[Channel], Any], what: str,
                  policy: dict[str, float] | None = None) -> Any:
        """Run ``action`` on the publishing channel; on connection loss reconnect and retry."""
        policy = policy or self.publish_retry_policy or DEFAULT_RETRY_POLICY
        retries = int(policy.get("max_retries", 3) or 0)
        interval = float(policy.get("interval_start", 0) or 0)
        step = float(policy.get("interval_step", 0.2) or 0)
        cap = float(policy.get("interval_max", 0.2) or 0)
        attempt = 0
        while True:
            with self._lock:
                try:
                    ch = self._channel()
                    return action(ch)
                except ChannelClosed as exc:
                    self._ch = None
                    self._topology = Topology()
                    if attempt >= 1:
                        raise
                    log.debug("%s: channel closed (%s); retrying on a new channel", what, exc)
                except (ConnectionLost, TimeoutError) as exc:
                    self._drop_connection()
                    if attempt >= retries:
                        raise ConnectionLost(f"{what}: {exc}") from exc
                    log.warning("%s: %s; retrying (%s/%s)", what, exc, attempt + 1, retries)
            attempt += 1
            if interval > 0:
                time.sleep(interval)
            interval = min(cap, interval + step) if cap else interval + step

    def _drop_connection(self) -> None:
        conn, self._conn, self._ch, self._fast = self._conn, None, None, None
        if conn is not None:
            conn.abort()
        self._topology = Topology()

    # -- declarations ----------------------------------------------------------------------------

    def declare_queue(self, ch: Channel, queue: str, topology: Topology) -> None:
        """The queue, as Celery declares it; an existing queue is used as it is."""
        if queue in topology.queues:
            return
        self._learn(queue)
        args, durable = self.queue_options.for_queue(queue)
        exchange, routing_key = self.exchanges.get(queue, (queue, queue))
        frames = [ch.f_queue_declare(queue, durable=durable, arguments=args or None)]
        if exchange and exchange not in topology.exchanges:
            kind = self.queue_options.per_queue.get(queue, {}).get("exchange_type", "direct")
            frames.insert(0, ch.f_exchange_declare(exchange, kind, durable=True))
        if exchange:
            frames.append(ch.f_queue_bind(queue, exchange, routing_key))
        ch.conn.send(b"".join(frames))
        try:
            if exchange and exchange not in topology.exchanges:
                ch._expect([wire.EXCHANGE_DECLARE_OK])
                topology.exchanges.add(exchange)
            ch._expect([wire.QUEUE_DECLARE_OK])
            if exchange:
                ch._expect([wire.QUEUE_BIND_OK])
        except ChannelClosed as exc:
            if exc.code != wire.PRECONDITION_FAILED:
                raise
            # Declared before with other arguments (by Celery, or with other settings):
            # use it as it is.
            log.info("queue %r exists with other arguments (%s); using it as it is",
                     queue, exc.text)
            ch2 = ch.conn.channel()
            try:
                ch2.queue_declare(queue, passive=True)
            finally:
                ch2.close()
            raise _Redo() from exc
        topology.queues.add(queue)

    def _ensure_queue(self, ch: Channel, queue: str, topology: Topology) -> Channel:
        """Declare ``queue`` on ``ch``'s connection; returns the channel to go on with."""
        try:
            self.declare_queue(ch, queue, topology)
            return ch
        except _Redo:
            topology.queues.add(queue)
            return _reopen(ch)

    def declare_tier(self, ch: Channel, queue: str, k: int, topology: Topology) -> str:
        name = tier_name(queue, k)
        declared = topology.tiers.get(name)
        ttl_ms = 2 ** k
        expires_ms = 2 * ttl_ms + 3_600_000
        # Re-declare before the queue could expire as unused (x-expires counts from then).
        if declared is None or time.monotonic() - declared > (expires_ms - ttl_ms) / 2000:
            ch.queue_declare(name, durable=True, arguments={
                "x-message-ttl": ttl_ms, "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": queue, "x-expires": expires_ms})
            topology.tiers[name] = time.monotonic()
        return name

    def declare_dead_letters(self, ch: Channel, topology: Topology) -> None:
        if DEAD_LETTER_QUEUE in topology.queues:
            return
        ch.exchange_declare(DEAD_LETTER_EXCHANGE, "fanout", durable=True)
        ch.queue_declare(DEAD_LETTER_QUEUE, durable=True)
        ch.queue_bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, "")
        topology.queues.add(DEAD_LETTER_QUEUE)

    # -- publishing ------------------------------------------------------------------------------

    def publish(
        self, queue: str, messages: Sequence[Message], *, not_before: float | None = None
    ) -> None:
        if not messages:
            return

        def action(ch: Channel) -> None:
            if not self.confirm_publish:
                fast = self._fast
                if fast is None or not fast.is_open or fast.conn is not ch.conn:
                    fast = self._fast = ch.conn.channel()
                publish_on(self, fast, self._topology, queue, messages, not_before)
                return
            publish_on(self, ch, self._topology, queue, messages, not_before)

        self._retrying(action, f"publish to {queue!r}")

    def publish_raw(self, exchange: str, routing_key: str, messages: Sequence[Message]) -> None:
        """Publish to an exchange (routing: topic/fanout exchanges of ``task_queues``)."""

        def action(ch: Channel) -> None:
            frames = [ch.f_publish(exchange, routing_key, body, props)
                      for props, body in (to_wire(m) for m in messages)]
            ch.publish_confirmed(frames, len(frames))

        self._retrying(action, f"publish to exchange {exchange!r}")

    def publish_to_exchange(self, exchange: str, routing_key: str, messages: Sequence[Message],
                            *, not_before: float | None = None,
                            exchange_type: str | None = None) -> None:
        """Publish through ``exchange`` with ``routing_key`` (task_routes, broadcast, C.dq2).

        The exchange and the ``task_queues`` queues it routes this key to are declared first
        (once per connection). A direct or topic publish that reaches no queue raises
        ``Unroutable``; a fanout (broadcast) one reaching no worker is dropped, as in Celery.
        A delayed message carries its due time: the consumer of each queue it reaches
        moves it to that queue's delay tiers.
        """
        if not messages:
            return
        from celeriac.brokers.amqp_routing import exchange_kind

        kind = exchange_kind(self.routing_specs, exchange, exchange_type)
        mandatory = kind != "fanout"

        def frames_for(ch: Channel) -> list[bytes]:
            delayed = not_before is not None and not_before - time.time() > EARLY_SLACK
            out = []
            for message in messages:
                headers: dict[str, Any] = {}
                if delayed:
                    assert not_before is not None
                    headers[H_DUE] = float(not_before)
                props, body = to_wire(message, headers)
                if delayed and props.get("expiration") is not None:
                    props["headers"][H_EXPIRATION] = props.pop("expiration")
                out.append(ch.f_publish(exchange, routing_key, body, props,
                                        mandatory and ch.confirming))
            return out

        def action(ch: Channel) -> None:
            for attempt in (0, 1):
                ch = self._declare_route(ch, exchange, routing_key, kind, self._topology)
                if not self.confirm_publish:
                    fast = self._fast
                    if fast is None or not fast.is_open or fast.conn is not ch.conn:
                        fast = self._fast = ch.conn.channel()
                    fast.conn.send(b"".join(frames_for(fast)))
                    return
                try:
                    frames = frames_for(ch)
                    ch.publish_confirmed(frames, len(frames))
                    return
                except wire.Unroutable as exc:
                    # Declared queues deleted behind our back? Declare again, once.
                    self._topology = Topology()
                    if attempt:
                        raise wire.Unroutable(
                            exc.code, f"no queue is bound to exchange {exchange!r} ({kind}) "
                            f"for routing key {routing_key!r}: check task_queues/task_routes",
                            exchange, routing_key) from exc

        self._retrying(action, f"publish to exchange {exchange!r}")

    def _declare_route(self, ch: Channel, exchange: str, routing_key: str, kind: str,
                       topology: Topology) -> Channel:
        """Declare ``exchange`` and the configured queues this key reaches through it."""
        from celeriac.brokers.amqp_routing import bound_queues

        if exchange and exchange not in topology.exchanges:
            try:
                ch.exchange_declare(exchange, kind, durable=True)
            except ChannelClosed as exc:
                if exc.code != wire.PRECONDITION_FAILED:
                    raise
                # It exists with other settings (declared by someone else): use it as it is.
                log.info("exchange %r exists with other settings (%s); using it as it is",
                         exchange, exc.text)
                ch = _reopen(ch)
                self._ch = ch
            topology.exchanges.add(exchange)
        for queue in bound_queues(self.routing_specs, exchange, routing_key, kind):
            ch = self._ensure_queue(ch, queue, topology)
            self._ch = ch
        return ch

    # -- consuming -------------------------------------------------------------------------------

    def consumer(self, queues: Sequence[str], consumer_id: str | None = None) -> Consumer:
        return AMQPConsumer(self, list(queues), consumer_id or new_consumer_id())

    def recover(
        self, consumer_id: str, running_tag: str | None = None, requeue_running: bool = True
    ) -> int:
        consumer = _CONSUMERS.get(consumer_id)
        if consumer is None:
            # Another process's consumer: its connection closed with it, and RabbitMQ has
            # already put back what it held.
            return 0
        return consumer.recover(running_tag, requeue_running)

    def recover_stale(self, timeout: float) -> int:
        return 0  # RabbitMQ takes back what a dead connection held, at once

    # -- queues ----------------------------------------------------------------------------------

    def _probe(self, names: Sequence[str], op: str) -> list[int]:
        def action(ch: Channel) -> list[int]:
            def build(name: str) -> Callable[[Channel], bytes]:
                if op == "purge":
                    return lambda c: c._method_frame(50, 30, b"\x00\x00" + wire._shortstr(name)
                                                     + b"\x00")
                return lambda c: c.f_queue_declare(name, passive=True)

            reply = wire.QUEUE_PURGE_OK if op == "purge" else wire.QUEUE_DECLARE_OK
            results = ch.conn.probe([build(n) for n in names], reply)
            counts = []
            for name, res in zip(names, results, strict=True):
                if isinstance(res, ChannelClosed):
                    if res.code != wire.NOT_FOUND:
                        raise res
                    counts.append(0)
                elif op == "purge":
                    counts.append(wire._U32.unpack_from(res, 4)[0])
                else:
                    _q, off = wire._read_shortstr(res, 4)
                    counts.append(wire._U32.unpack_from(res, off)[0])
                if op == "purge":
                    self._topology.tiers.pop(name, None)
            return counts

        result: list[int] = self._retrying(action, f"{op} {names[0]!r}")
        return result

    def _with_tiers(self, queue: str) -> list[str]:
        return [queue, *(tier_name(queue, k) for k in range(MIN_TIER, MAX_TIER + 1))]

    def queue_size(self, queue: str) -> int:
        return sum(self._probe(self._with_tiers(queue), "declare"))

    def purge(self, queue: str) -> int:
        return sum(self._probe(self._with_tiers(queue), "purge"))

    # -- dead letters ----------------------------------------------------------------------------

    def dead_letter(self, message: Message, queue: str, reason: str) -> None:
        info = {"id": uuid.uuid4().hex, "queue": queue, "reason": reason, "time": time.time()}

        def action(ch: Channel) -> None:
            self.declare_dead_letters(ch, self._topology)
            props, body = to_wire(message, {H_DEAD: info})
            props.pop("expiration", None)
            if message.properties.get("expiration") is not None:
                props["headers"][H_EXPIRATION] = message.properties["expiration"]
            ch.publish_confirmed([ch.f_publish("", DEAD_LETTER_QUEUE, body, props, True)], 1)

        self._retrying(action, "dead-letter")

    def _browse_dead(self, ch: Channel, limit: int | None) -> list[tuple[Incoming, DeadLetter]]:
        """Read dead letters without removing them (caller acks or nacks them after)."""
        self.declare_dead_letters(ch, self._topology)
        found: list[tuple[Incoming, DeadLetter]] = []
        while limit is None or len(found) < limit:
            got = ch.get(DEAD_LETTER_QUEUE)
            if got is None:
                break
            found.append((got, _dead_letter_of(got)))
        return found

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        def action(ch: Channel) -> list[DeadLetter]:
            found = self._browse_dead(ch, limit)
            if found:
                ch.conn.send(ch.f_nack(found[-1][0].delivery_tag, multiple=True, requeue=True))
            return [dl for _, dl in found]

        result: list[DeadLetter] = self._retrying(action, "list dead letters")
        return result

    def _settle_dead(self, ids: Sequence[str] | None, replay: bool) -> int:
        if ids is not None and not ids:
            return 0

        def action(ch: Channel) -> int:
            found = self._browse_dead(ch, None)
            wanted = set(ids) if ids is not None else None
            chosen = [(inc, dl) for inc, dl in found if wanted is None or dl.id in wanted]
            if replay and chosen:
                by_queue: dict[str, list[Message]] = {}
                for _, dl in chosen:
                    by_queue.setdefault(dl.queue, []).append(dl.message)
                for queue, msgs in by_queue.items():
                    publish_on(self, ch, self._topology, queue, msgs, None)
            frames = []
            chosen_tags = {inc.delivery_tag for inc, _ in chosen}
            for inc, _ in found:
                if inc.delivery_tag in chosen_tags:
                    frames.append(ch.f_ack(inc.delivery_tag))
                else:
                    frames.append(ch.f_nack(inc.delivery_tag, requeue=True))
            if frames:
                ch.conn.send(b"".join(frames))
                ch.qos(0)  # a round trip: the acks are through before we return
            return len(chosen)

        result: int = self._retrying(action, "settle dead letters")
        return result

    def replay_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        return self._settle_dead(ids, replay=True)

    def purge_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        return self._settle_dead(ids, replay=False)

    # -- broadcast -------------------------------------------------------------------------------

    def declare_broadcast(self, ch: Channel, channel: str, topology: Topology) -> tuple[str, str]:
        exchange = BROADCAST_PREFIX + channel
        stream = exchange + ".log"
        if stream not in topology.queues:
            ch.exchange_declare(exchange, "fanout", durable=True)
            ch.queue_declare(stream, durable=True, arguments={
                "x-queue-type": "stream", "x-max-age": "7D",
                "x-stream-max-segment-size-bytes": 1_000_000})
            ch.queue_bind(stream, exchange, "")
            topology.queues.add(stream)
        return exchange, stream

    def broadcast(self, channel: str, payload: dict[str, Any], ttl: float) -> None:
        body = orjson.dumps(payload, default=str)

        def action(ch: Channel) -> None:
            exchange, _ = self.declare_broadcast(ch, channel, self._topology)
            props = {"content_type": "application/json", "content_encoding": "utf-8",
                     "delivery_mode": 2,
                     "headers": {H_EXPIRES: time.time() + ttl, H_BID: uuid.uuid4().hex}}
            frames = [ch.f_publish(exchange, "", body, props)]
            if channel == REVOKE_CHANNEL:
                # The same revocation as Celery's control.revoke sends it, for Celery workers.
                declare_pidbox(ch, self._topology)
                frames.append(ch.f_publish(PIDBOX_EXCHANGE, "", *_celery_revoke(payload, ttl)))
            ch.publish_confirmed(frames, len(frames))

        self._retrying(action, f"broadcast on {channel!r}")

    def subscribe(self, channel: str) -> Subscriber:
        return AMQPSubscriber(self, channel)

    def close(self) -> None:
        with self._lock:
            conn, self._conn, self._ch = self._conn, None, None
            if conn is not None and os.getpid() == self._pid:
                conn.close()


REVOKE_CHANNEL = "celeriac.revoked"  # control.REVOKE_CHANNEL: bridged to Celery's pidbox
PIDBOX_EXCHANGE = "celery.pidbox"  # fanout, not durable, as Celery declares it
CELERY_REVOKE_TTL = 10800.0  # Celery's REVOKE_EXPIRES (worker_revoke_expires)


def declare_pidbox(ch: Channel, topology: Topology) -> None:
    if PIDBOX_EXCHANGE not in topology.exchanges:
        ch.exchange_declare(PIDBOX_EXCHANGE, "fanout", durable=False)
        topology.exchanges.add(PIDBOX_EXCHANGE)


def _celery_revoke(payload: dict[str, Any], ttl: float) -> tuple[bytes, dict[str, Any]]:
    body = orjson.dumps({
        "method": "revoke",
        "arguments": {"task_id": list(payload.get("ids") or ()),
                      "terminate": bool(payload.get("terminate")),
                      "signal": payload.get("signal") or "SIGTERM"},
        "destination": None, "pattern": None, "matcher": None,
        "ticket": str(uuid.uuid4()), "reply_to": None,
    })
    props = {"content_type": "application/json", "content_encoding": "utf-8",
             "delivery_mode": 2, "headers": {"clock": 1, "expires": time.time() + ttl,
                                             H_BID: "celery"}}
    return body, props


def _celery_revocation(headers: dict[str, Any], body: bytes) -> dict[str, Any] | None:
    """A revoke sent by Celery's ``control.revoke`` (kombu pidbox), as our revocation."""
    if H_BID in headers:
        return None  # our own, seen on our exchange already
    try:
        request = orjson.loads(body)
        if not isinstance(request, dict) or request.get("method") != "revoke":
            return None
        args = request.get("arguments") or {}
        ids = args.get("task_id")
        ids = [ids] if isinstance(ids, str) else list(ids or ())
        return {"ids": [str(i) for i in ids], "terminate": bool(args.get("terminate")),
                "signal": args.get("signal") or "SIGTERM", "time": time.time()}
    except Exception:  # somebody else's control message (ping, inspect...)
        return None


class _Redo(Exception):
    """The channel was closed by a failed declaration: go on with a new one."""


def _reopen(ch: Channel) -> Channel:
    conn = ch.conn
    new = conn.channel()
    if ch.confirming:
        new.confirm_select()
    return new


def _float_or_none(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def publish_on(broker: AMQPBroker, ch: Channel, topology: Topology, queue: str,
               messages: Sequence[Message], not_before: float | None,
               extra: Sequence[dict[str, Any] | None] | None = None) -> Channel:
    """Publish to ``queue`` (or its delay tiers) on ``ch`` and wait for the confirms."""
    new_ch = broker._ensure_queue(ch, queue, topology)
    if new_ch is not ch:
        if broker._ch is ch:
            broker._ch = new_ch
        ch = new_ch
    now = time.time()
    delayed = not_before is not None and not_before - now > EARLY_SLACK
    frames: list[bytes] = []
    for i, message in enumerate(messages):
        headers = dict(extra[i] or {}) if extra else {}
        if delayed:
            assert not_before is not None
            frames.append(_delay_frame(broker, ch, topology, queue, message, not_before, headers))
        else:
            props, body = to_wire(message, headers)
            frames.append(ch.f_publish("", queue, body, props, True))
    if not ch.confirming:  # confirm_publish=False: as Celery publishes (not recommended)
        ch.conn.pump(0)
        ch.check()
        ch.returned.clear()
        ch.conn.send(b"".join(frames))
        return ch
    try:
        ch.publish_confirmed(frames, len(frames))
    except wire.Unroutable:
        # A queue deleted behind our back (or a tier that expired): declare again, once.
        topology.queues.discard(queue)
        topology.tiers.clear()
        return publish_on(broker, ch, topology, queue, messages, not_before, extra)
    return ch


def _delay_frame(broker: AMQPBroker, ch: Channel, topology: Topology, queue: str,
                 message: Message, not_before: float, headers: dict[str, Any]) -> bytes:
    """The publish that keeps ``message`` out of ``queue`` until ``not_before``."""
    remaining = not_before - time.time()
    headers[H_DUE] = float(not_before)
    saved = {k: message.headers[k] for k in DEATH_HEADERS if k in message.headers}
    if saved:
        headers[H_SAVED_DEATH] = saved
    expiration = message.properties.get("expiration")
    props, body = to_wire(message, headers)
    if expiration is not None:
        # Not while it waits: RabbitMQ would drop it, or dead-letter it back early.
        props.pop("expiration", None)
        props["headers"][H_EXPIRATION] = expiration
    if remaining <= HOLD_WINDOW:
        return ch.f_publish("", queue, body, props, True)
    name = broker.declare_tier(ch, queue, tier_for(remaining), topology)
    return ch.f_publish("", name, body, props, True)


def _dead_letter_of(got: Incoming) -> DeadLetter:
    message, ours = from_wire(dict(got.properties), got.body)
    info = ours.get(H_DEAD)
    if info:
        expiration = ours.get(H_EXPIRATION)
        if expiration is not None:
            message.properties["expiration"] = expiration
        return DeadLetter(str(info["id"]), str(info["queue"]), str(info["reason"]),
                          float(info["time"]), message)
    # Dead-lettered by RabbitMQ (a queue with x-dead-letter-exchange = celeriac.dlx).
    headers = message.headers
    deaths = headers.get("x-death") or [{}]
    first = deaths[-1] if isinstance(deaths, list) and deaths else {}
    queue = str(headers.get("x-first-death-queue") or first.get("queue") or "")
    reason = str(headers.get("x-first-death-reason") or first.get("reason") or "dead-lettered")
    stamp = first.get("time")
    when = stamp.timestamp() if isinstance(stamp, datetime) else time.time()
    digest = hashlib.sha1(orjson.dumps([headers, message.properties], default=str)
                          + message.body).hexdigest()[:24]
    for key in DEATH_HEADERS:
        headers.pop(key, None)
    return DeadLetter(f"rmq-{digest}", queue, f"rabbitmq: {reason}", when, message)


# -- the consumer -------------------------------------------------------------------------------


class _Held:
    __slots__ = ("acked", "count", "early", "gen", "incoming", "message", "ours", "queue",
                 "received")

    def __init__(self, incoming: Incoming, message: Message, ours: dict[str, Any], queue: str,
                 count: int, gen: int, received: float) -> None:
        self.incoming, self.message, self.ours = incoming, message, ours
        self.queue, self.count, self.gen = queue, count, gen
        self.received = received  # monotonic: when it came in (before its barrier was sent)
        self.acked = False
        self.early = False  # started without acks_late: acked, or its ack is on its way


class AMQPConsumer(Consumer):
    def __init__(self, broker: AMQPBroker, queues: list[str], consumer_id: str) -> None:
        if not queues:
            raise ImproperlyConfigured("a consumer needs at least one queue")
        self.broker = broker
        self.queues = queues
        self.consumer_id = consumer_id
        self._conn: Connection | None = None
        self._ch: Channel | None = None
        self._topology = Topology()
        self._gen = 0
        self._held: dict[str, _Held] = {}
        self._ready: deque[_Held] = deque()  # received, not yet handed out
        self._ready_sorted = True  # _ready is in delivery-tag order
        self._waiting: list[tuple[float, int, int, _Held]] = []  # due soon: kept here
        self._seq = itertools.count()
        self._qos = -1
        self._rotation = 0
        self._round = 0
        self._lock = threading.RLock()  # bookkeeping (an early ack may come from a thread)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = False
        self._backoff = 0.0
        self._tag_prefix = f"celeriac.{uuid.uuid4().hex[:10]}"
        self._tags: dict[str, str] = {}  # consumer tag -> queue (this round and the last)
        self._per_task: float | None = None  # seconds per delivery handed out (moving avg)
        self._handed: tuple[float, int] | None = None  # (when, how many) the last fetch gave
        self._read_ahead_ok: bool | None = None  # no priority queues among ours
        self._pid = os.getpid()
        # basic.cancel frames of the last round, not sent yet: they go with the next write
        # (at the latest when a task starts), one send fewer between a delivery and its task
        self._cancel_pending = b""
        self._round_tags: list[str] = []  # the consumer tags of the last round
        _CONSUMERS[consumer_id] = self

    # -- connection ------------------------------------------------------------------------------

    def _channel(self) -> Channel:
        ch = self._ch
        if ch is not None and ch.is_open and not ch.conn.closed:
            return ch
        if self._conn is None or self._conn.closed:
            self._lost()
            self._conn = self.broker.new_connection()
            self._topology = Topology()
        ch = self._conn.channel()
        ch.confirm_select()
        with self._lock:  # (a task thread's started() sends under it: never on a stale one)
            self._ch = ch
            self._qos = -1
            self._gen += 1
            self._cancel_pending = b""  # (for a channel that is gone)
        for queue in self.queues:
            ch = self.broker._ensure_queue(ch, queue, self._topology)
            self._ch = ch
        return ch

    def _lost(self) -> None:
        """The connection is gone: RabbitMQ has put back everything it delivered to us."""
        with self._lock:
            self._cancel_pending = b""
            self._held.clear()
            self._ready.clear()
            self._waiting.clear()
            conn, self._conn, self._ch = self._conn, None, None
        if conn is not None:
            conn.abort()

    # -- fetching --------------------------------------------------------------------------------

    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        now = time.monotonic()
        deadline = now + max(0.0, timeout)
        if self._handed is not None:
            when, count = self._handed
            sample = (now - when) / count
            avg = self._per_task
            self._per_task = sample if avg is None or sample > 4 * avg else 0.7 * avg + 0.3 * sample
            self._handed = None
        out = self._fetch(max_count, deadline)
        if out:
            self._handed = (time.monotonic(), len(out))
        return out

    def _fetch(self, max_count: int, deadline: float) -> list[Delivery]:
        while True:
            self._absorb_stragglers()
            out = self._take(max_count)
            if out or max_count <= 0:
                if max_count <= 0:
                    self._idle(deadline)
                return out
            try:
                found = self._round_trip(max_count, deadline)
            except (ConnectionLost, ChannelClosed, TimeoutError) as exc:
                self._on_error(exc, deadline)
                found = False
            if self._drain_wake() or time.monotonic() >= deadline:
                return self._take(max_count)
            if found:
                out = self._take(max_count)
                if out:
                    return out

    def _idle(self, deadline: float) -> None:
        """Wait for a wake-up (``fetch(0, t)``: a threads pool waiting for a free thread)."""
        self._send_cancel()
        while time.monotonic() < deadline:
            if self._drain_wake():
                return
            left = deadline - time.monotonic()
            conn = self._conn
            if conn is not None and not conn.closed:
                try:
                    conn.pump(left, self._wake_r)
                except ConnectionLost:
                    self._lost()
            else:
                _wait_fd(self._wake_r, left)

    def _on_error(self, exc: BaseException, deadline: float) -> None:
        if isinstance(exc, ChannelClosed):
            log.warning("consumer %s: channel closed (%s); reopening", self.consumer_id, exc)
            self._topology = Topology()
            with self._lock:
                self._held.clear()
                self._ready.clear()
                self._waiting.clear()
            self._ch = None
            return
        log.warning("consumer %s: connection lost (%s); reconnecting", self.consumer_id, exc)
        self._lost()
        self._backoff = min(2.0, self._backoff * 2 if self._backoff else 0.1)
        _wait_fd(self._wake_r, max(0.0, min(self._backoff, deadline - time.monotonic())))

    def _drain_wake(self) -> bool:
        woken = False
        while True:
            try:
                if not os.read(self._wake_r, 512):
                    return woken
                woken = True
            except BlockingIOError:
                return woken

    def _absorb_stragglers(self) -> None:
        """Deliveries that came in after a fetch returned (sent before its cancel arrived)."""
        ch = self._ch
        if ch is None or not ch.deliveries:
            return
        got = list(ch.deliveries)
        ch.deliveries.clear()
        received = time.monotonic()
        _received()
        try:
            self._absorb(got, self._tags, ch, received)
        except (ConnectionLost, ChannelClosed, TimeoutError) as exc:
            log.warning("consumer %s: %s", self.consumer_id, exc)
            self._lost()

    def _read_ahead(self, max_count: int) -> int:
        """How many more than ``max_count`` to ask for (short tasks, no priorities)."""
        per_task = self._per_task
        if per_task is None or max_count <= 0:
            return 0
        if self._read_ahead_ok is None:
            qo = self.broker.queue_options
            self._read_ahead_ok = not any(
                qo.for_queue(q)[0].get("x-max-priority") for q in self.queues)
        if not self._read_ahead_ok:
            return 0
        want = min(READ_AHEAD_MAX, int(READ_AHEAD_SECONDS / max(per_task, 1e-6)))
        return max(0, want - max_count)

    def _take(self, max_count: int) -> list[Delivery]:
        with self._lock:
            if self._waiting:
                now = time.time()
                while self._waiting and self._waiting[0][0] <= now + EARLY_SLACK:
                    self._ready.append(heapq.heappop(self._waiting)[3])
                    self._ready_sorted = False
            out: list[Delivery] = []
            latest = 0.0
            while self._ready and len(out) < max_count:
                h = self._ready.popleft()
                if not self._ready:
                    self._ready_sorted = True
                tag = f"{h.gen}:{h.incoming.delivery_tag}"
                self._held[tag] = h
                out.append(Delivery(h.message, h.queue, tag, h.count))
                latest = max(latest, h.received)
            if out:
                pid, before = _handed_receipt[0]
                if pid != self._pid:
                    before = 0.0  # (inherited from the process this one was forked from)
                _handed_receipt[0] = (self._pid, max(latest, before))
            return out

    def _round_trip(self, max_count: int, deadline: float) -> bool:
        """Consume until deliveries arrive (or the deadline); False if none came.

        Each consume is preceded by a passive declare of its queue, whose message count
        says how many deliveries are on their way at once (up to the credit). The round
        ends when those are in and at least one is useful, or the batch is full; then the
        cancel needs no reply. What still comes (read-ahead, or messages published meanwhile)
        is taken by the next fetch (``_absorb_stragglers``). A waiting consumer (an empty
        queue) returns with the first delivery.
        """
        ch = self._channel()
        conn = ch.conn
        self._backoff = 0.0
        self._round += 1
        order = self.queues[self._rotation:] + self.queues[:self._rotation]
        self._rotation = (self._rotation + 1) % len(self.queues)
        frames = []
        pending = self._take_cancel()
        if pending:
            frames.append(pending)
        # Messages kept here until due (a few ms) hold credit too: ask for that much more.
        holding = len(self._waiting)
        target = max_count + self._read_ahead(max_count)
        credit = target + holding
        if credit > max_count + holding:
            credit = 1 << (credit - 1).bit_length()  # fewer qos changes
        credit = min(65535, credit)
        qos_changed = self._qos != credit
        if qos_changed:
            # Applies to the consumes after it (in order on the channel): no need to wait.
            ch.drop_replies(wire.BASIC_QOS_OK)
            frames.append(ch.f_qos(credit))
            self._qos = credit
        ch.drop_replies(wire.QUEUE_DECLARE_OK)
        tags: dict[str, str] = {}
        for i, queue in enumerate(order):
            tag = f"{self._tag_prefix}.{self._round}.{i}"
            tags[tag] = queue
            frames.append(ch.f_queue_declare(queue, passive=True))
            frames.append(ch.f_consume(queue, tag, nowait=True))
        # Tags of earlier rounds stay known a while: their stragglers may still come in.
        if len(self._tags) > 64 * len(order):
            self._tags = dict(list(self._tags.items())[-32 * len(order):])
        self._tags.update(tags)
        self._round_tags = list(tags)
        got: list[Incoming] = list(ch.deliveries)
        ch.deliveries.clear()
        ch.on_delivery = got.append
        try:
            conn.send(b"".join(frames))
            expected: dict[str, int] = {}  # tag -> deliveries on their way at once
            for tag in tags:
                _m, payload, _ = ch._expect([wire.QUEUE_DECLARE_OK])
                _q, off = wire._read_shortstr(payload, 4)
                expected[tag] = min(credit, wire._U32.unpack_from(payload, off)[0])
            useful = 0
            received = 0  # deliveries in this round
            kicked = 0  # how many had come in when the revocation barrier went out
            while True:
                if got:
                    received += len(got)
                    stamp = time.monotonic()
                    for inc in got:
                        if inc.consumer_tag in expected:
                            expected[inc.consumer_tag] -= 1
                    if received >= target or all(n <= 0 for n in expected.values()):
                        # Likely the last of this round: the revocation barrier goes out
                        # now, before these are decoded (its reply overlaps that).
                        _received()
                        kicked = received
                    useful += self._absorb(got, self._tags, ch, stamp)
                    got.clear()
                if useful >= target or self._ready_count() >= target:
                    break
                complete = all(n <= 0 for n in expected.values())
                if useful and complete:
                    break
                now = time.monotonic()
                due = self._next_due()
                if now >= deadline or (due is not None and due <= time.time()):
                    break
                if len(self._waiting) > holding and complete:
                    # A message kept until due took credit: a new round asks for more.
                    break
                left = deadline - now
                if due is not None:
                    left = min(left, max(0.0, due - time.time()))
                if useful:
                    # Some counted messages may have gone to other consumers meanwhile:
                    # once the socket is quiet, the cancel's reply says what else comes.
                    left = min(left, QUIET)
                came = conn.pump(left, self._wake_r)
                if not ch.is_open:
                    ch.check()
                if _readable(self._wake_r) or (useful and not came):
                    break
            if received > kicked:
                # More came in after it: a barrier after the last one.
                _received()
            if all(n <= 0 for n in expected.values()) or self._ready_count() >= target:
                cancel = b"".join(ch.f_cancel(t, nowait=True) for t in tags)
                if self._ready:
                    # No reply needed, and the caller settles or starts what it gets next:
                    # the cancel goes with that write (``_take_cancel``). Deliveries
                    # meanwhile are stragglers, taken by the next fetch.
                    with self._lock:
                        self._cancel_pending += cancel
                else:
                    conn.send(cancel)
                return bool(useful) or bool(self._ready)
            # Interrupted before what was on its way came in (deadline, wake-up): cancel
            # with replies, a barrier, so it is in.
            conn.send(b"".join(ch.f_cancel(t) for t in tags))
            for _ in tags:
                ch._expect([wire.BASIC_CANCEL_OK])
            if got:
                stamp = time.monotonic()
                _received()
                useful += self._absorb(got, self._tags, ch, stamp)
                got.clear()
            return bool(useful) or bool(self._ready)
        finally:
            ch.on_delivery = None
            if got:
                ch.deliveries.extend(got)

    def _ready_count(self) -> int:
        return len(self._ready)

    def _take_cancel(self) -> bytes:
        """The last round's cancel frames, if not sent yet (the caller sends them)."""
        if not self._cancel_pending:
            return b""
        with self._lock:
            data, self._cancel_pending = self._cancel_pending, b""
        return data

    def _send_cancel(self) -> None:
        """Send the last round's cancel now: before a message goes back to a queue (or
        this consumer, still subscribed, would be sent it again) or before waiting."""
        data = self._take_cancel()
        ch = self._ch
        if data and ch is not None and ch.is_open:
            try:
                ch.conn.send(data)
            except ConnectionLost:
                self._lost()

    def _next_due(self) -> float | None:
        return self._waiting[0][0] if self._waiting else None

    def _absorb(self, got: list[Incoming], tags: dict[str, str], ch: Channel,
                received: float) -> int:
        """Turn raw deliveries into held messages; returns how many are ready to hand out.

        ``received``: when they came in (monotonic), taken before the revocation barrier
        for them was sent.
        """
        useful = 0
        gen = self._gen
        for inc in got:
            queue = tags.get(inc.consumer_tag) or inc.routing_key
            message, ours = from_wire(inc.properties, inc.body)
            count = int(ours.get(H_COUNT) or 0) + 1
            if inc.redelivered:
                # Back from a consumer that died holding it: it may have run. Count it, in
                # a header that survives the next crash too.
                self._requeue(ch, queue, [(inc, message, ours)], counted=True)
                continue
            due = ours.get(H_DUE)
            if due is not None:
                remaining = float(due) - time.time()
                if remaining > HOLD_WINDOW:
                    self._repark(ch, queue, inc, message, ours, float(due))
                    continue
                h = _Held(inc, message, ours, queue, count, gen, received)
                _strip_delay(message, ours)
                if remaining > EARLY_SLACK:
                    with self._lock:
                        heapq.heappush(self._waiting,
                                       (float(due), -message.priority, next(self._seq), h))
                    continue
            else:
                h = _Held(inc, message, ours, queue, count, gen, received)
            with self._lock:
                self._ready.append(h)
            useful += 1
        return useful

    def _requeue(self, ch: Channel, queue: str,
                 items: Sequence[tuple[Incoming, Message, dict[str, Any]]], counted: bool) -> None:
        """Put messages back in ``queue`` (at its end), then ack the deliveries.

        The last message is published after the acks of the others: its confirm is their
        barrier. On a quorum queue (RabbitMQ 3.10, rabbit_fifo_client) a channel with 32
        commands to the queue in flight keeps further acks to itself until enough are
        applied; if the connection closes first (a consumer closing after its give-back),
        the kept acks are dropped and RabbitMQ returns those messages, which then exist
        twice. A publish sent after the acks is confirmed once the queue has applied what
        the channel sent before it, and by then the channel has sent what it kept. The
        last ack follows no barrier, but it is one command sent when the channel has next
        to nothing in flight, so it is sent at once. Classic queues: the same messages in
        the same order, at the cost of a second confirm.
        """
        extra = []
        for inc, _m, ours in items:
            past = int(ours.get(H_COUNT) or 0) + (1 if counted else 0)
            if inc.redelivered and not counted:
                past += 1
            headers: dict[str, Any] = {H_COUNT: past} if past else {}
            for key in (H_DUE, H_EXPIRATION, H_SAVED_DEATH):
                if key in ours:
                    headers[key] = ours[key]
            extra.append(headers)
        messages = [m for _, m, _ in items]
        on = ch
        if len(items) > 1:
            self._publish(ch, queue, messages[:-1], None, extra[:-1])
            ch.conn.send(b"".join(ch.f_ack(inc.delivery_tag) for inc, _, _ in items[:-1]))
            on = self._ch or ch  # (a failed declaration may have replaced the channel)
        self._publish(on, queue, messages[-1:], None, extra[-1:])
        ch.conn.send(ch.f_ack(items[-1][0].delivery_tag))

    def _repark(self, ch: Channel, queue: str, inc: Incoming, message: Message,
                ours: dict[str, Any], due: float) -> None:
        _strip_delay(message, ours)
        past = int(ours.get(H_COUNT) or 0)
        self._publish(ch, queue, [message], due, [{H_COUNT: past} if past else {}])
        ch.conn.send(ch.f_ack(inc.delivery_tag))

    def _publish(self, ch: Channel, queue: str, messages: Sequence[Message],
                 not_before: float | None, extra: Sequence[dict[str, Any]]) -> None:
        new = publish_on(self.broker, ch, self._topology, queue, messages, not_before, extra)
        if new is not ch:
            self._ch = new

    # -- settling --------------------------------------------------------------------------------

    def _pop_live(self, deliveries: Sequence[Delivery]) -> list[_Held]:
        """The deliveries still held on the current channel (others went back already)."""
        out = []
        with self._lock:
            for d in deliveries:
                h = self._held.pop(d.tag, None)
                if h is not None and h.gen == self._gen:
                    out.append(h)
        return out

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        # Decided and sent under the lock: a task thread's started() may ack a lower tag
        # meanwhile, and a multiple ack sent before it would make that one unknown.
        with self._lock:
            held = [h for h in self._pop_live(deliveries) if not h.acked]
            ch = self._ch
            if not held or ch is None or not ch.is_open:
                return  # (a lost connection: they are back in their queues)
            try:
                tags = [h.incoming.delivery_tag for h in held]
                top = max(tags)
                if self._unsettled_below(top, set(tags)):
                    frames = b"".join(ch.f_ack(t) for t in tags)
                else:
                    frames = ch.f_ack(top, multiple=True)  # one frame for the lot
                ch.conn.send(self._take_cancel() + frames)
            except ConnectionLost:
                self._lost()

    def _unsettled_below(self, top: int, acking: set[int]) -> bool:
        """Whether a delivery on this channel other than ``acking``, with a tag below
        ``top``, is still unsettled (then a ``multiple`` ack up to ``top`` would settle it)."""
        gen = self._gen
        with self._lock:
            for h in self._held.values():
                tag = h.incoming.delivery_tag
                if tag < top and h.gen == gen and not h.acked and tag not in acking:
                    return True
            if any(h.incoming.delivery_tag < top and h.gen == gen
                   for _, _, _, h in self._waiting):
                return True
            ready = self._ready
            if not ready:
                return False
            if self._ready_sorted:
                # In delivery order (tags only grow on a channel): the first is the lowest.
                first = ready[0]
                return first.incoming.delivery_tag < top and first.gen == gen
            return any(h.incoming.delivery_tag < top and h.gen == gen for h in ready)

    def started(self, delivery: Delivery, requeue_if_lost: bool, ack_now: bool = False) -> None:
        """The task starts: ack it unless it must come back if this process dies.

        With ``defer_started`` (a worker whose flusher calls ``ack_started`` while a task
        runs), the ack is not sent here unless ``ack_now``: it goes with the batch's other
        acks, one frame for the lot, or from ``ack_started`` if the task is still running
        then. RabbitMQ spends ~20 us per ack frame, a fifth of what a whole short task
        costs it.
        """
        with self._lock:  # (decided and sent as one: see ack())
            ch = self._ch
            if ch is None or not ch.is_open:
                return
            # The last round's cancel goes now at the latest, so nothing more streams in
            # while a task runs (with the ack: one write).
            frames = self._take_cancel()
            h = self._held.get(delivery.tag)
            if (not requeue_if_lost and h is not None and not h.acked and not h.early
                    and h.gen == self._gen):
                h.early = True
                if not (self.defer_started and self.broker.defer_early_acks) or ack_now:
                    h.acked = True
                    frames += ch.f_ack(h.incoming.delivery_tag)
                # (else: early, not acked yet; ack() or ack_started() sends it)
            if frames:
                with contextlib.suppress(ConnectionLost):
                    ch.conn.send(frames)

    def ack_started(self) -> None:
        """Send the early acks ``started`` left for later, of tasks still running."""
        with self._lock:
            # Held (handed out, not settled), started early, ack not sent: the running task.
            pending = [h for h in self._held.values()
                       if h.early and not h.acked and h.gen == self._gen]
            ch = self._ch
            if not pending or ch is None or not ch.is_open:
                return
            for h in pending:
                h.acked = True
            with contextlib.suppress(ConnectionLost):
                ch.conn.send(self._take_cancel()
                             + b"".join(ch.f_ack(h.incoming.delivery_tag) for h in pending))

    def give_back_read_ahead(self) -> int:
        """Requeue the read-ahead (received, not handed out), not counted as a delivery.

        Called from the worker's flusher while a task runs long: the short tasks read
        ahead for it would otherwise wait behind it. Messages kept until due (ETA within
        HOLD_WINDOW) stay.
        """
        ch = self._ch
        if ch is None or not ch.is_open:
            return 0
        try:
            # The last round's subscriptions cancelled with replies: after a cancel-ok no
            # more deliveries come for it, so what was still on its way is in now.
            self._take_cancel()
            for tag in self._round_tags:
                ch.cancel(tag)
            self._absorb_stragglers()
            with self._lock:
                held = [h for h in self._ready if h.gen == self._gen]
                self._ready.clear()
                self._ready_sorted = True
            ch = self._ch
            if not held or ch is None or not ch.is_open:
                return 0
            return self._give_back(ch, held)
        except (ConnectionLost, ChannelClosed) as exc:
            log.warning("consumer %s: could not give back the read-ahead (%s); the broker "
                        "requeues it", self.consumer_id, exc)
            self._lost()
            return 0

    def reject(self, deliveries: Sequence[Delivery], requeue: bool) -> None:
        self._send_cancel()
        held = [h for h in self._pop_live(deliveries) if not h.acked]
        if not held:
            return
        ch = self._ch
        if ch is None or not ch.is_open:
            return
        try:
            held = self._ack_early(ch, held)
            if requeue:
                self._give_back(ch, held)
            else:
                ch.conn.send(b"".join(ch.f_reject(h.incoming.delivery_tag, False) for h in held))
        except (ConnectionLost, ChannelClosed) as exc:
            log.warning("consumer %s: could not settle (%s); the broker requeues them",
                        self.consumer_id, exc)
            self._lost()

    def _ack_early(self, ch: Channel, held: Sequence[_Held]) -> list[_Held]:
        """Ack those started with an early ack still on its way (they never go back to the
        queue, as if acked at their start); returns the others."""
        early = [h for h in held if h.early]
        if not early:
            return list(held)
        with self._lock:
            for h in early:
                h.acked = True
        ch.conn.send(b"".join(ch.f_ack(h.incoming.delivery_tag) for h in early))
        return [h for h in held if not h.early]

    def _give_back(self, ch: Channel, held: Sequence[_Held], running: str | None = None,
                   requeue_running: bool = True) -> int:
        """Requeue held messages in order, grouped by queue (``running`` counts)."""
        count = 0
        by_queue: dict[str, list[_Held]] = {}
        for h in held:
            by_queue.setdefault(h.queue, []).append(h)
        for queue, group in by_queue.items():
            for counted in (False, True):
                part = [h for h in group
                        if (running is not None and f"{h.gen}:{h.incoming.delivery_tag}"
                            == running) == counted]
                if counted and not requeue_running:
                    if part:
                        ch.conn.send(b"".join(ch.f_ack(h.incoming.delivery_tag) for h in part))
                    continue
                if part:
                    items = [(h.incoming, h.message, self._ours_for_requeue(h)) for h in part]
                    self._requeue(ch, queue, items, counted=counted)
                    count += len(part)
        return count

    @staticmethod
    def _ours_for_requeue(h: _Held) -> dict[str, Any]:
        ours = {H_COUNT: h.count - 1}
        if H_DUE in h.ours and h.message.headers.get(H_DUE) is None:
            # Kept here until due: it goes back with its due time.
            ours[H_DUE] = h.ours[H_DUE]
        return ours

    def park(self, delivery: Delivery, not_before: float) -> None:
        self._send_cancel()
        held = self._pop_live([delivery])
        if not held or held[0].acked:
            return
        h = held[0]
        ch = self._ch
        if ch is None or not ch.is_open:
            return
        try:
            past = h.count - 1
            self._publish(ch, h.queue, [h.message], not_before, [{H_COUNT: past} if past else {}])
            ch.conn.send(ch.f_ack(h.incoming.delivery_tag))
        except (ConnectionLost, ChannelClosed) as exc:
            log.warning("consumer %s: could not park (%s); the broker requeues it",
                        self.consumer_id, exc)
            self._lost()

    def recover(self, running_tag: str | None, requeue_running: bool) -> int:
        """Settle everything this (same-process) consumer holds, as if it had died."""
        self._send_cancel()
        self._absorb_stragglers()
        with self._lock:
            held = [h for h in self._held.values() if h.gen == self._gen and not h.acked]
            held += [h for h in self._ready if h.gen == self._gen]
            held += [h for _, _, _, h in self._waiting if h.gen == self._gen]
            self._held.clear()
            self._ready.clear()
            self._waiting.clear()
        ch = self._ch
        if not held or ch is None or not ch.is_open:
            return 0
        return self._give_back(ch, self._ack_early(ch, held), running_tag, requeue_running)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"w")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            ch = self._ch
            if ch is not None and ch.is_open:
                # Stop deliveries before giving back (those on their way are absorbed): a
                # consumer still subscribed is sent more. (On quorum queues the give-back's
                # own acks need a barrier before the connection closes: ``_requeue``.)
                self._take_cancel()  # (these tags are among those cancelled here)
                for tag in list(self._tags):
                    ch.cancel(tag)
            self.recover(None, True)
            ch = self._ch
            if ch is not None and ch.is_open:
                ch.drop_replies(wire.BASIC_QOS_OK)  # (replies to qos changes not waited for)
                ch.qos(0)  # a round trip: our acks are through before the goodbye
                if ch.deliveries:  # the last stragglers: they go back uncounted too
                    self.recover(None, True)
                    ch.qos(0)
        except (AMQPError, TimeoutError) as exc:
            log.warning("consumer %s: closing: %s", self.consumer_id, exc)
        finally:
            if self._conn is not None:
                self._conn.close()
            self._conn = self._ch = None
            _CONSUMERS.pop(self.consumer_id, None)
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)


def _readable(fd: int) -> bool:
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _wait_fd(fd: int, timeout: float) -> None:
    import select

    if timeout <= 0:
        return
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.poll(int(timeout * 1000))


# -- broadcast subscriber -----------------------------------------------------------------------


class AMQPSubscriber(Subscriber):
    def __init__(self, broker: AMQPBroker, channel: str) -> None:
        self.broker = broker
        self.channel = channel
        self._conn: Connection | None = None
        self._ch: Channel | None = None
        self._queue = ""
        self._pending: list[tuple[float, str, bytes]] = []  # (expires, bid, body)
        self._seen: dict[str, float] = {}  # bid -> expires
        self._retry_at = 0.0
        self._sync_lock = threading.Lock()
        self._kicked: float | None = None  # a barrier sent (monotonic), reply not read yet
        self._synced = 0.0  # when the last barrier whose reply came in was sent
        try:
            self._setup()
        except (ConnectionLost, ChannelClosed, TimeoutError) as exc:
            # Not fatal: poll() sets it up once the broker is back (what was kept meanwhile
            # is replayed then).
            log.warning("broadcast subscriber %r: %s; will retry", channel, exc)
            self._retry_at = time.monotonic() + 1.0

    def _setup(self) -> None:
        conn = self.broker.new_connection()
        ch = conn.channel()
        ch.confirm_select()
        topology = Topology()
        exchange, stream = self.broker.declare_broadcast(ch, self.channel, topology)
        self._queue, _, _ = ch.queue_declare("", durable=False, exclusive=True, auto_delete=True)
        ch.queue_bind(self._queue, exchange, "")
        if self.channel == REVOKE_CHANNEL:
            # Revocations sent by Celery clients reach us too.
            declare_pidbox(ch, topology)
            ch.queue_bind(self._queue, PIDBOX_EXCHANGE, "")
        # What the stream kept: read it up to a marker we put at its end just now.
        marker = uuid.uuid4().hex
        got: list[Incoming] = []
        ch.on_delivery = got.append
        ch.qos(500)
        ch.consume(stream, f"replay.{marker}", arguments={"x-stream-offset": "first"})
        ch.publish_confirmed([ch.f_publish("", stream, b"", {"headers": {H_MARKER: marker}})], 1)
        done = False
        deadline = time.monotonic() + 30
        while not done:
            for inc in got:
                headers = inc.properties.get("headers") or {}
                if headers.get(H_MARKER) == marker:
                    done = True
                elif H_BID in headers:
                    self._keep(headers, inc.body)
            if got:
                ch.conn.send(ch.f_ack(got[-1].delivery_tag, multiple=True))
                got.clear()
            if not done:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replaying broadcasts of {self.channel!r} timed out")
                conn.pump(deadline - time.monotonic())
        ch.cancel(f"replay.{marker}")
        got.clear()
        ch.on_delivery = None
        ch.consume(self._queue, f"live.{marker}", no_ack=True)
        self._conn, self._ch = conn, ch
        self._kicked = None
        if self.channel == REVOKE_CHANNEL:
            _REVOKE_SUBSCRIBERS.add(self)

    def _keep(self, headers: dict[str, Any], body: bytes) -> None:
        bid = str(headers.get(H_BID))
        if bid in self._seen:
            return
        expires = float(headers.get(H_EXPIRES) or 0)
        self._seen[bid] = expires
        self._pending.append((expires, bid, body))

    def kick(self) -> None:
        """Send a barrier now, without waiting for its reply (the next poll reads it).

        Called by this process's consumers right after deliveries came in: the barrier
        then covers every revocation confirmed before those tasks were received.
        """
        if not self._sync_lock.acquire(blocking=False):
            return  # a poll is under way in another thread
        try:
            ch = self._ch
            if self._kicked is not None or ch is None or not ch.is_open or ch.conn.closed:
                return
            self._send_barrier(ch)
        except AMQPError:
            self._kicked = None
            self._ch = None  # poll() reconnects
        finally:
            self._sync_lock.release()

    def poll(self) -> list[dict[str, Any]]:
        with self._sync_lock:
            return self._poll()

    def _send_barrier(self, ch: Channel) -> None:
        """A barrier (passive declare of our queue) not waited for: a later poll reads it."""
        self._kicked = time.monotonic()
        ch.conn.send(ch.f_queue_declare(self._queue, passive=True))

    def _barrier(self, ch: Channel) -> None:
        """A round trip through our queue: whatever it had is delivered before the reply.

        Revocations in a worker process: a barrier sent after every delivery this process
        handed out had come in, less than REVOKE_FRESH ago, is enough (no new round trip).
        The consumer sends one (``kick``) as deliveries come in; its reply is read here.
        """
        ch.conn.pump(0)  # what came in meanwhile (perhaps the reply to a kick)
        if self._kicked is not None and any(r[0] == wire.QUEUE_DECLARE_OK for r in ch._replies):
            ch._expect([wire.QUEUE_DECLARE_OK])
            self._synced, self._kicked = self._kicked, None
        pid, receipt = _handed_receipt[0]
        if self.channel == REVOKE_CHANNEL and pid == os.getpid():
            age = time.monotonic() - self._synced
            if receipt <= self._synced and age < REVOKE_FRESH:
                if self._kicked is None and age >= REVOKE_FRESH / 4:
                    # The next barrier goes out now and its reply is read by a later poll:
                    # a worker taking batch after batch from its read-ahead never waits.
                    self._send_barrier(ch)
                return
            if self._kicked is not None and self._kicked >= receipt:
                ch._expect([wire.QUEUE_DECLARE_OK])  # that one covers them: its reply
                self._synced, self._kicked = self._kicked, None
                if time.monotonic() - self._synced < REVOKE_FRESH:
                    return
        if self._kicked is not None:
            ch._expect([wire.QUEUE_DECLARE_OK])  # (an older one: out of the way first)
            self._kicked = None
        sent = time.monotonic()
        ch.queue_declare(self._queue, passive=True)
        self._synced = sent

    def _poll(self) -> list[dict[str, Any]]:
        ch = self._ch
        try:
            if ch is None or not ch.is_open or ch.conn.closed:
                if time.monotonic() < self._retry_at:
                    return []
                self._retry_at = time.monotonic() + 1.0
                self._reconnect()
                ch = self._ch
            assert ch is not None
            self._barrier(ch)
        except (ConnectionLost, ChannelClosed, TimeoutError) as exc:
            log.warning("broadcast subscriber %r: %s; reconnecting", self.channel, exc)
            self._ch = None
            return []
        while ch.deliveries:
            inc = ch.deliveries.popleft()
            headers = inc.properties.get("headers") or {}
            if inc.exchange == PIDBOX_EXCHANGE:
                found = _celery_revocation(headers, inc.body)
                if found is not None:
                    # The pidbox "expires" header bounds the request's delivery (kombu: a
                    # second), not how long the revocation holds: that is the worker's
                    # business (worker_revoke_expires), as with Celery's own workers.
                    self._pending.append((time.time() + CELERY_REVOKE_TTL, uuid.uuid4().hex,
                                          orjson.dumps(found)))
                continue
            self._keep(headers, inc.body)
        now = time.time()
        out = [orjson.loads(body) for expires, _, body in self._pending if expires >= now]
        self._pending.clear()
        if len(self._seen) > 1000:
            self._seen = {b: e for b, e in self._seen.items() if e >= now}
        return out

    def _reconnect(self) -> None:
        if self._conn is not None:
            self._conn.abort()
        self._kicked = None
        self._setup()

    def close(self) -> None:
        conn, self._conn, self._ch = self._conn, None, None
        if conn is not None:
            conn.close()
