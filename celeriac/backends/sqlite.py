"""Result store in an SQLite file (WAL); waiters wake on a Unix datagram, not by polling."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from celeriac.backends.base import ResultBackend, Waiter
from celeriac.brokers.sqlite import open_database, path_from_url
from celeriac.wakeup import Listener, Notifier, channel_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS celeriac_results (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    expires REAL,
    doc BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS celeriac_results_expires
    ON celeriac_results(expires) WHERE expires IS NOT NULL;
"""


class SQLiteWaiter(Waiter):
    def __init__(self, directory: str) -> None:
        self.listener = Listener(directory)

    def wait(self, timeout: float) -> None:
        self.listener.wait(timeout)

    def close(self) -> None:
        self.listener.close()


class SQLiteBackend(ResultBackend):
    def __init__(self, url: str = "sqlite://", synchronous: str = "NORMAL", **options: Any) -> None:
        super().__init__(url, **options)
        self.path = path_from_url(url)
        self._conn = open_database(self.path, synchronous)
        self._lock = threading.RLock()
        with self._lock:
            self._conn.executescript(SCHEMA)
        self._wake_dir = channel_dir(self.path, "results")
        self._notifier = Notifier(self._wake_dir)

    def _put(self, items: Sequence[tuple[str, str, bytes]], ttl: float | None) -> None:
        expires = time.time() + ttl if ttl else None
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO celeriac_results(key, status, expires, doc)"
                    " VALUES (?, ?, ?, ?)",
                    [(key, status, expires, doc) for key, status, doc in items],
                )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        self._notifier.notify()

    def _fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        now = time.time()
        found: dict[str, bytes] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, doc, expires in self._conn.execute(
                    f"SELECT key, doc, expires FROM celeriac_results WHERE key IN ({marks})",
                    list(chunk),
                ):
                    if expires is None or expires > now:
                        found[key] = bytes(doc)
        return [found.get(k) for k in keys]

    def _remove(self, keys: Sequence[str]) -> None:
        with self._lock:
            self._conn.executemany(
                "DELETE FROM celeriac_results WHERE key = ?", [(k,) for k in keys]
            )

    def waiter(self) -> Waiter:
        return SQLiteWaiter(self._wake_dir)

    def cleanup(self) -> int:
        with self._lock:
            return self._conn.execute(
                "DELETE FROM celeriac_results WHERE expires IS NOT NULL AND expires <= ?",
                (time.time(),),
            ).rowcount

    def close(self) -> None:
        with self._lock:
            self._notifier.close()
            self._conn.close()
