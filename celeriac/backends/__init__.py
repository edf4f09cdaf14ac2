"""Result backends by URL scheme. Adding one is a module plus a line in ``SCHEMES``."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from celeriac.backends.base import ResultBackend, TaskMeta
from celeriac.brokers import scheme_of
from celeriac.exceptions import ImproperlyConfigured

SCHEMES: dict[str, str] = {
    "memory": "celeriac.backends.memory:MemoryBackend",
    "cache+memory": "celeriac.backends.memory:MemoryBackend",
    "sqlite": "celeriac.backends.sqlite:SQLiteBackend",
    "rpc": "celeriac.backends.rpc:RPCBackend",
    "redis": "celeriac.backends.redis:RedisBackend",
    "rediss": "celeriac.backends.redis:RedisBackend",
    "sentinel": "celeriac.backends.redis:RedisBackend",
}

__all__ = ["SCHEMES", "ResultBackend", "TaskMeta", "connect"]


def connect(url: str, **options: Any) -> ResultBackend:
    scheme = url.split("://", 1)[0] if url.startswith("cache+") else scheme_of(url)
    target = SCHEMES.get(scheme)
    if target is None:
        raise ImproperlyConfigured(
            f"result_backend={url!r}: unknown scheme {scheme!r}; supported: {sorted(SCHEMES)}"
        )
    module_name, class_name = target.split(":")
    backend: ResultBackend = getattr(import_module(module_name), class_name)(url, **options)
    return backend
