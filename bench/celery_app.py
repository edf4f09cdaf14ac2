"""The same tasks for the real Celery: ``celery -A bench.celery_app worker -c 2``.

Configured from the environment by bench/drain.py: BENCH_CELERY_BROKER, BENCH_CELERY_BACKEND,
BENCH_CELERY_QUEUE and BENCH_CELERY_PREFIX (a key prefix unique to the run, so its keys can
be removed afterwards without touching anything else in Redis).
"""

from __future__ import annotations

import os
import time

from celery import Celery

_prefix = os.environ.get("BENCH_CELERY_PREFIX", "celeriac-bench:")

app = Celery("bench.celery_app")
app.conf.update(
    broker_url=os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/11"),
    result_backend=os.environ.get("BENCH_CELERY_BACKEND", "redis://127.0.0.1:6379/12"),
    task_default_queue=os.environ.get("BENCH_CELERY_QUEUE", "celeriac-bench"),
    broker_transport_options={"global_keyprefix": _prefix},
    result_backend_transport_options={"global_keyprefix": _prefix},
    broker_connection_retry_on_startup=True,
)


@app.task
def noop() -> None:
    return None


@app.task
def started_at() -> float:
    return time.time()
