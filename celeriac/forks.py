"""How many times this process's ancestry forked, for per-process state on hot paths.

Connections must not be shared with a forked child. Comparing ``os.getpid()`` on every use
costs a system call each time (several per task sent or run); comparing this counter,
bumped in every child ``os.fork()`` makes, costs nothing.
"""

from __future__ import annotations

import os

generation = [0]


def _forked() -> None:
    generation[0] += 1


os.register_at_fork(after_in_child=_forked)
