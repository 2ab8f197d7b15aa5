"""Redis-side measurements: the RTT reference, commands per operation, round trips per operation.

Commands come from the server's `INFO commandstats` (every command, including those a pipeline or a
Lua script runs); round trips are counted in the client, as requests written to a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

PREFIX = "bench"  # every key the bench writes, the cache's and its own, lives under `bench:`
RTT_KEY = f"{PREFIX}:rtt"
RTT_VALUE = b"x" * 800
_IGNORED = frozenset({"info"})  # the meter's own command


@dataclass
class Window:
    """What happened on Redis between entering and leaving `Meter.window()`."""

    commands: dict[str, int] = field(default_factory=dict)
    round_trips: int = 0

    @property
    def total_commands(self) -> int:
        return sum(self.commands.values())


class Meter:
    """A separate client: the RTT reference, commandstats snapshots and bench-key cleanup."""

    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(url, decode_responses=False)

    async def prepare(self) -> str:
        """Check the server answers, store the RTT value, return the server version."""
        info = await self.client.info("server")
        await self.client.set(RTT_KEY, RTT_VALUE)
        return str(info.get("redis_version", "?"))

    async def rtt(self, _number: int) -> None:
        await self.client.get(RTT_KEY)

    async def delete_bench_keys(self) -> int:
        """Delete the keys under `bench:` and nothing else (never FLUSHDB: the DB may be shared)."""
        deleted = 0
        batch: list[bytes] = []
        async for key in self.client.scan_iter(match=f"{PREFIX}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += await self.client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += await self.client.unlink(*batch)
        return deleted

    async def commandstats(self) -> dict[str, int]:
        raw: dict[str, Any] = await self.client.info("commandstats")
        out: dict[str, int] = {}
        for name, value in raw.items():
            command = name.removeprefix("cmdstat_")
            if command in _IGNORED:
                continue
            calls = value.get("calls", 0) if isinstance(value, dict) else 0
            out[command] = int(calls)
        return out

    @contextlib.asynccontextmanager
    async def window(self) -> AsyncIterator[Window]:
        """Count what the process sends to Redis inside the block.

        Round trips are counted where any asyncio Redis client hands a request to its socket
        (`StreamWriter.write`/`writelines`: a pipeline is one), so the count does not depend on
        how sqlacache drives redis-py. Only the code inside the block may talk to Redis meanwhile;
        the meter's own INFO calls happen outside it.
        """
        result = Window()
        before = await self.commandstats()
        write, writelines = asyncio.StreamWriter.write, asyncio.StreamWriter.writelines

        def counting_write(writer: asyncio.StreamWriter, data: Any) -> None:
            result.round_trips += 1
            write(writer, data)

        def counting_writelines(writer: asyncio.StreamWriter, data: Any) -> None:
            result.round_trips += 1
            writelines(writer, data)

        setattr(asyncio.StreamWriter, "write", counting_write)  # noqa: B010
        setattr(asyncio.StreamWriter, "writelines", counting_writelines)  # noqa: B010
        try:
            yield result
        finally:
            setattr(asyncio.StreamWriter, "write", write)  # noqa: B010
            setattr(asyncio.StreamWriter, "writelines", writelines)  # noqa: B010
        after = await self.commandstats()
        for command, calls in after.items():
            delta = calls - before.get(command, 0)
            if delta:
                result.commands[command] = delta

    async def per_op(
        self, op: Callable[[int], Awaitable[Any]], first: int, n: int, repeats: int = 3
    ) -> dict[str, Any]:
        """Commands and round trips per op over `n` ops, the quietest of `repeats` windows.

        commandstats is server-wide and other clients may share this Redis; they can only add
        commands, so the window with the fewest is the one that saw only ours.
        """
        best: Window | None = None
        number = first
        for _ in range(repeats):
            async with self.window() as window:
                for _ in range(n):
                    await op(number)
                    number += 1
            if best is None or window.total_commands < best.total_commands:
                best = window
        assert best is not None
        return {
            "round_trips": round(best.round_trips / n, 2),
            "commands": round(best.total_commands / n, 2),
            "by_command": {k: round(v / n, 2) for k, v in sorted(best.commands.items())},
            "n": n,
        }

    async def aclose(self) -> None:
        await self.client.aclose()


async def reachable(url: str, timeout: float = 2.0) -> str | None:
    """None if Redis answers at `url`, else why not."""
    client = aioredis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        await client.ping()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        await client.aclose()
