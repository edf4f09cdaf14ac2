"""The Redis result backend: Celery's keys and JSON documents; waiting by pub/sub.

A result is written as Celery writes it: in one ``MULTI``, ``SET celery-task-meta-<id>
<doc> PX <result_expires>`` and ``PUBLISH celery-task-meta-<id> <doc>``, so a real Celery
client's ``AsyncResult.get()`` sees it at once, and ours does the same: it subscribes to
the task's channel, reads the key once (closing the race with a result written before the
subscription), then waits for the published document. No polling; a re-read every
``interval`` seconds is only a safety net.

Writes retry on connection errors (a worker that stored results during an outage stores
them when Redis is back; they are never dropped). Chord bookkeeping uses Celery's keys
(``celery-taskset-meta-<gid>.j/.s/.t/.d/.c``) with one atomic script per header task, so
Celery and celeriac workers can share a chord.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis

from celeriac import states
from celeriac.backends.base import (
    CHORD_CLAIM_SECONDS,
    GROUP_KEY_PREFIX,
    TASK_KEY_PREFIX,
    ChordJoin,
    ResultBackend,
    TaskMeta,
    Waiter,
)
from celeriac.brokers.redis_client import (
    CONNECTION_ERRORS,
    RedisConnector,
    check_exec,
    own_connection,
)
from celeriac.exceptions import TimeoutError

log = logging.getLogger("celeriac.redis")

_BASE_OPTIONS = ("serializer", "expires", "accept")
_CHUNK = 1000

# Record one header task's result; the part that completes the chord claims the callback.
# KEYS: .j .t .s .d <group key> .c; ARGV: task id, encoded [1, id, state, result], index,
# expires, claim seconds, claim token. Returns {ready, extra, size, claimed} or {-1} when
# the chord already finished (a late duplicate).
CHORD_PART = """
if redis.call('GET', KEYS[6]) == 'done' then return {-1, 0, 0, 0} end
local member = ARGV[1] .. ':' .. ARGV[3]
if redis.call('SISMEMBER', KEYS[4], member) == 0 then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
  redis.call('SADD', KEYS[4], member)
end
local ready = redis.call('ZCARD', KEYS[1])
local expires = tonumber(ARGV[4])
if expires > 0 then
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], expires) end
end
local extra = redis.call('GET', KEYS[2]) or '0'
local size = redis.call('GET', KEYS[3])
local claimed = 0
if size and ready == tonumber(size) + tonumber(extra) then
  if redis.call('SET', KEYS[6], ARGV[6], 'NX', 'EX', tonumber(ARGV[5])) then claimed = 1 end
end
return {ready, extra, size or '', claimed}
"""

# Keep (or take back) the claim while publishing the callback.
CHORD_EXTEND = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then return redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2])) end
if (not owner) and redis.call('EXISTS', KEYS[2]) == 1 then
  if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then return 1 end
end
return 0
"""

# The callback was sent: drop the chord's data, leave a "done" mark for late duplicates.
CHORD_FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('SET', KEYS[1], 'done', 'EX', tonumber(ARGV[2]))
return 1
"""


class RedisWaiter(Waiter):
    """Wakes on any result published under the backend's key prefix."""

    def __init__(self, backend: RedisBackend) -> None:
        self.pubsub = backend.connector.client.pubsub()
        self.pubsub.psubscribe(backend.prefix + TASK_KEY_PREFIX + "*")

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if msg is not None and msg["type"] == "pmessage":
                return
            if time.monotonic() >= deadline:
                return

    def close(self) -> None:
        self.pubsub.close()


class _Listener:
    """A pub/sub connection of wait()'s own, read directly (without redis-py's PubSub).

    Reused: ``release`` unsubscribes without waiting for the confirmations, and the next
    ``subscribe`` reads past whatever the connection still had to say.
    """

    CONFIRM_WITHIN = 10.0  # seconds for a subscription to be confirmed

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.conn = own_connection(client)
        self.conn.connect()  # explicitly: a Sentinel-managed connection asks for the master

    def subscribe(self, channels: list[bytes]) -> None:
        conn = self.conn
        for start in range(0, len(channels), _CHUNK):
            conn.send_command("SUBSCRIBE", *channels[start:start + _CHUNK])
        wanted = set(channels)
        limit = time.monotonic() + self.CONFIRM_WITHIN
        while wanted:
            reply = self.read(max(0.0, limit - time.monotonic()))
            if reply is None:
                if time.monotonic() >= limit:
                    raise redis.exceptions.TimeoutError("no subscribe confirmation")
                continue
            if reply[0] == b"subscribe":
                wanted.discard(reply[1])

    def read(self, timeout: float) -> Any:
        """The next pub/sub reply ([kind, channel, data]), or None after ``timeout`` s."""
        conn = self.conn
        if not conn.can_read(timeout):
            return None
        # push_request: hiredis hands pub/sub replies over as push notifications, which
        # redis-py would otherwise pass to a handler and read on past.
        return conn.read_response(push_request=True)

    def release(self) -> None:
        self.conn.send_command("UNSUBSCRIBE")

    def close(self) -> None:
        try:
            self.conn.disconnect()
        except Exception:
            pass


class RedisBackend(ResultBackend):
    def __init__(self, url: str = "redis://localhost:6379/0", **options: Any) -> None:
        base = {k: options.pop(k) for k in _BASE_OPTIONS if k in options}
        super().__init__(url, **base)
        self.connector = RedisConnector(url, options, setting="result_backend")
        prefix = self.connector.keyprefix
        if prefix and prefix[-1] not in ":_-.":
            prefix += "_"  # as Celery does with the same option
        self.prefix = prefix
        opts = self.connector.options
        retries = opts.get("max_retries", opts.get("result_backend_max_retries"))
        self.store_attempts: int | None = None if retries is None else int(retries) + 1
        self.chord_expires = int(opts.get("chord_expires") or self.expires or 86400)
        self._listeners: list[_Listener] = []  # idle pub/sub connections for wait()
        self._listeners_pid = os.getpid()
        self._lock = threading.Lock()
        self._scripts: dict[str, Any] = {}

    # -- primitives --------------------------------------------------------------------

    def _writes(self, chunk: Sequence[tuple[str, str, bytes]], ttl: float | None
                ) -> list[tuple[Any, ...]]:
        """MULTI, SET + PUBLISH each, EXEC: sent in one write on the lane."""
        prefix = self.prefix
        px = max(1, int(ttl * 1000)) if ttl else None
        commands: list[tuple[Any, ...]] = [("MULTI",)]
        for key, _status, doc in chunk:
            name = prefix + key
            commands.append(("SET", name, doc, "PX", px) if px else ("SET", name, doc))
            commands.append(("PUBLISH", name, doc))
        commands.append(("EXEC",))
        return commands

    def store_soon(self, metas: Sequence[TaskMeta]) -> Callable[[], None] | None:
        if not metas:
            return None
        items = [(TASK_KEY_PREFIX + m["task_id"], m["status"], self.encode(m)) for m in metas]
        if len(items) > _CHUNK:
            self._put(items, self.expires)
            return None
        commands = self._writes(items, self.expires)
        connector = self.connector
        try:
            connector.send(commands)
        except CONNECTION_ERRORS as exc:
            connector.on_connection_error(exc)
            self._put(items, self.expires)  # retried as store() retries
            return None

        def finish() -> None:
            try:
                check_exec(connector.receive(len(commands))[-1])
            except CONNECTION_ERRORS as exc:
                connector.on_connection_error(exc)
                self._put(items, self.expires)  # idempotent: written again until stored

        return finish

    def _put(self, items: Sequence[tuple[str, str, bytes]], ttl: float | None) -> None:
        execute = self.connector.execute

        def write(client: redis.Redis, chunk: Sequence[tuple[str, str, bytes]]) -> None:
            check_exec(execute(self._writes(chunk, ttl))[-1])

        for start in range(0, len(items), _CHUNK):
            chunk = items[start:start + _CHUNK]
            # Idempotent, so retried for as long as it takes (result_backend_max_retries
            # bounds it): a result is never dropped because Redis was away for a while.
            self.connector.call(lambda c, chunk=chunk: write(c, chunk),  # type: ignore[misc]
                                attempts=self.store_attempts, what="store results",
                                interval_step=0.1, interval_max=2.0)

    def _fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        execute = self.connector.execute
        for start in range(0, len(keys), _CHUNK):
            names = [self.prefix + k for k in keys[start:start + _CHUNK]]
            # On the lane, like the writes: a read sees this thread's own writes (after a
            # failover a pooled connection may still read from the demoted master).
            out.extend(self.connector.call(
                lambda c, names=names: execute([("MGET", *names)])[0],  # type: ignore[misc]
                attempts=5, what="read results"))
        return out

    def _remove(self, keys: Sequence[str]) -> None:
        if keys:
            names = [self.prefix + k for k in keys]
            self.connector.call(lambda c: c.delete(*names), attempts=5, what="delete results")

    def waiter(self) -> Waiter:
        return RedisWaiter(self)

    def close(self) -> None:
        with self._lock:
            listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.close()
        self.connector.close()

    # -- waiting -----------------------------------------------------------------------

    def _take_listener(self) -> _Listener:
        client = self.connector.client
        with self._lock:
            if self._listeners_pid != os.getpid():
                self._listeners, self._listeners_pid = [], os.getpid()  # a parent's sockets
            while self._listeners:
                listener = self._listeners.pop()
                if listener.client is client:
                    return listener
                listener.close()  # from before a failover
        return _Listener(client)

    def _give_listener(self, listener: _Listener) -> None:
        try:
            listener.release()
        except Exception:
            listener.close()
            return
        with self._lock:
            if self._listeners_pid == os.getpid() and len(self._listeners) < 8:
                self._listeners.append(listener)
                return
        listener.close()

    def wait(
        self, task_ids: Sequence[str], timeout: float | None = None, interval: float = 1.0
    ) -> Iterator[TaskMeta]:
        """Yield each task's document once ready: subscribe, read once, then wait on pub/sub."""
        pending = list(dict.fromkeys(task_ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        if not pending:
            return
        channels = {(self.prefix + TASK_KEY_PREFIX + t).encode(): t for t in pending}
        listener: _Listener | None = None
        healthy = False
        try:
            while pending:
                if listener is None:
                    listener = self._subscribe(channels, pending, deadline)
                # Read once after subscribing: a result stored before is not published again.
                for task_id, meta in self.get_many(pending).items():
                    if meta.get("status") in states.READY_STATES and task_id in pending:
                        pending.remove(task_id)
                        yield meta
                if not pending:
                    break
                next_read = time.monotonic() + interval
                while pending:
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        raise TimeoutError("The operation timed out.")
                    if now >= next_read:
                        break  # the safety re-read
                    until = next_read if deadline is None else min(next_read, deadline)
                    try:
                        reply = listener.read(max(0.0, until - now))
                    except CONNECTION_ERRORS as exc:
                        self.connector.on_connection_error(exc)
                        listener.close()
                        listener = None
                        time.sleep(min(0.2, max(0.0, until - time.monotonic())))
                        break
                    if reply is None or reply[0] != b"message":
                        continue
                    found = channels.get(reply[1])
                    if found is None or found not in pending:
                        continue
                    meta = self.decode(reply[2])
                    if meta.get("status") in states.READY_STATES:
                        pending.remove(found)
                        yield meta
            healthy = True
        except (GeneratorExit, TimeoutError):
            # The caller stopped at a yield (get() of one task does), or we gave up: no
            # reply was half read, so the connection can serve the next wait.
            healthy = True
            raise
        finally:
            if listener is not None:
                if healthy:
                    self._give_listener(listener)
                else:
                    listener.close()

    def _subscribe(self, channels: dict[bytes, str], pending: list[str],
                   deadline: float | None) -> _Listener:
        """A pub/sub connection subscribed (confirmed) to the pending tasks' channels."""
        while True:
            listener = self._take_listener()
            try:
                listener.subscribe([c for c, t in channels.items() if t in pending])
                return listener
            except CONNECTION_ERRORS as exc:
                listener.close()
                self.connector.on_connection_error(exc)
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError("The operation timed out.") from exc
                time.sleep(0.2)

    # -- chords (Celery's keys; atomic, no polling) ----------------------------------------

    def _group_key(self, group_id: str, suffix: str = "") -> str:
        return f"{self.prefix}{GROUP_KEY_PREFIX}{group_id}{suffix}"

    def _script(self, name: str, source: str) -> Any:
        client = self.connector.client
        found = self._scripts.get(name)
        if found is None or found[0] is not client:
            found = self._scripts[name] = (client, client.register_script(source))
        return found[1]

    def chord_set_size(self, group_id: str, size: int) -> None:
        """Before sending a chord's header: how many results complete it."""

        def setup(client: redis.Redis) -> None:
            pipe = client.pipeline(transaction=True)
            pipe.delete(self._group_key(group_id, ".c"))
            pipe.set(self._group_key(group_id, ".s"), int(size), ex=self.chord_expires)
            pipe.execute()

        self.connector.call(setup, attempts=self.store_attempts, what="chord size")

    def chord_add(self, group_id: str, count: int = 1) -> None:
        """Header tasks added while the chord runs (Celery's ``add_to_chord``)."""
        key = self._group_key(group_id, ".t")
        self.connector.call(lambda c: c.incrby(key, count), attempts=5, what="chord add")

    def chord_part_done(self, group_id: str, task_id: str, index: int | None, state: str,
                        result: Any, claim_seconds: int = CHORD_CLAIM_SECONDS
                        ) -> ChordJoin | None:
        """Record one header task's outcome; the one that completes the chord gets the join.

        Atomic: however many workers finish header tasks at once (or run one twice), exactly
        one caller receives the :class:`ChordJoin` and must send the callback, then call
        :meth:`chord_finish`. ``result`` is what Celery stores for the state (the value,
        or the exception as a dict).
        """
        token = uuid.uuid4().hex
        score = "+inf" if index is None else str(int(index))
        encoded = self.encode([1, task_id, state, result])  # type: ignore[arg-type]
        keys = [self._group_key(group_id, s) for s in (".j", ".t", ".s", ".d", "", ".c")]
        args = [task_id, encoded, score, self.chord_expires, claim_seconds, token]
        ready, _extra, _size, claimed = self.connector.call(
            lambda c: self._script("chord_part", CHORD_PART)(keys=keys, args=args),
            attempts=self.store_attempts, what="chord part")
        if int(ready) == -1 or not int(claimed):
            return None
        members: Any = self.connector.call(lambda c: c.zrange(keys[0], 0, -1), attempts=5,
                                           what="chord join")
        parts = []
        for raw in members:
            _, tid, st, value = self.decode_list(raw)
            parts.append((str(tid), str(st), value))
        return ChordJoin(group_id, token, parts)

    def chord_extend(self, join: ChordJoin, seconds: int) -> bool:
        """Keep the claim while sending the callback takes long; False if it was lost."""
        keys = [self._group_key(join.group_id, ".c"), self._group_key(join.group_id, ".s")]
        found = self.connector.call(
            lambda c: self._script("chord_extend", CHORD_EXTEND)(keys=keys,
                                                                 args=[join.token, seconds]),
            attempts=5, what="chord claim")
        return bool(int(found))

    def chord_finish(self, join: ChordJoin, done_seconds: int = 300) -> bool:
        """The callback was sent: drop the chord's data, keeping a "done" mark."""
        keys = [self._group_key(join.group_id, s) for s in (".c", ".j", ".t", ".s", ".d")]
        found = self.connector.call(
            lambda c: self._script("chord_finish", CHORD_FINISH)(keys=keys,
                                                                 args=[join.token, done_seconds]),
            attempts=self.store_attempts, what="chord finish")
        return bool(int(found))

    def decode_list(self, data: bytes) -> list[Any]:
        value = self.serializer.loads(data)
        if not isinstance(value, list):
            raise ValueError("chord entry is not a list")
        return value
