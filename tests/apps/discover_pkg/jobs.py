from __future__ import annotations

from celeriac import shared_task


@shared_task
def discovered_job() -> str:
    return "job"
