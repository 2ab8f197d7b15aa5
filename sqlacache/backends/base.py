"""The storage interface every backend implements, and the records it exchanges with the cache.

Three operations carry the cache, each one round trip on a network backend: `fetch` (an entry and
the versions it depends on), `store` (an entry and the versions it initialises) and `bump` (new
version tokens and write leases). Everything else is bookkeeping for operators and recovery.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..keys import FAST_FILL_SECONDS


@dataclass
class Bump:
    """One invalidation round: new tokens for version keys, lease changes."""

    persistent: list[str] = field(default_factory=list)
    expiring: list[str] = field(default_factory=list)
    acquire: list[str] = field(default_factory=list)
    release: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.persistent or self.expiring or self.acquire or self.release)


@dataclass
class Fill:
    """One entry to store, with the version keys it must initialise or keep alive."""

    entry_key: str
    value: bytes
    ttl_ms: int
    #: table versions (key, token, None) to create if still missing; they never expire
    init: list[tuple[str, bytes, None]] = field(default_factory=list)
    #: row versions (key, token, guarding table version key, the value the reader saw there, the
    #: token this process creates that table version with) to create with TTL `extend_ms` if still
    #: missing and the table version is unchanged (see lua/fill.lua)
    init_rows: list[tuple[str, bytes, str, bytes | None, bytes]] = field(default_factory=list)
    #: row versions whose TTL must be raised to at least `extend_ms` (never shortened)
    extend: list[str] = field(default_factory=list)
    extend_ms: int = 0
    #: `time.monotonic()` before the stamp was fetched (see `guard_rows`)
    captured_at: float = 0.0

    def guard_rows(self) -> bool:
        """Whether creating row versions must be guarded by their table's version.

        A written row's version lives at least WRITTEN_ROW_TTL_MS after its last write; a fill
        stored sooner than that after reading its stamp cannot have missed a write whose version
        came and went meanwhile, so a plain SET NX is exact. Slower fills take the guard.
        """
        return time.monotonic() - self.captured_at > FAST_FILL_SECONDS


class Store(Protocol):
    """What every backend provides.

    The synchronous methods serve both worlds: inside SQLAlchemy's async greenlet a network
    backend awaits its asyncio client (see `_greenlet`), elsewhere it uses a blocking one. The
    `*_async` methods are for coroutines of the cache's own (background fills and deliveries).
    """

    #: True when several processes share what this store holds
    shared: bool
    #: True when an entry and the versions it initialises land together (one script): a fill
    #: may then be stored in the background (a cluster stores them in two steps, see `fill`)
    fills_atomically: bool

    def fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of `keys` (None where missing), in one round trip."""
        ...

    def store(self, fill: Fill) -> None: ...

    async def store_async(self, fill: Fill) -> None: ...

    def bump(self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int) -> None: ...

    async def bump_async(
        self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int
    ) -> None: ...

    def publish(self, channel: str, message: bytes) -> None:
        """Tell the other processes sharing this store (a no-op where none can exist)."""
        ...

    def delete(self, key: str) -> None: ...

    def try_lock(self, key: str, token: bytes, ttl_ms: int) -> bool: ...

    def unlock(self, key: str, token: bytes) -> None: ...

    def add_member(self, key: str, member: str) -> None: ...

    def members(self, key: str) -> list[str]: ...

    def delete_entries(self, pattern_prefix: str) -> int: ...

    def count_keys(self, pattern_prefix: str) -> int: ...

    def warm_up(self) -> None: ...

    def ping(self) -> None: ...

    def server_id(self) -> str | None:
        """An identity of the backend that changes when it restarts (None if it cannot)."""
        ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...
