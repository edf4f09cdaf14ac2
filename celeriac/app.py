"""The app: configuration, task registry, routing and sending.

``Celery("proj")`` connects to nothing and reads no configuration until first used.
Broker and backend connections are made lazily, once per process (a forked worker child
makes its own).
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import re
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from importlib import import_module
from typing import TYPE_CHECKING, Any, TypeVar, overload

from celeriac.config import OLD_NAMES, Settings, check_setting, read_envvar, read_object
from celeriac.exceptions import ImproperlyConfigured
from celeriac.forks import generation as _FORKS
from celeriac.protocol import serializers
from celeriac.protocol.message import build_task_message, uuid4_str
from celeriac.registry import TaskRegistry
from celeriac.task import Context, Task, current_request, make_task_class

if TYPE_CHECKING:
    from celeriac.backends.base import ResultBackend
    from celeriac.brokers.base import Broker
    from celeriac.canvas import Signature, chain, chord, group
    from celeriac.control import Control
    from celeriac.result import AsyncResult, GroupResult

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_SQLITE_URL = "sqlite:///celeriac.db"
REVOKE_CHANNEL = "celeriac.revoked"

# How long the worker that completed a chord keeps its claim while it sends the body.
CHORD_SEND_SECONDS = 60

_current: list[Celery] = []
_batch = threading.local()  # app._publishing(): messages waiting to be published
_shared_tasks: list[Callable[[Celery], Any]] = []
_all_apps: weakref.WeakSet[Celery] = weakref.WeakSet()  # for shared_task


def current_app() -> Celery:
    """The app made or set last in this process (a default app if there is none)."""
    if not _current:
        Celery("default")
    return _current[-1]


class Celery:
    """A celeriac application (Celery's name, so switching is an import change)."""

    def __init__(
        self,
        main: str | None = None,
        broker: str | Sequence[str] | None = None,
        backend: str | None = None,
        include: Sequence[str] | None = None,
        config_source: Any = None,
        set_as_current: bool = True,
        namespace: str | None = None,
        autofinalize: bool = True,
        task_cls: type[Task[Any, Any]] | str | None = None,
        **preconf: Any,
    ) -> None:
        self.main = main
        self.namespace = namespace
        self._preconf: dict[str, Any] = {}
        if broker is not None:
            self._preconf["broker_url"] = broker
        if backend is not None:
            self._preconf["result_backend"] = backend
        if include:
            self._preconf["include"] = include  # normalised (a str too) by the check below
        for key, value in preconf.items():
            self._preconf[OLD_NAMES.get(key, key)] = value
        for key, value in self._preconf.items():
            # Fail fast on a bad keyword setting (cheap: it opens and imports nothing).
            self._preconf[key] = check_setting(key, value)
        self._sources: list[tuple[Any, str | None]] = []
        if config_source is not None:
            self._sources.append((config_source, namespace))
        self._conf: Settings | None = None
        self._conf_lock = threading.RLock()
        self._direct: dict[str, Any] = {}
        self.tasks = TaskRegistry(self)
        self.task_cls: type[Task[Any, Any]] = self._resolve_task_cls(task_cls)
        self._pending: list[Callable[[], Any]] = []
        self._finalized = False
        self._connections: dict[str, Any] = {}
        self._fork_generation = _FORKS[0]
        self._exception_registry: dict[str, type[BaseException]] = {}
        self._routes: Any = None
        self.log = logging.getLogger("celeriac")
        self.autofinalize = autofinalize
        self._autodiscover: list[tuple[Sequence[str], str]] = []
        _all_apps.add(self)
        if set_as_current:
            self.set_current()
        for maker in _shared_tasks:
            self._pending.append(functools.partial(maker, self))

    def __repr__(self) -> str:
        return f"<Celery {self.main or '__main__'} at {id(self):#x}>"

    def __enter__(self) -> Celery:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_current(self) -> None:
        if self in _current:
            _current.remove(self)
        _current.append(self)

    @staticmethod
    def _resolve_task_cls(cls: type[Task[Any, Any]] | str | None) -> type[Task[Any, Any]]:
        if cls is None:
            return Task
        if isinstance(cls, str):
            module, _, attr = cls.replace(":", ".").rpartition(".")
            found: type[Task[Any, Any]] = getattr(import_module(module), attr)
            return found
        return cls

    # -- configuration -------------------------------------------------------------------

    @property
    def conf(self) -> Settings:
        """The settings, read from every source on first access."""
        conf = self._conf
        if conf is None:
            with self._conf_lock:
                if self._conf is None:
                    self._conf = self._load_conf()
                conf = self._conf
        return conf

    def _load_conf(self) -> Settings:
        conf = Settings()
        for source, namespace in self._sources:
            for key, value in read_object(source, namespace).items():
                conf[key] = value
        for key, value in self._preconf.items():
            conf[key] = value
        # Celery's variables too, so a process configured for Celery finds the same servers;
        # celeriac's own win when both are set.
        for names, key in ((("CELERIAC_BROKER_URL", "CELERY_BROKER_URL"), "broker_url"),
                           (("CELERIAC_RESULT_BACKEND", "CELERY_RESULT_BACKEND"),
                            "result_backend")):
            if key in self._preconf:
                continue
            for env_name in names:
                if os.environ.get(env_name):
                    conf[key] = os.environ[env_name]
                    break
        for key, value in self._direct.items():
            conf[key] = value
        return conf

    def config_from_object(
        self, obj: Any, silent: bool = False, force: bool = False, namespace: str | None = None
    ) -> None:
        """Read settings from an object, a module or a dotted path (lazily).

        Settings given to the constructor (``broker=``, ``backend=``, keyword settings)
        keep winning over every source, also over one added after the settings were read.
        """
        namespace = namespace or self.namespace
        try:
            if isinstance(obj, str):
                read_object(obj, namespace)  # fail now on an import error, not later
        except ImproperlyConfigured:
            if silent:
                return
            raise
        with self._conf_lock:
            self._sources.append((obj, namespace))
            if self._conf is not None:
                for key, value in read_object(obj, namespace).items():
                    if key not in self._preconf:
                        self._conf[key] = value

    def config_from_envvar(self, variable_name: str, silent: bool = False,
                           force: bool = False) -> None:
        try:
            module_name = read_envvar(variable_name)
        except ImproperlyConfigured:
            if silent:
                return
            raise
        self.config_from_object(module_name, silent=silent)

    def add_defaults(self, values: Any) -> None:
        self.config_from_object(values)

    # -- tasks ---------------------------------------------------------------------------

    @overload
    def task(self, fun: F) -> Any: ...

    @overload
    def task(self, *, name: str | None = ..., bind: bool = ..., base: Any = ...,
             **options: Any) -> Callable[[F], Any]: ...

    def task(self, *args: Any, **options: Any) -> Any:
        """Decorator that registers a function as a task (``@app.task`` or ``@app.task(...)``)."""
        if len(args) == 1 and callable(args[0]) and not options:
            return self._create_task(args[0], {})
        if args:
            raise TypeError("@app.task takes only keyword options")

        def decorate(fun: F) -> Any:
            return self._create_task(fun, options)

        return decorate

    def _create_task(self, fun: Callable[..., Any], options: dict[str, Any]) -> Task[Any, Any]:
        options = dict(options)
        base = options.pop("base", None) or self.task_cls
        name = options.pop("name", None)
        bind = bool(options.pop("bind", False))
        options.pop("shared", None)
        options.pop("lazy", None)
        task = make_task_class(self, fun, base, name, bind, options)
        # The plain dict lookup: defining a task must not finalize the app (reading config).
        existing = dict.get(self.tasks, task.name)
        if existing is not None and getattr(existing, "__wrapped__", None) is fun:
            return existing
        self.tasks.register(task)
        return task

    def register_task(self, task: Task[Any, Any] | type[Task[Any, Any]]) -> Task[Any, Any]:
        """Register a class-based task (an instance or the class)."""
        instance = task() if isinstance(task, type) else task
        if not getattr(instance, "name", None):
            cls = type(instance)
            instance.name = f"{cls.__module__}.{cls.__name__}"
        instance.app = self
        self.tasks.register(instance)
        return instance

    def register_exception(self, cls: type[BaseException]) -> type[BaseException]:
        """Let results rebuild this exception type (usable as a class decorator)."""
        self._exception_registry[f"{cls.__module__}.{cls.__name__}"] = cls
        return cls

    def finalize(self, auto: bool = False) -> None:
        """Bind shared tasks and import ``include``/``imports`` modules (idempotent)."""
        if self._finalized:
            return
        if auto and not self.autofinalize:
            # Celery's contract: with autofinalize=False, using the registry before an
            # explicit finalize() is a bug in the program, not something to paper over.
            raise RuntimeError("Contract breach: app not finalized (autofinalize=False)")
        self._finalized = True
        from celeriac.builtins import register_builtins

        register_builtins(self)  # the tasks Celery clients may send (celery.chord_unlock, ...)
        while self._pending:
            self._pending.pop(0)()
        for module in tuple(self.conf.include) + tuple(self.conf.imports):
            import_module(module)
        for packages, related in self._autodiscover:
            self._discover(packages, related)

    def autodiscover_tasks(
        self, packages: Sequence[str] | Callable[[], Sequence[str]] | None = None,
        related_name: str = "tasks", force: bool = False,
    ) -> None:
        """Import ``<package>.tasks`` for each package (at finalize, or now with force)."""
        pkgs = packages() if callable(packages) else (packages or [])
        if force or self._finalized:
            self._discover(pkgs, related_name)
        else:
            self._autodiscover.append((pkgs, related_name))

    @staticmethod
    def _discover(packages: Sequence[str], related_name: str) -> None:
        for package in packages:
            try:
                import_module(f"{package}.{related_name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{related_name}":
                    raise

    # -- connections ---------------------------------------------------------------------

    def _per_process(self, key: str, factory: Callable[[], Any]) -> Any:
        if _FORKS[0] != self._fork_generation:  # not os.getpid(): a system call per use
            # A forked child must not use its parent's sockets or SQLite handles.
            self._connections = {}
            self._fork_generation = _FORKS[0]
        found = self._connections.get(key)
        if found is None:
            with self._conf_lock:
                found = self._connections.get(key)
                if found is None:
                    found = self._connections[key] = factory()
        return found

    @property
    def broker_url(self) -> str:
        return self.conf.broker_url or DEFAULT_SQLITE_URL

    @property
    def broker(self) -> Broker:
        from celeriac import brokers

        def make() -> Broker:
            broker = brokers.connect(self.broker_url, self.conf.broker_transport_options)
            conf = self.conf
            # Brokers whose connection can drop retry a publish per Celery's policy.
            broker.publish_retry_policy = (
                dict(conf.task_publish_retry_policy) if conf.task_publish_retry
                else {"max_retries": 0}
            )
            broker.configure(conf)
            return broker

        return self._per_process("broker", make)

    @property
    def backend_url(self) -> str | None:
        url = self.conf.result_backend
        if url is None:
            # The embedded default keeps results next to the messages.
            broker = self.broker_url
            if broker.startswith(("sqlite:", "memory:")):
                return broker
            return None
        return str(url)

    @property
    def backend(self) -> ResultBackend:
        from celeriac import backends

        def make() -> ResultBackend:
            url = self.backend_url
            if url is None:
                from celeriac.backends.disabled import DisabledBackend

                return DisabledBackend()
            expires = self.conf.result_expires
            backend = backends.connect(
                url,
                serializer=self.conf.result_serializer,
                expires=float(expires) if expires else None,
                accept=self.conf.result_accept_content or self.conf.accept_content,
                **self.conf.result_backend_transport_options,
            )
            backend.configure(self.conf)
            return backend

        return self._per_process("backend", make)

    @property
    def control(self) -> Control:
        from celeriac.control import Control

        return self._per_process("control", lambda: Control(self))

    @property
    def accept_content(self) -> frozenset[str]:
        return self._per_process(
            "accept", lambda: serializers.accepted_types(self.conf.accept_content)
        )

    def close(self) -> None:
        for conn in self._connections.values():
            close = getattr(conn, "close", None)
            if close is not None:
                close()
        self._connections = {}

    # -- routing -------------------------------------------------------------------------

    def route(self, name: str, args: Any = (), kwargs: Any = None,
              options: dict[str, Any] | None = None, task: Task[Any, Any] | None = None) -> str:
        """The queue a task goes to: explicit option, task.queue, task_routes, default.

        This is the order Celery's router applies (the task's own ``queue`` is merged into
        the options before the routes are consulted, and options win).
        """
        return self._route(name, args, kwargs, options, task)[0]

    def _route(self, name: str, args: Any = (), kwargs: Any = None,
               options: dict[str, Any] | None = None, task: Task[Any, Any] | None = None
               ) -> tuple[str, tuple[str, str, str] | None]:
        """The queue, and the (exchange, routing key, type) when it goes through an exchange.

        ``queue``/``exchange``/``routing_key``/``exchange_type`` options win over what a
        route gives (Celery merges the route under the options). A message goes through an
        exchange when both an exchange and a routing key are known, or the exchange (or
        the queue's, from ``task_queues``) is a topic or fanout one; otherwise to the
        default exchange with the queue name as routing key, as Celery publishes.
        """
        options = options or {}
        queue = options.get("queue") or (task.queue if task is not None else None)
        exchange = options.get("exchange")
        routing_key = options.get("routing_key")
        exchange_type = options.get("exchange_type")
        conf = self.conf
        if not queue:
            routes = conf["task_routes"]
            if routes:
                for router in routes if isinstance(routes, list | tuple) else [routes]:
                    found = _lookup_route(router, name, args, kwargs, options, task)
                    if not found:
                        continue
                    if isinstance(found, str):
                        queue = found
                    elif isinstance(found, dict):
                        queue = found.get("queue")
                        exchange = exchange if exchange is not None else found.get("exchange")
                        routing_key = routing_key or found.get("routing_key")
                        exchange_type = exchange_type or found.get("exchange_type")
                    else:  # a kombu Queue
                        queue = found
                    break
        specs = self._queue_specs()
        plain = exchange is None and routing_key is None and exchange_type is None and (
            queue is None or isinstance(queue, str))
        if plain and not specs:
            return queue or str(conf["task_default_queue"]), None  # the common case
        default_queue = str(conf["task_default_queue"])
        default_key = conf.get("task_default_routing_key")
        if plain:  # by queue name alone: the same answer every time for this task_queues
            cache = self.__dict__["_queue_specs_cache"][2]
            key = (queue, default_queue, default_key)
            found = cache.get(key)
            if found is not None:
                return found
        from celeriac.brokers.amqp_routing import destination

        if plain:
            found = cache[key] = destination(specs, queue, None, None, None, default_queue,
                                             default_key)
            return found
        return destination(specs, queue, exchange, routing_key, exchange_type, default_queue,
                           default_key)

    def _queue_specs(self) -> dict[str, dict[str, Any]]:
        """``task_queues`` by name (parsed once per value)."""
        queues = self.conf["task_queues"]
        if not queues:
            return {}
        cached = self.__dict__.get("_queue_specs_cache")
        if cached is None or cached[0] is not queues:
            from celeriac.brokers.amqp_routing import specs_by_name

            # (the value it was parsed from, the specs, destinations by queue name)
            cached = self.__dict__["_queue_specs_cache"] = (queues, specs_by_name(queues), {})
        specs: dict[str, dict[str, Any]] = cached[1]
        return specs

    def default_worker_queues(self) -> list[str]:
        """What a worker consumes without ``-Q``: every ``task_queues`` entry (Celery's rule),
        or the default queue."""
        specs = self._queue_specs()
        return list(specs) if specs else [str(self.conf["task_default_queue"])]

    def worker_queues(self, queues: Sequence[str], hostname: str) -> list[str]:
        """The queues a worker consumes for ``-Q`` names: a broadcast name becomes the
        worker's own queue, and ``worker_direct`` adds ``<hostname>.dq2``."""
        from celeriac.brokers import amqp_routing

        direct = bool(self.conf["worker_direct"])
        expand = getattr(self.broker, "worker_queues", None)
        if expand is not None:
            return list(expand(list(queues), hostname, direct))
        specs = self._queue_specs()
        broadcast = [q for q in queues if specs.get(q, {}).get("broadcast")]
        if broadcast:
            raise ImproperlyConfigured(
                f"broadcast queues {broadcast} need a broker with exchanges (RabbitMQ)")
        return amqp_routing.worker_queues(specs, queues, hostname, direct)

    # -- sending -------------------------------------------------------------------------

    def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        task_id: str | None = None,
        expires: float | datetime | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        """Send a task by name; the name need not be registered in this process."""
        options.setdefault("ignore_result", None)
        return self._send(name, args, kwargs, countdown=countdown, eta=eta, task_id=task_id,
                          expires=expires, **options)

    def _send(
        self,
        name: str,
        args: Sequence[Any] | None,
        kwargs: dict[str, Any] | None,
        *,
        task: Task[Any, Any] | None = None,
        task_id: str | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        link: Any = None,
        link_error: Any = None,
        queue: Any = None,
        priority: int | None = None,
        serializer: str | None = None,
        headers: dict[str, Any] | None = None,
        ignore_result: bool | None = False,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        shadow: str | None = None,
        retries: int = 0,
        parent_id: str | None = None,
        root_id: str | None = None,
        group_id: str | None = None,
        group_index: int | None = None,
        chain: list[dict[str, Any]] | None = None,
        chord: dict[str, Any] | None = None,
        reply_to: str | None = None,
        argsrepr: str | None = None,
        kwargsrepr: str | None = None,
        origin: str | None = None,
        **extra: Any,
    ) -> AsyncResult[Any]:
        from celeriac.result import AsyncResult

        conf = self.conf
        task_id = task_id or uuid4_str()
        args = list(args) if args is not None else []
        kwargs = dict(kwargs) if kwargs is not None else {}
        now = None
        if countdown is not None:
            now = datetime.now(UTC)
            eta = now + timedelta(seconds=float(countdown))
        elif eta is not None and eta.tzinfo is None:
            eta = eta.replace(tzinfo=UTC)
        if expires is None and task is not None and task.expires is not None:
            expires = task.expires
        if isinstance(expires, str):
            # An ISO 8601 time, as Celery accepts (and as a retry passes on its header).
            expires = datetime.fromisoformat(expires)
        expiration = None  # the message TTL in seconds, exact for a numeric ``expires``
        if expires is not None and not isinstance(expires, datetime):
            now = now or datetime.now(UTC)
            expiration = float(expires)
            expires = now + timedelta(seconds=expiration)
        elif isinstance(expires, datetime) and expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        if task is not None:
            if priority is None:
                priority = task.priority
            if serializer is None:
                serializer = task.serializer
            if time_limit is None:
                time_limit = task.time_limit
            if soft_time_limit is None:
                soft_time_limit = task.soft_time_limit
            if ignore_result is False:
                ignored = task.ignore_result
                ignore_result = bool(conf["task_ignore_result"] if ignored is None else ignored)
        if priority is None:
            # conf[...] here, not conf.name: attribute access misses first (~1 us each).
            priority = conf["task_default_priority"]
        parent = current_request()
        if parent is not None and not parent.called_directly and parent.id:
            parent_id = parent_id or parent.id
            root_id = root_id or parent.root_id or parent.id
            if priority is None and conf["task_inherit_parent_priority"]:
                priority = (parent.properties or {}).get("priority")
        options = {"queue": queue} if queue else {}
        queue_name, xroute = self._route(name, args, kwargs, {**options, **extra}, task)
        callbacks = errbacks = None
        if link is not None or link_error is not None:
            # Imported only when needed: a function-level import costs ~1 us per send.
            from celeriac.canvas import maybe_signature_list

            callbacks = maybe_signature_list(link, self)
            errbacks = maybe_signature_list(link_error, self)
        message = build_task_message(
            name, task_id, args, kwargs,
            eta=eta, expires=expires, expiration=expiration, retries=retries,
            time_limit=time_limit, soft_time_limit=soft_time_limit,
            root_id=root_id, parent_id=parent_id, group_id=group_id, group_index=group_index,
            shadow=shadow, ignore_result=ignore_result, reply_to=reply_to or self.oid,
            priority=priority,
            callbacks=callbacks, errbacks=errbacks,
            chain=chain, chord=chord, extra_headers=headers,
            argsrepr=argsrepr, kwargsrepr=kwargsrepr,  # Celery's way to hide secrets in logs
            origin_name=origin,
            serializer=serializer or conf["task_serializer"],
            max_size=conf["task_max_message_size"],
        )
        if ignore_result is not True and (reply_to is None or reply_to == self.oid):
            # rpc:// declares this client's reply queue before the first task answering in it
            # (not for a retry or chain step a worker sends on behalf of another client).
            self.backend.on_task_call(task_id, self.oid)
        self._publish(queue_name, message, eta.timestamp() if eta is not None else None, xroute)
        result: AsyncResult[Any] = AsyncResult(task_id, app=self, task_name=name)
        self._add_to_parent(result)
        return result

    @property
    def oid(self) -> str:
        """This client's id (the reply-to of its messages)."""
        return self._per_process("oid", lambda: str(uuid.uuid4()))

    def _send_retry(self, task: Task[Any, Any], request: Context, args: Any, kwargs: Any,
                    eta: datetime, options: dict[str, Any]) -> None:
        """Send the next attempt of a running task: same id, retries + 1."""
        headers = request.headers or {}
        self._send(
            task.name,
            request.args if args is None else args,
            request.kwargs if kwargs is None else kwargs,
            task=task, task_id=request.id, eta=eta,
            expires=options.get("expires", request.expires),
            retries=request.retries + 1,
            parent_id=request.id, root_id=request.root_id,
            group_id=request.group, group_index=request.group_index,
            link=request.callbacks, link_error=request.errbacks,
            chain=request.chain, chord=request.chord,
            queue=options.get("queue") or (request.delivery_info or {}).get("routing_key"),
            priority=options.get("priority"),
            headers={k: v for k, v in (request.headers or {}).items() if k.startswith("x-")},
            reply_to=request.reply_to,
            ignore_result=request.ignore_result,
            # The same sender as the first attempt, and reprs kept while the arguments are.
            origin=request.origin,
            argsrepr=headers.get("argsrepr") if args is None else None,
            kwargsrepr=headers.get("kwargsrepr") if kwargs is None else None,
        )

    def _store_state(self, task_id: str, state: str, meta: Any, request: Context | None) -> None:
        from celeriac.trace import build_meta

        ctx = request if request is not None and request.id == task_id else None
        self.backend.store([build_meta(self, task_id, state, meta, ctx)])

    # -- workflows (used by canvas and by the worker after a task returns) --------------------

    def signature(self, *args: Any, **kwargs: Any) -> Signature:
        from celeriac.canvas import signature

        kwargs.setdefault("app", self)
        return signature(*args, **kwargs)

    # Messages sent inside ``with app._publishing():`` are published together, per queue.
    _PUBLISH_CHUNK = 1000

    @contextmanager
    def _publishing(self) -> Iterator[None]:
        """Publish the messages sent inside in batches (a group's members, a chord's header).

        Nothing is published if the block raises: a chord never runs with half a header.
        """
        batches: dict[int, list[tuple[str, Any, float | None, Any]]] = (
            _batch.__dict__.setdefault("pending", {}))
        if id(self) in batches:
            yield  # an enclosing block publishes
            return
        pending = batches[id(self)] = []
        try:
            yield
            start = 0
            while start < len(pending):
                queue, _, not_before, xroute = pending[start]
                stop = start + 1
                while (stop < len(pending) and stop - start < self._PUBLISH_CHUNK
                       and pending[stop][0] == queue and pending[stop][2] == not_before
                       and pending[stop][3] == xroute):
                    stop += 1
                chunk = [m for _, m, _, _ in pending[start:stop]]
                if xroute is None:
                    self.broker.publish(queue, chunk, not_before=not_before)
                else:
                    self._publish_routed(xroute, chunk, not_before)
                start = stop
        finally:
            del batches[id(self)]

    def _publish(self, queue: str, message: Any, not_before: float | None,
                 xroute: tuple[str, str, str] | None = None) -> None:
        pending = getattr(_batch, "pending", {}).get(id(self))
        if pending is not None:
            pending.append((queue, message, not_before, xroute))
        elif xroute is None:
            self.broker.publish(queue, [message], not_before=not_before)
        else:
            self._publish_routed(xroute, [message], not_before)

    def _publish_routed(self, xroute: tuple[str, str, str], messages: list[Any],
                        not_before: float | None) -> None:
        """Publish through an exchange; brokers without exchanges get the queues bound to it."""
        exchange, routing_key, kind = xroute
        publish = getattr(self.broker, "publish_to_exchange", None)
        if publish is not None:
            publish(exchange, routing_key, messages, not_before=not_before, exchange_type=kind)
            return
        from celeriac.brokers.amqp_routing import bound_queues

        queues = bound_queues(self._queue_specs(), exchange, routing_key, kind)
        if not queues:
            raise ImproperlyConfigured(
                f"no queue in task_queues is bound to exchange {exchange!r} ({kind}) for "
                f"routing key {routing_key!r} (broadcast queues need RabbitMQ)")
        for message in messages:
            # As Celery's virtual transports write it in the envelope (Redis).
            message.properties["delivery_info"] = {"exchange": exchange,
                                                   "routing_key": routing_key}
        for queue in queues:
            self.broker.publish(queue, messages, not_before=not_before)

    def _send_task_signature(self, name: str, args: list[Any], kwargs: dict[str, Any],
                             options: dict[str, Any]) -> AsyncResult[Any]:
        """Send one task of a signature (its options as apply_async takes them)."""
        from celeriac.canvas import _wire

        opts = dict(options)
        chord = opts.pop("chord", None)
        if chord:
            # Plain dicts are wire form already (a chord's header shares one body dict).
            opts["chord"] = chord if type(chord) is dict else _wire(chord)
        steps = opts.pop("chain", None)
        if steps:
            opts["chain"] = [s if type(s) is dict else _wire(s) for s in steps]
        task = self.tasks.get(name)
        if task is not None:
            return task.apply_async(args, kwargs, **opts)
        return self.send_task(name, args, kwargs, **opts)

    def _add_to_parent(self, result: Any) -> None:
        """Sent from inside a running task: the result becomes one of its ``children``
        (Celery's ``trail``), so ``collect()`` finds it."""
        if getattr(_batch, "workflow", 0):
            return  # a member of a workflow: the workflow's result is added instead
        parent = current_request()
        if parent is not None and not parent.called_directly and parent.id:
            parent.__dict__.setdefault("children", []).append(result)

    @contextmanager
    def _workflow(self) -> Iterator[None]:
        _batch.workflow = getattr(_batch, "workflow", 0) + 1
        try:
            yield
        finally:
            _batch.workflow -= 1

    def _send_workflow(self, sig: Signature, args: Any, kwargs: Any,
                       options: dict[str, Any]) -> Any:
        with self._workflow():
            result = sig.clone()._apply(args, kwargs, options)
        self._add_to_parent(result)
        return result

    def _send_chain(self, ch: chain, args: Any, kwargs: Any, options: dict[str, Any]) -> Any:
        return self._send_workflow(ch, args, kwargs, options)

    def _send_group(self, grp: group, args: Any, kwargs: Any,
                    options: dict[str, Any]) -> GroupResult:
        return self._send_workflow(grp, args, kwargs, options)

    def _send_chord(self, ch: chord, args: Any, kwargs: Any, options: dict[str, Any]) -> Any:
        return self._send_workflow(ch, args, kwargs, options)

    def _chord_start(self, group_id: str, size: int) -> None:
        """Before a chord's header is sent: the backend learns how many results to expect."""
        self.backend.chord_set_size(group_id, size)

    # -- after a task returns (called by trace.py in the worker, and eagerly) --------------------

    def _apply_callback(self, callback: dict[str, Any], retval: Any,
                        request: Context) -> list[Any] | None:
        from celeriac.canvas import maybe_signature

        sig = maybe_signature(callback, self)
        if sig is None:
            return None
        return _as_tuple(sig._apply([retval], None, {}))

    def _apply_errback(self, errback: dict[str, Any], request: Context, exc: BaseException,
                       trace: str | None) -> None:
        """Call an errback: ``(request, exc, traceback)`` in this process if the task takes
        three arguments (Celery's new form), else send it with the failed task's id."""
        from celeriac.canvas import Signature, maybe_signature

        sig = maybe_signature(errback, self)
        if sig is None:
            return
        task = self.tasks.get(sig.task) if type(sig) is Signature else None
        if task is not None and not sig.immutable and _takes_request(task, sig):
            try:
                task(request, exc, trace, *sig.args, **sig.kwargs)
            except Exception:
                self.log.exception("Errback %s of %s raised", sig.task, request.id)
            return
        if request.is_eager:
            sig.apply([request.id])
        else:
            sig._apply([request.id], None, {})

    def _apply_chain_step(self, remaining: list[dict[str, Any]], retval: Any,
                          request: Context) -> list[Any] | None:
        """Send the next step of a chain (the last element of ``embed.chain``)."""
        from celeriac.canvas import maybe_signature

        steps = list(remaining)
        nxt = maybe_signature(steps.pop(), self)
        if nxt is None:
            return None
        return _as_tuple(nxt._apply([retval], None, {"chain": steps} if steps else {}))

    def _chord_part_done(self, request: Context, state: str, value: Any,
                         meta: Any = None) -> None:
        """A chord header task finished (or will never run): report it; send the body if
        this completed the chord. ``meta``, the task's document, is stored first."""
        from celeriac import states
        from celeriac.protocol.errors import exception_to_dict

        body, group_id = request.chord, request.group
        if not body or not group_id or not request.id:
            return
        result = exception_to_dict(value) if isinstance(value, BaseException) else value
        if state not in states.EXCEPTION_STATES and isinstance(value, BaseException):
            state = states.FAILURE
        backend = self.backend
        try:
            if meta is not None:
                join = backend.store_and_chord_part_done(
                    meta, group_id, str(request.id), request.group_index, state, result)
            else:
                join = backend.chord_part_done(group_id, str(request.id), request.group_index,
                                               state, result)
        except Exception:
            self.log.exception("Chord %s: could not record the outcome of %s", group_id,
                               request.id)
            return
        if join is not None:
            self._finish_chord(join, body)

    def _finish_chord(self, join: Any, body_data: Any) -> None:
        """This process completed the chord: send the body, or fail it with ChordError."""
        from celeriac import states
        from celeriac.canvas import maybe_signature
        from celeriac.exceptions import ChordError
        from celeriac.protocol.errors import exception_from_dict

        body = maybe_signature(body_data, self)
        backend = self.backend
        failed = next((p for p in join.parts if p[1] in states.PROPAGATE_STATES), None)
        try:
            if failed is not None:
                task_id, _, data = failed
                cause = exception_from_dict(data, self._exception_registry)
                error = ChordError(f"Dependency {task_id} raised {cause!r}")
                error.__cause__ = cause
                self.log.error("Chord %s failed: %s", join.group_id, error)
                self._fail_signature(body, error, errbacks=True)
            elif not backend.chord_extend(join, CHORD_SEND_SECONDS):
                self.log.warning("Chord %s: another worker took over before the body was sent",
                                 join.group_id)
                return
            else:
                body._apply([[p[2] for p in join.parts]], None, {})
        except Exception as exc:
            self.log.exception("Chord %s: sending the body failed", join.group_id)
            try:
                self._fail_signature(body, ChordError(f"Callback error: {exc!r}"), errbacks=True)
            except Exception:
                self.log.exception("Chord %s: could not fail the body", join.group_id)
        backend.chord_finish(join)

    def _abandoned(self, request: Context, state: str, exc: BaseException) -> None:
        """A task that will never run (revoked, expired, unknown): what waited on it fails.

        The steps chained after it are marked failed and a chord it belongs to is told,
        so neither a chain's result nor a chord waits forever.
        """
        if request.chain:
            self._fail_chain(request.chain, exc, state)
        if request.chord and request.group:
            self._chord_part_done(request, state, exc)

    def _fail_chain(self, remaining: Any, exc: BaseException, state: str = "FAILURE",
                    first: Any = None) -> None:
        """A step failed: the steps after it will never run, so they fail too (as Celery
        5.7 does). Their errbacks are not called (the failed step's already were).

        ``first`` (the failed step's own document) is stored in the same write.
        """
        from celeriac.canvas import maybe_signature

        metas: list[Any] = [first] if first is not None else []
        for data in remaining or ():
            self._fail_signature(maybe_signature(data, self), exc, state=state, _metas=metas)
        if metas:
            self.backend.store(metas)

    def _fail_signature(self, sig: Signature, exc: BaseException, *, errbacks: bool = False,
                        report: bool = True, state: str = "FAILURE",
                        _metas: list[Any] | None = None) -> None:
        """Store ``state`` with ``exc`` for every task of a signature that will never run.

        With ``errbacks`` its errbacks are called; with ``report`` a chord it belongs to
        gets its part, so nothing waits on it forever.
        """
        from celeriac.canvas import chain as chain_cls
        from celeriac.canvas import chord as chord_cls
        from celeriac.canvas import group as group_cls
        from celeriac.canvas import maybe_signature
        from celeriac.protocol.errors import exception_to_dict
        from celeriac.trace import build_meta

        metas: list[Any] = [] if _metas is None else _metas
        opts = sig.options
        if isinstance(sig, chain_cls):
            for index, step in enumerate(sig._normalise()):
                self._fail_signature(step, exc, errbacks=errbacks and index == 0,
                                     report=report, state=state, _metas=metas)
        elif isinstance(sig, group_cls):
            for member in sig._flatten():
                self._fail_signature(member, exc, errbacks=errbacks, report=report,
                                     state=state, _metas=metas)
        elif isinstance(sig, chord_cls):
            for member in sig.header._flatten():
                self._fail_signature(member, exc, report=False, state=state, _metas=metas)
            if sig.body is not None:
                self._fail_signature(sig.body, exc, errbacks=errbacks, report=report,
                                     state=state, _metas=metas)
        else:
            task_id = sig.id
            request = Context(
                id=task_id, task=sig.task, args=sig.args, kwargs=sig.kwargs,
                group=opts.get("group_id"), group_index=opts.get("group_index"),
                chord=opts.get("chord"), root_id=opts.get("root_id"),
                parent_id=opts.get("parent_id"), errbacks=opts.get("link_error"),
                chain=opts.get("chain"), called_directly=False, is_eager=False,
                delivery_info={}, headers={}, retries=0,
            )
            if task_id:
                metas.append(build_meta(self, task_id, state, exception_to_dict(exc), request))
            if errbacks:
                for errback in opts.get("link_error") or ():
                    self._apply_errback(errback, request, exc, None)
            if report and request.chord and request.group and task_id:
                self._chord_part_done(request, state, exc)
        for data in opts.get("chain") or ():
            self._fail_signature(maybe_signature(data, self), exc, report=report, state=state,
                                 _metas=metas)
        if _metas is None and metas:
            self.backend.store(metas)

    # -- helpers -------------------------------------------------------------------------

    def AsyncResult(self, task_id: str, **kwargs: Any) -> AsyncResult[Any]:
        from celeriac.result import AsyncResult

        return AsyncResult(task_id, app=self, **kwargs)

    def GroupResult(self, group_id: str | None = None, results: Any = (),
                    **kwargs: Any) -> GroupResult:
        from celeriac.result import GroupResult

        return GroupResult(group_id, results, app=self, **kwargs)

    def Worker(self, **options: Any) -> Any:
        from celeriac.worker.supervisor import Supervisor, WorkerOptions

        return Supervisor(self, WorkerOptions.from_app(self, **options))

    def worker_main(self, argv: Sequence[str] | None = None) -> None:
        from celeriac.cli.main import main

        main(["-A", "__celeriac_app__", *(argv or ["worker"])], obj=self)


def _as_tuple(result: Any) -> list[Any] | None:
    as_tuple = getattr(result, "as_tuple", None)
    return as_tuple() if as_tuple is not None else None


def _takes_request(task: Task[Any, Any], sig: Signature) -> bool:
    """Whether an errback takes Celery's new form ``(request, exc, traceback)``: its
    function has more than one positional parameter left after the signature's own
    arguments (a ``*args`` function gets the classic form: the failed task's id)."""
    import inspect

    try:
        params = inspect.signature(task.run).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.name not in sig.kwargs]
    return len(positional) - len(sig.args) > 1


def _lookup_route(router: Any, name: str, args: Any, kwargs: Any, options: dict[str, Any],
                  task: Task[Any, Any] | None) -> Any:
    """What ``router`` says for this task: a queue name, a dict of options, or None."""
    if isinstance(router, str):
        module, _, attr = router.replace(":", ".").rpartition(".")
        router = getattr(import_module(module), attr)
    if callable(router):
        found = router(name, args, kwargs, options, task=task)
    elif isinstance(router, dict):
        found = router.get(name)
        if found is None:
            for pattern, route in router.items():
                if isinstance(pattern, re.Pattern):
                    if pattern.match(name):
                        found = route
                        break
                elif any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern):
                    found = route
                    break
    else:
        raise ImproperlyConfigured(f"task_routes: cannot use router {router!r}")
    if isinstance(found, dict):
        found = dict(found)  # the caller may read it; never change the configured route
    return found


def shared_task(*args: Any, **options: Any) -> Any:
    """A task registered with every app, present and future (for reusable apps)."""

    def create(fun: Callable[..., Any]) -> Any:
        def make(app: Celery) -> Any:
            return app._create_task(fun, options)

        _shared_tasks.append(make)
        for app in list(_all_apps):
            if app._finalized:
                make(app)
            else:  # like new apps: created when the app is finalized (config read then)
                app._pending.append(functools.partial(make, app))
        return _SharedTaskProxy(fun, options)

    if len(args) == 1 and callable(args[0]) and not options:
        return create(args[0])
    return create


class _SharedTaskProxy:
    """Resolves to the task of the current app on each use."""

    def __init__(self, fun: Callable[..., Any], options: dict[str, Any]) -> None:
        self._fun = fun
        self._options = options
        self.__wrapped__ = fun
        self.__doc__ = fun.__doc__

    def _task(self) -> Task[Any, Any]:
        app = current_app()
        name = self._options.get("name")
        for task in app.tasks.values():
            if getattr(task, "__wrapped__", None) is self._fun and (not name or task.name == name):
                return task
        return app._create_task(self._fun, self._options)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._task(), attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._task()(*args, **kwargs)
