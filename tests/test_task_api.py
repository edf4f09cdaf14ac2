"""Tasks: names, bind and self.request, class-based tasks, hooks, argument checks."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from celeriac import Celery, Task, states
from celeriac.exceptions import ImproperlyConfigured, MaxRetriesExceededError, Retry
from tests.apps import api
from tests.conftest import bind_app


def mem() -> str:
    return f"memory://{uuid.uuid4().hex}"


@pytest.fixture
def app() -> Celery:
    return Celery("taskapi", broker=mem(), set_as_current=False)


# -- bind and the request -------------------------------------------------------------------


def test_bound_task_sees_its_request_when_applied(app: Celery) -> None:
    @app.task(bind=True)
    def info(self: Task, a: int, b: int = 0) -> dict[str, Any]:  # type: ignore[type-arg]
        r = self.request
        return {"self": self is info, "id": r.id, "args": list(r.args), "kwargs": r.kwargs,
                "retries": r.retries, "is_eager": r.is_eager,
                "called_directly": r.called_directly, "root_id": r.root_id,
                "parent_id": r.parent_id, "task": r.task}

    got = info.apply((1,), {"b": 2}, task_id="tid-1").get()
    assert got == {"self": True, "id": "tid-1", "args": [1], "kwargs": {"b": 2}, "retries": 0,
                   "is_eager": True, "called_directly": False, "root_id": "tid-1",
                   "parent_id": None, "task": info.name}


def test_calling_a_task_directly_runs_it_here(app: Celery) -> None:
    @app.task(bind=True)
    def info(self: Task, a: int) -> tuple[Any, ...]:  # type: ignore[type-arg]
        return (a, self.request.called_directly, self.request.id, self.request.args)

    assert info(5) == (5, True, None, (5,))
    # Outside any call the request is the empty "called directly" context.
    assert info.request.called_directly is True and info.request.id is None


def test_request_fields_in_a_worker(db_url: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    app = bind_app(api.app, db_url)
    start_worker(app, "-Q", "celery,other", "-n", "reqtest@%h")
    result = api.request_info.apply_async(queue="other", headers={"x-custom": "hello"})
    info = result.get(timeout=20)
    assert info["id"] == result.id == info["correlation_id"]
    assert info["task"] == "tests.apps.api.request_info"
    assert info["args"] == [] and info["kwargs"] == {}
    assert info["retries"] == 0
    assert info["hostname"].startswith("reqtest@")
    assert info["root_id"] == result.id and info["parent_id"] is None
    assert info["is_eager"] is False and info["called_directly"] is False
    assert info["reply_to"] == app.oid
    assert info["origin"].startswith("gen")
    assert info["routing_key"] == "other"
    assert info["x_custom"] == "hello"


def test_custom_call_wraps_every_run(db_url: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    expected_inner = {"x": 5, "called_directly": False}
    eager = api.wrapped.apply((5,), task_id="eager-id").get()
    assert eager == {"outer_id": "eager-id", "inner": {"id": "eager-id", **expected_inner}}
    # Calling the task as a function still goes through __call__, as a direct call.
    assert api.wrapped(6) == {"outer_id": None,
                              "inner": {"id": None, "x": 6, "called_directly": True}}
    app = bind_app(api.app, db_url)
    start_worker(app)
    r = api.wrapped.delay(5)
    assert r.get(timeout=20) == {"outer_id": r.id, "inner": {"id": r.id, **expected_inner}}


# -- class-based tasks ---------------------------------------------------------------------


def test_class_based_task_registered_by_class_and_by_instance(app: Celery) -> None:
    class Multiply(Task):  # type: ignore[type-arg]
        name = "custom.multiply"
        max_retries = 1

        def run(self, x: int, y: int) -> int:
            return x * y

    task = app.register_task(Multiply)
    assert app.tasks["custom.multiply"] is task
    assert task.app is app
    assert task.apply((6, 7)).get() == 42
    assert task.delay(1, 2).id  # sends like any task

    class Unnamed(Task):  # type: ignore[type-arg]
        def run(self) -> str:
            return "unnamed"

    instance = app.register_task(Unnamed())
    assert instance.name == f"{__name__}.Unnamed"
    assert app.tasks[instance.name].apply().get() == "unnamed"


def test_base_class_gives_attributes_and_hooks(app: Celery) -> None:
    calls: list[tuple[Any, ...]] = []

    class Audited(Task):  # type: ignore[type-arg]
        audit_label = "audited"
        max_retries = 2

        def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
            calls.append(("before_start", task_id, list(args), kwargs))

        def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
            calls.append(("on_success", retval, task_id, list(args), kwargs))

        def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                       einfo: Any) -> None:
            calls.append(("on_failure", type(exc).__name__, str(exc), task_id,
                          "ZeroDivisionError" in str(einfo)))

        def on_retry(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                     einfo: Any) -> None:
            calls.append(("on_retry", repr(exc), task_id, self.request.retries))

        def after_return(self, status: str, retval: Any, task_id: str, args: Any,
                         kwargs: Any, einfo: Any) -> None:
            shown = type(retval).__name__ if isinstance(retval, BaseException) else retval
            calls.append(("after_return", status, shown, task_id))

    @app.task(base=Audited)
    def divide(x: int, y: int) -> float:
        return x / y

    @app.task(base=Audited, bind=True)
    def flaky(self: Task, fail_times: int) -> int:  # type: ignore[type-arg]
        if self.request.retries < fail_times:
            raise self.retry(exc=KeyError("again"), countdown=0)
        return self.request.retries

    assert isinstance(divide, Audited) and divide.audit_label == "audited"

    assert divide.apply((6, 3), task_id="ok").get() == 2
    assert calls == [("before_start", "ok", [6, 3], {}), ("on_success", 2.0, "ok", [6, 3], {}),
                     ("after_return", "SUCCESS", 2.0, "ok")]
    calls.clear()

    result = divide.apply((1, 0), task_id="bad")
    assert result.state == states.FAILURE
    assert calls == [("before_start", "bad", [1, 0], {}),
                     ("on_failure", "ZeroDivisionError", "division by zero", "bad", True),
                     ("after_return", "FAILURE", "ZeroDivisionError", "bad")]
    calls.clear()

    # Each attempt calls its hooks once, in order: retry, retry, then success.
    assert flaky.apply((2,), task_id="fl").get() == 2
    assert [c[0] for c in calls] == [
        "before_start", "on_retry", "after_return",
        "before_start", "on_retry", "after_return",
        "before_start", "on_success", "after_return",
    ]
    assert [c for c in calls if c[0] == "on_retry"] == [
        ("on_retry", "KeyError('again')", "fl", 0), ("on_retry", "KeyError('again')", "fl", 1)]
    assert calls[-1] == ("after_return", "SUCCESS", 2, "fl")
    calls.clear()

    # Past max_retries (2) the task fails with the exception given to retry().
    result = flaky.apply((5,), task_id="ex")
    assert result.state == states.FAILURE
    assert isinstance(result.result, KeyError)
    assert [c[0] for c in calls if c[0] != "before_start"] == [
        "on_retry", "after_return", "on_retry", "after_return", "on_failure", "after_return"]


def test_hook_that_raises_does_not_change_the_outcome(app: Celery) -> None:
    class Noisy(Task):  # type: ignore[type-arg]
        def on_success(self, *a: Any) -> None:
            raise RuntimeError("hook broke")

        def after_return(self, *a: Any) -> None:
            raise RuntimeError("hook broke")

    @app.task(base=Noisy)
    def fine() -> str:
        return "fine"

    result = fine.apply()
    assert result.state == states.SUCCESS and result.get() == "fine"


def test_retry_without_exception_past_max_retries(app: Celery) -> None:
    @app.task(bind=True, max_retries=1)
    def always(self: Task) -> None:  # type: ignore[type-arg]
        raise self.retry(countdown=0)

    result = always.apply()
    assert result.state == states.FAILURE
    assert isinstance(result.result, MaxRetriesExceededError)


def test_retry_called_directly_is_an_error(app: Celery) -> None:
    @app.task(bind=True)
    def direct(self: Task) -> None:  # type: ignore[type-arg]
        self.retry()

    with pytest.raises(RuntimeError, match="retry"):
        direct()


def test_retry_exception_text() -> None:
    assert str(Retry(exc=KeyError("k"), when=5)) == "Retry in 5s: KeyError('k')"
    assert str(Retry("custom message")) == "custom message"


def test_autoretry_for_with_eager_apply(app: Celery) -> None:
    attempts: list[int] = []

    @app.task(bind=True, autoretry_for=(ConnectionError,), retry_kwargs={"countdown": 0},
              max_retries=3)
    def connect(self: Task) -> str:  # type: ignore[type-arg]
        attempts.append(self.request.retries)
        if len(attempts) < 3:
            raise ConnectionError("down")
        return "up"

    assert connect.apply().get() == "up"
    assert attempts == [0, 1, 2]


# -- argument checks at send time ------------------------------------------------------------


def test_arguments_are_checked_against_the_signature_at_send_time(app: Celery) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(bind=True)
    def bound(self: Task, x: int) -> int:  # type: ignore[type-arg]
        return x

    class Cls(Task):  # type: ignore[type-arg]
        name = "cls.task"

        def run(self, x: int) -> int:
            return x

    cls_task = app.register_task(Cls)
    with pytest.raises(TypeError, match="'y'"):
        add.delay(1)
    with pytest.raises(TypeError, match="z"):
        add.delay(1, 2, z=3)
    with pytest.raises(TypeError):
        add.apply_async((1, 2, 3))
    with pytest.raises(TypeError, match="'x'"):
        bound.delay()  # self is not counted
    with pytest.raises(TypeError):
        cls_task.delay(1, 2)
    with pytest.raises(TypeError):
        add.s(1).delay()
    assert app.broker.queue_size("celery") == 0  # nothing was sent
    add.delay(1, 2)
    add.delay(x=1, y=2)
    bound.delay(1)
    cls_task.delay(1)
    assert app.broker.queue_size("celery") == 4


def test_typing_false_and_send_task_skip_the_check(app: Celery) -> None:
    @app.task(typing=False)
    def loose(x: int, y: int) -> int:
        return x + y

    loose.delay(1)
    app.send_task(loose.name, (1, 2, 3))  # by name: the sender may not know the signature
    assert app.broker.queue_size("celery") == 2


def test_task_option_must_exist(app: Celery) -> None:
    with pytest.raises(ImproperlyConfigured, match="unknown task option 'acks_lates'"):
        @app.task(acks_lates=True)
        def t() -> None:
            return None


# -- signatures from tasks ----------------------------------------------------------------


def test_task_signatures(app: Celery) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    s = add.s(2)
    assert dict(s) == {"task": add.name, "args": [2], "kwargs": {}, "options": {},
                       "subtask_type": None, "immutable": False}
    assert add.si(1, 2)["immutable"] is True
    assert add.signature((1,), {"y": 2}, countdown=3)["options"] == {"countdown": 3}
    assert s.apply((3,)).get() == 5  # partial args are completed
    assert add.si(1, 2).apply((100,)).get() == 3  # immutable: extra args ignored
    assert s(5) == 7
