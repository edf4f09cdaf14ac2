"""Result store in an SQLite file (WAL); waiters wake on a Unix datagram, not by polling."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from celeriac.backends.base import (
    CHORD_CLAIM_SECONDS,
    TASK_KEY_PREFIX,
    ChordJoin,
    ResultBackend,
    TaskMeta,
    Waiter,
)
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
CREATE TABLE IF NOT EXISTS celeriac_chords (
    group_id TEXT PRIMARY KEY,
    size INTEGER,
    extra INTEGER NOT NULL DEFAULT 0,
    count INTEGER NOT NULL DEFAULT 0,
    claim TEXT,
    claim_until REAL NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    expires REAL
);
CREATE TABLE IF NOT EXISTS celeriac_chord_parts (
    group_id TEXT NOT NULL,
    member TEXT NOT NULL,
    ord REAL NOT NULL,
    doc BLOB NOT NULL,
    PRIMARY KEY (group_id, member)
);
"""

# One chord's row: a counter kept next to the parts, so each header task costs O(1).
_CHORD_ROW = (
    "SELECT size, extra, count, claim, claim_until, done, expires"
    " FROM celeriac_chords WHERE group_id = ?"
)


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
        sql = (
            "INSERT OR REPLACE INTO celeriac_results(key, status, expires, doc) VALUES (?, ?, ?, ?)"
        )
        rows = [(key, status, expires, doc) for key, status, doc in items]
        with self._lock:
            if len(rows) == 1:
                # One statement is atomic by itself: no BEGIN/COMMIT round trips.
                self._conn.execute(sql, rows[0])
            else:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.executemany(sql, rows)
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
            now = time.time()
            self._conn.execute(
                "DELETE FROM celeriac_chord_parts WHERE group_id IN (SELECT group_id FROM"
                " celeriac_chords WHERE expires IS NOT NULL AND expires <= ?)", (now,))
            self._conn.execute(
                "DELETE FROM celeriac_chords WHERE expires IS NOT NULL AND expires <= ?", (now,))
            return self._conn.execute(
                "DELETE FROM celeriac_results WHERE expires IS NOT NULL AND expires <= ?",
                (now,),
            ).rowcount

    # -- chords: each step is one IMMEDIATE transaction ------------------------------------

    def _chord_txn(self, group_id: str) -> tuple[Any, ...]:
        """Begin a write transaction and return the chord's live row (created if absent).

        Caller holds the lock and commits. An expired chord is started afresh.
        """
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        now = time.time()
        expires = now + self.expires if self.expires else None
        row = conn.execute(_CHORD_ROW, (group_id,)).fetchone()
        if row is not None and row[6] is not None and row[6] <= now:
            conn.execute("DELETE FROM celeriac_chord_parts WHERE group_id = ?", (group_id,))
            conn.execute("DELETE FROM celeriac_chords WHERE group_id = ?", (group_id,))
            row = None
        if row is None:
            conn.execute("INSERT INTO celeriac_chords(group_id, expires) VALUES (?, ?)",
                         (group_id, expires))
            return (None, 0, 0, None, 0.0, 0, expires)
        return tuple(row)

    def _chord_write(self, group_id: str, fn: Any) -> Any:
        with self._lock:
            try:
                found = fn(self._chord_txn(group_id))
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return found

    def chord_set_size(self, group_id: str, size: int) -> None:
        def update(row: tuple[Any, ...]) -> None:
            self._conn.execute(
                "UPDATE celeriac_chords SET size = ?, claim = NULL, claim_until = 0, done = 0"
                " WHERE group_id = ?", (int(size), group_id))

        self._chord_write(group_id, update)

    def chord_add(self, group_id: str, count: int = 1) -> None:
        def update(row: tuple[Any, ...]) -> None:
            self._conn.execute("UPDATE celeriac_chords SET extra = extra + ? WHERE group_id = ?",
                               (int(count), group_id))

        self._chord_write(group_id, update)

    def chord_part_done(self, group_id: str, task_id: str, index: int | None, state: str,
                        result: Any, claim_seconds: int = CHORD_CLAIM_SECONDS
                        ) -> ChordJoin | None:
        return self._chord_part(group_id, task_id, index, state, result, claim_seconds, None)

    def store_and_chord_part_done(self, meta: TaskMeta, group_id: str, task_id: str,
                                  index: int | None, state: str, result: Any
                                  ) -> ChordJoin | None:
        # One transaction for the document and the part (half the writes per header task).
        return self._chord_part(group_id, task_id, index, state, result, CHORD_CLAIM_SECONDS,
                                meta)

    def _chord_part(self, group_id: str, task_id: str, index: int | None, state: str,
                    result: Any, claim_seconds: int, meta: TaskMeta | None
                    ) -> ChordJoin | None:
        encoded = self.serializer.dumps([1, task_id, state, result])
        order = float("inf") if index is None else float(index)
        member = f"{task_id}:{'+inf' if index is None else int(index)}"
        conn = self._conn

        def record(row: tuple[Any, ...]) -> list[bytes] | str | None:
            if meta is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO celeriac_results(key, status, expires, doc)"
                    " VALUES (?, ?, ?, ?)",
                    (TASK_KEY_PREFIX + meta["task_id"], meta["status"],
                     time.time() + self.expires if self.expires else None, self.encode(meta)))
            size, extra, count, claim, claim_until, done, _ = row
            if done:
                return None
            added = conn.execute(
                "INSERT OR IGNORE INTO celeriac_chord_parts(group_id, member, ord, doc)"
                " VALUES (?, ?, ?, ?)", (group_id, member, order, encoded)).rowcount
            count += added
            now = time.time()
            expires = now + self.expires if self.expires else None
            if size is None or count < size + extra or (claim is not None and claim_until > now):
                if added:
                    conn.execute(
                        "UPDATE celeriac_chords SET count = ?, expires = ? WHERE group_id = ?",
                        (count, expires, group_id))
                return None
            token = uuid.uuid4().hex
            conn.execute(
                "UPDATE celeriac_chords SET count = ?, claim = ?, claim_until = ?, expires = ?"
                " WHERE group_id = ?", (count, token, now + claim_seconds, expires, group_id))
            return token

        token = self._chord_write(group_id, record)
        if meta is not None:
            self._notifier.notify()
        if not isinstance(token, str):
            return None
        # The claim is ours: nobody changes the parts until chord_finish.
        with self._lock:
            rows = conn.execute(
                "SELECT doc FROM celeriac_chord_parts WHERE group_id = ? ORDER BY ord, doc",
                (group_id,)).fetchall()
        parts = []
        for (raw,) in rows:
            _, tid, st, value = self.serializer.loads(bytes(raw))
            parts.append((str(tid), str(st), value))
        return ChordJoin(group_id, token, parts)

    def chord_extend(self, join: ChordJoin, seconds: int) -> bool:
        with self._lock:
            return self._conn.execute(
                "UPDATE celeriac_chords SET claim_until = ? WHERE group_id = ? AND claim = ?"
                " AND done = 0", (time.time() + seconds, join.group_id, join.token),
            ).rowcount == 1

    def chord_finish(self, join: ChordJoin) -> bool:
        conn = self._conn
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                owned = conn.execute(
                    "UPDATE celeriac_chords SET claim = NULL, done = 1 WHERE group_id = ?"
                    " AND claim = ?", (join.group_id, join.token)).rowcount == 1
                if owned:
                    conn.execute("DELETE FROM celeriac_chord_parts WHERE group_id = ?",
                                 (join.group_id,))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        return owned

    def close(self) -> None:
        with self._lock:
            self._notifier.close()
            self._conn.close()
