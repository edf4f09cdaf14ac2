"""How celeriac reaches Redis: Unix sockets, TLS, Sentinel (across a failover), URL lists,
options in the URL. Each test runs private redis-servers on free ports.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import redis

from celeriac import backends, brokers
from celeriac.backends.redis import RedisBackend
from celeriac.brokers.redis import RedisBroker
from celeriac.brokers.redis_client import parse_targets
from celeriac.exceptions import ImproperlyConfigured
from celeriac.protocol.message import Message
from tests.redis_support import PrivateRedis, free_port, wait_for


def msg(n: int) -> Message:
    return Message({"id": f"id-{n}", "task": "t", "n": n}, {"priority": 0}, f"b{n}".encode())


def round_trip(broker_url: str, backend_url: str | None = None, **options: object) -> None:
    """Publish, fetch, ack and store/read a result through the URL."""
    broker = brokers.connect(broker_url, dict(options))
    backend = backends.connect(backend_url or broker_url, **options)
    try:
        broker.publish("q", [msg(1), msg(2)])
        consumer = broker.consumer(["q"])
        got = consumer.fetch(10, 5)
        assert [d.message.headers["n"] for d in got] == [1, 2]
        consumer.ack(got)
        consumer.close()
        assert broker.queue_size("q") == 0
        doc = {"status": "SUCCESS", "result": 7, "task_id": "r1", "traceback": None,
               "children": [], "date_done": None}
        backend.store([doc])
        assert list(backend.wait(["r1"], timeout=5)) == [doc]
        assert backend.get("r1") == doc
    finally:
        broker.close()
        backend.close()


def test_url_parsing() -> None:
    targets, opts = parse_targets(
        "redis://user:p%40ss@h1:6390/3?global_keyprefix=x:&socket_timeout=5;"
        "rediss://h2/4;redis+socket:///tmp/r.sock?virtual_host=5", {"socket_timeout": 7})
    assert [(t.kind, t.db) for t in targets] == [("tcp", 3), ("tcp", 4), ("unix", 5)]
    assert targets[0].kwargs == {"username": "user", "password": "p@ss", "host": "h1",
                                 "port": 6390}
    assert targets[1].kwargs == {"host": "h2", "port": 6379, "ssl": True}
    assert targets[2].kwargs == {"path": "/tmp/r.sock"}
    assert opts == {"global_keyprefix": "x:", "socket_timeout": 7}  # code beats the URL
    sentinels, _ = parse_targets(["sentinel://:pw@s1:26379/2", "sentinel://s2:26380/2"], {})
    assert len(sentinels) == 1 and sentinels[0].sentinels == [("s1", 26379), ("s2", 26380)]
    assert sentinels[0].db == 2 and sentinels[0].kwargs == {"password": "pw"}
    with pytest.raises(ImproperlyConfigured, match="master_name"):
        RedisBroker("sentinel://127.0.0.1:1/0").connector.client  # noqa: B018
    with pytest.raises(ImproperlyConfigured, match="database"):
        parse_targets("redis://h/notanumber", {})
    # The password never shows in what is logged.
    assert RedisBroker("redis://u:secret@h1/0").connector.safe_url == "redis://u:**@h1/0"


def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    server = PrivateRedis(tmp_path / "srv", "--unixsocket", str(sock), "--unixsocketperm", "700")
    try:
        round_trip(f"redis+socket://{sock}?db=2")
        assert server.client(2).dbsize() > 0  # it really went to db 2 through the socket
    finally:
        server.crash()


def _make_certs(directory: Path) -> dict[str, str]:
    directory.mkdir()
    ca_key, ca, key, csr, cert = (str(directory / n) for n in
                                  ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    run = lambda *args: subprocess.run(args, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key,
        "-out", ca, "-days", "2", "-subj", "/CN=celeriac-test-ca")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
        "-subj", "/CN=127.0.0.1")
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", str(ext))
    return {"ca": ca, "cert": cert, "key": key}


def test_tls(tmp_path: Path) -> None:
    certs = _make_certs(tmp_path / "certs")
    tls_port = free_port()
    server = PrivateRedis(tmp_path / "srv", "--tls-port", str(tls_port), "--tls-cert-file",
                          certs["cert"], "--tls-key-file", certs["key"], "--tls-ca-cert-file",
                          certs["ca"], "--tls-auth-clients", "no")
    try:
        url = f"rediss://127.0.0.1:{tls_port}/1?ssl_cert_reqs=required&ssl_ca_certs={certs['ca']}"
        round_trip(url)
        assert server.client(1).dbsize() > 0
        # Without the CA the server's certificate is refused: TLS is really checked.
        broker = RedisBroker(f"rediss://127.0.0.1:{tls_port}/1?ssl_cert_reqs=required")
        with pytest.raises(redis.ConnectionError):
            broker.connector.client.ping()
        broker.close()
    finally:
        server.crash()


def test_url_list_fails_over_to_the_next_server(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "srv")
    dead = free_port()
    try:
        url = f"redis://127.0.0.1:{dead}/0;redis://127.0.0.1:{server.port}/0"
        round_trip(url)
        broker = RedisBroker([f"redis://127.0.0.1:{dead}/0", server.url])  # type: ignore[arg-type]
        broker.publish("q", [msg(1)])  # the first URL is down: the publish retries on the next
        assert broker.connector.safe_url == server.url
        assert broker.queue_size("q") == 1
        broker.close()
    finally:
        server.crash()


def test_sentinel_follows_the_master_across_a_failover(tmp_path: Path) -> None:
    master = PrivateRedis(tmp_path / "master")
    replica = PrivateRedis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(master.port))
    sentinel_port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds mymaster 1000\n"
        "sentinel failover-timeout mymaster 5000\n"
    )
    log = open(tmp_path / "sentinel.log", "wb")  # noqa: SIM115
    sentinel = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"sentinel://127.0.0.1:{sentinel_port}/0;sentinel://127.0.0.1:{free_port()}/0"
    broker = backend = None
    try:
        admin = redis.Redis("127.0.0.1", sentinel_port)
        wait_for(lambda: _ping(admin), 10, message="sentinel to start")
        wait_for(lambda: replica.client().info("replication")["master_link_status"] == "up",
                 10, message="the replica to sync")
        broker = RedisBroker(url, master_name="mymaster")
        backend = RedisBackend(url, master_name="mymaster")
        assert isinstance(backend, RedisBackend)
        broker.publish("q", [msg(1)])
        consumer = broker.consumer(["q"])
        [first] = consumer.fetch(1, 5)
        consumer.ack([first])
        wait_for(lambda: replica.client().info("replication")["master_repl_offset"]
                 >= master.client().info("replication")["master_repl_offset"], 10,
                 message="the replica to catch up")
        admin.execute_command("SENTINEL", "FAILOVER", "mymaster")
        wait_for(lambda: replica.client().info("replication")["role"] == "master", 20,
                 message="the replica to be promoted")
        # Sentinel's view (what clients ask) switches once the failover is complete, and
        # the old master then refuses writes as a replica.
        wait_for(lambda: int(admin.sentinel_masters()["mymaster"]["port"])  # type: ignore[call-overload]
                 == replica.port,
                 30, interval=0.1, message="sentinel to switch to the new master")
        wait_for(lambda: master.client().info("replication")["role"] == "slave", 30,
                 interval=0.1, message="the old master to become a replica")
        # The same clients follow: writes land on the new master.
        broker.publish("q", [msg(2)])
        got = consumer.fetch(1, 10)
        assert [d.message.headers["n"] for d in got] == [2]
        consumer.ack(got)
        backend.store([{"status": "SUCCESS", "result": 1, "task_id": "s1"}])
        assert backend.get("s1") == {"status": "SUCCESS", "result": 1, "task_id": "s1"}
        assert replica.client().exists("celery-task-meta-s1")
        consumer.close()
    finally:
        for closable in (broker, backend):
            if closable is not None:
                closable.close()
        sentinel.kill()
        sentinel.wait(10)
        log.close()
        replica.crash()
        master.crash()


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        time.sleep(0.05)
        return False
