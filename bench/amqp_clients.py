#!/usr/bin/env python
"""Measure AMQP 0-9-1 clients on the local RabbitMQ: the numbers behind docs/amqp.md.

    .venv/bin/python bench/amqp_clients.py                 # 3 rounds x 20,000 messages
    .venv/bin/python bench/amqp_clients.py -n 5000 --rounds 1
    .venv/bin/python bench/amqp_clients.py --loss          # connection-loss behaviour only

For each client: confirmed publish rate (publisher confirms on, a window of 200 messages
in flight), and consume rate (basic.consume, prefetch 500, one ``multiple`` ack per 100).
The message is a real Celery task message (19 headers, JSON body). Clients run one after
the other within a round, rounds are interleaved (every client once per round), and the
median over the rounds is reported with the CPU time the client process spent per
message, so every client is measured under the same load. Also measured: decoding the
19-entry header table alone (each library's own decoder, in-process), and what each
client raises when its connection is cut (through a local TCP proxy).

Each run gets its own vhost, deleted afterwards. Needs: pip install pika aiormq (amqp
comes with celery). ``celeriac-wire`` is celeriac's own client
(celeriac/brokers/amqp_client.py), measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
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


CPU: dict[str, float] = {}  # label -> client CPU seconds of the last timed() run


def timed(label: str, n: int, fn: Callable[[], None]) -> float:
    c = time.process_time()
    t = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t
    CPU[label] = (time.process_time() - c) / n
    rate = n / elapsed
    print(f"  {label:<40} {rate:>10,.0f} msg/s  {CPU[label] * 1e6:6.1f} us CPU/msg", flush=True)
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

    out = {"publish_confirmed": timed("py-amqp publish (confirms)", n, publish),
           "publish_cpu_us": CPU["py-amqp publish (confirms)"] * 1e6}
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
    out["consume_cpu_us"] = CPU["py-amqp consume"] * 1e6
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

    out = {"publish_confirmed": timed("pika Blocking publish (confirm each)", m, publish),
           "publish_cpu_us": CPU["pika Blocking publish (confirm each)"] * 1e6}
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
    out["consume_cpu_us"] = CPU["pika Blocking consume"] * 1e6
    conn.close()
    return out


def bench_pika_select(vhost: str, n: int) -> dict[str, float]:
    import pika

    params = pika.ConnectionParameters("127.0.0.1", 5672, vhost)
    q = "bench-pika-select"
    props = pika.BasicProperties(content_type="application/json", content_encoding="utf-8",
                                 headers=HEADERS, delivery_mode=2,
                                 correlation_id=HEADERS["id"], priority=0)
    state: dict[str, Any] = {"sent": 0, "acked": 0, "got": 0, "t": 0.0, "c": 0.0, "out": {}}

    def on_open(conn: Any) -> None:
        conn.channel(on_open_callback=on_channel)

    def on_channel(ch: Any) -> None:
        state["ch"] = ch
        ch.queue_declare(q, durable=True, callback=lambda _f: ch.confirm_delivery(
            on_confirm, callback=lambda _f: start_publish()))

    def start_publish() -> None:
        state["t"] = time.perf_counter()
        state["c"] = time.process_time()
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
            state["out"]["publish_cpu_us"] = (time.process_time() - state["c"]) / n * 1e6
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
        state["c"] = time.process_time()
        state["ch"].basic_consume(q, on_message)

    def on_message(ch: Any, method: Any, _p: Any, _b: bytes) -> None:
        state["got"] += 1
        if state["got"] % 100 == 0 or state["got"] == n:
            ch.basic_ack(method.delivery_tag, multiple=True)
        if state["got"] == n:
            state["out"]["consume"] = n / (time.perf_counter() - state["t"])
            state["out"]["consume_cpu_us"] = (time.process_time() - state["c"]) / n * 1e6
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
        c = time.process_time()
        pending: list[Any] = []
        for _ in range(n):
            pending.append(asyncio.ensure_future(
                ch.basic_publish(BODY, routing_key=q, properties=props)))
            if len(pending) >= WINDOW:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        out["publish_confirmed"] = n / (time.perf_counter() - t)
        out["publish_cpu_us"] = (time.process_time() - c) / n * 1e6
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
        c = time.process_time()
        await ch2.basic_consume(q, on_msg)
        await asyncio.wait_for(done, 120)
        out["consume"] = n / (time.perf_counter() - t)
        out["consume_cpu_us"] = (time.process_time() - c) / n * 1e6
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

    def publish() -> None:
        # Properties encoded per message, as the libraries do (and celeriac's broker).
        for start in range(0, n, WINDOW):
            count = min(WINDOW, n - start)
            ch.publish_confirmed([ch.f_publish("", q, BODY, {
                "content_type": "application/json", "content_encoding": "utf-8",
                "headers": HEADERS, "delivery_mode": 2, "correlation_id": HEADERS["id"],
                "priority": 0}) for _ in range(count)], count)

    out = {"publish_confirmed": timed("celeriac wire publish (confirms)", n, publish),
           "publish_cpu_us": CPU["celeriac wire publish (confirms)"] * 1e6}
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
    out["consume_cpu_us"] = CPU["celeriac wire consume"] * 1e6
    conn.close()
    return out


# -- decoding the header table alone ---------------------------------------------------------


def bench_decode(loops: int = 20000) -> dict[str, float]:
    """Microseconds to decode the 19-entry task header table, per library's own decoder."""
    sys.path.insert(0, str(_BENCH.parent))
    from celeriac.brokers import amqp_client as wire

    raw = wire.encode_table(HEADERS)
    framed = wire._U32.pack(len(raw)) + raw
    decoders: dict[str, Callable[[], Any]] = {
        "celeriac-wire": lambda: wire.decode_table(framed, 4, len(framed))}
    try:
        from amqp import serialization

        decoders["py-amqp"] = lambda: serialization.loads("F", framed, 0)
    except ImportError:
        pass
    try:
        import pika.data

        decoders["pika"] = lambda: pika.data.decode_table(framed, 0)
    except ImportError:
        pass
    try:
        from pamqp import decode

        decoders["aiormq (pamqp)"] = lambda: decode.field_table(framed)
    except ImportError:
        pass
    out = {}
    for name, fn in decoders.items():
        fn()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(loops // 5):
                fn()
            best = min(best, (time.perf_counter() - t) / (loops // 5))
        out[name] = best * 1e6
        print(f"  decode the 19-header table, {name:<16} {out[name]:6.1f} us", flush=True)
    return out


# -- connection loss ------------------------------------------------------------------------


class Proxy:
    """A TCP proxy to RabbitMQ whose connections can be cut."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", 5672))
            self.socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        for sock in self.socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass
        self.socks.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:80]}"


def loss_behaviour(vhost: str) -> dict[str, str]:
    """Cut each client's connection, then publish (confirms on): what does it raise?"""
    out: dict[str, str] = {}

    def probe(name: str, run: Callable[[Proxy], str]) -> None:
        proxy = Proxy()
        try:
            out[name] = run(proxy)
        except ImportError as exc:
            out[name] = f"not installed ({exc})"
        finally:
            proxy.close()
        print(f"  connection cut, {name:<16} {out[name]}", flush=True)

    def pyamqp(proxy: Proxy) -> str:
        import amqp

        conn = amqp.Connection(f"127.0.0.1:{proxy.port}", virtual_host=vhost)
        conn.connect()
        ch = conn.channel()
        ch.confirm_select()
        proxy.cut()
        try:
            ch.basic_publish_confirm(amqp.Message(BODY), "", "loss", timeout=5)
            conn.drain_events(timeout=5)
        except Exception as exc:
            return "raises " + _describe(exc)
        return "no error"

    def pika_blocking(proxy: Proxy) -> str:
        import pika

        conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", proxy.port, vhost))
        ch = conn.channel()
        ch.confirm_delivery()
        proxy.cut()
        try:
            ch.basic_publish("", "loss", BODY)
            conn.process_data_events(5)
        except Exception as exc:
            return "raises " + _describe(exc)
        return "no error"

    def pika_select(proxy: Proxy) -> str:
        import pika

        reason: list[str] = []

        def on_open(conn: Any) -> None:
            conn.channel(on_open_callback=lambda ch: conn.ioloop.call_later(0.1, proxy.cut))

        conn = pika.SelectConnection(pika.ConnectionParameters("127.0.0.1", proxy.port, vhost),
                                     on_open_callback=on_open)
        conn.add_on_close_callback(
            lambda _c, exc: (reason.append(_describe(exc)), conn.ioloop.stop()))
        conn.ioloop.call_later(10, conn.ioloop.stop)
        conn.ioloop.start()
        return ("on_close callback with " + reason[0]) if reason else "no callback in 10 s"

    def aiormq_(proxy: Proxy) -> str:
        import aiormq

        async def run() -> str:
            conn = await aiormq.connect(f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}")
            ch = await conn.channel(publisher_confirms=True)
            proxy.cut()
            await asyncio.sleep(0.2)
            try:
                await asyncio.wait_for(ch.basic_publish(BODY, routing_key="loss"), 5)
            except Exception as exc:
                return "raises " + _describe(exc)
            return "no error"

        return asyncio.run(run())

    def ours(proxy: Proxy) -> str:
        sys.path.insert(0, str(_BENCH.parent))
        from celeriac.brokers import amqp_client as wire

        [params] = wire.parse_url(f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}")
        conn = wire.Connection(params).connect()
        ch = conn.channel()
        ch.confirm_select()
        proxy.cut()
        try:
            ch.publish_confirmed([ch.f_publish("", "loss", BODY, {})], 1, timeout=5)
        except Exception as exc:
            return "raises " + _describe(exc)
        return "no error"

    for name, fn in [("py-amqp", pyamqp), ("pika-blocking", pika_blocking),
                     ("pika-select", pika_select), ("aiormq", aiormq_), ("celeriac-wire", ours)]:
        probe(name, fn)
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("amqp", "pika", "aiormq", "pamqp"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


CLIENTS: list[tuple[str, Callable[[str, int], dict[str, float]]]] = [
    ("py-amqp", bench_pyamqp), ("pika-blocking", bench_pika_blocking),
    ("pika-select", bench_pika_select), ("aiormq", bench_aiormq),
    ("celeriac-wire", bench_celeriac_wire)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loss", action="store_true", help="connection-loss behaviour only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    vhost = f"celeriac-clients-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    results: dict[str, Any] = {"versions": versions(), "load_average_before": os.getloadavg(),
                               "n": args.n, "rounds": args.rounds}
    print(f"versions: {results['versions']}; load average before: "
          f"{results['load_average_before'][0]:.1f}", flush=True)
    try:
        if args.loss:
            results["loss"] = loss_behaviour(vhost)
        else:
            runs: dict[str, list[dict[str, float]]] = {}
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}", flush=True)
                for name, fn in CLIENTS:
                    try:
                        runs.setdefault(name, []).append(fn(vhost, args.n))
                    except ImportError as exc:
                        print(f"  {name}: not installed ({exc})")
            results["decode_us"] = bench_decode()
            results["loss"] = loss_behaviour(vhost)
            results["load_average_after"] = os.getloadavg()
            median: dict[str, dict[str, float]] = {}
            for name, items in runs.items():
                if items:
                    median[name] = {key: statistics.median(i[key] for i in items)
                                    for key in items[0]}
            results["median"] = median
            results["runs"] = runs
            print(f"\nmedian of {args.rounds} rounds, {args.n} messages "
                  f"(load average {results['load_average_before'][0]:.1f} before, "
                  f"{results['load_average_after'][0]:.1f} after):")
            print(f"  {'client':<16}{'publish/s':>11}{'us CPU':>8}{'consume/s':>11}{'us CPU':>8}")
            for name, m in median.items():
                print(f"  {name:<16}{m['publish_confirmed']:>11,.0f}{m['publish_cpu_us']:>8.1f}"
                      f"{m['consume']:>11,.0f}{m['consume_cpu_us']:>8.1f}")
    finally:
        rabbitmqctl("delete_vhost", vhost)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
