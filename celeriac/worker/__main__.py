"""The worker process without the command line: ``celeriac worker`` execs into this.

Why: click and the command modules cost ~1 MB in the supervisor and again in every forked
child (RSS counts inherited pages in each process). ``celeriac worker`` parses and checks its
options with click, then replaces itself (same pid, same environment) with
``python -m celeriac.worker``, which reads the options from ``CELERIAC_WORKER_OPTIONS`` (JSON)
and runs the supervisor. The rest of ``sys.argv`` is only there so ``ps`` shows the command.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

OPTIONS_ENV = "CELERIAC_WORKER_OPTIONS"


def exec_worker(options: dict[str, Any], shown_args: list[str]) -> None:
    """Replace this process with a lean worker running ``options`` (never returns)."""
    # The interpreter's own flags (-u, -O, -X dev, -W ...) carry over, as multiprocessing
    # passes them to the interpreters it starts.
    from subprocess import _args_from_interpreter_flags  # type: ignore[attr-defined]

    env = dict(os.environ)
    env[OPTIONS_ENV] = json.dumps(options)
    sys.stdout.flush()
    sys.stderr.flush()
    flags = _args_from_interpreter_flags()
    if "-u" in _interpreter_options():  # not among the flags that function knows
        flags.append("-u")
    argv = [sys.executable, *flags, "-m", "celeriac.worker", *shown_args]
    os.execve(sys.executable, argv, env)


def _interpreter_options() -> list[str]:
    """The options given to the interpreter itself (before ``-m``/``-c`` or the script)."""
    options: list[str] = []
    for arg in sys.orig_argv[1:]:
        if arg in ("-m", "-c") or not arg.startswith("-"):
            break
        options.append(arg)
    return options


def setup_logging(app: Any, level: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r} (-l/--loglevel)")
    if app.conf.worker_hijack_root_logger:
        logging.basicConfig(level=numeric, format=app.conf.worker_log_format, force=True)
    logging.getLogger("celeriac").setLevel(numeric)


def run(options: dict[str, Any]) -> int:
    """Load the app named by ``options["app"]``, apply the overrides, run the supervisor."""
    from celeriac.cli.appspec import find_app

    app = find_app(options["app"])
    if options.get("broker"):
        app.conf.broker_url = options["broker"]
    if options.get("backend"):
        app.conf.result_backend = options["backend"]
    setup_logging(app, options.get("loglevel") or "WARNING")
    if options.get("pool"):
        app.conf.worker_pool = options["pool"]
    supervisor = app.Worker(**options.get("worker", {}))
    return int(supervisor.start())


def main() -> None:
    raw = os.environ.pop(OPTIONS_ENV, None)
    if raw is None:
        sys.stderr.write("Error: start a worker with `celeriac -A proj worker`\n")
        sys.exit(2)
    try:
        code = run(json.loads(raw))
    except KeyboardInterrupt:  # before the supervisor's own handlers are in place
        sys.stderr.write("Aborted!\n")
        sys.exit(1)
    except Exception as exc:
        from celeriac.cli.appspec import one_line

        line = one_line(exc)
        if line is None:
            raise
        sys.stderr.write(f"Error: {line}\n")
        sys.exit(1)
    sys.exit(code)


if __name__ == "__main__":
    main()
