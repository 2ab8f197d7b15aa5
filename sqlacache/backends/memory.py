"""`mem://`: the in-process store, thread-safe, with the same rules as the Redis scripts.

Entries live in an LRU bounded by count and bytes; version, lease and lock keys live in their own
dict, so that pressure on entries can never evict the bookkeeping that validates them. The fill and
bump rules mirror lua/fill.lua and lua/bump.lua; tests/test_store_rules.py runs one suite on both.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

from .base import Bump, Fill


class MemoryStore:
    """A thread-safe in-process store (one per cache and process)."""

    shared = False
    fills_atomically = True

    def __init__(self, size: int = 10_000, max_bytes: int = 256 * 1024 * 1024) -> None:
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._keys: dict[str, tuple[float, bytes]] = {}  # versions, leases, locks
        self._sets: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self._writes = 0

    def fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        now = time.monotonic()
        out: list[bytes | None] = []
        with self._lock:
            entry = self._entries.get(keys[0])
            if entry is not None:
                if entry[0] > now:
                    self._entries.move_to_end(keys[0])
                    out.append(entry[1])
                else:
                    self._drop_entry(keys[0])
                    out.append(None)
            else:
                out.append(None)
            get = self._keys.get
            for key in keys[1:]:
                item = get(key)
                out.append(item[1] if item is not None and item[0] > now else None)
        return out

    def store(self, fill: Fill) -> None:
        now = time.monotonic()
        with self._lock:
            guarded = fill.guard_rows()
            valid = True  # as lua/fill.lua: store no entry that could never validate
            for key, token, guard, seen, planned in fill.init_rows:
                table_version = self._live(guard, now)
                unchanged = (
                    not guarded
                    or table_version == seen
                    or (seen is None and table_version == planned)
                )
                current = self._live(key, now)
                if unchanged and current is None:
                    self._keys[key] = (now + fill.extend_ms / 1000, token)
                elif not unchanged or current != token:
                    valid = False
            for key, token, _ in fill.init:
                current = self._live(key, now)
                if current is None:
                    self._keys[key] = (float("inf"), token)
                elif current != token:
                    valid = False
            for key in fill.extend:
                current_ttl = self._keys.get(key)
                if current_ttl is not None and current_ttl[0] < now + fill.extend_ms / 1000:
                    self._keys[key] = (now + fill.extend_ms / 1000, current_ttl[1])
            if valid:
                self._drop_entry(fill.entry_key)
                self._entries[fill.entry_key] = (now + fill.ttl_ms / 1000, fill.value)
                self._bytes += len(fill.value)
                self._evict()
            self._sweep(now)

    async def store_async(self, fill: Fill) -> None:
        self.store(fill)

    def _live(self, key: str, now: float) -> bytes | None:
        item = self._keys.get(key)
        return item[1] if item is not None and item[0] > now else None

    def bump(self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int) -> None:
        now = time.monotonic()
        forever = float("inf")
        with self._lock:
            for key in bump.persistent:
                self._keys[key] = (forever, token)
            for key in bump.expiring:
                self._keys[key] = (now + row_ttl_ms / 1000, token)
            for key in bump.acquire:
                held = self._keys.get(key)
                count = int(held[1]) if held is not None and held[0] > now else 0
                self._keys[key] = (now + lease_ttl_ms / 1000, str(count + 1).encode())
            for key in bump.release:
                held = self._keys.get(key)
                if held is None or held[0] <= now:
                    continue
                count = int(held[1]) - 1
                if count <= 0:
                    del self._keys[key]
                else:
                    self._keys[key] = (held[0], str(count).encode())
            self._sweep(now)

    async def bump_async(
        self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int
    ) -> None:
        self.bump(bump, token, row_ttl_ms, lease_ttl_ms)

    def publish(self, channel: str, message: bytes) -> None:
        return None  # one process: nobody else to tell

    def delete(self, key: str) -> None:
        with self._lock:
            self._drop_entry(key)

    def try_lock(self, key: str, token: bytes, ttl_ms: int) -> bool:
        now = time.monotonic()
        with self._lock:
            held = self._keys.get(key)
            if held is not None and held[0] > now:
                return False
            self._keys[key] = (now + ttl_ms / 1000, token)
            return True

    def unlock(self, key: str, token: bytes) -> None:
        with self._lock:
            held = self._keys.get(key)
            if held is not None and held[1] == token:
                del self._keys[key]

    def warm_up(self) -> None:
        return None

    def add_member(self, key: str, member: str) -> None:
        with self._lock:
            self._sets.setdefault(key, set()).add(member)

    def members(self, key: str) -> list[str]:
        with self._lock:
            return sorted(self._sets.get(key, ()))

    def delete_entries(self, pattern_prefix: str) -> int:
        with self._lock:
            doomed = [k for k in self._entries if k.startswith(pattern_prefix)]
            for key in doomed:
                self._drop_entry(key)
            return len(doomed)

    def count_keys(self, pattern_prefix: str) -> int:
        now = time.monotonic()
        with self._lock:
            entries = sum(
                1 for k, v in self._entries.items() if k.startswith(pattern_prefix) and v[0] > now
            )
            others = sum(
                1 for k, v in self._keys.items() if k.startswith(pattern_prefix) and v[0] > now
            )
            return entries + others

    def ping(self) -> None:
        return None

    def server_id(self) -> str | None:
        return None

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._keys.clear()
            self._sets.clear()
            self._bytes = 0

    async def aclose(self) -> None:
        self.close()

    # -- internals --

    def _drop_entry(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[1])

    def _evict(self) -> None:
        while self._entries and (len(self._entries) > self._size or self._bytes > self._max_bytes):
            _, (_, value) = self._entries.popitem(last=False)
            self._bytes -= len(value)

    def _sweep(self, now: float) -> None:
        # Expired row versions, leases and locks are dropped every so often so that bookkeeping
        # stays bounded by what is live, without a background thread.
        self._writes += 1
        if self._writes % 1024:
            return
        for key in [k for k, v in self._keys.items() if v[0] <= now]:
            del self._keys[key]
        for key in [k for k, v in self._entries.items() if v[0] <= now]:
            self._drop_entry(key)
