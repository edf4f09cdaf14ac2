"""An exception module only worker processes import (see tests.apps.api.raise_worker_only)."""

from __future__ import annotations

from celeriac import Celery

app = Celery("tests.apps.api_worker_only", set_as_current=False)


class WorkerOnlyError(Exception):
    pass
