"""The app: laziness, several apps in one process, current_app, shared tasks, discovery."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

import celeriac
from celeriac import Celery, Task, current_app, shared_task
from celeriac.exceptions import NotRegistered
from celeriac.result import AsyncResult


def mem() -> str:
    return f"memory://{uuid.uuid4().hex}"


def queued(app: Celery, queue: str = "celery") -> list:  # type: ignore[type-arg]
    """Take every ready message of ``queue`` off the app's broker."""
    consumer = app.broker.consumer([queue])
    try:
        deliveries = consumer.fetch(1000, 0)
        consumer.ack(deliveries)
    finally:
        consumer.close()
    return [d.message for d in deliveries]


# -- laziness -------------------------------------------------------------------------------


def test_creating_and_configuring_an_app_opens_nothing(tmp_path: Path) -> None:
    db = tmp_path / "lazy.db"
    app = Celery("lazy", broker=f"sqlite:///{db}", set_as_current=False)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    app.conf.task_default_queue = "celery"
    assert app.conf.broker_url == f"sqlite:///{db}"
    app.finalize()
    assert add.name in app.tasks
    result = add.AsyncResult("some-id")
    assert result.id == "some-id"
    add.s(1, 2)
    assert not list(tmp_path.iterdir()), "nothing may be created before the first send"
    add.delay(1, 2)
    assert db.exists()
    app.close()


def test_default_app_uses_an_sqlite_file_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CELERIAC_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERIAC_RESULT_BACKEND", raising=False)
    app = Celery("embedded", set_as_current=False)
    assert app.broker_url == "sqlite:///celeriac.db"
    assert app.backend_url == "sqlite:///celeriac.db"  # results next to the messages

    @app.task
    def noop() -> None:
        return None

    assert not (tmp_path / "celeriac.db").exists()
    result = noop.delay()
    assert (tmp_path / "celeriac.db").exists()
    assert result.state == "PENDING"
    assert app.broker.queue_size("celery") == 1
    app.close()


def test_memory_broker_keeps_results_in_memory_too() -> None:
    url = mem()
    app = Celery("t", broker=url, set_as_current=False)
    assert app.backend_url == url
    app2 = Celery("t", broker=url, backend="memory://other", set_as_current=False)
    assert app2.backend_url == "memory://other"


# -- several apps ---------------------------------------------------------------------------


def test_apps_have_separate_registries_and_brokers() -> None:
    one = Celery("one", broker=mem(), set_as_current=False)
    two = Celery("two", broker=mem(), set_as_current=False)

    @one.task(name="same.name")
    def first() -> str:
        return "one"

    @two.task(name="same.name")
    def second() -> str:
        return "two"

    @one.task
    def only_in_one() -> None:
        return None

    assert one.tasks["same.name"] is first
    assert two.tasks["same.name"] is second
    assert first.app is one and second.app is two
    assert only_in_one.name in one.tasks
    assert only_in_one.name not in two.tasks
    with pytest.raises(NotRegistered):
        two.tasks[only_in_one.name]
    first.delay()
    assert len(queued(two)) == 0
    assert len(queued(one)) == 1
    assert first.apply().get() == "one" and second.apply().get() == "two"


def test_current_app_is_the_app_made_or_set_last() -> None:
    made = Celery("made", broker=mem())
    assert current_app() is made
    quiet = Celery("quiet", broker=mem(), set_as_current=False)
    assert current_app() is made
    quiet.set_current()
    assert current_app() is quiet
    made.set_current()
    assert current_app() is made
    assert celeriac.current_app is current_app


def test_results_default_to_the_current_app() -> None:
    app = Celery("cur", broker=mem())
    assert AsyncResult("x").app is app
    other = Celery("other", broker=mem(), set_as_current=False)
    assert AsyncResult("x", app=other).app is other
    assert other.AsyncResult("x").app is other


def test_repr_and_context_manager() -> None:
    with Celery("proj", broker=mem(), set_as_current=False) as app:
        assert repr(app).startswith("<Celery proj at 0x")
        app.broker  # noqa: B018 - connect
    assert app._connections == {}


# -- shared tasks ---------------------------------------------------------------------------


def test_shared_task_is_registered_on_every_app_present_and_future() -> None:
    before = Celery("before", broker=mem(), set_as_current=False)

    @shared_task
    def shared_double(x: int) -> int:
        return 2 * x

    @shared_task(name="tests.shared.named", max_retries=9)
    def shared_named() -> str:
        return "named"

    after = Celery("after", broker=mem(), set_as_current=False)
    for app in (before, after):
        task = app.tasks[f"{__name__}.shared_double"]
        assert task.app is app
        assert task.apply((4,)).get() == 8
        named = app.tasks["tests.shared.named"]
        assert named.max_retries == 9

    # The proxy resolves to the current app's task on each use.
    after.set_current()
    assert shared_double.name == f"{__name__}.shared_double"
    assert shared_double.app is after
    assert shared_double(5) == 10
    before.set_current()
    assert shared_double.app is before


# -- discovery ------------------------------------------------------------------------------


def _forget_module(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.delitem(sys.modules, name, raising=False)
    parent, _, child = name.rpartition(".")
    if parent in sys.modules and hasattr(sys.modules[parent], child):
        monkeypatch.delattr(sys.modules[parent], child)


def test_include_modules_are_imported_at_finalize(monkeypatch: pytest.MonkeyPatch) -> None:
    _forget_module(monkeypatch, "tests.apps.included")
    app = Celery("inc", broker=mem(), include=["tests.apps.included"], set_as_current=False)
    assert app.conf.include == ("tests.apps.included",)
    assert "tests.apps.included" not in sys.modules
    assert "tests.apps.included.included_mul" in app.tasks  # a lookup finalizes the app
    assert "tests.apps.included" in sys.modules
    assert app.tasks["tests.apps.included.included_mul"].apply((3, 4)).get() == 12


def test_imports_setting_is_imported_at_finalize(monkeypatch: pytest.MonkeyPatch) -> None:
    _forget_module(monkeypatch, "tests.apps.included")
    app = Celery("imp", broker=mem(), imports=["tests.apps.included"], set_as_current=False)
    assert "tests.apps.included" not in sys.modules
    app.finalize()
    assert "tests.apps.included" in sys.modules
    assert "tests.apps.included.included_mul" in app.tasks


def test_autodiscover_tasks_imports_each_packages_tasks_module_at_finalize(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _forget_module(monkeypatch, "tests.apps.discover_pkg.tasks")
    app = Celery("disc", broker=mem(), set_as_current=False)
    app.autodiscover_tasks(["tests.apps.discover_pkg", "tests.apps.discover_empty"])
    assert "tests.apps.discover_pkg.tasks" not in sys.modules
    assert "tests.apps.discover_pkg.tasks.discovered_sub" in app.tasks
    assert "tests.apps.discover_pkg.tasks" in sys.modules
    assert app.tasks["discover.custom_name"].apply().get() == "named"
    assert app.tasks["tests.apps.discover_pkg.tasks.discovered_sub"].apply((5, 3)).get() == 2


def test_autodiscover_tasks_force_related_name_and_callable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _forget_module(monkeypatch, "tests.apps.discover_pkg.jobs")
    app = Celery("disc2", broker=mem(), set_as_current=False)
    app.autodiscover_tasks(lambda: ["tests.apps.discover_pkg"], related_name="jobs", force=True)
    assert "tests.apps.discover_pkg.jobs" in sys.modules  # at once, without finalize
    assert "tests.apps.discover_pkg.jobs.discovered_job" in app.tasks


def test_autodiscover_tasks_reports_a_broken_tasks_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / f"brokenpkg_{uuid.uuid4().hex[:8]}"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text("import module_that_does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    app = Celery("disc3", broker=mem(), set_as_current=False)
    with pytest.raises(ModuleNotFoundError, match="module_that_does_not_exist_anywhere"):
        app.autodiscover_tasks([pkg.name], force=True)


# -- the task decorator ---------------------------------------------------------------------


def test_task_decorator_bare_and_with_options() -> None:
    app = Celery("deco", broker=mem(), set_as_current=False)

    @app.task
    def bare(x: int) -> int:
        return x

    @app.task()
    def empty_parens(x: int) -> int:
        return x

    @app.task(name="custom.name", max_retries=1, queue="q", ignore_result=True)
    def with_options(x: int) -> int:
        return x

    assert bare.name == f"{__name__}.bare"
    assert empty_parens.name == f"{__name__}.empty_parens"
    assert with_options.name == "custom.name"
    assert (with_options.max_retries, with_options.queue, with_options.ignore_result) == (
        1, "q", True)
    assert isinstance(bare, Task)
    assert bare(3) == 3  # calling the task calls the function
    assert bare.__doc__ is None and bare.__wrapped__.__name__ == "bare"
    assert set(app.tasks) >= {bare.name, empty_parens.name, "custom.name"}
    with pytest.raises(TypeError):
        app.task("not-a-function", name="x")


def test_tasks_in_main_take_the_apps_name() -> None:
    from celeriac.task import task_name_for

    assert task_name_for("__main__", "add", "proj") == "proj.add"
    assert task_name_for("pkg.mod", "add", "proj") == "pkg.mod.add"


def test_unknown_task_option_fails_naming_it() -> None:
    from celeriac.exceptions import ImproperlyConfigured

    app = Celery("opts", broker=mem(), set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match="max_retires"):
        @app.task(max_retires=3)
        def typo() -> None:
            return None


def test_task_cls_sets_the_default_base() -> None:
    class Base(Task):  # type: ignore[type-arg]
        custom_attr = "from-base"

    app = Celery("cls", broker=mem(), task_cls=Base, set_as_current=False)

    @app.task
    def t() -> None:
        return None

    assert isinstance(t, Base) and t.custom_attr == "from-base"
    app2 = Celery("cls2", broker=mem(), task_cls="celeriac.task:Task", set_as_current=False)
    assert app2.task_cls is Task


def test_autofinalize_false_requires_an_explicit_finalize() -> None:
    app = Celery("strict", broker=mem(), autofinalize=False, set_as_current=False)

    @app.task(name="strict.add")
    def add(x: int, y: int) -> int:
        return x + y

    # Looking past what was defined (here a built-in task that finalize adds) needs finalize.
    with pytest.raises(RuntimeError, match="not finalized"):
        app.tasks["celery.chord_unlock"]
    app.finalize()
    assert app.tasks["strict.add"] is add
    assert "celery.chord_unlock" in app.tasks
    assert add.apply((2, 3)).get() == 5
