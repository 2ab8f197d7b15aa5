"""redis-py specifics the Redis backends share: hand-packed commands, the operation deadline,
pool exhaustion, handshake options. Every private redis-py name sqlacache uses lives here.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


def no_handshake_metadata() -> dict[str, Any]:
    """Options that stop redis-py sending CLIENT SETINFO on every new connection."""
    import inspect

    from redis.asyncio.connection import AbstractConnection

    parameters = inspect.signature(AbstractConnection.__init__).parameters
    if "driver_info" in parameters:  # redis-py 8
        return {"driver_info": None}
    if "lib_name" in parameters:  # redis-py 5-7
        return {"lib_name": None, "lib_version": None}
    return {}


class PoolExhausted(Exception):
    """A request waited its whole `pool_timeout` for a connection: local load, not an outage."""


def is_pool_exhausted(exc: BaseException) -> bool:
    return isinstance(exc, PoolExhausted) or (
        type(exc).__name__ == "ConnectionError" and "No connection available" in str(exc)
    )


def pack(command: Sequence[Any]) -> bytes:
    """One command in RESP, as one buffer: the lean path sends only str, bytes and numbers, and
    this costs a third of redis-py's general-purpose packer on a hit."""
    parts = [b"*%d\r\n" % len(command)]
    for argument in command:
        kind = type(argument)
        if kind is str:
            data = argument.encode()
        elif kind is bytes:
            data = argument
        elif kind is int:
            data = b"%d" % argument
        elif kind is float:
            data = repr(argument).encode()
        else:
            raise TypeError(f"cannot send a {kind.__qualname__} to Redis")
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class Deadline:
    """The operation timeout of one command, which only Redis's silence can exhaust.

    When it expires while the reply is already waiting in the socket, the delay is this process's
    own (a busy event loop under load), not Redis's: the command is given more time, up to
    HARD_DEADLINE_FACTOR timeouts, instead of failing and being counted against the backend.
    """

    def __init__(self, seconds: float, connection: Any) -> None:
        self.seconds = seconds
        self.connection = connection
        self._timeout: Any = None
        self._check: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> Deadline:
        loop = asyncio.get_running_loop()
        self._hard = loop.time() + self.seconds * HARD_DEADLINE_FACTOR
        self._timeout = _timeout_context()
        await self._timeout.__aenter__()
        self._check = loop.call_at(loop.time() + self.seconds, self._expire)
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        if self._check is not None:
            self._check.cancel()
        return await self._timeout.__aexit__(*exc)

    def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._hard and _reply_waiting(self.connection):
            self._check = loop.call_at(loop.time() + self.seconds, self._expire)
        else:
            self._timeout.reschedule(loop.time())


HARD_DEADLINE_FACTOR = 20


def _timeout_context() -> Any:
    """An open-ended `asyncio.timeout` (or async_timeout's before 3.11), rescheduled on expiry."""
    return timeout_after(None)


def timeout_after(seconds: float | None) -> Any:
    """`asyncio.timeout(seconds)`, or async_timeout's before 3.11; raises asyncio.TimeoutError."""
    timeout = getattr(asyncio, "timeout", None)
    if timeout is not None:
        return timeout(seconds)
    import async_timeout  # type: ignore[import-not-found]  # redis-py's dependency on 3.10

    return async_timeout.timeout(seconds)


def _reply_waiting(connection: Any) -> bool:
    """Whether bytes from Redis wait for this connection's reader (never consumed): readable on
    its socket, or already read off it by the event loop into the stream's buffer, the reader
    not yet resumed (the loop is busy)."""
    try:
        if connection._reader._buffer:
            return True
        sock = connection._writer.transport.get_extra_info("socket")
        readable, _, _ = select.select([sock], [], [], 0)
    except Exception:
        return False
    return bool(readable)


def glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def redis_timeout(message: str) -> Exception:
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return RedisTimeoutError(message)


def bounded_handshake(seconds: float) -> Callable[[Any], Awaitable[None]]:
    """redis-py's connection handshake (AUTH, HELLO, SELECT, CLIENT SETNAME) under one deadline.

    Installed as the connections' `redis_connect_func`. A Redis that accepts connections and never
    answers would otherwise hold a connection without a socket timeout (a lean one) forever. Like
    a command's, the deadline is one of Redis's silence (see `Deadline`): a burst that keeps the
    event loop busy while replies wait in the sockets must not fail its new connections. A
    handshake cut short, by its deadline or by a cancelled caller, closes its connection: one that
    never ran its AUTH or SELECT must not be handed out again (it would talk to database 0).
    """

    async def handshake(connection: Any) -> None:
        try:
            async with Deadline(seconds, connection):
                await connection.on_connect()
        except BaseException as exc:
            await connection.disconnect(nowait=True)
            if isinstance(exc, asyncio.TimeoutError):
                raise redis_timeout(
                    f"Redis accepted the connection but did not answer its handshake within "
                    f"{seconds}s"
                ) from None
            raise

    return handshake
