"""Built-in tasks every app has (registered when the app is finalized).

These are the names Celery clients may send: ``celery.chord_unlock`` (chords on result
backends without an atomic counter), ``celery.map``/``celery.starmap``/``celery.chunks``
(``task.map()``, ``task.starmap()``, ``task.chunks()``), ``celery.accumulate`` (gathers
results; our chords use it for header members that end in a group), the legacy
``celery.group``/``celery.chain``/``celery.chord``, and ``celery.backend_cleanup``.

Our own clients never send ``celery.chord_unlock``: their chords complete through the
backend's atomic join (no task polls). It is here so a Celery client whose backend lacks
native chords still gets its chords run by celeriac workers; it re-checks by retrying
with a countdown, which parks the message in the broker (no worker sleeps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celeriac import states

if TYPE_CHECKING:
    from celeriac.app import Celery
    from celeriac.task import Task


def register_builtins(app: Celery) -> None:
    for make in _BUILTINS:
        make(app)


_BUILTINS: list[Callable[[Celery], Any]] = []


def _builtin(make: Callable[[Celery], Any]) -> Callable[[Celery], Any]:
    _BUILTINS.append(make)
    return make


def _missing(app: Celery, name: str) -> bool:
    return not dict.__contains__(app.tasks, name)  # no lookup: it would finalize again


@_builtin
def _backend_cleanup(app: Celery) -> None:
    if _missing(app, "celery.backend_cleanup"):
        @app.task(name="celery.backend_cleanup")
        def backend_cleanup() -> int:
            return app.backend.cleanup()


@_builtin
def _accumulate(app: Celery) -> None:
    if _missing(app, "celery.accumulate"):
        @app.task(name="celery.accumulate", typing=False)
        def accumulate(*args: Any, index: int | None = None) -> Any:
            return args[index] if index is not None else list(args)


@_builtin
def _map(app: Celery) -> None:
    from celeriac.canvas import maybe_signature

    if _missing(app, "celery.map"):
        @app.task(name="celery.map", typing=False)
        def xmap(task: Any, it: Any) -> list[Any]:
            sig = maybe_signature(task, app)
            return [sig(item) for item in it]

    if _missing(app, "celery.starmap"):
        @app.task(name="celery.starmap", typing=False)
        def xstarmap(task: Any, it: Any) -> list[Any]:
            sig = maybe_signature(task, app)
            return [sig(*item) for item in it]


@_builtin
def _chunks(app: Celery) -> None:
    if _missing(app, "celery.chunks"):
        @app.task(name="celery.chunks", typing=False)
        def chunks(task: Any, it: Any, n: int) -> Any:
            from celeriac.canvas import chunks as chunks_sig

            return chunks_sig(task, it, n, app=app).apply_async().as_tuple()


@_builtin
def _chord_unlock(app: Celery) -> None:
    if not _missing(app, "celery.chord_unlock"):
        return

    @app.task(name="celery.chord_unlock", bind=True, max_retries=None, ignore_result=True,
              default_retry_delay=float(app.conf.get("result_chord_retry_interval") or 1.0),
              typing=False)
    def unlock_chord(self: Task[Any, Any], group_id: str, callback: Any,
                     interval: float | None = None, max_retries: int | None = None,
                     result: Any = None, **kwargs: Any) -> None:
        from celeriac.canvas import maybe_signature
        from celeriac.exceptions import ChordError, Retry
        from celeriac.result import GroupResult, result_from_tuple

        if interval is None:
            interval = self.default_retry_delay
        body = maybe_signature(callback, app)
        deps = GroupResult(group_id, [result_from_tuple(r, app) for r in result or ()],
                           app=app)
        if not deps.ready():
            try:
                raise self.retry(countdown=interval, max_retries=max_retries)
            except Retry:
                raise
            except Exception as exc:  # out of retries: fail the chord rather than hang
                app._fail_signature(body, ChordError(
                    f"chord_unlock could not be retried: {exc!r}"), errbacks=True)
                raise
        values = deps.join(propagate=False, disable_sync_subtasks=False)
        for member, value in zip(deps.results, values, strict=True):
            if member.state in states.PROPAGATE_STATES:
                error = ChordError(f"Dependency {member.id} raised {value!r}")
                if isinstance(value, BaseException):
                    error.__cause__ = value
                app._fail_signature(body, error, errbacks=True)
                return
        body._apply([values], None, {})


@_builtin
def _legacy(app: Celery) -> None:
    from celeriac.canvas import chord, group, maybe_signature

    if _missing(app, "celery.group"):
        @app.task(name="celery.group", typing=False)
        def group_task(tasks: Any, result: Any, group_id: str, partial_args: Any,
                       add_to_parent: bool = True) -> Any:
            sigs = [maybe_signature(t, app) for t in tasks]
            return group(sigs, app=app).apply_async(partial_args, task_id=group_id).as_tuple()

    if _missing(app, "celery.chain"):
        @app.task(name="celery.chain", typing=False)
        def chain_task(*args: Any, **kwargs: Any) -> None:
            raise NotImplementedError("chain is not a real task")

    if _missing(app, "celery.chord"):
        @app.task(name="celery.chord", typing=False)
        def chord_task(header: Any, body: Any, partial_args: Any = (), interval: Any = None,
                       countdown: Any = 1, max_retries: Any = None, eager: bool = False,
                       **kwargs: Any) -> Any:
            tasks = header.get("kwargs", {}).get("tasks", ()) if isinstance(header, dict) \
                and header.get("subtask_type") == "group" else header
            sig = chord([maybe_signature(t, app) for t in tasks], maybe_signature(body, app),
                        app=app)
            result = sig.apply_async(partial_args, **{k: v for k, v in kwargs.items()
                                                      if k not in ("kwargs",)})
            return result.as_tuple()
