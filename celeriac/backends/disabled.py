"""What ``app.backend`` is when no result backend is configured (as in Celery)."""

from __future__ import annotations

from collections.abc import Sequence

from celeriac.backends.base import ResultBackend, Waiter

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
