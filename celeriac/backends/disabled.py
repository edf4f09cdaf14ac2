"""What ``app.backend`` is when no result backend is configured (as in Celery)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celeriac.backends.base import ChordJoin, ResultBackend, Waiter

_CHORDS = (
    "Chords need a result backend to count the header's results: set result_backend "
    "(e.g. 'sqlite:///results.db' or 'redis://localhost:6379/1')"
)
_MESSAGE = (
    "No result backend is configured: set result_backend (e.g. 'sqlite:///results.db' or "
    "'redis://localhost:6379/1') or pass backend= to Celery()"
)


class DisabledBackend(ResultBackend):
    def __init__(self) -> None:
        super().__init__("disabled://")

    def _put(self, items: Sequence[tuple[str, str, bytes]], ttl: float | None) -> None:
        pass  # results are dropped, as Celery does without a backend

    def _fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        raise NotImplementedError(_MESSAGE)

    def _remove(self, keys: Sequence[str]) -> None:
        raise NotImplementedError(_MESSAGE)

    def waiter(self) -> Waiter:
        raise NotImplementedError(_MESSAGE)

    def chord_set_size(self, group_id: str, size: int) -> None:
        raise NotImplementedError(_CHORDS)

    def chord_part_done(self, group_id: str, task_id: str, index: int | None, state: str,
                        result: Any, claim_seconds: int = 30) -> ChordJoin | None:
        raise NotImplementedError(_CHORDS)

    def chord_finish(self, join: ChordJoin) -> bool:
        raise NotImplementedError(_CHORDS)
