"""The task message: Celery protocol v2 on the way out, v2 and v1 on the way in.

Brokers move :class:`Message` objects without looking inside; this module is the only
place that knows what a task message contains.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from celeriac.exceptions import DecodeError, MessageTooLarge
from celeriac.protocol import serializers

EMPTY_EMBED: dict[str, Any] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@dataclass(slots=True)
class Message:
    """What a broker moves: headers, properties and an opaque body."""

    headers: dict[str, Any]
    properties: dict[str, Any]
    body: bytes
    content_type: str = "application/json"
    content_encoding: str = "utf-8"

    @property
    def priority(self) -> int:
        return int(self.properties.get("priority") or 0)

    @property
    def id(self) -> str | None:
        found = self.headers.get("id") or self.properties.get("correlation_id")
        return str(found) if found else None


_ORIGIN: list[str] = []
# Forgotten in a forked child, which has another pid: no getpid() per message (~1 us).
os.register_at_fork(after_in_child=_ORIGIN.clear)


def origin() -> str:
    """This process's node name as Celery writes it (``gen<pid>@<host>``)."""
    if not _ORIGIN:
        _ORIGIN.append(f"gen{os.getpid()}@{socket.gethostname()}")
    return _ORIGIN[0]


def _safe_repr(value: Any, maxsize: int) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # repr of user objects may fail; the message must not
        text = f"<unrepresentable {type(value).__name__}: {exc}>"
    return text if len(text) <= maxsize else text[: maxsize - 3] + "..."


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def uuid4_str() -> str:
    """``str(uuid.uuid4())``, in about half the time (it is paid for on every send)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.isoformat()


def build_task_message(
    name: str,
    task_id: str,
    args: Any = (),
    kwargs: dict[str, Any] | None = None,
    *,
    eta: datetime | None = None,
    expires: datetime | None = None,
    expiration: float | None = None,
    retries: int = 0,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    root_id: str | None = None,
    parent_id: str | None = None,
    group_id: str | None = None,
    group_index: int | None = None,
    shadow: str | None = None,
    ignore_result: bool | None = False,
    reply_to: str = "",
    priority: int | None = None,
    callbacks: list[dict[str, Any]] | None = None,
    errbacks: list[dict[str, Any]] | None = None,
    chain: list[dict[str, Any]] | None = None,
    chord: dict[str, Any] | None = None,
    extra_headers: dict[str, Any] | None = None,
    stamps: dict[str, Any] | None = None,
    serializer: str = "json",
    repr_maxsize: int = 1024,
    argsrepr: str | None = None,
    kwargsrepr: str | None = None,
    max_size: int | None = None,
    origin_name: str | None = None,
) -> Message:
    """Build a protocol v2 task message with every header Celery 5.7 sends.

    ``expiration`` is the message TTL in seconds (the ``expiration`` property, in ms as
    kombu writes it); without it, it is derived from ``expires``.
    """
    args = list(args) if not isinstance(args, list) else args
    kwargs = kwargs or {}
    ser = serializers.by_name(serializer)
    embed = {"callbacks": callbacks, "errbacks": errbacks, "chain": chain, "chord": chord}
    body = ser.dumps([args, kwargs, embed])
    if max_size is not None and len(body) > max_size:
        raise MessageTooLarge(
            f"task {name}[{task_id}]: encoded arguments are {len(body)} bytes, more than "
            f"task_max_message_size={max_size}; pass a reference (a path, a key) instead"
        )
    headers: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": shadow,
        "eta": iso(eta),
        "expires": iso(expires),
        "group": group_id,
        "group_index": group_index,
        "retries": retries,
        "timelimit": [time_limit, soft_time_limit],
        "root_id": root_id or task_id,
        "parent_id": parent_id,
        "argsrepr": _safe_repr(tuple(args), repr_maxsize) if argsrepr is None else argsrepr,
        "kwargsrepr": _safe_repr(kwargs, repr_maxsize) if kwargsrepr is None else kwargsrepr,
        "origin": origin_name or origin(),
        "ignore_result": ignore_result,
        "replaced_task_nesting": 0,
        "stamped_headers": list(stamps) if stamps else None,
        "stamps": stamps or {},
    }
    if extra_headers:
        headers.update(extra_headers)
    properties: dict[str, Any] = {
        "correlation_id": task_id,
        "reply_to": reply_to,
        "delivery_mode": 2,
        "priority": priority or 0,
    }
    if expiration is None and expires is not None:
        expiration = (expires - datetime.now(UTC)).total_seconds()
    if expiration is not None:
        properties["expiration"] = str(int(max(0.0, expiration) * 1000))
    return Message(headers, properties, body, ser.content_type, ser.content_encoding)


@dataclass(slots=True)
class TaskRequest:
    """A decoded task message: everything a worker needs to run it."""

    name: str
    id: str
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    properties: dict[str, Any]
    callbacks: list[dict[str, Any]] | None = None
    errbacks: list[dict[str, Any]] | None = None
    chain: list[dict[str, Any]] | None = None
    chord: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def header(self, key: str, default: Any = None) -> Any:
        value = self.headers.get(key)
        return default if value is None else value

    @property
    def retries(self) -> int:
        return int(self.headers.get("retries") or 0)

    @property
    def eta(self) -> datetime | None:
        return parse_time(self.headers.get("eta"))

    @property
    def expires(self) -> datetime | None:
        return parse_time(self.headers.get("expires"))

    @property
    def root_id(self) -> str:
        return str(self.headers.get("root_id") or self.id)

    @property
    def parent_id(self) -> str | None:
        return self.headers.get("parent_id")

    @property
    def group(self) -> str | None:
        return self.headers.get("group")

    @property
    def group_index(self) -> int | None:
        return self.headers.get("group_index")

    @property
    def timelimit(self) -> tuple[float | None, float | None]:
        limits = self.headers.get("timelimit") or (None, None)
        return (limits[0], limits[1]) if len(limits) >= 2 else (None, None)

    @property
    def ignore_result(self) -> bool:
        return bool(self.headers.get("ignore_result"))


def parse_time(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    dt = datetime.fromisoformat(str(value))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def decode_task(message: Message, accept: frozenset[str]) -> TaskRequest:
    """Read a task message (v2, or legacy v1), refusing disallowed content types.

    Raises ContentDisallowed or DecodeError with a reason fit for a dead-letter record.
    """
    body = serializers.loads(
        message.body, message.content_type, message.content_encoding, accept
    )
    headers = message.headers
    name = headers.get("task")
    if name is not None:
        if isinstance(body, dict):  # a "hybrid": v2 headers with a v1-style body
            args, kwargs = body.get("args") or [], body.get("kwargs") or {}
            embed = body
        else:
            if not isinstance(body, list | tuple) or len(body) != 3:
                raise DecodeError("protocol v2 body must be [args, kwargs, embed]")
            args, kwargs, embed = body
        task_id = headers.get("id") or message.properties.get("correlation_id")
    else:
        if not isinstance(body, dict) or "task" not in body:
            raise DecodeError("message has no 'task' header and is not a protocol v1 body")
        name, task_id = body["task"], body.get("id")
        args, kwargs, embed = body.get("args") or [], body.get("kwargs") or {}, body
        headers = {
            "task": name,
            "id": task_id,
            "eta": body.get("eta"),
            "expires": body.get("expires"),
            "retries": body.get("retries", 0),
            "timelimit": body.get("timelimit") or [None, None],
            "group": body.get("taskset") or body.get("group"),
            "group_index": body.get("group_index"),
            "root_id": task_id,
            "parent_id": None,
        }
    if not isinstance(name, str) or not task_id:
        raise DecodeError("message lacks a task name or id")
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        raise DecodeError("args must be a list and kwargs an object")
    embed = embed or EMPTY_EMBED
    return TaskRequest(
        name=name,
        id=str(task_id),
        args=list(args),
        kwargs=kwargs,
        headers=headers,
        properties=message.properties,
        callbacks=embed.get("callbacks"),
        errbacks=embed.get("errbacks"),
        chain=embed.get("chain"),
        chord=embed.get("chord"),
    )
