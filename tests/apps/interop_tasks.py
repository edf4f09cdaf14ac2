"""celeriac's side of the Celery interop tests: the same task names as
``tests/interop/celery_tasks.py`` (``interop.*``), so either kind of worker runs them.
"""

from __future__ import annotations

import os
import time

from celeriac import Celery

app = Celery("tests.apps.interop_tasks")
IMPL = "celeriac"


def append(d: str, name: str, line: str) -> None:
    with open(os.path.join(d, name), "a") as f:
        f.write(line + "\n")


@app.task(name="interop.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="interop.mul")
def mul(x: int, y: int) -> int:
    return x * y


@app.task(name="interop.xsum")
def xsum(values: list[int]) -> int:
    return sum(values)


@app.task(name="interop.echo")
def echo(*args: object, **kwargs: object) -> dict[str, object]:
    return {"args": list(args), "kwargs": kwargs, "impl": IMPL}


@app.task(name="interop.fail")
def fail(message: str = "bad thing") -> None:
    raise ValueError(message)


@app.task(name="interop.record")
def record(d: str, name: str, value: str) -> str:
    append(d, name, f"{value} {time.time()!r} {IMPL}")
    return value


@app.task(name="interop.retrying", bind=True, max_retries=5)
def retrying(self, fails: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    if self.request.retries < fails:
        raise self.retry(exc=KeyError(f"again {self.request.retries}"), countdown=0.2)
    return {"retries": self.request.retries, "impl": IMPL}
