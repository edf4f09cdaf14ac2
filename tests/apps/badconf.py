"""An app whose configuration is wrong: the CLI must say so in one line."""

from __future__ import annotations

from celeriac import Celery

app = Celery("tests.apps.badconf")
app.config_from_object({"task_acks_lates": True})
