"""TLS to RabbitMQ (``amqps://`` and ``broker_use_ssl``), end to end, on a private node.

The module starts its own RabbitMQ node (``tests/rabbitmq_node.py``) with a TLS listener
that requires client certificates (mutual TLS), using certificates made here with
``openssl``; the machine's RabbitMQ is not touched. A missing server package or a node
that does not boot is an error, not a skip.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celery, group
from celeriac.brokers.amqp_client import ConnectionLost
from tests.apps import amqp_routing_app
from tests.conftest import WorkerProcess, bind_app, wait_for
from tests.rabbitmq_node import RabbitNode, TLSFiles, make_certs

StartWorker = Callable[..., WorkerProcess]


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RabbitNode, TLSFiles]]:
    base = tmp_path_factory.mktemp("rabbitmq-tls")
    certs = make_certs(base)
    node = RabbitNode(base / "node", tls=certs)
    try:
        took = node.start()
        print(f"private RabbitMQ node {node.nodename} booted in {took:.1f}s")
        yield node, certs
    finally:
        node.cleanup()


@pytest.fixture(autouse=True)
def _no_tls_left_behind() -> Iterator[None]:
    """The shared test app must not keep ``broker_use_ssl`` for the tests after these."""
    yield
    amqp_routing_app.app.conf.broker_use_ssl = None
    amqp_routing_app.app.close()


def ssl_options(certs: TLSFiles, ca: Path | None = None) -> dict[str, Any]:
    """Celery's ``broker_use_ssl`` dict form."""
    return {"ca_certs": str(ca or certs.ca), "certfile": str(certs.client_cert),
            "keyfile": str(certs.client_key), "cert_reqs": int(ssl.CERT_REQUIRED)}


@pytest.fixture
def vhost(tls_node: tuple[RabbitNode, TLSFiles], request: pytest.FixtureRequest) -> str:
    node, _ = tls_node
    return node.add_vhost(f"tls-{request.node.name}"[:60].replace("[", "-").replace("]", ""))


def _connections_over_tls(node: RabbitNode, vhost: str) -> list[str]:
    out = node.ctl("list_connections", "vhost", "ssl", "ssl_protocol")
    return [line for line in out.splitlines()[1:] if line.split("\t")[0] == vhost]


def test_tasks_and_rpc_results_over_tls(tls_node: tuple[RabbitNode, TLSFiles], vhost: str,
                                        start_worker: StartWorker) -> None:
    node, certs = tls_node
    url = node.url(vhost, tls=True)
    app = bind_app(amqp_routing_app.app, url, result_backend="rpc://",
                   broker_use_ssl=ssl_options(certs))
    try:
        start_worker(app, "-c", "2", wait=False,
                     env={"CELERIAC_TEST_CONF": json.dumps(
                         {"broker_use_ssl": ssl_options(certs)})})
        assert amqp_routing_app.add.delay(2, 3).get(timeout=60) == 5
        assert group(amqp_routing_app.add.s(i, i) for i in range(20))().get(timeout=60) == [
            2 * i for i in range(20)]
        r = amqp_routing_app.add.apply_async((1, 1), countdown=0.5)  # delay tiers over TLS
        assert r.get(timeout=60) == 2
        # Every connection of this vhost (client, worker children, rpc) is TLS.
        rows = _connections_over_tls(node, vhost)
        assert len(rows) >= 3, rows
        assert all(row.split("\t")[1] == "true" for row in rows), rows
        assert all("tlsv1.3" in row or "tlsv1.2" in row for row in rows), rows
    finally:
        app.close()


def test_ssl_context_form(tls_node: tuple[RabbitNode, TLSFiles], vhost: str) -> None:
    """``broker_use_ssl`` as an ``ssl.SSLContext`` (client side; no worker needed)."""
    node, certs = tls_node
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    app = Celery("tls-ctx", broker=node.url(vhost, tls=True), set_as_current=False)
    app.conf.broker_use_ssl = ctx
    try:
        app.send_task("some.task", (1,))
        assert app.broker.queue_size("celery") == 1
    finally:
        app.close()


def test_wrong_ca_fails_clearly(tls_node: tuple[RabbitNode, TLSFiles], vhost: str,
                                start_worker: StartWorker) -> None:
    node, certs = tls_node
    url = node.url(vhost, tls=True)
    app = Celery("tls-wrong-ca", broker=url, set_as_current=False)
    app.conf.broker_use_ssl = ssl_options(certs, ca=certs.other_ca)
    app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0,
                                          "interval_step": 0.1, "interval_max": 0.1}
    try:
        with pytest.raises(ConnectionLost, match="CERTIFICATE_VERIFY_FAILED") as info:
            app.send_task("some.task", (1,))
        assert "amqps://guest@127.0.0.1" in str(info.value)
    finally:
        app.close()
    # amqps:// without broker_use_ssl verifies against the system CAs: refused too.
    app = Celery("tls-system-ca", broker=url, set_as_current=False)
    try:
        with pytest.raises(ConnectionLost, match="CERTIFICATE_VERIFY_FAILED"):
            app.send_task("some.task", (1,))
    finally:
        app.close()
    # A worker with the wrong CA says why in its log, and keeps retrying.
    bound = bind_app(amqp_routing_app.app, url, result_backend="rpc://",
                     broker_use_ssl=ssl_options(certs))
    try:
        worker = start_worker(bound, wait=False, env={"CELERIAC_TEST_CONF": json.dumps(
            {"broker_use_ssl": ssl_options(certs, ca=certs.other_ca)})})
        wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in worker.log(), timeout=30)
        assert worker.proc.poll() is None
    finally:
        bound.close()


def test_client_certificate_required(tls_node: tuple[RabbitNode, TLSFiles],
                                     vhost: str) -> None:
    """The node requires a client certificate: without ``certfile`` the handshake fails."""
    node, certs = tls_node
    app = Celery("tls-no-cert", broker=node.url(vhost, tls=True), set_as_current=False)
    app.conf.broker_use_ssl = {"ca_certs": str(certs.ca)}
    app.conf.task_publish_retry_policy = {"max_retries": 0}
    try:
        # TLS 1.3: the server's refusal may come during the handshake (EOF) or at the
        # first read after it (alert "certificate required").
        with pytest.raises(ConnectionLost, match=r"amqps://guest@127\.0\.0\.1:\d+/tls-"):
            app.send_task("some.task", (1,))
    finally:
        app.close()


def test_tls_port_and_settings_rule() -> None:
    """kombu's rule: TLS without a port in the URL uses 5671; an explicit port is kept, and
    ``broker_use_ssl`` replaces the default context ``amqps://`` alone would use."""
    seen = {}
    for url in ("amqp://h//", "amqp://h:5672//", "amqps://h//", "amqp://a//;amqp://b:1234//"):
        app = Celery("tls-ports", broker=url, set_as_current=False)
        app.conf.broker_use_ssl = {"cert_reqs": int(ssl.CERT_NONE)}
        broker: Any = app.broker
        seen[url] = [(p.port, p.ssl.verify_mode) for p in broker._params]
    assert seen == {
        "amqp://h//": [(5671, ssl.CERT_NONE)],
        "amqp://h:5672//": [(5672, ssl.CERT_NONE)],
        "amqps://h//": [(5671, ssl.CERT_NONE)],
        "amqp://a//;amqp://b:1234//": [(5671, ssl.CERT_NONE), (1234, ssl.CERT_NONE)],
    }
