"""The rules of a fill and a bump, checked on every store with one suite.

`lua/fill.lua` and `lua/bump.lua` on Redis, `MemoryStore` in process: a fill writes its entry and
the version keys it needs atomically; row versions are created only if absent (and, for a slow
fill, only if their table's version is unchanged), table versions never overwritten, TTLs only
raised, and no entry stored that its own versions would invalidate. tests/ runs the suite on
`mem://`; integration/ adds Redis (and the cluster, where it is available).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sqlacache.backends.base import Bump, Fill
from sqlacache.backends.memory import MemoryStore
from sqlacache.keys import FAST_FILL_SECONDS

PREFIX = "sqlacache-rules-test"
FOREVER = -1


class MemoryProbe:
    """Reads and seeds a MemoryStore's keys directly, as a test of its rules needs."""

    def __init__(self) -> None:
        self.store = MemoryStore()

    async def get(self, key: str) -> bytes | None:
        entry = self.store.fetch([key])[0]  # a fetch's first key is an entry, the rest are not
        return entry if entry is not None else self.store.fetch(["-", key])[1]

    async def set(self, key: str, value: bytes, px: int | None = None) -> None:
        if key.endswith("entry"):
            self.store.store(Fill(key, value, px or 3_600_000))
            return
        bump = Bump(persistent=[key]) if px is None else Bump(expiring=[key])
        self.store.bump(bump, value, px or 0, 0)

    async def pttl(self, key: str) -> int:
        item = self.store._keys.get(key) or self.store._entries.get(key)
        if item is None:
            return -2
        if item[0] == float("inf"):
            return FOREVER
        return int((item[0] - time.monotonic()) * 1000)

    async def close(self) -> None:
        self.store.close()


@pytest.fixture(params=["memory"])
async def probe(request: Any) -> AsyncIterator[Any]:
    made = MemoryProbe()
    yield made
    await made.close()


def k(name: str) -> str:
    return f"{PREFIX}:{name}"


def fill(**changes: object) -> Fill:
    base: dict[str, object] = {
        "entry_key": k("entry"),
        "value": b"payload",
        "ttl_ms": 60_000,
        "extend_ms": 30_000,
        "captured_at": time.monotonic(),
    }
    base.update(changes)
    return Fill(**base)  # type: ignore[arg-type]


async def test_fill_writes_entry_and_creates_only_missing_versions(probe: Any) -> None:
    await probe.set(k("table-old"), b"existing")
    await probe.set(k("row-old"), b"existing", px=60_000)
    await probe.store.store_async(
        fill(
            init=[(k("table-new"), b"t1", None), (k("table-old"), b"existing", None)],
            init_rows=[
                (k("row-new"), b"r1", k("table-new"), None, b""),
                (k("row-old"), b"existing", k("table-old"), b"existing", b""),
            ],
        )
    )
    assert await probe.get(k("entry")) == b"payload"
    assert 59_000 < await probe.pttl(k("entry")) <= 60_000
    assert await probe.get(k("table-new")) == b"t1"
    assert await probe.pttl(k("table-new")) == FOREVER, "table versions never expire"
    assert await probe.get(k("table-old")) == b"existing", "a table version is never overwritten"
    assert await probe.get(k("row-new")) == b"r1"
    assert 29_000 < await probe.pttl(k("row-new")) <= 30_000


@pytest.mark.parametrize("version", ["table", "row"])
async def test_fill_never_overwrites_versions_nor_stores_an_entry_they_invalidate(
    probe: Any, version: str
) -> None:
    """Another process initialised the version first (two fills at once): its entry stays."""
    await probe.set(k("entry"), b"the other process's entry")
    await probe.set(k(version), b"theirs", px=60_000)
    if version == "table":
        await probe.store.store_async(fill(init=[(k("table"), b"ours", None)]))
    else:
        await probe.store.store_async(
            fill(init_rows=[(k("row"), b"ours", k("table"), None, b"")])
        )
    assert await probe.get(k(version)) == b"theirs", "a version is never overwritten"
    assert await probe.get(k("entry")) == b"the other process's entry"


async def test_fill_only_raises_row_version_ttls(probe: Any) -> None:
    await probe.set(k("short"), b"v", px=1_000)
    await probe.set(k("long"), b"v", px=120_000)
    await probe.store.store_async(fill(extend=[k("short"), k("long"), k("absent")]))
    assert 29_000 < await probe.pttl(k("short")) <= 30_000
    assert await probe.pttl(k("long")) > 100_000, "a longer TTL is never shortened"
    assert await probe.get(k("absent")) is None, "extending never creates a key"


@pytest.mark.parametrize(
    ("table_now", "seen", "planned", "created"),
    [
        (b"v1", b"v1", b"", True),  # unchanged since the reader saw it
        (b"v2", b"v1", b"", False),  # a write moved the table on: the row may have changed
        (None, None, b"", True),  # never written, still never written
        (b"p1", None, b"p1", True),  # created meanwhile by this process's own fill
        (b"w1", None, b"p1", False),  # created meanwhile by a write
    ],
)
async def test_slow_fill_creates_row_versions_only_under_an_unchanged_table_version(
    probe: Any, table_now: bytes | None, seen: bytes | None, planned: bytes, created: bool
) -> None:
    if table_now is not None:
        await probe.set(k("table"), table_now)
    slow = time.monotonic() - FAST_FILL_SECONDS - 1
    await probe.store.store_async(
        fill(captured_at=slow, init_rows=[(k("row"), b"r1", k("table"), seen, planned)])
    )
    assert (await probe.get(k("row")) == b"r1") is created
    stored = await probe.get(k("entry")) == b"payload"
    assert stored is created, "an entry whose row version was refused could never validate"


async def test_fast_fill_is_not_guarded(probe: Any) -> None:
    await probe.set(k("table"), b"v2")
    await probe.store.store_async(fill(init_rows=[(k("row"), b"r1", k("table"), b"v1", b"")]))
    assert await probe.get(k("row")) == b"r1"


async def test_bump_sets_tokens_and_counts_lease_holders(probe: Any) -> None:
    store = probe.store
    lease = k("lease")
    await store.bump_async(
        Bump(persistent=[k("table")], expiring=[k("row")], acquire=[lease]), b"t1", 5_000, 60_000
    )
    assert await probe.get(k("table")) == b"t1"
    assert await probe.pttl(k("table")) == FOREVER
    assert 4_000 < await probe.pttl(k("row")) <= 5_000
    assert 59_000 < await probe.pttl(lease) <= 60_000
    await store.bump_async(Bump(acquire=[lease]), b"t2", 5_000, 60_000)  # a second writer
    await store.bump_async(Bump(release=[lease]), b"t3", 5_000, 60_000)
    assert await probe.get(lease) is not None, "the second writer still holds the lease"
    await store.bump_async(Bump(release=[lease]), b"t4", 5_000, 60_000)
    assert await probe.get(lease) is None
    await store.bump_async(Bump(release=[lease]), b"t5", 5_000, 60_000)  # a late duplicate
    assert await probe.get(lease) is None, "releasing a lease nobody holds creates nothing"
