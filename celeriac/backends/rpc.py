"""``rpc://``: results travel back to the caller as AMQP messages, as Celery's rpc backend.

Wire format (Celery's): the worker publishes the result document to the default exchange
with routing key = the task's ``reply_to`` and ``correlation_id`` = the task id; the
caller consumes its reply queue (named after the app's oid: durable, auto-delete,
``x-expires`` = result_expires) and keeps the latest document of each task. So the caller
sees every state the worker sends: STARTED, custom progress states, RETRY and the final
one. Results are consumed once, by the caller that sent the task.

Unlike Celery's, this backend also does:

* groups (``save_group``/``restore_group``): one durable queue per group holding the
  document (``celeriac.group.<id>``), read without consuming it;
* chords (Celery's refuses them): each header result is published to the chord's durable
  queue, whose message count is the join counter; the header task that completes it
  claims the chord by declaring an exclusive lock queue, reads the parts and sends the
  body. No polling task (``chord_unlock``), no extra store; docs/amqp.md has the design.

The URL is ``rpc://`` (the broker URL is the app's ``broker_url``) or ``rpc+amqp://...``
(an explicit broker, as the conformance suite uses it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from celeriac import states
from celeriac.backends.base import (
    CHORD_CLAIM_SECONDS,
    ChordJoin,
    ResultBackend,
    TaskMeta,
    Waiter,
)
from celeriac.brokers import amqp_client as wire
from celeriac.brokers.amqp_client import (
    AMQPError,
    Channel,
    ChannelClosed,
    Connection,
    ConnectionLost,
    Incoming,
)
from celeriac.exceptions import ImproperlyConfigured, TimeoutError
from celeriac.protocol import serializers

log = logging.getLogger("celeriac.rpc")

H_EXPIRES = "x-celeriac-expires"
GROUP_PREFIX = "celeriac.group."
CHORD_PREFIX = "celeriac.chord."
SLICE = 0.05  # a waiter holds the reading side at most this long at a time


def _declared_count(payload: bytes) -> int:
    """The message count of a queue.declare-ok."""
    _name, off = wire._read_shortstr(payload, 4)
    return int(wire._U32.unpack_from(payload, off)[0])


class _Side:
    """One connection and channel, reconnected on demand."""

    def __init__(self, backend: RPCBackend, confirm: bool) -> None:
        self.backend = backend
        self.confirm = confirm
        self.lock = threading.RLock()
        self.conn: Connection | None = None
        self.ch: Channel | None = None

    def channel(self) -> Channel:
        ch = self.ch
        if ch is not None and ch.is_open and not ch.conn.closed:
            return ch
        if self.conn is None or self.conn.closed:
            params = self.backend.params()
            self.conn, _ = wire.connect_any(params)
            self.backend._on_reconnect(self)
        ch = self.conn.channel()
        if self.confirm:
            ch.confirm_select()
        self.ch = ch
        return ch

    def drop(self) -> None:
        conn, self.conn, self.ch = self.conn, None, None
        if conn is not None:
            conn.abort()

    def close(self) -> None:
        conn, self.conn, self.ch = self.conn, None, None
        if conn is not None:
            conn.close()


class RPCBackend(ResultBackend):
    wants_reply_to = True

    def __init__(self, url: str = "rpc://", *, serializer: str = "json",
                 expires: float | None = 86400.0, accept: Sequence[str] = ("json",),
                 persistent: bool | None = None, broker_url: str | None = None,
                 **options: Any) -> None:
        super().__init__(url, serializer=serializer, expires=expires, accept=accept)
        if url.startswith("rpc+"):
            broker_url = url[len("rpc+"):]
        self.broker_url = broker_url
        self.options = options
        self.persistent = bool(persistent)
        self.oid = str(uuid.uuid4())  # our own reply queue (results with no reply_to)
        self._pub = _Side(self, confirm=True)
        self._sub = _Side(self, confirm=False)
        self._cond = threading.Condition()
        self._pumping = False
        self._results: dict[str, tuple[TaskMeta, float | None]] = {}
        self._queues: list[str] = []  # reply queues we consume (in this process)
        self._declared_groups: set[str] = set()
        self._fast: Channel | None = None  # no confirms: transient results
        self._claims: dict[str, tuple[Channel, list[Incoming], list[Incoming],
                                      dict[str, Any]]] = {}

    # -- configuration ---------------------------------------------------------------------------

    def configure(self, conf: Any) -> None:
        if self.broker_url is None:
            self.broker_url = conf.get("broker_url")
        if conf.get("result_persistent") is not None and "persistent" not in self.options:
            self.persistent = bool(conf.get("result_persistent"))
        self.options.setdefault("heartbeat", conf.get("broker_heartbeat"))
        self.options.setdefault("connect_timeout", conf.get("broker_connection_timeout"))
        if conf.get("broker_use_ssl"):
            self.options.setdefault("ssl", conf.get("broker_use_ssl"))

    def params(self) -> list[wire.Params]:
        url = self.broker_url
        if isinstance(url, list | tuple):
            url = ";".join(url)
        if not url or str(url).split("://", 1)[0].split("+")[-1] not in ("amqp", "amqps",
                                                                           "pyamqp"):
            raise ImproperlyConfigured(
                f"result_backend={self.url!r} needs an AMQP broker (broker_url is {url!r}); "
                "use rpc:// with broker_url=amqp://..., or rpc+amqp://host/vhost"
            )
        hb = self.options.get("heartbeat")
        ct = self.options.get("connect_timeout")
        return wire.parse_url(str(url).split("?", 1)[0], self.options.get("ssl"),
                              heartbeat=float(hb) if hb is not None else None,
                              connect_timeout=float(ct) if ct is not None else None)

    def _on_reconnect(self, side: _Side) -> None:
        if side is self._sub:
            queues, self._queues = self._queues, []
            self._consuming_after_reconnect = queues
        else:
            self._declared_groups.clear()

    # -- the caller's side: reply queues ---------------------------------------------------------

    def _queue_args(self) -> dict[str, Any] | None:
        return {"x-expires": int(self.expires * 1000)} if self.expires else None

    def on_task_call(self, task_id: str, reply_to: str) -> None:
        if reply_to in self._queues:
            return
        with self._sub.lock:
            self._consume(reply_to)

    def _consume(self, queue: str) -> Channel:
        """Declare and consume ``queue`` (hold ``_sub.lock``)."""
        ch = self._sub.channel()
        pending = getattr(self, "_consuming_after_reconnect", None)
        if pending:
            self._consuming_after_reconnect = []
            for q in pending:
                if q != queue:
                    self._consume(q)
        if queue not in self._queues:
            ch.queue_declare(queue, durable=True, auto_delete=True, arguments=self._queue_args())
            ch.on_delivery = self._absorb
            ch.consume(queue, f"rpc.{queue}", no_ack=True)
            self._queues.append(queue)
        return ch

    def _absorb(self, inc: Incoming) -> None:
        props = inc.properties
        try:
            content_type = props.get("content_type") or self.serializer.content_type
            meta = serializers.loads(inc.body, content_type,
                                     props.get("content_encoding") or "utf-8", self.accept)
            if not isinstance(meta, dict):
                raise ValueError("result document is not an object")
        except Exception as exc:
            log.error("Dropped an undecodable result message (%s): %r", exc, inc.body[:200])
            return
        task_id = str(meta.get("task_id") or props.get("correlation_id") or "")
        if not task_id:
            return
        headers = props.get("headers") or {}
        expires = headers.get(H_EXPIRES)  # (earlier celeriac workers sent it: honoured)
        if expires is None and self.expires:
            expires = time.time() + self.expires
        with self._cond:
            self._results[task_id] = (meta, float(expires) if expires is not None else None)

    def _sync(self, timeout: float = 0.0, barrier: bool = True) -> None:
        """Read what has arrived; with ``barrier``, a round trip per reply queue, so nothing
        in flight is missed; then wait up to ``timeout`` for more."""
        with self._cond:
            while self._pumping:
                # Another thread reads: its results are ours too.
                self._cond.wait(SLICE)
                if timeout <= 0:
                    return
                timeout = 0.0
            self._pumping = True
        try:
            with self._sub.lock:
                try:
                    ch = self._consume(self._queues[0] if self._queues else self.oid)
                    if timeout <= 0 and not barrier:
                        ch.conn.pump(0)
                    elif timeout <= 0:
                        frames = b"".join(ch.f_queue_declare(q, passive=True)
                                          for q in self._queues)
                        ch.conn.send(frames)
                        for _ in self._queues:
                            ch._expect([wire.QUEUE_DECLARE_OK])
                    else:
                        ch.conn.pump(min(timeout, SLICE))
                except (ConnectionLost, ChannelClosed, TimeoutError) as exc:
                    log.warning("rpc results: %s; reconnecting", exc)
                    self._sub.drop()
        finally:
            with self._cond:
                self._pumping = False
                self._cond.notify_all()

    def _lookup(self, task_id: str) -> TaskMeta | None:
        found = self._results.get(task_id)
        if found is None:
            return None
        meta, expires = found
        if expires is not None and expires < time.time():
            del self._results[task_id]
            return None
        return dict(meta)

    # -- the interface ---------------------------------------------------------------------------

    def _put(self, items: Sequence[tuple[str, str, bytes]], ttl: float | None) -> None:
        raise NotImplementedError  # store() is overridden

    def _fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        raise NotImplementedError

    def _remove(self, keys: Sequence[str]) -> None:
        raise NotImplementedError

    def waiter(self) -> Waiter:
        raise NotImplementedError

    def store(self, metas: Sequence[TaskMeta]) -> None:
        if not metas:
            return
        frames_by: list[tuple[str, dict[str, Any], bytes]] = []
        own = False  # stored to our own queue: read back here, so confirmed first
        for meta in metas:
            doc = dict(meta)
            reply_to = doc.pop("_reply_to", None)
            if not reply_to:
                # No caller to answer (a document stored outside a task): our own queue.
                reply_to = self.oid
                own = True
                if self.oid not in self._queues:
                    with self._sub.lock:
                        self._consume(self.oid)
            # No per-message TTL (as Celery): RabbitMQ spends ~10 us more per message with
            # one, and a reply queue nobody reads expires as a whole (x-expires). The reader
            # times a result's expiry from when it came in.
            props: dict[str, Any] = {
                "correlation_id": doc["task_id"],
                "content_type": self.serializer.content_type,
                "content_encoding": self.serializer.content_encoding,
                "delivery_mode": 2 if self.persistent else 1,
                "priority": 0,
                "headers": {},
            }
            frames_by.append((str(reply_to), props, self.encode(doc)))

        def action(ch: Channel) -> None:
            if self.persistent or own:
                frames = [ch.f_publish("", rk, body, props) for rk, props, body in frames_by]
                ch.publish_confirmed(frames, len(frames))
                return
            # Transient results (Celery's default): sent as Celery sends them, without
            # waiting for a confirm (one round trip less per batch of results).
            fast = self._fast_channel(ch)
            ch.conn.pump(0)  # what the server sent meanwhile (a heartbeat, an error)
            fast.check()
            ch.conn.send(b"".join(fast.f_publish("", rk, body, props)
                                  for rk, props, body in frames_by))

        self._publishing(action, "store results")

    def _fast_channel(self, ch: Channel) -> Channel:
        fast = self._fast
        if fast is None or not fast.is_open or fast.conn is not ch.conn:
            fast = self._fast = ch.conn.channel()
        return fast

    def _publishing(self, action: Any, what: str) -> Any:
        for attempt in range(4):
            with self._pub.lock:
                try:
                    return action(self._pub.channel())
                except (ConnectionLost, TimeoutError) as exc:
                    self._pub.drop()
                    if attempt == 3:
                        raise
                    log.warning("rpc %s: %s; retrying", what, exc)
            time.sleep(0.1 * (attempt + 1))
        return None  # pragma: no cover

    def get(self, task_id: str) -> TaskMeta | None:
        self._sync()
        with self._cond:
            return self._lookup(task_id)

    def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskMeta]:
        self._sync()
        out = {}
        with self._cond:
            for task_id in task_ids:
                meta = self._lookup(task_id)
                if meta is not None:
                    out[task_id] = meta
        return out

    def forget(self, task_id: str) -> None:
        self._sync()  # what is on its way is forgotten too
        with self._cond:
            self._results.pop(task_id, None)

    def wait(self, task_ids: Sequence[str], timeout: float | None = None,
             interval: float = 1.0) -> Iterator[TaskMeta]:
        pending = list(dict.fromkeys(task_ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        # No round trip: waiting reads the reply queue until the results are in, and one
        # stored already is on its way to us (we consume the queue since the call).
        self._sync(barrier=False)
        while True:
            ready = []
            with self._cond:
                for task_id in list(pending):
                    meta = self._lookup(task_id)
                    if meta is not None and meta.get("status") in states.READY_STATES:
                        pending.remove(task_id)
                        ready.append(meta)
            yield from ready
            if not pending:
                return
            left = SLICE if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("The operation timed out.")
            self._sync(min(left, SLICE))

    def cleanup(self) -> int:
        return 0  # results expire with their messages and their queue

    # -- groups ----------------------------------------------------------------------------------

    def _group_queue(self, ch: Channel, group_id: str) -> str:
        name = GROUP_PREFIX + group_id
        if name not in self._declared_groups:
            ch.queue_declare(name, durable=True, arguments=self._queue_args())
            self._declared_groups.add(name)
        return name

    def save_group(self, group_id: str, result: Any) -> None:
        body = self.encode({"result": result})
        expires_at = time.time() + self.expires if self.expires else None

        def action(ch: Channel) -> None:
            name = self._group_queue(ch, group_id)
            ch.queue_purge(name)
            props: dict[str, Any] = {"delivery_mode": 2,
                                     "content_type": self.serializer.content_type,
                                     "headers": {H_EXPIRES: expires_at} if expires_at else {}}
            if self.expires:
                props["expiration"] = str(int(self.expires * 1000))
            ch.publish_confirmed([ch.f_publish("", name, body, props)], 1)

        self._publishing(action, "save group")

    def restore_group(self, group_id: str) -> Any | None:
        def action(ch: Channel) -> Any | None:
            name = GROUP_PREFIX + group_id
            peek = ch.conn.channel()
            try:
                got = peek.get(name)
            except ChannelClosed as exc:
                if exc.code == wire.NOT_FOUND:
                    return None
                raise
            try:
                if got is None:
                    return None
                expires = (got.properties.get("headers") or {}).get(H_EXPIRES)
                if expires is not None and float(expires) < time.time():
                    return None
                return self.decode(got.body).get("result")
            finally:
                with contextlib.suppress(AMQPError):
                    if got is not None:
                        peek.conn.send(peek.f_nack(got.delivery_tag, requeue=True))
                    peek.close()

        return self._publishing(action, "restore group")

    def delete_group(self, group_id: str) -> None:
        def action(ch: Channel) -> None:
            name = GROUP_PREFIX + group_id
            other = ch.conn.channel()
            try:
                other.queue_delete(name)
            except ChannelClosed as exc:
                if exc.code != wire.NOT_FOUND:
                    raise
            else:
                other.close()
            self._declared_groups.discard(name)

        self._publishing(action, "delete group")

    # -- chords ----------------------------------------------------------------------------------
    #
    # Per chord ``<gid>``, all durable queues that expire with the results:
    #   celeriac.chord.<gid>        one message per header result: the join counter is its
    #                               message count, kept by RabbitMQ;
    #   celeriac.chord.<gid>.size   size + chord_add messages: the target, as a count too;
    #   celeriac.chord.<gid>.state  one document {claim, done, version};
    #   celeriac.chord.<gid>.lock   exclusive queue: a short critical section;
    #   celeriac.chord.<gid>.claim  exclusive queue: the claimer lives (RabbitMQ deletes it
    #                               with the claimer's connection).
    # A part costs one round trip (declare the size, publish, declare the parts: both counts
    # come back); only the part that reaches the target takes the lock, reads the parts
    # (kept unacked: if the claimer dies they are back), dedupes them and claims.

    def _names(self, group_id: str) -> tuple[str, str, str, str, str]:
        base = CHORD_PREFIX + group_id
        return base, base + ".size", base + ".state", base + ".lock", base + ".claim"

    def _chord_lock(self, ch: Channel, group_id: str, timeout: float) -> Channel | None:
        """A channel holding the chord's lock (hold ``_pub.lock``), or None after ``timeout``."""
        name = self._names(group_id)[3]
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            lock_ch = ch.conn.channel()
            try:
                lock_ch.queue_declare(name, durable=False, exclusive=True, auto_delete=True)
                return lock_ch
            except ChannelClosed as exc:
                if exc.code != wire.RESOURCE_LOCKED:
                    raise
            if time.monotonic() > deadline:
                return None
            self._pub.lock.release()
            try:
                time.sleep(pause)
            finally:
                self._pub.lock.acquire()
            pause = min(0.02, pause * 2)

    def _chord_unlock(self, lock_ch: Channel, group_id: str) -> None:
        with contextlib.suppress(AMQPError, TimeoutError):
            lock_ch.queue_delete(self._names(group_id)[3])
            lock_ch.close()

    def _chord_state(self, ch: Channel, group_id: str) -> tuple[dict[str, Any], list[Incoming]]:
        """The state document, read under the lock (its messages stay unacked)."""
        name = self._names(group_id)[2]
        ch.queue_declare(name, durable=True, arguments=self._queue_args())
        found: list[Incoming] = []
        while (inc := ch.get(name)) is not None:
            found.append(inc)
        docs = [self.decode(inc.body) for inc in found]
        best = max(docs, key=lambda d: int(d.get("version", 0)),
                   default={"claim": None, "done": False, "version": 0})
        return best, found

    def _chord_write_state(self, ch: Channel, group_id: str, doc: dict[str, Any],
                           old: list[Incoming]) -> None:
        doc = {**doc, "version": int(doc.get("version", 0)) + 1}
        if not ch.confirming:
            ch.confirm_select()
        ch.publish_confirmed([ch.f_publish("", self._names(group_id)[2], self.encode(doc),
                                           {"delivery_mode": 2})], 1)
        if old:
            ch.conn.send(ch.f_ack(old[-1].delivery_tag, multiple=True))

    def _declare_counters(self, ch: Channel, group_id: str) -> None:
        parts, size, _, _, _ = self._names(group_id)
        frames = [ch.f_queue_declare(q, durable=True, arguments=self._queue_args())
                  for q in (parts, size)]
        ch.conn.send(b"".join(frames))
        for _ in frames:
            ch._expect([wire.QUEUE_DECLARE_OK])

    def _claimer_alive(self, ch: Channel, group_id: str) -> bool:
        [res] = ch.conn.probe([lambda c: c.f_queue_declare(self._names(group_id)[4],
                                                           passive=True)],
                              wire.QUEUE_DECLARE_OK)
        if isinstance(res, ChannelClosed):
            return res.code != wire.NOT_FOUND  # 405: locked by a live connection
        return True  # (declared by this very connection)

    def chord_set_size(self, group_id: str, size: int) -> None:
        parts, size_q, _, _, _ = self._names(group_id)

        def action(ch: Channel) -> None:
            lock_ch = self._chord_lock(ch, group_id, 60.0)
            if lock_ch is None:
                raise TimeoutError(f"chord {group_id}: its lock stayed taken for 60s")
            try:
                lock_ch.confirm_select()
                self._declare_counters(lock_ch, group_id)
                lock_ch.queue_purge(parts)  # a new run of the same chord starts from nothing
                lock_ch.queue_purge(size_q)
                self._add_size(lock_ch, size_q, int(size))
                doc, old = self._chord_state(lock_ch, group_id)
                self._chord_write_state(lock_ch, group_id,
                                        {"claim": None, "done": False,
                                         "version": doc.get("version", 0)}, old)
            finally:
                self._chord_unlock(lock_ch, group_id)

        self._publishing(action, "chord size")

    def _add_size(self, ch: Channel, size_q: str, count: int) -> None:
        for start in range(0, count, 1000):
            n = min(1000, count - start)
            ch.publish_confirmed([ch.f_publish("", size_q, b"", {"delivery_mode": 2})
                                  for _ in range(n)], n)

    def chord_add(self, group_id: str, count: int = 1) -> None:
        def action(ch: Channel) -> None:
            self._declare_counters(ch, group_id)
            self._add_size(ch, self._names(group_id)[1], int(count))

        self._publishing(action, "chord add")

    def chord_part_done(self, group_id: str, task_id: str, index: int | None, state: str,
                        result: Any, claim_seconds: int = CHORD_CLAIM_SECONDS
                        ) -> ChordJoin | None:
        parts_q, size_q, _, _, _ = self._names(group_id)
        body = self.encode({"part": [1, task_id, state, result], "index": index})

        def action(ch: Channel) -> ChordJoin | None:
            args = self._queue_args()
            # The part, confirmed (then it is counted); the target's count on the way.
            ch.conn.send(ch.f_queue_declare(size_q, durable=True, arguments=args)
                         + ch.f_queue_declare(parts_q, durable=True, arguments=args)
                         + ch.f_publish("", parts_q, body, {"delivery_mode": 2}))
            last = ch.publish_seq
            _m, p1, _ = ch._expect([wire.QUEUE_DECLARE_OK])
            ch._expect([wire.QUEUE_DECLARE_OK])
            ch.wait_until(lambda: ch.confirmed_upto >= last, 30, "publisher confirm")
            need = _declared_count(p1)
            if need == 0:
                return None  # no size: not a chord we know (or finished and removed)
            _m, p2, _ = ch.call(ch.f_queue_declare(parts_q, passive=True),
                                wire.QUEUE_DECLARE_OK)
            count = _declared_count(p2)
            if need == 0 or count < need:
                return None  # not complete yet (or no size: not a chord we know)
            return self._try_claim(ch, group_id, float(claim_seconds))

        found: ChordJoin | None = self._publishing(action, "chord part")
        return found

    def _try_claim(self, ch: Channel, group_id: str, wait: float) -> ChordJoin | None:
        parts_q, size_q, _, _, claim_q = self._names(group_id)
        lock_ch = self._chord_lock(ch, group_id, wait)
        if lock_ch is None:
            log.warning("chord %s: could not take its lock in %.0fs", group_id, wait)
            return None
        claimed = False
        old: list[Incoming] = []
        held: list[Incoming] = []
        reader: Channel | None = None
        try:
            doc, old = self._chord_state(lock_ch, group_id)
            if doc.get("done"):
                return None
            if doc.get("claim") and self._claimer_alive(lock_ch, group_id):
                return None
            need = _declared_count(lock_ch.call(
                lock_ch.f_queue_declare(size_q, passive=True), wire.QUEUE_DECLARE_OK)[1])
            count = _declared_count(lock_ch.call(
                lock_ch.f_queue_declare(parts_q, passive=True), wire.QUEUE_DECLARE_OK)[1])
            if need == 0 or count < need:
                return None
            # Take every part (unacked: RabbitMQ gives them back if we die).
            reader = ch.conn.channel()
            reader.on_delivery = held.append
            reader.qos(0)
            reader.consume(parts_q, "claim")
            reader.wait_until(lambda: len(held) >= count, 60, "chord parts")
            reader.cancel("claim")
            members: dict[str, tuple[float, bytes, list[Any]]] = {}
            for inc in held:
                item = self.decode(inc.body)
                part, idx = item["part"], item.get("index")
                member = f"{part[1]}:{'+inf' if idx is None else int(idx)}"
                order = float("inf") if idx is None else float(idx)
                members.setdefault(member, (order, inc.body, part))
            if len(members) < need:
                return None  # duplicates made the count: the parts go back below
            reader.queue_declare(claim_q, durable=False, exclusive=True, auto_delete=True)
            token = uuid.uuid4().hex
            self._chord_write_state(lock_ch, group_id,
                                    {"claim": token, "done": False,
                                     "version": doc.get("version", 0)}, old)
            old = []
            ordered = sorted(members.values(), key=lambda m: (m[0], m[1]))
            self._claims[token] = (reader, held, [], doc)
            claimed = True
            return ChordJoin(group_id, token,
                             [(str(p[1]), str(p[2]), p[3]) for _, _, p in ordered])
        finally:
            with contextlib.suppress(AMQPError, TimeoutError):
                if old:
                    lock_ch.conn.send(lock_ch.f_nack(old[-1].delivery_tag, multiple=True,
                                                     requeue=True))
                if not claimed and reader is not None:
                    reader.on_delivery = None
                    if held:
                        reader.conn.send(reader.f_nack(held[-1].delivery_tag, multiple=True,
                                                       requeue=True))
                    reader.close()
            self._chord_unlock(lock_ch, group_id)

    def chord_extend(self, join: ChordJoin, seconds: int) -> bool:
        claim = self._claims.get(join.token)
        return claim is not None and claim[0].is_open and not claim[0].conn.closed

    def chord_finish(self, join: ChordJoin) -> bool:
        parts_q, size_q, _, _, claim_q = self._names(join.group_id)
        with self._pub.lock:
            claim = self._claims.pop(join.token, None)
            if claim is None:
                return False
            reader, held = claim[0], claim[1]
            if not reader.is_open or reader.conn.closed:
                return False
            lock_ch = self._chord_lock(reader, join.group_id, 60.0)
            if lock_ch is None:
                return False
            try:
                doc, old = self._chord_state(lock_ch, join.group_id)
                if doc.get("claim") != join.token or doc.get("done"):
                    if old:
                        lock_ch.conn.send(lock_ch.f_nack(old[-1].delivery_tag, multiple=True,
                                                         requeue=True))
                    return False
                self._chord_write_state(lock_ch, join.group_id,
                                        {"claim": None, "done": True,
                                         "version": doc.get("version", 0)}, old)
                if held:
                    reader.conn.send(reader.f_ack(held[-1].delivery_tag, multiple=True))
                reader.queue_delete(parts_q)
                reader.queue_delete(size_q)
                reader.queue_delete(claim_q)
                reader.close()
                return True
            except (AMQPError, TimeoutError) as exc:
                log.warning("chord %s: finishing failed: %s", join.group_id, exc)
                return False
            finally:
                self._chord_unlock(lock_ch, join.group_id)

    def close(self) -> None:
        self._pub.close()
        self._sub.close()
