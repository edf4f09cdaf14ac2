"""Tasks for the app/calling/result API tests: `celeriac -A tests.apps.api worker`.

The worker reads two settings from the environment so one module serves several tests:
``API_ACCEPT`` (comma-separated accept_content) and ``API_RESULT_EXPIRES`` (seconds).
"""

from __future__ import annotations

import os
from typing import Any

from celeriac import Celery, Task

app = Celery("tests.apps.api")
if os.environ.get("API_ACCEPT"):
    app.conf.accept_content = os.environ["API_ACCEPT"].split(",")
if os.environ.get("API_RESULT_EXPIRES"):
    app.conf.result_expires = float(os.environ["API_RESULT_EXPIRES"])


class RegisteredError(Exception):
    """Registered with the app, so clients rebuild it with its own type."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


app.register_exception(RegisteredError)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def echo(*args: object, **kwargs: object) -> dict:  # type: ignore[type-arg]
    return {"args": list(args), "kwargs": kwargs}


@app.task(bind=True)
def request_info(self) -> dict:  # type: ignore[type-arg]
    r = self.request
    return {
        "id": r.id, "task": r.task, "args": list(r.args), "kwargs": r.kwargs,
        "retries": r.retries, "hostname": r.hostname, "root_id": r.root_id,
        "parent_id": r.parent_id, "is_eager": r.is_eager,
        "called_directly": r.called_directly, "reply_to": r.reply_to,
        "correlation_id": r.correlation_id, "origin": r.origin,
        "routing_key": (r.delivery_info or {}).get("routing_key"),
        "x_custom": (r.headers or {}).get("x-custom"),
    }


@app.task
def raise_registered(message: str, code: int) -> None:
    raise RegisteredError(message, code)


@app.task
def raise_builtin(kind: str, message: str) -> None:
    raise {"KeyError": KeyError, "ValueError": ValueError, "ZeroDivisionError":
           ZeroDivisionError}[kind](message)


@app.task
def raise_worker_only(message: str) -> None:
    # The client never imports this module, so it cannot rebuild the type.
    from tests.apps.api_worker_only import WorkerOnlyError

    raise WorkerOnlyError(message, 7)


@app.task
def get_inside() -> int:
    # Waiting on another task's result inside a task is refused (it can deadlock).
    return add.delay(1, 1).get(timeout=5)  # type: ignore[no-any-return]


@app.task(bind=True)
def progress(self, steps: int) -> str:  # type: ignore[no-untyped-def]
    for step in range(steps):
        self.update_state(state="PROGRESS", meta={"current": step + 1, "total": steps})
    return "done"


class Wrapping(Task):  # type: ignore[type-arg]
    """A base class that wraps every run by overriding __call__, as Celery users do."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outer = self.request.id
        return {"outer_id": outer, "inner": super().__call__(*args, **kwargs)}


@app.task(base=Wrapping, bind=True)
def wrapped(self, x: int) -> dict:  # type: ignore[no-untyped-def, type-arg]
    return {"id": self.request.id, "x": x, "called_directly": self.request.called_directly}


@app.task(bind=True)
def retry_to_parking(self, secret: str) -> None:  # type: ignore[no-untyped-def]
    # The next attempt goes to a queue no worker reads, so a test can look at it.
    raise self.retry(countdown=0, queue="parking", exc=KeyError("again"))
