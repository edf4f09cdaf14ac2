from __future__ import annotations

from tests.apps.proj.celery import app


@app.task
def mul(x: int, y: int) -> int:
    return x * y
