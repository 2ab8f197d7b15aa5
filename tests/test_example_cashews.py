"""docs/cashews.md's FastAPI example: endpoints cached with cashews' decorator stay fresh through
ORM writes, driven through its HTTP routes with no `delete_tags` anywhere."""

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

MODULE = "examples.fastapi_cashews"


@pytest.fixture
def example(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.setenv("DATABASE_URL", stack.db_url)
    monkeypatch.setenv("CACHE_URL", stack.backend)
    monkeypatch.setenv("APP_CACHE_URL", "mem://")
    sys.modules.pop(MODULE, None)
    module = importlib.import_module(MODULE)
    try:
        yield module
    finally:
        sys.modules.pop(MODULE, None)


async def _reset(example: ModuleType) -> None:
    from sqlalchemy import delete

    async with example.session_maker() as session:
        await session.execute(delete(example.Profile))
        await session.commit()
    await example.cache.invalidate_all()
    await example.app_cache.clear()


@pytest.fixture
def client(example: ModuleType) -> Iterator[Any]:
    with fastapi_testclient.TestClient(example.app) as client:
        client.portal.call(_reset, example)
        yield client


def test_cashews_cached_endpoints_stay_fresh_through_orm_writes(
    example: ModuleType, client: Any
) -> None:
    counter = SQLCounter()
    event.listen(example.engine.sync_engine, "before_cursor_execute", counter)
    try:
        assert client.put("/profiles/1/ada").json() == {"status": "ok"}
        assert client.get("/profiles/1").json() == {"id": 1, "name": "ada"}
        assert client.get("/profiles/count").json() == {"count": 1}
        counter.reset()
        assert client.get("/profiles/1").json() == {"id": 1, "name": "ada"}
        assert client.get("/profiles/count").json() == {"count": 1}
        assert counter.selects == 0  # both answered by cashews
        assert client.put("/profiles/1/grace").json() == {"status": "ok"}
        assert client.get("/profiles/1").json() == {"id": 1, "name": "grace"}
        assert client.put("/profiles/2/alan").json() == {"status": "ok"}
        assert client.get("/profiles/count").json() == {"count": 2}
        assert example.cache.stats()["cashews"]["errors"] == 0
    finally:
        event.remove(example.engine.sync_engine, "before_cursor_execute", counter)
