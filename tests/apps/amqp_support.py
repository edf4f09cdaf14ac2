"""RabbitMQ for tests: a private vhost per test, made in batches, all deleted at exit.

RabbitMQ must be running on 127.0.0.1:5672 (guest/guest); if it is not, tests fail (they
do not skip). ``rabbitmqctl`` costs half a second a call, so vhosts are made 16 at a time
with one ``rabbitmqctl eval``, and deleted together when the test process exits.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import threading
import uuid

from tests import tcp_proxy

HOST, PORT = "127.0.0.1", 5672
_lock = threading.Lock()
_spare: list[str] = []
_made: list[str] = []
_run = uuid.uuid4().hex[:8]
_counter = [0]


def _binary(names: list[str]) -> str:
    return "[" + ", ".join(f'<<"{n}">>' for n in names) + "]"


def rabbitmqctl_eval(code: str, timeout: float = 60) -> str:
    try:
        out = subprocess.run(["rabbitmqctl", "-q", "eval", code], capture_output=True,
                             text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise RuntimeError("rabbitmqctl is not installed: these tests need RabbitMQ") from exc
    if out.returncode != 0:
        raise RuntimeError(
            f"rabbitmqctl eval failed ({out.returncode}): {out.stderr or out.stdout}")
    return out.stdout.strip()


def rabbitmqctl_rows(*args: str) -> list[list[str]]:
    """``rabbitmqctl -q ARGS`` (a ``list_*`` command): its rows, split on tabs, without
    the header line. About 0.5 s per call."""
    out = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                         check=True, timeout=60)
    return [line.split("\t") for line in out.stdout.splitlines()[1:]]


def check_server() -> None:
    try:
        socket.create_connection((HOST, PORT), timeout=2).close()
    except OSError as exc:
        raise RuntimeError(
            f"RabbitMQ is not reachable on {HOST}:{PORT} ({exc}); start it with "
            "`rabbitmq-server -detached && rabbitmqctl await_startup`"
        ) from exc


def make_vhosts(names: list[str]) -> None:
    rabbitmqctl_eval(
        "lists:foreach(fun(V) -> rabbit_vhost:add(V, <<\"celeriac-tests\">>), "
        "rabbit_auth_backend_internal:set_permissions(<<\"guest\">>, V, <<\".*\">>, "
        "<<\".*\">>, <<\".*\">>, <<\"celeriac-tests\">>) end, " + _binary(names) + "), ok."
    )


def delete_vhosts(names: list[str]) -> None:
    if names:
        rabbitmqctl_eval(
            "lists:foreach(fun(V) -> catch rabbit_vhost:delete(V, <<\"celeriac-tests\">>) end, "
            + _binary(names) + "), ok."
        )


def delete_stale_vhosts() -> None:
    """Delete test vhosts whose test process is gone (killed before its clean-up ran)."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_vhosts", "name"], capture_output=True,
                         text=True, timeout=60)
    stale = []
    for name in out.stdout.split():
        parts = name.split("-")
        if name.startswith("celeriac-test-") and len(parts) == 5 and parts[3].isdigit():
            pid = int(parts[3])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                stale.append(name)
            except PermissionError:
                pass
    delete_vhosts(stale)


def vhost() -> str:
    """A fresh, empty vhost (deleted when this process exits)."""
    with _lock:
        if not _spare:
            check_server()
            if not _made:
                delete_stale_vhosts()
            batch = []
            for _ in range(16):
                _counter[0] += 1
                batch.append(f"celeriac-test-{_run}-{os.getpid()}-{_counter[0]}")
            make_vhosts(batch)
            _made.extend(batch)
            _spare.extend(reversed(batch))
        return _spare.pop()


def url(vhost_name: str | None = None, query: str = "") -> str:
    name = vhost_name or vhost()
    return f"amqp://guest:guest@{HOST}:{PORT}/{name}" + (f"?{query}" if query else "")


def _cleanup() -> None:
    with _lock:
        names, _made[:] = list(_made), []
        _spare.clear()
    if names:
        try:
            delete_vhosts(names)
        except Exception as exc:  # at exit: report, do not raise
            print(f"could not delete test vhosts {names}: {exc}")


atexit.register(_cleanup)


class TcpProxy(tcp_proxy.CuttingProxy):
    """A cutting TCP relay to RabbitMQ (tests/tcp_proxy.py)."""

    def __init__(self, target: tuple[str, int] = (HOST, PORT)) -> None:
        super().__init__(target[1], target[0])

    def url(self, vhost_name: str, query: str = "") -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost_name}" + (
            f"?{query}" if query else "")
