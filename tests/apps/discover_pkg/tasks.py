from __future__ import annotations

from celeriac import shared_task


@shared_task
def discovered_sub(x: int, y: int) -> int:
    return x - y


@shared_task(name="discover.custom_name")
def discovered_named() -> str:
    return "named"
