"""Tasks for the canvas tests: ``celeriac -A tests.apps.canvas_tasks worker``.

Callbacks and errbacks are observed through the result backend, never a side channel:
an old-style errback frozen with a known id stores its own result under that id, and a
new-style errback (``request, exc, traceback``) runs in the worker and records what it
saw with ``record()`` under a probe id the test chose.
"""

from __future__ import annotations

from typing import Any

from celeriac import Celery, Task, chain, group, states

app = Celery("tests.apps.canvas_tasks")


class CanvasError(Exception):
    """Registered: clients rebuild it with its own type."""


app.register_exception(CanvasError)


def record(probe: str, value: Any) -> None:
    """Store ``value`` as the SUCCESS result of the made-up task id ``probe``."""
    app.backend.store([{"status": states.SUCCESS, "result": value, "traceback": None,
                        "children": [], "date_done": None, "task_id": probe}])


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def mul(x: int, y: int) -> int:
    return x * y


@app.task
def tsum(values: list[int]) -> int:
    return sum(values)


@app.task
def identity(value: Any) -> Any:
    return value


@app.task
def collect(*values: Any) -> list[Any]:
    return list(values)


@app.task
def fail(message: str = "canvas failure", *extra: Any) -> None:
    raise CanvasError(message)


@app.task
def fail_if(value: int, bad: int) -> int:
    if value == bad:
        raise CanvasError(f"bad value {value}")
    return value


@app.task(bind=True)
def whoami(self: Task[Any, Any], *args: Any) -> dict[str, Any]:
    r = self.request
    return {"id": r.id, "root_id": r.root_id, "parent_id": r.parent_id, "group": r.group,
            "group_index": r.group_index, "args": list(args)}


@app.task
def on_error_id(task_id: str) -> str:
    """Celery's classic errback: called (as a task) with the failed task's id."""
    return task_id


@app.task
def on_error_full(request: Any, exc: BaseException, traceback: Any, probe: str) -> None:
    """Celery's new errback form, run in the worker: records what it was given."""
    record(probe, {"task_id": request.id, "exc_type": type(exc).__name__, "exc": str(exc),
                   "group": request.group})


@app.task
def spawn(n: int) -> str:
    """Sends a group from inside a task: it becomes this task's child (Celery's trail)."""
    return str(group(add.s(i, i) for i in range(n)).delay().id)


@app.task(bind=True)
def replaced_by(self: Task[Any, Any], value: int, kind: str = "task") -> Any:
    """Replaces itself with a task, a chain or a group built from ``value``."""
    if kind == "task":
        return self.replace(add.s(value, 100))
    if kind == "chain":
        return self.replace(chain(add.s(value, 1), mul.s(10)))
    if kind == "failing-chain":
        return self.replace(chain(fail.si(f"replaced {value}"), add.s(1)))
    if kind == "group":
        return self.replace(group(add.s(value, 1), add.s(value, 2)))
    raise ValueError(kind)


@app.task(bind=True)
def grows_chord(self: Task[Any, Any], value: int) -> int:
    """Adds a member to its own chord's header, then returns ``value``."""
    self.add_to_chord(identity.s(value * 1000))
    return value
