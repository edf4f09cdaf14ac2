"""The Redis broker: Celery's queues and envelopes, reliable fetch instead of a visibility timeout.

Queues are Celery's (kombu's) lists: a message is the same JSON envelope kombu writes,
``LPUSH``ed to ``<queue>`` or to a priority bucket ``<queue>\\x06\\x16<3|6|9>``, so Celery
clients and workers share the queues with celeriac. What differs is how a celeriac consumer
takes a message:

* **Reliable fetch.** One Lua call moves a batch from the queue lists into the consumer's
  in-flight hash (``celeriac.inflight.<consumer>``) atomically: a message is always in
  exactly one place in Redis, never only in a process's memory. Ack is one ``HDEL`` for
  the batch.
* **Heartbeats, not a visibility timeout.** Consumers are registered in
  ``celeriac.consumers`` (a sorted set scored with the Redis server's clock); the worker
  supervisor beats for its children. A consumer's messages go back to their queues only
  when it is gone: its process is dead (seen from the same machine), or it has not beaten
  for ``broker_recovery_timeout``. A live worker's message is never handed out twice,
  however long its task runs.
* **Delays in Redis.** A message parked for a later time (an ETA, a retry countdown, a
  rate limit) waits in ``celeriac.delayed.<queue>`` (a sorted set by due time) and is moved
  back to the front of its queue when due, by whichever consumer of that queue fetches
  next. Nothing is held in a worker's memory.

Blocking: when every queue is empty a consumer blocks on one dedicated connection per
queue list with ``BLMOVE key key RIGHT RIGHT`` (which changes nothing: it is "wake me when
this list is not empty"), on a pub/sub channel that announces newly parked messages, and
on a pipe that ``wake()`` writes to, all in one ``poll``. So it sleeps at no cost and
wakes within a round trip, for messages from Celery clients too.

See docs/redis.md for every key, the Lua scripts' contracts and what Celery workers on
the same queues see.
"""

from __future__ import annotations

import base64
import bisect
import logging
import os
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import redis

from celeriac.brokers.base import (
    Broker,
    Consumer,
    DeadLetter,
    Delivery,
    Subscriber,
    new_consumer_id,
)
from celeriac.brokers.redis_client import CONNECTION_ERRORS, RedisConnector, check_exec
from celeriac.exceptions import ImproperlyConfigured
from celeriac.protocol.message import Message, uuid4_str

log = logging.getLogger("celeriac.redis")

SEP = "\x06\x16"  # kombu's separator between a queue name and its priority bucket
DEFAULT_PRIORITY_STEPS = (0, 3, 6, 9)
REVOKE_CHANNEL = "celeriac.revoked"  # control.REVOKE_CHANNEL; bridged to Celery's pidbox

# Top-level envelope key for what this broker adds to an envelope (kombu ignores it):
# "a" property names it added, "o" original values it replaced, "n" counted deliveries.
META = "celeriac"

_STREAM_ID = re.compile(r"^\d+-\d+$")
_MAX_BATCH = 1000
REGISTER_EVERY = 30.0  # seconds between a consumer's checks that it is registered

# -- Lua --------------------------------------------------------------------------------------
# In-flight hash values and delayed-set members carry the list key the message came from:
#   inflight: <list key> \0 <envelope>          delayed: <nonce> \0 <list key> \0 <envelope>

FETCH = """
-- KEYS: inflight, consumers, consumer_info, <nd delayed sets>, <list keys in order>
-- ARGV: max, tag base, now (client clock), nd, consumer id, consumer info or '' (to make
-- sure the consumer is registered: now and then, and after connection trouble), then the
-- tags to ack first (the previous batch's, in the same round trip)
local max = tonumber(ARGV[1])
local tag = tonumber(ARGV[2])
local now = ARGV[3]
local nd = tonumber(ARGV[4])
if #ARGV > 6 then
  for i = 7, #ARGV, 4000 do
    redis.call('HDEL', KEYS[1], unpack(ARGV, i, math.min(i + 3999, #ARGV)))
  end
end
if ARGV[6] ~= '' then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], 'NX', t[1] + t[2] / 1000000, ARGV[5])
  redis.call('HSETNX', KEYS[3], ARGV[5], ARGV[6])
end
for i = 1, nd do
  local dkey = KEYS[3 + i]
  local due = redis.call('ZRANGE', dkey, '-inf', now, 'BYSCORE', 'LIMIT', 0, 500)
  if #due > 0 then
    for j = #due, 1, -1 do
      local m = due[j]
      local a = string.find(m, '\\0', 1, true)
      local b = string.find(m, '\\0', a + 1, true)
      redis.call('RPUSH', string.sub(m, a + 1, b - 1), string.sub(m, b + 1))
    end
    redis.call('ZREM', dkey, unpack(due))
  end
end
local out = {}
local fields = {}
local n = 0
local first = 4 + nd
for i = first, #KEYS do
  if n >= max then break end
  local got = redis.call('RPOP', KEYS[i], max - n)
  if got then
    for _, env in ipairs(got) do
      tag = tag + 1
      n = n + 1
      fields[#fields + 1] = tostring(tag)
      fields[#fields + 1] = KEYS[i] .. '\\0' .. env
      out[#out + 1] = i - first
      out[#out + 1] = env
    end
  end
end
if n > 0 then
  redis.call('HSET', KEYS[1], unpack(fields))
  return out
end
local best = false
for i = 1, nd do
  local r = redis.call('ZRANGE', KEYS[3 + i], 0, 0, 'WITHSCORES')
  if r[2] and ((not best) or tonumber(r[2]) < best) then best = tonumber(r[2]) end
end
if best then return {-1, tostring(best)} end
return {}
"""

# Give messages back: move ('m', as stored) or replace ('r', with the given envelope) to the
# front of their list, or drop ('d'); only what is still in the in-flight hash. With a
# stale bound, nothing happens if the consumer beat since (it is alive after all).
RESTORE = """
-- KEYS: inflight, consumers, consumer_info
-- ARGV: consumer id, stale bound or '', '1' to unregister once nothing is held,
--       then (tag, mode, envelope) triples, lowest tag first
if ARGV[2] ~= '' then
  local s = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if s and tonumber(s) > tonumber(ARGV[2]) then return -1 end
end
local n = 0
for i = #ARGV - 2, 4, -3 do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    redis.call('HDEL', KEYS[1], ARGV[i])
    local mode = ARGV[i + 1]
    if mode ~= 'd' then
      local a = string.find(v, '\\0', 1, true)
      local env = string.sub(v, a + 1)
      if mode == 'r' then env = ARGV[i + 2] end
      redis.call('RPUSH', string.sub(v, 1, a - 1), env)
      n = n + 1
    end
  end
end
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
end
return n
"""

# Reject with requeue: back to the front of their lists, in their order.
REQUEUE = """
local n = 0
for i = #ARGV, 1, -1 do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    redis.call('HDEL', KEYS[1], ARGV[i])
    local a = string.find(v, '\\0', 1, true)
    redis.call('RPUSH', string.sub(v, 1, a - 1), string.sub(v, a + 1))
    n = n + 1
  end
end
return n
"""

PARK = """
-- KEYS: inflight, delayed set; ARGV: tag, due, nonce, channel
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3] .. '\\0' .. v)
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
"""

HEARTBEAT = """
local t = redis.call('TIME')
local now = t[1] + t[2] / 1000000
for i = 1, #ARGV do redis.call('ZADD', KEYS[1], now, ARGV[i]) end
return #ARGV
"""

REGISTER = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1] + t[2] / 1000000, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

CONSUMERS = """
local t = redis.call('TIME')
return {tostring(t[1] + t[2] / 1000000), redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'),
        redis.call('HGETALL', KEYS[2])}
"""

BROADCAST = """
-- KEYS: stream; ARGV: payload, expires (epoch), ttl ms, channel
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', 10000, '*', 'p', ARGV[1], 'x', ARGV[2])
local want = tonumber(ARGV[3])
local pttl = redis.call('PTTL', KEYS[1])
if pttl == -1 or pttl < want then redis.call('PEXPIRE', KEYS[1], want) end
redis.call('PUBLISH', ARGV[4], id .. '\\n' .. ARGV[2] .. '\\n' .. ARGV[1])
return id
"""

REPLAY = """
-- KEYS: dead-letter stream; ARGV: (id, list key, envelope) triples
local n = 0
for i = 1, #ARGV, 3 do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    redis.call('LPUSH', ARGV[i + 1], ARGV[i + 2])
    n = n + 1
  end
end
return n
"""

PURGE = """
local n = 0
for i = 1, #KEYS do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t == 'list' then n = n + redis.call('LLEN', KEYS[i])
  elseif t == 'zset' then n = n + redis.call('ZCARD', KEYS[i]) end
end
if #KEYS > 0 then redis.call('DEL', unpack(KEYS)) end
return n
"""

# -- envelopes -----------------------------------------------------------------------------


def encode_envelope(message: Message, queue: str) -> bytes:
    """The kombu envelope for ``message``, as Celery's Redis transport stores it."""
    props = dict(message.properties)
    added: list[str] = []
    originals: dict[str, Any] = {}
    if "delivery_tag" not in props:
        props["delivery_tag"] = uuid4_str()
        added.append("delivery_tag")
    if "delivery_info" not in props:
        props["delivery_info"] = {"exchange": "", "routing_key": queue}
        added.append("delivery_info")
    if props.get("body_encoding") != "base64":
        if "body_encoding" in props:
            originals["body_encoding"] = props["body_encoding"]
        else:
            added.append("body_encoding")
        props["body_encoding"] = "base64"
    envelope: dict[str, Any] = {
        "body": base64.b64encode(message.body).decode("ascii"),
        "content-encoding": message.content_encoding,
        "content-type": message.content_type,
        "headers": message.headers,
        "properties": props,
    }
    if added or originals:
        meta: dict[str, Any] = {}
        if added:
            meta["a"] = added
        if originals:
            meta["o"] = originals
        envelope[META] = meta
    return orjson.dumps(envelope, default=str)


def decode_envelope(raw: bytes) -> tuple[Message, int]:
    """A stored envelope -> (the message as published, deliveries counted before this one)."""
    env = orjson.loads(raw)
    if not isinstance(env, dict):
        raise ValueError("envelope is not a JSON object")
    props = env.get("properties")
    if not isinstance(props, dict):
        props = {}
    headers = env.get("headers")
    if not isinstance(headers, dict):
        headers = {}
    body: Any = env.get("body")
    if body is None:
        data = b""
    elif props.get("body_encoding") == "base64":
        data = base64.b64decode(body)
    elif isinstance(body, str):
        data = body.encode("utf-8")
    else:  # a raw producer put the JSON value itself in "body"
        data = orjson.dumps(body)
    count = 0
    meta = env.get(META)
    if isinstance(meta, dict):
        for name in meta.get("a") or ():
            props.pop(name, None)
        props.update(meta.get("o") or {})
        count = int(meta.get("n") or 0)
    if headers.get("redelivered") and count == 0:
        count = 1  # restored by a kombu consumer: it was delivered before
    message = Message(headers, props, data, env.get("content-type") or "application/json",
                      env.get("content-encoding") or "utf-8")
    return message, count


def count_delivery(raw: bytes) -> bytes:
    """The envelope with one more counted delivery (it may have been running)."""
    env = orjson.loads(raw)
    meta = env.get(META)
    if not isinstance(meta, dict):
        meta = env[META] = {}
    meta["n"] = int(meta.get("n") or 0) + 1
    return orjson.dumps(env)


# -- the machine we run on -------------------------------------------------------------------


def _host_identity() -> str:
    """This machine and pid namespace: pids are only comparable within it.

    ``CELERIAC_HOST_ID`` overrides it (for containers that share a hostname and a pid
    namespace with others yet cannot see their processes, and for tests).
    """
    forced = os.environ.get("CELERIAC_HOST_ID")
    if forced:
        return forced
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id",):
        try:
            with open(path) as f:
                parts.append(f.read().strip())
        except OSError:
            pass
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return "|".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Broadcasts sent from this process: a subscriber in it syncs before reading, so it sees
# what this process sent before (read your writes).
_LOCAL_BROADCASTS = [0]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBroker(Broker):
    def __init__(self, url: str = "redis://localhost:6379/0", **options: Any) -> None:
        self.url = url
        self.connector = RedisConnector(url, options, setting="broker_url")
        opts = self.connector.options
        self.prefix = self.connector.keyprefix
        steps = opts.get("priority_steps") or DEFAULT_PRIORITY_STEPS
        if isinstance(steps, str):
            steps = [int(s) for s in steps.split(",")]
        self.priority_steps = sorted(int(s) for s in steps)
        if not self.priority_steps or self.priority_steps[0] != 0:
            raise ImproperlyConfigured(f"priority_steps={steps!r}: must start with 0")
        fanout = opts.get("fanout_prefix", True)
        if fanout is True or fanout in ("1", "true", "True"):
            fanout = f"/{self.connector.db}."
        elif fanout is False or fanout in ("0", "false", "False", None):
            fanout = ""
        self.pidbox_channel = f"{self.prefix}{fanout}celery.pidbox"
        self.publish_retry_policy: dict[str, Any] | None = opts.get("publish_retry_policy")
        self.consumers_key = f"{self.prefix}celeriac.consumers"
        self.info_key = f"{self.prefix}celeriac.consumer_info"
        self.dead_key = f"{self.prefix}celeriac.dead"
        self.host_id = _host_identity()
        self._scripts: dict[str, Any] = {}
        self._pending_recoveries: list[tuple[str, str | None, bool]] = []
        self._lock = threading.Lock()

    # -- keys ----------------------------------------------------------------------------

    def list_key(self, queue: str, priority: int = 0) -> str:
        steps = self.priority_steps
        step = steps[max(0, bisect.bisect(steps, min(max(int(priority), 0), 9)) - 1)]
        return f"{self.prefix}{queue}{SEP}{step}" if step else f"{self.prefix}{queue}"

    def list_keys(self, queue: str) -> list[str]:
        return [self.list_key(queue, s) for s in self.priority_steps]

    def delayed_key(self, queue: str) -> str:
        return f"{self.prefix}celeriac.delayed.{queue}"

    def sched_channel(self, queue: str) -> str:
        return f"{self.prefix}celeriac.sched.{queue}"

    def inflight_key(self, consumer_id: str) -> str:
        return f"{self.prefix}celeriac.inflight.{consumer_id}"

    def broadcast_key(self, channel: str) -> str:
        return f"{self.prefix}celeriac.bcast.{channel}"

    def _script(self, name: str, source: str) -> Any:
        # Scripts belong to a client; after a failover the client is a new one.
        client = self.connector.client
        found = self._scripts.get(name)
        if found is None or found[0] is not client:
            found = self._scripts[name] = (client, client.register_script(source))
        return found[1]

    def _run(self, name: str, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return self._script(name, source)(keys=list(keys), args=list(args))

    def _call(self, fn: Any, what: str, attempts: int | None = 8,
              deadline: float | None = None) -> Any:
        return self.connector.call(fn, attempts=attempts, deadline=deadline, what=what)

    def _retry_run(self, name: str, source: str, keys: Sequence[Any], args: Sequence[Any],
                   what: str, attempts: int | None = 8) -> Any:
        return self._call(lambda _c: self._run(name, source, keys, args), what, attempts)

    # -- publishing ----------------------------------------------------------------------

    def publish(
        self, queue: str, messages: Sequence[Message], *, not_before: float | None = None
    ) -> None:
        if not messages:
            return
        now = time.time()
        delay = not_before is not None and not_before > now
        lists: dict[str, list[bytes]] = {}
        delayed: dict[bytes, float] = {}
        for message in messages:
            envelope = encode_envelope(message, queue)
            key = self.list_key(queue, message.priority)
            if delay and not message.headers.get("eta"):
                # No Celery ``eta`` header says when it is due, so no Celery worker could
                # hold it back: the broker keeps it until then.
                member = b"%s\0%s\0%s" % (uuid.uuid4().hex[:16].encode(), key.encode(), envelope)
                delayed[member] = float(not_before or now)
            else:
                # Due now, or a task message whose eta header every consumer honours:
                # straight on the queue, where Celery workers see it too (a celeriac worker
                # that fetches it early parks it in the delayed set).
                lists.setdefault(key, []).append(envelope)

        if len(lists) == 1 and not delayed:
            # One LPUSH is atomic on its own: no MULTI to pay for.
            [(key, envelopes)] = lists.items()
            commands: list[tuple[Any, ...]] = [("LPUSH", key, *envelopes)]
        else:
            commands = [("MULTI",)]
            commands += [("LPUSH", key, *envelopes) for key, envelopes in lists.items()]
            if delayed:
                zadd: list[Any] = ["ZADD", self.delayed_key(queue)]
                for member, score in delayed.items():
                    zadd += [repr(score), member]
                commands.append(tuple(zadd))
                commands.append(("PUBLISH", self.sched_channel(queue),
                                 repr(min(delayed.values()))))
            commands.append(("EXEC",))
        execute = self.connector.execute

        def send(client: redis.Redis) -> None:
            replies = execute(commands)
            if len(replies) > 1:
                check_exec(replies[-1])

        self._publish_with_retry(send)

    def _publish_with_retry(self, send: Any) -> None:
        policy = self.publish_retry_policy
        if policy is None:
            policy = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2,
                      "interval_max": 0.2}
        max_retries = policy.get("max_retries", 3)
        attempts = None if max_retries is None else int(max_retries) + 1
        # Never reports success for a message Redis did not take: the last error is raised.
        self.connector.call(
            send, attempts=attempts, what="publish",
            interval_start=float(policy.get("interval_start", 0) or 0),
            interval_step=float(policy.get("interval_step", 0.2) or 0),
            interval_max=float(policy.get("interval_max", 0.2) or 0),
        )

    # -- consuming -----------------------------------------------------------------------

    def consumer(self, queues: Sequence[str], consumer_id: str | None = None) -> Consumer:
        return RedisConsumer(self, list(queues), consumer_id or new_consumer_id())

    def _register(self, consumer_id: str) -> None:
        self._retry_run("register", REGISTER, [self.consumers_key, self.info_key],
                        [consumer_id, self._info()], "register consumer", attempts=3)

    def _info(self) -> str:
        return f"{self.host_id}\n{os.getpid()}"

    def heartbeat(self, consumer_ids: Sequence[str]) -> None:
        if not consumer_ids:
            return
        self._retry_pending_recoveries()
        try:
            self._run("heartbeat", HEARTBEAT, [self.consumers_key], list(consumer_ids))
        except CONNECTION_ERRORS as exc:
            # Once; the next beat comes soon. Raising would stop a supervisor.
            self.connector.on_connection_error(exc)
            log.warning("Redis heartbeat failed: %r", exc)

    def recover(
        self, consumer_id: str, running_tag: str | None = None, requeue_running: bool = True
    ) -> int:
        try:
            return self._give_back(consumer_id, running_tag, requeue_running, attempts=6)
        except CONNECTION_ERRORS as exc:
            # Keep it for later (the next heartbeat or recovery sweep) rather than let the
            # caller, a supervisor, die of it.
            log.warning("Could not recover consumer %s now (%r); will retry", consumer_id, exc)
            with self._lock:
                self._pending_recoveries.append((consumer_id, running_tag, requeue_running))
            return 0

    def _retry_pending_recoveries(self) -> int:
        with self._lock:
            pending, self._pending_recoveries = self._pending_recoveries, []
        total = 0
        for index, (cid, tag, requeue) in enumerate(pending):
            try:
                total += self._give_back(cid, tag, requeue, attempts=1)
            except CONNECTION_ERRORS:
                with self._lock:
                    self._pending_recoveries.extend(pending[index:])
                break
        return total

    def _give_back(self, consumer_id: str, running_tag: str | None, requeue_running: bool,
                   *, all_running: bool = False, stale_before: float | None = None,
                   attempts: int | None = 8) -> int:
        """Return what ``consumer_id`` holds to the front of its queues (see RESTORE)."""
        inflight = self.inflight_key(consumer_id)
        held: dict[bytes, bytes] = self._call(lambda c: c.hgetall(inflight),
                                               "read in-flight messages", attempts)
        args: list[Any] = [consumer_id, "" if stale_before is None else repr(stale_before), "1"]
        for tag in sorted(held, key=lambda t: int(t)):
            value = held[tag]
            running = all_running or _s(tag) == running_tag
            if running and not requeue_running and not all_running:
                args += [tag, "d", ""]
            elif running:
                envelope = value.partition(b"\0")[2]
                try:
                    args += [tag, "r", count_delivery(envelope)]
                except ValueError:  # not JSON: cannot count it, give it back as it is
                    args += [tag, "m", ""]
            else:
                args += [tag, "m", ""]
        keys = [inflight, self.consumers_key, self.info_key]
        found = self._retry_run("restore", RESTORE, keys, args, "recover messages", attempts)
        return max(0, int(found))

    def recover_stale(self, timeout: float) -> int:
        total = self._retry_pending_recoveries()
        try:
            now_s, members, info = self._run("consumers", CONSUMERS,
                                              [self.consumers_key, self.info_key], [])
        except CONNECTION_ERRORS as exc:
            self.connector.on_connection_error(exc)
            return total
        now = float(now_s)
        infos = {_s(info[i]): _s(info[i + 1]) for i in range(0, len(info), 2)}
        with self._lock:
            pending = {p[0] for p in self._pending_recoveries}
        dead: list[tuple[str, float | None]] = []
        stale: list[tuple[str, float]] = []
        for i in range(0, len(members), 2):
            cid, beat = _s(members[i]), float(members[i + 1])
            if cid in pending:
                continue
            host, _, pid = infos.get(cid, "").rpartition("\n")
            if host == self.host_id and pid.isdigit() and not _pid_alive(int(pid)):
                dead.append((cid, None))
            elif now - beat > timeout:
                stale.append((cid, now - timeout))
        if stale and self._stale_is_trustworthy(timeout):
            dead.extend(stale)
        for cid, bound in dead:
            try:
                total += self._give_back(cid, None, True, all_running=True, stale_before=bound,
                                         attempts=2)
            except CONNECTION_ERRORS as exc:
                log.warning("Could not recover consumer %s (%r)", cid, exc)
                break
        if total:
            log.warning("Recovered %s messages held by consumers that are gone", total)
        return total

    def _stale_is_trustworthy(self, timeout: float) -> bool:
        """A silent heartbeat means a dead worker only if Redis and we were up all along."""
        last_error = self.connector.last_error_at
        if last_error is not None and time.monotonic() - last_error < timeout:
            return False  # we lost Redis lately: others may not have been able to beat either
        try:
            return self.connector.server_uptime() >= timeout
        except CONNECTION_ERRORS:
            return False

    # -- dead letters --------------------------------------------------------------------

    def dead_letter(self, message: Message, queue: str, reason: str) -> None:
        envelope = encode_envelope(message, queue)
        fields = {"q": queue, "r": reason, "t": repr(time.time()), "e": envelope}
        self._call(lambda c: c.xadd(self.dead_key, fields), "dead-letter", attempts=None,
                   deadline=time.monotonic() + 300)

    def _dead_entries(self, ids: Sequence[str] | None, limit: int | None = None
                      ) -> list[tuple[str, dict[bytes, bytes]]]:
        def read(c: redis.Redis) -> list[Any]:
            if ids is None:
                return list(c.xrange(self.dead_key, count=limit) or ())
            pipe = c.pipeline(transaction=False)
            for i in ids:
                pipe.xrange(self.dead_key, i, i)
            return [e for found in pipe.execute() for e in found]

        return [(_s(i), f) for i, f in self._call(read, "read dead letters")]

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        out = []
        for entry_id, f in self._dead_entries(None, limit):
            message, _ = decode_envelope(f[b"e"])
            out.append(DeadLetter(entry_id, _s(f[b"q"]), _s(f[b"r"]), float(f[b"t"]), message))
        return out

    def _valid_ids(self, ids: Sequence[str]) -> list[str]:
        return list(dict.fromkeys(str(i) for i in ids if _STREAM_ID.match(str(i))))

    def replay_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        chosen = None if ids is None else self._valid_ids(ids)
        if chosen is not None and not chosen:
            return 0
        args: list[Any] = []
        for entry_id, f in self._dead_entries(chosen):
            queue = _s(f[b"q"])
            message, _ = decode_envelope(f[b"e"])
            args += [entry_id, self.list_key(queue, message.priority), f[b"e"]]
        if not args:
            return 0
        return int(self._retry_run("replay", REPLAY, [self.dead_key], args, "replay dead letters"))

    def purge_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        if ids is None:
            def purge_all(c: redis.Redis) -> int:
                pipe = c.pipeline(transaction=True)
                pipe.xlen(self.dead_key)
                pipe.delete(self.dead_key)
                return int(pipe.execute()[0])

            return int(self._call(purge_all, "purge dead letters"))
        chosen = self._valid_ids(ids)
        if not chosen:
            return 0
        return int(self._call(lambda c: c.xdel(self.dead_key, *chosen), "purge dead letters"))

    # -- queues --------------------------------------------------------------------------

    def purge(self, queue: str) -> int:
        keys = [*self.list_keys(queue), self.delayed_key(queue)]
        return int(self._retry_run("purge", PURGE, keys, [], "purge"))

    def queue_size(self, queue: str) -> int:
        commands: list[tuple[Any, ...]] = [("LLEN", key) for key in self.list_keys(queue)]
        commands.append(("ZCARD", self.delayed_key(queue)))

        def size(c: redis.Redis) -> int:
            return sum(int(n) for n in self.connector.execute(commands))

        return int(self._call(size, "queue size"))

    # -- broadcast -----------------------------------------------------------------------

    def broadcast(self, channel: str, payload: dict[str, Any], ttl: float) -> None:
        if ttl <= 0:
            return  # already expired: nobody may see it
        data = orjson.dumps(payload, default=str)
        expires = repr(time.time() + ttl)
        key = self.broadcast_key(channel)
        ttl_ms = max(1, int(ttl * 1000))
        self._retry_run("broadcast", BROADCAST, [key], [data, expires, ttl_ms, key], "broadcast",
                        attempts=4)
        _LOCAL_BROADCASTS[0] += 1
        if channel == REVOKE_CHANNEL:
            self._celery_revoke(payload)

    def _celery_revoke(self, payload: dict[str, Any]) -> None:
        """The same revocation as Celery's ``control.revoke`` sends it, for Celery workers."""
        body = {
            "method": "revoke",
            "arguments": {"task_id": list(payload.get("ids") or ()),
                          "terminate": bool(payload.get("terminate")),
                          "signal": payload.get("signal") or "SIGTERM"},
            "destination": None, "pattern": None, "matcher": None,
        }
        envelope = {
            "body": base64.b64encode(orjson.dumps(body)).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"clock": 1, "expires": 0, META: True},
            "properties": {"delivery_mode": 2,
                           "delivery_info": {"exchange": "celery.pidbox", "routing_key": ""},
                           "priority": 0, "body_encoding": "base64",
                           "delivery_tag": str(uuid.uuid4())},
        }
        data = orjson.dumps(envelope)
        try:
            self._call(lambda c: c.publish(self.pidbox_channel, data), "revoke (Celery)", 3)
        except CONNECTION_ERRORS as exc:
            log.warning("Could not send the revocation to Celery workers: %r", exc)

    def subscribe(self, channel: str) -> Subscriber:
        return RedisSubscriber(self, channel)

    def close(self) -> None:
        self.connector.close()


class RedisSubscriber(Subscriber):
    """Live messages by pub/sub; at (re)connect, what the broadcast stream still keeps."""

    def __init__(self, broker: RedisBroker, channel: str) -> None:
        self.broker = broker
        self.channel = channel
        self.key = broker.broadcast_key(channel)
        self.celery = broker.pidbox_channel if channel == REVOKE_CHANNEL else None
        self.last = (0, 0)
        self.buffer: list[dict[str, Any]] = []
        self.pubsub: Any = None
        self.local_seen = _LOCAL_BROADCASTS[0]
        self._retry_at = 0.0
        self._connect()

    def _connect(self) -> None:
        try:
            pubsub = self.broker.connector.client.pubsub()
            channels = [self.key] + ([self.celery] if self.celery else [])
            pubsub.subscribe(*channels)
            confirmed = 0
            deadline = time.monotonic() + 10
            while confirmed < len(channels):
                msg = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                if msg is None:
                    if time.monotonic() > deadline:
                        raise redis.exceptions.TimeoutError("no subscribe confirmation")
                    continue
                if msg["type"] == "subscribe":
                    confirmed += 1
                else:
                    self._on_message(msg)
            # Subscribed first, then read the stream: nothing falls between the two.
            start = "-" if self.last == (0, 0) else f"({self.last[0]}-{self.last[1]}"
            entries: Any = self.broker.connector.client.xrange(self.key, start, "+")
            for entry_id, fields in entries or ():
                self._take(_s(entry_id), fields.get(b"x", b"0"), fields.get(b"p", b"null"))
            self.pubsub = pubsub
        except CONNECTION_ERRORS as exc:
            self.broker.connector.on_connection_error(exc)
            log.warning("Broadcast channel %s unavailable (%r); will retry", self.channel, exc)
            self._retry_at = time.monotonic() + 1.0
            self.pubsub = None

    def _take(self, entry_id: str, expires: bytes, payload: bytes) -> None:
        ms, _, seq = entry_id.partition("-")
        ident = (int(ms), int(seq or 0))
        if ident <= self.last:
            return
        self.last = ident
        if float(expires) >= time.time():
            self.buffer.append(orjson.loads(payload))

    def _on_message(self, msg: dict[str, Any]) -> None:
        if msg.get("type") != "message":
            return
        channel = _s(msg["channel"])
        data = msg["data"]
        if channel == self.key:
            entry_id, _, rest = data.partition(b"\n")
            expires, _, payload = rest.partition(b"\n")
            self._take(_s(entry_id), expires, payload)
        elif channel == self.celery:
            found = _celery_revocation(data)
            if found is not None:
                self.buffer.append(found)

    def poll(self) -> list[dict[str, Any]]:
        if self.pubsub is None and time.monotonic() >= self._retry_at:
            self._connect()
        pubsub = self.pubsub
        if pubsub is not None:
            try:
                if self.local_seen != _LOCAL_BROADCASTS[0]:
                    # This process broadcast since: a PING's reply comes after everything
                    # published before it, so reading up to it shows those broadcasts.
                    self.local_seen = _LOCAL_BROADCASTS[0]
                    pubsub.ping(b"sync")
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline:
                        msg = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                        if msg is None:
                            continue
                        if msg["type"] == "pong":
                            break
                        self._on_message(msg)
                while True:
                    msg = pubsub.get_message(timeout=0)
                    if msg is None:
                        break
                    self._on_message(msg)
            except CONNECTION_ERRORS as exc:
                self.broker.connector.on_connection_error(exc)
                self._drop()
                self._retry_at = time.monotonic() + 1.0
        out, self.buffer = self.buffer, []
        return out

    def _drop(self) -> None:
        pubsub, self.pubsub = self.pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:
                pass

    def close(self) -> None:
        self._drop()


def _celery_revocation(data: bytes) -> dict[str, Any] | None:
    """A revoke sent by Celery's ``control.revoke`` (kombu pidbox), as our revocation."""
    try:
        env = orjson.loads(data)
        if (env.get("headers") or {}).get(META):
            return None  # our own, already seen on the broadcast stream
        body = env.get("body")
        if (env.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        request = orjson.loads(body) if isinstance(body, str | bytes) else body
        if not isinstance(request, dict) or request.get("method") != "revoke":
            return None
        args = request.get("arguments") or {}
        ids = args.get("task_id")
        ids = [ids] if isinstance(ids, str) else list(ids or ())
        return {"ids": [str(i) for i in ids], "terminate": bool(args.get("terminate")),
                "signal": args.get("signal") or "SIGTERM", "time": time.time()}
    except Exception:  # somebody else's message on the control channel
        return None


class _Waiter:
    """Blocks until one of the consumer's lists is not empty, a park is announced, or wake()."""

    BLOCK = 30  # seconds a BLMOVE stays armed; re-armed on return

    def __init__(self, broker: RedisBroker, keys: list[str], channels: list[str]) -> None:
        self.broker = broker
        self.keys = keys
        self.channels = channels
        self.conns: dict[str, Any] = {}
        self.armed: dict[str, float] = {}
        self.generation = broker.connector.generation
        self.pubsub: Any = None
        self.pipe_r, self.pipe_w = os.pipe()
        os.set_blocking(self.pipe_r, False)
        os.set_blocking(self.pipe_w, False)

    def subscribe(self) -> None:
        """(Re)subscribe to park announcements, confirmed, so none is missed afterwards."""
        if self.pubsub is not None:
            return
        pubsub = self.broker.connector.client.pubsub()
        try:
            pubsub.subscribe(*self.channels)
            confirmed = 0
            deadline = time.monotonic() + 10
            while confirmed < len(self.channels):
                msg = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                if msg is not None and msg["type"] == "subscribe":
                    confirmed += 1
                elif msg is None and time.monotonic() > deadline:
                    raise redis.exceptions.TimeoutError("no subscribe confirmation")
        except BaseException:
            pubsub.close()
            raise
        self.pubsub = pubsub

    def _arm(self) -> None:
        if self.generation != self.broker.connector.generation:
            self.reset()
            self.generation = self.broker.connector.generation
        now = time.monotonic()
        for key in self.keys:
            if key in self.armed:
                if self.armed[key] > now:
                    continue
                self._disconnect(key)  # no answer long after it was due: a dead connection
            conn = self.conns.get(key)
            if conn is None:
                conn = self.conns[key] = self.broker.connector.connection()
            try:
                conn.send_command("BLMOVE", key, key, "RIGHT", "RIGHT", self.BLOCK)
            except BaseException:
                self._disconnect(key)
                raise
            self.armed[key] = now + self.BLOCK + 10

    def wait(self, timeout: float) -> str:
        """Wait up to ``timeout`` s; returns "ready", "woken", "due" or "timeout"."""
        self.subscribe()
        self._arm()
        deadline = time.monotonic() + timeout
        pubsub = self.pubsub
        result = self._drain_pubsub(deadline)
        if isinstance(result, str):
            return result
        deadline = result
        poller = select.poll()
        poller.register(self.pipe_r, select.POLLIN)
        fds: dict[int, str] = {}
        poller.register(pubsub.connection._sock.fileno(), select.POLLIN)
        ps_fd = pubsub.connection._sock.fileno()
        for key, conn in self.conns.items():
            fd = conn._sock.fileno()
            fds[fd] = key
            poller.register(fd, select.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            try:
                events = poller.poll(remaining * 1000.0)
            except InterruptedError:
                continue
            outcome = None
            for fd, _ in events:
                if fd == self.pipe_r:
                    self.drain_pipe()
                    outcome = "woken"
                elif fd == ps_fd:
                    result = self._drain_pubsub(deadline)
                    if isinstance(result, str):
                        outcome = outcome or result
                    else:
                        deadline = result
                elif fd in fds:
                    key = fds[fd]
                    conn = self.conns[key]
                    try:
                        conn.read_response()
                    except BaseException:
                        self._disconnect(key)
                        raise
                    self.armed.pop(key, None)
                    outcome = outcome or "ready"
            if outcome is not None:
                return outcome

    def _drain_pubsub(self, deadline: float) -> float | str:
        """Read park announcements: "due" if one is due now, else the (earlier) deadline."""
        due_now = False
        while True:
            msg = self.pubsub.get_message(timeout=0)
            if msg is None:
                break
            if msg.get("type") != "message":
                continue
            try:
                due = float(msg["data"])
            except ValueError:
                continue
            wait = due - time.time()
            if wait <= 0:
                due_now = True
            else:
                deadline = min(deadline, time.monotonic() + wait + 0.001)
        return "due" if due_now else deadline

    def drain_pipe(self) -> None:
        try:
            while os.read(self.pipe_r, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def wake(self) -> None:
        try:
            os.write(self.pipe_w, b"!")
        except (BlockingIOError, OSError):
            pass

    def _disconnect(self, key: str) -> None:
        self.armed.pop(key, None)
        conn = self.conns.pop(key, None)
        if conn is not None:
            try:
                conn.disconnect()
            except Exception:
                pass

    def reset(self) -> None:
        for key in list(self.conns):
            self._disconnect(key)
        pubsub, self.pubsub = self.pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:
                pass

    def close(self) -> None:
        self.reset()
        for fd in (self.pipe_r, self.pipe_w):
            try:
                os.close(fd)
            except OSError:
                pass


class RedisConsumer(Consumer):
    def __init__(self, broker: RedisBroker, queues: list[str], consumer_id: str) -> None:
        if not queues:
            raise ImproperlyConfigured("a consumer needs at least one queue")
        self.broker = broker
        self.queues = queues
        self.consumer_id = consumer_id
        self.inflight = broker.inflight_key(consumer_id)
        self._tag = 0
        self._held: set[str] = set()
        self._acks: list[str] = []  # acked by ack_soon, not sent yet
        self._acks_lock = threading.Lock()  # a flusher thread may ack while the loop fetches
        # ack_after's (finisher, tags): run inside the next fetch's round trip.
        self._after: tuple[Callable[[], None], list[str]] | None = None
        self._suspect = False  # a fetch failed after it may have run: reconcile
        self._rotation = 0
        self._woken = False
        self._closed = False
        self._waiter: _Waiter | None = None
        self._backoff = 0.0
        self._error_logged = 0.0
        self._register_at = 0.0  # monotonic time the next fetch re-registers
        # Per rotation: the script's keys and which queue each list key belongs to.
        self._plans: list[tuple[list[str], list[str]]] = []
        head = [self.inflight, broker.consumers_key, broker.info_key]
        for r in range(len(queues)):
            order = queues[r:] + queues[:r]
            lists = [(q, broker.list_key(q, s)) for s in broker.priority_steps for q in order]
            keys = head + [broker.delayed_key(q) for q in order] + [k for _, k in lists]
            self._plans.append((keys, [q for q, _ in lists]))
        self._info = broker._info()
        self._watch = [k for q in queues for k in broker.list_keys(q)]
        try:
            broker._register(consumer_id)
        except CONNECTION_ERRORS as exc:
            # Redis is away: the first fetch that gets through registers it.
            log.warning("Could not register consumer %s yet (%r)", consumer_id, exc)

    # -- fetching ------------------------------------------------------------------------

    def _fetch_once(self, max_count: int) -> tuple[list[Delivery], float | None]:
        keys, owners = self._plans[self._rotation]
        self._rotation = (self._rotation + 1) % len(self._plans)
        base = self._tag
        self._tag += max_count  # spent even if the reply is lost, so tags never repeat
        now = time.monotonic()
        register = now >= self._register_at
        with self._acks_lock:
            acks = list(self._acks)
        args = [max_count, base, repr(time.time()), len(self.queues), self.consumer_id,
                self._info if register else "", *acks]
        connector = self.broker.connector
        after, self._after = self._after, None
        if after is None:
            reply = connector.run_script(FETCH, keys, args)
        else:
            # The last batch's results are on their way on the backend's connection: send
            # the fetch too, let the results finish, then read the fetch. Two round trips
            # overlap; the batch's acks ride with the fetch after this one.
            try:
                connector.send([connector.script_command(FETCH, keys, args)])
            except BaseException:
                self._finish(after)
                raise
            try:
                self._finish(after)
            finally:
                try:
                    reply = connector.receive(1)[0]
                except redis.exceptions.NoScriptError:
                    reply = connector.run_script(FETCH, keys, args)
        if register:
            self._register_at = now + REGISTER_EVERY
        if acks:
            self._held.difference_update(acks)
            self._forget_acks(acks)
        if not reply:
            return [], None
        if reply[0] == -1:
            return [], float(reply[1])
        out: list[Delivery] = []
        tag = base
        for i in range(0, len(reply), 2):
            tag += 1
            queue = owners[int(reply[i])]
            tag_s = str(tag)
            self._held.add(tag_s)
            try:
                message, count = decode_envelope(reply[i + 1])
            except (ValueError, TypeError) as exc:
                # Not an envelope: keep the raw bytes as a message the worker dead-letters.
                message, count = Message({}, {"x-decode-error": repr(exc)}, bytes(reply[i + 1]),
                                         "application/x-redis-envelope", "binary"), 0
            out.append(Delivery(message, queue, tag_s, count + 1))
        return out, None

    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        deadline = time.monotonic() + max(0.0, timeout)
        max_count = min(max_count, _MAX_BATCH)
        if max_count <= 0:
            self._finish_pending()
            if self._acks:
                self._ack_tags([], None)  # no fetch script to carry them
        while True:
            due: float | None = None
            if max_count > 0:
                try:
                    if self._suspect:
                        self._finish_pending()
                        self._reconcile()
                    found, due = self._fetch_once(max_count)
                    self._backoff = 0.0
                    if found:
                        return found
                    if self._acks:
                        # Acks that became due during this fetch (ack_after): not left
                        # waiting while this consumer idles.
                        self._ack_tags([], None)
                except CONNECTION_ERRORS as exc:
                    self._on_error(exc, "fetch")
                    self._suspect = True
                    self._pause(deadline)
                    if time.monotonic() >= deadline or self._take_wake():
                        return []
                    continue
            remaining = deadline - time.monotonic()
            if self._take_wake() or remaining <= 0:
                return []
            if due is not None:
                remaining = min(remaining, max(0.0, due - time.time()) + 0.001)
            try:
                self._wait(remaining, watch=max_count > 0)
            except CONNECTION_ERRORS as exc:
                self._on_error(exc, "wait")
                if self._waiter is not None:
                    self._waiter.reset()
                self._pause(deadline)

    def _wait(self, timeout: float, watch: bool) -> None:
        waiter = self._waiter
        if waiter is None:
            channels = [self.broker.sched_channel(q) for q in self.queues]
            waiter = self._waiter = _Waiter(self.broker, self._watch, channels)
            if self._woken:
                return  # woken before the pipe existed
            if watch:
                # Subscribed only now: fetch again before sleeping, so a park announced in
                # between is not missed.
                waiter.subscribe()
                return
        if not watch:
            # Only a wake-up (or the timeout) ends this wait: the caller has no free slot.
            poller = select.poll()
            poller.register(waiter.pipe_r, select.POLLIN)
            try:
                if poller.poll(max(0.0, timeout) * 1000.0):
                    waiter.drain_pipe()
            except InterruptedError:
                pass
            return
        outcome = waiter.wait(timeout)
        if outcome == "woken":
            self._woken = True

    def _take_wake(self) -> bool:
        if self._woken:
            self._woken = False
            if self._waiter is not None:
                self._waiter.drain_pipe()
            return True
        return False

    def _pause(self, deadline: float) -> None:
        """Back off after a connection error, waking early for wake()."""
        self._backoff = min(2.0, self._backoff * 2 if self._backoff else 0.05)
        pause = min(self._backoff, max(0.0, deadline - time.monotonic()))
        if pause <= 0:
            return
        if self._waiter is not None:
            poller = select.poll()
            poller.register(self._waiter.pipe_r, select.POLLIN)
            try:
                if poller.poll(pause * 1000.0):
                    self._waiter.drain_pipe()
                    self._woken = True
            except InterruptedError:
                pass
        else:
            time.sleep(pause)

    def _on_error(self, exc: BaseException, what: str) -> None:
        self.broker.connector.on_connection_error(exc)
        self._register_at = 0.0
        now = time.monotonic()
        if now - self._error_logged > 10:
            self._error_logged = now
            log.warning("Redis %s failed (%r); reconnecting", what, exc)

    def _reconcile(self) -> None:
        """Give back messages a fetch moved in flight whose reply never reached us."""
        tags = [_s(t) for t in self.broker.connector.client.hkeys(self.inflight)]
        lost = sorted((t for t in tags if t not in self._held), key=int)
        if lost:
            args: list[Any] = [self.consumer_id, "", "0"]
            for tag in lost:
                args += [tag, "m", ""]
            keys = [self.inflight, self.broker.consumers_key, self.broker.info_key]
            n = self.broker._run("restore", RESTORE, keys, args)
            log.warning("Gave back %s messages whose fetch reply was lost", n)
        self._suspect = False

    # -- settling ------------------------------------------------------------------------

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        self._ack_tags([d.tag for d in deliveries], None)

    def _ack_tags(self, tags: list[str], attempts: int | None) -> None:
        with self._acks_lock:
            pending = list(self._acks)  # ack_soon's, sent along
        tags = tags + pending
        if not tags:
            return
        execute = self.broker.connector.execute
        self.broker._call(lambda c: execute([("HDEL", self.inflight, *tags)]), "ack",
                          attempts=attempts, deadline=time.monotonic() + 600)
        self._held.difference_update(tags)
        if pending:
            self._forget_acks(pending)

    def ack_after(self, finish: Callable[[], None], deliveries: Sequence[Delivery]) -> None:
        self._finish_pending()  # (there is none: fetch or close ran it)
        self._after = (finish, [d.tag for d in deliveries])

    def _finish(self, after: tuple[Callable[[], None], list[str]]) -> None:
        finish, tags = after
        try:
            finish()
        except CONNECTION_ERRORS as exc:
            # The results could not be stored (their retries ran out): not a fetch error to
            # retry past, but what a failed store() raised before: the worker loop stops.
            raise RuntimeError(f"could not store the results of a batch: {exc!r}") from exc
        if tags:
            with self._acks_lock:
                self._acks.extend(tags)

    def _finish_pending(self) -> None:
        after, self._after = self._after, None
        if after is not None:
            self._finish(after)

    def ack_soon(self, deliveries: Sequence[Delivery]) -> None:
        # Sent with the next fetch (its script deletes them first), or by ack()/close().
        with self._acks_lock:
            self._acks.extend(d.tag for d in deliveries)

    def _forget_acks(self, sent: list[str]) -> None:
        """Drop the tags just acked from those waiting (others may have been added)."""
        with self._acks_lock:
            if self._acks[:len(sent)] == sent:
                del self._acks[:len(sent)]
            else:  # another thread sent some of them meanwhile
                done = set(sent)
                self._acks = [t for t in self._acks if t not in done]

    def reject(self, deliveries: Sequence[Delivery], requeue: bool) -> None:
        if not deliveries:
            return
        if not requeue:
            self.ack(deliveries)
            return
        tags = sorted((d.tag for d in deliveries), key=int)
        self.broker._call(lambda c: self.broker._run("requeue", REQUEUE, [self.inflight], tags),
                          "requeue", attempts=None, deadline=time.monotonic() + 600)
        self._held.difference_update(tags)

    def park(self, delivery: Delivery, not_before: float) -> None:
        nonce = uuid.uuid4().hex[:16]
        keys = [self.inflight, self.broker.delayed_key(delivery.queue)]
        args = [delivery.tag, repr(float(not_before)), nonce,
                self.broker.sched_channel(delivery.queue)]
        self.broker._call(lambda c: self.broker._run("park", PARK, keys, args), "park",
                          attempts=None, deadline=time.monotonic() + 600)
        self._held.discard(delivery.tag)

    def heartbeat(self) -> None:
        self.broker.heartbeat([self.consumer_id])

    def wake(self) -> None:
        self._woken = True
        waiter = self._waiter
        if waiter is not None:
            waiter.wake()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._finish_pending()
            if self._acks:
                self._ack_tags([], 10)  # what ack_soon kept must not be given back
            self.broker._give_back(self.consumer_id, None, True, attempts=10)
        except CONNECTION_ERRORS as exc:
            # Still registered: its heartbeat stops, so a live worker gives them back later.
            log.warning("Could not give back unacked messages of %s now (%r)",
                        self.consumer_id, exc)
        finally:
            if self._waiter is not None:
                self._waiter.close()
                self._waiter = None
