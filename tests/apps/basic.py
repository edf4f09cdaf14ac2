"""A small task module for worker tests: `celeriac -A tests.apps.basic worker`."""

from __future__ import annotations

import os
import time

from celeriac import Celery

app = Celery("tests.apps.basic")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def fail(message: str = "bad thing") -> None:
    raise ValueError(message)


@app.task
def sleep_then(seconds: float, value: object = None) -> object:
    time.sleep(seconds)
    return value


@app.task(bind=True)
def whoami(self) -> dict:  # type: ignore[type-arg]
    return {"pid": os.getpid(), "hostname": self.request.hostname, "retries": self.request.retries}
