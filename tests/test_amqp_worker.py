"""A real ``celeriac worker`` on RabbitMQ, with results over ``rpc://``."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celeriac import states
from celeriac.exceptions import TaskRevokedError
from tests.apps import amqp_app, amqp_support
from tests.conftest import WorkerProcess, bind_app, wait_for

StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def url() -> str:
    return amqp_support.url()


@pytest.fixture
def app(url: str) -> Iterator[amqp_app.Celery]:
    bound = bind_app(amqp_app.app, url, result_backend="rpc://")
    yield bound
    bound.close()


def start_ready(start_worker: StartWorker, app: amqp_app.Celery, *args: str,
                **kwargs: object) -> WorkerProcess:
    """Start a worker and wait until it answers (a task's round trip)."""
    worker = start_worker(app, *args, wait=False, **kwargs)
    try:
        assert amqp_app.add.delay(1, 1).get(timeout=30) == 2
    except Exception:
        print(worker.log())
        raise
    return worker


def test_delay_get_prefork(app: amqp_app.Celery, start_worker: StartWorker) -> None:
    start_ready(start_worker, app, concurrency=2)
    results = [amqp_app.add.delay(i, i) for i in range(50)]
    assert [r.get(timeout=20) for r in results] == [2 * i for i in range(50)]
    assert results[0].state == states.SUCCESS


def test_failure_is_raised(app: amqp_app.Celery, start_worker: StartWorker) -> None:
    start_ready(start_worker, app)
    r = amqp_app.fail.delay("boom")
    with pytest.raises(ValueError, match="boom"):
        r.get(timeout=20)
    assert r.state == states.FAILURE
    assert "ValueError" in (r.traceback or "")


def test_retries_then_succeeds(app: amqp_app.Celery, start_worker: StartWorker) -> None:
    start_ready(start_worker, app)
    assert amqp_app.retrying.delay(2).get(timeout=20) == 2


def test_countdown_and_eta(app: amqp_app.Celery, start_worker: StartWorker) -> None:
    start_ready(start_worker, app)
    sent = time.time()
    r = amqp_app.when.apply_async(countdown=1.5)
    ran = r.get(timeout=20)
    assert sent + 1.5 - 0.05 <= ran < sent + 1.5 + 1.0


def test_expired_task_is_revoked(app: amqp_app.Celery, start_worker: StartWorker) -> None:
    start_ready(start_worker, app)
    r = amqp_app.add.apply_async((1, 2), countdown=1, expires=0.5)
    with pytest.raises(TaskRevokedError):
        r.get(timeout=20)
    assert r.state == states.REVOKED


def test_revoke_a_waiting_task(app: amqp_app.Celery, start_worker: StartWorker,
                               tmp_path: Path) -> None:
    start_ready(start_worker, app)
    log = tmp_path / "runs.txt"
    r = amqp_app.record.apply_async((str(log), "revoked"), countdown=1.5)
    app.control.revoke(r.id)
    with pytest.raises(TaskRevokedError):
        r.get(timeout=20)
    other = amqp_app.record.delay(str(log), "kept")
    assert other.get(timeout=20) == "kept"
    time.sleep(0)  # the revoked one was due before "kept" finished; it never ran:
    assert "revoked" not in log.read_text()


def test_started_and_progress_states_reach_the_caller(
    app: amqp_app.Celery, start_worker: StartWorker, tmp_path: Path
) -> None:
    start_ready(start_worker, app)
    release = tmp_path / "release"
    r = amqp_app.progress.delay(str(release))
    seen: list[str] = []

    def reached_progress() -> bool:
        state = r.state
        if not seen or seen[-1] != state:
            seen.append(state)
        return state == "PROGRESS"

    wait_for(reached_progress, 20, message="PROGRESS state")
    assert r.info == {"step": 1}
    release.write_text("go")
    assert r.get(timeout=20) == "done"
    assert seen[-1] == "PROGRESS"
    assert set(seen) <= {states.PENDING, states.STARTED, "PROGRESS"}


def test_threads_pool_and_priorities_queue(url: str, start_worker: StartWorker) -> None:
    app = bind_app(amqp_app.app, url + "?max_priority=10", result_backend="rpc://")
    try:
        start_ready(start_worker, app, pool="threads", concurrency=4)
        results = [amqp_app.sleep_then.delay(0.05, i) for i in range(40)]
        assert sorted(r.get(timeout=30) for r in results) == list(range(40))
    finally:
        app.close()


def test_worker_queues_option(app: amqp_app.Celery, start_worker: StartWorker) -> None:
    start_worker(app, "-Q", "alpha,beta", wait=False)
    a = amqp_app.add.apply_async((1, 2), queue="alpha")
    b = amqp_app.add.apply_async((3, 4), queue="beta")
    assert a.get(timeout=30) == 3
    assert b.get(timeout=30) == 7


def test_warm_shutdown_leaves_nothing_behind(app: amqp_app.Celery, start_worker: StartWorker,
                                             tmp_path: Path) -> None:
    worker = start_ready(start_worker, app, concurrency=2)
    assert worker.stop() == 0, worker.log()
    # Queued while no worker runs: kept by RabbitMQ, run by the next worker.
    log = tmp_path / "runs.txt"
    results = [amqp_app.record.delay(str(log), f"k{i}") for i in range(20)]
    start_worker(app, "-c", "2", wait=False)
    assert sorted(r.get(timeout=30) for r in results) == sorted(f"k{i}" for i in range(20))




def _burst(app: amqp_app.Celery, log: Path, release: Path) -> tuple[Any, list[Any]]:
    """Short tasks, a gate (a task that waits for ``release``), then 100 short ones, all
    queued while the worker is busy: the worker's consumer then reads the gate and the
    short ones after it ahead (docs/amqp.md, section 3) and holds them while the gate
    waits."""
    opener = release.with_name(release.name + ".opener")
    first = amqp_app.progress.delay(str(opener))
    wait_for(lambda: first.state == "PROGRESS", 20, message="the first gate to run")
    warm = [amqp_app.noop.delay() for _ in range(200)]
    gate = amqp_app.progress.delay(str(release))
    quick = [amqp_app.record.delay(str(log), f"r{i}") for i in range(100)]
    opener.write_text("go")  # (the short tasks run; by the gate the consumer reads ahead)
    assert first.get(timeout=30) == "done"
    for r in warm:
        r.get(timeout=30)
    wait_for(lambda: gate.state == "PROGRESS", 20, message="the gate task to run")
    # Held by the worker's consumer, not waiting in the queue:
    assert app.broker.queue_size("celery") < 100
    return gate, quick


KEEP = {"CELERIAC_TEST_KEEP_PREFETCHED": "1"}  # worker_prefetch_release_after = 0


def test_revoking_a_task_held_in_the_read_ahead(app: amqp_app.Celery,
                                                start_worker: StartWorker,
                                                tmp_path: Path) -> None:
    start_ready(start_worker, app, concurrency=1, env=KEEP)
    log, release = tmp_path / "runs.txt", tmp_path / "release"
    gate, quick = _burst(app, log, release)
    app.control.revoke(quick[50].id)
    release.write_text("go")
    assert gate.get(timeout=30) == "done"
    with pytest.raises(TaskRevokedError):
        quick[50].get(timeout=30)
    for i, r in enumerate(quick):
        if i != 50:
            assert r.get(timeout=30) == f"r{i}"
    runs = log.read_text().splitlines()
    assert not any(line.startswith("run r50 ") for line in runs)


def test_warm_shutdown_gives_back_the_read_ahead(app: amqp_app.Celery,
                                                 start_worker: StartWorker,
                                                 tmp_path: Path) -> None:
    worker = start_ready(start_worker, app, concurrency=1, env=KEEP)
    log, release = tmp_path / "runs.txt", tmp_path / "release"
    gate, quick = _burst(app, log, release)
    # Warm shutdown while the consumer holds the short tasks it read ahead: the gate
    # finishes, the others go back to the queue, and the next worker runs each once.
    worker.signal(signal.SIGTERM)
    wait_for(lambda: "Warm shutdown" in worker.log(), 20, message="the warm shutdown")
    release.write_text("go")
    assert worker.proc.wait(30) == 0, worker.log()  # (not stop(): a second TERM is cold)
    assert gate.get(timeout=30) == "done"
    assert app.broker.queue_size("celery") == 100, worker.log()
    start_worker(app, "-c", "2", wait=False)
    assert [r.get(timeout=30) for r in quick] == [f"r{i}" for i in range(100)]
    runs = [line.split()[1] for line in log.read_text().splitlines()
            if line.startswith("run ")]
    assert sorted(runs) == sorted(f"r{i}" for i in range(100))


def test_the_read_ahead_is_given_back_behind_a_long_task(app: amqp_app.Celery,
                                                        start_worker: StartWorker,
                                                        tmp_path: Path) -> None:
    """worker_prefetch_release_after (0.1 s) covers what the consumer read ahead too: the
    short tasks it holds behind a long one go back, and an idle worker runs them."""
    start_ready(start_worker, app, concurrency=1)
    log, release = tmp_path / "runs.txt", tmp_path / "release"
    gate = amqp_app.progress.delay(str(release))
    wait_for(lambda: gate.state == "PROGRESS", 20, message="the gate task to run")
    warm = [amqp_app.noop.delay() for _ in range(200)]
    gate2 = amqp_app.progress.delay(str(release) + ".2")
    # More than the consumer's credit (512): some are still on their way when it gives
    # back, and must be given back too.
    quick = [amqp_app.record.delay(str(log), f"r{i}") for i in range(600)]
    release.write_text("go")
    assert gate.get(timeout=30) == "done"
    for r in warm:
        r.get(timeout=30)
    wait_for(lambda: gate2.state == "PROGRESS", 20, message="the second gate to run")
    # Its consumer read the short ones ahead and gives them back; a second worker,
    # idle, runs them all while the gate still runs.
    start_worker(app, "-c", "1", wait=False)
    assert [r.get(timeout=30) for r in quick] == [f"r{i}" for i in range(600)]
    assert gate2.state == "PROGRESS"
    Path(str(release) + ".2").write_text("go")
    assert gate2.get(timeout=30) == "done"
