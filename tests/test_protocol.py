"""Calling: what delay/apply_async/send_task put on the broker (PROTOCOL.md §1.2-1.12).

Messages are read back from a ``memory://`` broker (a recorder wraps ``publish`` so delayed
messages can be read too; it still publishes), then decoded as a worker would.
"""

from __future__ import annotations

import base64
import decimal
import json
import os
import re
import socket
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any

import pytest

from celeriac import Celery, Task, states
from celeriac.exceptions import ContentDisallowed, DecodeError, MessageTooLarge
from celeriac.protocol import serializers
from celeriac.protocol.message import Message, build_task_message, decode_task
from tests.apps import api
from tests.conftest import bind_app, wait_for

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
EMPTY_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
# Every header Celery 5.7 sends, in its order (PROTOCOL.md §1.2 and §1.5).
HEADER_KEYS = ["lang", "task", "id", "shadow", "eta", "expires", "group", "group_index",
               "retries", "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr",
               "origin", "ignore_result", "replaced_task_nesting", "stamped_headers", "stamps"]


class Sent:
    """One published message, as a worker will see it."""

    def __init__(self, queue: str, message: Message, not_before: float | None) -> None:
        self.queue = queue
        self.message = message
        self.not_before = not_before
        self.headers = message.headers
        self.properties = message.properties

    @property
    def body(self) -> Any:
        assert self.message.content_type == "application/json"
        return json.loads(self.message.body)


class Recorder:
    def __init__(self, app: Celery) -> None:
        self.sent: list[Sent] = []
        broker = app.broker
        original = broker.publish

        def publish(queue: str, messages: Any, *, not_before: float | None = None) -> None:
            for m in messages:
                self.sent.append(Sent(queue, m, not_before))
            original(queue, messages, not_before=not_before)

        broker.publish = publish  # type: ignore[method-assign]

    def one(self) -> Sent:
        assert len(self.sent) == 1, f"expected one message, got {len(self.sent)}"
        return self.sent.pop()


@pytest.fixture
def app() -> Celery:
    return Celery("proto", broker=f"memory://{uuid.uuid4().hex}", set_as_current=False)


@pytest.fixture
def rec(app: Celery) -> Recorder:
    return Recorder(app)


@pytest.fixture
def tasks(app: Celery) -> dict[str, Task]:  # type: ignore[type-arg]
    @app.task(name="tasks.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="tasks.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="tasks.fail")
    def fail(message: str) -> None:
        raise ValueError(message)

    return {"add": add, "mul": mul, "fail": fail}


def parse_iso(value: str) -> datetime:
    dt = datetime.fromisoformat(value)
    assert dt.utcoffset() == timedelta(0), f"{value!r} must carry the +00:00 offset"
    return dt


# -- §1.5: a plain delay ---------------------------------------------------------------------


def test_plain_delay_is_a_celery_v2_message(app: Celery, rec: Recorder, tasks: dict) -> None:  # type: ignore[type-arg]
    result = tasks["add"].delay(2, 2)
    sent = rec.one()
    h, p = sent.headers, sent.properties
    assert list(h) == HEADER_KEYS
    assert UUID_RE.match(h["id"]) and h["id"] == result.id
    assert h == {
        "lang": "py", "task": "tasks.add", "id": result.id, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": result.id, "parent_id": None,
        "argsrepr": "(2, 2)", "kwargsrepr": "{}",
        "origin": f"gen{os.getpid()}@{socket.gethostname()}",
        "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }
    assert p == {"correlation_id": result.id, "reply_to": app.oid, "delivery_mode": 2,
                 "priority": 0}
    assert UUID_RE.match(app.oid)
    assert sent.message.content_type == "application/json"
    assert sent.message.content_encoding == "utf-8"
    assert sent.body == [[2, 2], {}, EMPTY_EMBED]
    assert sent.queue == "celery" and sent.not_before is None
    # The same bytes a Celery client sends, byte for byte once re-encoded by json.
    assert json.loads(sent.message.body) == json.loads(
        '[[2, 2], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]')


def test_kwargs_and_reprs(rec: Recorder, tasks: dict) -> None:  # type: ignore[type-arg]
    tasks["add"].delay(1, y="two")
    sent = rec.one()
    assert sent.headers["argsrepr"] == "(1,)"
    assert sent.headers["kwargsrepr"] == "{'y': 'two'}"
    assert sent.body == [[1], {"y": "two"}, EMPTY_EMBED]


def test_argsrepr_is_truncated(app: Celery, rec: Recorder) -> None:
    @app.task(name="tasks.big")
    def big(data: str) -> None:
        return None

    big.delay("x" * 5000)
    sent = rec.one()
    assert len(sent.headers["argsrepr"]) <= 1024
    assert sent.headers["argsrepr"].startswith("('xxx")
    assert sent.body[0] == ["x" * 5000]  # the arguments themselves are whole


# -- §1.6: apply_async options ---------------------------------------------------------------


def test_countdown_expires_priority(rec: Recorder, tasks: dict) -> None:  # type: ignore[type-arg]
    before = datetime.now(UTC)
    tasks["add"].apply_async((2, 2), countdown=30, expires=120, priority=7)
    after = datetime.now(UTC)
    sent = rec.one()
    eta = parse_iso(sent.headers["eta"])
    expires = parse_iso(sent.headers["expires"])
    assert before + timedelta(seconds=30) <= eta <= after + timedelta(seconds=30)
    assert expires - eta == timedelta(seconds=90)  # both from the same "now"
    assert sent.properties["priority"] == 7
    assert sent.properties["expiration"] == "120000"
    assert sent.not_before == pytest.approx(eta.timestamp())


def test_eta_datetime_and_numeric_expires(rec: Recorder, tasks: dict) -> None:  # type: ignore[type-arg]
    eta = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    tasks["add"].apply_async((1, 1), eta=eta, expires=60)
    sent = rec.one()
    assert sent.headers["eta"] == "2030-01-02T03:04:05+00:00"
    assert sent.properties["expiration"] == "60000"
    assert sent.not_before == eta.timestamp()
    # A naive eta is UTC (enable_utc); an eta in another zone keeps its offset.
    tasks["add"].apply_async((1, 1), eta=datetime(2030, 1, 2, 3, 4, 5))
    assert rec.one().headers["eta"] == "2030-01-02T03:04:05+00:00"
    plus2 = timezone(timedelta(hours=2))
    tasks["add"].apply_async((1, 1), eta=datetime(2030, 1, 2, 5, 4, 5, tzinfo=plus2))
    sent = rec.one()
    assert sent.headers["eta"] == "2030-01-02T05:04:05+02:00"
    assert sent.not_before == eta.timestamp()


def test_expires_as_datetime_and_in_the_past(rec: Recorder, tasks: dict) -> None:  # type: ignore[type-arg]
    when = datetime.now(UTC) + timedelta(hours=1)
    tasks["add"].apply_async((1, 1), expires=when)
    sent = rec.one()
    assert sent.headers["expires"] == when.isoformat()
    assert 3590_000 <= int(sent.properties["expiration"]) <= 3600_000
    tasks["add"].apply_async((1, 1), expires=datetime.now(UTC) - timedelta(hours=1))
    assert rec.one().properties["expiration"] == "0"
    tasks["add"].apply_async((1, 1), expires=when.isoformat())  # an ISO string, as Celery takes
    assert rec.one().headers["expires"] == when.isoformat()


def test_limits_shadow_ignore_result(rec: Recorder, tasks: dict) -> None:  # type: ignore[type-arg]
    tasks["add"].apply_async((1, 1), time_limit=30, soft_time_limit=20, shadow="add-alias",
                             ignore_result=True)
    h = rec.one().headers
    assert h["timelimit"] == [30, 20]  # [hard, soft]
    assert h["shadow"] == "add-alias"
    assert h["ignore_result"] is True


def test_task_attributes_become_message_defaults(app: Celery, rec: Recorder) -> None:
    @app.task(name="tasks.limited", time_limit=10, soft_time_limit=5, priority=3,
              ignore_result=True, expires=30)
    def limited() -> None:
        return None

    limited.delay()
    sent = rec.one()
    assert sent.headers["timelimit"] == [10, 5]
    assert sent.headers["ignore_result"] is True
    assert sent.properties["priority"] == 3
    assert sent.properties["expiration"] == "30000"
    limited.apply_async(priority=9, time_limit=1)
    sent = rec.one()
    assert sent.properties["priority"] == 9 and sent.headers["timelimit"] == [1, 5]


def test_task_ignore_result_setting_reaches_the_header(app: Celery, rec: Recorder,
                                                       tasks: dict) -> None:  # type: ignore[type-arg]
    app.conf.task_ignore_result = True
    tasks["add"].delay(1, 1)
    assert rec.one().headers["ignore_result"] is True


def test_link_and_link_error_go_in_the_body(rec: Recorder, tasks: dict) -> None:  # type: ignore[type-arg]
    tasks["add"].apply_async((1, 1), link=tasks["mul"].s(10),
                             link_error=tasks["fail"].si("errback"))
    assert rec.one().body == [[1, 1], {}, {
        "callbacks": [{"task": "tasks.mul", "args": [10], "kwargs": {}, "options": {},
                       "subtask_type": None, "immutable": False}],
        "errbacks": [{"task": "tasks.fail", "args": ["errback"], "kwargs": {}, "options": {},
                      "subtask_type": None, "immutable": True}],
        "chain": None, "chord": None}]
    tasks["add"].apply_async((1, 1), link=[tasks["mul"].s(2), tasks["mul"].s(3)])
    assert [c["args"] for c in rec.one().body[2]["callbacks"]] == [[2], [3]]


def test_custom_headers_merge_at_the_top_level(rec: Recorder, tasks: dict) -> None:  # type: ignore[type-arg]
    tasks["add"].apply_async((1, 1), headers={"x-custom": "hello"})
    h = rec.one().headers
    assert h["x-custom"] == "hello"
    assert list(h)[: len(HEADER_KEYS)] == HEADER_KEYS


def test_task_id_option(rec: Recorder, tasks: dict) -> None:  # type: ignore[type-arg]
    result = tasks["add"].apply_async((1, 1), task_id="my-own-id")
    sent = rec.one()
    assert result.id == sent.headers["id"] == sent.headers["root_id"] == "my-own-id"
    assert sent.properties["correlation_id"] == "my-own-id"


def test_send_task_has_a_null_ignore_result(app: Celery, rec: Recorder) -> None:
    result = app.send_task("tasks.not_here", (2, 2), {"k": 1})
    sent = rec.one()
    assert list(sent.headers) == HEADER_KEYS
    assert sent.headers["ignore_result"] is None
    assert sent.headers["task"] == "tasks.not_here" and sent.headers["id"] == result.id
    assert sent.body == [[2, 2], {"k": 1}, EMPTY_EMBED]
    app.send_task("tasks.not_here", ignore_result=True)
    assert rec.one().headers["ignore_result"] is True


def test_root_and_parent_ids_of_a_task_sent_from_a_task(app: Celery, rec: Recorder) -> None:
    @app.task(name="tasks.child")
    def child() -> None:
        return None

    @app.task(name="tasks.parent", bind=True)
    def parent(self: Task) -> str:  # type: ignore[type-arg]
        return child.delay().id

    child_id = parent.apply(task_id="parent-id").get()
    sent = rec.one()
    assert sent.headers["id"] == child_id
    assert sent.headers["parent_id"] == "parent-id"
    assert sent.headers["root_id"] == "parent-id"
    # Explicit ids (as a chain step gets them) are kept.
    child.apply_async(root_id="root", parent_id="par")
    h = rec.one().headers
    assert (h["root_id"], h["parent_id"]) == ("root", "par")


# -- routing ---------------------------------------------------------------------------------


def test_routing_with_task_routes(app: Celery, rec: Recorder, tasks: dict) -> None:  # type: ignore[type-arg]
    app.conf.task_routes = {
        "tasks.add": {"queue": "exact"},
        "tasks.m*": "globbed",
        re.compile(r"^other\."): {"queue": "regex"},
    }
    tasks["add"].delay(1, 1)
    tasks["mul"].delay(1, 1)
    app.send_task("other.thing")
    app.send_task("unrouted.thing")
    assert [s.queue for s in rec.sent] == ["exact", "globbed", "regex", "celery"]


def test_routing_with_functions_lists_and_dotted_paths(app: Celery, rec: Recorder,
                                                       tasks: dict) -> None:  # type: ignore[type-arg]
    seen: list[tuple[Any, ...]] = []

    def router(name: str, args: Any, kwargs: Any, options: Any, task: Any = None,
               **kw: Any) -> Any:
        seen.append((name, list(args), kwargs, task))
        return {"queue": "by-function"} if name == "tasks.add" else None

    app.conf.task_routes = [router, {"tasks.mul": "second-router"}]
    tasks["add"].delay(1, 2)
    tasks["mul"].delay(1, 2)
    app.send_task("tasks.fail", ("x",))
    assert [s.queue for s in rec.sent] == ["by-function", "second-router", "celery"]
    assert seen[0] == ("tasks.add", [1, 2], {}, tasks["add"])
    rec.sent.clear()
    app.conf.task_routes = ("tests.apps.routers.route_by_name",)
    tasks["add"].delay(1, 2)
    assert rec.one().queue == "routed-tasks.add"


def test_route_precedence(app: Celery, rec: Recorder) -> None:
    """queue= wins, then the task's own queue, then task_routes, then the default queue."""

    @app.task(name="tasks.own", queue="own-queue")
    def own() -> None:
        return None

    @app.task(name="tasks.plain")
    def plain() -> None:
        return None

    app.conf.task_routes = {"tasks.*": "routed"}
    app.conf.task_default_queue = "default-q"
    own.delay()
    own.apply_async(queue="explicit")
    plain.delay()
    plain.apply_async(queue="explicit")
    app.conf.task_routes = None
    plain.delay()
    assert [s.queue for s in rec.sent] == ["own-queue", "explicit", "routed", "explicit",
                                           "default-q"]


def test_priority_orders_delivery(app: Celery, tasks: dict) -> None:  # type: ignore[type-arg]
    app.conf.task_default_priority = 4
    low = tasks["add"].delay(0, 0)
    high = tasks["add"].apply_async((9, 9), priority=9)
    mid = tasks["add"].apply_async((5, 5), priority=5)
    consumer = app.broker.consumer(["celery"])
    got = consumer.fetch(10, 0)
    consumer.ack(got)
    assert [d.message.id for d in got] == [high.id, mid.id, low.id]
    assert [d.message.properties["priority"] for d in got] == [9, 5, 4]


# -- serializers -----------------------------------------------------------------------------


def test_msgpack_serializer_works_when_accepted(app: Celery, rec: Recorder,
                                                tasks: dict) -> None:  # type: ignore[type-arg]
    import msgpack

    tasks["add"].apply_async((1, 2), {}, serializer="msgpack")
    sent = rec.one()
    assert sent.message.content_type == "application/x-msgpack"
    assert sent.message.content_encoding == "binary"
    assert msgpack.unpackb(sent.message.body) == [[1, 2], {}, EMPTY_EMBED]
    with pytest.raises(ContentDisallowed, match="x-msgpack"):
        decode_task(sent.message, app.accept_content)  # the default accepts JSON only
    accepting = serializers.accepted_types(["json", "msgpack"])
    assert decode_task(sent.message, accepting).args == [1, 2]
    # As the app's default serializer.
    app.conf.task_serializer = "msgpack"
    tasks["add"].delay(1, 2)
    assert rec.one().message.content_type == "application/x-msgpack"


def test_pickle_is_refused_unless_accepted(app: Celery, rec: Recorder, tasks: dict) -> None:  # type: ignore[type-arg]
    tasks["add"].apply_async((1, 2), serializer="pickle")
    sent = rec.one()
    assert sent.message.content_type == "application/x-python-serialize"
    for accept in (["json"], ["json", "msgpack"], ["application/json"]):
        with pytest.raises(ContentDisallowed, match="x-python-serialize"):
            decode_task(sent.message, serializers.accepted_types(accept))
    assert decode_task(sent.message, serializers.accepted_types(["json", "pickle"])).args == [1, 2]


def test_serializers_through_a_worker(db_url: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    app = bind_app(api.app, db_url)
    start_worker(app, env={"API_ACCEPT": "json,msgpack"})
    assert api.add.apply_async((20, 22), serializer="msgpack").get(timeout=20) == 42
    refused = api.add.apply_async((1, 1), serializer="pickle")
    with pytest.raises(ContentDisallowed):
        refused.get(timeout=20)
    assert refused.state == states.FAILURE
    letters = wait_for(lambda: app.broker.dead_letters(), message="a dead letter")
    assert [dl.message.id for dl in letters] == [refused.id]  # type: ignore[attr-defined]
    assert "ContentDisallowed" in letters[0].reason  # type: ignore[index]


def test_oversized_arguments_are_refused_at_send_time(app: Celery, tasks: dict) -> None:  # type: ignore[type-arg]
    app.conf.task_max_message_size = 1000
    with pytest.raises(MessageTooLarge, match="task_max_message_size=1000"):
        tasks["add"].delay("x" * 2000, "y")
    with pytest.raises(ValueError):  # MessageTooLarge is a ValueError, as users catch
        app.send_task("tasks.add", ("x" * 2000,))
    assert app.broker.queue_size("celery") == 0
    tasks["add"].delay("x" * 100, "y")
    assert app.broker.queue_size("celery") == 1


# -- decoding --------------------------------------------------------------------------------


def test_decode_our_v2_message(app: Celery, rec: Recorder, tasks: dict) -> None:  # type: ignore[type-arg]
    r = tasks["add"].apply_async((1,), {"y": 2}, countdown=5, expires=60, time_limit=9,
                                 link=tasks["mul"].s(2))
    req = decode_task(rec.one().message, app.accept_content)
    assert (req.name, req.id, req.args, req.kwargs) == ("tasks.add", r.id, [1], {"y": 2})
    assert req.retries == 0 and req.root_id == r.id and req.parent_id is None
    assert req.timelimit == (9, None)
    assert req.eta is not None and req.expires is not None and req.expires > req.eta
    assert req.callbacks is not None and req.callbacks[0]["task"] == "tasks.mul"
    assert req.errbacks is None and req.chain is None and req.chord is None


V1_BODY = {"task": "tasks.add", "id": "66be2c95-23a8-4d72-b6e3-3e885469a477", "args": [20, 22],
           "kwargs": {}, "group": None, "group_index": None, "retries": 0, "eta": None,
           "expires": None, "utc": True, "callbacks": None, "errbacks": None,
           "timelimit": [None, None], "taskset": None, "chord": None}


def v1_message(body: dict[str, Any]) -> Message:  # type: ignore[type-arg]
    return Message({}, {"correlation_id": body["id"], "reply_to": "", "delivery_mode": 2,
                        "priority": 0}, json.dumps(body).encode())


def test_decode_protocol_v1(app: Celery) -> None:
    req = decode_task(v1_message(V1_BODY), app.accept_content)
    assert (req.name, req.id, req.args, req.kwargs) == (
        "tasks.add", V1_BODY["id"], [20, 22], {})
    assert req.retries == 0 and req.root_id == V1_BODY["id"] and req.eta is None
    body = dict(V1_BODY, eta="2030-01-01T00:00:00+00:00", retries=2, taskset="gid",
                timelimit=[10, 5], callbacks=[{"task": "tasks.mul", "args": [2], "kwargs": {},
                                               "options": {}, "subtask_type": None,
                                               "immutable": False}])
    req = decode_task(v1_message(body), app.accept_content)
    assert req.retries == 2 and req.group == "gid" and req.timelimit == (10, 5)
    assert req.eta == datetime(2030, 1, 1, tzinfo=UTC)
    assert req.callbacks == body["callbacks"]


def test_decode_hybrid_v2_headers_with_v1_body(app: Celery) -> None:
    body = json.dumps({"args": [1], "kwargs": {"y": 2}}).encode()
    msg = Message({"task": "tasks.add", "id": "h1"}, {}, body)
    req = decode_task(msg, app.accept_content)
    assert (req.name, req.id, req.args, req.kwargs) == ("tasks.add", "h1", [1], {"y": 2})


@pytest.mark.parametrize(
    ("headers", "body", "error"),
    [
        ({"task": "t", "id": "1"}, b"[[7, 8], {}]", "must be \\[args, kwargs, embed\\]"),
        ({"task": "t", "id": "1"}, b"not json", "cannot decode"),
        ({}, b'{"args": []}', "no 'task' header"),
        ({}, b"[1, 2, 3]", "no 'task' header"),
        ({"task": "t"}, b"[[], {}, {}]", "lacks a task name or id"),
        ({"task": "t", "id": "1"}, b'[{"a": 1}, {}, {}]', "args must be a list"),
    ],
)
def test_malformed_messages_raise_decode_error(app: Celery, headers: dict, body: bytes,  # type: ignore[type-arg]
                                               error: str) -> None:
    with pytest.raises(DecodeError, match=error):
        decode_task(Message(headers, {}, body), app.accept_content)


def test_protocol_v1_message_runs_on_a_worker(db_url: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    app = bind_app(api.app, db_url)
    start_worker(app)
    body = dict(V1_BODY, task="tests.apps.api.add", id=str(uuid.uuid4()))
    app.broker.publish("celery", [v1_message(body)])
    assert app.AsyncResult(body["id"]).get(timeout=20) == 42


# -- JSON with kombu's tagged types --------------------------------------------------------------


VALUES = {
    "aware": datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
    "naive": datetime(2024, 1, 2, 3, 4, 5),
    "day": date(2024, 1, 2),
    "clock": time(3, 4, 5),
    "money": decimal.Decimal("10.10"),
    "ident": uuid.UUID("00000000-0000-0000-0000-000000000005"),
    "text_bytes": b"abc",
    "raw_bytes": b"\xff\x00\x01",
    "nested": [{"when": datetime(2030, 1, 1, tzinfo=UTC),
                "ids": [uuid.UUID(int=1), "00000000-0000-0000-0000-000000000002"]}],
}

# kombu.utils.json.dumps(VALUES), as a Celery 5.7 client writes it.
KOMBU_TEXT = (
    '{"aware": {"__type__": "datetime", "__value__": "2024-01-02T03:04:05.123456+00:00"}, '
    '"naive": {"__type__": "datetime", "__value__": "2024-01-02T03:04:05"}, '
    '"day": {"__type__": "date", "__value__": "2024-01-02"}, '
    '"clock": {"__type__": "time", "__value__": "03:04:05"}, '
    '"money": {"__type__": "decimal", "__value__": "10.10"}, '
    '"ident": {"__type__": "uuid", "__value__": {"hex": "00000000000000000000000000000005"}}, '
    '"text_bytes": {"__type__": "bytes", "__value__": "abc"}, '
    '"raw_bytes": {"__type__": "base64", "__value__": "/wAB"}, '
    '"nested": [{"when": {"__type__": "datetime", "__value__": "2030-01-01T00:00:00+00:00"}, '
    '"ids": [{"__type__": "uuid", "__value__": {"hex": "00000000000000000000000000000001"}}, '
    '"00000000-0000-0000-0000-000000000002"]}]}'
)


def test_tagged_types_round_trip_through_json() -> None:
    encoded = serializers.JSON.dumps(VALUES)
    decoded = serializers.JSON.loads(encoded)
    assert decoded == VALUES
    assert type(decoded["ident"]) is uuid.UUID and type(decoded["money"]) is decimal.Decimal
    assert type(decoded["day"]) is date and type(decoded["aware"]) is datetime
    # What we write is what kombu writes.
    assert json.loads(encoded) == json.loads(KOMBU_TEXT)


def test_kombu_written_json_decodes_to_the_same_values() -> None:
    assert serializers.JSON.loads(KOMBU_TEXT.encode()) == VALUES
    # Tuples become lists, as in kombu; unknown tags are left as they are.
    assert serializers.JSON.loads(serializers.JSON.dumps((1, (2, 3)))) == [1, [2, 3]]
    odd = {"__type__": "martian", "__value__": 1}
    assert serializers.JSON.loads(json.dumps(odd).encode()) == odd


def test_tagged_types_round_trip_through_a_message(app: Celery, rec: Recorder) -> None:
    @app.task(name="tasks.echo")
    def echo(*args: Any, **kwargs: Any) -> None:
        return None

    echo.delay(VALUES["aware"], VALUES["ident"], amount=VALUES["money"], blob=b"\x00\xff")
    req = decode_task(rec.one().message, app.accept_content)
    assert req.args == [VALUES["aware"], VALUES["ident"]]
    assert req.kwargs == {"amount": VALUES["money"], "blob": b"\x00\xff"}


def test_tagged_types_round_trip_through_a_worker(db_url: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    app = bind_app(api.app, db_url)
    start_worker(app)
    result = api.echo.delay(VALUES["aware"], VALUES["ident"], money=VALUES["money"],
                            day=VALUES["day"], blob=b"\x00\xff")
    assert result.get(timeout=20) == {
        "args": [VALUES["aware"], VALUES["ident"]],
        "kwargs": {"money": VALUES["money"], "day": VALUES["day"], "blob": b"\x00\xff"},
    }


def test_big_integers_and_non_string_keys() -> None:
    value = {"big": 2**70, 1: "one"}
    assert serializers.JSON.loads(serializers.JSON.dumps(value)) == {"big": 2**70, "1": "one"}


def test_build_task_message_defaults() -> None:
    msg = build_task_message("t.x", "id-1", [1], {"a": 2})
    assert msg.headers["root_id"] == "id-1" and msg.properties["reply_to"] == ""
    assert base64.b64encode(msg.body)  # bytes, ready for any transport
    assert json.loads(msg.body) == [[1], {"a": 2}, EMPTY_EMBED]


def test_hidden_argument_reprs(rec: Recorder, tasks: dict) -> None:  # type: ignore[type-arg]
    tasks["add"].apply_async(("user", "hunter2"), argsrepr="('user', '***')",
                             kwargsrepr="{}")
    h = rec.one().headers
    assert h["argsrepr"] == "('user', '***')" and h["kwargsrepr"] == "{}"


def test_retry_message(db_url: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    """PROTOCOL.md §1.10: same id, root and origin, retries + 1, parent = itself, an eta."""
    app = bind_app(api.app, db_url)
    start_worker(app)
    first = api.retry_to_parking.apply_async(("hunter2",), argsrepr="('***',)",
                                             link=api.add.s(1), headers={"x-trace": "t1"})
    doc = wait_for(lambda: app.backend.get(first.id), timeout=20, message="the RETRY state")
    assert doc["status"] == states.RETRY  # type: ignore[index]
    assert doc["result"] == {"exc_type": "KeyError", "exc_message": ["again"],  # type: ignore[index]
                             "exc_module": "builtins"}
    assert doc["children"] == [[[first.id, None], None]]  # type: ignore[index]
    assert doc["date_done"] is None  # type: ignore[index]
    assert "Retry in 0" in doc["traceback"]  # type: ignore[index]
    consumer = app.broker.consumer(["parking"])
    got = wait_for(lambda: consumer.fetch(10, 0.5), timeout=20, message="the retried message")
    consumer.ack(got)  # type: ignore[arg-type]
    consumer.close()
    (delivery,) = got  # type: ignore[misc]
    h, p = delivery.message.headers, delivery.message.properties
    assert h["id"] == first.id and p["correlation_id"] == first.id
    assert h["retries"] == 1
    assert h["parent_id"] == first.id and h["root_id"] == first.id
    assert h["origin"] == f"gen{os.getpid()}@{socket.gethostname()}"  # still the client's
    assert h["argsrepr"] == "('***',)"
    assert h["x-trace"] == "t1"
    assert p["reply_to"] == app.oid
    assert parse_iso(h["eta"]) <= datetime.now(UTC)
    body = json.loads(delivery.message.body)
    assert body[0] == ["hunter2"]
    assert body[2]["callbacks"][0]["task"] == "tests.apps.api.add"
