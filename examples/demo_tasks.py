"""The demo's tasks: `celeriac -A demo_tasks worker` runs them."""

from __future__ import annotations

from celeriac import Celery

# No broker URL: the embedded SQLite file (celeriac.db in the working directory).
app = Celery("demo_tasks")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(bind=True, max_retries=3, retry_backoff=True)
def checksum(self, text: str) -> int:  # type: ignore[no-untyped-def]
    return sum(text.encode()) % 65521
