"""Eager mode: task_always_eager, task_eager_propagates, task_store_eager_result, apply()."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celery, GroupResult, Task, chain, group, states
from celeriac.result import EagerResult


@pytest.fixture
def app(tmp_path: Path) -> Celery:
    # An SQLite URL: eager mode must never open it unless results are stored.
    return Celery("eager", broker=f"sqlite:///{tmp_path}/eager.db", task_always_eager=True,
                  set_as_current=False)


@pytest.fixture
def tasks(app: Celery) -> dict[str, Task]:  # type: ignore[type-arg]
    @app.task(name="e.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="e.fail")
    def fail(message: str = "failed") -> None:
        raise ValueError(message)

    return {"add": add, "fail": fail}


def test_delay_runs_at_once_and_touches_no_broker(app: Celery, tasks: dict,  # type: ignore[type-arg]
                                                  tmp_path: Path) -> None:
    r = tasks["add"].delay(2, 3)
    assert isinstance(r, EagerResult)
    assert r.state == states.SUCCESS and r.get() == 5 and r.ready()
    r = tasks["add"].apply_async((1, 1), countdown=3600, queue="anything", priority=9)
    assert r.get() == 2  # eager ignores delivery options
    assert not (tmp_path / "eager.db").exists()


def test_failures_are_kept_in_the_result_unless_propagated(app: Celery, tasks: dict) -> None:  # type: ignore[type-arg]
    r = tasks["fail"].delay("kept")
    assert r.state == states.FAILURE and r.failed()
    assert isinstance(r.result, ValueError)
    with pytest.raises(ValueError, match="kept"):
        r.get()
    app.conf.task_eager_propagates = True
    with pytest.raises(ValueError, match="raised"):
        tasks["fail"].delay("raised")
    # apply(throw=...) overrides the setting either way.
    assert tasks["fail"].apply(("quiet",), throw=False).failed()
    app.conf.task_eager_propagates = False
    with pytest.raises(ValueError, match="thrown"):
        tasks["fail"].apply(("thrown",), throw=True)


def test_eager_results_are_stored_only_when_asked(app: Celery, tasks: dict,  # type: ignore[type-arg]
                                                  tmp_path: Path) -> None:
    r = tasks["add"].delay(1, 2)
    assert not (tmp_path / "eager.db").exists()
    app.conf.task_store_eager_result = True
    r = tasks["add"].delay(1, 2)
    f = tasks["fail"].delay("stored")
    stored = app.backend.get(r.id)
    assert stored is not None and stored["status"] == "SUCCESS" and stored["result"] == 3
    failed = app.backend.get(f.id)
    assert failed is not None and failed["result"] == {
        "exc_type": "ValueError", "exc_message": ["stored"], "exc_module": "builtins"}
    assert app.AsyncResult(r.id).get(timeout=1) == 3


def test_apply_runs_here_even_without_always_eager() -> None:
    app = Celery("e2", broker=f"memory://{uuid.uuid4().hex}", set_as_current=False)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    assert app.conf.task_always_eager is False
    assert add.apply((1, 2)).get() == 3
    assert add.apply(args=[1], kwargs={"y": 5}).get() == 6
    assert app.broker.queue_size("celery") == 0


def test_callbacks_and_errbacks_run_eagerly(app: Celery, tasks: dict) -> None:  # type: ignore[type-arg]
    seen: list[Any] = []

    @app.task(name="e.record")
    def record(*args: Any) -> None:
        seen.append(args)

    r = tasks["add"].apply_async((1, 2), link=record.s("after"))
    assert r.get() == 3
    assert seen == [(3, "after")]
    seen.clear()
    f = tasks["fail"].apply_async(("x",), link_error=record.s())
    assert f.failed()
    assert seen == [(f.id,)]  # Celery's classic errback gets the failed task's id


def test_chain_and_group_run_eagerly(app: Celery, tasks: dict) -> None:  # type: ignore[type-arg]
    add = tasks["add"]
    r = chain(add.s(1, 1), add.s(2), add.s(3)).delay()
    assert r.get() == 7
    r = (add.s(1, 1) | add.s(10)).apply_async()
    assert r.get() == 12
    g = group(add.s(i, i) for i in range(3)).delay()
    assert isinstance(g, GroupResult)
    assert g.get() == [0, 2, 4]
    assert all(isinstance(x, EagerResult) for x in g)


def test_nested_calls_carry_root_and_parent(app: Celery) -> None:
    @app.task(name="e.inner", bind=True)
    def inner(self: Task) -> tuple[Any, Any, Any]:  # type: ignore[type-arg]
        return (self.request.id, self.request.root_id, self.request.parent_id)

    @app.task(name="e.outer", bind=True)
    def outer(self: Task) -> Any:  # type: ignore[type-arg]
        return inner.delay().get()

    inner_id, root, parent = outer.apply_async(task_id="outer-id").get()
    assert inner_id != "outer-id"
    assert (root, parent) == ("outer-id", "outer-id")


def test_eager_retries_return_the_last_attempt(app: Celery) -> None:
    attempts: list[int] = []

    @app.task(bind=True, max_retries=5)
    def flaky(self: Task) -> int:  # type: ignore[type-arg]
        attempts.append(self.request.retries)
        if self.request.retries < 2:
            raise self.retry(countdown=3600)  # eager never waits
        return self.request.retries

    r = flaky.delay()
    assert r.state == states.SUCCESS and r.get() == 2
    assert attempts == [0, 1, 2]


def test_eager_retry_with_new_arguments(app: Celery) -> None:
    @app.task(bind=True)
    def countdown(self: Task, n: int) -> int:  # type: ignore[type-arg]
        if n > 0:
            raise self.retry(args=(n - 1,), countdown=0, max_retries=10)
        return self.request.retries

    assert countdown.delay(3).get() == 3


def test_update_state_in_eager_mode(app: Celery) -> None:
    app.conf.result_backend = f"memory://{uuid.uuid4().hex}"

    @app.task(bind=True)
    def progress(self: Task) -> str:  # type: ignore[type-arg]
        self.update_state(state="PROGRESS", meta={"done": 50})
        return app.AsyncResult(self.request.id).state

    assert progress.delay().get() == "PROGRESS"


def test_eager_retry_through_a_custom_call(app: Celery) -> None:
    class Wrapping(Task):  # type: ignore[type-arg]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return super().__call__(*args, **kwargs)

    @app.task(base=Wrapping, bind=True, max_retries=3)
    def flaky(self: Task) -> int:  # type: ignore[type-arg]
        if self.request.retries < 2:
            raise self.retry(countdown=0)
        return self.request.retries

    assert flaky.delay().get() == 2
