"""Routing through exchanges with a real Celery worker on the other side.

celeriac publishes through a topic exchange (a route naming ``exchange`` and
``routing_key``); a Celery worker consuming a queue bound to it runs the task and
celeriac reads the result. On RabbitMQ RabbitMQ routes it; on Redis celeriac resolves the
binding from ``task_queues`` and the envelope's ``delivery_info`` names the exchange and
routing key, as kombu writes it. (Celery clients reaching celeriac workers through
broadcast and worker-direct queues: tests/test_amqp_routing.py.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celeriac import Celery

Start = Callable[..., Any]

VIDEO = {"name": "interop-video", "exchange": "interop-media", "exchange_type": "topic",
         "routing_key": "media.video.#"}


def test_topic_route_reaches_a_celery_worker(celeriac_app: Celery,
                                             celery_worker: Start) -> None:
    celeriac_app.conf.task_queues = [VIDEO, "celery"]
    celeriac_app.conf.task_routes = {"interop.mul": {"exchange": "interop-media",
                                                     "routing_key": "media.video.sd"}}
    try:
        celery_worker("-Q", "interop-video")
        r = celeriac_app.send_task("interop.add", (2, 3), exchange="interop-media",
                                   routing_key="media.video.hd")
        assert r.get(timeout=30) == 5
        assert celeriac_app.send_task("interop.mul", (4, 5)).get(timeout=30) == 20
    finally:
        celeriac_app.conf.task_queues = None
        celeriac_app.conf.task_routes = None
