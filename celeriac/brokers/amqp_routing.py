"""``task_queues`` as Celery takes it, read into plain dicts for the AMQP broker.

A queue may be given as a name, a dict (``{"name": "q", "exchange": "x",
"exchange_type": "topic", "routing_key": "a.#", "max_priority": 10, "queue_type":
"quorum", "queue_arguments": {...}}``), a ``{name: options}`` mapping, or a kombu
``Queue`` (read through its attributes, so kombu is not needed here).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _exchange_of(value: Any) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    if isinstance(value, str):
        return value, None
    name = getattr(value, "name", None)
    kind = getattr(value, "type", None)
    if isinstance(value, dict):
        name, kind = value.get("name"), value.get("type")
    return (str(name) if name is not None else None), (str(kind) if kind else None)


def queue_spec(item: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One queue's declaration: name, exchange, exchange_type, routing_key, arguments."""
    opts: dict[str, Any] = dict(options or {})
    if isinstance(item, str):
        name = item
    elif isinstance(item, dict):
        opts = {**item, **opts}
        name = str(opts.pop("name"))
    else:  # a kombu Queue, or anything shaped like it
        name = str(item.name)
        exchange = getattr(item, "exchange", None)
        opts.setdefault("exchange", exchange)
        opts.setdefault("routing_key", getattr(item, "routing_key", None))
        args = getattr(item, "queue_arguments", None) or {}
        if args:
            opts.setdefault("queue_arguments", dict(args))
        if getattr(item, "max_priority", None):
            opts.setdefault("max_priority", item.max_priority)
        if getattr(item, "durable", True) is False:
            opts.setdefault("durable", False)
    exchange, kind = _exchange_of(opts.get("exchange", name))
    kind = opts.get("exchange_type") or kind or "direct"
    routing_key = opts.get("routing_key")
    if routing_key is None:
        routing_key = name if exchange else ""
    spec: dict[str, Any] = {
        "name": name,
        "exchange": exchange if exchange is not None else name,
        "exchange_type": kind,
        "routing_key": routing_key,
        "durable": bool(opts.get("durable", True)),
    }
    arguments = dict(opts.get("queue_arguments") or opts.get("arguments") or {})
    if arguments.get("x-max-priority"):
        spec["max_priority"] = int(arguments.pop("x-max-priority"))
    if arguments.get("x-queue-type"):
        spec["queue_type"] = str(arguments.pop("x-queue-type"))
    if opts.get("max_priority"):
        spec["max_priority"] = int(opts["max_priority"])
    if opts.get("queue_type"):
        spec["queue_type"] = str(opts["queue_type"])
    if arguments:
        spec["arguments"] = arguments
    return spec


def queue_specs(queues: Any) -> list[dict[str, Any]]:
    if isinstance(queues, dict):
        return [queue_spec(name, opts if isinstance(opts, dict) else {})
                for name, opts in queues.items()]
    items: Iterable[Any] = queues if isinstance(queues, list | tuple | set) else [queues]
    return [queue_spec(q) for q in items]
