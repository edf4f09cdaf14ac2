#!/usr/bin/env python
"""RabbitMQ benchmark: celeriac and the real Celery 5.7 on the same local RabbitMQ, one run.

    .venv/bin/python bench/amqp.py                  # 20,000 tasks each, worker -c 2
    .venv/bin/python bench/amqp.py -n 5000 --skip-celery
    .venv/bin/python bench/amqp.py --json

For each system, on a vhost of its own (deleted afterwards), results over ``rpc://``:

* enqueue: ``noop.delay()`` in a loop (celeriac: publisher confirms on, so each call
  returns once RabbitMQ has the message; Celery: its default, no confirms). celeriac is
  also measured with ``confirm_publish=False`` for a like-for-like figure.
* drain: N tasks queued, then ``worker -c 2`` (prefork) started; time until the queue is
  empty and until all N results reached the reply queue (the bench counts them there with
  passive declares, so the numbers do not depend on a client reading them).
* round trip: ``delay().get()`` on the idle worker, p50/p99 over ``--round-trips`` calls.
* CPU (psutil) during the drain: the RabbitMQ server process and the worker's processes,
  in cores (1.0 = one core busy for the whole drain) and in microseconds per task, so the
  limit shows: on a 2-core machine RabbitMQ and the worker share the same two cores.

Targets (issue #4): drain >= 10,000/s with confirms on (>= 5x Celery, 2x Dramatiq's
~5,000/s), round-trip p50 <= 0.7 ms. Printed with PASS/FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's directory comes first on sys.path, and its name would hide
# the ``amqp`` package (py-amqp) that Celery imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.drain import (  # noqa: E402 (the worker, as drain.py runs it)
    WorkerProc,
    compile_sources,
    percentile,
)
from celeriac.brokers import amqp_client as wire  # noqa: E402

HOST, PORT = "127.0.0.1", 5672
TARGET_DRAIN = 10_000.0
TARGET_P50_MS = 0.7
TARGET_VS_CELERY = 5.0
DRAMATIQ_DRAIN = 5_000.0  # issue #4, measured on a 2-core machine like ours
REPLIES = "bench-replies"


def log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"  .. {msg}", file=sys.stderr, flush=True)


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


class Counter:
    """Reads queue depths with passive declares (never consumes)."""

    def __init__(self, url: str) -> None:
        [params] = wire.parse_url(url)
        self.conn = wire.Connection(params).connect()
        self.ch = self.conn.channel()

    def declare_replies(self) -> None:
        self.ch.queue_declare(REPLIES, durable=True)

    def depth(self, queue: str) -> int:
        return self.ch.queue_declare(queue, passive=True)[1]

    def close(self) -> None:
        self.conn.close()


def rabbitmq_process() -> psutil.Process | None:
    """The RabbitMQ server (beam.smp running ``rabbit boot``), not rabbitmqctl's beams."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["name"] == "beam.smp" and "rabbit" in cmd and "boot" in cmd:
            return proc
    return None


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def drain(worker: WorkerProc, counter: Counter, n: int, timeout: float) -> dict[str, float]:
    t0 = worker.started
    t_empty = t_first = None
    rabbit = rabbitmq_process()
    rabbit_cpu0 = cpu_seconds([rabbit]) if rabbit is not None else 0.0
    tree: list[psutil.Process] = []
    tree_at = 0.0
    while True:
        time.sleep(0.01)
        worker.check()
        now = time.perf_counter()
        if t_empty is None and counter.depth("celery") == 0:
            t_empty = now
        done = counter.depth(REPLIES)
        if t_first is None and done:
            t_first = now
        if done < n and now - tree_at > 0.5:
            # Its children, while they live (not every 10 ms: reading /proc costs CPU that
            # the worker and RabbitMQ share).
            tree = worker.processes() or tree
            tree_at = now
        if done >= n:
            t_done = now
            t_empty = t_empty or now
            break
        if now - t0 > timeout:
            raise RuntimeError(f"drain timed out: {done}/{n} results")
    assert t_first is not None
    elapsed = t_done - t0
    # The worker's processes started with the drain: their CPU time is the drain's.
    worker_cpu = cpu_seconds(tree)
    rabbit_cpu = (cpu_seconds([rabbit]) - rabbit_cpu0) if rabbit is not None else float("nan")
    return {"startup_s": t_first - t0, "queue_empty_per_s": n / (t_empty - t0),
            "results_per_s": n / elapsed, "steady_per_s": n / max(t_done - t_first, 1e-9),
            "rabbitmq_cores": rabbit_cpu / elapsed, "worker_cores": worker_cpu / elapsed,
            "rabbitmq_us_per_task": rabbit_cpu / n * 1e6,
            "worker_us_per_task": worker_cpu / n * 1e6}


def round_trips(task: Any, count: int, key: str = "rt") -> dict[str, float]:
    for _ in range(min(50, count)):
        task.delay().get(timeout=10)
    lat = []
    for _ in range(count):
        t = time.perf_counter()
        task.delay().get(timeout=10)
        lat.append((time.perf_counter() - t) * 1000)
    return {f"{key}_p50_ms": percentile(lat, 0.5), f"{key}_p99_ms": percentile(lat, 0.99)}


def confirm_floor(counter: Counter, count: int) -> dict[str, float]:
    """What one confirmed publish costs with no worker involved: RabbitMQ's confirm
    latency for a persistent message in a durable queue (a ``delay()`` waits for it), and
    for a transient one. A message the size of a task's; one at a time, as ``delay()``."""
    ch = counter.conn.channel()
    ch.confirm_select()
    ch.queue_declare("bench-floor", durable=True)
    out = {}
    for mode, key in ((2, "floor_persistent_ms"), (1, "floor_transient_ms")):
        lat = []
        for _ in range(count):
            frame = ch.f_publish("", "bench-floor", b"x" * 600, {"delivery_mode": mode})
            t = time.perf_counter()
            ch.publish_confirmed([frame], 1)
            lat.append((time.perf_counter() - t) * 1000)
        out[key] = percentile(lat, 0.5)
    ch.queue_delete("bench-floor")
    ch.close()
    return out


def new_vhost() -> str:
    name = f"celeriac-bench-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return name


def run_worker(name: str, cmd: list[str], env: dict[str, str], tmp: Path, counter: Counter,
               task: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Start a worker on the filled queue: time its drain, then round trips on it idle."""
    log(f"{name}: drain with worker -c {args.concurrency}", args.json)
    worker = WorkerProc(cmd, env, ROOT, tmp / f"{name.lower()}-worker.log")
    try:
        out: dict[str, Any] = drain(worker, counter, args.tasks, args.timeout)
        log(f"{name}: round trips", args.json)
        out.update(round_trips(task, args.round_trips))
        if name == "celeriac":
            # The same without publisher confirms: what the worker and the result take.
            task.app.broker.confirm_publish = False
            try:
                out.update(round_trips(task, args.round_trips, "rt_unconfirmed"))
            finally:
                task.app.broker.confirm_publish = True
            out.update(confirm_floor(counter, args.round_trips))
        return out
    finally:
        worker.stop()


def bench_celeriac(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from bench import celeriac_app

    vhost = new_vhost()
    url = f"amqp://guest:guest@{HOST}:{PORT}/{vhost}"
    out: dict[str, Any] = {"vhost": vhost}
    app = celeriac_app.app
    app.close()
    app.conf.broker_url = url
    app.conf.result_backend = "rpc://"
    counter = Counter(url)
    try:
        counter.declare_replies()
        celeriac_app.noop.apply_async(reply_to=REPLIES)  # connect and declare first
        log(f"celeriac: enqueue {args.tasks} tasks (confirms on)", args.json)
        t = time.perf_counter()
        for _ in range(args.tasks - 1):
            celeriac_app.noop.apply_async(reply_to=REPLIES)
        out["enqueue_per_s"] = args.tasks / (time.perf_counter() - t)
        fast = min(args.tasks, 5000)
        app.broker.confirm_publish = False  # type: ignore[attr-defined]
        t = time.perf_counter()
        for _ in range(fast):
            celeriac_app.noop.apply_async(queue="bench-unconfirmed", ignore_result=True)
        out["enqueue_no_confirms_per_s"] = fast / (time.perf_counter() - t)
        app.broker.confirm_publish = True  # type: ignore[attr-defined]
        app.broker.purge("bench-unconfirmed")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CELERIAC_BROKER_URL": url,
               "CELERIAC_RESULT_BACKEND": "rpc://"}
        out.update(run_worker("celeriac", [
            sys.executable, "-m", "celeriac", "-A", "bench.celeriac_app", "-b", url, "worker",
            "-c", str(args.concurrency), "-l", "WARNING"], env, tmp, counter,
            celeriac_app.noop, args))
    finally:
        counter.close()
        app.close()
        rabbitmqctl("delete_vhost", vhost)
    return out


def bench_celery(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    vhost = new_vhost()
    url = f"amqp://guest:guest@{HOST}:{PORT}/{vhost}"
    os.environ.update(BENCH_CELERY_BROKER=url, BENCH_CELERY_BACKEND="rpc://",
                      BENCH_CELERY_QUEUE="celery")
    from bench import celery_app as celery_module

    app = celery_module.app
    app.conf.broker_url = url
    app.conf.result_backend = "rpc://"
    app.conf.task_default_queue = "celery"
    app.conf.broker_transport_options = {}
    app.conf.result_backend_transport_options = {}
    out: dict[str, Any] = {"vhost": vhost}
    counter = Counter(url)
    try:
        counter.declare_replies()
        celery_module.noop.apply_async(reply_to=REPLIES)
        log(f"Celery: enqueue {args.tasks} tasks", args.json)
        t = time.perf_counter()
        for _ in range(args.tasks - 1):
            celery_module.noop.apply_async(reply_to=REPLIES)
        out["enqueue_per_s"] = args.tasks / (time.perf_counter() - t)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out.update(run_worker("Celery", [
            sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", "-c",
            str(args.concurrency), "-l", "WARNING", "--without-gossip", "--without-mingle",
            "-n", f"bench-{uuid.uuid4().hex[:6]}@%h"], env, tmp, counter, celery_module.noop,
            args))
    finally:
        counter.close()
        app.close()
        rabbitmqctl("delete_vhost", vhost)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--tasks", type=int, default=20_000)
    parser.add_argument("-c", "--concurrency", type=int, default=2)
    parser.add_argument("--round-trips", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--skip-celery", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    compile_sources()
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="celeriac-amqp-bench-"))
    results: dict[str, Any] = {"tasks": args.tasks, "concurrency": args.concurrency,
                               "load_average_before": os.getloadavg()}
    results["celeriac"] = bench_celeriac(args, tmp)
    if not args.skip_celery:
        results["celery"] = bench_celery(args, tmp)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    c = results["celeriac"]
    print(f"RabbitMQ, {args.tasks} tasks, worker -c {args.concurrency} (prefork), rpc:// "
          f"(load average before: {results['load_average_before'][0]:.1f}, "
          f"after: {os.getloadavg()[0]:.1f}; {os.cpu_count()} cores)")
    rows = [("enqueue /s (confirms: celeriac on)", "enqueue_per_s", False),
            ("drain: queue empty /s", "queue_empty_per_s", False),
            ("drain: all results /s", "results_per_s", False),
            ("drain: steady /s", "steady_per_s", False),
            ("delay().get() p50 ms", "rt_p50_ms", True),
            ("delay().get() p99 ms", "rt_p99_ms", True),
            ("drain: RabbitMQ CPU, cores", "rabbitmq_cores", None),
            ("drain: RabbitMQ CPU, us/task", "rabbitmq_us_per_task", None),
            ("drain: worker CPU, cores", "worker_cores", None),
            ("drain: worker CPU, us/task", "worker_us_per_task", None)]
    celery = results.get("celery", {})
    print(f"  {'':<36}{'celeriac':>10}{'Celery':>10}{'ratio':>8}")
    for label, key, lower_is_better in rows:
        mine, theirs = c.get(key, float("nan")), celery.get(key, float("nan"))
        ratio = ""
        if lower_is_better is not None and mine and theirs and theirs == theirs:
            ratio = f"{(theirs / mine if lower_is_better else mine / theirs):.2f}x"
        print(f"  {label:<36}{mine:>10.1f}{theirs:>10.1f}{ratio:>8}")
    print(f"  celeriac enqueue without confirms: {c['enqueue_no_confirms_per_s']:.0f}/s")
    print(f"  celeriac delay().get() p50 without confirms: {c['rt_unconfirmed_p50_ms']:.2f} ms")
    print(f"  RabbitMQ alone, one confirmed publish p50: persistent "
          f"{c['floor_persistent_ms']:.2f} ms, transient {c['floor_transient_ms']:.2f} ms "
          "(a delay() with confirms cannot return sooner)")

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    drain_rate = c["results_per_s"]
    print("  targets (issue #4):")
    print(f"    drain >= {TARGET_DRAIN:,.0f}/s with confirms on: {drain_rate:,.0f}/s "
          f"{verdict(drain_rate >= TARGET_DRAIN)}")
    if celery:
        ratio = drain_rate / celery["results_per_s"]
        print(f"    drain >= {TARGET_VS_CELERY:.0f}x Celery on the same RabbitMQ: {ratio:.1f}x "
              f"{verdict(ratio >= TARGET_VS_CELERY)}")
    print(f"    drain >= 2x Dramatiq (~{DRAMATIQ_DRAIN:,.0f}/s, the issue's figure): "
          f"{drain_rate / DRAMATIQ_DRAIN:.1f}x {verdict(drain_rate >= 2 * DRAMATIQ_DRAIN)}")
    print(f"    delay().get() p50 <= {TARGET_P50_MS} ms: {c['rt_p50_ms']:.2f} ms "
          f"{verdict(c['rt_p50_ms'] <= TARGET_P50_MS)}")


if __name__ == "__main__":
    main()
