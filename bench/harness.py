"""What every benchmark measurement stands on: the schema, the engines, the floor session and timing.

Nothing here knows about table layout or bars; `run.py` composes these pieces into the benchmark workloads.
"""

from __future__ import annotations

import asyncio
import datetime
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import DateTime, String, event, insert, text
from sqlalchemy.engine import FrozenResult, Result
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, ORMExecuteState, Session, mapped_column
from sqlalchemy.orm.loading import merge_frozen_result

N_ROWS = 20_000  # get/fetch misses need keys nobody has read yet: far more rows than samples
HOT_ROWS = 1_000  # the throughput workload's working set (P6)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "bench_users"  # not `users`: the database may hold an application's
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(60))
    email: Mapped[str] = mapped_column(String(120))
    age: Mapped[int]
    active: Mapped[bool]
    created: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))


def user_rows(n: int) -> list[dict[str, Any]]:
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    return [
        {
            "id": i,
            "name": f"user {i}",
            "email": f"user{i}@example.com",
            "age": 18 + i % 60,
            "active": i % 7 != 0,
            "created": start + datetime.timedelta(minutes=i),
        }
        for i in range(1, n + 1)
    ]


async def create_schema(engine: AsyncEngine, rows: int = N_ROWS) -> None:
    """Drop and recreate the bench's own table, then fill it; only `Base.metadata` is touched."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
        data = user_rows(rows)
        for start in range(0, len(data), 5_000):
            await conn.execute(insert(User), data[start : start + 5_000])
    if engine.dialect.name == "postgresql":
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("VACUUM ANALYZE bench_users"))


def make_engine(url: str, pool_size: int = 10) -> AsyncEngine:
    """Every engine of the run has the same pool, so cached and uncached queue alike at 50 tasks."""
    if url.startswith("sqlite"):
        return create_async_engine(url, connect_args={"timeout": 30})
    return create_async_engine(url, pool_size=pool_size, max_overflow=0)


def sessions_for(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


# -- the floor -----------------------------------------------------------------------------------


class FloorSession(Session):
    """A Session whose SELECTs are served from a plain dict of `FrozenResult`s.

    This is the physical limit of any cache living inside the ORM: no serialisation, no I/O, no
    validation, only session set-up and `merge_frozen_result` building the objects, as in
    SQLAlchemy's dogpile_caching example.
    """


class FloorCache:
    """The dict behind `FloorSession`, keyed by SQLAlchemy's own statement cache key."""

    def __init__(self) -> None:
        self.results: dict[Any, FrozenResult[Any]] = {}

    def install(self) -> None:
        event.listen(FloorSession, "do_orm_execute", self.on_execute)

    def remove(self) -> None:
        if event.contains(FloorSession, "do_orm_execute", self.on_execute):
            event.remove(FloorSession, "do_orm_execute", self.on_execute)

    def on_execute(self, state: ORMExecuteState) -> Result[Any] | None:
        if not state.is_select:
            return None
        statement: Any = state.statement
        cache_key = statement._generate_cache_key()
        if cache_key is None:
            return None
        parameters: Any = state.parameters
        key = (
            cache_key.key,
            tuple(_hashable(bp.effective_value) for bp in cache_key.bindparams),
            tuple(sorted((k, _hashable(v)) for k, v in parameters.items())) if parameters else (),
        )
        frozen = self.results.get(key)
        if frozen is None:
            frozen = state.invoke_statement().freeze()
            self.results[key] = frozen
        merged: FrozenResult[Any] = _merge(state.session, statement, frozen, load=False)
        return merged()


_merge: Any = merge_frozen_result  # untyped in SQLAlchemy


def _hashable(value: Any) -> Any:
    """An expanding IN's list of values (a selectin load's keys) as a dict key."""
    return tuple(map(_hashable, value)) if isinstance(value, list) else value


def floor_sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, sync_session_class=FloorSession)


# -- counting SQL ----------------------------------------------------------------------------------


@dataclass
class SQLCounter:
    """Counts statements sent by the engines it listens to (`before_cursor_execute`)."""

    selects: int = 0
    writes: int = 0
    _engines: list[AsyncEngine] = field(default_factory=list)

    def listen(self, engine: AsyncEngine) -> None:
        event.listen(engine.sync_engine, "before_cursor_execute", self._on_execute)
        self._engines.append(engine)

    def unlisten(self, engine: AsyncEngine | None = None) -> None:
        """Stop counting `engine`'s statements, or every engine's."""
        for listened in [e for e in self._engines if engine is None or e is engine]:
            event.remove(listened.sync_engine, "before_cursor_execute", self._on_execute)
            self._engines.remove(listened)

    def _on_execute(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip()[:6].upper() in ("SELECT", "WITH"):
            self.selects += 1
        else:
            self.writes += 1


# -- timing ----------------------------------------------------------------------------------------

#: One operation: gets a sequence number, returns None (the harness times it) or its own µs.
Op = Callable[[int], Awaitable[float | None]]


@dataclass
class Samples:
    """Per-operation timings of one variant, plus what it sent to the database."""

    micros: list[float] = field(default_factory=list)
    selects: int = 0

    def median(self) -> float:
        return statistics.median(self.micros)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.micros)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, float]:
        n = len(self.micros)
        return {
            "median_us": round(self.median(), 1),
            "p10_us": round(self.quantile(0.10), 1),
            "p90_us": round(self.quantile(0.90), 1),
            "n": n,
            "selects_per_op": round(self.selects / n, 3) if n else 0.0,
        }


async def interleave(
    variants: Mapping[str, Op],
    rounds: int,
    batch: int,
    sql: SQLCounter,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Samples]:
    """Run each variant `rounds` times in batches of `batch` ops, rotating the order every round.

    On a noisy 2-vCPU machine, a variant measured a minute after another sees a different machine;
    alternating short batches exposes every variant to the same noise, so their ratios hold.
    `settle` runs untimed after every batch: work a batch left in the background (a miss's entry
    being written) is then never charged to the next variant's batch.
    """
    names = list(variants)
    samples = {name: Samples() for name in names}
    sequence = dict.fromkeys(names, 0)
    clock = time.perf_counter_ns
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            op, out = variants[name], samples[name]
            before = sql.selects
            for _ in range(batch):
                number = sequence[name]
                sequence[name] = number + 1
                start = clock()
                own = await op(number)
                out.micros.append(own if own is not None else (clock() - start) / 1000)
            out.selects += sql.selects - before
            if settle is not None:
                await settle()
    return samples


async def throughput(
    read: Callable[[int], Awaitable[None]],
    write: Callable[[int, int], Awaitable[None]],
    tasks: int,
    seconds: float,
    seed: int,
    write_share: float = 0.05,
) -> tuple[int, float]:
    """(operations, elapsed seconds) of `tasks` workers on `HOT_ROWS` rows, 95 % reads by default."""
    import random

    loop = asyncio.get_running_loop()
    stop = loop.time() + seconds

    async def worker(number: int) -> int:
        rng = random.Random(seed * 1_000 + number)
        done = 0
        while loop.time() < stop:
            pk = rng.randint(1, HOT_ROWS)
            if rng.random() < write_share:
                await write(pk, rng.randint(0, 1 << 30))
            else:
                await read(pk)
            done += 1
        return done

    start = time.perf_counter()
    counts = await asyncio.gather(*(worker(n) for n in range(tasks)))
    return sum(counts), time.perf_counter() - start


def cycle(keys: Sequence[int]) -> Callable[[int], int]:
    return lambda number: keys[number % len(keys)]
