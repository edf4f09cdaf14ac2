"""Nested canvases across implementations, on one Redis (broker and results).

A celeriac client's workflows run by Celery's worker, a Celery client's by celeriac's,
and one chord whose header tasks both kinds of worker run and whose failure both report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from celery import chain as c_chain
from celery import chord as c_chord
from celery import group as c_group

from celeriac import Celery, chain, chord, group
from celeriac.exceptions import ChordError
from tests.apps import interop_tasks as it
from tests.conftest import WorkerProcess

# Celery's rpc:// backend refuses chords, so these run on Redis (RabbitMQ + rpc:// chords
# of celeriac's own: tests/conformance/test_chord.py).
pytestmark = pytest.mark.parametrize("interop", ["redis"], indirect=True)


def test_celeriac_workflows_on_a_celery_worker(celeriac_app: Celery,
                                               celery_worker: Callable[..., Any]) -> None:
    celery_worker()
    nested = chain(it.add.s(1, 1), chord([it.add.s(1), it.add.s(2)], it.xsum.s()),
                   it.mul.s(10))
    assert nested.delay().get(timeout=30) == 70
    assert chord([chain(it.add.s(i, i), it.mul.s(2)) for i in range(3)], it.xsum.s()).delay(
    ).get(timeout=30) == 12
    assert chain(group(it.add.s(1, 1), it.add.s(2, 2)), it.xsum.s()).delay().get(
        timeout=30) == 6
    failing = chord([it.add.s(1, 1), it.fail.si("celery side")], it.xsum.s()).delay()
    with pytest.raises(ChordError, match="celery side"):
        failing.get(timeout=30)


def test_celery_workflows_on_a_celeriac_worker(celery_app: Any,
                                               celeriac_worker: Callable[..., WorkerProcess]
                                               ) -> None:
    celeriac_worker("-c", "2")
    add, mul, xsum = (celery_app.tasks[f"interop.{n}"] for n in ("add", "mul", "xsum"))
    fail = celery_app.tasks["interop.fail"]
    nested = c_chain(add.s(1, 1), c_chord([add.s(1), add.s(2)], xsum.s()), mul.s(10))
    assert nested.delay().get(timeout=30) == 70
    assert c_chord([add.s(i, i) | mul.s(2) for i in range(3)], xsum.s()).delay().get(
        timeout=30) == 12
    assert (c_group(add.s(1, 1), add.s(2, 2)) | xsum.s()).delay().get(timeout=30) == 6
    from celery.exceptions import ChordError as CeleryChordError

    failing = c_chord([add.s(1, 1), fail.si("celeriac side")], xsum.s()).delay()
    # Celery's client raises a failed parent's error (the header's) when it sees it first.
    with pytest.raises((CeleryChordError, ValueError), match="celeriac side"):
        failing.get(timeout=30)
    error = failing.get(timeout=30, propagate=False)
    assert isinstance(error, CeleryChordError) and "celeriac side" in str(error)
