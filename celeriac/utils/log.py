"""``get_task_logger``: a logger whose records name the running task (Celery's name)."""

from __future__ import annotations

import logging


class _TaskContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from celeriac.task import current_request

        request = current_request()
        record.task_id = getattr(request, "id", None) or "???"
        record.task_name = getattr(request, "task", None) or "???"
        return True


_FILTER = _TaskContextFilter()


def get_task_logger(name: str) -> logging.Logger:
    """A logger under ``celeriac.task`` whose records carry ``task_id`` and ``task_name``."""
    logger = logging.getLogger(f"celeriac.task.{name}")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


