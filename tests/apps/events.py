"""How tasks in a worker process tell a test what happened: lines in files in a directory.

A task appends one line per event (``start``, ``done``…) and may wait for a file the test
creates; the test reads the lines. So tests wait on conditions, never on sleeps.
"""

from __future__ import annotations

import os
import time


def append(d: str, name: str, line: str) -> None:
    """Append one line; O_APPEND writes of one short line are atomic across processes."""
    with open(os.path.join(d, name), "a") as f:
        f.write(line + "\n")


def lines(d: str, name: str) -> list[str]:
    try:
        with open(os.path.join(d, name)) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def wait_file(d: str, name: str, timeout: float = 30.0) -> bool:
    """Wait until the test creates ``d/name``; False after ``timeout`` seconds."""
    path = os.path.join(d, name)
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
