#!/usr/bin/env python
"""Drain benchmark: celeriac on its embedded SQLite broker, and the real Celery on Redis.

    .venv/bin/python bench/drain.py                 # celeriac + Celery 5.7, 20,000 tasks
    .venv/bin/python bench/drain.py --skip-celery   # celeriac only
    .venv/bin/python bench/drain.py --json          # machine-readable

Measures, for each system: (a) enqueue rate of a plain ``delay()`` loop; (b) drain time of a
real ``worker -c 2`` started afterwards, until the queue is empty and until every result is
stored; (e) the worker's memory right after the drain; (c) ``delay().get()`` round trips on
the idle worker; (d) wake-up latency of the idle worker (send -> task starts). See
bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, Python puts bench/ first on sys.path, where the other benches' modules
# (bench/amqp.py) would shadow packages of the same name (py-amqp, which kombu imports).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import psutil  # noqa: E402

BIN = Path(sys.executable).parent

# Targets from the issue, and Celery's numbers quoted there (Celery 5.7, prefork -c 2, Redis).
TARGET_DRAIN = 5000.0  # tasks/s, worker start -> all results stored
TARGET_WAKE_P50 = 10.0  # ms
TARGET_RSS = 60.0  # MB, supervisor + children
CELERY_REFERENCE = {"drain_per_s": 1000.0, "rss_mb": 145.0}

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_BROKER_DB, REDIS_RESULT_DB = 11, 12


# -- helpers ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"  .. {msg}", file=sys.stderr, flush=True)


def compile_sources() -> None:
    """Byte-compile celeriac and the bench apps, as ``pip install`` does for a package.

    Celery runs from its installed, compiled files; a checkout installed in editable mode
    run with PYTHONDONTWRITEBYTECODE set (as on our machines) would otherwise compile every
    module from source at each start (twice for a worker: the command, then the process
    it execs), which added ~0.2 s to every worker start-up measured here.
    """
    import compileall

    for folder in ("celeriac", "bench"):
        compileall.compile_dir(str(ROOT / folder), quiet=1)


class WorkerProc:
    """A worker started as a user would, in its own session so it can be cleaned up whole."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}:\n"
                               + self.log_path.read_text(errors="replace")[-3000:])

    def processes(self) -> list[psutil.Process]:
        try:
            main = psutil.Process(self.proc.pid)
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def memory(self) -> dict[str, Any]:
        rss = pss = 0
        procs = self.processes()
        for p in procs:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", 0)
        return {"processes": len(procs), "rss_mb": rss / 2**20, "pss_mb": pss / 2**20}

    def stop(self, timeout: float = 20.0) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            # Whatever is left of the session this bench started (children included).
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        finally:
            self._log.close()


def drain(worker: WorkerProc, n: int, waiting: Any, stored: Any, timeout: float) -> dict[str, Any]:
    """Poll until nothing waits in the queue and ``n`` results are stored."""
    t0 = worker.started
    t_empty = t_first = t_done = None
    deadline = t0 + timeout
    while True:
        time.sleep(0.02)  # light polling: the machine's CPUs belong to the worker
        now = time.perf_counter()
        worker.check()
        if t_empty is None and waiting() == 0:
            t_empty = now
        count = stored()
        if t_first is None and count > 0:
            t_first = now
        if count >= n:
            t_done = now
            if t_empty is None:
                t_empty = now
            break
        if now > deadline:
            raise RuntimeError(f"drain timed out after {timeout}s: {count}/{n} results stored")
    return {
        "startup_s": t_first - t0,
        "queue_empty_s": t_empty - t0,
        "results_stored_s": t_done - t0,
        "queue_empty_per_s": n / (t_empty - t0),
        "results_stored_per_s": n / (t_done - t0),
        "steady_per_s": n / max(t_done - t_first, 1e-9),
    }


def round_trips(task: Any, count: int, timeout: float = 10.0) -> dict[str, float]:
    for _ in range(min(20, count)):  # warm-up
        task.delay().get(timeout=timeout)
    lat = []
    for _ in range(count):
        t = time.perf_counter()
        task.delay().get(timeout=timeout)
        lat.append((time.perf_counter() - t) * 1000)
    return {"rt_p50_ms": percentile(lat, 0.50), "rt_p99_ms": percentile(lat, 0.99),
            "rt_per_s": count / (sum(lat) / 1000)}


def wake_ups(task: Any, count: int, gap: tuple[float, float], timeout: float = 10.0
             ) -> dict[str, float]:
    rng = random.Random(42)
    lat = []
    for _ in range(count):
        time.sleep(rng.uniform(*gap))  # the worker goes idle (blocked, waiting for work)
        sent = time.time()
        began = task.delay().get(timeout=timeout)
        lat.append((float(began) - sent) * 1000)
    return {"wake_p50_ms": percentile(lat, 0.50), "wake_p99_ms": percentile(lat, 0.99)}


# -- celeriac --------------------------------------------------------------------------------


def bench_celeriac(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from celeriac.wakeup import channel_dir

    db = tmp / "celeriac.db"
    url = f"sqlite:///{db}"
    os.environ["CELERIAC_BROKER_URL"] = url
    wake_root = Path(channel_dir(str(db), "queues")).parent
    from bench import celeriac_app

    app = celeriac_app.app
    app.conf.broker_url = url
    out: dict[str, Any] = {"broker": "sqlite (embedded, WAL)"}
    worker = None
    try:
        app.broker, app.backend  # noqa: B018 - create the file and tables before timing
        log(f"celeriac: enqueue {args.tasks} tasks", args.json)
        t = time.perf_counter()
        for _ in range(args.tasks):
            celeriac_app.noop.delay()
        out["enqueue_per_s"] = args.tasks / (time.perf_counter() - t)

        watch = sqlite3.connect(str(db), timeout=30)

        def waiting() -> int:
            return watch.execute(
                "SELECT COUNT(*) FROM celeriac_messages WHERE owner IS NULL").fetchone()[0]

        def stored() -> int:
            return watch.execute("SELECT COUNT(*) FROM celeriac_results").fetchone()[0]

        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "CELERIAC_BROKER_URL": url}
        cmd = [str(BIN / "celeriac"), "-A", "bench.celeriac_app", "worker", "-c",
               str(args.concurrency)]
        log("celeriac: " + " ".join(cmd[1:]) + " (draining)", args.json)
        worker = WorkerProc(cmd, env, tmp, tmp / "celeriac-worker.log")
        out.update(drain(worker, args.tasks, waiting, stored, args.timeout))
        out.update(worker.memory())
        # Let the last acks land so the next phases start with an idle worker.
        end = time.monotonic() + 10
        while watch.execute("SELECT COUNT(*) FROM celeriac_messages").fetchone()[0] and \
                time.monotonic() < end:
            time.sleep(0.01)
        watch.close()
        log(f"celeriac: {args.roundtrips} delay().get() round trips", args.json)
        out.update(round_trips(celeriac_app.noop, args.roundtrips))
        log(f"celeriac: {args.wakeups} wake-ups of the idle worker", args.json)
        out.update(wake_ups(celeriac_app.started_at, args.wakeups, (args.gap_min, args.gap_max)))
    finally:
        if worker is not None:
            worker.stop()
        app.close()
        shutil.rmtree(wake_root, ignore_errors=True)
    return out


# -- Celery ----------------------------------------------------------------------------------


def ensure_redis(quiet: bool) -> None:
    import redis

    try:
        redis.Redis(REDIS_HOST, REDIS_PORT, socket_connect_timeout=1).ping()
        return
    except redis.ConnectionError:
        pass
    log("starting redis-server", quiet)
    subprocess.run(
        ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port",
         str(REDIS_PORT), "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
         "--logfile", "/var/log/redis/ci.log"], check=True)
    for _ in range(50):
        try:
            redis.Redis(REDIS_HOST, REDIS_PORT, socket_connect_timeout=1).ping()
            return
        except redis.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError("redis-server did not come up")


def delete_prefixed(client: Any, prefix: str) -> int:
    removed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=prefix + "*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            removed += client.delete(*batch)
            batch = []
    if batch:
        removed += client.delete(*batch)
    return removed


def bench_celery(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import redis

    ensure_redis(args.json)
    run = uuid.uuid4().hex[:10]
    prefix = f"celeriac-bench-{run}:"
    queue = f"bench-{run}"
    broker_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_BROKER_DB}"
    backend_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_RESULT_DB}"
    os.environ.update(BENCH_CELERY_BROKER=broker_url, BENCH_CELERY_BACKEND=backend_url,
                      BENCH_CELERY_QUEUE=queue, BENCH_CELERY_PREFIX=prefix)
    broker_db = redis.Redis(REDIS_HOST, REDIS_PORT, db=REDIS_BROKER_DB)
    result_db = redis.Redis(REDIS_HOST, REDIS_PORT, db=REDIS_RESULT_DB)
    # DBSIZE is O(1); use it only if nothing else lives in the result db, else count our keys.
    result_base = result_db.dbsize()
    meta_pattern = prefix + "celery-task-meta-*"

    def waiting() -> int:
        return int(broker_db.llen(prefix + queue))

    def stored() -> int:
        if result_base == 0:
            return int(result_db.dbsize())
        return sum(1 for _ in result_db.scan_iter(match=meta_pattern, count=5000))

    from bench import celery_app

    app = celery_app.app
    out: dict[str, Any] = {"broker": f"redis db {REDIS_BROKER_DB}, results db {REDIS_RESULT_DB}"}
    worker = None
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=3)
        log(f"Celery: enqueue {args.tasks} tasks", args.json)
        t = time.perf_counter()
        for _ in range(args.tasks):
            celery_app.noop.delay()
        out["enqueue_per_s"] = args.tasks / (time.perf_counter() - t)
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        cmd = [str(BIN / "celery"), "-A", "bench.celery_app", "worker", "-c",
               str(args.concurrency), "-P", "prefork", "-Q", queue, "-n", f"bench-{run}@%h",
               "-l", "WARNING"]
        log("Celery: " + " ".join(cmd[1:]) + " (draining)", args.json)
        worker = WorkerProc(cmd, env, tmp, tmp / "celery-worker.log")
        out.update(drain(worker, args.tasks, waiting, stored, args.timeout))
        out.update(worker.memory())
        log(f"Celery: {args.roundtrips} delay().get() round trips", args.json)
        out.update(round_trips(celery_app.noop, args.roundtrips))
        log(f"Celery: {args.wakeups} wake-ups of the idle worker", args.json)
        out.update(wake_ups(celery_app.started_at, args.wakeups, (args.gap_min, args.gap_max)))
    finally:
        if worker is not None:
            worker.stop()
        try:
            app.close()
        except Exception:
            pass
        delete_prefixed(broker_db, prefix)
        delete_prefixed(result_db, prefix)
        broker_db.close()
        result_db.close()
    return out


# -- both on Redis (--broker redis) ----------------------------------------------------------

# celeriac's keys go to their own two dbs (and a run prefix), Celery's to REDIS_*_DB.
CELERIAC_REDIS_BROKER_DB, CELERIAC_REDIS_RESULT_DB = 13, 14

# Targets from issue #3 (Redis broker + Redis results, worker -c 2, 2 cores).
REDIS_TARGETS = {
    "drain_plain_per_s": 10000.0,  # >= 10x Celery's ~1,000/s
    "drain_results_per_s": 8000.0,
    "enqueue_per_s": 10000.0,
    "rt_p50_ms": 1.0,
}
CELERY_REDIS_REFERENCE = {"drain_plain_per_s": 1000.0, "drain_results_per_s": 900.0,
                          "enqueue_per_s": 2100.0, "rt_p50_ms": 2.1}


class RedisSide:
    """What the Redis measurements need to know of one system (celeriac or Celery)."""

    name: str
    broker_db: int
    result_db: int
    queue_key: str  # the queue's list (priority 0)
    prefix: str
    tasks: Any  # module with noop and started_at
    cmd: list[str]

    def __init__(self) -> None:
        import redis

        self.bdb = redis.Redis(REDIS_HOST, REDIS_PORT, db=self.broker_db)
        self.rdb = redis.Redis(REDIS_HOST, REDIS_PORT, db=self.result_db)

    def held(self) -> int:
        """Messages taken off the queue but not acked yet."""
        raise NotImplementedError

    def close_app(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        for client in (self.bdb, self.rdb):
            try:
                delete_prefixed(client, self.prefix)
            finally:
                client.close()


class CeleriacRedis(RedisSide):
    def __init__(self, run: str) -> None:
        self.name = "celeriac"
        self.broker_db, self.result_db = CELERIAC_REDIS_BROKER_DB, CELERIAC_REDIS_RESULT_DB
        self.prefix = f"celeriac-bench-{run}:"
        query = f"?global_keyprefix={self.prefix}"
        broker = f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.broker_db}{query}"
        backend = f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.result_db}{query}"
        os.environ.update(CELERIAC_BROKER_URL=broker, CELERIAC_RESULT_BACKEND=backend)
        from bench import celeriac_app

        self.tasks = celeriac_app
        self.queue_key = self.prefix + "celery"
        self.cmd = [str(BIN / "celeriac"), "-A", "bench.celeriac_app", "worker", "-c"]
        super().__init__()

    def held(self) -> int:
        consumers = self.bdb.zrange(self.prefix + "celeriac.consumers", 0, -1)
        pipe = self.bdb.pipeline(transaction=False)
        for cid in consumers:
            pipe.hlen(self.prefix + "celeriac.inflight." + cid.decode())
        return sum(int(n) for n in pipe.execute())

    def close_app(self) -> None:
        self.tasks.app.close()


class CeleryRedis(RedisSide):
    def __init__(self, run: str) -> None:
        self.name = "Celery"
        self.broker_db, self.result_db = REDIS_BROKER_DB, REDIS_RESULT_DB
        self.prefix = f"celeriac-bench-{run}:"
        queue = f"bench-{run}"
        os.environ.update(
            BENCH_CELERY_BROKER=f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.broker_db}",
            BENCH_CELERY_BACKEND=f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.result_db}",
            BENCH_CELERY_QUEUE=queue, BENCH_CELERY_PREFIX=self.prefix)
        from bench import celery_app

        self.tasks = celery_app
        self.queue_key = self.prefix + queue
        self.cmd = [str(BIN / "celery"), "-A", "bench.celery_app", "worker", "-P", "prefork",
                    "-Q", queue, "-n", f"bench-{run}@%h", "-l", "WARNING", "-c"]
        super().__init__()

    def held(self) -> int:
        return int(self.bdb.hlen(self.prefix + "unacked"))

    def close_app(self) -> None:
        self.tasks.app.close()


def _drain_staged(side: RedisSide, worker: WorkerProc, staged: str, n: int, until_results: bool,
                  timeout: float) -> float:
    """Move a filled queue under an idle, warm worker at once; seconds until all done."""
    base = side.rdb.dbsize()
    t0 = time.perf_counter()
    # RENAME wakes the consumers blocked on the queue (BRPOP, BLMOVE) like a push does.
    side.bdb.rename(staged, side.queue_key)
    deadline = t0 + timeout
    while True:
        time.sleep(0.005)
        now = time.perf_counter()
        if until_results:
            done = side.rdb.dbsize() - base >= n
        else:
            done = side.bdb.llen(side.queue_key) == 0 and side.held() == 0
        if done:
            return now - t0
        worker.check()
        if now > deadline:
            raise RuntimeError(f"{side.name}: drain timed out after {timeout}s")


def _enqueue(side: RedisSide, n: int, stage: str, **options: Any) -> float:
    """``noop`` sent n times in a plain loop (no worker running); then set aside in ``stage``."""
    noop = side.tasks.noop
    t = time.perf_counter()
    if options:
        for _ in range(n):
            noop.apply_async(**options)
    else:
        for _ in range(n):
            noop.delay()
    rate = n / (time.perf_counter() - t)
    side.bdb.rename(side.queue_key, stage)
    return rate


def bench_redis_side(side: RedisSide, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    n = args.tasks
    out: dict[str, Any] = {"broker": f"redis db {side.broker_db}, results db {side.result_db}"}
    stage_results, stage_plain = side.prefix + "stage.results", side.prefix + "stage.plain"
    worker = None
    quiet = args.json
    try:
        noop = side.tasks.noop
        noop.apply_async(ignore_result=True)  # connect (and declare) before timing
        side.bdb.delete(side.queue_key)
        log(f"{side.name}: enqueue {n} tasks, noop.delay() loop", quiet)
        out["enqueue_per_s"] = _enqueue(side, n, stage_results)
        log(f"{side.name}: enqueue {n} tasks, noop.apply_async(ignore_result=True) loop", quiet)
        out["enqueue_ignored_per_s"] = _enqueue(side, n, stage_plain, ignore_result=True)
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        cmd = [*side.cmd, str(args.concurrency)]
        log(f"{side.name}: " + " ".join(cmd[1:]), quiet)
        worker = WorkerProc(cmd, env, tmp, tmp / f"{side.name}-redis-worker.log")
        for _ in range(20):  # up, connected, warm
            noop.delay().get(timeout=60)
        out["startup_s"] = time.perf_counter() - worker.started
        end = time.monotonic() + 10
        while side.held() and time.monotonic() < end:
            time.sleep(0.01)
        log(f"{side.name}: drain {n} tasks, results ignored", quiet)
        secs = _drain_staged(side, worker, stage_plain, n, False, args.timeout)
        out["drain_plain_per_s"] = n / secs
        log(f"{side.name}: drain {n} tasks, results stored", quiet)
        secs = _drain_staged(side, worker, stage_results, n, True, args.timeout)
        out["drain_results_per_s"] = n / secs
        out.update(worker.memory())
        end = time.monotonic() + 10
        while side.held() and time.monotonic() < end:
            time.sleep(0.01)
        log(f"{side.name}: {args.roundtrips} delay().get() round trips", quiet)
        out.update(round_trips(noop, args.roundtrips))
        log(f"{side.name}: {args.wakeups} wake-ups of the idle worker", quiet)
        out.update(wake_ups(side.tasks.started_at, args.wakeups, (args.gap_min, args.gap_max)))
        worker.check()
    finally:
        if worker is not None:
            worker.stop()
        try:
            side.close_app()
        except Exception:
            pass
        side.cleanup()
    return out


REDIS_ROWS = [
    # key, label, unit, format, lower is better
    ("enqueue_per_s", "enqueue, noop.delay() loop", "tasks/s", "{:,.0f}", False),
    ("enqueue_ignored_per_s", "enqueue, apply_async(ignore_result)", "tasks/s", "{:,.0f}", False),
    ("drain_plain_per_s", "drain, results ignored", "tasks/s", "{:,.0f}", False),
    ("drain_results_per_s", "drain, results stored", "tasks/s", "{:,.0f}", False),
    ("rt_p50_ms", "delay().get() p50", "ms", "{:.2f}", True),
    ("rt_p99_ms", "delay().get() p99", "ms", "{:.2f}", True),
    ("wake_p50_ms", "idle wake-up p50", "ms", "{:.2f}", True),
    ("wake_p99_ms", "idle wake-up p99", "ms", "{:.2f}", True),
    ("rss_mb", "worker RSS, summed", "MB", "{:.1f}", True),
    ("pss_mb", "worker PSS, summed", "MB", "{:.1f}", True),
    ("startup_s", "worker start -> 20 round trips", "s", "{:.2f}", True),
]


def bench_redis(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    ensure_redis(args.json)
    run = uuid.uuid4().hex[:10]
    ours = bench_redis_side(CeleriacRedis(run), args, tmp)
    theirs = celery_error = None
    if not args.skip_celery:
        try:
            theirs = bench_redis_side(CeleryRedis(run), args, tmp)
        except Exception as exc:  # report celeriac's numbers even if Celery's side fails
            celery_error = f"{type(exc).__name__}: {exc}"
    ratios = {}
    speedups = {}
    for key, _, _, _, lower in REDIS_ROWS:
        if theirs and ours.get(key) and theirs.get(key):
            ratios[key] = ours[key] / theirs[key]
            speedups[key] = 1 / ratios[key] if lower else ratios[key]
    verdicts = {}
    for key, target in REDIS_TARGETS.items():
        if key in ours:
            lower = key.endswith("_ms")
            verdicts[key] = "PASS" if (ours[key] <= target if lower else ours[key] >= target) \
                else "FAIL"
    if theirs and "drain_plain_per_s" in ratios:
        verdicts["drain_plain_10x_celery"] = "PASS" if ratios["drain_plain_per_s"] >= 10 else "FAIL"
    load = os.getloadavg()
    result = {"tasks": args.tasks, "concurrency": args.concurrency, "celeriac": ours,
              "celery": theirs, "celery_error": celery_error,
              "ratios_celeriac_over_celery": ratios, "targets": REDIS_TARGETS,
              "verdicts": verdicts, "celery_reference_from_issue": CELERY_REDIS_REFERENCE,
              "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                          "loadavg_at_end": load}}
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print()
    print(f"Redis broker + Redis results, {args.tasks:,} no-op tasks, worker -c "
          f"{args.concurrency}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"celeriac: {ours['broker']}"
          + (f"   |   Celery 5.7 prefork: {theirs['broker']}" if theirs else ""))
    head = (f"{'':36} {'unit':>7} {'celeriac':>10} {'Celery 5.7':>11} {'better':>7}  "
            f"{'target':<12} verdict")
    print(head)
    print("-" * len(head))
    for key, label, unit, fmt, lower in REDIS_ROWS:
        mine = fmt.format(ours[key]) if key in ours else "-"
        other = fmt.format(theirs[key]) if theirs and key in theirs else "-"
        better = f"{speedups[key]:.1f}x" if key in speedups else "-"
        target = REDIS_TARGETS.get(key)
        tgt = "" if target is None else (f"<= {target:g} ms" if lower else f">= {target:,.0f}/s")
        print(f"{label:36} {unit:>7} {mine:>10} {other:>11} {better:>7}  {tgt:<12} "
              f"{verdicts.get(key, '')}")
    print("-" * len(head))
    if "drain_plain_10x_celery" in verdicts:
        print(f"drain >= 10x Celery's (same run): {ratios['drain_plain_per_s']:.1f}x  "
              f"{verdicts['drain_plain_10x_celery']}")
    print("better = how many times better celeriac is (rates: ours/theirs; ms, MB, s: "
          "theirs/ours)")
    print("Celery reference from the issue (2 cores): drains ~1,000/s (900/s with results), "
          "enqueues ~2,100/s, get() p50 2.1 ms")
    if celery_error:
        print(f"Celery measurement failed: {celery_error}")
    return result


# -- report ----------------------------------------------------------------------------------

ROWS = [
    # key, label, unit, format, target (text, check) or None
    ("enqueue_per_s", "(a) enqueue, delay() loop", "tasks/s", "{:,.0f}", None),
    ("queue_empty_per_s", "(b) drain: start -> queue empty", "tasks/s", "{:,.0f}", None),
    ("results_stored_per_s", "(b) drain: start -> all results", "tasks/s", "{:,.0f}",
     (f">= {TARGET_DRAIN:,.0f}/s", lambda v: v >= TARGET_DRAIN)),
    ("steady_per_s", "    drain, first -> last result", "tasks/s", "{:,.0f}", None),
    ("startup_s", "    worker start -> first result", "s", "{:.2f}", None),
    ("rt_p50_ms", "(c) delay().get() p50", "ms", "{:.2f}", None),
    ("rt_p99_ms", "(c) delay().get() p99", "ms", "{:.2f}", None),
    ("wake_p50_ms", "(d) idle wake-up p50", "ms", "{:.2f}",
     (f"<= {TARGET_WAKE_P50:.0f} ms", lambda v: v <= TARGET_WAKE_P50)),
    ("wake_p99_ms", "(d) idle wake-up p99", "ms", "{:.2f}", None),
    ("rss_mb", "(e) worker RSS, -c 2, summed", "MB", "{:.1f}",
     (f"<= {TARGET_RSS:.0f} MB", lambda v: v <= TARGET_RSS)),
    ("pss_mb", "(e) worker PSS, -c 2, summed", "MB", "{:.1f}", None),
]


def report(args: argparse.Namespace, ours: dict[str, Any], theirs: dict[str, Any] | None,
           celery_error: str | None) -> dict[str, Any]:
    verdicts = {}
    ratios = {}
    for key, _, _, _, target in ROWS:
        if target is not None and key in ours:
            verdicts[key] = "PASS" if target[1](ours[key]) else "FAIL"
        if theirs and key in theirs and key in ours and theirs[key]:
            ratios[key] = ours[key] / theirs[key]
    result = {"tasks": args.tasks, "concurrency": args.concurrency, "celeriac": ours,
              "celery": theirs, "celery_error": celery_error,
              "ratios_celeriac_over_celery": ratios, "verdicts": verdicts,
              "targets": {"results_stored_per_s": TARGET_DRAIN, "wake_p50_ms": TARGET_WAKE_P50,
                          "rss_mb": TARGET_RSS},
              "celery_reference_from_issue": CELERY_REFERENCE,
              "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    cel = "Celery 5.7"
    print()
    print(f"{args.tasks:,} no-op tasks, worker -c {args.concurrency}, {os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}")
    print(f"celeriac: {ours.get('broker')}"
          + (f"   |   {cel}: prefork, {theirs.get('broker')}" if theirs else ""))
    head = f"{'':34} {'unit':>7} {'celeriac':>10} {cel:>11} {'ratio':>7}  {'target':<12} verdict"
    print(head)
    print("-" * len(head))
    for key, label, unit, fmt, target in ROWS:
        mine = fmt.format(ours[key]) if key in ours else "-"
        other = fmt.format(theirs[key]) if theirs and key in theirs else "-"
        ratio = f"{ratios[key]:.2f}x" if key in ratios else "-"
        tgt = target[0] if target else ""
        print(f"{label:34} {unit:>7} {mine:>10} {other:>11} {ratio:>7}  {tgt:<12} "
              f"{verdicts.get(key, '')}")
    print("-" * len(head))
    print("ratio = celeriac / Celery (rates: higher is better; ms and MB: lower is better)")
    print(f"Celery reference from the issue: prefork -c 2 drains ~"
          f"{CELERY_REFERENCE['drain_per_s']:,.0f} tasks/s from Redis, RSS ~"
          f"{CELERY_REFERENCE['rss_mb']:.0f} MB")
    if celery_error:
        print(f"Celery measurement failed: {celery_error}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20000, help="tasks to enqueue and drain")
    parser.add_argument("--concurrency", "-c", type=int, default=2)
    parser.add_argument("--roundtrips", type=int, default=1000, help="delay().get() calls")
    parser.add_argument("--wakeups", type=int, default=200, help="wake-up samples")
    parser.add_argument("--gap-min", type=float, default=0.02, help="idle gap before a wake-up (s)")
    parser.add_argument("--gap-max", type=float, default=0.08)
    parser.add_argument("--timeout", type=float, default=180.0, help="drain timeout (s)")
    parser.add_argument("--skip-celery", action="store_true", help="measure celeriac only")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--broker", choices=("sqlite", "redis"), default="sqlite",
                        help="sqlite: celeriac embedded vs Celery on Redis (default); "
                             "redis: both on the same local Redis (broker and results)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    compile_sources()

    # SIGTERM/SIGHUP run the same cleanup as Ctrl-C (finally blocks stop workers, remove files).
    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="celeriac-bench-"))
    try:
        if args.broker == "redis":
            bench_redis(args, tmp)
            return 0
        ours = bench_celeriac(args, tmp)
        theirs = celery_error = None
        if not args.skip_celery:
            try:
                theirs = bench_celery(args, tmp)
            except Exception as exc:  # report celeriac's numbers even if Celery's side fails
                celery_error = f"{type(exc).__name__}: {exc}"
        report(args, ours, theirs, celery_error)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
