"""The worker end to end: real worker processes against a per-test SQLite file.

Retries, countdown/ETA, expiry, revocation, STARTED and custom states, bad input, pools.
"""

from __future__ import annotations

import itertools
import pickle
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest

from celeriac import Celery, states
from celeriac.exceptions import (
    ContentDisallowed,
    DecodeError,
    MaxRetriesExceededError,
    NotRegistered,
    TaskRevokedError,
)
from celeriac.protocol.message import Message, build_task_message
from tests.apps import worker_support
from tests.apps import worker_tasks as wt
from tests.apps.events import lines
from tests.apps.worker_support import StartWorker
from tests.apps.worker_tasks import messages_left
from tests.conftest import WorkerProcess, wait_for

# Fixtures: the test app on this test's database, a shared directory, logged workers.
app, d, start_worker = worker_support.app, worker_support.d, worker_support.start_worker


def cpu_seconds(worker: WorkerProcess) -> float:
    total = 0.0
    for pid in [worker.pid, *worker.children()]:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


# -- retries ---------------------------------------------------------------------------


def test_retry_until_success(app: Celery, d: str, start_worker: StartWorker) -> None:
    start_worker(app)
    result = wt.flaky.delay(d, 2)
    assert result.get(timeout=10) == 2
    assert result.state == states.SUCCESS
    # Each attempt saw the retry count go up, and the state a client sees between
    # attempts is RETRY.
    assert lines(d, "attempts") == ["0 PENDING", "1 RETRY", "2 RETRY"]


def test_logs_name_task_id_and_outcome(app: Celery, d: str, start_worker: StartWorker) -> None:
    worker = start_worker(app)  # -l INFO
    ok = wt.add.delay(2, 3)
    retried = wt.flaky.delay(d, 1)
    failed = wt.always_retry_exc.delay(d)
    assert ok.get(timeout=10) == 5 and retried.get(timeout=10) == 1
    with pytest.raises(KeyError):
        failed.get(timeout=10)
    expected = [f"Task tests.apps.worker_tasks.add[{ok.id}] succeeded in",
                f"Task tests.apps.worker_tasks.flaky[{retried.id}] retry:",
                f"Task tests.apps.worker_tasks.flaky[{retried.id}] succeeded in",
                f"Task tests.apps.worker_tasks.always_retry_exc[{failed.id}] raised unexpected:"]
    wait_for(lambda: all(line in worker.log() for line in expected), timeout=10,
             message="a log line per outcome naming task and id")


def test_immediate_retries_on_several_children_end_in_success(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    # countdown=0: another child may pick the next attempt up at once. It must still see
    # RETRY (stored before the retry is sent), and RETRY must never land after SUCCESS.
    start_worker(app, concurrency=4)
    results = [wt.flaky.apply_async((d, 1, 0), {"log": f"attempts-{n}"}) for n in range(40)]
    for result in results:
        assert result.get(timeout=20) == 1
    assert [app.AsyncResult(r.id).state for r in results] == [states.SUCCESS] * 40
    for n in range(40):
        assert lines(d, f"attempts-{n}") == ["0 PENDING", "1 RETRY"]


def test_retry_past_max_retries_raises_the_original_exception(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    start_worker(app)
    result = wt.always_retry_exc.delay(d)
    with pytest.raises(KeyError, match="gone"):
        result.get(timeout=10)
    assert result.state == states.FAILURE
    assert lines(d, "attempts") == ["0", "1", "2"]  # max_retries=2: three runs in all


def test_retry_without_exc_past_max_retries_is_max_retries_exceeded(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    start_worker(app)
    result = wt.always_retry_plain.delay(d)
    with pytest.raises(MaxRetriesExceededError):
        result.get(timeout=10)
    assert lines(d, "attempts") == ["0", "1"]


def test_retry_keeps_the_expiry_of_the_original_message(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    start_worker(app)
    result = wt.flaky.apply_async((d, 1), expires=60)
    assert result.get(timeout=10) == 1
    assert lines(d, "attempts") == ["0 PENDING", "1 RETRY"]


def test_autoretry_with_backoff(app: Celery, d: str, start_worker: StartWorker) -> None:
    start_worker(app)
    result = wt.auto_flaky.delay(d, 2)
    assert result.get(timeout=10) == 2
    attempts = [line.split() for line in lines(d, "attempts")]
    assert [int(a[0]) for a in attempts] == [0, 1, 2]
    times = [float(a[1]) for a in attempts]
    # retry_backoff=True: countdown min(retry_backoff_max=0.2, 1 * 2**retries) = 0.2 s.
    for before, after in itertools.pairwise(times):
        assert after - before >= 0.19

    failing = wt.auto_flaky.delay(d, 10)  # max_retries=3, then the exception itself
    with pytest.raises(ConnectionError, match="down at attempt 3"):
        failing.get(timeout=10)


# -- countdown, ETA, expiry ------------------------------------------------------------


def test_countdown_and_eta_are_honoured_without_busy_waiting(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    worker = start_worker(app, concurrency=2)
    cpu_before = cpu_seconds(worker)
    sent = time.time()
    by_countdown = wt.stamp.apply_async((d,), countdown=1.0)
    by_eta = wt.stamp.apply_async((d,), eta=datetime.now(UTC) + timedelta(seconds=1))
    # A task due now is not held up behind the delayed ones.
    assert wt.add.delay(1, 1).get(timeout=5) == 2
    assert time.time() < sent + 1.0
    assert by_countdown.get(timeout=10) >= sent + 1.0
    assert by_eta.get(timeout=10) >= sent + 1.0
    # Waiting for the ETA costs (almost) nothing: no polling loop in the worker.
    assert cpu_seconds(worker) - cpu_before < 0.3


def test_expired_tasks_are_revoked_and_never_run(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    start_worker(app)
    past = wt.stamp.apply_async((d,), expires=datetime.now(UTC) - timedelta(seconds=1))
    # Expires while it waits behind its ETA.
    behind_eta = wt.stamp.apply_async((d,), countdown=0.5, expires=0.2)
    for result in (past, behind_eta):
        with pytest.raises(TaskRevokedError):
            result.get(timeout=10)
        assert result.state == states.REVOKED
    assert wt.add.delay(2, 2).get(timeout=10) == 4
    wait_for(lambda: messages_left(app) == 0, message="the broker to be empty")
    assert lines(d, "stamps") == []


# -- revocation ------------------------------------------------------------------------


def test_revoke_a_task_waiting_behind_its_countdown(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    start_worker(app)
    result = wt.stamp.apply_async((d,), countdown=0.5)
    result.revoke()
    assert result.state == states.REVOKED
    # The worker reaches the message at its ETA and discards it.
    wait_for(lambda: messages_left(app) == 0, message="the revoked message to be discarded")
    assert app.AsyncResult(result.id).state == states.REVOKED  # not cached: read again
    assert lines(d, "stamps") == []
    assert wt.add.delay(1, 2).get(timeout=10) == 3


def test_revocations_persist_for_workers_started_later(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    result = wt.stamp.delay(d)
    result.revoke()
    start_worker(app)
    assert wt.add.delay(1, 2).get(timeout=10) == 3
    wait_for(lambda: messages_left(app) == 0, message="the revoked message to be discarded")
    with pytest.raises(TaskRevokedError):
        result.get(timeout=1)
    assert lines(d, "stamps") == []


def test_revoke_with_terminate_kills_the_running_task(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    worker = start_worker(app)
    # acks_late and reject_on_worker_lost: a terminated task still must not come back.
    result = wt.killed_once.delay(d)
    wait_for(lambda: lines(d, "runs"), message="the task to start")
    pid = int(lines(d, "runs")[0].split()[1])
    began = time.monotonic()
    result.revoke(terminate=True)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=10)
    assert time.monotonic() - began < 2
    wait_for(lambda: worker.children() and worker.children() != [pid], message="a new child")
    assert wt.add.delay(1, 2).get(timeout=10) == 3
    wait_for(lambda: messages_left(app) == 0, message="the broker to be empty")
    assert lines(d, "runs") == [f"start {pid} False"]
    assert app.AsyncResult(result.id).state == states.REVOKED


# -- states ----------------------------------------------------------------------------


def test_track_started_shows_pid_and_hostname(
    app: Celery, d: str, start_worker: StartWorker, tmp_path: Path
) -> None:
    worker = start_worker(app)
    result = wt.blocker.delay(d)
    wait_for(lambda: result.state == states.STARTED, message="STARTED")
    info = result.info
    assert info["pid"] in worker.children()
    assert info["hostname"] == f"celeriac@{socket.gethostname()}"
    (tmp_path / "release").touch()
    assert result.get(timeout=10) == info["pid"]
    assert result.state == states.SUCCESS


def test_update_state_progress_is_visible(
    app: Celery, d: str, start_worker: StartWorker, tmp_path: Path
) -> None:
    start_worker(app)
    result = wt.progress.delay(d)
    wait_for(lambda: result.state == "PROGRESS", message="PROGRESS state")
    assert result.info == {"current": 1, "total": 2}
    assert not result.ready()
    (tmp_path / "release").touch()
    assert result.get(timeout=10) == "finished"
    assert result.state == states.SUCCESS


def test_results_of_a_batch_are_not_held_behind_a_long_task(
    app: Celery, d: str, start_worker: StartWorker, tmp_path: Path
) -> None:
    start_worker(app)
    first = wt.blocker.delay(d)
    wait_for(lambda: first.state == states.STARTED, message="the first task to start")
    # Both wait in the queue, so the child fetches them in one batch when it is free.
    quick = wt.add.delay(1, 1)
    slow = wt.blocker.delay(d, "release-slow", "slow")
    (tmp_path / "release").touch()
    assert quick.get(timeout=10) == 2
    wait_for(lambda: slow.state == states.STARTED, message="the slow task to start")
    assert not slow.ready()  # quick's result did not wait for the slow task
    (tmp_path / "release-slow").touch()
    assert isinstance(slow.get(timeout=10), int)


def test_prefetched_tasks_are_not_held_behind_a_long_task(
    app: Celery, d: str, start_worker: StartWorker, tmp_path: Path
) -> None:
    # Sent before any worker runs: the first worker's child fetches all four in one batch.
    long = wt.blocker.delay(d)
    quick = [wt.add.delay(i, i) for i in range(3)]
    start_worker(app, concurrency=1)
    wait_for(lambda: long.state == states.STARTED, message="the long task to start")
    # A second worker is idle: the first gives the quick ones back, and the second runs
    # them while the long task still runs (it runs until the test releases it).
    start_worker(app, concurrency=1)
    assert [r.get(timeout=10) for r in quick] == [0, 2, 4]
    assert not long.ready()
    (tmp_path / "release").touch()
    assert isinstance(long.get(timeout=10), int)


# -- bad input -------------------------------------------------------------------------


def _raw(name: str, body: bytes, task_id: str | None,
         content_type: str = "application/json", encoding: str = "utf-8") -> Message:
    good = build_task_message(name, task_id or "x", [1, 2], {})
    headers = dict(good.headers)
    properties = dict(good.properties)
    if task_id is None:
        del headers["id"]
        del properties["correlation_id"]
    return Message(headers, properties, body, content_type, encoding)


def test_bad_messages_are_dead_lettered_and_the_worker_keeps_going(
    app: Celery, start_worker: StartWorker
) -> None:
    add = wt.add.name
    ids = {key: str(uuid.uuid4()) for key in ("json", "pickle", "shape", "unknown")}
    cases = {
        "json": _raw(add, b'[[1, 2], {}, {"callbacks": nul', ids["json"]),
        "pickle": _raw(add, pickle.dumps(([1, 2], {}, {})), ids["pickle"],
                       "application/x-python-serialize", "binary"),
        "shape": _raw(add, b'"not a task body"', ids["shape"]),
        "unknown": _raw("no.such.task", b"[[1, 2], {}, {}]", ids["unknown"]),
        "no id": _raw(add, b"\xff\xfe garbage", None),
    }
    worker = start_worker(app)
    for message in cases.values():
        app.broker.publish("celery", [message])
    assert wt.add.delay(20, 22).get(timeout=10) == 42

    wait_for(lambda: len(app.broker.dead_letters()) == len(cases), message="dead letters")
    letters = {dl.message.body: dl for dl in app.broker.dead_letters()}
    # Raw bytes are kept as they came.
    assert set(letters) == {m.body for m in cases.values()}
    reasons = {key: letters[m.body].reason for key, m in cases.items()}
    assert "DecodeError" in reasons["json"]
    assert "ContentDisallowed" in reasons["pickle"]
    assert "x-python-serialize" in reasons["pickle"]
    assert "[args, kwargs, embed]" in reasons["shape"]
    assert "no.such.task" in reasons["unknown"] and "unknown task" in reasons["unknown"]
    assert reasons["no id"]
    for dl in letters.values():
        assert dl.queue == "celery"

    expected = {"json": DecodeError, "pickle": ContentDisallowed, "shape": DecodeError,
                "unknown": NotRegistered}
    for key, exc_type in expected.items():
        result = app.AsyncResult(ids[key])
        assert result.state == states.FAILURE, key
        assert isinstance(result.result, exc_type), (key, result.result)
    assert worker.proc.poll() is None
    # Results are stored before the batch is acked: wait for the acks.
    wait_for(lambda: messages_left(app) == 0, message="every message to be settled")


# -- pools -----------------------------------------------------------------------------


def test_threads_pool_runs_tasks_concurrently(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    worker = start_worker(app, concurrency=4, pool="threads")
    started = time.monotonic()
    results = [wt.barrier.delay(d, 4) for _ in range(4)]
    # Each returns only once all four have started: they ran at the same time.
    assert [r.get(timeout=15) for r in results] == [4, 4, 4, 4]
    assert time.monotonic() - started < 10
    assert {int(pid) for pid in lines(d, "barrier")} == set(worker.children())

    sleepers = [wt.sleeper.delay(0.4) for _ in range(4)]
    started = time.monotonic()
    assert [r.get(timeout=10) for r in sleepers] == [0.4] * 4
    assert time.monotonic() - started < 1.4  # less than the 1.6 s they sleep in all


def test_threads_pool_survives_a_soft_time_limit(
    app: Celery, d: str, start_worker: StartWorker
) -> None:
    # Soft limits need the signal of a process's main thread; a thread pool cannot raise
    # them in the right thread, and the child must not be hurt by trying.
    worker = start_worker(app, concurrency=2, pool="threads")
    children = worker.children()
    result = wt.soft_limited.apply_async((d, 0.5), soft_time_limit=0.1)
    sleeper = wt.sleeper.delay(0.3)
    assert sleeper.get(timeout=10) == 0.3
    assert result.get(timeout=20) in ("slept", "soft limit caught")
    assert wt.add.delay(1, 1).get(timeout=10) == 2
    assert worker.children() == children
    assert worker.proc.poll() is None


def test_solo_pool(app: Celery, d: str, start_worker: StartWorker) -> None:
    worker = start_worker(app, pool="solo")
    assert wt.add.delay(3, 4).get(timeout=10) == 7
    assert wt.whoami.delay().get(timeout=10)["pid"] == worker.pid
    result = wt.flaky.delay(d, 1)
    assert result.get(timeout=10) == 1
    assert worker.stop() == 0
