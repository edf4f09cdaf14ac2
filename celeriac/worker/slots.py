"""What each child is running, in memory shared with the supervisor.

The child writes a slot when a task starts and clears it when it ends (two struct writes,
no system call); the supervisor reads the slots to enforce hard time limits and, when a
child dies, to know which message it was running and how that task wants to be treated.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass

_SLOT = struct.Struct("<BBxxxxxxdd64s64s96s")
SLOT_SIZE = _SLOT.size

ACKS_LATE = 1
REJECT_ON_WORKER_LOST = 2


@dataclass(slots=True)
class SlotInfo:
    running: bool
    flags: int
    started: float
    hard_limit: float
    task_id: str
    tag: str
    name: str

    @property
    def acks_late(self) -> bool:
        return bool(self.flags & ACKS_LATE)

    @property
    def reject_on_worker_lost(self) -> bool:
        return bool(self.flags & REJECT_ON_WORKER_LOST)

    @property
    def deadline(self) -> float | None:
        return self.started + self.hard_limit if self.running and self.hard_limit > 0 else None


class SlotTable:
    """``count`` slots in an anonymous shared mapping, made before fork."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._mem = mmap.mmap(-1, max(1, count) * SLOT_SIZE)
        # Written to when a task with a hard limit starts, so the supervisor, which sleeps
        # until the nearest deadline it knows of, learns of the new one at once.
        self.notify_fd: int | None = None

    def start(self, index: int, task_id: str, tag: str, name: str, flags: int,
              hard_limit: float | None) -> None:
        _SLOT.pack_into(
            self._mem, index * SLOT_SIZE, 1, flags, time.time(), hard_limit or 0.0,
            task_id.encode()[:64], tag.encode()[:64], name.encode()[:96],
        )
        if hard_limit and self.notify_fd is not None:
            try:
                os.write(self.notify_fd, b"L")
            except OSError:  # full (the supervisor is awake anyway) or gone
                pass

    def clear(self, index: int) -> None:
        self._mem[index * SLOT_SIZE] = 0

    def reset(self, first: int, count: int) -> None:
        for index in range(first, first + count):
            self.clear(index)

    def read(self, index: int) -> SlotInfo:
        running, flags, started, hard, task_id, tag, name = _SLOT.unpack_from(
            self._mem, index * SLOT_SIZE
        )
        return SlotInfo(
            bool(running), flags, started, hard,
            task_id.rstrip(b"\0").decode(), tag.rstrip(b"\0").decode(),
            name.rstrip(b"\0").decode(errors="replace"),
        )
