"""Rate limits (token buckets) and the soft time limit (SIGALRM in the running thread)."""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

from celeriac.exceptions import ImproperlyConfigured, SoftTimeLimitExceeded

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(rate: str | float | int | None) -> float | None:
    """``"10/s"``, ``"100/m"``, ``"1000/h"`` or a number per second -> tasks per second."""
    if rate is None or rate == "" or rate == 0:
        return None
    if isinstance(rate, int | float):
        return float(rate)
    count, _, unit = str(rate).partition("/")
    try:
        return float(count) / _UNITS[unit or "s"]
    except (KeyError, ValueError):
        raise ImproperlyConfigured(
            f"rate_limit={rate!r}: use a form like '10/s', '5/m', '100/h'"
        ) from None


class TokenBucket:
    def __init__(self, rate: float, capacity: float = 1.0) -> None:
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 if a token was taken, else seconds until one will be available."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


def _raise_soft_limit(signum: int, frame: FrameType | None) -> None:
    raise SoftTimeLimitExceeded()


class SoftLimit:
    """Raises SoftTimeLimitExceeded in the task after ``seconds`` (main thread only).

    SIGALRM is handled in the main thread, so only a task running there can get it: in
    the thread pool the timer is not armed (an alarm would hit the child's consume loop).
    """

    def __init__(self) -> None:
        self.usable = threading.current_thread() is threading.main_thread()
        if self.usable:
            signal.signal(signal.SIGALRM, _raise_soft_limit)

    def _here(self) -> bool:
        return self.usable and threading.current_thread() is threading.main_thread()

    def arm(self, seconds: float | None) -> None:
        if seconds and self._here():
            signal.setitimer(signal.ITIMER_REAL, float(seconds))

    def disarm(self, armed: float | None) -> None:
        if armed and self._here():
            signal.setitimer(signal.ITIMER_REAL, 0)
