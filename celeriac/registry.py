"""The task registry: task name -> task instance, one per app."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celeriac.exceptions import NotRegistered

if TYPE_CHECKING:
    from celeriac.app import Celery
    from celeriac.task import Task


class TaskRegistry(dict[str, "Task[Any, Any]"]):
    def __init__(self, app: Celery) -> None:
        super().__init__()
        self.app = app

    def __missing__(self, key: str) -> Task[Any, Any]:
        raise NotRegistered(key)

    def register(self, task: Task[Any, Any]) -> None:
        self[task.name] = task

    def unregister(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise NotRegistered(name) from None

    def _ensure(self) -> None:
        if not self.app._finalized:
            self.app.finalize(auto=True)  # raises with autofinalize=False, as in Celery

    def __getitem__(self, key: str) -> Task[Any, Any]:
        if not super().__contains__(key):
            self._ensure()
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        if not super().__contains__(key):
            self._ensure()
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        if not super().__contains__(key):
            self._ensure()
        return super().__contains__(key)
