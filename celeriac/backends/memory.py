"""In-process result store (``memory://``), shared by every backend with the same URL."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from celeriac.backends.base import CHORD_CLAIM_SECONDS, ChordJoin, ResultBackend, Waiter


class _Chord:
    """One chord's join state (what Redis keeps in ``celery-taskset-meta-<gid>.*``)."""

    __slots__ = ("claim", "claim_until", "done", "expires", "extra", "parts", "size")

    def __init__(self) -> None:
        self.size: int | None = None
        self.extra = 0
        # "<task id>:<index>" -> (sort key, encoded [1, task id, state, result])
        self.parts: dict[str, tuple[float, bytes]] = {}
        self.claim: str | None = None
        self.claim_until = 0.0
        self.done = False
        self.expires: float | None = None


class _Store:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.docs: dict[str, tuple[bytes, float | None]] = {}
        self.chords: dict[str, _Chord] = {}
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
            chords = self._store.chords
            for gid in [g for g, c in chords.items() if c.expires is not None and c.expires <= now]:
                del chords[gid]
        return len(dead)

    # -- chords ----------------------------------------------------------------------------

    def _chord(self, group_id: str) -> _Chord:
        """The chord's state (caller holds the lock); expired state counts as absent."""
        chords = self._store.chords
        chord = chords.get(group_id)
        if chord is None or (chord.expires is not None and chord.expires <= time.time()):
            chord = chords[group_id] = _Chord()
        if self.expires:
            chord.expires = time.time() + self.expires
        return chord

    def chord_set_size(self, group_id: str, size: int) -> None:
        with self._store.cond:
            chord = self._chord(group_id)
            chord.size = int(size)
            chord.claim, chord.claim_until, chord.done = None, 0.0, False

    def chord_add(self, group_id: str, count: int = 1) -> None:
        with self._store.cond:
            self._chord(group_id).extra += int(count)

    def chord_part_done(self, group_id: str, task_id: str, index: int | None, state: str,
                        result: Any, claim_seconds: int = CHORD_CLAIM_SECONDS
                        ) -> ChordJoin | None:
        encoded = self.serializer.dumps([1, task_id, state, result])
        order = float("inf") if index is None else float(index)
        member = f"{task_id}:{'+inf' if index is None else int(index)}"
        now = time.time()
        with self._store.cond:
            chord = self._chord(group_id)
            if chord.done:
                return None
            chord.parts.setdefault(member, (order, encoded))
            if chord.size is None or len(chord.parts) < chord.size + chord.extra:
                return None
            if chord.claim is not None and chord.claim_until > now:
                return None
            token = uuid.uuid4().hex
            chord.claim, chord.claim_until = token, now + claim_seconds
            ordered = sorted(chord.parts.values(), key=lambda p: (p[0], p[1]))
        parts = []
        for _, raw in ordered:
            _, tid, st, value = self.serializer.loads(raw)
            parts.append((str(tid), str(st), value))
        return ChordJoin(group_id, token, parts)

    def chord_extend(self, join: ChordJoin, seconds: int) -> bool:
        with self._store.cond:
            chord = self._store.chords.get(join.group_id)
            if chord is None or chord.done or chord.claim != join.token:
                return False
            chord.claim_until = time.time() + seconds
            return True

    def chord_finish(self, join: ChordJoin) -> bool:
        with self._store.cond:
            chord = self._store.chords.get(join.group_id)
            if chord is None or chord.claim != join.token:
                return False
            chord.parts.clear()
            chord.claim, chord.done = None, True
            return True
