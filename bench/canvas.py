#!/usr/bin/env python
"""Canvas benchmark: a group and a chord of 1,000 and 10,000 tasks through a real worker.

    .venv/bin/python bench/canvas.py                  # sizes 1000 and 10000
    .venv/bin/python bench/canvas.py --sizes 500 5000 --concurrency 4
    .venv/bin/python bench/canvas.py --json

One ``celeriac worker -c 2`` on a fresh SQLite file (broker and results). For each size it
times ``group(add.s(i, 1) ...).delay().get()`` and ``chord([...], tsum.s()).delay().get()``
from the first message sent to the last result read, and separately how long sending
took. The results are checked. A cost linear in the size shows as a flat tasks/s column.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from celeriac import Celery, chord, group  # noqa: E402

app = Celery("bench.canvas")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def tsum(values: list[int]) -> int:
    return sum(values)


def wait_ready(path: str, proc: subprocess.Popen[bytes], processes: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("worker exited:\n" + log.read_text(errors="replace")[-3000:])
        try:
            conn = sqlite3.connect(path, timeout=5)
            try:
                count = conn.execute("SELECT COUNT(*) FROM celeriac_consumers").fetchone()[0]
            finally:
                conn.close()
            if count >= processes:
                return
        except sqlite3.OperationalError:
            pass
        time.sleep(0.05)
    raise RuntimeError("worker did not start consuming within 30s")


def run(sizes: list[int], concurrency: int, quiet: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="celeriac-canvas-bench-") as tmp:
        path = f"{tmp}/bench.db"
        url = f"sqlite:///{path}"
        app.conf.broker_url = url
        log = Path(tmp) / "worker.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celeriac", "-A", "bench.canvas", "-b", url, "worker",
                 "-c", str(concurrency), "-l", "WARNING"],
                stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            wait_ready(path, proc, concurrency, log)
            chord([add.s(i, 1) for i in range(10)], tsum.s()).delay().get(timeout=30)  # warm
            for n in sizes:
                for kind in ("group", "chord"):
                    started = time.perf_counter()
                    if kind == "group":
                        result: Any = group(add.s(i, 1) for i in range(n)).delay()
                    else:
                        result = chord([add.s(i, 1) for i in range(n)], tsum.s()).delay()
                    sent = time.perf_counter() - started
                    value = result.get(timeout=max(60.0, n / 50))
                    total = time.perf_counter() - started
                    expected: Any = ([i + 1 for i in range(n)] if kind == "group"
                                     else n * (n + 1) // 2)
                    if value != expected:
                        raise AssertionError(f"{kind} of {n}: wrong result")
                    row = {"kind": kind, "size": n, "send_s": round(sent, 3),
                           "total_s": round(total, 3), "tasks_per_s": round(n / total)}
                    rows.append(row)
                    if not quiet:
                        print(f"  .. {kind} {n}: {total:.2f}s", file=sys.stderr, flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--concurrency", "-c", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = run(args.sizes, args.concurrency, args.json)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"celeriac canvas, SQLite broker+backend, worker -c {args.concurrency}")
    print(f"{'workflow':<8} {'tasks':>7} {'send (s)':>9} {'total (s)':>10} {'tasks/s':>8}")
    for r in rows:
        print(f"{r['kind']:<8} {r['size']:>7} {r['send_s']:>9.2f} {r['total_s']:>10.2f} "
              f"{r['tasks_per_s']:>8}")


if __name__ == "__main__":
    main()
