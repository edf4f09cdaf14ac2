"""Faults through real worker processes on SQLite: killed children, killed workers,
poison messages, warm and cold shutdown. Nothing is lost; nothing runs more than it must.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from celeriac import Celery, states
from celeriac.exceptions import WorkerLostError
from tests.apps import worker_support
from tests.apps import worker_tasks as wt
from tests.apps.events import lines
from tests.apps.worker_support import StartWorker
from tests.apps.worker_tasks import messages_left
from tests.conftest import wait_for

# Fixtures: the test app on this test's database, a shared directory, logged workers.
app, d, start_worker = worker_support.app, worker_support.d, worker_support.start_worker


def started_pid(d: str, name: str) -> int:
    found = wait_for(lambda: lines(d, name), message=f"a task to log to {name}")
    return int(found[0].split()[1])  # type: ignore[index]


# -- a child dies ----------------------------------------------------------------------


def test_acks_late_task_of_a_killed_child_is_redelivered_once(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    worker = start_worker(app)
    result = wt.killed_once.delay(d)
    pid = started_pid(d, "runs")
    os.kill(pid, signal.SIGKILL)
    assert result.get(timeout=15) == 3
    assert result.state == states.SUCCESS
    runs = lines(d, "runs")
    second_pid = int(runs[1].split()[1])
    # Exactly two starts (the second a redelivery, in a new child) and one completion.
    assert runs == [f"start {pid} False", f"start {second_pid} True", "done"]
    assert second_pid != pid
    wait_for(lambda: messages_left(app) == 0, message="the message to be acked")
    assert app.broker.dead_letters() == []
    assert worker.proc.poll() is None


def test_early_ack_task_of_a_killed_child_fails_with_worker_lost(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    worker = start_worker(app)
    result = wt.early_ack_killed.delay(d)
    pid = started_pid(d, "runs")
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerLostError, match="signal 9"):
        result.get(timeout=15)
    assert result.state == states.FAILURE
    # Not run again: with one child and FIFO order, a requeued message would run first.
    assert wt.add.delay(1, 1).get(timeout=10) == 2
    wait_for(lambda: messages_left(app) == 0, message="the broker to be empty")
    assert lines(d, "runs") == [f"start {pid}"]
    assert worker.proc.poll() is None


def test_killing_the_whole_worker_loses_nothing(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    late = [wt.late_work.delay(d, n) for n in range(200)]
    early = [wt.early_work.delay(d, n) for n in range(100)]
    ids = [r.id for r in late + early]
    worker = start_worker(app, concurrency=4)
    wait_for(lambda: len(lines(d, "late")) >= 40, message="some tasks to run")
    worker.kill()
    done_before = sum(1 for m in app.backend.get_many(ids).values()
                      if m["status"] == states.SUCCESS)
    assert done_before < len(ids), "the worker finished before it was killed"

    start_worker(app, concurrency=4)
    restarted = time.monotonic()
    finished = {meta["task_id"]: meta for meta in app.backend.wait(ids, timeout=60)}
    # The new worker takes back what the dead one held at once (its processes are gone),
    # not after a heartbeat timeout or the next periodic check.
    assert time.monotonic() - restarted < 4
    assert {t for t, m in finished.items() if m["status"] == states.SUCCESS} == set(ids)
    assert [r.get(timeout=1) for r in late] == list(range(200))
    assert [r.get(timeout=1) for r in early] == list(range(100))
    assert {int(n) for n in lines(d, "late")} == set(range(200))
    assert {int(n) for n in lines(d, "early")} == set(range(100))
    wait_for(lambda: messages_left(app) == 0, message="every message to be acked")
    assert app.broker.dead_letters() == []


def test_poison_message_is_dead_lettered_after_max_redeliveries(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    worker = start_worker(app)
    result = wt.poison.delay(d)
    after = wt.add.delay(2, 2)
    with pytest.raises(WorkerLostError):
        result.get(timeout=20)
    assert result.state == states.FAILURE
    # task_max_redeliveries=2 (in the app module): the first delivery and two more.
    assert len(lines(d, "poison")) == 3
    letters = app.broker.dead_letters()
    assert [dl.message.id for dl in letters] == [result.id]
    assert "max_redeliveries=2" in letters[0].reason
    # The worker keeps working.
    assert after.get(timeout=10) == 4
    assert wt.add.delay(3, 3).get(timeout=10) == 6
    assert worker.proc.poll() is None
    assert len(worker.children()) == 1


# -- shutdown --------------------------------------------------------------------------


def test_warm_shutdown_finishes_the_running_task_and_leaves_the_rest(
    app: Celery, d: str, start_worker: StartWorker, tmp_path: Path
) -> None:
    worker = start_worker(app)
    running = wt.blocker.delay(d)
    queued = [wt.add.delay(n, n) for n in range(3)]
    wait_for(lambda: running.state == states.STARTED, message="the task to start")
    worker.signal(signal.SIGTERM)
    wait_for(lambda: "Warm shutdown" in worker.log(), message="warm shutdown to begin")
    (tmp_path / "release").touch()
    assert worker.proc.wait(15) == 0
    assert running.get(timeout=1) == int(lines(d, "blocker")[0].split()[1])
    assert [r.state for r in queued] == [states.PENDING] * 3
    assert app.broker.queue_size("celery") == 3
    assert messages_left(app) == 3

    start_worker(app)
    assert [r.get(timeout=10) for r in queued] == [0, 2, 4]
    wait_for(lambda: messages_left(app) == 0, message="every message to be acked")
    assert len(lines(d, "blocker")) == 2  # one start, one done: it did not run again


@pytest.mark.parametrize("signals", [("SIGTERM", "SIGTERM"), ("SIGQUIT",)])
def test_cold_shutdown_is_prompt_and_requeues_acks_late_work(
    app: Celery, d: str, start_worker: StartWorker, signals: tuple[str, ...]
) -> None:
    worker = start_worker(app)
    result = wt.killed_once.delay(d)  # acks_late: its first run waits until killed
    started_pid(d, "runs")
    began = time.monotonic()
    for index, name in enumerate(signals):
        worker.signal(getattr(signal, name))
        if index == 0 and len(signals) > 1:
            wait_for(lambda: "Warm shutdown" in worker.log(), message="warm shutdown")
    assert worker.proc.wait(10) == 0
    assert time.monotonic() - began < 5
    assert "Cold shutdown" in worker.log()
    assert result.state == states.PENDING
    # Killed mid-task, an acks_late task goes back to the queue and a new worker runs it.
    start_worker(app)
    assert result.get(timeout=15) == 3
    assert lines(d, "runs")[1:] == [lines(d, "runs")[1], "done"]
    assert lines(d, "runs")[1].endswith("True")
