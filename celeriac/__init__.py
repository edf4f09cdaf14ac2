"""celeriac: a distributed task queue with Celery's API and wire protocol.

Public API (everything else is internal)::

    from celeriac import Celery, shared_task, current_app, Task
    from celeriac import signature, chain, group, chord, chunks
    from celeriac import AsyncResult, GroupResult, states, exceptions
"""

from __future__ import annotations

from celeriac import exceptions, states
from celeriac.app import Celery, current_app, shared_task
from celeriac.canvas import Signature, chain, chord, chunks, group, signature, xmap, xstarmap
from celeriac.result import AsyncResult, EagerResult, GroupResult, ResultSet
from celeriac.task import Task

__version__ = "0.1.0"

subtask = signature
maybe_signature = signature

__all__ = [
    "AsyncResult",
    "Celery",
    "EagerResult",
    "GroupResult",
    "ResultSet",
    "Signature",
    "Task",
    "__version__",
    "chain",
    "chord",
    "chunks",
    "current_app",
    "exceptions",
    "group",
    "shared_task",
    "signature",
    "states",
    "subtask",
    "xmap",
    "xstarmap",
]
