"""Fault injection for the "never down" integration tests, against real processes.

- `RedisServer` / `redis_server()`: a private `redis-server` on a free loopback port, which a test can
  SIGKILL and restart on the same port; always killed at the end.
- `FaultProxy` / `fault_proxy()`: an asyncio TCP proxy in front of Redis, in the test's event loop.
  Modes: pass-through (optionally with added latency), `cut()` (drop every connection and refuse new
  ones), `blackhole()` (accept and read, never forward nor answer; `drop_existing=True` also drops
  the connections already open, as a Redis that hung after the process connected), `restore()`.
- `ReaderProcess`: a second, real Python process that reads through its own `CacheManager`
  (run as `python -m integration.faultkit reader ...`), answering commands on stdin/stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's choice for an ephemeral bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# -- a private redis-server --------------------------------------------------------------------


class RedisServer:
    """One `redis-server` process on a fixed loopback port, without persistence."""

    READY = "Ready to accept connections"

    def __init__(self, port: int | None = None, args: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        #: extra command-line arguments, e.g. ("--requirepass", "secret")
        self.args = list(args)
        self._dir = tempfile.mkdtemp(prefix="sqlacache-redis-")
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and return once it logs that it accepts connections."""
        if self.running:
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self._lines = queue.Queue()
        command = [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", ""]
        command += ["--appendonly", "no", "--dir", self._dir, "--daemonize", "no", *self.args]
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self._proc = proc
        threading.Thread(target=self._drain, args=(proc, self._lines), daemon=True).start()
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                self.kill()
                raise RuntimeError(
                    f"redis-server on port {self.port} not ready after {timeout}s:\n"
                    + "".join(self.log[-20:])
                ) from None
            if line is None:
                raise RuntimeError(
                    f"redis-server on port {self.port} exited with {proc.wait()}:\n"
                    + "".join(self.log[-20:])
                )
            if self.READY in line:
                return

    def _drain(self, proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.log.append(line)
            lines.put(line)
        lines.put(None)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to clients (their next read fails)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()

    def restart(self) -> None:
        """Kill if running, then start again on the same port (with an empty dataset)."""
        self.kill()
        self.start()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def redis_server(start: bool = True, args: Sequence[str] = ()) -> Iterator[RedisServer]:
    server = RedisServer(args=args)
    try:
        if start:
            server.start()
        yield server
    finally:
        server.cleanup()


# -- a TCP proxy that fails on demand ------------------------------------------------------------


class _Link:
    """One client connection through the proxy, and its upstream connection if any."""

    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.writers: list[asyncio.StreamWriter] = [client]
        self.tasks: set[asyncio.Task[Any]] = set()
        #: bytes were dropped on this connection: the protocol stream is out of step for good
        self.tainted = False
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for writer in self.writers:
            writer.transport.abort()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        self.proxy._links.discard(self)


class FaultProxy:
    """A loopback TCP proxy in front of `upstream_port`, run by the current event loop.

    `cut()`, `blackhole()` and `delay()` are synchronous, so they may be called from SQLAlchemy
    event hooks; `restore()` is a coroutine (it may listen again).
    """

    def __init__(self, upstream_port: int, port: int = 0) -> None:
        self.upstream_port = upstream_port
        self.port = port
        self.mode = "pass"  # pass | cut | blackhole
        self.latency = 0.0
        self.accepted = 0
        self.cuts = 0
        self._server: asyncio.AbstractServer | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watches: list[tuple[bytes, asyncio.Event]] = []

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    async def start(self) -> FaultProxy:
        await self._listen()
        return self

    async def _listen(self) -> None:
        if self._server is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, self.port))
        self.port = int(sock.getsockname()[1])
        self._server = await asyncio.start_server(self._handle, sock=sock)

    # -- faults ---------------------------------------------------------------------------------

    def cut(self) -> None:
        """Close every connection now and refuse new ones (the port stops listening)."""
        self.mode = "cut"
        self.cuts += 1
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            link.close()

    def blackhole(self, *, drop_existing: bool = False) -> None:
        """Keep accepting and reading, but forward nothing and answer nothing.

        `drop_existing`: also close the connections open now, so that the client must connect
        again and meets the silence in its connection handshake (HELLO, AUTH, SELECT).
        """
        self.mode = "blackhole"
        if drop_existing:
            for link in list(self._links):
                link.close()

    def delay(self, seconds: float) -> None:
        """Pass-through, each chunk held `seconds` before it is forwarded (both directions)."""
        self.latency = seconds

    async def restore(self, latency: float = 0.0) -> None:
        """Pass-through again. Connections that lost bytes meanwhile are closed: out of step."""
        for link in list(self._links):
            if link.tainted:
                link.close()
        self.mode = "pass"
        self.latency = latency
        await self._listen()

    def stop_listening(self) -> None:
        """Close the listening socket only (its port can be listened on again at once); the
        connections open now are left as they are."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def watch(self, needle: bytes) -> asyncio.Event:
        """An event set when a client sends bytes containing `needle` (seen at the proxy)."""
        event = asyncio.Event()
        self._watches.append((needle, event))
        return event

    # -- plumbing -------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.accepted += 1
        link = _Link(self, writer)
        link.tasks.add(task)
        self._links.add(link)
        try:
            if self.mode == "cut":
                return
            if self.mode == "blackhole":
                link.tainted = True
                while await reader.read(65536):
                    pass
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.upstream_port)
            except OSError:
                return  # upstream down: the client sees its connection closed
            link.writers.append(up_writer)
            if link.closed:
                up_writer.transport.abort()
                return
            outbound = self._spawn(link, self._pipe(link, reader, up_writer, True))
            inbound = self._spawn(link, self._pipe(link, up_reader, writer, False))
            await asyncio.gather(outbound, inbound, return_exceptions=True)
        except (asyncio.CancelledError, OSError):
            pass
        finally:
            link.close()

    async def _pipe(
        self,
        link: _Link,
        source: asyncio.StreamReader,
        target: asyncio.StreamWriter,
        outbound: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        in_flight: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            try:
                while True:
                    due, data = await in_flight.get()
                    wait = due - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if self.mode != "pass" or link.tainted:
                        link.tainted = True
                        continue
                    target.write(data)
                    await target.drain()
            except (OSError, asyncio.CancelledError):
                link.close()

        self._spawn(link, forward())
        try:
            while data := await source.read(65536):
                if outbound:
                    self._notify(data)
                if self.mode != "pass" or link.tainted:
                    link.tainted = True
                    continue
                in_flight.put_nowait((loop.time() + self.latency, data))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            link.close()  # what is still in flight is lost with the connection

    def _spawn(self, link: _Link, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        link.tasks.add(task)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _notify(self, data: bytes) -> None:
        for needle, event in list(self._watches):
            if needle in data:
                event.set()
                self._watches.remove((needle, event))

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            link.close()
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def fault_proxy(upstream_port: int) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(upstream_port)
    try:
        yield await proxy.start()
    finally:
        await proxy.aclose()


# -- a second process ------------------------------------------------------------------------------


class ReaderProcess:
    """Another OS process with its own engine and CacheManager, reading users on command."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path

    @classmethod
    async def start(
        cls, *, pg_url: str, redis_url: str, prefix: str, stderr_path: Path, timeout: float = 30
    ) -> ReaderProcess:
        stderr = stderr_path.open("wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "integration.faultkit",
                "reader",
                "--pg",
                pg_url,
                "--redis",
                redis_url,
                "--prefix",
                prefix,
                cwd=str(ROOT),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        finally:
            stderr.close()
        reader = cls(proc, stderr_path)
        ready = await reader._reply(timeout)
        if not ready.get("ready"):
            raise RuntimeError(f"reader process did not start: {ready}")
        return reader

    async def _reply(self, timeout: float = 20) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except asyncio.TimeoutError:
            line = b""
        if not line:
            raise RuntimeError(
                "reader process gave no answer; its stderr:\n"
                + self.stderr_path.read_text(errors="replace")[-4000:]
            )
        return dict(json.loads(line))

    async def call(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self.proc.stdin.drain()
        reply = await self._reply()
        if "error" in reply:
            raise RuntimeError(f"reader process failed on {command}: {reply['error']}")
        return reply

    async def get_user_name(self, pk: int) -> tuple[str | None, int]:
        """(name, number of SELECTs the reader's database saw for it)."""
        reply = await self.call(cmd="get_user", id=pk)
        return reply["name"], int(reply["selects"])

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.call(cmd="quit")
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def _reader_main(pg_url: str, redis_url: str, prefix: str) -> None:
    from sqlalchemy import event
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    import sqlacache
    from tests.models import User

    engine = create_async_engine(pg_url)
    selects = [0]

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            selects[0] += 1

    cache = sqlacache.configure(
        backend=redis_url, models={"*": {"timeout": 300}}, prefix=prefix, operation_timeout=0.5
    )
    await cache.bind(engine)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    def answer(reply: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()

    answer({"ready": True})
    try:
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                break
            command = json.loads(line)
            try:
                if command["cmd"] == "quit":
                    answer({"bye": True})
                    break
                if command["cmd"] == "get_user":
                    before = selects[0]
                    async with sessions() as session:
                        user = await session.get(User, command["id"])
                        name = None if user is None else user.name
                    answer({"name": name, "selects": selects[0] - before})
                elif command["cmd"] == "stats":
                    answer({"stats": cache.stats()})
                else:
                    answer({"error": f"unknown command {command!r}"})
            except Exception as exc:
                answer({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        await cache.disconnect()
        await engine.dispose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m integration.faultkit")
    sub = parser.add_subparsers(dest="role", required=True)
    reader = sub.add_parser("reader", help="serve cached reads of users on stdin commands")
    reader.add_argument("--pg", required=True)
    reader.add_argument("--redis", required=True)
    reader.add_argument("--prefix", required=True)
    args = parser.parse_args(argv)
    asyncio.run(_reader_main(args.pg, args.redis, args.prefix))


if __name__ == "__main__":
    main()
