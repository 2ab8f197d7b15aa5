"""The README's FastAPI example, driven through its HTTP routes the way a user's client would.

The app is imported fresh for each test with DATABASE_URL and CACHE_URL pointing at the stack under
test, so the example a user copies is the one that is known to work.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import event

from tests.fixtures import SQLCounter, Stack

fastapi_testclient = pytest.importorskip("fastapi.testclient")

MODULE = "examples.fastapi_app"


@pytest.fixture
def example(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.setenv("DATABASE_URL", stack.db_url)
    monkeypatch.setenv("CACHE_URL", stack.backend)
    sys.modules.pop(MODULE, None)
    module = importlib.import_module(MODULE)
    try:
        yield module
    finally:
        sys.modules.pop(MODULE, None)


@pytest.fixture
def client(example: ModuleType) -> Iterator[Any]:
    with fastapi_testclient.TestClient(example.app) as client:
        # A clean slate: the example's table and cache entries may remain from another run.
        client.portal.call(_reset, example)
        yield client


async def _reset(example: ModuleType) -> None:
    from sqlalchemy import delete

    async with example.session_maker() as session:
        await session.execute(delete(example.User))
        await session.commit()
    await example.cache.invalidate_all()


def test_example_app_serves_repeat_reads_from_cache_and_commits_evict(
    example: ModuleType, client: Any
) -> None:
    counter = SQLCounter()
    event.listen(example.engine.sync_engine, "before_cursor_execute", counter)
    try:
        assert client.post("/users/7/rename/ada").json() == {"status": "ok"}

        first = client.get("/users/7")
        assert first.json() == {"id": 7, "name": "ada", "active": True}
        selects_after_first = counter.selects
        second = client.get("/users/7")
        assert second.json() == first.json()
        assert counter.selects == selects_after_first, "the repeat read must issue no SQL"

        client.post("/users/7/rename/grace")
        assert client.get("/users/7").json()["name"] == "grace"
        assert [u["name"] for u in client.get("/users").json()] == ["grace"]
        assert client.get("/users/8").status_code == 404

        totals = client.get("/stats").json()["cache"]
        assert totals["hits"] >= 1 and totals["misses"] >= 1
    finally:
        event.remove(example.engine.sync_engine, "before_cursor_execute", counter)


def test_example_app_seeds_users_and_serves_every_documented_route(
    example: ModuleType, client: Any
) -> None:
    documented = {
        tuple(line.split()[:2])
        for line in (example.__doc__ or "").splitlines()
        if line.strip().startswith(("GET ", "POST "))
    }
    served = {
        (method, route.path)
        for route in example.app.routes
        for method in getattr(route, "methods", ()) or ()
        if method in ("GET", "POST")
    }
    assert documented and documented <= served, documented - served

    client.portal.call(example.seed)  # the table is empty after the fixture's reset
    counter = SQLCounter()
    event.listen(example.engine.sync_engine, "before_cursor_execute", counter)
    try:
        names = [u["name"] for u in client.get("/users").json()]
        assert names == [name for _, name in example.SEED]
        before = counter.selects
        assert [u["name"] for u in client.get("/users").json()] == names
        assert counter.selects == before, "the repeat list must issue no SQL"
    finally:
        event.remove(example.engine.sync_engine, "before_cursor_execute", counter)
