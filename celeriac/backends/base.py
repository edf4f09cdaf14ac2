"""The result backend interface and what every backend shares.

A backend stores one JSON document per task, in Celery's format::

    {"status": "SUCCESS", "result": 4, "traceback": null, "children": [],
     "date_done": "2026-11-24T20:27:21.417982+00:00", "task_id": "..."}

Subclasses provide four primitives (put, fetch, remove, a way to wait for writes);
encoding, expiry and waiting logic live here. Every backend passes ``tests/conformance``.

Chords need one atomic operation more, the join counter (``chord_set_size``,
``chord_part_done``, ``chord_finish``): the last header task to finish gets the ordered
results exactly once and sends the body. Nothing polls. See ``chord_part_done``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from celeriac import states
from celeriac.exceptions import TimeoutError
from celeriac.protocol import serializers

TaskMeta = dict[str, Any]

TASK_KEY_PREFIX = "celery-task-meta-"
GROUP_KEY_PREFIX = "celery-taskset-meta-"


# How long the header task that completed a chord owns it while it sends the body. If it
# dies meanwhile, a redelivered header task claims the chord again once this has passed.
CHORD_CLAIM_SECONDS = 30


@dataclass
class ChordJoin:
    """Handed to the one caller whose header task completed a chord."""

    group_id: str
    token: str  # proves the claim in chord_extend/chord_finish
    parts: list[tuple[str, str, Any]]  # (task id, state, result) in header order


class Waiter(ABC):
    """Wakes when results are written; created before the first read to miss nothing."""

    @abstractmethod
    def wait(self, timeout: float) -> None: ...

    def close(self) -> None:  # noqa: B027
        pass


class ResultBackend(ABC):
    url: str

    def __init__(
        self,
        url: str,
        *,
        serializer: str = "json",
        expires: float | None = 86400.0,
        accept: Sequence[str] = ("json",),
    ) -> None:
        self.url = url
        self.serializer = serializers.by_name(serializer, "result_serializer")
        self.expires = expires
        self.accept = serializers.accepted_types(accept)

    # -- primitives --------------------------------------------------------------------

    @abstractmethod
    def _put(self, items: Sequence[tuple[str, str, bytes]], ttl: float | None) -> None:
        """Write (key, status, document) rows in one round trip, then wake waiters."""

    @abstractmethod
    def _fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        """Documents for ``keys`` (None where missing or expired), in order."""

    @abstractmethod
    def _remove(self, keys: Sequence[str]) -> None: ...

    @abstractmethod
    def waiter(self) -> Waiter: ...

    def cleanup(self) -> int:
        """Delete expired documents (backends whose store does not expire them itself)."""
        return 0

    def close(self) -> None:  # noqa: B027
        pass

    # Results travel to the caller's reply queue (rpc://): documents carry ``_reply_to``.
    wants_reply_to = False

    def configure(self, conf: Any) -> None:  # noqa: B027 - optional
        """Read the app's settings that concern this backend (called once, after connect)."""

    def on_task_call(self, task_id: str, reply_to: str) -> None:  # noqa: B027 - optional
        """A task whose result may come back in ``reply_to`` is about to be sent."""

    # -- encoding ----------------------------------------------------------------------

    def encode(self, meta: TaskMeta) -> bytes:
        return self.serializer.dumps(meta)

    def decode(self, data: bytes) -> TaskMeta:
        value = self.serializer.loads(data)
        if not isinstance(value, dict):
            raise ValueError("result document is not an object")
        return value

    # -- tasks -------------------------------------------------------------------------

    def store(self, metas: Sequence[TaskMeta]) -> None:
        """Store documents (each must have ``task_id`` and ``status``), in one round trip."""
        if metas:
            self._put(
                [(TASK_KEY_PREFIX + m["task_id"], m["status"], self.encode(m)) for m in metas],
                self.expires,
            )

    def store_soon(self, metas: Sequence[TaskMeta]) -> Callable[[], None] | None:
        """Start storing documents; returns a function that finishes (it returns once they
        are stored), or None when they are stored already. The finisher must be called from
        the same thread before that thread uses this backend again; meanwhile the thread
        may do one round trip elsewhere (a worker fetches its next batch), so both overlap.
        Default: store now."""
        self.store(metas)
        return None

    def get(self, task_id: str) -> TaskMeta | None:
        data = self._fetch([TASK_KEY_PREFIX + task_id])[0]
        return self.decode(data) if data is not None else None

    def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskMeta]:
        docs = self._fetch([TASK_KEY_PREFIX + t for t in task_ids])
        return {t: self.decode(d) for t, d in zip(task_ids, docs, strict=True) if d is not None}

    def forget(self, task_id: str) -> None:
        self._remove([TASK_KEY_PREFIX + task_id])

    def wait(
        self, task_ids: Sequence[str], timeout: float | None = None, interval: float = 1.0
    ) -> Iterator[TaskMeta]:
        """Yield each task's document once it is in a ready state (any order).

        Raises TimeoutError when ``timeout`` s pass first. ``interval`` bounds how long one
        wait lasts before a re-read, a safety net for a missed wake-up.
        """
        pending = list(dict.fromkeys(task_ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = self.waiter()
        try:
            while True:
                found = self.get_many(pending)
                for task_id, meta in found.items():
                    if meta.get("status") in states.READY_STATES:
                        pending.remove(task_id)
                        yield meta
                if not pending:
                    return
                remaining = interval
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("The operation timed out.")
                    remaining = min(interval, left)
                waiter.wait(remaining)
        finally:
            waiter.close()

    # -- groups ------------------------------------------------------------------------

    def save_group(self, group_id: str, result: Any) -> None:
        doc = self.encode({"result": result})
        self._put([(GROUP_KEY_PREFIX + group_id, "GROUP", doc)], self.expires)

    def restore_group(self, group_id: str) -> Any | None:
        data = self._fetch([GROUP_KEY_PREFIX + group_id])[0]
        return self.decode(data).get("result") if data is not None else None

    def delete_group(self, group_id: str) -> None:
        self._remove([GROUP_KEY_PREFIX + group_id])

    # -- chords --------------------------------------------------------------------------
    #
    # Celery's counter-based chord protocol, as its Redis backend runs it (keys
    # ``celery-taskset-meta-<gid>.s/.j/.d/.c/.t``), with one atomic step per header task.

    @abstractmethod
    def chord_set_size(self, group_id: str, size: int) -> None:
        """Before the header is sent: how many header results complete the chord.

        Also forgets a claim or "finished" mark left by an earlier run of a chord with the
        same group id (a frozen chord applied again is a new run).
        """

    @abstractmethod
    def chord_part_done(self, group_id: str, task_id: str, index: int | None, state: str,
                        result: Any, claim_seconds: int = CHORD_CLAIM_SECONDS
                        ) -> ChordJoin | None:
        """Record one header task's outcome, atomically; the part completing the chord wins.

        ``result`` is what the task's document holds (the value, or the exception as a
        dict); ``index`` its ``group_index`` (None sorts last). A part is recorded once per
        (task id, index): a duplicate delivery of a header task changes nothing. When the
        recorded parts reach the size (plus ``chord_add``) and the chord is neither claimed
        nor finished, the caller claims it for ``claim_seconds`` and gets a ChordJoin with
        every part in header order: it must send the body (or fail it) and then call
        ``chord_finish``. Every other call returns None. A claim that expires unfinished
        (its holder died) is taken by the next call for that chord, so the body is sent
        at least once and, barring such a death, exactly once.
        """

    def store_and_chord_part_done(self, meta: TaskMeta, group_id: str, task_id: str,
                                  index: int | None, state: str, result: Any
                                  ) -> ChordJoin | None:
        """Store a header task's document, then report it (``chord_part_done``).

        The document is stored first, so once the body runs every header result can be
        read. A backend may do both in one step (SQLite: one transaction).
        """
        self.store([meta])
        return self.chord_part_done(group_id, task_id, index, state, result)

    @abstractmethod
    def chord_finish(self, join: ChordJoin) -> bool:
        """The body was sent: drop the chord's parts and mark it finished.

        Returns False (and changes nothing) when the claim was lost meanwhile.
        """

    def chord_extend(self, join: ChordJoin, seconds: int) -> bool:
        """Keep the claim ``seconds`` longer (before a slow send); False if it was lost."""
        return True

    def chord_add(self, group_id: str, count: int = 1) -> None:
        """Header tasks added while the chord runs (Celery's ``Task.add_to_chord``)."""
        raise NotImplementedError(f"{type(self).__name__} does not support add_to_chord")
