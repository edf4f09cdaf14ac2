"""Running one task: call it, classify the outcome, build the result document.

Shared by the worker and by eager ``apply()`` so both behave alike. Nothing here talks
to the broker except through the app (retries, callbacks and chain steps are sends).
"""

from __future__ import annotations

import os
import time
import traceback as tb
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.exceptions import Ignore, Reject, Retry
from celeriac.protocol.errors import exception_to_dict
from celeriac.task import Context, Task, exponential_backoff, pop_request, push_request

if TYPE_CHECKING:
    from celeriac.app import Celery
    from celeriac.backends.base import TaskMeta
    from celeriac.result import EagerResult


@dataclass(slots=True)
class Outcome:
    state: str
    retval: Any = None
    exc: BaseException | None = None
    traceback: str | None = None
    meta: TaskMeta | None = None  # the document to store; None stores nothing
    ack: bool = True  # False: the message is given back (requeue) or dead-lettered
    requeue: bool = False
    reason: str | None = None  # why the message is dead-lettered (ack False, requeue False)
    runtime: float = 0.0
    eager_result: Any = None


_second: tuple[int, str] = (-1, "")  # the last whole second formatted (one tuple: atomic)


def now_iso() -> str:
    """The time now as ``datetime.now(UTC).isoformat()`` writes it (the second's part cached)."""
    global _second
    t = time.time()
    sec = int(t)
    cached_sec, text = _second
    if cached_sec != sec:
        text = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second = (sec, text)
    micro = int((t - sec) * 1_000_000)
    if micro == 0:
        return f"{text}+00:00"  # isoformat() leaves out a zero fraction
    return f"{text}.{micro:06d}+00:00"


def build_meta(
    app: Celery,
    task_id: str,
    state: str,
    result: Any,
    request: Context | None,
    traceback: str | None = None,
    children: list[Any] | None = None,
    task: Task[Any, Any] | None = None,
) -> TaskMeta:
    """A result document exactly as Celery's backends write it."""
    meta: TaskMeta = {
        "status": state,
        "result": result,
        "traceback": traceback,
        "children": children or [],
        "date_done": now_iso() if state in states.READY_STATES else None,
        "task_id": task_id,
    }
    if request is not None:
        if request.reply_to and app.backend.wants_reply_to:
            meta["_reply_to"] = request.reply_to  # taken out again before it is sent
        if request.group:
            meta["group_id"] = request.group
        if request.parent_id:
            meta["parent_id"] = request.parent_id
        if app.conf["result_extended"]:  # item access: conf.name misses first (~1 us)
            meta.update(
                name=request.task or (task.name if task else None),
                args=list(request.args or ()),
                kwargs=request.kwargs or {},
                worker=request.hostname,
                retries=request.retries,
                queue=(request.delivery_info or {}).get("routing_key"),
            )
    return meta


def format_traceback(exc: BaseException) -> str:
    return "".join(tb.format_exception(type(exc), exc, exc.__traceback__))


def _ignores_result(app: Celery, task: Task[Any, Any], request: Context) -> bool:
    if request.ignore_result:
        return True
    if task.ignore_result is not None:
        return task.ignore_result
    return bool(app.conf["task_ignore_result"])


def _autoretry(
    task: Task[Any, Any], request: Context, exc: BaseException
) -> Retry | None:
    """Retry for ``autoretry_for`` exceptions; returns the Retry raised, if any."""
    if not task.autoretry_for or not isinstance(exc, tuple(task.autoretry_for)):
        return None
    if task.dont_autoretry_for and isinstance(exc, tuple(task.dont_autoretry_for)):
        return None
    options = dict(task.retry_kwargs or {})
    if task.retry_backoff and "countdown" not in options:
        factor = 1.0 if task.retry_backoff is True else float(task.retry_backoff)
        options["countdown"] = exponential_backoff(
            factor, request.retries, task.retry_backoff_max, task.retry_jitter
        )
    try:
        task.retry(exc=exc, **options)
    except Retry as retry:
        return retry
    return None


def execute(
    app: Celery, task: Task[Any, Any], request: Context, *, eager: bool = False,
    after_run: Callable[[], None] | None = None,
) -> Outcome:
    """Run ``task`` for ``request``; never raises for what the task does.

    ``after_run`` is called as soon as the task's code returns or raises, before the
    outcome is handled (the worker stops the soft time limit there, so the limit cannot
    fire in hooks, callbacks or result bookkeeping).
    """
    args, kwargs = request.args, request.kwargs
    task_id = str(request.id)
    started = time.monotonic()
    push_request(request)
    outcome: Outcome
    try:
        try:
            task.before_start(task_id, args, kwargs)
            # As Celery: a task class that overrides __call__ (to wrap every run) is called
            # through it; otherwise run() is called directly.
            fun = task if type(task).__call__ is not Task.__call__ else task.run
            retval = fun(*args, **kwargs)
        finally:
            if after_run is not None:
                after_run()
    except Retry as retry:
        outcome = _retried(app, task, request, retry)
    except Ignore:
        outcome = Outcome(states.IGNORED)
    except Reject as reject:
        outcome = Outcome(
            states.REJECTED, ack=False, requeue=bool(reject.requeue),
            reason=f"rejected by the task: {reject.reason!r}",
        )
    except Exception as exc:
        failure: BaseException = exc
        auto: Retry | None = None
        try:
            auto = _autoretry(task, request, exc)
        except Exception as final:
            # Past max_retries retry() raises the task's exception (or, without one,
            # MaxRetriesExceededError): the task fails with it.
            failure = final
        if auto is not None:
            outcome = _retried(app, task, request, auto)
        else:
            outcome = _failed(app, task, request, failure)
    else:
        outcome = _succeeded(app, task, request, retval)
    finally:
        pop_request()
    outcome.runtime = time.monotonic() - started
    try:
        task.after_return(
            outcome.state, outcome.retval if outcome.exc is None else outcome.exc,
            task_id, args, kwargs, None,
        )
    except Exception:
        app.log.exception("after_return of %s[%s] raised", task.name, task_id)
    return outcome


def _succeeded(app: Celery, task: Task[Any, Any], request: Context, retval: Any) -> Outcome:
    task_id = str(request.id)
    # What the task sent while it ran (Celery's trail), then its callbacks and next step.
    children: list[Any] = [r.as_tuple() for r in request.__dict__.get("children") or ()]
    # Callbacks and the next chain step are sent before the result is stored, as Celery
    # does, so a client that saw SUCCESS can follow ``children`` at once.
    if request.callbacks:
        for callback in request.callbacks:
            children.append(app._apply_callback(callback, retval, request))
    if request.chain:
        children.append(app._apply_chain_step(request.chain, retval, request))
    meta = None
    if not _ignores_result(app, task, request):
        meta = build_meta(app, task_id, states.SUCCESS, retval, request, None,
                          [c for c in children if c is not None], task)
    if request.chord and request.group:
        # Stored before the chord hears of it (as Celery does): once the body runs, every
        # header result can be read.
        early = None if request.is_eager else meta
        app._chord_part_done(request, states.SUCCESS, retval, meta=early)
        meta = meta if early is None else None
    try:
        task.on_success(retval, task_id, request.args, request.kwargs)
    except Exception:
        app.log.exception("on_success of %s[%s] raised", task.name, task_id)
    return Outcome(states.SUCCESS, retval, meta=meta)


def _failed(app: Celery, task: Task[Any, Any], request: Context, exc: BaseException) -> Outcome:
    task_id = str(request.id)
    trace = format_traceback(exc)
    meta = None
    store_errors = task.store_errors_even_if_ignored
    if store_errors is None:
        store_errors = app.conf.task_store_errors_even_if_ignored
    if not _ignores_result(app, task, request) or store_errors:
        meta = build_meta(app, task_id, states.FAILURE, exception_to_dict(exc), request, trace,
                          task=task)
    if request.chain:
        # The steps after this one will never run: they fail too (as in Celery 5.7), so
        # neither the chain's result nor a chord waiting on its last step hangs. Stored
        # with this task's own result, so whoever sees them fail can read which task did.
        first = None if request.is_eager else meta
        app._fail_chain(request.chain, exc, first=first)
        meta = meta if first is None else None
    early = None
    if request.chord and request.group and not request.chain:
        early = None if request.is_eager else meta  # stored before the chord hears of it
        meta = meta if early is None else None
    if request.errbacks:
        for errback in request.errbacks:
            app._apply_errback(errback, request, exc, trace)
    if request.chord and request.group:
        app._chord_part_done(request, states.FAILURE, exc, meta=early)
    try:
        task.on_failure(exc, task_id, request.args, request.kwargs, trace)
    except Exception:
        app.log.exception("on_failure of %s[%s] raised", task.name, task_id)
    expected = bool(task.throws) and isinstance(exc, tuple(task.throws))
    return Outcome(states.FAILURE, exc=exc, traceback=None if expected else trace, meta=meta)


def _retried(app: Celery, task: Task[Any, Any], request: Context, retry: Retry) -> Outcome:
    task_id = str(request.id)
    reason = retry.exc if retry.exc is not None else retry
    trace = format_traceback(retry)
    try:
        task.on_retry(reason, task_id, request.args, request.kwargs, trace)
    except Exception:
        app.log.exception("on_retry of %s[%s] raised", task.name, task_id)
    meta = build_meta(app, task_id, states.RETRY, exception_to_dict(reason), request, trace,
                      [[[task_id, None], None]], task)
    return Outcome(states.RETRY, exc=retry, meta=meta,
                   eager_result=getattr(retry, "eager_result", None))


# -- eager ----------------------------------------------------------------------------


def apply_eagerly(
    task: Task[Any, Any],
    args: list[Any],
    kwargs: dict[str, Any],
    task_id: str,
    *,
    link: Any = None,
    link_error: Any = None,
    throw: bool | None = None,
    retries: int = 0,
    options: dict[str, Any] | None = None,
) -> EagerResult[Any]:
    from celeriac.canvas import maybe_signature_list
    from celeriac.result import EagerResult

    app = task.app
    options = options or {}
    parent = _current_worker_request()
    while True:
        request = Context(
            id=task_id, task=task.name, args=args, kwargs=kwargs, retries=retries,
            is_eager=True, called_directly=False, hostname=f"eager@{os.uname().nodename}",
            root_id=(parent.root_id if parent else None) or task_id,
            parent_id=parent.id if parent else None,
            callbacks=maybe_signature_list(link, app),
            errbacks=maybe_signature_list(link_error, app),
            chain=options.get("chain"), group=options.get("group_id"),
            group_index=options.get("group_index"), chord=options.get("chord"),
            delivery_info={"is_eager": True}, headers=options.get("headers") or {},
            ignore_result=bool(options.get("ignore_result", False)),
        )
        outcome = execute(app, task, request, eager=True)
        if outcome.meta is not None and app.conf.task_store_eager_result:
            app.backend.store([outcome.meta])
        pending = request.eager_retry
        if outcome.state != states.RETRY or pending is None:
            break
        # As Celery's apply(): the next attempt runs once this one has returned (not
        # nested inside it), so each attempt's hooks run once, in order.
        args, kwargs = pending
        retries += 1
    throw = app.conf.task_eager_propagates if throw is None else throw
    if throw and outcome.exc is not None and outcome.state == states.FAILURE:
        raise outcome.exc
    value = outcome.exc if outcome.exc is not None else outcome.retval
    return EagerResult(task_id, value, outcome.state, outcome.traceback, app=app, name=task.name)


def _current_worker_request() -> Context | None:
    from celeriac.task import current_request

    request = current_request()
    if request is None or request.called_directly:
        return None
    return request


def new_id() -> str:
    return str(uuid.uuid4())


