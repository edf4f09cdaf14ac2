"""Configuration: Celery's setting names and defaults, sources, precedence, fail-fast checks.

All in-process; nothing here opens a connection.
"""

from __future__ import annotations

import sys
import types
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from celeriac import Celery
from celeriac.config import SETTINGS, Settings
from celeriac.exceptions import ImproperlyConfigured


def mem() -> str:
    return f"memory://{uuid.uuid4().hex}"


@pytest.fixture
def config_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Write a uniquely named config module on sys.path; returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(text: str) -> str:
        name = f"cfg_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(text)
        monkeypatch.delitem(sys.modules, name, raising=False)
        return name

    return write


# -- defaults -------------------------------------------------------------------------------


def test_defaults_have_celerys_names_and_values() -> None:
    conf = Celery("t", broker=mem(), set_as_current=False).conf
    assert conf.task_default_queue == "celery"
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.result_expires == 86400.0
    assert conf.task_acks_late is False
    assert conf.task_always_eager is False
    assert conf.task_eager_propagates is False
    assert conf.task_ignore_result is False
    assert conf.worker_prefetch_multiplier == 4
    assert conf.enable_utc is True
    assert conf.result_extended is False
    # mapping and attribute access agree
    assert conf["task_default_queue"] == conf.task_default_queue
    assert conf.get("nope-not-a-setting", 5) == 5
    assert "task_default_queue" in conf.table()


def test_settings_mapping_checks_every_write() -> None:
    s = Settings()
    s.update(task_default_queue="q", worker_concurrency="4")
    assert s.task_default_queue == "q"
    assert s.worker_concurrency == 4  # a string from the environment becomes the number
    with pytest.raises(ImproperlyConfigured, match="worker_concurrency"):
        s.update({"worker_concurrency": "many"})
    del s["task_default_queue"]
    assert s.task_default_queue == SETTINGS["task_default_queue"].default


# -- fail fast, naming the setting -----------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("task_serializer", "jsn", r"task_serializer='jsn'.*unknown serializer"),
        ("result_serializer", "yml", r"result_serializer='yml'"),
        ("worker_concurrency", "many", r"worker_concurrency='many'.*number"),
        ("worker_concurrency", 0, r"worker_concurrency=0.*at least 1"),
        ("worker_prefetch_multiplier", True, r"worker_prefetch_multiplier=True"),
        ("worker_pool", "gevent", r"worker_pool='gevent'.*prefork"),
        ("accept_content", ["json", "yaml2"], r"accept_content.*'yaml2'"),
        ("accept_content", 5, r"accept_content=5"),
        ("timezone", "Mars/Olympus_Mons", r"timezone='Mars/Olympus_Mons'.*time zone"),
        ("task_acks_late", "yes", r"task_acks_late='yes'.*bool"),
        ("task_routes", 12, r"task_routes=12"),
        ("result_expires", "soon", r"result_expires='soon'"),
        ("broker_url", 42, r"broker_url=42"),
        ("task_protocol", 1, r"task_protocol=1"),
    ],
)
def test_bad_value_fails_at_once_naming_the_setting(setting: str, value: object,
                                                     message: str) -> None:
    # As a constructor keyword: fails when the app is created, not when first used.
    with pytest.raises(ImproperlyConfigured, match=message):
        Celery("t", broker=mem(), set_as_current=False, **{setting: value})
    # Assigned on app.conf.
    app = Celery("t", broker=mem(), set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match=message):
        setattr(app.conf, setting, value)
    with pytest.raises(ImproperlyConfigured, match=message):
        app.conf[setting] = value
    # From a config source: fails when the settings are read.
    app = Celery("t", broker=mem(), set_as_current=False)
    app.config_from_object({setting: value})
    with pytest.raises(ImproperlyConfigured, match=message):
        app.conf.task_default_queue  # noqa: B018


@pytest.mark.parametrize(
    ("wrong", "meant"),
    [
        ("task_acks_lates", "task_acks_late"),
        ("task_serialiser", "task_serializer"),
        ("worker_concurency", "worker_concurrency"),
        ("result_backnd", "result_backend"),
        ("broker_ur", "broker_url"),
        ("task_default_queu", "task_default_queue"),
        ("acept_content", "accept_content"),
        ("beat_schedul", "beat_schedule"),
    ],
)
def test_misspelt_setting_fails_with_did_you_mean(wrong: str, meant: str) -> None:
    expected = rf"unknown setting '{wrong}'; did you mean '{meant}'\?"
    with pytest.raises(ImproperlyConfigured, match=expected):
        Celery("t", broker=mem(), set_as_current=False, **{wrong: True})
    app = Celery("t", broker=mem(), set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match=expected):
        setattr(app.conf, wrong, True)
    # A source added once the settings are loaded is checked when added.
    with pytest.raises(ImproperlyConfigured, match=expected):
        app.config_from_object({wrong: True})
    app = Celery("t", broker=mem(), set_as_current=False)
    app.config_from_object({wrong: True})
    with pytest.raises(ImproperlyConfigured, match=expected):
        app.conf.task_default_queue  # noqa: B018


def test_unknown_setting_in_a_known_namespace_fails_without_a_guess() -> None:
    app = Celery("t", broker=mem(), set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match="unknown setting 'worker_zzzzzzzzzz'"):
        app.conf.worker_zzzzzzzzzz = 1


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("result_chord_join_timeout", 3.0),
        ("beat_schedule", {"every-minute": {"task": "t.add", "schedule": 60.0}}),
        ("worker_direct", True),
        ("broker_pool_limit", 10),
        ("task_compression", "gzip"),
        ("result_compression", None),
        ("task_default_exchange", "celery"),
        ("event_serializer", "json"),
        ("security_key", "/nowhere.pem"),
    ],
)
def test_celery_only_settings_are_accepted(setting: str, value: object) -> None:
    app = Celery("t", broker=mem(), set_as_current=False, **{setting: value})
    assert app.conf[setting] == value
    app.conf[setting] = value
    app.config_from_object({setting: value})
    assert app.conf[setting] == value


def test_values_are_normalised() -> None:
    app = Celery("t", broker=["memory://a", "memory://b"], set_as_current=False,
                 result_expires=timedelta(minutes=2), worker_concurrency="3",
                 accept_content="json", include="tests.apps.included")
    assert app.conf.broker_url == "memory://a;memory://b"
    assert app.conf.result_expires == 120.0
    assert app.conf.worker_concurrency == 3
    assert app.conf.accept_content == ["json"]
    assert app.conf.include == ("tests.apps.included",)


# -- sources and precedence -------------------------------------------------------------------


class PlainConfig:
    broker_url = "memory://from-object"
    task_default_queue = "from-object"
    result_expires = 60
    _private = "ignored"
    UPPER = "ignored"


class DjangoSettings:
    CELERY_BROKER_URL = "memory://django"
    CELERY_TASK_DEFAULT_QUEUE = "django-q"
    CELERY_RESULT_EXPIRES = 30
    broker_url = "memory://not-namespaced"  # outside the namespace: ignored
    DEBUG = True
    INSTALLED_APPS = ("x",)


def test_config_from_object_with_an_object() -> None:
    app = Celery("t", set_as_current=False)
    app.config_from_object(PlainConfig)
    assert app.conf.broker_url == "memory://from-object"
    assert app.conf.task_default_queue == "from-object"
    assert app.conf.result_expires == 60
    assert "_private" not in app.conf and "UPPER" not in app.conf


def test_config_from_object_with_a_dict_and_an_instance() -> None:
    app = Celery("t", set_as_current=False)
    app.config_from_object({"task_default_queue": "from-dict"})
    assert app.conf.task_default_queue == "from-dict"
    app2 = Celery("t", set_as_current=False)
    app2.config_from_object(PlainConfig())
    assert app2.conf.task_default_queue == "from-object"


def test_config_from_object_with_a_dotted_path(config_module) -> None:  # type: ignore[no-untyped-def]
    name = config_module(
        "import os\n"
        "from datetime import timedelta\n"
        "broker_url = 'memory://dotted'\n"
        "task_default_queue = 'dotted'\n"
        "result_expires = timedelta(seconds=90)\n"
        "class Nested:\n"
        "    task_default_queue = 'nested'\n"
    )
    app = Celery("t", set_as_current=False)
    app.config_from_object(name)
    assert app.conf.broker_url == "memory://dotted"
    assert app.conf.task_default_queue == "dotted"
    assert app.conf.result_expires == 90.0
    app2 = Celery("t", set_as_current=False)
    app2.config_from_object(f"{name}:Nested")
    assert app2.conf.task_default_queue == "nested"


def test_config_from_object_with_a_missing_module_fails_at_once() -> None:
    app = Celery("t", set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match="no_such_config_module"):
        app.config_from_object("no_such_config_module")
    app.config_from_object("no_such_config_module", silent=True)  # silent: nothing happens
    assert app.conf.task_default_queue == "celery"


def test_namespace_reads_django_style_settings() -> None:
    app = Celery("t", set_as_current=False)
    app.config_from_object(DjangoSettings, namespace="CELERY")
    assert app.conf.broker_url == "memory://django"
    assert app.conf.task_default_queue == "django-q"
    assert app.conf.result_expires == 30
    # A dict with the namespace works too, as does a trailing underscore.
    app2 = Celery("t", set_as_current=False)
    app2.config_from_object({"CELERY_TASK_DEFAULT_QUEUE": "dq", "OTHER": 1}, namespace="CELERY_")
    assert app2.conf.task_default_queue == "dq"


def test_namespace_given_to_the_app_applies_to_config_from_object() -> None:
    app = Celery("t", namespace="CELERY", set_as_current=False)
    app.config_from_object(DjangoSettings)
    assert app.conf.task_default_queue == "django-q"


def test_namespaced_typo_fails_naming_the_setting() -> None:
    app = Celery("t", set_as_current=False)
    app.config_from_object({"CELERY_TASK_ACKS_LATES": True}, namespace="CELERY")
    with pytest.raises(ImproperlyConfigured, match="did you mean 'task_acks_late'"):
        app.conf.task_default_queue  # noqa: B018


def test_constructor_arguments_win_over_config_sources() -> None:
    app = Celery("t", broker="memory://ctor", backend="memory://ctor-backend",
                 task_default_queue="ctor-q", set_as_current=False)
    app.config_from_object(PlainConfig)
    assert app.conf.broker_url == "memory://ctor"
    assert app.conf.result_backend == "memory://ctor-backend"
    assert app.conf.task_default_queue == "ctor-q"
    assert app.conf.result_expires == 60  # what the constructor did not set comes through
    # Also when the source is added after the settings were first read.
    app.config_from_object({"broker_url": "memory://late", "task_default_queue": "late",
                            "result_expires": 5})
    assert app.conf.broker_url == "memory://ctor"
    assert app.conf.task_default_queue == "ctor-q"
    assert app.conf.result_expires == 5


def test_config_source_given_to_the_constructor() -> None:
    app = Celery("t", config_source=DjangoSettings, namespace="CELERY", set_as_current=False)
    assert app.conf.task_default_queue == "django-q"


def test_assignment_wins_over_earlier_sources() -> None:
    app = Celery("t", set_as_current=False)
    app.config_from_object(PlainConfig)
    app.conf.task_default_queue = "assigned"
    app.conf.update(result_expires=7)
    assert app.conf.task_default_queue == "assigned"
    assert app.conf.result_expires == 7
    assert app.conf.broker_url == "memory://from-object"


def test_later_sources_win_over_earlier_ones() -> None:
    app = Celery("t", set_as_current=False)
    app.config_from_object({"task_default_queue": "first", "result_expires": 1})
    app.config_from_object({"task_default_queue": "second"})
    assert app.conf.task_default_queue == "second"
    assert app.conf.result_expires == 1


def test_sources_are_read_lazily() -> None:
    reads: list[str] = []

    class Spy:
        def __dir__(self) -> list[str]:
            reads.append("dir")
            return ["task_default_queue"]

        task_default_queue = "spied"

    app = Celery("t", set_as_current=False)
    app.config_from_object(Spy())
    assert reads == []
    assert app.conf.task_default_queue == "spied"
    assert reads == ["dir"]


def test_config_from_envvar(config_module, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    name = config_module("task_default_queue = 'from-envvar'\n")
    monkeypatch.setenv("CELERIAC_TEST_CONFIG", name)
    app = Celery("t", set_as_current=False)
    app.config_from_envvar("CELERIAC_TEST_CONFIG")
    assert app.conf.task_default_queue == "from-envvar"


def test_config_from_envvar_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CELERIAC_TEST_CONFIG", raising=False)
    app = Celery("t", set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match="CELERIAC_TEST_CONFIG"):
        app.config_from_envvar("CELERIAC_TEST_CONFIG")
    app.config_from_envvar("CELERIAC_TEST_CONFIG", silent=True)
    assert app.conf.task_default_queue == "celery"


def test_environment_urls_override_sources_but_not_the_constructor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CELERIAC_BROKER_URL", "memory://env")
    monkeypatch.setenv("CELERIAC_RESULT_BACKEND", "memory://env-results")
    app = Celery("t", set_as_current=False)
    app.config_from_object(PlainConfig)
    assert app.conf.broker_url == "memory://env"
    assert app.conf.result_backend == "memory://env-results"
    app2 = Celery("t", broker="memory://ctor", set_as_current=False)
    assert app2.conf.broker_url == "memory://ctor"
    assert app2.conf.result_backend == "memory://env-results"


def test_celerys_environment_urls_are_read_and_ours_win(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CELERIAC_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERIAC_RESULT_BACKEND", raising=False)
    monkeypatch.setenv("CELERY_BROKER_URL", "memory://celery-env")
    monkeypatch.setenv("CELERY_RESULT_BACKEND", "memory://celery-results")
    app = Celery("t", set_as_current=False)
    app.config_from_object(PlainConfig)
    assert app.conf.broker_url == "memory://celery-env"
    assert app.conf.result_backend == "memory://celery-results"
    monkeypatch.setenv("CELERIAC_BROKER_URL", "memory://ours")
    app2 = Celery("t", set_as_current=False)
    assert app2.conf.broker_url == "memory://ours"
    assert app2.conf.result_backend == "memory://celery-results"


def test_add_defaults() -> None:
    app = Celery("t", set_as_current=False)
    app.add_defaults({"task_default_queue": "defaulted"})
    assert app.conf.task_default_queue == "defaulted"


def test_settings_module_objects_are_skipped() -> None:
    mod = types.ModuleType("cfg_with_imports")
    mod.os = sys  # type: ignore[attr-defined]  # a module attribute is never a setting
    mod.task_default_queue = "modq"  # type: ignore[attr-defined]
    app = Celery("t", set_as_current=False)
    app.config_from_object(mod)
    assert app.conf.task_default_queue == "modq"
    assert "os" not in app.conf


# -- Celery's old upper-case names ------------------------------------------------------------


class OldStyleConfig:
    BROKER_URL = "memory://old-style"
    CELERY_RESULT_BACKEND = "memory://old-results"
    CELERY_ALWAYS_EAGER = True
    CELERYD_CONCURRENCY = 3
    CELERY_TASK_RESULT_EXPIRES = 120
    CELERYD_TASK_TIME_LIMIT = 30
    CELERY_ROUTES = {"a.b": "q"}
    CELERYBEAT_SCHEDULE: dict[str, object] = {}
    SOME_CONSTANT = "not a setting"  # other upper-case names are left alone


def test_old_style_setting_names_are_read() -> None:
    app = Celery("t", set_as_current=False)
    app.config_from_object(OldStyleConfig)
    conf = app.conf
    assert conf.broker_url == "memory://old-style"
    assert conf.result_backend == "memory://old-results"
    assert conf.task_always_eager is True
    assert conf.worker_concurrency == 3
    assert conf.result_expires == 120
    assert conf.task_time_limit == 30
    assert conf.task_routes == {"a.b": "q"}
    assert conf.beat_schedule == {}
    assert "SOME_CONSTANT" not in conf


def test_old_and_new_names_together_new_wins() -> None:
    app = Celery("t", set_as_current=False)
    app.config_from_object({"CELERY_DEFAULT_QUEUE": "old", "task_default_queue": "new"})
    assert app.conf.task_default_queue == "new"


def test_old_names_on_app_conf_and_the_constructor() -> None:
    app = Celery("t", broker=mem(), CELERY_ALWAYS_EAGER=True, set_as_current=False)
    assert app.conf.task_always_eager is True
    app.conf.CELERY_EAGER_PROPAGATES_EXCEPTIONS = True
    assert app.conf.task_eager_propagates is True
    assert app.conf["CELERY_EAGER_PROPAGATES_EXCEPTIONS"] is True
    with pytest.raises(ImproperlyConfigured, match="worker_concurrency='many'"):
        app.conf.CELERYD_CONCURRENCY = "many"
