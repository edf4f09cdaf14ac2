"""Canvas without a worker: signatures, the messages workflows send, eager runs, results.

End-to-end runs through workers are in ``test_canvas_worker.py``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from celeriac import Celery, GroupResult, ResultSet, Signature, chain, chord, group, signature
from celeriac import states as st
from celeriac.canvas import chunks, maybe_signature, xmap, xstarmap
from celeriac.exceptions import IncompleteStream, TimeoutError
from celeriac.protocol.errors import exception_to_dict
from celeriac.protocol.message import Message, decode_task
from celeriac.result import AsyncResult


@pytest.fixture
def app() -> Celery:
    app = Celery("canvas", broker=f"memory://{uuid.uuid4().hex}", set_as_current=False)

    @app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="t.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="t.tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="t.fail")
    def fail(*args: Any) -> None:
        raise ValueError("eager failure")

    return app


def t(app: Celery, name: str) -> Any:
    return app.tasks[f"t.{name}"]


@dataclass
class Sent:
    queue: str
    message: Message

    @property
    def name(self) -> str:
        return str(self.message.headers["task"])

    @property
    def body(self) -> list[Any]:
        req = decode_task(self.message, frozenset({"application/json"}))
        return [req.args, req.kwargs, {"callbacks": req.callbacks, "errbacks": req.errbacks,
                                       "chain": req.chain, "chord": req.chord}]


class Recorder:
    """Captures what an app publishes (and what the backend knew at that moment)."""

    def __init__(self, app: Celery) -> None:
        self.sent: list[Sent] = []
        self.batches: list[int] = []
        self.chord_sizes: list[dict[str, Any]] = []
        broker, original = app.broker, app.broker.publish
        store = app.backend._store  # type: ignore[attr-defined]

        def publish(queue: str, messages: Any, *, not_before: float | None = None) -> None:
            self.batches.append(len(messages))
            self.chord_sizes.append({g: c.size for g, c in store.chords.items()})
            self.sent.extend(Sent(queue, m) for m in messages)
            original(queue, messages, not_before=not_before)

        broker.publish = publish  # type: ignore[method-assign]


@pytest.fixture
def rec(app: Celery) -> Recorder:
    return Recorder(app)


# -- signatures ------------------------------------------------------------------------------


def test_signature_forms(app: Celery) -> None:
    add = t(app, "add")
    assert dict(add.s(2)) == {"task": "t.add", "args": [2], "kwargs": {}, "options": {},
                              "subtask_type": None, "immutable": False}
    assert add.si(2, 2).immutable is True
    by_name = signature("t.add", args=(1,), kwargs={"y": 2}, options={"queue": "q"}, app=app)
    assert (by_name.task, by_name.args, by_name.kwargs, by_name.options) == (
        "t.add", [1], {"y": 2}, {"queue": "q"})
    assert app.signature("t.add", (1, 2), countdown=3).options == {"countdown": 3}
    assert repr(add.s(1, y=2)) == "t.add(1, y=2)" and repr(add.si(1)) == "t.add(1)!"
    assert add.s(1, 2).type is add


def test_partial_arguments_merge_at_call_time(app: Celery) -> None:
    add = t(app, "add")
    partial = add.s(2)
    assert partial.apply((3,)).get() == 5  # call-time args come first: add(3, 2)
    assert add.s(y=5).apply((1,)).get() == 6
    assert add.s(1, y=2).apply(kwargs={"y": 10}).get() == 11  # call-site kwargs win
    assert add.si(1, 2).apply((100,)).get() == 3  # immutable: extra args ignored
    assert partial(40) == 42  # __call__ runs the function here
    assert partial.args == [2]  # calling never changes the signature


def test_clone_is_independent(app: Celery) -> None:
    add = t(app, "add")
    sig = add.s(1).set(queue="a")
    sig.link(add.s(100))
    copy = sig.clone((0,), {"z": 1}, countdown=5)
    assert copy.args == [0, 1] and copy.kwargs == {"z": 1}
    assert copy.options["queue"] == "a" and copy.options["countdown"] == 5
    copy.options["link"].append(add.s(200))
    copy.args.append(9)
    assert sig.args == [1] and len(sig.options["link"]) == 1 and "countdown" not in sig.options
    # group_id, once set, is kept by later merges (as in Celery)
    grouped = add.s(1).set(group_id="g1")
    assert grouped.clone(group_id="g2").options["group_id"] == "g1"
    # workflows copy their members
    ch = chain(add.s(1, 1), add.s(2))
    ch2 = ch.clone()
    ch2.tasks[0].args.append(5)
    assert ch.tasks[0].args == [1, 1]


def test_set_link_and_link_error_are_stored_in_wire_form(app: Celery) -> None:
    add, mul = t(app, "add"), t(app, "mul")
    sig = add.s(1, 1).set(queue="fast", priority=5)
    assert sig.link(mul.s(2)) == mul.s(2)
    sig.link_error(mul.si(0, 0))
    wire = json.loads(json.dumps(sig.to_wire()))
    assert wire["options"]["queue"] == "fast"
    assert wire["options"]["link"] == [{"task": "t.mul", "args": [2], "kwargs": {},
                                        "options": {}, "subtask_type": None,
                                        "immutable": False}]
    assert wire["options"]["link_error"][0]["immutable"] is True
    assert [s.task for s in sig.flatten_links()] == ["t.add", "t.mul"]


def test_freeze_assigns_ids_once(app: Celery) -> None:
    add = t(app, "add")
    sig = add.s(1, 1)
    first = sig.freeze()
    assert sig.id == first.id and sig.freeze().id == first.id
    assert sig.options["reply_to"] == app.oid
    assert add.s(1).freeze("my-id").id == "my-id"
    ch = chain(add.s(1, 1), add.s(2), add.s(3))
    last = ch.freeze()
    assert last.id == ch.tasks[-1].id and last.parent.id == ch.tasks[1].id
    assert last.parent.parent.id == ch.tasks[0].id and last.parent.parent.parent is None
    g = group(add.s(i, i) for i in range(3))
    gr = g.freeze()
    assert gr.id == g.options["task_id"] and [r.id for r in gr] == [s.id for s in g.tasks]
    assert [s.options["group_index"] for s in g.tasks] == [0, 1, 2]
    c = chord([add.s(1, 1), add.s(2, 2)], t(app, "tsum").s())
    body = c.freeze()
    assert body.id == c.body.id and isinstance(body.parent, GroupResult)
    assert body.parent.id == c.header.options["task_id"] == c.body.options["group_id"]


def test_operators_build_workflows(app: Celery) -> None:
    add, tsum = t(app, "add"), t(app, "tsum")
    assert isinstance(add.s(1, 1) | add.s(2), chain)
    ch = add.s(1, 1) | add.s(2) | add.s(3)
    assert isinstance(ch, chain) and [s.args for s in ch.tasks] == [[1, 1], [2], [3]]
    assert [s.args for s in (add.s(0, 0) | ch).tasks] == [[0, 0], [1, 1], [2], [3]]
    upgraded = group(add.s(1, 1), add.s(2, 2)) | tsum.s()
    assert isinstance(upgraded, chord) and upgraded.body.task == "t.tsum"
    longer = upgraded | add.s(10)
    assert isinstance(longer, chord) and isinstance(longer.body, chain)
    assert isinstance(add.s(1, 1) | group(add.s(1), add.s(2)), chain)
    assert repr(ch) == "t.add(1, 1) | t.add(2) | t.add(3)"


def test_dict_forms_rebuild_the_same_types(app: Celery) -> None:
    add, tsum = t(app, "add"), t(app, "tsum")
    canvas = chain(add.s(1, 1), group(add.s(1), chain(add.s(2), add.s(3))),
                   chord([add.s(1), add.s(2)], tsum.s()))
    data = json.loads(json.dumps(canvas.to_wire()))
    rebuilt = signature(data, app=app)
    assert isinstance(rebuilt, chain)
    assert isinstance(rebuilt.tasks[1], group) and isinstance(rebuilt.tasks[1].tasks[1], chain)
    assert isinstance(rebuilt.tasks[2], chord) and rebuilt.tasks[2].body.task == "t.tsum"
    assert rebuilt.to_wire() == data
    assert maybe_signature(None) is None
    for kind in (xmap(add.s(), [1, 2], app=app), xstarmap(add.s(), [(1, 2)], app=app),
                 chunks(add.s(), [(1, 2)], 1, app=app)):
        wire = kind.to_wire()
        assert wire["subtask_type"] is None and wire["immutable"] is True  # as Celery writes


# -- dicts made by Celery ----------------------------------------------------------------------


@pytest.fixture
def celery_app() -> Any:
    import celery

    capp = celery.Celery("canvas_interop", broker="memory://", backend="cache+memory://",
                         set_as_current=False)

    @capp.task(name="t.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @capp.task(name="t.tsum", shared=False)
    def tsum(values: list[int]) -> int:
        return sum(values)

    return capp


def _celery_dict(sig: Any) -> dict[str, Any]:
    from kombu.utils.json import dumps

    return json.loads(dumps(sig))  # what goes on the wire from a Celery client


def test_celery_dicts_round_trip(app: Celery, celery_app: Any) -> None:
    import celery

    add, tsum = celery_app.tasks["t.add"], celery_app.tasks["t.tsum"]
    cases = [
        add.s(2),
        add.si(1, 2).set(queue="q", countdown=3),
        add.s(1, 1) | add.s(2) | add.s(3),
        celery.group(add.s(i, i) for i in range(3)),
    ]
    linked = add.s(2)
    linked.link(tsum.s())
    linked.link_error(add.si(0, 0))
    cases.append(linked)
    for case in cases:
        data = _celery_dict(case)
        ours = signature(data, app=app)
        assert ours.to_wire() == data, case
        # ...and Celery reads ours back into the same thing
        theirs = celery.signature(json.loads(json.dumps(ours.to_wire())), app=celery_app)
        assert _celery_dict(theirs) == data
    # A chord: Celery writes the header as a list; we read it as a group.
    c = _celery_dict(celery.chord([add.s(1, 1), add.s(2, 2)], tsum.s()))
    ours_chord = signature(c, app=app)
    assert isinstance(ours_chord, chord) and len(ours_chord.header.tasks) == 2
    back = celery.signature(json.loads(json.dumps(ours_chord.to_wire())), app=celery_app)
    assert isinstance(back, celery.chord)
    assert [s["args"] for s in back.tasks] == [[1, 1], [2, 2]] and back.body["task"] == "t.tsum"
    # Celery's chunks/map dicts carry no subtask_type: they are plain task calls.
    for kind in (add.chunks([(1, 2), (3, 4)], 1), add.map([1]), add.starmap([(1, 2)])):
        data = _celery_dict(kind)
        assert signature(data, app=app).to_wire() == data


# -- what goes on the wire ---------------------------------------------------------------------


def test_chain_message(app: Celery, rec: Recorder) -> None:
    add = t(app, "add")
    result = chain(add.s(2, 2), add.s(4), add.s(8)).apply_async()
    assert len(rec.sent) == 1
    sent = rec.sent[0]
    headers = sent.message.headers
    args, kwargs, embed = sent.body
    assert (args, kwargs) == ([2, 2], {})
    assert headers["root_id"] == headers["id"] and headers["parent_id"] is None
    steps = embed["chain"]
    assert [s["args"] for s in steps] == [[8], [4]]  # reversed: the worker pops the last
    assert steps[0]["options"]["task_id"] == result.id
    assert steps[1]["options"]["task_id"] == result.parent.id
    assert result.parent.parent.id == headers["id"]
    assert all(s["options"]["reply_to"] == app.oid for s in steps)
    assert embed["callbacks"] is None and embed["chord"] is None


def test_group_messages(app: Celery, rec: Recorder) -> None:
    add = t(app, "add")
    result = group(add.s(i, i) for i in range(3)).apply_async(queue="grouped")
    assert rec.batches == [3]  # one publish for the whole group
    assert [s.message.headers["group"] for s in rec.sent] == [result.id] * 3
    assert [s.message.headers["group_index"] for s in rec.sent] == [0, 1, 2]
    assert [s.message.headers["id"] for s in rec.sent] == [r.id for r in result]
    assert {s.queue for s in rec.sent} == {"grouped"}
    for s in rec.sent:
        assert s.message.headers["root_id"] == s.message.headers["id"]
        assert s.body[2] == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def test_chord_messages(app: Celery, rec: Recorder) -> None:
    add, tsum = t(app, "add"), t(app, "tsum")
    result = chord([add.s(i, i) for i in range(3)], tsum.s()).apply_async()
    gid = result.parent.id
    assert rec.chord_sizes[0] == {gid: 3}  # the size is known before any header message
    assert [s.message.headers["group_index"] for s in rec.sent] == [0, 1, 2]
    for s in rec.sent:
        body = s.body[2]["chord"]
        assert s.message.headers["group"] == gid
        assert body["task"] == "t.tsum" and body["args"] == []
        assert body["options"]["task_id"] == result.id
        assert body["options"]["group_id"] == gid
        assert body["options"]["reply_to"] == app.oid
    assert [r.id for r in result.parent] == [s.message.headers["id"] for s in rec.sent]


def test_chord_ids(app: Celery, rec: Recorder) -> None:
    add, tsum = t(app, "add"), t(app, "tsum")
    result = chord([add.s(1, 1)], tsum.s()).apply_async(task_id="the-body")
    assert result.id == "the-body"  # as Celery: apply_async(task_id=) names the body
    assert rec.sent[0].body[2]["chord"]["options"]["task_id"] == "the-body"
    # A frozen chord's dict keeps its group id where Celery looks for it.
    c = chord([add.s(1, 1)], tsum.s())
    frozen = c.freeze()
    assert c.to_wire()["options"]["task_id"] == frozen.parent.id
    assert frozen.id != frozen.parent.id


def test_group_piped_into_a_task_sends_a_chord(app: Celery, rec: Recorder) -> None:
    add, tsum = t(app, "add"), t(app, "tsum")
    result = chain(add.s(1, 1), group(add.s(1), add.s(2)), tsum.s(), add.s(10)).apply_async()
    (first,) = rec.sent
    last, step = first.body[2]["chain"]  # reversed: the chord runs next, then add(10)
    assert step["subtask_type"] == "chord" and step["kwargs"]["body"]["task"] == "t.tsum"
    assert [m["args"] for m in step["kwargs"]["header"]["kwargs"]["tasks"]] == [[1], [2]]
    assert last["task"] == "t.add" and last["options"]["task_id"] == result.id
    assert result.parent.id == step["kwargs"]["body"]["options"]["task_id"]


def test_workflow_options_reach_the_right_tasks(app: Celery, rec: Recorder) -> None:
    add, tsum = t(app, "add"), t(app, "tsum")
    chord([add.s(1, 1), add.s(2, 2)], tsum.s()).apply_async(queue="q2", priority=3,
                                                           countdown=60)
    assert {s.queue for s in rec.sent} == {"q2"}
    assert all(s.message.headers["eta"] for s in rec.sent)  # countdown delays the header
    body = rec.sent[0].body[2]["chord"]
    assert body["options"]["queue"] == "q2" and body["options"]["priority"] == 3
    assert "countdown" not in body["options"]  # ...not the body once the header is done
    rec.sent.clear()
    chain(add.s(1, 1), add.s(2)).apply_async(queue="q3")  # as Celery: the first task's
    (first,) = rec.sent
    assert first.queue == "q3" and "queue" not in first.body[2]["chain"][0]["options"]
    rec.sent.clear()
    errback = add.si(0, 0)
    chain(add.s(1, 1), add.s(2)).apply_async(link_error=errback, link=tsum.s())
    (first,) = rec.sent
    (step,) = first.body[2]["chain"]
    assert first.body[2]["errbacks"] == [errback.to_wire()]  # every step has the errback
    assert step["options"]["link_error"] == [errback.to_wire()]
    assert step["options"]["link"] == [tsum.s().to_wire()]  # the callback: the last step
    assert first.body[2]["callbacks"] is None


def test_chord_without_a_result_backend_is_refused() -> None:
    plain = Celery("nobackend", broker="redis://localhost:1/0", set_as_current=False)

    @plain.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(NotImplementedError, match="Chords need a result backend"):
        chord([add.s(1, 1)], add.s(1)).apply_async()


# -- eager -------------------------------------------------------------------------------------


def test_eager_workflows(app: Celery) -> None:
    app.conf.task_always_eager = True
    add, mul, tsum = t(app, "add"), t(app, "mul"), t(app, "tsum")
    assert chain(add.s(1, 1), add.s(2), mul.s(10)).delay().get() == 40
    assert group(add.s(i, i) for i in range(4)).delay().get() == [0, 2, 4, 6]
    assert chord([add.s(i, i) for i in range(4)], tsum.s()).delay().get() == 12
    assert (group(add.s(1, 1), add.s(2, 2)) | tsum.s()).delay().get() == 6
    assert chain(add.s(1, 1), group(add.s(1), add.s(2)), tsum.s()).delay().get() == 7
    assert group(chain(add.s(i, i), mul.s(10)) for i in range(3)).delay().get() == [0, 20, 40]
    assert chord([chain(add.s(1, 1), mul.s(3)), add.s(1, 0)], tsum.s()).delay().get() == 7
    assert chunks(add.s(), [(1, 1), (2, 2), (3, 3)], 2, app=app).apply_async().get() == [
        [2, 4], [6]]
    assert xmap(t(app, "tsum").s(), [[1, 2], [3]], app=app).apply_async().get() == [3, 3]
    assert xstarmap(add.s(), [(1, 2), (3, 4)], app=app).apply_async().get() == [3, 7]
    with pytest.raises(ValueError, match="eager failure"):
        chord([add.s(1, 1), t(app, "fail").s()], tsum.s()).delay().get()


def test_signature_apply_runs_here(app: Celery) -> None:
    add, tsum = t(app, "add"), t(app, "tsum")
    assert chain(add.s(1, 1), add.s(1)).apply().get() == 3
    result = chord([add.s(1, 1), add.s(2, 2)], tsum.s()).apply()
    assert result.get() == 6 and result.parent.get() == [2, 4]
    assert group(add.s(1, 1)).apply().get() == [2]
    assert app.broker.queue_size("celery") == 0


# -- results -----------------------------------------------------------------------------------


def store(app: Celery, task_id: str, state: str = st.SUCCESS, result: Any = None,
          children: list[Any] | None = None) -> None:
    app.backend.store([{"status": state, "result": result, "traceback": None,
                        "children": children or [], "date_done": None, "task_id": task_id}])


def test_group_result_state(app: Celery) -> None:
    ids = [f"m{i}" for i in range(4)]
    gr = GroupResult("g", [AsyncResult(i, app=app) for i in ids], app=app)
    assert gr.completed_count() == 0 and not gr.ready() and gr.waiting()
    store(app, "m0", result=0)
    store(app, "m1", st.FAILURE, exception_to_dict(KeyError("m1 broke")))
    assert gr.completed_count() == 1 and gr.failed() and not gr.ready()
    store(app, "m2", result=2)
    store(app, "m3", st.REVOKED, exception_to_dict(KeyError("revoked")))
    assert gr.ready() and not gr.successful() and gr.completed_count() == 2
    with pytest.raises(KeyError, match="m1 broke"):
        gr.get(timeout=5)
    values = gr.join(timeout=5, propagate=False)
    assert values[0] == 0 and isinstance(values[1], KeyError) and values[2] == 2
    seen: list[tuple[str, Any]] = []
    assert gr.join(propagate=False, callback=lambda i, v: seen.append((i, v))) == []
    assert [i for i, _ in seen] == ids


def test_join_waits_in_order_and_times_out(app: Celery) -> None:
    rs = ResultSet([AsyncResult("a", app=app), AsyncResult("b", app=app)], app=app)
    store(app, "b", result="B")
    with pytest.raises(TimeoutError):
        rs.join(timeout=0.2)
    store(app, "a", result="A")
    assert rs.join(timeout=5) == ["A", "B"]
    rs.add(AsyncResult("c", app=app))
    rs.discard("c")
    rs.discard("zzz")
    assert len(rs) == 2


def test_join_of_many_reads_each_result_a_bounded_number_of_times(app: Celery) -> None:
    n = 10_000
    ids = [str(i) for i in range(n)]
    app.backend.store([{"status": st.SUCCESS, "result": int(i), "traceback": None,
                        "children": [], "date_done": None, "task_id": i} for i in ids])
    reads: list[int] = []
    backend = app.backend
    original = backend.get_many

    def counting(task_ids: Any) -> Any:
        reads.append(len(task_ids))
        return original(task_ids)

    backend.get_many = counting  # type: ignore[method-assign]
    started = time.monotonic()
    gr = GroupResult("big", [AsyncResult(i, app=app) for i in ids], app=app)
    assert gr.join(timeout=30) == list(range(n))
    assert sum(reads) <= 2 * n and len(reads) < 40  # windows double up to 1000
    assert gr.completed_count() == n  # cached: no more reads of ready results
    assert time.monotonic() - started < 10


def test_group_result_save_restore_delete(app: Celery) -> None:
    gr = GroupResult("saved", [AsyncResult("x1", app=app), AsyncResult("x2", app=app)],
                     app=app)
    gr.save()
    again = GroupResult.restore("saved", app=app)
    assert again is not None and again == gr and [r.id for r in again] == ["x1", "x2"]
    nested = GroupResult("outer", [gr, AsyncResult("x3", app=app)], app=app).save()
    restored = GroupResult.restore("outer", app=app)
    assert restored is not None and isinstance(restored.results[0], GroupResult)
    assert nested.as_tuple() == restored.as_tuple()
    gr.delete()
    assert GroupResult.restore("saved", app=app) is None


def test_children_parent_and_collect(app: Celery) -> None:
    store(app, "child-b", result="b")
    store(app, "g1", result=1)
    store(app, "g2", result=2)
    store(app, "root", result="r", children=[
        [["child-b", None], None],
        [["grp", None], [[["g1", None], None], [["g2", None], None]]],
    ])
    root = AsyncResult("root", app=app)
    kids = root.children
    assert [type(k).__name__ for k in kids] == ["AsyncResult", "GroupResult"]
    collected = [(getattr(r, "id", None), v) for r, v in root.collect()]
    assert collected == [("root", "r"), ("child-b", "b"), ("grp", [1, 2]), ("g1", 1),
                         ("g2", 2)]
    store(app, "unready-parent", st.SUCCESS, children=[[["pending-child", None], None]])
    with pytest.raises(IncompleteStream):  # its child is known but not ready
        list(AsyncResult("unready-parent", app=app).iterdeps())
    partial = list(AsyncResult("unready-parent", app=app).iterdeps(intermediate=True))
    assert [n.id for _, n in partial] == ["unready-parent", "pending-child"]
    chained = AsyncResult("c2", app=app, parent=AsyncResult("c1", app=app))
    assert chained.as_tuple() == [["c2", [["c1", None], None]], None]


def test_group_revoke_revokes_every_member(app: Celery) -> None:
    add = t(app, "add")
    gr = group(add.s(i, i) for i in range(3)).freeze()
    gr.revoke()
    assert [r.state for r in gr] == [st.REVOKED] * 3


def test_errback_forms(app: Celery) -> None:
    from celeriac.app import _takes_request

    @app.task(name="t.new_style")
    def new_style(request: Any, exc: Any, traceback: Any) -> None: ...

    @app.task(name="t.old_style")
    def old_style(task_id: str) -> None: ...

    @app.task(name="t.with_arg")
    def with_arg(request: Any, exc: Any, traceback: Any, tag: str) -> None: ...

    @app.task(name="t.varargs")
    def varargs(*args: Any) -> None: ...

    assert _takes_request(new_style, new_style.s())
    assert not _takes_request(old_style, old_style.s())
    assert _takes_request(with_arg, with_arg.s("x"))
    assert not _takes_request(with_arg, with_arg.s("x", "y", "z"))
    assert not _takes_request(varargs, varargs.s())  # the classic form, as before


def test_signature_and_canvas_types_are_exported() -> None:
    import celeriac

    assert celeriac.Signature is Signature
    assert isinstance(celeriac.signature({"task": "x"}), Signature)
