#!/usr/bin/env python
"""Micro-benchmark: CPU per delivery on celeriac's AMQP receive path, no broker needed.

    .venv/bin/python bench/amqp_decode.py              # 7 rounds of 20,000 messages
    .venv/bin/python bench/amqp_decode.py -n 50000 --rounds 11

Two real task messages are built in-process: one as celeriac publishes it
(``build_task_message`` -> ``to_wire`` -> ``Channel.f_publish``: 19 Celery headers,
correlation_id, reply_to, delivery_mode, priority) and one as Celery 5 publishes it
through py-amqp (the same headers and properties written by py-amqp's own encoder).
Each becomes the frames RabbitMQ sends for it (basic.deliver method frame, content
header frame, one body frame).

For each message it prints the best and the median round, in microseconds per message, of:

* ``decode_properties``  the content header's properties and 19-entry header table;
* ``from_wire``          celeriac.brokers.amqp.from_wire on those decoded properties;
* ``frames -> Incoming`` N deliveries (all three frames each) fed in 256 KiB chunks
  (what one ``recv`` returns at most) through ``Connection._process_buffer`` ->
  ``Channel._on_frame`` -> ``_finish_content``, exactly as ``Connection._receive`` does
  (a Connection and Channel that were never connected);
* ``receive path total`` the line above plus ``from_wire`` for each delivery: what a
  worker pays per task between the socket and a ``Message``.

Numbers are process CPU time (``time.process_time``), one process, GC left on. The
celeriac measured is the one in the checkout this file is in (printed first).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script, bench/ comes first on sys.path and bench/amqp.py would hide py-amqp; the
# checkout this file is in goes first instead (not an installed or editable celeriac).
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _BENCH]

from amqp.basic_message import Message as PyAmqpMessage  # noqa: E402

from celeriac.brokers import amqp_client as wire  # noqa: E402
from celeriac.brokers.amqp import from_wire, to_wire  # noqa: E402
from celeriac.protocol.message import build_task_message  # noqa: E402

TASK_ID = "f413d190-f34d-4676-a436-e06e14f456c0"
RECV = 262144  # Connection._receive reads this much at a time
CTAG = "celeriac-6f0c1f38d3a54d1f9c6f1b0c2d8e4a77"


def celeriac_header_frame() -> tuple[bytes, bytes]:
    """(content header frame, body frame) of a task message as celeriac publishes it."""
    message = build_task_message("tasks.add", TASK_ID, (2, 2), reply_to="",
                                 origin_name="gen12088@vm")
    props, body = to_wire(message)
    conn = wire.Connection(wire.Params())
    frames = wire.Channel(conn, 1).f_publish("", "celery", body, props, True)
    # Drop the basic.publish method frame: header and body frames are as RabbitMQ sends them.
    size = wire._FRAME_HEAD.unpack_from(frames, 0)[2]
    rest = frames[8 + size:]
    size = wire._FRAME_HEAD.unpack_from(rest, 0)[2]
    return rest[:8 + size], rest[8 + size:]


def celery_header_frame() -> tuple[bytes, bytes]:
    """(content header frame, body frame) of the same task as Celery 5 (py-amqp) writes it."""
    message = build_task_message("tasks.add", TASK_ID, (2, 2), reply_to="",
                                 origin_name="gen12088@vm")
    theirs = PyAmqpMessage(message.body, content_type="application/json",
                           content_encoding="utf-8", application_headers=message.headers,
                           delivery_mode=2, priority=0, correlation_id=TASK_ID,
                           reply_to="b1c0d3f2-1b2c-3d4e-5f60-718293a4b5c6")
    props = theirs._serialize_properties()
    body = message.body
    payload = wire._CONTENT_HEAD.pack(60, 0, len(body), 0)[:12] + props
    header = wire._FRAME_HEAD.pack(wire.FRAME_HEADER, 1, len(payload)) + payload + b"\xce"
    return header, wire._FRAME_HEAD.pack(wire.FRAME_BODY, 1, len(body)) + body + b"\xce"


def deliver_frame(tag: int) -> bytes:
    ctag = CTAG.encode()
    args = (bytes([len(ctag)]) + ctag + wire._U64.pack(tag) + b"\x00"
            + b"\x00" + b"\x06celery")
    payload = wire._METHOD.pack(60, 60) + args
    return wire._FRAME_HEAD.pack(wire.FRAME_METHOD, 1, len(payload)) + payload + b"\xce"


def per_message(fn: Callable[[], object], n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n * 1e6


def frame_path(stream: bytes, n: int, with_from_wire: bool) -> float:
    """CPU per message to take ``stream`` (n deliveries) in as ``Connection._receive`` does:
    256 KiB chunks (its ``recv`` size) appended to the buffer, each followed by
    ``_process_buffer``; then, per chunk, ``from_wire`` on what it delivered (as a worker
    turns each batch of deliveries into messages) if ``with_from_wire``."""
    conn = wire.Connection(wire.Params())
    ch = wire.Channel(conn, 1)
    ch.is_open = True
    conn.channels[1] = ch
    got: list[wire.Incoming] = []
    ch.on_delivery = got.append
    chunks = [stream[i:i + RECV] for i in range(0, len(stream), RECV)]
    count = 0
    start = time.process_time()
    for chunk in chunks:
        conn._rbuf += chunk
        conn._process_buffer()
        if with_from_wire:
            for inc in got:
                from_wire(inc.properties, inc.body)
        count += len(got)
        got.clear()
    elapsed = time.process_time() - start
    assert count == n and not conn._rbuf, (count, len(conn._rbuf))
    return elapsed / n * 1e6


def measure(label: str, header: bytes, body_frame: bytes, n: int, rounds: int) -> None:
    payload = header[7:-1]
    props = wire.decode_properties(payload, 12)
    assert len(props["headers"]) == 19, len(props["headers"])
    stream = b"".join(deliver_frame(i + 1) + header + body_frame for i in range(n))
    body = body_frame[7:-1]
    rows: dict[str, list[float]] = {"decode_properties": [], "from_wire": [],
                                    "frames -> Incoming": [], "receive path total": []}
    dp = wire.decode_properties
    for _ in range(rounds):
        rows["decode_properties"].append(per_message(lambda: dp(payload, 12), n))
        fresh = [dp(payload, 12) for _ in range(n)]  # from_wire takes its argument apart
        start = time.process_time()
        for decoded in fresh:
            from_wire(decoded, body)
        rows["from_wire"].append((time.process_time() - start) / n * 1e6)
        del fresh
        rows["frames -> Incoming"].append(frame_path(stream, n, False))
        rows["receive path total"].append(frame_path(stream, n, True))
    print(f"{label} (header frame {len(header)} bytes, {n} messages x {rounds} rounds), "
          "us/message:")
    print(f"  {'':<20} {'best':>6} {'median':>7}")
    for name, values in rows.items():
        print(f"  {name:<20} {min(values):6.2f} {statistics.median(values):7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=20000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"celeriac from {Path(wire.__file__).parent.parent}, Python {sys.version.split()[0]}")
    measure("celeriac-published task", *celeriac_header_frame(), n=args.n, rounds=args.rounds)
    measure("Celery/py-amqp-published task", *celery_header_frame(), n=args.n,
            rounds=args.rounds)


if __name__ == "__main__":
    main()
