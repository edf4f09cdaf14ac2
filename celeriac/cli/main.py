"""``celeriac -A proj worker|call|result|purge|revoke|deadletters``.

Errors print one line naming the problem, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from celeriac.app import Celery
from celeriac.cli.appspec import AppNotFound, find_app, one_line
from celeriac.exceptions import CeleriacError
from celeriac.worker.__main__ import exec_worker, setup_logging


def _app(ctx: click.Context) -> Celery:
    app: Celery | None = ctx.obj.get("app_instance")
    if app is None:
        spec = ctx.obj.get("app")
        if not spec:
            raise click.ClickException("no app given: use -A/--app module[:attribute]")
        try:
            app = find_app(spec)
        except AppNotFound as exc:
            raise click.ClickException(str(exc)) from None
        if ctx.obj.get("broker"):
            app.conf.broker_url = ctx.obj["broker"]
        if ctx.obj.get("backend"):
            app.conf.result_backend = ctx.obj["backend"]
        ctx.obj["app_instance"] = app
    return app


class FriendlyGroup(click.Group):
    """Turns our errors into one clear line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            line = one_line(exc)
            if line is None:
                raise
            raise click.ClickException(line) from None


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-A", "--app", "app_spec", envvar="CELERIAC_APP",
              help="The app: module, module:attribute or package.")
@click.option("-b", "--broker", help="Broker URL (overrides broker_url).")
@click.option("--result-backend", help="Result backend URL (overrides result_backend).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Change to this directory first.")
@click.version_option(package_name="celeriac")
@click.pass_context
def cli(ctx: click.Context, app_spec: str | None, broker: str | None,
        result_backend: str | None, workdir: str | None) -> None:
    """celeriac: a distributed task queue that speaks Celery's protocol."""
    if workdir:
        os.chdir(workdir)
    ctx.ensure_object(dict)
    ctx.obj.update(app=app_spec, broker=broker, backend=result_backend)


def check_loglevel(level: str) -> str:
    if not isinstance(logging.getLevelName(level.upper()), int):
        raise click.BadParameter(f"unknown log level {level!r}", param_hint="-l/--loglevel")
    return level


@cli.command()
@click.option("-c", "--concurrency", type=click.IntRange(min=1),
              help="Child processes (threads with --pool threads). Default: CPU count.")
@click.option("-Q", "--queues", help="Comma-separated queues to consume (default: every "
              "task_queues entry, or the default queue).")
@click.option("-n", "--hostname", help="Node name, e.g. w1@%h.")
@click.option("-l", "--loglevel", default="WARNING", show_default=True,
              help="DEBUG, INFO, WARNING, ERROR or CRITICAL.")
@click.option("-P", "--pool", type=click.Choice(["prefork", "threads", "solo"]),
              help="How tasks run (default: prefork).")
@click.option("--prefetch-multiplier", type=click.IntRange(min=1),
              help="Messages fetched per free slot.")
@click.option("--max-tasks-per-child", type=click.IntRange(min=1),
              help="Replace a child after this many tasks.")
@click.option("--max-memory-per-child", type=click.IntRange(min=1),
              help="Replace a child whose RSS passes this many KiB.")
@click.option("-O", "optimization", help="Accepted for Celery compatibility; ignored.")
@click.option("-E", "--task-events", is_flag=True, help="Accepted for Celery compatibility.")
@click.pass_context
def worker(ctx: click.Context, concurrency: int | None, queues: str | None,
           hostname: str | None, loglevel: str, pool: str | None,
           prefetch_multiplier: int | None, max_tasks_per_child: int | None,
           max_memory_per_child: int | None, optimization: str | None,
           task_events: bool) -> None:
    """Start a worker: a supervisor and its child processes."""
    check_loglevel(loglevel)
    options: dict[str, Any] = {
        "app": ctx.obj.get("app"), "broker": ctx.obj.get("broker"),
        "backend": ctx.obj.get("backend"), "loglevel": loglevel, "pool": pool,
        "worker": {"concurrency": concurrency, "queues": queues, "hostname": hostname,
                   "prefetch_multiplier": prefetch_multiplier,
                   "max_tasks_per_child": max_tasks_per_child,
                   "max_memory_per_child": max_memory_per_child},
    }
    if ctx.obj.get("may_exec") and options["app"] and sys.executable:
        # The worker runs without click in memory (celeriac/worker/__main__.py says why).
        exec_worker(options, sys.argv[1:])
    app = _app(ctx)
    setup_logging(app, loglevel)
    if pool:
        app.conf.worker_pool = pool
    sys.exit(app.Worker(**options["worker"]).start())


def _json_option(value: str | None, name: str, kind: type) -> Any:
    if value is None:
        return kind()
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"{name} {value!r}: not valid JSON ({exc})") from None
    if not isinstance(parsed, kind):
        what = "list, e.g. '[2, 3]'" if kind is list else 'object, e.g. \'{"x": 1}\''
        raise click.ClickException(f"{name} {value!r}: must be a JSON {what}")
    return parsed


@cli.command()
@click.argument("name")
@click.option("-a", "--args", help='Positional arguments as a JSON list, e.g. \'[2, 3]\'.')
@click.option("-k", "--kwargs", help='Keyword arguments as a JSON object.')
@click.option("--countdown", type=float, help="Run no sooner than this many seconds from now.")
@click.option("--expires", type=float, help="Discard if not started within this many seconds.")
@click.option("--queue", help="Queue to send to.")
@click.option("--priority", type=int)
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after seconds.")
@click.pass_context
def call(ctx: click.Context, name: str, args: str | None, kwargs: str | None,
         countdown: float | None, expires: float | None, queue: str | None,
         priority: int | None, wait: bool, timeout: float | None) -> None:
    """Send task NAME; prints its id (or its result with --wait)."""
    app = _app(ctx)
    result = app.send_task(
        name, _json_option(args, "--args", list), _json_option(kwargs, "--kwargs", dict),
        countdown=countdown, expires=expires, queue=queue, priority=priority,
    )
    if not wait:
        click.echo(result.id)
        return
    try:
        value = result.get(timeout=timeout, propagate=False)
    except CeleriacError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc} (task id {result.id})") from None
    state = result.state
    click.echo(json.dumps({"id": result.id, "state": state, "result": _printable(value)},
                          default=str))
    if state != "SUCCESS":
        sys.exit(1)


def _printable(value: Any) -> Any:
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    return value


@cli.command()
@click.argument("task_id")
@click.option("--traceback", "show_traceback", is_flag=True,
              help="Show the traceback of a failure.")
@click.pass_context
def result(ctx: click.Context, task_id: str, show_traceback: bool) -> None:
    """Show the state and result of TASK_ID."""
    app = _app(ctx)
    res = app.AsyncResult(task_id)
    meta = app.backend.get(task_id) or {"status": "PENDING", "result": None}
    click.echo(json.dumps({"id": task_id, "state": meta.get("status"),
                           "result": meta.get("result"), "date_done": meta.get("date_done")},
                          default=str))
    if show_traceback and res.traceback:
        click.echo(res.traceback.rstrip("\n"))


@cli.command()
@click.option("-Q", "--queues", help="Comma-separated queues (default: the default queue).")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def purge(ctx: click.Context, queues: str | None, force: bool) -> None:
    """Delete every waiting message of the queues."""
    app = _app(ctx)
    names = [q.strip() for q in (queues or app.conf.task_default_queue).split(",") if q.strip()]
    if not force and not click.confirm(f"Delete all waiting messages in {', '.join(names)}?"):
        raise click.Abort()
    total = sum(app.broker.purge(name) for name in names)
    click.echo(f"Purged {total} messages from {len(names)} queue(s).")


@cli.command()
@click.argument("task_ids", nargs=-1, required=True)
@click.option("--terminate", is_flag=True, help="Also kill the task if it is running.")
@click.pass_context
def revoke(ctx: click.Context, task_ids: Sequence[str], terminate: bool) -> None:
    """Revoke tasks on every worker (also those started later)."""
    app = _app(ctx)
    app.control.revoke(list(task_ids), terminate=terminate)
    click.echo(f"Revoked {len(task_ids)} task(s).")


@cli.group()
def deadletters() -> None:
    """List, replay or purge dead-lettered messages."""


@deadletters.command("list")
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def deadletters_list(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Show dead letters with their reasons."""
    app = _app(ctx)
    letters = app.broker.dead_letters(limit)
    for dl in letters:
        headers = dl.message.headers
        row = {"id": dl.id, "queue": dl.queue, "task": headers.get("task"),
               "task_id": dl.message.id, "reason": dl.reason, "time": dl.time,
               "content_type": dl.message.content_type, "size": len(dl.message.body)}
        if as_json:
            click.echo(json.dumps(row, default=str))
        else:
            click.echo(f"{dl.id}\t{dl.queue}\t{row['task']}\t{row['task_id']}\t{dl.reason}")
    if not as_json:
        click.echo(f"{len(letters)} dead letter(s).", err=True)


@deadletters.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
@click.pass_context
def deadletters_replay(ctx: click.Context, ids: Sequence[str], replay_all: bool) -> None:
    """Put dead letters back on their queues (IDS, or --all)."""
    if not ids and not replay_all:
        raise click.UsageError("name dead-letter ids or pass --all")
    count = _app(ctx).broker.replay_dead_letters(None if replay_all else list(ids))
    click.echo(f"Replayed {count} message(s).")


@deadletters.command("purge")
@click.argument("ids", nargs=-1)
@click.option("--all", "purge_all", is_flag=True, help="Delete every dead letter.")
@click.pass_context
def deadletters_purge(ctx: click.Context, ids: Sequence[str], purge_all: bool) -> None:
    """Delete dead letters for good (IDS, or --all)."""
    if not ids and not purge_all:
        raise click.UsageError("name dead-letter ids or pass --all")
    count = _app(ctx).broker.purge_dead_letters(None if purge_all else list(ids))
    click.echo(f"Deleted {count} dead letter(s).")


def _is_the_command() -> bool:
    """True when this process is ``celeriac ...`` or ``python -m celeriac ...``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name in ("celeriac", "celeriac.__main__"):
        return True
    return os.path.basename(sys.argv[0]) in ("celeriac", "celeriac.exe")


def main(argv: Sequence[str] | None = None, obj: Celery | None = None) -> None:
    # Only the command itself (not a script or program calling main()) may replace its
    # process: a caller's own setup would be lost.
    extra: dict[str, Any] = {"app_instance": obj} if obj is not None else {
        "may_exec": argv is None and _is_the_command()}
    cli.main(args=list(argv) if argv is not None else None, prog_name="celeriac",
             obj=extra)
