"""Tasks: the class users subclass or get from ``@app.task``, and the request context."""

from __future__ import annotations

import inspect
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Generic, ParamSpec, TypeVar

from celeriac import states
from celeriac.exceptions import MaxRetriesExceededError, Retry

if TYPE_CHECKING:
    from celeriac.app import Celery
    from celeriac.canvas import Signature
    from celeriac.result import AsyncResult, EagerResult

P = ParamSpec("P")
R = TypeVar("R")


class Context:
    """``task.request``: what the worker knows about the message being run."""

    id: str | None = None
    args: Any = ()
    kwargs: Any = None
    retries: int = 0
    hostname: str | None = None
    eta: datetime | None = None
    expires: datetime | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    delivery_info: dict[str, Any] | None = None
    called_directly: bool = True
    is_eager: bool = False
    timelimit: tuple[float | None, float | None] | None = None
    callbacks: Any = None
    errbacks: Any = None
    chain: Any = None
    chord: Any = None
    reply_to: str | None = None
    correlation_id: str | None = None
    origin: str | None = None
    ignore_result: bool = False
    headers: dict[str, Any] | None = None
    properties: dict[str, Any] | None = None
    task: str | None = None
    stamps: dict[str, Any] | None = None
    shadow: str | None = None
    # Set by a worker: sends to make once this run's outcome is stored (see Task.retry).
    deferred_sends: list[Callable[[], Any]] | None = None
    # Set by retry() in eager mode: (args, kwargs) of the attempt apply() runs next.
    eager_retry: tuple[list[Any], dict[str, Any]] | None = None

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        return f"<Context: {self.__dict__}>"

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


_local = threading.local()
_DIRECT = Context()


def _stack() -> list[Context]:
    stack: list[Context] | None = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def current_request() -> Context | None:
    stack = _stack()
    return stack[-1] if stack else None


def push_request(request: Context) -> None:
    _stack().append(request)


def pop_request() -> None:
    _stack().pop()


def exponential_backoff(
    factor: float, retries: int, maximum: float, full_jitter: bool = False
) -> float:
    """Celery's retry_backoff: ``min(maximum, factor * 2**retries)``, then full jitter."""
    countdown = min(maximum, factor * (2**retries))
    if full_jitter:
        import random  # here: only jittered retries need it (worker memory)

        countdown = random.randrange(int(countdown) + 1)
    return max(0.0, countdown)


_NO_CHECK = (False, 0, 1 << 62)


def _arity(fun: Callable[..., Any]) -> tuple[inspect.Signature | bool, int, int]:
    """(signature, fewest, most positional arguments a call without keywords may pass).

    The counts cover only what needs no ``bind()`` (about 3 us a call) to check; a
    function with required keyword-only parameters accepts no call without keywords, so
    (0, -1) sends every call to ``bind()`` and its error message.
    """
    try:
        sig = inspect.signature(fun)
    except (TypeError, ValueError):  # a builtin or C function: nothing to check
        return _NO_CHECK
    least = most = 0
    for param in sig.parameters.values():
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            most += 1
            if param.default is param.empty:
                least = most
        elif param.kind is param.VAR_POSITIONAL:
            most = 1 << 62
        elif param.kind is param.KEYWORD_ONLY and param.default is param.empty:
            return sig, 0, -1
    return sig, least, most


class Task(Generic[P, R]):
    """A task type. ``@app.task`` makes a subclass and returns its one instance."""

    name: str = ""
    app: Celery
    typing: bool = True
    max_retries: int | None = 3
    default_retry_delay: float = 180
    rate_limit: str | None = None
    ignore_result: bool | None = None
    store_errors_even_if_ignored: bool | None = None
    track_started: bool | None = None
    acks_late: bool | None = None
    acks_on_failure_or_timeout: bool | None = None
    reject_on_worker_lost: bool | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    expires: float | datetime | None = None
    serializer: str | None = None
    queue: str | None = None
    priority: int | None = None
    autoretry_for: Sequence[type[BaseException]] = ()
    dont_autoretry_for: Sequence[type[BaseException]] = ()
    retry_kwargs: dict[str, Any] = {}
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600
    retry_jitter: bool = True
    max_redeliveries: int | None = None
    throws: tuple[type[BaseException], ...] = ()
    abstract: ClassVar[bool] = True
    _bound: bool = False

    # -- running -------------------------------------------------------------------------

    def run(self, *args: P.args, **kwargs: P.kwargs) -> R:
        raise NotImplementedError("tasks must define the run method")

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        # Called as a plain function: the request says so (workers call ``run`` instead).
        # Within a run of this same task (a subclass's __call__ calling super(), which the
        # worker goes through) the request is kept, as Celery keeps it.
        stack = _stack()
        running = stack[-1] if stack else None
        if running is not None and not running.called_directly and running.task == self.name:
            request = Context(**{**running.__dict__, "args": args, "kwargs": kwargs})
        else:
            running = None
            request = Context(args=args, kwargs=kwargs, called_directly=True, task=self.name)
        stack.append(request)
        try:
            return self.run(*args, **kwargs)
        finally:
            stack.pop()
            if running is not None and request.eager_retry is not None:
                running.eager_retry = request.eager_retry  # what apply() looks at

    @property
    def request(self) -> Context:
        return current_request() or _DIRECT

    def __repr__(self) -> str:
        return f"<@task: {self.name} of {self.app.main or '__main__'}>"

    # -- hooks (override in a base class) ------------------------------------------------

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        pass

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        pass

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        pass

    def on_retry(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        pass

    def after_return(
        self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        pass

    # -- calling -------------------------------------------------------------------------

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Send the task with these arguments; returns at once."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        link: Any = None,
        link_error: Any = None,
        **options: Any,
    ) -> AsyncResult[R]:
        """Send the task with options (countdown, eta, expires, queue, priority, …).

        With ``typing`` (the default, as in Celery) arguments that do not fit the task's
        signature raise TypeError here, not in a worker later.
        """
        if self.typing:
            self._check_arguments(args, kwargs)
        app = self.app
        if app.conf.task_always_eager:
            return self.apply(
                args, kwargs, task_id=task_id, link=link, link_error=link_error, **options
            )
        return app._send(
            self.name, args, kwargs, task_id=task_id, link=link, link_error=link_error,
            task=self, **options,
        )

    def _check_arguments(self, args: Sequence[Any] | None, kwargs: dict[str, Any] | None) -> None:
        cached = type(self).__dict__.get("_signature_cache")
        if cached is None:
            cached = _arity(self.run)
            type.__setattr__(type(self), "_signature_cache", cached)
        sig, least, most = cached
        if not kwargs and least <= len(args or ()) <= most:
            return  # positional arguments only, as many as it takes: bind() would agree
        if isinstance(sig, inspect.Signature):
            try:
                sig.bind(*(args or ()), **(kwargs or {}))
            except TypeError as exc:
                raise TypeError(f"{self.name}(): {exc}") from None

    def apply(
        self,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        link: Any = None,
        link_error: Any = None,
        throw: bool | None = None,
        retries: int = 0,
        **options: Any,
    ) -> EagerResult[R]:
        """Run the task here and now, returning an EagerResult."""
        from celeriac.trace import apply_eagerly

        return apply_eagerly(
            self, list(args or ()), dict(kwargs or {}), task_id or str(uuid.uuid4()),
            link=link, link_error=link_error, throw=throw, retries=retries, options=options,
        )

    def AsyncResult(self, task_id: str, **kwargs: Any) -> AsyncResult[R]:
        from celeriac.result import AsyncResult

        return AsyncResult(task_id, app=self.app, task_name=self.name, **kwargs)

    def signature(
        self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
        *starargs: Any, **starkwargs: Any,
    ) -> Signature:
        from celeriac.canvas import Signature

        starkwargs.setdefault("app", self.app)
        return Signature(self.name, args, kwargs, *starargs, **starkwargs)

    subtask = signature

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        return self.signature(args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        return self.signature(args, kwargs, immutable=True)

    def map(self, it: Any) -> Any:
        from celeriac.canvas import xmap

        return xmap(self.s(), it, app=self.app)

    def starmap(self, it: Any) -> Any:
        from celeriac.canvas import xstarmap

        return xstarmap(self.s(), it, app=self.app)

    def chunks(self, it: Any, n: int) -> Any:
        from celeriac.canvas import chunks

        return chunks(self.s(), it, n, app=self.app)

    # -- inside a running task ----------------------------------------------------------

    def update_state(
        self, task_id: str | None = None, state: str | None = None, meta: Any = None, **kw: Any
    ) -> None:
        """Store a custom state (for progress) for this or another task."""
        task_id = task_id or self.request.id
        if task_id is None:
            raise ValueError("update_state needs a task_id outside a running task")
        self.app._store_state(task_id, state or states.PENDING, meta, request=self.request)

    def retry(
        self,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: datetime | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Retry:
        """Send this task again later and stop this run (raises Retry unless throw=False).

        Past ``max_retries`` it raises ``exc`` (or MaxRetriesExceededError) instead.
        """
        request = self.request
        retries = request.retries
        if request.called_directly:
            raise RuntimeError("retry() needs a task run by a worker or apply()")
        max_retries = self.max_retries if max_retries is None else max_retries
        if max_retries is not None and retries >= max_retries:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} "
                f"kwargs:{request.kwargs}",
                task_args=request.args, task_kwargs=request.kwargs,
            )
        if eta is None and countdown is None:
            countdown = self.default_retry_delay
        if eta is None:
            eta = datetime.now(UTC) + timedelta(seconds=float(countdown or 0))
        when = countdown if countdown is not None else eta
        if request.is_eager:
            # apply() runs the next attempt once this one has returned.
            request.eager_retry = (
                list(request.args if args is None else args),
                dict(request.kwargs if kwargs is None else kwargs),
            )
        else:
            sends = request.deferred_sends
            if sends is not None:
                # In a worker: sent once this run's RETRY state is stored, so the next
                # attempt (maybe on another child, at once) never races that write.
                sends.append(
                    lambda: self.app._send_retry(self, request, args, kwargs, eta, options)
                )
            else:
                self.app._send_retry(self, request, args, kwargs, eta, options)
        ret = Retry(exc=exc, when=when)  # type: ignore[arg-type]
        if throw:
            raise ret
        return ret

    def replace(self, sig: Any) -> Any:
        """End this run and let ``sig`` take its place, under this task's id.

        The caller's ``AsyncResult`` for this task gets ``sig``'s result; this task's
        callbacks, errbacks, the rest of its chain and its group/chord membership move to
        ``sig``. In a worker this raises ``Ignore`` (write ``return self.replace(...)``);
        run eagerly it returns ``sig``'s result.
        """
        from celeriac.canvas import _set_membership, chain, group, maybe_signature
        from celeriac.exceptions import ImproperlyConfigured

        request = self.request
        sig = maybe_signature(sig, self.app, clone=True)
        if sig.options.get("chord"):
            raise ImproperlyConfigured("A signature replacing a task must not be part of a chord")
        if isinstance(sig, chain) and not sig.tasks:
            raise ImproperlyConfigured("Cannot replace with an empty chain")
        # A group's result is a list: gather it into one task that can carry this id.
        accumulate = self.app.tasks["celery.accumulate"].s(index=0)
        if isinstance(sig, group):
            sig = chain(sig, accumulate, app=self.app)
        elif isinstance(sig, chain) and isinstance(sig.tasks[-1], group):
            sig = chain(*sig.tasks, accumulate, app=self.app, **sig.options)
        finisher = sig.tasks[-1] if isinstance(sig, chain) else sig
        for key in ("link", "link_error"):
            if isinstance(sig, chain) and sig.options.get(key):
                for link in sig._list_option(key):
                    finisher._list_option(key).append(link)
                sig.options.pop(key)
        for callback in request.callbacks or ():
            finisher.link(maybe_signature(callback, self.app))
        # Errbacks on every step, as Celery's chain.link_error does: any step may fail.
        steps = sig.tasks if isinstance(sig, chain) else [sig]
        for errback in request.errbacks or ():
            for step in steps:
                step.link_error(maybe_signature(errback, self.app, clone=True))
        sig.freeze(request.id, root_id=request.root_id, parent_id=request.parent_id)
        membership = {k: v for k, v in (("group_id", request.group),
                                        ("group_index", request.group_index),
                                        ("chord", request.chord)) if v is not None}
        if membership:
            sig = _set_membership(sig, membership)
        if request.chain:  # the steps after this one (stored last first) follow ``sig``
            rest = [maybe_signature(step, self.app) for step in reversed(request.chain)]
            sig = chain(sig, *rest, app=self.app)
        return self.on_replace(sig)

    def on_replace(self, sig: Any) -> Any:
        """Send (or, eagerly, run) the replacement; override to customise, calling super."""
        if self.request.is_eager:
            return sig.apply().get()
        sig.apply_async()
        from celeriac.exceptions import Ignore

        raise Ignore("Replaced by new task")

    def add_to_chord(self, sig: Any, lazy: bool = False) -> Any:
        """Add ``sig`` to the chord this task belongs to; the body waits for it too."""
        from celeriac.canvas import maybe_signature

        request = self.request
        if not request.chord or not request.group:
            raise ValueError("Current task is not member of any chord")
        sig = maybe_signature(sig, self.app, clone=True)
        sig.set(group_id=request.group, chord=request.chord, root_id=request.root_id)
        sig.freeze()
        self.app.backend.chord_add(request.group, 1)
        return sig if lazy else sig.apply_async()


def task_name_for(module: str, name: str, main: str | None) -> str:
    if module == "__main__" and main:
        module = main
    return f"{module}.{name}"


def make_task_class(
    app: Celery,
    fun: Callable[..., Any],
    base: type[Task[Any, Any]],
    name: str | None,
    bind: bool,
    options: dict[str, Any],
) -> Task[Any, Any]:
    task_name = name or task_name_for(fun.__module__, fun.__name__, app.main)
    run = fun if bind else staticmethod(fun)
    attrs: dict[str, Any] = {
        "app": app,
        "name": task_name,
        "run": run,
        "_bound": bind,
        "abstract": False,
        "__doc__": fun.__doc__,
        "__module__": fun.__module__,
        "__wrapped__": fun,
        "__qualname__": fun.__qualname__,
    }
    for key, value in options.items():
        if not hasattr(base, key) and key not in ("typing",):
            from celeriac.exceptions import ImproperlyConfigured

            raise ImproperlyConfigured(f"@task({key}=...): unknown task option {key!r}")
        attrs[key] = value
    cls = type(fun.__name__, (base,), attrs)
    task: Task[Any, Any] = cls()
    return task
