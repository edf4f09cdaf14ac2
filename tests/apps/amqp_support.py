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


class TcpProxy:
    """A TCP relay on 127.0.0.1 to RabbitMQ that a test can cut (all connections at once).

    ``cut()`` closes every relayed connection (both ends see it drop); new connections are
    accepted again at once. ``refuse(True)`` makes it close new connections immediately.
    """

    def __init__(self, target: tuple[str, int] = (HOST, PORT)) -> None:
        self.target = target
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._refusing = False
        self.cuts = 0
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True, name="tcp-proxy").start()

    def url(self, vhost_name: str, query: str = "") -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost_name}" + (
            f"?{query}" if query else "")

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> int:
        """Drop every relayed connection now; returns how many."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self.cuts += 1
        for client, upstream in pairs:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        return len(pairs)

    def refuse(self, on: bool) -> None:
        self._refusing = on

    def close(self) -> None:
        self._closed = True
        self._server.close()
        self.cut()
