"""Redis connections shared by the broker and the result backend.

One :class:`RedisConnector` turns a URL (or a list of them) and Celery's transport options
into redis-py clients:

* ``redis://[user:password@]host[:port][/db]``, ``rediss://`` (TLS), and
  ``redis+socket:///path/to/redis.sock[?db=N]`` (a Unix socket);
* ``sentinel://[:password@]host:port[/db]``, several joined with ``;``, plus
  ``master_name`` in the transport options: the master is asked of the sentinels and
  followed across a failover;
* a list of URLs (``"redis://a;redis://b"`` or a Python list): on a connection error the
  connector moves to the next one (round robin, like kombu's default failover strategy).

Options may also be given in the URL's query string (``?global_keyprefix=x&socket_timeout=5``).
redis-py's own retries are switched off: every caller decides what a retry means for its
operation (a publish that may have reached Redis must not be retried blindly into a
duplicate, a fetch whose reply was lost must be reconciled, ...).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import hiredis
import redis
from redis.sentinel import Sentinel

from celeriac.exceptions import ImproperlyConfigured
from celeriac.forks import generation as _FORKS

log = logging.getLogger("celeriac.redis")

T = TypeVar("T")

_pack = hiredis.pack_command

# Errors after which a command may be tried again on a (new) connection.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError (a restarted server loading)
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # we reached a replica: a failover happened
    OSError,
)

_FLOAT_OPTIONS = {"socket_timeout", "socket_connect_timeout", "health_check_interval"}
_INT_OPTIONS = {"db", "virtual_host", "max_connections"}
_BOOL_OPTIONS = {"socket_keepalive", "ssl_check_hostname", "retry_on_timeout"}
_SSL_OPTIONS = {"ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile",
                "ssl_check_hostname", "ssl_password", "ssl_ca_data"}
# Passed on to redis-py connections.
_CONNECTION_OPTIONS = {"socket_timeout", "socket_connect_timeout", "socket_keepalive",
                       "socket_keepalive_options", "health_check_interval", "client_name",
                       "username", "password"}

DEFAULT_SOCKET_TIMEOUT = 120.0
DEFAULT_CONNECT_TIMEOUT = 4.0


def _coerce(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if name in _FLOAT_OPTIONS:
            return float(value)
        if name in _INT_OPTIONS:
            return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"redis option {name}={value!r}: expected a number") from None
    if name in _BOOL_OPTIONS:
        return value.lower() in ("1", "true", "yes", "on")
    return value


def split_urls(url: str | list[str] | tuple[str, ...]) -> list[str]:
    if isinstance(url, list | tuple):
        return [u.strip() for u in url if u.strip()]
    return [u.strip() for u in url.split(";") if u.strip()]


def _ssl_cert_reqs(value: Any) -> Any:
    import ssl

    if isinstance(value, str):
        return {"required": ssl.CERT_REQUIRED, "cert_required": ssl.CERT_REQUIRED,
                "optional": ssl.CERT_OPTIONAL, "cert_optional": ssl.CERT_OPTIONAL,
                "none": ssl.CERT_NONE, "cert_none": ssl.CERT_NONE}.get(value.lower(), value)
    return value


def own_connection(client: redis.Redis) -> Any:
    """A connection configured like the client's pool makes them, but not counted by it.

    For connections held apart from the pool (lanes, pub/sub, blocking waits): the pool's
    ``make_connection`` counts every connection it ever made against ``max_connections``
    and never forgets one it did not get back.
    """
    pool = client.connection_pool
    return pool.connection_class(**pool.connection_kwargs)


def check_exec(reply: Any) -> None:
    """Raise the first error inside an ``EXEC`` reply (or for a discarded transaction)."""
    if reply is None:
        raise redis.exceptions.ResponseError("transaction discarded")
    for item in reply:
        if isinstance(item, Exception):
            raise item


@dataclass
class Target:
    """One place to connect to: a server (TCP or Unix socket) or a set of sentinels."""

    url: str
    kind: str  # "tcp" | "unix" | "sentinel"
    db: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)
    sentinels: list[tuple[str, int]] = field(default_factory=list)

    @property
    def safe_url(self) -> str:
        return _safe(self.url)


def _safe(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":**@")
        return url.replace(parts.netloc, netloc)
    return url


def parse_url(url: str) -> tuple[Target, dict[str, Any]]:
    """A URL -> a target and the options found in its query string."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = {k: _coerce(k, v) for k, v in parse_qsl(parts.query)}
    kwargs: dict[str, Any] = {}
    if parts.username:
        kwargs["username"] = unquote(parts.username)
    if parts.password:
        kwargs["password"] = unquote(parts.password)
    db = 0
    if scheme in ("redis", "rediss", "sentinel"):
        path = parts.path.strip("/")
        if path:
            try:
                db = int(path)
            except ValueError:
                raise ImproperlyConfigured(f"{_safe(url)}: database must be a number") from None
    if "db" in query:
        db = int(query.pop("db"))
    if "virtual_host" in query:
        db = int(query.pop("virtual_host"))
    if scheme in ("redis", "rediss"):
        kind = "tcp"
        kwargs["host"] = parts.hostname or "localhost"
        kwargs["port"] = parts.port or 6379
        if scheme == "rediss":
            kwargs["ssl"] = True
        target = Target(url, kind, db, kwargs)
    elif scheme == "redis+socket" or scheme == "socket":
        if not parts.path:
            raise ImproperlyConfigured(f"{_safe(url)}: a Unix socket URL needs a path")
        kwargs["path"] = parts.path
        target = Target(url, "unix", db, kwargs)
    elif scheme == "sentinel":
        target = Target(url, "sentinel", db, kwargs,
                        [(parts.hostname or "localhost", parts.port or 26379)])
    else:
        raise ImproperlyConfigured(f"{_safe(url)}: not a Redis URL")
    return target, query


def parse_targets(url: str | list[str], options: dict[str, Any]) -> tuple[list[Target],
                                                                           dict[str, Any]]:
    """Every target of a (list of) URL(s); sentinel URLs in a row form one target."""
    targets: list[Target] = []
    merged: dict[str, Any] = {}
    for one in split_urls(url):
        target, query = parse_url(one)
        merged.update(query)
        last = targets[-1] if targets else None
        if target.kind == "sentinel" and last is not None and last.kind == "sentinel":
            last.sentinels.extend(target.sentinels)
            last.url += ";" + one
            continue
        targets.append(target)
    if not targets:
        raise ImproperlyConfigured(f"no Redis URL in {url!r}")
    # Options given in code win over those in the URL.
    merged.update({k: _coerce(k, v) for k, v in options.items()})
    return targets, merged


class RedisConnector:
    """redis-py clients for a (list of) URL(s), with failover and retry helpers."""

    def __init__(self, url: str | list[str], options: dict[str, Any] | None = None,
                 *, setting: str = "broker_url") -> None:
        self.url = ";".join(split_urls(url)) if not isinstance(url, str) else url
        self.targets, self.options = parse_targets(url, dict(options or {}))
        self.setting = setting
        self._index = 0
        self._lock = threading.RLock()
        self._client: redis.Redis | None = None
        self._sentinel: Sentinel | None = None
        self.generation = 0  # bumped on every failover: holders of raw connections renew them
        self.last_error_at: float | None = None  # monotonic time of the last connection error
        self._local = threading.local()  # this thread's lane connection (see execute)
        self._lanes: weakref.WeakSet[Any] = weakref.WeakSet()  # to close them all
        self._shas: dict[str, str] = {}

    # -- configuration -------------------------------------------------------------------

    @property
    def target(self) -> Target:
        return self.targets[self._index]

    @property
    def db(self) -> int:
        return self.target.db

    @property
    def keyprefix(self) -> str:
        return str(self.options.get("global_keyprefix") or "")

    @property
    def safe_url(self) -> str:
        return self.target.safe_url

    def _connection_kwargs(self, target: Target) -> dict[str, Any]:
        opts = self.options
        kwargs: dict[str, Any] = {
            "socket_timeout": DEFAULT_SOCKET_TIMEOUT,
            "socket_connect_timeout": DEFAULT_CONNECT_TIMEOUT,
            "socket_keepalive": True,
        }
        kwargs.update({k: v for k, v in opts.items() if k in _CONNECTION_OPTIONS and v is not None})
        kwargs.update({k: v for k, v in target.kwargs.items() if k not in ("host", "port", "path",
                                                                            "ssl")})
        kwargs["db"] = target.db
        ssl_opts = dict(opts.get("ssl") or {}) if isinstance(opts.get("ssl"), dict) else {}
        ssl_opts.update({k: v for k, v in opts.items() if k in _SSL_OPTIONS})
        if target.kwargs.get("ssl") or (target.kind == "sentinel" and ssl_opts):
            for key, value in ssl_opts.items():
                kwargs[key] = _ssl_cert_reqs(value) if key == "ssl_cert_reqs" else value
            if target.kind != "sentinel":
                kwargs["connection_class"] = redis.SSLConnection
        return kwargs

    def _make_client(self, target: Target) -> redis.Redis:
        kwargs = self._connection_kwargs(target)
        max_connections = self.options.get("max_connections")
        if target.kind == "sentinel":
            master = self.options.get("master_name")
            if not master:
                raise ImproperlyConfigured(
                    f"{self.setting}={target.safe_url}: a sentinel URL needs the master's name "
                    "in the transport options (master_name)"
                )
            sentinel_kwargs = dict(self.options.get("sentinel_kwargs") or {})
            sentinel_kwargs.setdefault("socket_connect_timeout",
                                       kwargs.get("socket_connect_timeout"))
            sentinel_kwargs.setdefault("socket_timeout", kwargs.get("socket_connect_timeout"))
            ssl = any(k.startswith("ssl") for k in kwargs)
            if ssl:
                kwargs["ssl"] = True
            self._sentinel = Sentinel(target.sentinels, sentinel_kwargs=sentinel_kwargs)
            pool_kwargs = {k: v for k, v in kwargs.items() if k != "connection_class"}
            if max_connections:
                pool_kwargs["max_connections"] = max_connections
            client: redis.Redis = self._sentinel.master_for(str(master), **pool_kwargs)
            return client
        if target.kind == "unix":
            for key in ("socket_connect_timeout", "socket_keepalive", "socket_keepalive_options"):
                kwargs.pop(key, None)
            kwargs["connection_class"] = redis.UnixDomainSocketConnection
            kwargs["path"] = target.kwargs["path"]
        else:
            kwargs["host"] = target.kwargs["host"]
            kwargs["port"] = target.kwargs["port"]
        if max_connections:
            kwargs["max_connections"] = max_connections
        pool = redis.ConnectionPool(**kwargs)
        return redis.Redis(connection_pool=pool)

    # -- clients -------------------------------------------------------------------------

    @property
    def client(self) -> redis.Redis:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client(self.target)
                client = self._client
        return client

    def connection(self) -> Any:
        """A raw connection of its own (for blocking commands); the caller disconnects it."""
        return own_connection(self.client)

    def on_connection_error(self, exc: BaseException) -> None:
        """Note a connection error; with several URLs, move to the next one."""
        self.last_error_at = time.monotonic()
        if len(self.targets) < 2:
            return
        with self._lock:
            old = self._client
            self._index = (self._index + 1) % len(self.targets)
            self._client = None
            self.generation += 1
            log.warning("%s unreachable (%r); failing over to %s", self.setting, exc,
                        self.safe_url)
        if old is not None:
            try:
                old.connection_pool.disconnect()
            except Exception:
                pass

    def call(self, fn: Callable[[redis.Redis], T], *, attempts: int | None = None,
             deadline: float | None = None, what: str = "redis command",
             interval_start: float = 0.0, interval_step: float = 0.2,
             interval_max: float = 2.0, stop: Callable[[], bool] | None = None) -> T:
        """Run ``fn(client)``, retrying on connection errors with a growing pause.

        Gives up (re-raising) after ``attempts`` tries (None: no limit) or once the
        monotonic ``deadline`` passes, or when ``stop()`` says so. Only for idempotent work.
        """
        tries = 0
        pause = interval_start
        while True:
            tries += 1
            try:
                return fn(self.client)
            except CONNECTION_ERRORS as exc:
                self.on_connection_error(exc)
                out_of_tries = attempts is not None and tries >= attempts
                late = deadline is not None and time.monotonic() + pause > deadline
                if out_of_tries or late or (stop is not None and stop()):
                    raise
                if tries == 1 or tries % 10 == 0:
                    log.warning("%s failed (%r); retrying (attempt %s)", what, exc, tries + 1)
                time.sleep(pause * (0.9 + 0.2 * random.random()))
                pause = min(interval_max, pause + interval_step if pause else interval_step)

    # -- the lane: hot-path commands without redis-py's per-command layers -------------------
    #
    # redis-py's client takes a pooled connection, wraps the command in its retry and
    # observability machinery and releases it again: 15-30 us a command, more than the
    # round trip itself to a local Redis (~20 us). The hot paths (publish, fetch, ack,
    # result writes) instead send on a connection of their own per thread, several commands
    # in one write, and read the raw replies. Errors are as redis-py raises them; retries
    # stay with the caller (``call``).

    def _lane(self) -> Any:
        local = self._local
        conn = getattr(local, "conn", None)
        client = self.client
        if conn is None or local.client is not client or local.forks != _FORKS[0]:
            if conn is not None and local.forks == _FORKS[0]:
                conn.disconnect()  # the client changed (failover, close): renew
            conn = own_connection(client)
            local.conn, local.client, local.forks = conn, client, _FORKS[0]
            with self._lock:
                self._lanes.add(conn)  # weakly: a lane dies (and closes) with its thread
        return conn

    def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write and read every reply: one round trip.

        Replies are raw (bytes, ints, lists, as the server sent them). An error reply is
        raised once every reply has been read, so the connection stays in step; inside an
        ``EXEC`` reply errors are left in the list. A connection error closes the lane
        connection (the next call opens a new one) and propagates.
        """
        self.send(commands)
        return self.receive(len(commands))

    def send(self, commands: list[tuple[Any, ...]]) -> None:
        """The first half of ``execute``: this thread must ``receive`` their replies next
        (before anything else uses its lane), or the lane is out of step."""
        conn = self._lane()
        if conn._sock is None:
            # Explicitly: a connection's lazy connect in send skips what Sentinel-managed
            # connections do in connect() (ask the sentinels where the master is).
            conn.connect()
        try:
            # hiredis packs in C (redis-py's packer costs ~4 us a command in Python).
            data = b"".join([_pack(command) for command in commands])
        except TypeError as exc:
            raise redis.exceptions.DataError(str(exc)) from None
        conn.send_packed_command([data])

    def receive(self, count: int) -> list[Any]:
        """The replies to the ``count`` commands this thread sent last (see ``send``)."""
        conn = self._local.conn
        out: list[Any] = []
        error: BaseException | None = None
        for _ in range(count):
            try:
                out.append(conn.read_response())
            except redis.exceptions.ResponseError as exc:
                out.append(exc)
                error = error or exc
        if error is not None:
            raise error
        return out

    def script_command(self, source: str, keys: list[Any], args: list[Any]) -> tuple[Any, ...]:
        """The ``EVALSHA`` command for a script (``run_script`` loads it when missing)."""
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = hashlib.sha1(source.encode()).hexdigest()
        return ("EVALSHA", sha, len(keys), *keys, *args)

    def run_script(self, source: str, keys: list[Any], args: list[Any],
                   before: list[tuple[Any, ...]] | None = None) -> Any:
        """Run a Lua script (``EVALSHA``, loading it on ``NOSCRIPT``) in one round trip,
        after the ``before`` commands sent in the same write; returns the script's reply."""
        commands = [*(before or ()), self.script_command(source, keys, args)]
        try:
            return self.execute(commands)[-1]
        except redis.exceptions.NoScriptError:
            # A restarted (or flushed) server: load it and run it again. Whatever ran of
            # ``before`` ran already; callers send only idempotent commands there.
            self.execute([("SCRIPT", "LOAD", source)])
            return self.execute([self.script_command(source, keys, args)])[-1]

    def server_uptime(self) -> float:
        info = self.client.info("server")
        return float(info.get("uptime_in_seconds", 0))

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            lanes, self._lanes = list(self._lanes), weakref.WeakSet()
            self._local = threading.local()
        for lane in lanes:
            if lane.pid == os.getpid():  # not a parent's socket inherited by a fork
                try:
                    lane.disconnect()
                except Exception:
                    pass
        if client is not None:
            try:
                client.connection_pool.disconnect()
            except Exception:
                pass
            try:
                client.close()
            except Exception:
                pass
        if self._sentinel is not None:
            for s in self._sentinel.sentinels:
                try:
                    s.close()
                except Exception:
                    pass
            self._sentinel = None
