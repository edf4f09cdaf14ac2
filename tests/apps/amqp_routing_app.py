"""Tasks and settings for the RabbitMQ routing, TLS and restart tests.

A worker reads its routing settings from the environment so one module serves every test:
``CELERIAC_TEST_CONF`` is a JSON object of settings (``task_queues`` in dict form, and
``worker_direct``...), and ``CELERIAC_TEST_KOMBU_BROADCAST=name`` adds kombu's
``Broadcast(name)`` to ``task_queues``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from celeriac import Celery

app = Celery("tests.apps.amqp_routing_app")
app.conf.result_backend = "rpc://"


def settings_from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, Any]:
    conf: dict[str, Any] = json.loads(environ.get("CELERIAC_TEST_CONF") or "{}")
    name = environ.get("CELERIAC_TEST_KOMBU_BROADCAST")
    if name:
        from kombu.common import Broadcast

        conf["task_queues"] = [*(conf.get("task_queues") or []), Broadcast(name)]
    return conf


app.conf.update(settings_from_env())


@app.task(bind=True)
def where(self: Any, path: str, key: str) -> str:
    """Appends ``<key> <hostname> <exchange> <routing key>`` to ``path``; returns the host."""
    info = self.request.delivery_info or {}
    with open(path, "a") as f:
        f.write(f"{key} {self.request.hostname} {info.get('exchange')!s} "
                f"{info.get('routing_key')!s}\n")
    return str(self.request.hostname)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(ignore_result=True)
def mark(path: str, key: str, seconds: float = 0.0) -> None:
    """Sleeps ``seconds``, then appends ``key`` to ``path`` (runs are counted by the test)."""
    if seconds:
        time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{key}\n")


HOST = socket.gethostname()
