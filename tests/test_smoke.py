"""End to end through a real worker process on SQLite."""

from __future__ import annotations

import pytest

from celeriac import states
from tests.apps import basic
from tests.conftest import bind_app


def test_add_through_worker(db_url: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    app = bind_app(basic.app, db_url)
    start_worker(app, concurrency=2)
    assert basic.add.delay(2, 3).get(timeout=10) == 5
    failed = basic.fail.delay("nope")
    with pytest.raises(ValueError, match="nope"):
        failed.get(timeout=10)
    assert failed.state == states.FAILURE
    assert "ValueError: nope" in (failed.traceback or "")
