"""Results: states, waiting, exceptions rebuilt safely, the stored documents, expiry, groups."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from celeriac import Celery, GroupResult, ResultSet, group, states
from celeriac.exceptions import RemoteTaskError, TaskRevokedError, TimeoutError
from celeriac.protocol.errors import exception_from_dict, exception_to_dict
from celeriac.result import AsyncResult, EagerResult
from celeriac.trace import build_meta
from tests.apps import api
from tests.conftest import bind_app, wait_for

DOC_KEYS = {"status", "result", "traceback", "children", "date_done", "task_id"}


@pytest.fixture
def app() -> Celery:
    return Celery("results", broker=f"memory://{uuid.uuid4().hex}", set_as_current=False)


def store(app: Celery, task_id: str, state: str, result: Any, traceback: str | None = None) -> None:
    app.backend.store([build_meta(app, task_id, state, result, None, traceback)])


# -- unknown ids and waiting -----------------------------------------------------------------


def test_unknown_id_is_pending(app: Celery) -> None:
    r = app.AsyncResult("never-sent")
    assert r.state == r.status == states.PENDING
    assert r.ready() is False and r.successful() is False and r.failed() is False
    assert r.result is None and r.info is None
    assert r.traceback is None and r.date_done is None
    assert r.children == []


def test_get_with_timeout_raises_celeriacs_timeout_error(app: Celery) -> None:
    r = app.AsyncResult("never-sent")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out"):
        r.get(timeout=0.3)
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 3
    assert issubclass(TimeoutError, Exception)
    import celeriac.exceptions

    assert celeriac.exceptions.TimeoutError is TimeoutError


def test_get_returns_as_soon_as_the_result_is_stored(app: Celery) -> None:
    import threading

    r = app.AsyncResult("later")
    timer = threading.Timer(0.2, store, (app, "later", states.SUCCESS, 7))
    timer.start()
    try:
        started = time.monotonic()
        assert r.get(timeout=10) == 7
        assert time.monotonic() - started < 5
    finally:
        timer.cancel()


def test_result_handles_compare_by_id(app: Celery) -> None:
    a, b = app.AsyncResult("x"), app.AsyncResult("x")
    assert a == b and a == "x" and hash(a) == hash("x")
    assert a != app.AsyncResult("y")
    assert repr(a) == "<AsyncResult: x>"
    assert a.id == a.task_id == "x"


# -- success and failure documents ---------------------------------------------------------


def test_success_document_and_accessors(app: Celery) -> None:
    store(app, "ok", states.SUCCESS, {"answer": 42})
    doc = app.backend.get("ok")
    (raw,) = app.backend._fetch(["celery-task-meta-ok"])  # Celery's key
    assert json.loads(raw) == doc
    assert set(doc) == DOC_KEYS
    assert doc["status"] == "SUCCESS" and doc["result"] == {"answer": 42}
    assert doc["traceback"] is None and doc["children"] == [] and doc["task_id"] == "ok"
    r = app.AsyncResult("ok")
    assert r.get(timeout=1) == {"answer": 42}
    assert r.ready() and r.successful() and not r.failed()
    assert r.info == r.result == {"answer": 42}
    assert isinstance(r.date_done, datetime)
    assert abs(r.date_done - datetime.now(UTC)) < timedelta(minutes=1)
    seen: list[Any] = []
    assert r.get(callback=lambda tid, value: seen.append((tid, value)),
                 on_message=lambda meta: seen.append(meta["status"])) == {"answer": 42}
    assert seen == ["SUCCESS", ("ok", {"answer": 42})]


def test_failure_is_stored_in_celerys_exception_format(app: Celery) -> None:
    store(app, "bad", states.FAILURE, exception_to_dict(ValueError("bad thing")), "Traceback…")
    doc = app.backend.get("bad")
    assert doc["result"] == {"exc_type": "ValueError", "exc_message": ["bad thing"],
                             "exc_module": "builtins"}
    r = app.AsyncResult("bad")
    with pytest.raises(ValueError, match="bad thing"):
        r.get(timeout=1)
    returned = r.get(propagate=False)
    assert type(returned) is ValueError and returned.args == ("bad thing",)
    assert isinstance(r.result, ValueError) and isinstance(r.info, ValueError)
    assert r.failed() and r.ready() and not r.successful()
    assert r.traceback == "Traceback…"


def test_exception_documents_of_our_own_errors_name_celery_exceptions() -> None:
    assert exception_to_dict(TaskRevokedError("revoked")) == {
        "exc_type": "TaskRevokedError", "exc_message": ["revoked"],
        "exc_module": "celery.exceptions"}

    class Custom(Exception):
        pass

    doc = exception_to_dict(Custom("custom", 42, object()))
    assert doc["exc_type"] == "Custom" and doc["exc_module"] == __name__
    assert doc["exc_message"][:2] == ["custom", 42]
    assert isinstance(doc["exc_message"][2], str)  # unserialisable args become their repr


@pytest.mark.parametrize(
    ("doc", "expected_type", "args"),
    [
        ({"exc_type": "KeyError", "exc_message": ["k"], "exc_module": "builtins"}, KeyError,
         ("k",)),
        ({"exc_type": "NotRegistered", "exc_message": ["tasks.nope"],
          "exc_module": "celery.exceptions"}, "NotRegistered", ("tasks.nope",)),
        ({"exc_type": "TaskRevokedError", "exc_message": ["expired"],
          "exc_module": "celery.exceptions"}, TaskRevokedError, ("expired",)),
        ({"exc_type": "ValueError", "exc_message": "single", "exc_module": "builtins"},
         ValueError, ("single",)),
    ],
)
def test_known_types_are_rebuilt(doc: dict, expected_type: Any, args: tuple) -> None:  # type: ignore[type-arg]
    exc = exception_from_dict(doc)
    if isinstance(expected_type, str):
        assert type(exc).__name__ == expected_type
    else:
        assert type(exc) is expected_type
    assert exc.args == args


def test_unknown_types_come_back_as_a_stand_in_with_the_same_name() -> None:
    exc = exception_from_dict({"exc_type": "BoomError", "exc_message": ["x", 1],
                               "exc_module": "some.unknown.module"})
    assert type(exc).__name__ == "BoomError"
    assert isinstance(exc, RemoteTaskError)
    assert exc.args == ("x", 1)
    assert type(exc).exc_module == "some.unknown.module"
    # The stand-in travels back out under its original name and module.
    assert exception_to_dict(exc) == {"exc_type": "BoomError", "exc_message": ["x", 1],
                                      "exc_module": "some.unknown.module"}
    import sys

    assert "some.unknown.module" not in sys.modules  # result data never imports anything


def test_result_data_cannot_make_us_build_non_exceptions() -> None:
    exc = exception_from_dict({"exc_type": "system", "exc_message": ["echo hi"],
                               "exc_module": "os"})
    assert isinstance(exc, RemoteTaskError) and type(exc).__name__ == "system"
    exc = exception_from_dict({"exc_type": "not an identifier!", "exc_message": [],
                               "exc_module": "x"})
    assert isinstance(exc, RemoteTaskError)
    assert isinstance(exception_from_dict("a plain string"), RemoteTaskError)


def test_registered_exception_types_are_rebuilt(app: Celery) -> None:
    class PaymentError(Exception):
        def __init__(self, message: str, code: int) -> None:
            super().__init__(message, code)
            self.code = code

    PaymentError.__module__ = "billing.errors"  # a module this process never imported
    doc = {"exc_type": "PaymentError", "exc_message": ["declined", 51],
           "exc_module": "billing.errors"}
    store(app, "pay", states.FAILURE, doc)
    with pytest.raises(RemoteTaskError):
        app.AsyncResult("pay").get(timeout=1)
    assert app.register_exception(PaymentError) is PaymentError
    with pytest.raises(PaymentError) as info:
        app.AsyncResult("pay").get(timeout=1)
    assert info.value.code == 51 and info.value.args == ("declined", 51)


def test_failures_through_a_worker(db_url: str, start_worker,  # type: ignore[no-untyped-def]
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.delitem(sys.modules, "tests.apps.api_worker_only", raising=False)
    app = bind_app(api.app, db_url)
    start_worker(app, concurrency=2)
    for kind, exc_type in (("KeyError", KeyError), ("ValueError", ValueError),
                           ("ZeroDivisionError", ZeroDivisionError)):
        r = api.raise_builtin.delay(kind, "boom")
        with pytest.raises(exc_type) as info:
            r.get(timeout=20)
        assert type(info.value) is exc_type and info.value.args == ("boom",)
        doc = app.backend.get(r.id)
        assert set(doc) == DOC_KEYS
        assert doc["result"] == {"exc_type": kind, "exc_message": ["boom"],
                                 "exc_module": "builtins"}
        assert f"{kind}: " in doc["traceback"] and doc["traceback"].startswith("Traceback")

    r = api.raise_registered.delay("declined", 51)
    with pytest.raises(api.RegisteredError) as reg:
        r.get(timeout=20)
    assert reg.value.code == 51
    assert app.backend.get(r.id)["result"] == {
        "exc_type": "RegisteredError", "exc_message": ["declined", 51],
        "exc_module": "tests.apps.api"}

    r = api.raise_worker_only.delay("only there")
    value = r.get(timeout=20, propagate=False)
    assert isinstance(value, RemoteTaskError)  # this process never imported its module
    assert type(value).__name__ == "WorkerOnlyError"
    assert value.args == ("only there", 7)
    with pytest.raises(Exception) as worker_only:
        r.get(timeout=1)
    assert type(worker_only.value).__name__ == "WorkerOnlyError"
    assert r.failed() and "WorkerOnlyError" in (r.traceback or "")
    assert isinstance(r.date_done, datetime)


def test_get_inside_a_task_is_refused(db_url: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    app = bind_app(api.app, db_url)
    start_worker(app, concurrency=2)
    with pytest.raises(RuntimeError, match=r"Never call result\.get"):
        api.get_inside.delay().get(timeout=20)


def test_custom_progress_states(db_url: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    app = bind_app(api.app, db_url)
    start_worker(app)
    r = api.progress.delay(3)
    assert r.get(timeout=20) == "done"
    assert r.state == states.SUCCESS


def test_custom_state_is_readable_while_running(app: Celery) -> None:
    @app.task(bind=True)
    def step(self, n: int) -> str:  # type: ignore[no-untyped-def]
        self.update_state(state="PROGRESS", meta={"current": n})
        seen = app.AsyncResult(self.request.id)
        return f"{seen.state}:{seen.info['current']}:{seen.ready()}"

    assert step.apply((3,)).get() == "PROGRESS:3:False"


def test_success_document_through_a_worker(db_url: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    app = bind_app(api.app, db_url)
    start_worker(app)
    r = api.add.delay(2, 2)
    assert r.get(timeout=20) == 4
    doc = app.backend.get(r.id)
    assert set(doc) == DOC_KEYS
    assert (doc["status"], doc["result"], doc["traceback"], doc["children"], doc["task_id"]) == (
        "SUCCESS", 4, None, [], r.id)
    assert datetime.fromisoformat(doc["date_done"]).utcoffset() == timedelta(0)
    ignored = api.add.apply_async((1, 1), ignore_result=True)
    after = api.add.delay(3, 3)
    assert after.get(timeout=20) == 6
    assert ignored.state == states.PENDING  # nothing stored for it


# -- revoke, forget, expiry -------------------------------------------------------------------


def test_revoked_result(app: Celery) -> None:
    @app.task
    def never() -> None:
        return None

    r = never.apply_async(countdown=3600)
    r.revoke()
    assert r.state == states.REVOKED and r.ready() and not r.failed()
    with pytest.raises(TaskRevokedError, match="revoked"):
        r.get(timeout=1)
    assert isinstance(r.get(propagate=False), TaskRevokedError)


def test_forget(app: Celery) -> None:
    store(app, "f", states.SUCCESS, 1)
    r = app.AsyncResult("f")
    assert r.get(timeout=1) == 1
    r.forget()
    assert r.state == states.PENDING and app.backend.get("f") is None
    assert app.AsyncResult("f").state == states.PENDING


def test_result_expires_is_honoured(app: Celery) -> None:
    app.conf.result_expires = 0.3
    store(app, "short", states.SUCCESS, 1)
    assert app.AsyncResult("short").state == states.SUCCESS
    wait_for(lambda: app.AsyncResult("short").state == states.PENDING, timeout=10,
             message="the result to expire")
    assert app.backend.get("short") is None


def test_result_expires_through_a_worker(db_url: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    app = bind_app(api.app, db_url)
    start_worker(app, env={"API_RESULT_EXPIRES": "1"})  # the worker's setting decides
    r = api.add.delay(1, 2)
    assert r.get(timeout=20) == 3
    wait_for(lambda: app.AsyncResult(r.id).state == states.PENDING, timeout=15,
             interval=0.1, message="the result to expire")


def test_result_expires_none_keeps_results(app: Celery) -> None:
    app.conf.result_expires = None
    store(app, "kept", states.SUCCESS, 1)
    assert app.backend.expires is None
    assert app.AsyncResult("kept").get(timeout=1) == 1


# -- groups and result sets -----------------------------------------------------------------


def test_group_result_save_restore_delete(app: Celery) -> None:
    children = [app.AsyncResult(f"child-{i}") for i in range(3)]
    saved = GroupResult("gid-1", children, app=app).save()
    assert saved.id == "gid-1"
    # Celery's document under Celery's key (PROTOCOL.md §4.4).
    (raw,) = app.backend._fetch(["celery-taskset-meta-gid-1"])
    assert json.loads(raw) == {"result": [["gid-1", None], [
        [["child-0", None], None], [["child-1", None], None], [["child-2", None], None]]]}
    restored = GroupResult.restore("gid-1", app=app)
    assert isinstance(restored, GroupResult)
    assert restored.id == "gid-1"
    assert [r.id for r in restored] == ["child-0", "child-1", "child-2"]
    assert app.GroupResult("gid-1", children).as_tuple() == [
        ["gid-1", None], [[["child-0", None], None], [["child-1", None], None],
                          [["child-2", None], None]]]
    saved.delete()
    assert GroupResult.restore("gid-1", app=app) is None
    assert GroupResult.restore("never-saved", app=app) is None


def test_group_result_waits_for_all(app: Celery) -> None:
    results = [app.AsyncResult(f"m{i}") for i in range(3)]
    gr = GroupResult("g", results, app=app)
    assert not gr.ready() and gr.waiting() and gr.completed_count() == 0
    for i in range(3):
        store(app, f"m{i}", states.SUCCESS, i * 10)
    assert gr.join(timeout=5) == [0, 10, 20]
    assert gr.ready() and gr.successful() and not gr.failed() and gr.completed_count() == 3
    assert len(gr) == 3 and gr[1].id == "m1"
    store(app, "m3", states.FAILURE, exception_to_dict(KeyError("k")))
    rs = ResultSet([*results, app.AsyncResult("m3")], app=app)
    assert rs.failed()
    with pytest.raises(KeyError):
        rs.get(timeout=5)
    values = rs.join(timeout=5, propagate=False)
    assert values[:3] == [0, 10, 20] and isinstance(values[3], KeyError)
    with pytest.raises(TimeoutError):
        ResultSet([app.AsyncResult("missing")], app=app).join(timeout=0.2)


def test_group_through_a_worker(db_url: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    app = bind_app(api.app, db_url)
    start_worker(app, concurrency=2)
    gr = group(api.add.s(i, i) for i in range(4)).apply_async()
    assert isinstance(gr, GroupResult)
    assert gr.get(timeout=20) == [0, 2, 4, 6]
    gr.save()
    restored = GroupResult.restore(gr.id, app=app)
    assert restored is not None and restored.join(timeout=5) == [0, 2, 4, 6]


# -- eager results -------------------------------------------------------------------------


def test_eager_result(app: Celery) -> None:
    @app.task
    def div(x: int, y: int) -> float:
        return x / y

    ok = div.apply((6, 3))
    assert isinstance(ok, EagerResult)
    assert ok.state == states.SUCCESS and ok.ready() and ok.successful() and not ok.failed()
    assert ok.get() == 2 and ok.result == 2 and ok.info == 2 and ok.traceback is None
    bad = div.apply((1, 0))
    assert bad.state == states.FAILURE and bad.failed() and bad.ready()
    assert "ZeroDivisionError" in (bad.traceback or "")
    with pytest.raises(ZeroDivisionError):
        bad.get()
    assert isinstance(bad.get(propagate=False), ZeroDivisionError)
    assert isinstance(bad.result, ZeroDivisionError)
    bad.forget()  # nothing to forget; must not fail
    assert app.backend.get(bad.id) is None  # eager results are not stored by default
    assert repr(ok) == f"<EagerResult: {ok.id}>"


# -- following parents (chains) ------------------------------------------------------------


def test_get_raises_a_failed_parents_error_instead_of_waiting(app: Celery) -> None:
    first, second = app.AsyncResult("step-1"), app.AsyncResult("step-2")
    third = AsyncResult("step-3", app=app, parent=second)
    second.parent = first
    store(app, "step-1", states.FAILURE, exception_to_dict(KeyError("first step broke")))
    started = time.monotonic()
    with pytest.raises(KeyError, match="first step broke"):
        third.get(timeout=10)
    assert time.monotonic() - started < 5
    # Without following parents (or without propagating) it waits for itself.
    with pytest.raises(TimeoutError):
        third.get(timeout=0.3, follow_parents=False)
    with pytest.raises(TimeoutError):
        third.get(timeout=0.3, propagate=False)
    # Parents that succeed do not stop the wait; the task's own result is returned.
    store(app, "step-1", states.SUCCESS, 1)
    store(app, "step-2", states.SUCCESS, 2)
    store(app, "step-3", states.SUCCESS, 3)
    assert AsyncResult("step-3", app=app, parent=second).get(timeout=5) == 3


def test_chain_with_a_failing_step_raises_through_a_worker(db_url: str,  # type: ignore[no-untyped-def]
                                                           start_worker) -> None:
    from celeriac import chain

    app = bind_app(api.app, db_url)
    start_worker(app)
    result = chain(api.raise_builtin.s("ZeroDivisionError", "step one"), api.add.s(1)).delay()
    with pytest.raises(ZeroDivisionError, match="step one"):
        result.get(timeout=20)
    assert result.state == states.FAILURE  # the second step never runs: failed too (Celery 5.7)
    ok = chain(api.add.s(1, 1), api.add.s(10), api.add.s(100)).delay()
    assert ok.get(timeout=20) == 112
    assert ok.parent is not None and ok.parent.get(timeout=5) == 12
