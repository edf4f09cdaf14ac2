"""Canvas end to end: every primitive, their nestings and their failures through workers.

Each test runs three times: on ``memory://`` with an in-process worker (a thread running
the real message handler, so the same code paths as a worker child), and on SQLite and on
Redis (broker and result backend) with a real worker process (``-c 2``). Nothing sleeps
to wait: every wait is a ``get``/``join`` with a timeout, which raises (instead of
hanging) if a workflow stalls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celeriac import GroupResult, chain, chord, group, signature
from celeriac import states as st
from celeriac.control import REVOKE_CHANNEL
from celeriac.exceptions import ChordError, NotRegistered, TaskRevokedError
from celeriac.result import AsyncResult
from celeriac.worker.handler import ACK, PARKED, REQUEUE, MessageHandler
from tests import redis_support
from tests.apps import canvas_tasks as t
from tests.conftest import ROOT, WorkerProcess, bind_app

WAIT = 30.0


class InlineWorker:
    """The worker's message handling on a thread of this process (for ``memory://``)."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="inline-worker", daemon=True)
        self.thread.start()

    def run(self) -> None:
        app = t.app
        broker, backend = app.broker, app.backend
        revoked: set[str] = set()
        handler = MessageHandler(app, "inline@test", revoked, None)
        consumer = broker.consumer(["celery"])
        revocations = broker.subscribe(REVOKE_CHANNEL)
        while not self.stopping.is_set():
            batch = consumer.fetch(8, 0.05)
            for item in revocations.poll():
                revoked.update(item.get("ids") or ())
            for delivery in batch:
                settlement = handler.handle(delivery)
                if settlement.meta is not None:
                    backend.store([settlement.meta])
                if settlement.action == ACK:
                    consumer.ack([delivery])
                elif settlement.action == REQUEUE:
                    consumer.reject([delivery], requeue=True)
                elif settlement.action == PARKED:
                    consumer.park(delivery, settlement.park_until)
        consumer.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)


@pytest.fixture(scope="module", params=["memory", "sqlite", "redis"])
def runner(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[str]:
    """The canvas app bound to a fresh store, with a worker consuming from it."""
    if request.param == "memory":
        bind_app(t.app, f"memory://{uuid.uuid4().hex}")
        inline = InlineWorker()
        yield "memory"
        inline.stop()
        return
    tmp = tmp_path_factory.mktemp("canvas")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    prefix = redis_support.new_prefix("canvas")
    if request.param == "sqlite":
        bind_app(t.app, f"sqlite:///{tmp}/canvas.db")
    else:
        url = redis_support.shared_url(prefix=prefix)
        bind_app(t.app, url, result_backend=url)
        env["CELERIAC_RESULT_BACKEND"] = url
    log_path = tmp / "worker.log"
    cmd = [sys.executable, "-m", "celeriac", "-A", "tests.apps.canvas_tasks", "-b",
           t.app.broker_url, "worker", "-c", "2", "-l", "INFO"]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(tmp),
                                env=env)
    worker = WorkerProcess(proc, log_path, 2, t.app)
    try:
        if request.param == "sqlite":
            worker.wait_ready()
        else:
            redis_support.wait_worker_ready(worker, t.app.broker_url)
        yield request.param
    finally:
        worker.stop()
        t.app.close()
        if request.param == "redis":
            redis_support.delete_prefix(prefix)


def probe() -> str:
    return f"probe-{uuid.uuid4()}"


# -- primitives ----------------------------------------------------------------------------


def test_chain(runner: str) -> None:
    result = chain(t.add.s(1, 1), t.add.s(2), t.mul.s(10)).delay()
    assert result.get(timeout=WAIT) == 40
    assert result.parent.get(timeout=WAIT) == 4
    assert result.parent.parent.get(timeout=WAIT) == 2
    assert result.parent.parent.parent is None
    # Each step records its successor as a child; ids, roots and parents line up.
    first = result.parent.parent
    assert [c.id for c in first.children] == [result.parent.id]
    info = (t.add.s(1, 1) | t.whoami.s()).delay().get(timeout=WAIT)
    assert info["args"] == [2] and info["parent_id"] == info["root_id"] != info["id"]


def test_chain_partial_args_and_immutable_steps(runner: str) -> None:
    assert chain(t.add.s(1, 1), t.add.si(10, 10), t.add.s(1)).delay().get(timeout=WAIT) == 21
    assert chain(t.add.s(1), t.mul.s(3)).apply_async((4,)).get(timeout=WAIT) == 15
    assert (t.add.s(y=2) | t.mul.s(y=3)).delay(1).get(timeout=WAIT) == 9


def test_group(runner: str) -> None:
    result = group(t.add.s(i, i) for i in range(10)).delay()
    assert isinstance(result, GroupResult)
    assert result.get(timeout=WAIT) == [i * 2 for i in range(10)]
    assert result.ready() and result.successful() and result.completed_count() == 10
    infos = group(t.whoami.s(), t.whoami.s()).apply_async().get(timeout=WAIT)
    assert [i["group_index"] for i in infos] == [0, 1]
    assert infos[0]["group"] == infos[1]["group"] is not None
    assert group(t.add.s(1), t.add.s(2)).apply_async((10,)).get(timeout=WAIT) == [11, 12]


def test_chord(runner: str) -> None:
    result = chord([t.add.s(i, i) for i in range(10)], t.tsum.s()).delay()
    assert result.get(timeout=WAIT) == 90
    header = result.parent
    assert isinstance(header, GroupResult)
    assert header.join(timeout=WAIT) == [i * 2 for i in range(10)]
    described = chord([t.add.s(1, 1), t.add.s(2, 2)], t.whoami.s()).delay()
    info = described.get(timeout=WAIT)
    assert info["args"] == [[2, 4]]  # the body gets the header's results in order
    # ...from the header task that completed the chord, in the chord's group
    assert info["group"] == described.parent.id
    assert info["parent_id"] in [r.id for r in described.parent]


def test_group_piped_into_a_task_is_a_chord(runner: str) -> None:
    assert (group(t.add.s(i, i) for i in range(5)) | t.tsum.s()).delay().get(
        timeout=WAIT) == 20
    assert chain(group(t.add.s(1, 1), t.add.s(2, 2)), t.tsum.s()).delay().get(
        timeout=WAIT) == 6


def test_empty_and_single_member_headers(runner: str) -> None:
    assert chord([], t.tsum.s()).delay().get(timeout=WAIT) == 0
    assert chord([t.add.s(2, 3)], t.tsum.s()).delay().get(timeout=WAIT) == 5
    assert group([]).delay().get(timeout=WAIT) == []


def test_chunks_map_and_starmap(runner: str) -> None:
    pairs = [(i, i) for i in range(7)]
    assert t.add.chunks(pairs, 3).apply_async().get(timeout=WAIT) == [[0, 2, 4], [6, 8, 10],
                                                                        [12]]
    assert t.add.starmap(pairs[:3]).delay().get(timeout=WAIT) == [0, 2, 4]
    assert t.identity.map([1, "a", [2]]).delay().get(timeout=WAIT) == [1, "a", [2]]
    assert (t.tsum.map([[1, 2], [3]]) | t.tsum.s()).delay().get(timeout=WAIT) == 6


def test_callbacks_children_and_collect(runner: str) -> None:
    callback = t.mul.s(10).set(task_id=str(uuid.uuid4()))
    result = t.add.apply_async((1, 1), link=callback)
    assert result.get(timeout=WAIT) == 2
    assert AsyncResult(callback.id, app=t.app).get(timeout=WAIT) == 20
    assert [c.id for c in result.children] == [callback.id]
    assert [v for _, v in result.collect(timeout=WAIT)] == [2, 20]
    ch = chain(t.add.s(1, 1), t.add.s(1), t.add.s(1)).delay()
    ch.get(timeout=WAIT)
    assert [v for _, v in ch.parent.parent.collect(timeout=WAIT)] == [2, 3, 4]
    grouped = t.add.apply_async((1, 1), link=group(t.mul.s(2), t.mul.s(3)))
    grouped.get(timeout=WAIT)
    (child,) = grouped.children
    assert isinstance(child, GroupResult) and child.get(timeout=WAIT) == [4, 6]


def test_what_a_task_sends_becomes_its_children(runner: str) -> None:
    parent = t.spawn.delay(3)
    group_id = parent.get(timeout=WAIT)
    (child,) = parent.children
    assert isinstance(child, GroupResult) and child.id == group_id
    assert child.get(timeout=WAIT) == [0, 2, 4]
    assert [v for _, v in parent.collect(timeout=WAIT)] == [group_id, [0, 2, 4], 0, 2, 4]


# -- nesting -------------------------------------------------------------------------------


def test_chain_of_groups(runner: str) -> None:
    # group | group | task: each group's results go to every member of the next.
    result = chain(group(t.add.s(1, 1), t.add.s(2, 2)), group(t.tsum.s(), t.tsum.s()),
                   t.tsum.s()).delay()
    assert result.get(timeout=WAIT) == 12
    ends_in_group = chain(t.add.s(1, 1), group(t.add.s(1), t.add.s(2))).delay()
    assert ends_in_group.get(timeout=WAIT) == [3, 4]


def test_group_of_chains(runner: str) -> None:
    result = group(chain(t.add.s(i, i), t.mul.s(10)) for i in range(4)).delay()
    assert result.get(timeout=WAIT) == [0, 20, 40, 60]
    nested = group(group(t.add.s(1, 1), t.add.s(2, 2)), t.add.s(3, 3)).delay()
    assert nested.get(timeout=WAIT) == [2, 4, 6]  # nested groups are flattened


def test_chord_inside_a_chain(runner: str) -> None:
    result = chain(t.add.s(1, 1), chord([t.add.s(1), t.add.s(2)], t.tsum.s()),
                   t.mul.s(10), t.add.s(1)).delay()
    assert result.get(timeout=WAIT) == 71
    assert result.parent.parent.get(timeout=WAIT) == 7  # the chord's body


def test_chains_inside_a_chord_header(runner: str) -> None:
    result = chord([chain(t.add.s(i, i), t.mul.s(10)) for i in range(4)], t.tsum.s()).delay()
    assert result.get(timeout=WAIT) == 120
    # A header member that ends in a group reports that group's results as one list.
    ends_in_group = chord([chain(t.add.s(1, 1), group(t.add.s(1), t.add.s(2))),
                           t.add.s(5, 5)], t.collect.s()).delay()
    assert ends_in_group.get(timeout=WAIT) == [[[3, 4], 10]]


def test_nested_chords(runner: str) -> None:
    inner = chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s())
    result = chord([inner, t.add.s(10, 10), chord([t.add.s(0, 1)], t.tsum.s())],
                   t.collect.s()).delay()
    assert result.get(timeout=WAIT) == [[6, 20, 1]]
    # chord | chord: the first body's result goes to every header member of the second
    piped = chain(chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s()),
                  chord([t.add.s(1), t.add.s(2)], t.tsum.s())).delay()
    assert piped.get(timeout=WAIT) == 15


def test_chord_bodies_that_are_workflows(runner: str) -> None:
    header = [t.add.s(1, 1), t.add.s(2, 2)]
    assert chord(header, chain(t.tsum.s(), t.mul.s(2))).delay().get(timeout=WAIT) == 12
    both = chord(header, group(t.tsum.s(), t.collect.s())).delay()
    assert both.get(timeout=WAIT) == [6, [[2, 4]]]
    assert group(chord(header, t.tsum.s()), chord(header, t.collect.s())).delay().get(
        timeout=WAIT) == [6, [[2, 4]]]


# -- failures --------------------------------------------------------------------------------


def test_failure_inside_a_group(runner: str) -> None:
    result = group(t.fail_if.s(i, 2) for i in range(5)).delay()
    with pytest.raises(t.CanvasError, match="bad value 2"):
        result.get(timeout=WAIT)
    values = result.join(timeout=WAIT, propagate=False)
    assert values[:2] == [0, 1] and values[3:] == [3, 4]
    assert isinstance(values[2], t.CanvasError)
    assert result.ready() and result.failed() and not result.successful()
    assert result.completed_count() == 4


def test_failure_stops_a_chain_and_calls_its_errback_once(runner: str) -> None:
    seen = probe()
    old_style = t.on_error_id.s().set(task_id=str(uuid.uuid4()))
    result = chain(t.add.s(1, 1), t.fail.si("step two"), t.add.s(1), t.add.s(1)).apply_async(
        link_error=[t.on_error_full.s(seen), old_style])
    with pytest.raises(t.CanvasError, match="step two"):
        result.get(timeout=WAIT)
    failed_step = result.parent.parent
    # The steps after the failure will never run: they are FAILURE, not PENDING forever.
    assert result.state == st.FAILURE and result.parent.state == st.FAILURE
    assert failed_step.state == st.FAILURE
    assert AsyncResult(seen, app=t.app).get(timeout=WAIT) == {
        "task_id": failed_step.id, "exc_type": "CanvasError", "exc": "step two", "group": None}
    assert AsyncResult(old_style.id, app=t.app).get(timeout=WAIT) == failed_step.id


def test_failing_chord_member_fails_the_chord_with_chord_error(runner: str) -> None:
    seen = probe()
    old_style = t.on_error_id.s().set(task_id=str(uuid.uuid4()))
    c = chord([t.add.s(1, 1), t.fail.s("member broke"), t.add.s(2, 2)], t.tsum.s())
    c.link_error(t.on_error_full.s(seen))
    c.link_error(old_style)
    result = c.delay()
    with pytest.raises(ChordError) as caught:
        result.get(timeout=WAIT)
    header = result.parent
    failed_member = header.results[1]
    assert failed_member.id in str(caught.value)  # the error names the failing member
    assert "member broke" in str(caught.value)
    assert result.state == st.FAILURE
    assert header.join(timeout=WAIT, propagate=False)[0::2] == [2, 4]
    assert failed_member.state == st.FAILURE
    # The chord's errbacks got the body's id (both forms), once.
    info = AsyncResult(seen, app=t.app).get(timeout=WAIT)
    assert info["task_id"] == result.id and info["exc_type"] == "ChordError"
    assert AsyncResult(old_style.id, app=t.app).get(timeout=WAIT) == result.id


def test_a_failing_body_calls_its_errback(runner: str) -> None:
    seen = probe()
    result = chord([t.add.s(1, 1)], t.fail.s()).apply_async(link_error=t.on_error_full.s(seen))
    with pytest.raises(t.CanvasError):
        result.get(timeout=WAIT)
    assert AsyncResult(seen, app=t.app).get(timeout=WAIT)["task_id"] == result.id


def test_failure_inside_a_chain_in_a_chord_header_does_not_hang(runner: str) -> None:
    result = chord([chain(t.fail.s("first step"), t.add.s(1), t.add.s(1)),
                    chain(t.add.s(1, 1), t.mul.s(2))], t.tsum.s()).delay()
    with pytest.raises(ChordError, match="first step"):
        result.get(timeout=WAIT)
    in_chain = chain(t.add.s(1, 1), chord([t.fail.s(), t.add.s(1)], t.tsum.s()),
                     t.add.s(1)).delay()
    with pytest.raises(ChordError):
        in_chain.get(timeout=WAIT)
    assert in_chain.state == st.FAILURE  # the step after the failed chord


def test_a_chord_nested_in_a_header_fails_the_outer_chord(runner: str) -> None:
    inner = chord([t.add.s(1, 1), t.fail.s("deep")], t.tsum.s())
    result = chord([inner, t.add.s(1, 1)], t.tsum.s()).delay()
    with pytest.raises(ChordError, match="deep"):
        result.get(timeout=WAIT)


def test_a_revoked_header_member_fails_the_chord(runner: str) -> None:
    c = chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s())
    body = c.freeze()
    body.parent.results[0].revoke()
    c.apply_async()
    with pytest.raises(ChordError, match="revoked"):
        body.get(timeout=WAIT)
    with pytest.raises(TaskRevokedError):
        body.parent.get(timeout=WAIT)


def test_an_unknown_task_in_a_chord_header_fails_the_chord(runner: str) -> None:
    result = chord([t.add.s(1, 1), signature("no.such.task", app=t.app)], t.tsum.s()).delay()
    with pytest.raises(ChordError, match=r"no\.such\.task"):
        result.get(timeout=WAIT)
    with pytest.raises(NotRegistered):
        result.parent.get(timeout=WAIT)


def test_revoking_a_group(runner: str) -> None:
    g = group(t.add.s(i, i) for i in range(3))
    frozen = g.freeze()
    frozen.revoke()
    g.apply_async()
    with pytest.raises(TaskRevokedError):
        frozen.get(timeout=WAIT)
    assert [r.state for r in frozen] == [st.REVOKED] * 3


def test_group_result_save_and_restore(runner: str) -> None:
    result = group(t.add.s(i, i) for i in range(3)).delay().save()
    restored = GroupResult.restore(result.id, app=t.app)
    assert restored is not None and restored.get(timeout=WAIT) == [0, 2, 4]
    restored.delete()
    assert GroupResult.restore(result.id, app=t.app) is None


# -- scale -----------------------------------------------------------------------------------


def test_a_thousand_member_group_and_chord(runner: str) -> None:
    n = 1000
    started = time.monotonic()
    assert group(t.add.s(i, 1) for i in range(n)).delay().get(timeout=120) == [
        i + 1 for i in range(n)]
    grouped = time.monotonic() - started
    started = time.monotonic()
    assert chord([t.add.s(i, 1) for i in range(n)], t.tsum.s()).delay().get(
        timeout=120) == n * (n + 1) // 2
    chorded = time.monotonic() - started
    assert grouped < 60 and chorded < 60, (grouped, chorded)


# -- canvases from other clients --------------------------------------------------------------


def _celery_canvases() -> dict[str, Any]:
    import celery

    capp = celery.Celery("tests.apps.canvas_tasks", set_as_current=False)
    names = {n: f"tests.apps.canvas_tasks.{n}" for n in ("add", "mul", "tsum", "collect")}

    def stub(full: str) -> Any:
        def run(*args: Any) -> None:  # only the name matters: the client never runs it
            return None

        return capp.task(name=full, shared=False)(run)

    tasks = {n: stub(full) for n, full in names.items()}
    add, mul, tsum = tasks["add"], tasks["mul"], tasks["tsum"]
    return {
        "chain": (add.s(1, 1) | add.s(2) | mul.s(10), 40),
        "group": (celery.group(add.s(i, i) for i in range(3)), [0, 2, 4]),
        "chord": (celery.chord([add.s(i, i) for i in range(3)], tsum.s()), 6),
        "group|task": (celery.group(add.s(1, 1), add.s(2, 2)) | tsum.s(), 6),
        "chain of group": (celery.chain(add.s(1, 1), celery.group(add.s(1), add.s(2)),
                                        tsum.s()), 7),
        "chord of chains": (celery.chord([add.s(1, 1) | mul.s(3), add.s(2, 2)], tsum.s()), 10),
    }


def test_canvases_built_by_celery_run_here(runner: str) -> None:
    from kombu.utils.json import dumps

    for name, (canvas, expected) in _celery_canvases().items():
        data = json.loads(dumps(canvas))
        result = signature(data, app=t.app).apply_async()
        assert result.get(timeout=WAIT) == expected, name


def test_chord_unlock_from_a_celery_client(runner: str) -> None:
    """What a Celery client sends when its backend counts no chords (PROTOCOL.md §1.9)."""
    header = group(t.add.s(i, i) for i in range(3)).delay()
    body = t.tsum.s().freeze()
    callback = t.tsum.s().set(task_id=body.id, group_id=header.id).to_wire()
    t.app.send_task("celery.chord_unlock", (header.id, callback), {
        "interval": 0.05, "max_retries": None,
        "result": [r.as_tuple() for r in header], "_chord_unlock_exchange_type": "direct",
    }, ignore_result=True)
    assert body.get(timeout=WAIT) == 6
    failing = group(t.add.s(1, 1), t.fail.s("unlock")).delay()
    fbody = t.tsum.s().freeze()
    t.app.send_task("celery.chord_unlock", (failing.id, t.tsum.s().set(
        task_id=fbody.id).to_wire()), {"interval": 0.05,
                                        "result": [r.as_tuple() for r in failing]})
    with pytest.raises(ChordError, match=failing.results[1].id):
        fbody.get(timeout=WAIT)


def test_task_replace(runner: str) -> None:
    """The caller's result is the replacement's; links, chain and chord move with it."""
    assert t.replaced_by.delay(1).get(timeout=WAIT) == 101
    assert t.replaced_by.delay(2, kind="chain").get(timeout=WAIT) == 30
    assert t.replaced_by.delay(3, kind="group").get(timeout=WAIT) == [4, 5]
    # The rest of the chain runs after the replacement, with its result.
    steps = chain(t.add.s(1, 1), t.replaced_by.s(kind="chain"), t.add.s(5)).delay()
    assert steps.get(timeout=WAIT) == 35
    # A callback of the replaced task is called with the replacement's result.
    linked = str(uuid.uuid4())
    t.replaced_by.apply_async((1,), link=t.identity.s().set(task_id=linked))
    assert AsyncResult(linked, app=t.app).get(timeout=WAIT) == 101
    # A chord waits for the replacement of a header member, in the member's place.
    body = chord([t.replaced_by.s(1), t.replaced_by.s(3, kind="group"), t.add.s(1, 1)],
                 t.identity.s()).delay()
    assert body.get(timeout=WAIT) == [101, [4, 5], 2]
    # An errback of the replaced task hears of a failure in any step of the replacement.
    seen = probe()
    failing = t.replaced_by.apply_async((7,), {"kind": "failing-chain"},
                                        link_error=t.on_error_full.s(seen))
    with pytest.raises(t.CanvasError, match="replaced 7"):
        failing.get(timeout=WAIT)
    assert AsyncResult(seen, app=t.app).get(timeout=WAIT)["exc"] == "replaced 7"
    # Run eagerly, replace returns the replacement's result.
    assert t.replaced_by.apply((2,), {"kind": "chain"}).get() == 30


def test_add_to_chord(runner: str) -> None:
    body = chord([t.grows_chord.s(1), t.add.s(2, 2)], t.identity.s()).delay()
    assert body.get(timeout=WAIT) == [1, 4, 1000]


def test_workflows_keep_protocol_ids(runner: str) -> None:
    """Each chain step knows its root and parent; chord bodies their group."""
    result = chain(t.whoami.s(), t.whoami.s(), t.whoami.s()).delay()
    last = result.get(timeout=WAIT)
    middle = result.parent.get(timeout=WAIT)
    first = result.parent.parent.get(timeout=WAIT)
    assert first["root_id"] == first["id"] and first["parent_id"] is None
    assert middle["parent_id"] == first["id"] and last["parent_id"] == middle["id"]
    assert {first["root_id"], middle["root_id"], last["root_id"]} == {first["id"]}
    body = chord([t.whoami.s(), t.whoami.s()], t.whoami.s()).delay()
    info = body.get(timeout=WAIT)
    header = body.parent
    assert info["group"] == header.id and info["parent_id"] in [r.id for r in header]
    assert Path(ROOT).exists()
