"""In-process result store (``memory://``), shared by every backend with the same URL."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from celeriac.backends.base import ResultBackend, Waiter


class _Store:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.docs: dict[str, tuple[bytes, float | None]] = {}
        self.version = 0


_STORES: dict[str, _Store] = {}
_LOCK = threading.Lock()


class MemoryWaiter(Waiter):
    def __init__(self, store: _Store) -> None:
        self.store = store
        self.seen = store.version

    def wait(self, timeout: float) -> None:
        with self.store.cond:
            if self.store.version == self.seen:
                self.store.cond.wait(timeout)
            self.seen = self.store.version


class MemoryBackend(ResultBackend):
    def __init__(self, url: str = "memory://", **options: Any) -> None:
        super().__init__(url, **options)
        with _LOCK:
            self._store = _STORES.setdefault(url, _Store())

    def _put(self, items: Sequence[tuple[str, str, bytes]], ttl: float | None) -> None:
        expires = time.time() + ttl if ttl else None
        with self._store.cond:
            for key, _status, doc in items:
                self._store.docs[key] = (doc, expires)
            self._store.version += 1
            self._store.cond.notify_all()

    def _fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        now = time.time()
        with self._store.cond:
            found = [self._store.docs.get(k) for k in keys]
        return [f[0] if f and (f[1] is None or f[1] > now) else None for f in found]

    def _remove(self, keys: Sequence[str]) -> None:
        with self._store.cond:
            for key in keys:
                self._store.docs.pop(key, None)

    def waiter(self) -> Waiter:
        return MemoryWaiter(self._store)

    def cleanup(self) -> int:
        now = time.time()
        with self._store.cond:
            dead = [k for k, (_, exp) in self._store.docs.items() if exp is not None and exp <= now]
            for key in dead:
                del self._store.docs[key]
        return len(dead)
