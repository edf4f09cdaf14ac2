"""Demo: start a worker, send a few thousand tasks, show progress, results and speed.

Run it with ``scripts/demo`` (sets up a virtualenv first) or ``python examples/demo.py``.
Everything happens in a temporary directory on the embedded SQLite broker: no server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=5000, help="how many tasks to send")
    parser.add_argument("-c", "--concurrency", type=int, default=2, help="worker processes")
    args = parser.parse_args()
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="celeriac-demo-"))
    shutil.copy(HERE / "demo_tasks.py", workdir / "demo_tasks.py")
    os.chdir(workdir)
    sys.path.insert(0, str(workdir))
    from demo_tasks import add  # the same module the worker loads

    from celeriac import ResultSet

    console.print(f"[bold]celeriac demo[/] in {workdir} (embedded SQLite broker)")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celeriac", "-A", "demo_tasks", "worker",
         "-c", str(args.concurrency), "-l", "WARNING"],
        cwd=workdir,
    )
    try:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            sending = progress.add_task("sending ", total=args.tasks)
            started = time.perf_counter()
            results = []
            for i in range(args.tasks):
                results.append(add.delay(i, i))
                if i % 100 == 99:
                    progress.update(sending, completed=i + 1)
            progress.update(sending, completed=args.tasks)
            sent = time.perf_counter()
            done_bar = progress.add_task("finished", total=args.tasks)
            values: list[int] = []

            def collected(task_id: str, value: int) -> None:
                values.append(value)
                if len(values) % 100 == 0:
                    progress.update(done_bar, completed=len(values))

            # One ResultSet reads ready results in batches (one query each), in order.
            ResultSet(results).join(timeout=60, callback=collected)
            progress.update(done_bar, completed=args.tasks)
            finished = time.perf_counter()
        assert values == [2 * i for i in range(args.tasks)], "wrong results"
        console.print(f"first results: {values[:5]} ... last: {values[-1]}")
        console.print(f"sent {args.tasks} tasks in {sent - started:.2f}s "
                      f"([bold]{args.tasks / (sent - started):,.0f}[/] tasks/s)")
        console.print(f"all {args.tasks} results in {finished - started:.2f}s "
                      f"([bold]{args.tasks / (finished - started):,.0f}[/] tasks/s end to end, "
                      f"worker -c {args.concurrency})")
        return 0
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
