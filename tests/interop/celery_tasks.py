"""The real Celery's side of the interop tests: `celery -A tests.interop.celery_tasks worker`.

Same task names as ``tests/apps/interop_tasks.py``. The worker reads its broker and backend
URLs and (on Redis) its key prefix from the environment (``INTEROP_BROKER``, ``INTEROP_BACKEND``,
``INTEROP_PREFIX``); the tests build client apps with :func:`make_app`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

IMPL = "celery"


def append(d: str, name: str, line: str) -> None:
    with open(os.path.join(d, name), "a") as f:
        f.write(line + "\n")


def make_app(broker: str, backend: str, prefix: str, **conf: Any) -> Celery:
    app = Celery("interop", broker=broker, backend=backend, set_as_current=False)
    if prefix:  # Redis: the test's keys live under this prefix
        app.conf.update(broker_transport_options={"global_keyprefix": prefix},
                        result_backend_transport_options={"global_keyprefix": prefix})
    app.conf.update(
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        **conf,
    )

    @app.task(name="interop.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="interop.mul", shared=False)
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="interop.xsum", shared=False)
    def xsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="interop.echo", shared=False)
    def echo(*args: object, **kwargs: object) -> dict[str, object]:
        return {"args": list(args), "kwargs": kwargs, "impl": IMPL}

    @app.task(name="interop.fail", shared=False)
    def fail(message: str = "bad thing") -> None:
        raise ValueError(message)

    @app.task(name="interop.record", shared=False)
    def record(d: str, name: str, value: str) -> str:
        append(d, name, f"{value} {time.time()!r} {IMPL}")
        return value

    @app.task(name="interop.retrying", bind=True, max_retries=5, shared=False)
    def retrying(self: Any, fails: int) -> dict[str, object]:
        if self.request.retries < fails:
            raise self.retry(exc=KeyError(f"again {self.request.retries}"), countdown=0.2)
        return {"retries": self.request.retries, "impl": IMPL}

    return app


if os.environ.get("INTEROP_BROKER"):
    app = make_app(os.environ["INTEROP_BROKER"], os.environ["INTEROP_BACKEND"],
                   os.environ["INTEROP_PREFIX"])
