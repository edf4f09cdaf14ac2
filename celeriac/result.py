"""Handles on results: AsyncResult, EagerResult, ResultSet and GroupResult."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from celeriac import states
from celeriac.exceptions import IncompleteStream, TaskRevokedError, TimeoutError
from celeriac.protocol.errors import exception_from_dict
from celeriac.protocol.message import parse_time

if TYPE_CHECKING:
    from celeriac.app import Celery
    from celeriac.backends.base import TaskMeta

R = TypeVar("R")


def _assert_not_in_task(app: Celery) -> None:
    from celeriac.task import current_request

    request = current_request()
    if request is not None and not request.is_eager and not request.called_directly:
        raise RuntimeError(
            "Never call result.get() within a task: it can deadlock the worker "
            "(see Celery's 'Avoid launching synchronous subtasks'); pass "
            "disable_sync_subtasks=False if you accept the risk"
        )


class AsyncResult(Generic[R]):
    """The state and result of a task, read from the app's result backend."""

    def __init__(
        self,
        id: str,
        backend: Any = None,
        task_name: str | None = None,
        app: Celery | None = None,
        parent: AsyncResult[Any] | None = None,
    ) -> None:
        from celeriac.app import current_app

        self.app = app or current_app()
        self.id = self.task_id = str(id)
        self.task_name = task_name
        self.parent = parent
        self._cache: TaskMeta | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.id}>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return other.id == self.id
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def backend(self) -> Any:
        return self.app.backend

    def _meta(self) -> TaskMeta:
        if self._cache is not None:
            return self._cache
        meta = self.backend.get(self.id) or {"status": states.PENDING, "result": None}
        if meta.get("status") in states.READY_STATES:
            self._cache = meta
        return meta

    def _value(self, meta: TaskMeta) -> Any:
        status = meta.get("status")
        if status in states.EXCEPTION_STATES:
            return exception_from_dict(meta.get("result"), self.app._exception_registry)
        return meta.get("result")

    @property
    def state(self) -> str:
        return str(self._meta().get("status", states.PENDING))

    status = state

    @property
    def result(self) -> Any:
        return self._value(self._meta())

    info = result

    @property
    def traceback(self) -> str | None:
        return self._meta().get("traceback")

    @property
    def date_done(self) -> datetime | None:
        return parse_time(self._meta().get("date_done"))

    @property
    def children(self) -> list[AsyncResult[Any]]:
        return [result_from_tuple(c, self.app) for c in self._meta().get("children") or []]

    @property
    def name(self) -> str | None:
        return self._meta().get("name") or self.task_name

    @property
    def args(self) -> Any:
        return self._meta().get("args")

    @property
    def kwargs(self) -> Any:
        return self._meta().get("kwargs")

    @property
    def worker(self) -> str | None:
        return self._meta().get("worker")

    @property
    def retries(self) -> int | None:
        return self._meta().get("retries")

    @property
    def queue(self) -> str | None:
        return self._meta().get("queue")

    def ready(self) -> bool:
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state == states.FAILURE

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        no_ack: bool = True,
        follow_parents: bool = True,
        callback: Callable[..., Any] | None = None,
        on_message: Callable[..., Any] | None = None,
        on_interval: Callable[[], Any] | None = None,
        disable_sync_subtasks: bool = True,
        **_: Any,
    ) -> R:
        """Wait for the task to finish; return its result or raise its exception."""
        if disable_sync_subtasks:
            _assert_not_in_task(self.app)
        meta = self._cache
        if meta is None:
            # As Celery: while waiting, a failed parent (an earlier step of a chain, after
            # which this task will never run) raises its error instead of a timeout.
            parents: dict[str, AsyncResult[Any]] = {}
            node = self.parent if follow_parents and propagate else None
            while isinstance(node, AsyncResult) and node.id not in parents:
                parents[node.id] = node
                node = node.parent
            # ``interval`` bounds one wait on the backend's push before a re-read.
            waiting = self.backend.wait([self.id, *parents], timeout,
                                        interval=max(interval, 1.0))
            try:
                for found in waiting:
                    found_id = found.get("task_id", self.id)
                    if found_id == self.id or found_id not in parents:
                        meta = found
                        break
                    if found.get("status") in states.PROPAGATE_STATES:
                        parent = parents[found_id]
                        parent._cache = found
                        parent.get(propagate=True, follow_parents=False,
                                   disable_sync_subtasks=False)
            finally:
                close = getattr(waiting, "close", None)
                if close is not None:
                    close()  # stop waiting on parents that no longer matter
            assert meta is not None
            self._cache = meta
        if on_message is not None:
            on_message(meta)
        value = self._value(meta)
        if callback is not None:
            callback(self.id, value)
        if propagate and meta.get("status") in states.PROPAGATE_STATES:
            if isinstance(value, BaseException):
                raise value
            raise TaskRevokedError(str(value))
        return value

    wait = get

    def forget(self) -> None:
        self._cache = None
        self.backend.forget(self.id)

    def revoke(
        self, connection: Any = None, terminate: bool = False, signal: str | None = None,
        wait: bool = False, timeout: float | None = None,
    ) -> None:
        self.app.control.revoke(self.id, terminate=terminate, signal=signal)

    def as_tuple(self) -> list[Any]:
        parent = self.parent
        return [[self.id, parent.as_tuple() if parent else None], None]

    def iterdeps(self, intermediate: bool = False) -> Iterator[tuple[Any, Any]]:
        """(parent, result) for this result and its children, breadth first.

        Raises IncompleteStream on a result that is not ready (its children are not
        known yet), unless ``intermediate``.
        """
        stack: deque[tuple[Any, Any]] = deque([(None, self)])
        while stack:
            parent, node = stack.popleft()
            yield parent, node
            if node.ready():
                stack.extend((node, child) for child in node.children or ())
            elif not intermediate:
                raise IncompleteStream()

    def collect(self, intermediate: bool = False, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
        """(result, value) for this result and every child (a chain's next steps,
        callbacks, a group's members), breadth first, as Celery's ``collect()``."""
        kwargs.setdefault("disable_sync_subtasks", False)
        for _, node in self.iterdeps(intermediate=intermediate):
            yield node, node.get(**kwargs)


class EagerResult(AsyncResult[R]):
    """The result of a task run in this process by ``apply()``."""

    def __init__(
        self, id: str, ret_value: Any, state: str, traceback: str | None = None,
        app: Celery | None = None, name: str | None = None,
    ) -> None:
        super().__init__(id, app=app, task_name=name)
        self._state = state
        self._return = ret_value
        self._traceback = traceback

    def _meta(self) -> TaskMeta:
        return {"status": self._state, "result": self._return, "traceback": self._traceback}

    def _value(self, meta: TaskMeta) -> Any:
        return self._return

    def get(self, timeout: float | None = None, propagate: bool = True,  # type: ignore[override]
            **_: Any) -> R:
        if propagate and self._state in states.PROPAGATE_STATES:
            if isinstance(self._return, BaseException):
                raise self._return
            raise TaskRevokedError(str(self._return))
        return self._return

    wait = get  # type: ignore[assignment]

    def forget(self) -> None:
        pass

    def revoke(self, *args: Any, **kwargs: Any) -> None:
        self._state = states.REVOKED


# ResultSet.join reads results in windows that double while they are all ready (up to
# this many per round trip) and shrink to one when it has to wait: every result is read
# a bounded number of times, so joining n results costs O(n), not O(n^2).
_JOIN_WINDOW = 1000


class ResultSet:
    """Several results waited on together (in order)."""

    supports_native_join = True

    def __init__(self, results: Sequence[Any], app: Celery | None = None,
                 **_: Any) -> None:
        from celeriac.app import current_app

        self.app = app or current_app()
        self.results = list(results)

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.results)

    def __getitem__(self, index: int) -> Any:
        return self.results[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ResultSet):
            return other.results == self.results
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(r.id for r in self.results))

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: [{', '.join(r.id for r in self.results)}]>"

    def add(self, result: Any) -> None:
        if result not in self.results:
            self.results.append(result)

    def update(self, results: Sequence[Any]) -> None:
        for result in results:
            self.add(result)

    def remove(self, result: Any) -> None:
        if isinstance(result, str):
            result = AsyncResult(result, app=self.app)
        self.results.remove(result)

    def discard(self, result: Any) -> None:
        try:
            self.remove(result)
        except ValueError:
            pass

    def clear(self) -> None:
        self.results.clear()

    # -- state, read in one round trip -------------------------------------------------------

    def _read(self) -> None:
        """Cache the documents of the results that are ready (one read for all)."""
        pending = [r.id for r in self.results
                   if isinstance(r, AsyncResult) and r._cache is None
                   and not isinstance(r, EagerResult)]
        if pending:
            _cache_ready(self.app, self.results, self.app.backend.get_many(pending))

    def _states(self) -> list[str]:
        self._read()
        out = []
        for r in self.results:
            if isinstance(r, ResultSet):
                out.append(states.SUCCESS if r.successful() else
                           states.FAILURE if r.failed() else
                           states.SUCCESS if r.ready() else states.PENDING)
            elif isinstance(r, EagerResult) or r._cache is not None:
                out.append(r.state)
            else:
                out.append(states.PENDING)
        return out

    def completed_count(self) -> int:
        """How many results succeeded."""
        return sum(1 for state in self._states() if state == states.SUCCESS)

    def ready(self) -> bool:
        return all(state in states.READY_STATES for state in self._states())

    def successful(self) -> bool:
        return all(state == states.SUCCESS for state in self._states())

    def failed(self) -> bool:
        return any(state == states.FAILURE for state in self._states())

    def waiting(self) -> bool:
        return not self.ready()

    def revoke(self, connection: Any = None, terminate: bool = False,
               signal: str | None = None, wait: bool = False, timeout: float | None = None,
               **_: Any) -> None:
        self.app.control.revoke(list(_leaf_ids(self.results)), terminate=terminate,
                                signal=signal)

    def forget(self) -> None:
        for r in self.results:
            r.forget()

    def join(
        self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
        callback: Callable[[str, Any], Any] | None = None, no_ack: bool = True,
        on_message: Callable[..., Any] | None = None,
        on_interval: Callable[[], Any] | None = None,
        disable_sync_subtasks: bool = True, **_: Any,
    ) -> list[Any]:
        """The results in order; raises the first failure met (with ``propagate``).

        With ``callback`` each ``(task id, value)`` is passed to it instead of collected.
        """
        if disable_sync_subtasks:
            _assert_not_in_task(self.app)
        deadline = None if timeout is None else time.monotonic() + timeout
        backend = self.app.backend
        results, values, window, pos = self.results, [], 1, 0

        def left() -> float | None:
            if deadline is None:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("The operation timed out.")
            return remaining

        while pos < len(results):
            r = results[pos]
            if isinstance(r, ResultSet):
                value: Any = r.join(timeout=left(), propagate=propagate, interval=interval,
                                    disable_sync_subtasks=False)
            elif isinstance(r, EagerResult) or r._cache is not None:
                value = r.get(propagate=propagate, disable_sync_subtasks=False)
            else:
                # Read a window of the results from here on; all ready: the window grows.
                ids: list[str] = []
                end = pos
                while end < len(results) and len(ids) < window:
                    x = results[end]
                    if isinstance(x, AsyncResult) and x._cache is None \
                            and not isinstance(x, EagerResult):
                        ids.append(x.id)
                    end += 1
                _cache_ready(self.app, results[pos:end], backend.get_many(ids))
                if r._cache is not None:
                    window = min(window * 2, _JOIN_WINDOW)
                    continue
                window = 1
                value = r.get(timeout=left(), propagate=propagate, interval=interval,
                              on_message=on_message, disable_sync_subtasks=False)
            if callback is not None:
                callback(r.id, value)
            else:
                values.append(value)
            pos += 1
        return values

    get = join

    def join_native(self, *args: Any, **kwargs: Any) -> list[Any]:
        return self.join(*args, **kwargs)

    def iterate(self, timeout: float | None = None, propagate: bool = True,
                interval: float = 0.5) -> Iterator[Any]:
        yield from self.join(timeout=timeout, propagate=propagate, interval=interval)


def _cache_ready(app: Celery, results: Sequence[Any], metas: dict[str, TaskMeta]) -> None:
    for r in results:
        if isinstance(r, AsyncResult) and r._cache is None:
            meta = metas.get(r.id)
            if meta is not None and meta.get("status") in states.READY_STATES:
                r._cache = meta


def _leaf_ids(results: Sequence[Any]) -> Iterator[str]:
    for r in results:
        if isinstance(r, ResultSet):
            yield from _leaf_ids(r.results)
        else:
            yield r.id


class GroupResult(ResultSet):
    """The results of a group, with the group's id (``save()``/``restore()`` by id)."""

    def __init__(
        self, id: str | None = None, results: Sequence[Any] = (),
        parent: Any = None, app: Celery | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(results, app=app, **kwargs)
        self.id = id
        self.parent = parent

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(r.id or '' for r in self.results)}]>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GroupResult):
            return other.id == self.id and other.results == self.results
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def children(self) -> list[Any]:
        return self.results

    def as_tuple(self) -> list[Any]:
        return [[self.id, self.parent.as_tuple() if self.parent else None],
                [r.as_tuple() for r in self.results]]

    def save(self, backend: Any = None) -> GroupResult:
        """Store the group's membership, so ``GroupResult.restore(id)`` finds it."""
        (backend or self.app.backend).save_group(str(self.id), self.as_tuple())
        return self

    def delete(self, backend: Any = None) -> None:
        (backend or self.app.backend).delete_group(str(self.id))

    @classmethod
    def restore(cls, id: str, backend: Any = None, app: Celery | None = None) -> GroupResult | None:
        from celeriac.app import current_app

        app = app or current_app()
        data = (backend or app.backend).restore_group(id)
        if data is None:
            return None
        restored = result_from_tuple(data, app)
        return restored if isinstance(restored, GroupResult) else None


def result_from_tuple(data: Any, app: Celery) -> Any:
    """Rebuild a result from Celery's tuple form (``[[id, parent], children]``)."""
    (task_id, parent), children = data
    parent_result = result_from_tuple(parent, app) if parent else None
    if children is not None:
        return GroupResult(task_id, [result_from_tuple(c, app) for c in children], app=app)
    return AsyncResult(task_id, app=app, parent=parent_result)
