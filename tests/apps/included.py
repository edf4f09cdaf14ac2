"""A task module loaded through ``Celery(include=[...])``."""

from __future__ import annotations

from celeriac import Celery, shared_task

app = Celery("tests.apps.included", set_as_current=False)


@shared_task
def included_mul(x: int, y: int) -> int:
    return x * y
