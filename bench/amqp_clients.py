#!/usr/bin/env python
"""Measure AMQP 0-9-1 clients on the local RabbitMQ: the numbers behind docs/amqp.md.

    .venv/bin/python bench/amqp_clients.py            # 20,000 messages per client
    .venv/bin/python bench/amqp_clients.py -n 5000

For each client: confirmed publish rate (publisher confirms on, a window of 200 messages
in flight), and consume rate (basic.consume, prefetch 500, one ``multiple`` ack per 100).
The message is a real Celery task message (19 headers, JSON body). Each run gets its own
vhost, deleted afterwards. Needs: pip install pika aiormq (amqp comes with celery).
``celeriac-wire`` is celeriac's own client (celeriac/brokers/amqp_client.py), measured
the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, bench/ comes first on sys.path and bench/amqp.py would hide py-amqp.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]

HEADERS: dict[str, Any] = {
    "lang": "py", "task": "tasks.add", "id": "f413d190-f34d-4676-a436-e06e14f456c0",
    "shadow": None, "eta": None, "expires": None, "group": None, "group_index": None,
    "retries": 0, "timelimit": [None, None], "root_id": "f413d190-f34d-4676-a436-e06e14f456c0",
    "parent_id": None, "argsrepr": "(2, 2)", "kwargsrepr": "{}", "origin": "gen12088@vm",
    "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
}
BODY = b'[[2, 2], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
WINDOW = 200


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True)


def timed(label: str, n: int, fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    rate = n / (time.perf_counter() - t)
    print(f"  {label:<40} {rate:>10,.0f} msg/s", flush=True)
    return rate


# -- py-amqp ---------------------------------------------------------------------------------


def bench_pyamqp(vhost: str, n: int) -> dict[str, float]:
    import amqp

    conn = amqp.Connection("127.0.0.1:5672", virtual_host=vhost)
    conn.connect()
    ch = conn.channel()
    q = "bench-pyamqp"
    ch.queue_declare(q, durable=True, auto_delete=False)
    ch.confirm_select()
    acked = [0]

    def on_ack(tag: int, multiple: bool) -> None:
        acked[0] = tag

    ch.events["basic_ack"].add(on_ack)

    def publish() -> None:
        for i in range(1, n + 1):
            msg = amqp.Message(BODY, content_type="application/json", content_encoding="utf-8",
                               application_headers=HEADERS, delivery_mode=2,
                               correlation_id=HEADERS["id"], priority=0)
            ch.basic_publish(msg, "", q)
            while i - acked[0] >= WINDOW:
                conn.drain_events(timeout=5)
        while acked[0] < n:
            conn.drain_events(timeout=5)

    out = {"publish_confirmed": timed("py-amqp publish (confirms)", n, publish)}
    ch2 = conn.channel()
    ch2.basic_qos(0, 500, False)
    got = [0]

    def on_msg(m: Any) -> None:
        got[0] += 1
        if got[0] % 100 == 0:
            ch2.basic_ack(m.delivery_tag, multiple=True)

    ch2.basic_consume(q, callback=on_msg)

    def consume() -> None:
        while got[0] < n:
            conn.drain_events(timeout=5)

    out["consume"] = timed("py-amqp consume", n, consume)
    conn.close()
    return out


# -- pika -------------------------------------------------------------------------------------


def bench_pika_blocking(vhost: str, n: int) -> dict[str, float]:
    import pika

    params = pika.ConnectionParameters("127.0.0.1", 5672, vhost)
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    q = "bench-pika"
    ch.queue_declare(q, durable=True)
    ch.confirm_delivery()  # BlockingChannel then waits for each confirm
    props = pika.BasicProperties(content_type="application/json", content_encoding="utf-8",
                                 headers=HEADERS, delivery_mode=2,
                                 correlation_id=HEADERS["id"], priority=0)
    m = min(n, 5000)

    def publish() -> None:
        for _ in range(m):
            ch.basic_publish("", q, BODY, props)

    out = {"publish_confirmed": timed("pika Blocking publish (confirm each)", m, publish)}
    ch2 = conn.channel()
    ch2.basic_qos(prefetch_count=500)
    got = [0]

    def consume() -> None:
        for method, _p, _b in ch2.consume(q, inactivity_timeout=5):
            assert method is not None
            got[0] += 1
            if got[0] % 100 == 0 or got[0] == m:
                ch2.basic_ack(method.delivery_tag, multiple=True)
            if got[0] >= m:
                break
        ch2.cancel()

    out["consume"] = timed("pika Blocking consume", m, consume)
    conn.close()
    return out


def bench_pika_select(vhost: str, n: int) -> dict[str, float]:
    import pika

    params = pika.ConnectionParameters("127.0.0.1", 5672, vhost)
    q = "bench-pika-select"
    props = pika.BasicProperties(content_type="application/json", content_encoding="utf-8",
                                 headers=HEADERS, delivery_mode=2,
                                 correlation_id=HEADERS["id"], priority=0)
    state: dict[str, Any] = {"sent": 0, "acked": 0, "got": 0, "t": 0.0, "out": {}}

    def on_open(conn: Any) -> None:
        conn.channel(on_open_callback=on_channel)

    def on_channel(ch: Any) -> None:
        state["ch"] = ch
        ch.queue_declare(q, durable=True, callback=lambda _f: ch.confirm_delivery(
            on_confirm, callback=lambda _f: start_publish()))

    def start_publish() -> None:
        state["t"] = time.perf_counter()
        pump()

    def pump() -> None:
        ch = state["ch"]
        while state["sent"] < n and state["sent"] - state["acked"] < WINDOW:
            ch.basic_publish("", q, BODY, props)
            state["sent"] += 1

    def on_confirm(frame: Any) -> None:
        tag = frame.method.delivery_tag
        state["acked"] = tag
        if tag >= n:
            state["out"]["publish_confirmed"] = n / (time.perf_counter() - state["t"])
            print(f"  {'pika Select publish (confirms)':<40} "
                  f"{state['out']['publish_confirmed']:>10,.0f} msg/s", flush=True)
            start_consume()
        else:
            pump()

    def start_consume() -> None:
        ch = state["ch"]
        ch.basic_qos(prefetch_count=500, callback=lambda _f: begin())

    def begin() -> None:
        state["t"] = time.perf_counter()
        state["ch"].basic_consume(q, on_message)

    def on_message(ch: Any, method: Any, _p: Any, _b: bytes) -> None:
        state["got"] += 1
        if state["got"] % 100 == 0 or state["got"] == n:
            ch.basic_ack(method.delivery_tag, multiple=True)
        if state["got"] == n:
            state["out"]["consume"] = n / (time.perf_counter() - state["t"])
            print(f"  {'pika Select consume':<40} {state['out']['consume']:>10,.0f} msg/s",
                  flush=True)
            conn.close()

    conn = pika.SelectConnection(params, on_open_callback=on_open)
    conn.ioloop.call_later(120, conn.ioloop.stop)
    conn.add_on_close_callback(lambda *_: conn.ioloop.stop())
    conn.ioloop.start()
    out: dict[str, float] = state["out"]
    return out


# -- aiormq ----------------------------------------------------------------------------------


def bench_aiormq(vhost: str, n: int) -> dict[str, float]:
    import aiormq
    from pamqp.commands import Basic

    async def run() -> dict[str, float]:
        conn = await aiormq.connect(f"amqp://guest:guest@127.0.0.1:5672/{vhost}")
        ch = await conn.channel(publisher_confirms=True)
        q = "bench-aiormq"
        await ch.queue_declare(q, durable=True)
        props = aiormq.spec.Basic.Properties(
            content_type="application/json", content_encoding="utf-8", headers=HEADERS,
            delivery_mode=2, correlation_id=HEADERS["id"], priority=0)
        out: dict[str, float] = {}
        t = time.perf_counter()
        pending: list[Any] = []
        for _ in range(n):
            pending.append(asyncio.ensure_future(
                ch.basic_publish(BODY, routing_key=q, properties=props)))
            if len(pending) >= WINDOW:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        out["publish_confirmed"] = n / (time.perf_counter() - t)
        print(f"  {'aiormq publish (confirms)':<40} {out['publish_confirmed']:>10,.0f} msg/s",
              flush=True)
        ch2 = await conn.channel()
        await ch2.basic_qos(prefetch_count=500)
        done = asyncio.get_running_loop().create_future()
        got = [0]

        async def on_msg(m: Any) -> None:
            got[0] += 1
            if got[0] % 100 == 0 or got[0] == n:
                await ch2.basic_ack(m.delivery.delivery_tag, multiple=True)
            if got[0] == n and not done.done():
                done.set_result(None)

        t = time.perf_counter()
        await ch2.basic_consume(q, on_msg)
        await asyncio.wait_for(done, 120)
        out["consume"] = n / (time.perf_counter() - t)
        print(f"  {'aiormq consume':<40} {out['consume']:>10,.0f} msg/s", flush=True)
        _ = Basic
        await conn.close()
        return out

    return asyncio.run(run())


# -- celeriac's own client ------------------------------------------------------------------


def bench_celeriac_wire(vhost: str, n: int) -> dict[str, float]:
    sys.path.insert(0, str(_BENCH.parent))
    from celeriac.brokers import amqp_client as wire

    [params] = wire.parse_url(f"amqp://guest:guest@127.0.0.1:5672/{vhost}")
    conn = wire.Connection(params).connect()
    ch = conn.channel()
    q = "bench-celeriac"
    ch.queue_declare(q, durable=True)
    ch.confirm_select()
    props = wire.encode_properties({
        "content_type": "application/json", "content_encoding": "utf-8", "headers": HEADERS,
        "delivery_mode": 2, "correlation_id": HEADERS["id"], "priority": 0})

    def publish() -> None:
        for start in range(0, n, WINDOW):
            count = min(WINDOW, n - start)
            ch.publish_confirmed([ch.f_publish("", q, BODY, props) for _ in range(count)],
                                 count)

    out = {"publish_confirmed": timed("celeriac wire publish (confirms)", n, publish)}
    ch2 = conn.channel()
    ch2.qos(500)
    got = [0]

    def on_msg(m: Any) -> None:
        got[0] += 1
        if got[0] % 100 == 0 or got[0] == n:
            conn.send(ch2.f_ack(m.delivery_tag, multiple=True))

    ch2.on_delivery = on_msg
    ch2.consume(q, "bench")

    def consume() -> None:
        while got[0] < n:
            conn.pump(5)

    out["consume"] = timed("celeriac wire consume", n, consume)
    conn.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    vhost = f"celeriac-clients-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    results: dict[str, dict[str, float]] = {}
    try:
        for name, fn in [("py-amqp", bench_pyamqp), ("pika-blocking", bench_pika_blocking),
                         ("pika-select", bench_pika_select), ("aiormq", bench_aiormq),
                         ("celeriac-wire", bench_celeriac_wire)]:
            try:
                results[name] = fn(vhost, args.n)
            except ImportError as exc:
                print(f"  {name}: not installed ({exc})")
    finally:
        rabbitmqctl("delete_vhost", vhost)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
