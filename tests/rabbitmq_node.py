"""A private RabbitMQ node for tests that need their own server (TLS, restarts).

The machine's RabbitMQ (127.0.0.1:5672) is never touched: a private node has its own node
name, ports (free ones from the OS: AMQP, TLS, Erlang distribution), data and log
directories, config file, enabled-plugins file, and ``HOME`` (so its own Erlang cookie,
which ``rabbitmqctl`` run with the same environment reads). It registers with the
machine's ``epmd`` under its own name. It runs ``/usr/lib/rabbitmq/bin/rabbitmq-server``
directly, as the current user: the ``/usr/sbin`` wrappers would switch to the ``rabbitmq``
user and its cookie.

Waits are on conditions (a real AMQP connection), with timeouts; a node that fails to
boot raises with the tail of its log. If the test process itself dies (even by SIGKILL),
the kernel tells the node's launcher, which shuts the node down. ``stop()`` is a clean
``rabbitmqctl stop``; ``kill()`` is SIGKILL of the node's process group (a crash). Both
keep the data directory, so ``start()`` again is a restart on the same data;
``cleanup()`` stops it and deletes the directory.

    node = RabbitNode(tmp_dir, tls=make_certs(tmp_dir))
    node.start()              # ~3-5 s
    url = node.url()          # amqp://guest:guest@127.0.0.1:<port>//
    node.kill(); node.start() # a crash and a restart
    node.cleanup()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

RABBITMQ_BIN = Path(os.environ.get("CELERIAC_TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))


def _stop_with_parent() -> None:
    """In the node's launcher: the kernel sends it SIGTERM when the test process dies
    (Linux), so a killed test run leaves no node behind. The ``rabbitmq-server`` script
    turns SIGTERM into a clean shutdown of the Erlang VM."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TLSFiles:
    ca: Path  # the CA that signed the server's and the client's certificates
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # an unrelated CA: verifying the server with it must fail


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {out.stderr}")


def make_certs(directory: Path) -> TLSFiles:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and an
    unrelated CA, made with the ``openssl`` command (EC keys: fast)."""
    d = directory / "certs"
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                 "-subj", f"/CN=celeriac test {ca}", cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                  "extendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, cn in (("server", "localhost"), ("client", "celeriac-client")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=d)
    return TLSFiles(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
                    d / "client.key", d / "other-ca.pem")


class RabbitNode:
    def __init__(self, base: Path, tls: TLSFiles | None = None,
                 name: str | None = None) -> None:
        for tool in ("rabbitmq-server", "rabbitmqctl"):
            if not (RABBITMQ_BIN / tool).exists():
                raise RuntimeError(f"{RABBITMQ_BIN / tool} not found: these tests need the "
                                   "RabbitMQ server package (apt-get install rabbitmq-server)")
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.nodename = name or f"celeriac-test-{os.getpid()}-{uuid.uuid4().hex[:6]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.tls_port = free_port() if tls else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.boots: list[float] = []  # seconds each start() took
        self._write_config()

    # -- files and environment ---------------------------------------------------------------

    def _write_config(self) -> None:
        lines = [
            f"listeners.tcp.default = 127.0.0.1:{self.port}",
            "loopback_users = none",
            "log.console = false",
            "log.file.level = info",
        ]
        if self.tls is not None:
            lines += [
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {self.tls.ca}",
                f"ssl_options.certfile = {self.tls.server_cert}",
                f"ssl_options.keyfile = {self.tls.server_key}",
                # Clients must present a certificate signed by the CA (mutual TLS).
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = true",
            ]
        (self.base / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")

    @property
    def env(self) -> dict[str, str]:
        b = self.base
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")},
            "HOME": str(b),  # its own .erlang.cookie
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(b / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(b / "node.pid"),
        }

    def url(self, vhost: str = "/", tls: bool = False) -> str:
        path = "/" if vhost == "/" else vhost
        if tls:
            return f"amqps://guest:guest@127.0.0.1:{self.tls_port}/{path}"
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{path}"

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for path in [self.base / "server.out", *sorted((self.base / "log").glob("*.log"))]:
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 90.0) -> float:
        """Boot (or boot again on the same data); returns the seconds it took."""
        assert not self.running, "already running"
        started = time.monotonic()
        out = open(self.base / "server.out", "ab")  # noqa: SIM115 - kept by the process
        try:
            self.proc = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")], env=self.env, cwd=self.base,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill() takes it all
                preexec_fn=_stop_with_parent,
            )
        finally:
            out.close()
        try:
            self._wait_ready(started + timeout)
        except BaseException:
            self.kill()
            raise
        took = time.monotonic() - started
        self.boots.append(took)
        return took

    def _wait_ready(self, deadline: float) -> None:
        """Until an AMQP connection opens (the node is fully booted), or the deadline."""
        from celeriac.brokers import amqp_client as wire

        [params] = wire.parse_url(self.url())
        params.connect_timeout = 2.0
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"RabbitMQ node {self.nodename} exited with "
                                   f"{self.proc.returncode} while booting:\n{self.log_tail()}")
            try:
                wire.Connection(params).connect().close()
                return
            except wire.AMQPError as exc:
                last = exc
                time.sleep(0.1)
        raise TimeoutError(f"RabbitMQ node {self.nodename} did not boot in time ({last}):\n"
                           f"{self.log_tail()}")

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        out = subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-q", "-n", self.nodename,
                              *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({out.returncode}): "
                               f"{out.stderr or out.stdout}")
        return out.stdout

    def add_vhost(self, name: str) -> str:
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return name

    def stop(self, timeout: float = 60.0) -> None:
        """A clean shutdown (``rabbitmqctl stop``); the data stays."""
        if not self.running:
            return
        try:
            self.ctl("stop", timeout=timeout)
            assert self.proc is not None
            self.proc.wait(timeout)
        except (RuntimeError, subprocess.TimeoutExpired):
            self.kill()

    def kill(self) -> None:
        """SIGKILL the node (the script, the Erlang VM and its helpers: one process group)."""
        proc = self.proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # pragma: no cover - a zombie beyond our reach
            pass
        self._wait_unregistered()

    def _wait_unregistered(self, timeout: float = 10.0) -> None:
        """Until the node's AMQP port is closed (so a restart can bind it again)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError:
                return
            time.sleep(0.05)

    def cleanup(self) -> None:
        if self.running:
            self.kill()  # at the end of a test module: no need to be gentle
        shutil.rmtree(self.base, ignore_errors=True)
