"""Brokers by URL scheme. Adding one is a module plus a line in ``SCHEMES``."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from celeriac.brokers.base import Broker, Consumer, DeadLetter, Delivery, Subscriber
from celeriac.exceptions import ImproperlyConfigured

SCHEMES: dict[str, str] = {
    "memory": "celeriac.brokers.memory:MemoryBroker",
    "sqlite": "celeriac.brokers.sqlite:SQLiteBroker",
    "amqp": "celeriac.brokers.amqp:AMQPBroker",
    "amqps": "celeriac.brokers.amqp:AMQPBroker",
    "pyamqp": "celeriac.brokers.amqp:AMQPBroker",
    "redis": "celeriac.brokers.redis:RedisBroker",
    "rediss": "celeriac.brokers.redis:RedisBroker",
    "sentinel": "celeriac.brokers.redis:RedisBroker",
}

__all__ = ["SCHEMES", "Broker", "Consumer", "DeadLetter", "Delivery", "Subscriber", "connect"]


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].split("+", 1)[0] if "://" in url else url


def connect(url: str, options: dict[str, Any] | None = None, setting: str = "broker_url") -> Broker:
    scheme = scheme_of(url)
    target = SCHEMES.get(scheme)
    if target is None:
        raise ImproperlyConfigured(
            f"{setting}={url!r}: unknown scheme {scheme!r}; supported: {sorted(SCHEMES)}"
        )
    module_name, class_name = target.split(":")
    cls = getattr(import_module(module_name), class_name)
    broker: Broker = cls(url, **(options or {}))
    return broker
