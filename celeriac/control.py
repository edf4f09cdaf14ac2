"""Remote control: revoke today; inspect and the rest of Celery's verbs come later.

Revocations are broadcast on the broker and kept there for ``worker_revoke_expires``
seconds, so a worker that starts later still honours them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from celeriac import states

if TYPE_CHECKING:
    from celeriac.app import Celery

REVOKE_CHANNEL = "celeriac.revoked"


class Control:
    def __init__(self, app: Celery) -> None:
        self.app = app

    def revoke(
        self, task_id: str | list[str], destination: Any = None, terminate: bool = False,
        signal: str | None = None, **_: Any,
    ) -> None:
        """Revoke tasks: a waiting task is never run; with terminate, a running one is killed."""
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        ttl = float(self.app.conf.worker_revoke_expires)
        self.app.broker.broadcast(
            REVOKE_CHANNEL,
            {"ids": ids, "terminate": bool(terminate), "signal": signal or "SIGTERM",
             "time": time.time()},
            ttl,
        )
        # A task still waiting in a queue shows REVOKED at once, not when a worker reaches it.
        backend = self.app.backend
        if backend.url == "disabled://":
            return
        known = backend.get_many(ids)
        from celeriac.exceptions import TaskRevokedError
        from celeriac.protocol.errors import exception_to_dict
        from celeriac.trace import build_meta

        metas = [
            build_meta(self.app, tid, states.REVOKED,
                       exception_to_dict(TaskRevokedError("revoked")), None)
            for tid in ids
            if tid not in known or known[tid].get("status") in (states.PENDING, states.RETRY)
        ]
        backend.store(metas)
