"""An app whose router raises: the CLI reports any unexpected error in one line."""

from __future__ import annotations

from typing import Any

from celeriac import Celery


def exploding_router(name: str, *args: Any, **kwargs: Any) -> None:
    raise RuntimeError(f"router exploded on {name}")


app = Celery("tests.apps.badrouter", task_routes=[exploding_router])
