"""Routing as Celery does it: ``task_queues``, exchanges, broadcast and worker-direct queues.

A queue in ``task_queues`` may be given as a name, a dict (``{"name": "q", "exchange": "x",
"exchange_type": "topic", "routing_key": "a.#", "max_priority": 10, "queue_type":
"quorum", "queue_arguments": {...}}``), a ``{name: options}`` mapping, a kombu ``Queue``
(read through its attributes, so kombu is not needed here), a kombu ``Broadcast``, or our
own broadcast form (``Broadcast("name")`` below, or ``{"name": "x", "broadcast": True}``).

Everything here is pure computation (no I/O): the app uses it to pick a destination, the
AMQP broker to declare queues, exchanges and bindings, the worker to name the queues it
consumes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

# Celery's per-worker direct queues (celery.utils.nodenames): queue ``<hostname>.dq2``,
# bound to the durable direct exchange ``C.dq2`` with the worker's hostname as routing key.
WORKER_DIRECT_EXCHANGE = "C.dq2"
WORKER_DIRECT_SUFFIX = ".dq2"
# kombu's Broadcast names its queue ``bcast.<uuid4>`` unless told otherwise.
_KOMBU_AUTO_NAME = re.compile(
    r"^bcast\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
BROADCAST_PREFIX = "bcast."


def Broadcast(name: str, queue: str | None = None, exchange: str | None = None,
              **options: Any) -> dict[str, Any]:
    """A broadcast queue for ``task_queues`` (kombu's ``Broadcast`` without kombu).

    Every worker consuming ``name`` (``-Q name``, or no ``-Q``) gets its own queue bound to
    the fanout exchange ``exchange`` (default: ``name``), so each worker receives every task
    routed to ``name``. ``queue`` fixes the queue's name instead (then the workers share it).
    """
    return {"name": name, "broadcast": True, "queue": queue,
            "exchange": exchange or name, **options}


def worker_direct(hostname: str) -> str:
    """The direct queue of the worker ``hostname`` (``app.conf.worker_direct = True``)."""
    return f"{hostname}{WORKER_DIRECT_SUFFIX}"


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


def _is_kombu_broadcast(item: Any) -> bool:
    try:
        from kombu.common import Broadcast as KombuBroadcast
    except ImportError:  # kombu is optional
        return type(item).__name__ == "Broadcast"
    return isinstance(item, KombuBroadcast)


def _broadcast_spec(name: str, queue: str | None, exchange: Any,
                    opts: dict[str, Any]) -> dict[str, Any]:
    ex_name, _ = _exchange_of(exchange)
    spec: dict[str, Any] = {
        "name": name,
        "broadcast": True,
        "queue": queue,  # a fixed queue name, or None: one queue per worker
        "exchange": ex_name or name,
        "exchange_type": "fanout",
        "routing_key": "",
        "durable": False,
    }
    arguments = dict(opts.get("queue_arguments") or opts.get("arguments") or {})
    if opts.get("expires"):
        arguments["x-expires"] = int(float(opts["expires"]) * 1000)
    if arguments:
        spec["arguments"] = arguments
    return spec


def queue_spec(item: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One queue's declaration: name, exchange, exchange_type, routing_key, arguments."""
    opts: dict[str, Any] = dict(options or {})
    if isinstance(item, str):
        name = item
    elif isinstance(item, dict):
        opts = {**item, **opts}
        name = str(opts.pop("name"))
    elif _is_kombu_broadcast(item):
        # kombu: name = queue = "bcast.<uuid>" (made per process), alias = the exchange name.
        alias = getattr(item, "alias", None) or item.exchange.name
        qname = str(item.name)
        fixed = None if _KOMBU_AUTO_NAME.match(qname) else qname
        return _broadcast_spec(str(alias), fixed, item.exchange,
                               {"queue_arguments": getattr(item, "queue_arguments", None)})
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
    if opts.get("broadcast"):
        return _broadcast_spec(name, opts.get("queue"), opts.get("exchange"), opts)
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
    if not queues:
        return []
    if isinstance(queues, dict):
        return [queue_spec(name, opts if isinstance(opts, dict) else {})
                for name, opts in queues.items()]
    items: Iterable[Any] = queues if isinstance(queues, list | tuple | set) else [queues]
    return [queue_spec(q) for q in items]


def specs_by_name(queues: Any) -> dict[str, dict[str, Any]]:
    return {spec["name"]: spec for spec in queue_specs(queues)}


# -- the worker's queues ---------------------------------------------------------------------


def broadcast_queue_name(spec: dict[str, Any], hostname: str) -> str:
    """The queue a worker consumes for a broadcast spec: ``bcast.<name>.<hostname>``.

    Named after the worker (as its ``.dq2`` queue is), not a random id: the children of one
    worker share it, and a worker restarted under the same name finds the broadcasts sent
    while it was away (until the queue expires).
    """
    return spec.get("queue") or f"{BROADCAST_PREFIX}{spec['name']}.{hostname}"


def worker_queues(specs: dict[str, dict[str, Any]], queues: Iterable[str], hostname: str,
                  direct: bool = False) -> list[str]:
    """The queues a worker consumes for ``-Q`` names: broadcast names become the worker's own
    queue, and ``worker_direct`` adds ``<hostname>.dq2``."""
    out: list[str] = []
    for name in queues:
        spec = specs.get(name)
        if spec is not None and spec.get("broadcast"):
            name = broadcast_queue_name(spec, hostname)
        if name not in out:
            out.append(name)
    if direct and worker_direct(hostname) not in out:
        out.append(worker_direct(hostname))
    return out


def spec_for(specs: dict[str, dict[str, Any]], queue: str) -> dict[str, Any] | None:
    """How to declare ``queue``: its ``task_queues`` entry, or what a worker queue implies."""
    spec = specs.get(queue)
    if spec is not None:
        return None if spec.get("broadcast") and not spec.get("queue") else spec
    if queue.endswith(WORKER_DIRECT_SUFFIX) and len(queue) > len(WORKER_DIRECT_SUFFIX):
        return {"name": queue, "exchange": WORKER_DIRECT_EXCHANGE, "exchange_type": "direct",
                "routing_key": queue[:-len(WORKER_DIRECT_SUFFIX)], "durable": True}
    if queue.startswith(BROADCAST_PREFIX):
        best: dict[str, Any] | None = None
        for spec in specs.values():
            if (spec.get("broadcast") and not spec.get("queue")
                    and queue.startswith(f"{BROADCAST_PREFIX}{spec['name']}.")
                    and (best is None or len(spec["name"]) > len(best["name"]))):
                best = spec
        if best is not None:
            return {**best, "name": queue, "queue": queue}
    for spec in specs.values():  # a broadcast spec with a fixed queue name
        if spec.get("broadcast") and spec.get("queue") == queue:
            return {**spec, "name": queue}
    return None


# -- where a task goes ---------------------------------------------------------------------------


Route = tuple[str, str, str]  # (exchange, routing key, exchange type)


def destination(specs: dict[str, dict[str, Any]], queue: Any, exchange: Any, routing_key: Any,
                exchange_type: str | None, default_queue: str,
                default_routing_key: str | None = None) -> tuple[str, Route | None]:
    """The queue name, and the exchange route when the message goes through an exchange.

    Celery's rule (``celery.app.amqp.send_task_message``): with a direct exchange and no
    explicit exchange *and* routing key, the message goes to the default exchange with the
    queue's name as routing key (the route is None here); otherwise to the exchange given,
    or the queue's exchange, with the routing key given, or the queue's.
    """
    spec: dict[str, Any] | None = None
    if queue is not None and not isinstance(queue, str):
        # a kombu Queue / Broadcast (or our dict form) passed as ``queue=``
        spec = queue_spec(queue) if not isinstance(queue, dict) else queue_spec(dict(queue))
        qname = spec["name"]
    else:
        qname = queue or ("" if exchange is not None else default_queue)
    if spec is None and qname:
        spec = specs.get(qname)
    ex_name, ex_kind = _exchange_of(exchange)
    kind = exchange_type or ex_kind or (spec["exchange_type"] if spec else None)
    if kind is None and ex_name is not None:
        kind = _exchange_kind(specs, ex_name)
    kind = kind or "direct"
    if (not ex_name or not routing_key) and kind == "direct":
        return qname or default_queue, None
    if ex_name is None:
        ex_name = spec["exchange"] if spec else qname
        routing_key = routing_key or (spec["routing_key"] if spec else None) or \
            default_routing_key or ""
    return qname, (ex_name, str(routing_key or ""), kind)


def _exchange_kind(specs: dict[str, dict[str, Any]], exchange: str) -> str | None:
    if exchange == WORKER_DIRECT_EXCHANGE:
        return "direct"
    for spec in specs.values():
        if spec.get("exchange") == exchange:
            return str(spec["exchange_type"])
    return None


def exchange_kind(specs: dict[str, dict[str, Any]], exchange: str, given: str | None) -> str:
    return given or _exchange_kind(specs, exchange) or "direct"


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more (words split on ``.``)."""
    if "#" not in pattern and "*" not in pattern:
        return pattern == key

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        if not k:
            return False
        return (p[0] == "*" or p[0] == k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split(".") if key else [])


def bound_queues(specs: dict[str, dict[str, Any]], exchange: str, routing_key: str,
                 kind: str) -> list[str]:
    """The ``task_queues`` queues an exchange route reaches (broadcast queues excepted: their
    names are per worker). Used to declare them before publishing, and by brokers without
    exchanges to emulate the routing."""
    out = []
    for spec in specs.values():
        if spec.get("broadcast") or spec.get("exchange") != exchange:
            continue
        if (kind == "fanout" or (kind == "topic" and topic_matches(spec["routing_key"],
                                                                    routing_key))
                or (kind not in ("fanout", "topic") and spec["routing_key"] == routing_key)):
            out.append(spec["name"])
    if exchange == WORKER_DIRECT_EXCHANGE and routing_key:
        out.append(worker_direct(routing_key))
    return out
