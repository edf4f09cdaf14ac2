"""The command line, run as real processes (``python -m celeriac`` and the console script)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from celeriac import states
from tests.apps import api
from tests.apps.proj.celery import app as proj_app
from tests.conftest import ROOT, bind_app, wait_for

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SCRIPT = Path(sys.executable).parent / "celeriac"


def run(*args: str, cwd: Path, input: str | None = None, script: bool = False,
        env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [str(SCRIPT)] if script else [sys.executable, "-m", "celeriac"]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("CELERIAC_BROKER_URL", None)
    full_env.pop("CELERIAC_RESULT_BACKEND", None)
    full_env.pop("CELERIAC_APP", None)
    full_env.update(env or {})
    return subprocess.run([*cmd, *args], cwd=cwd, env=full_env, input=input, text=True,
                          capture_output=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{output}"
    assert lines[0].startswith("Error: "), output
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# -- help ------------------------------------------------------------------------------------


SUBCOMMANDS = [["worker"], ["call"], ["result"], ["purge"], ["revoke"], ["deadletters"],
               ["deadletters", "list"], ["deadletters", "replay"], ["deadletters", "purge"]]


def test_main_help_lists_every_command(tmp_path: Path) -> None:
    for script in (False, True):
        out = ok(run("--help", cwd=tmp_path, script=script))
        assert out.startswith("Usage: celeriac [OPTIONS] COMMAND [ARGS]...")
        for command in ("worker", "call", "result", "purge", "revoke", "deadletters"):
            assert re.search(rf"^\s+{command}\s", out, re.M), command
        assert "-A, --app" in out
    assert ok(run("-h", cwd=tmp_path)) == ok(run("--help", cwd=tmp_path))
    assert re.match(r"celeriac, version \d", ok(run("--version", cwd=tmp_path)))


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_subcommand_help(tmp_path: Path, command: list[str]) -> None:
    out = ok(run(*command, "--help", cwd=tmp_path))
    assert out.startswith(f"Usage: celeriac {' '.join(command)} ")
    assert "--help" in out


def test_worker_help_names_its_options(tmp_path: Path) -> None:
    out = ok(run("worker", "--help", cwd=tmp_path, script=True))
    for option in ("-c, --concurrency", "-Q, --queues", "-P, --pool", "-l, --loglevel",
                   "--max-tasks-per-child", "-n, --hostname"):
        assert option in out


# -- finding the app -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["tests.apps.api", "tests.apps.api:app", "tests.apps.api.app"])
def test_app_spec_forms(tmp_path: Path, db_url: str, spec: str) -> None:
    out = ok(run("-A", spec, "-b", db_url, "call", "tests.apps.api.add", "--args", "[1, 2]",
                 cwd=tmp_path))
    task_id = out.strip()
    assert UUID_RE.match(task_id)
    app = bind_app(api.app, db_url)
    consumer = app.broker.consumer(["celery"])
    got = consumer.fetch(10, 0)
    consumer.ack(got)
    assert [d.message.id for d in got] == [task_id]
    assert got[0].message.headers["task"] == "tests.apps.api.add"


def test_app_in_a_packages_celery_module(tmp_path: Path, db_url: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    # The worker runs `-A tests.apps.proj`: the app is in tests/apps/proj/celery.py and
    # finds tests/apps/proj/tasks.py by autodiscover_tasks.
    app = bind_app(proj_app, db_url)
    assert app.main == "tests.apps.proj"
    start_worker(app)
    out = ok(run("-A", "tests.apps.proj", "-b", db_url, "call", "tests.apps.proj.tasks.mul",
                 "--args", "[3, 4]", "--wait", "--timeout", "30", cwd=tmp_path))
    assert json.loads(out)["result"] == 12


def test_app_from_the_environment(tmp_path: Path, db_url: str) -> None:
    out = ok(run("-b", db_url, "call", "tests.apps.api.add", "--args", "[1, 1]", cwd=tmp_path,
                 env={"CELERIAC_APP": "tests.apps.api"}))
    assert UUID_RE.match(out.strip())


def test_broker_from_the_environment(tmp_path: Path, db_url: str) -> None:
    out = ok(run("-A", "tests.apps.api", "call", "tests.apps.api.add", "--args", "[1, 1]",
                 cwd=tmp_path, env={"CELERIAC_BROKER_URL": db_url}))
    app = bind_app(api.app, db_url)
    assert app.broker.queue_size("celery") == 1
    assert UUID_RE.match(out.strip())


# -- call, result ----------------------------------------------------------------------------


def test_call_with_a_worker_prints_the_result(tmp_path: Path, db_url: str,
                                              start_worker) -> None:  # type: ignore[no-untyped-def]
    app = bind_app(api.app, db_url)
    start_worker(app)
    out = ok(run("-A", "tests.apps.api", "-b", db_url, "call", "tests.apps.api.add",
                 "--args", "[2, 3]", "--wait", "--timeout", "30", cwd=tmp_path, script=True))
    doc = json.loads(out)
    assert doc["state"] == "SUCCESS" and doc["result"] == 5 and UUID_RE.match(doc["id"])
    assert app.AsyncResult(doc["id"]).get(timeout=5) == 5

    out = ok(run("-A", "tests.apps.api", "-b", db_url, "call", "tests.apps.api.echo",
                 "-a", '["a"]', "-k", '{"b": [1, 2]}', "--wait", cwd=tmp_path))
    assert json.loads(out)["result"] == {"args": ["a"], "kwargs": {"b": [1, 2]}}

    failed = run("-A", "tests.apps.api", "-b", db_url, "call", "tests.apps.api.raise_builtin",
                 "--args", '["KeyError", "nope"]', "--wait", "--timeout", "30", cwd=tmp_path)
    assert failed.returncode == 1
    doc = json.loads(failed.stdout)
    assert doc["state"] == "FAILURE" and doc["result"] == "KeyError: 'nope'"
    assert "Traceback" not in failed.stdout + failed.stderr

    # `result ID` shows what is stored.
    out = ok(run("-A", "tests.apps.api", "-b", db_url, "result", doc["id"], cwd=tmp_path))
    shown = json.loads(out)
    assert shown["state"] == "FAILURE" and shown["id"] == doc["id"]
    assert shown["result"] == {"exc_type": "KeyError", "exc_message": ["nope"],
                               "exc_module": "builtins"}
    shown_tb = run("-A", "tests.apps.api", "-b", db_url, "result", "--traceback", doc["id"],
                   cwd=tmp_path)
    assert shown_tb.returncode == 0
    assert "Traceback (most recent call last)" in shown_tb.stdout  # the task's, as asked
    assert "KeyError: 'nope'" in shown_tb.stdout.splitlines()[-1]


def test_call_without_a_worker_prints_an_id(tmp_path: Path, db_url: str) -> None:
    out = ok(run("-A", "tests.apps.api", "-b", db_url, "call", "tests.apps.api.add",
                 "--args", "[2, 3]", "--countdown", "60", "--expires", "120", "--queue", "q2",
                 "--priority", "5", cwd=tmp_path))
    task_id = out.strip()
    assert UUID_RE.match(task_id) and out.count("\n") == 1
    app = bind_app(api.app, db_url)
    assert app.broker.queue_size("q2") == 1
    assert app.AsyncResult(task_id).state == states.PENDING
    out = ok(run("-A", "tests.apps.api", "-b", db_url, "result", task_id, cwd=tmp_path))
    assert json.loads(out) == {"id": task_id, "state": "PENDING", "result": None,
                               "date_done": None}


def test_call_wait_timeout_is_one_line(tmp_path: Path, db_url: str) -> None:
    proc = run("-A", "tests.apps.api", "-b", db_url, "call", "tests.apps.api.add", "--args",
               "[1, 1]", "--wait", "--timeout", "0.5", cwd=tmp_path)
    one_line_error(proc, "TimeoutError", "task id")


# -- purge, revoke ------------------------------------------------------------------------------


def test_purge(tmp_path: Path, db_url: str) -> None:
    app = bind_app(api.app, db_url)
    for _ in range(3):
        api.add.delay(1, 1)
    api.add.apply_async((1, 1), queue="other")
    base = ["-A", "tests.apps.api", "-b", db_url]
    refused = run(*base, "purge", input="n\n", cwd=tmp_path)
    assert refused.returncode != 0 and "Traceback" not in refused.stdout + refused.stderr
    assert app.broker.queue_size("celery") == 3
    out = ok(run(*base, "purge", "-f", cwd=tmp_path))
    assert out.strip() == "Purged 3 messages from 1 queue(s)."
    assert app.broker.queue_size("celery") == 0 and app.broker.queue_size("other") == 1
    out = ok(run(*base, "purge", "-Q", "other,celery", input="y\n", cwd=tmp_path))
    assert "Purged 1 messages from 2 queue(s)." in out
    assert app.broker.queue_size("other") == 0


def test_revoke(tmp_path: Path, db_url: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    app = bind_app(api.app, db_url)
    doomed = api.add.apply_async((1, 1), countdown=1)
    kept = api.add.apply_async((2, 2), countdown=1)
    out = ok(run("-A", "tests.apps.api", "-b", db_url, "revoke", doomed.id, cwd=tmp_path))
    assert out.strip() == "Revoked 1 task(s)."
    assert doomed.state == states.REVOKED
    worker = start_worker(app)  # started after the revoke: it still honours it
    assert kept.get(timeout=30) == 4
    wait_for(lambda: f"Discarding revoked task: tests.apps.api.add[{doomed.id}]" in worker.log(),
             timeout=30, message="the worker to discard the revoked task")
    assert doomed.state == states.REVOKED
    with pytest.raises(Exception, match="revoked"):
        doomed.get(timeout=1)


# -- dead letters -------------------------------------------------------------------------------


def test_deadletters_list_replay_purge(tmp_path: Path, db_url: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    app = bind_app(api.app, db_url)
    base = ["-A", "tests.apps.api", "-b", db_url]
    worker = start_worker(app)
    ids = [ok(run(*base, "call", f"tests.apps.nowhere.task{i}", cwd=tmp_path)).strip()
           for i in range(2)]
    wait_for(lambda: len(app.broker.dead_letters()) == 2, timeout=30,
             message="the worker to dead-letter both messages")
    assert worker.stop() == 0

    listed = run(*base, "deadletters", "list", cwd=tmp_path)
    lines = ok(listed).splitlines()
    assert len(lines) == 2 and "2 dead letter(s)." in listed.stderr
    rows = [json.loads(line) for line in ok(run(*base, "deadletters", "list", "--json",
                                                cwd=tmp_path)).splitlines()]
    assert sorted(r["task_id"] for r in rows) == sorted(ids)
    for row in rows:
        assert row["queue"] == "celery" and row["task"].startswith("tests.apps.nowhere.task")
        assert "unknown task" in row["reason"]
        assert row["content_type"] == "application/json"
    # The client sees the failure Celery would store: NotRegistered.
    with pytest.raises(Exception) as info:
        app.AsyncResult(ids[0]).get(timeout=5)
    assert type(info.value).__name__ == "NotRegistered"

    by_task = {r["task_id"]: r["id"] for r in rows}
    replayed, purged = by_task[ids[0]], by_task[ids[1]]
    out = ok(run(*base, "deadletters", "replay", replayed, cwd=tmp_path))
    assert out.strip() == "Replayed 1 message(s)."
    assert app.broker.queue_size("celery") == 1
    consumer = app.broker.consumer(["celery"])
    back = consumer.fetch(10, 0)
    consumer.reject(back, requeue=True)
    consumer.close()
    assert [d.message.id for d in back] == [ids[0]]

    out = ok(run(*base, "deadletters", "purge", purged, cwd=tmp_path))
    assert out.strip() == "Deleted 1 dead letter(s)."
    assert app.broker.dead_letters() == []
    empty = run(*base, "deadletters", "list", cwd=tmp_path)
    assert ok(empty) == "" and "0 dead letter(s)." in empty.stderr

    # Replay --all puts it back in front of a worker, which dead-letters it again.
    out = ok(run(*base, "purge", "-f", cwd=tmp_path))
    assert "Purged 1 messages" in out
    app.send_task("tests.apps.nowhere.again")
    start_worker(app)
    wait_for(lambda: len(app.broker.dead_letters()) == 1, timeout=30, message="a dead letter")
    assert ok(run(*base, "deadletters", "replay", "--all", cwd=tmp_path)).strip() == (
        "Replayed 1 message(s).")
    wait_for(lambda: len(app.broker.dead_letters()) == 1, timeout=30,
             message="the replayed message to be dead-lettered again")
    assert ok(run(*base, "deadletters", "purge", "--all", cwd=tmp_path)).strip() == (
        "Deleted 1 dead letter(s).")
    assert app.broker.dead_letters() == []


def test_deadletters_replay_and_purge_need_ids_or_all(tmp_path: Path, db_url: str) -> None:
    for verb in ("replay", "purge"):
        proc = run("-A", "tests.apps.api", "-b", db_url, "deadletters", verb, cwd=tmp_path)
        assert proc.returncode == 2 and "--all" in proc.stderr
        assert "Traceback" not in proc.stderr


# -- errors: one clear line, no traceback ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["-A", "no_such_module_here", "call", "x"], ["-A no_such_module_here", "cannot import"]),
        (["-A", "tests.apps.api:nothing", "call", "x"], ["'nothing' is not a celeriac app"]),
        (["-A", "tests.apps.api:add", "call", "x"], ["'add' is not a celeriac app"]),
        (["-A", "tests.apps.discover_empty", "call", "x"], ["no celeriac app found"]),
        (["-A", "tests.apps.badconf", "call", "x"],
         ["ImproperlyConfigured", "task_acks_lates", "did you mean 'task_acks_late'"]),
        (["-A", "tests.apps.api", "-b", "bogus://nowhere", "call", "x"],
         ["ImproperlyConfigured", "broker_url='bogus://nowhere'", "unknown scheme"]),
        (["-A", "tests.apps.api", "--result-backend", "bogus://r", "call", "x", "--wait"],
         ["result_backend='bogus://r'"]),
        (["call", "x"], ["no app given"]),
    ],
)
def test_errors_are_one_line(tmp_path: Path, db_url: str, args: list[str],
                             needles: list[str]) -> None:
    args = [a if a != "DB" else db_url for a in args]
    if "-b" not in args:
        args = [*args[:2], "-b", db_url, *args[2:]] if args[0] == "-A" else args
    one_line_error(run(*args, cwd=tmp_path), *needles)


@pytest.mark.parametrize(
    ("option", "value", "needles"),
    [
        ("--args", "[2,", ["--args", "not valid JSON"]),
        ("--args", '{"x": 1}', ["--args", "must be a JSON list"]),
        ("--kwargs", "[1]", ["--kwargs", "must be a JSON object"]),
        ("--kwargs", "{x: 1}", ["--kwargs", "not valid JSON"]),
    ],
)
def test_bad_json_arguments_are_one_line(tmp_path: Path, db_url: str, option: str, value: str,
                                         needles: list[str]) -> None:
    proc = run("-A", "tests.apps.api", "-b", db_url, "call", "tests.apps.api.add", option, value,
               cwd=tmp_path)
    one_line_error(proc, *needles)
    assert not (tmp_path / "celeriac.db").exists()


def test_bad_setting_from_the_environment(tmp_path: Path) -> None:
    proc = run("-A", "tests.apps.api", "call", "x", cwd=tmp_path,
               env={"CELERIAC_BROKER_URL": "nope://x"})
    one_line_error(proc, "broker_url='nope://x'")


def test_app_module_that_fails_to_import(tmp_path: Path) -> None:
    (tmp_path / "broken_app_module.py").write_text(
        "from celeriac import Celery\napp = Celery('x')\nraise RuntimeError('module is broken')\n")
    proc = run("-A", "broken_app_module", "call", "x", cwd=tmp_path)
    line = one_line_error(proc, "broken_app_module", "RuntimeError: module is broken")
    assert "broken_app_module.py:3" in line
    (tmp_path / "bad_import_module.py").write_text("import a_dependency_that_is_missing\n")
    proc = run("-A", "bad_import_module", "call", "x", cwd=tmp_path)
    one_line_error(proc, "cannot import 'a_dependency_that_is_missing'")


@pytest.mark.parametrize("script", [False, True])
def test_worker_errors_are_one_line(tmp_path: Path, db_url: str, script: bool) -> None:
    # The worker command runs in the process it execs into (celeriac.worker): its errors
    # read as the other commands' do.
    (tmp_path / "broken_app_module.py").write_text(
        "from celeriac import Celery\napp = Celery('x')\nraise RuntimeError('module is broken')\n")
    one_line_error(run("-A", "broken_app_module", "worker", cwd=tmp_path, script=script),
                   "RuntimeError: module is broken", "broken_app_module.py:3")
    one_line_error(run("-A", "no_such_module", "worker", cwd=tmp_path, script=script),
                   "cannot import 'no_such_module'")
    one_line_error(run("-A", "tests.apps.api", "-b", "nope://x", "worker", cwd=tmp_path,
                       script=script), "nope://x")
    # A bad option is a usage error, checked before the exec: click's usage lines + error.
    bad = run("-A", "tests.apps.api", "-b", db_url, "worker", "-l", "LOUD", cwd=tmp_path,
              script=script)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "Error: Invalid value for -l/--loglevel: unknown log level 'LOUD'" in bad.stderr


def test_the_worker_keeps_the_interpreters_flags(tmp_path: Path, db_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CELERIAC_WORKER_OPTIONS", None)
    proc = subprocess.Popen(
        [sys.executable, "-u", "-X", "dev", "-m", "celeriac", "-A", "tests.apps.api", "-b",
         db_url, "worker", "-c", "1"], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def execd() -> list[str] | None:
            cmdline = psutil.Process(proc.pid).cmdline()
            return cmdline if "celeriac.worker" in cmdline else None

        cmdline = wait_for(execd, 20, message="the worker to exec into celeriac.worker")
        assert isinstance(cmdline, list)
        assert "-u" in cmdline and "dev" in cmdline
        assert cmdline[-5:] == ["-b", db_url, "worker", "-c", "1"]  # what ps shows
    finally:
        proc.terminate()
        proc.wait(20)


def test_unexpected_errors_are_one_line_unless_asked(tmp_path: Path, db_url: str) -> None:
    args = ("-A", "tests.apps.badrouter", "-b", db_url, "call", "some.task")
    one_line_error(run(*args, cwd=tmp_path), "RuntimeError: router exploded on some.task",
                   "CELERIAC_TRACEBACK=1")
    shown = run(*args, cwd=tmp_path, env={"CELERIAC_TRACEBACK": "1"})
    assert shown.returncode != 0
    assert "Traceback (most recent call last)" in shown.stderr
    assert "exploding_router" in shown.stderr


def test_console_script_finds_an_app_in_the_working_directory(tmp_path: Path) -> None:
    proj = tmp_path / "proj_dir"
    proj.mkdir()
    (proj / "localapp.py").write_text(
        "from celeriac import Celery\n"
        "app = Celery('localapp', broker='sqlite:///local.db')\n"
        "@app.task\n"
        "def hello():\n"
        "    return 'hi'\n")
    out = ok(run("-A", "localapp", "call", "localapp.hello", cwd=proj, script=True))
    assert UUID_RE.match(out.strip())
    assert (proj / "local.db").exists()
    # --workdir changes directory first.
    out = ok(run("--workdir", str(proj), "-A", "localapp", "call", "localapp.hello",
                 cwd=tmp_path, script=True))
    assert UUID_RE.match(out.strip())
    assert not (tmp_path / "local.db").exists()
