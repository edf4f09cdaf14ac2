"""Exceptions with Celery's public names (``celery.exceptions``)."""

from __future__ import annotations

import numbers
from datetime import datetime
from typing import Any


class CeleriacError(Exception):
    """Base class of celeriac's own errors."""


CeleryError = CeleriacError


class ImproperlyConfigured(CeleriacError, ValueError):
    """A setting has a value we cannot use; the message names the setting."""


class NotRegistered(CeleriacError, KeyError):
    """The task name is not in the registry."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "NotRegistered"


class AlreadyRegistered(CeleriacError):
    """A different task already uses this name."""


class TimeoutError(CeleriacError):
    """Waiting for a result took longer than the timeout."""


class TaskError(CeleriacError):
    """Base for errors about a task's execution."""


class TaskRevokedError(TaskError):
    """The task was revoked (or expired) and will not run."""


class MaxRetriesExceededError(TaskError):
    """``retry()`` was called more than ``max_retries`` times and no exception was given."""

    def __init__(self, *args: Any, task_args: Any = None, task_kwargs: Any = None) -> None:
        super().__init__(*args)
        self.task_args = task_args
        self.task_kwargs = task_kwargs


class WorkerLostError(TaskError):
    """The worker process running the task died."""


class TimeLimitExceeded(TaskError):
    """The hard time limit was exceeded; the child running the task was killed."""


class SoftTimeLimitExceeded(Exception):
    """Raised inside a task when its soft time limit expires; catch it to clean up."""

    def __str__(self) -> str:
        return "SoftTimeLimitExceeded" + (f"{self.args!r}" if self.args else "()")


class ChordError(TaskError):
    """A member of a chord header failed, so the body cannot run."""


class QueueNotFound(KeyError):
    """The queue is not defined in ``task_queues`` and missing queues may not be created."""


class IncompleteStream(CeleriacError):
    """A result stream ended before every result arrived."""


class ContentDisallowed(CeleriacError):
    """The message's content type is not in ``accept_content``."""


class DecodeError(CeleriacError):
    """The message body could not be decoded."""


class MessageTooLarge(CeleriacError, ValueError):
    """The encoded message is larger than ``task_max_message_size``."""


class SecurityError(CeleriacError):
    """A signature check failed, or unsafe content was refused."""


class Retry(TaskError):
    """Raised by ``Task.retry()`` to tell the worker the task is being retried."""

    message: str | None
    exc: BaseException | None
    excs: str | None
    when: numbers.Real | datetime | None

    def __init__(
        self,
        message: str | None = None,
        exc: BaseException | str | None = None,
        when: numbers.Real | datetime | None = None,
        is_eager: bool = False,
        sig: Any = None,
        **kwargs: Any,
    ) -> None:
        self.message = message
        if isinstance(exc, str):
            self.exc, self.excs = None, exc
        else:
            self.exc, self.excs = exc, repr(exc) if exc is not None else None
        self.when = when
        self.is_eager = is_eager
        self.sig = sig
        super().__init__(self, exc, when, **kwargs)

    def humanize(self) -> str:
        if isinstance(self.when, numbers.Number):
            return f"in {self.when}s"
        return f"at {self.when}"

    def __str__(self) -> str:
        if self.message:
            return self.message
        if self.excs:
            return f"Retry {self.humanize()}: {self.excs}"
        return f"Retry {self.humanize()}"

    def __reduce__(self) -> Any:
        return self.__class__, (self.message, self.exc, self.when)


RetryTaskError = Retry


class Ignore(TaskError):
    """Raised by a task to make the worker store nothing and ack the message."""


class Reject(TaskError):
    """Raised by a task to reject its message (requeue or dead-letter)."""

    def __init__(self, reason: Any = None, requeue: bool = False) -> None:
        self.reason = reason
        self.requeue = requeue
        super().__init__(reason, requeue)

    def __repr__(self) -> str:
        return f"reject requeue={self.requeue}: {self.reason}"


class RemoteTaskError(Exception):
    """Stands in for an exception type this process may not rebuild.

    Results never choose which class to import; an unknown type comes back as a subclass of
    this named like the original, carrying ``exc_module`` and the original arguments.
    """

    exc_module: str = ""
