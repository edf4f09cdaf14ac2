from __future__ import annotations

from celeriac import Celery

app = Celery("tests.apps.proj")
app.autodiscover_tasks(["tests.apps.proj"])
