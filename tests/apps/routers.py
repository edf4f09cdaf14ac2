"""A router given to ``task_routes`` by dotted path."""

from __future__ import annotations

from typing import Any

from celeriac import Celery

app = Celery("tests.apps.routers", set_as_current=False)


def route_by_name(name: str, args: Any, kwargs: Any, options: Any, task: Any = None,
                  **kw: Any) -> dict[str, str]:
    return {"queue": f"routed-{name}"}
