"""Field findings of issue 9: stale or wrong-tenant data and values that a hit must never serve.

Each test names the item of the issue it covers. They run on mem:// + SQLite here and on
Redis + PostgreSQL from integration/ (PostgreSQL-only behaviour lives in integration/).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import uuid
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import (
    DDL,
    DateTime,
    Float,
    ForeignKey,
    String,
    TypeDecorator,
    and_,
    create_engine,
    event,
    exists,
    func,
    literal_column,
    select,
    text,
    type_coerce,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    column_property,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)
from sqlalchemy.types import Uuid

import sqlacache
from sqlacache.database import database_identity
from tests.catalog import Category, Product
from tests.models import Base, Seat, User

# -- models of this module (their own metadata, created by the `field_tables` fixture) -----------


class FieldBase(DeclarativeBase):
    pass


class Badge(FieldBase):
    __tablename__ = "ff_badges"
    id: Mapped[int] = mapped_column(primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("ff_members.id"))
    label: Mapped[str] = mapped_column(String(20), default="b")


class Member(FieldBase):
    __tablename__ = "ff_members"
    id: Mapped[int] = mapped_column(primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("ff_teams.id"))
    name: Mapped[str] = mapped_column(String(20))
    # a correlated subquery on a third table
    badge_count: Mapped[int] = column_property(
        select(func.count(Badge.id))
        .where(Badge.member_id == id)
        .correlate_except(Badge)
        .scalar_subquery()
    )


class Team(FieldBase):
    __tablename__ = "ff_teams"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))
    # an eager collection whose loader reads ff_badges through Member.badge_count
    members: Mapped[list[Member]] = relationship(lazy="selectin", order_by=Member.id)
    # a relationship whose primaryjoin reads a third table through EXISTS
    decorated: Mapped[list[Member]] = relationship(
        primaryjoin=lambda: and_(
            Team.id == Member.team_id, exists().where(Badge.member_id == Member.id)
        ),
        viewonly=True,
        lazy="select",
        order_by=Member.id,
    )


class Tagged(str):
    """A str subclass whose constructor needs more than the string (copy/pickle cannot rebuild)."""

    def __new__(cls, value: str, source: str) -> Tagged:
        obj = super().__new__(cls, value)
        obj.source = source  # type: ignore[attr-defined]
        return obj


class Plain(str):
    """A str subclass that copies fine, but is not a str: a hit must not turn it into one."""


class TaggedText(TypeDecorator[Any]):
    impl = String(40)
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else Tagged(value, "db")


class PlainText(TypeDecorator[Any]):
    impl = String(40)
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else Plain(value)


class TaggedUUID(uuid.UUID):
    """An application's UUID subclass (not a driver's): it must not come back as uuid.UUID."""


class TaggedUUIDType(TypeDecorator[Any]):
    impl = Uuid()
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else TaggedUUID(str(value))


class ZonedDateTime(TypeDecorator[Any]):
    """Gives every value the zone `Europe/Berlin` (a ZoneInfo), as psycopg 3 does with the
    session's TimeZone; SQLite has no time zones of its own."""

    impl = DateTime()
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is None or value.tzinfo is None:
            return value
        return value.astimezone(datetime.timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        return value.replace(tzinfo=datetime.timezone.utc).astimezone(ZoneInfo("Europe/Berlin"))


class Note(FieldBase):
    __tablename__ = "ff_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    tagged: Mapped[str | None] = mapped_column(TaggedText(), nullable=True)
    plain: Mapped[str | None] = mapped_column(PlainText(), nullable=True)
    ident: Mapped[uuid.UUID | None] = mapped_column(TaggedUUIDType(), nullable=True)
    at: Mapped[datetime.datetime | None] = mapped_column(ZonedDateTime(), nullable=True)


@pytest.fixture
async def field_tables(engine: Any) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(FieldBase.metadata.drop_all)
        await conn.run_sync(FieldBase.metadata.create_all)


def _forget_recent_fills(cache: sqlacache.CacheManager) -> None:
    """A miss right after a fill may take the filler's in-memory snapshot (stampede protection);
    forgetting it makes the next read decode the stored entry, which is what is tested."""
    cache._bound.read_path.filler.flights._recent.clear()  # type: ignore[union-attr]


def _bypasses(cache: sqlacache.CacheManager, model: str, op: str) -> dict[str, int]:
    return dict(cache.stats()["models"].get(model, {}).get(op, {}).get("bypasses", {}))


async def _seed_users(sessions: Any, n: int = 2) -> None:
    async with sessions() as s:
        s.add_all([User(id=i, name=f"user{i}") for i in range(1, n + 1)])
        await s.commit()


async def _names(sessions: Any, stmt: Any) -> list[str]:
    async with sessions() as s:
        return [u.name for u in (await s.execute(stmt)).scalars()]


# -- item 1: schema_translate_map set on an "option engine" -------------------------------------


class TenantNote(DeclarativeBase):
    pass


class Memo(TenantNote):
    __tablename__ = "ff_memos"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(String(20))


async def _tenant_schemas(engine: Any, tmp_dir: Path) -> None:
    """Schemas `tenant_a` and `tenant_b`, each with its own `ff_memos` table."""
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _attach(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            for schema in ("tenant_a", "tenant_b"):
                cursor.execute(f"ATTACH DATABASE '{tmp_dir / schema}.sqlite' AS {schema}")
            cursor.close()

        await engine.dispose()  # pooled connections were opened before the ATTACH listener
    async with engine.begin() as conn:
        for schema in ("tenant_a", "tenant_b"):
            if engine.dialect.name != "sqlite":
                await conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
                await conn.execute(text(f"CREATE SCHEMA {schema}"))
            tenant = await conn.execution_options(schema_translate_map={None: schema})
            await tenant.run_sync(TenantNote.metadata.drop_all)
            await tenant.run_sync(TenantNote.metadata.create_all)


async def test_an_option_engine_schema_translate_map_keeps_tenants_apart(
    make_cache: Any, engine: Any, tmp_path: Path
) -> None:
    """Item 1: a sessionmaker bound to `engine.execution_options(schema_translate_map=...)`
    (an option engine sharing the pool) never serves tenant B tenant A's rows."""
    await _tenant_schemas(engine, tmp_path)
    await make_cache()
    tenant_a = engine.execution_options(schema_translate_map={None: "tenant_a"})
    tenant_b = engine.execution_options(schema_translate_map={None: "tenant_b"})
    sessions_a = async_sessionmaker(tenant_a, expire_on_commit=False)
    sessions_b = async_sessionmaker(tenant_b, expire_on_commit=False)
    async with sessions_a() as s:
        s.add(Memo(id=1, body="tenant a"))
        await s.commit()
    stmt = select(Memo).order_by(Memo.id)
    async with sessions_a() as s:
        assert [m.body for m in (await s.scalars(stmt))] == ["tenant a"]
        assert (await s.get(Memo, 1)).body == "tenant a"
    async with sessions_b() as s:
        assert [m.body for m in (await s.scalars(stmt))] == []
        assert await s.get(Memo, 1) is None
    # and a write of tenant B makes its own entries fresh, not tenant A's
    async with sessions_b() as s:
        s.add(Memo(id=1, body="tenant b"))
        await s.commit()
    async with sessions_b() as s:
        assert [m.body for m in (await s.scalars(stmt))] == ["tenant b"]
        assert (await s.get(Memo, 1)).body == "tenant b"
    async with sessions_a() as s:
        assert [m.body for m in (await s.scalars(stmt))] == ["tenant a"]


async def test_an_option_engine_tenant_reads_its_own_committed_writes(
    make_cache: Any, engine: Any, tmp_path: Path
) -> None:
    """Item 1: with an option engine, a commit of tenant A makes tenant A's entries stale."""
    await _tenant_schemas(engine, tmp_path)
    await make_cache()
    tenant_a = engine.execution_options(schema_translate_map={None: "tenant_a"})
    sessions_a = async_sessionmaker(tenant_a, expire_on_commit=False)
    async with sessions_a() as s:
        s.add(Memo(id=1, body="v1"))
        await s.commit()
    stmt = select(Memo).order_by(Memo.id)
    for _ in range(2):
        async with sessions_a() as s:
            assert [m.body for m in await s.scalars(stmt)] == ["v1"]
    async with sessions_a() as s:
        (await s.get(Memo, 1, populate_existing=True)).body = "v2"
        await s.commit()
    async with sessions_a() as s:
        assert [m.body for m in await s.scalars(stmt)] == ["v2"]


async def test_a_connection_schema_translate_map_keeps_tenants_apart(
    make_cache: Any, engine: Any, tmp_path: Path
) -> None:
    """Item 1: sessions bound to connections with `schema_translate_map={None: ...}` (which
    SQLAlchemy stores with an extra "_none" key beside None) are cached apart, and never raise."""
    await _tenant_schemas(engine, tmp_path)
    await make_cache()
    async with engine.begin() as conn:
        tenant = await conn.execution_options(schema_translate_map={None: "tenant_a"})
        await tenant.execute(Memo.__table__.insert().values(id=1, body="tenant a"))

    async def read(schema: str) -> tuple[list[str], Any]:
        async with engine.connect() as conn:
            tenant = await conn.execution_options(schema_translate_map={None: schema})
            async with AsyncSession(bind=tenant) as s:
                bodies = [m.body for m in await s.scalars(select(Memo).order_by(Memo.id))]
                memo = await s.get(Memo, 1)
                return bodies, None if memo is None else memo.body

    for _ in range(2):
        assert await read("tenant_a") == (["tenant a"], "tenant a")
        assert await read("tenant_b") == ([], None)


# -- item 3: in-memory SQLite engines have identities of their own ------------------------------


def test_engines_on_no_shared_database_have_identities_of_their_own(tmp_path: Path) -> None:
    """Item 3: `sqlite://`, `sqlite:///:memory:`, a file-less creator: one identity per engine;
    a file, or a server database, is one identity whatever engine names it."""
    import sqlite3

    memory = [
        create_engine("sqlite://"),
        create_engine("sqlite://"),
        create_engine("sqlite:///:memory:"),
        create_async_engine("sqlite+aiosqlite://").sync_engine,
        create_engine("sqlite://", creator=lambda: sqlite3.connect(":memory:")),
    ]
    identities = [database_identity(e) for e in memory]
    assert len(set(identities)) == len(identities), identities
    assert database_identity(memory[0]) == database_identity(memory[0])  # stable per engine
    path = tmp_path / "shared.sqlite"
    files = [create_engine(f"sqlite:///{path}"), create_async_engine(f"sqlite+aiosqlite:///{path}")]
    assert database_identity(files[0]) == database_identity(files[1].sync_engine)
    server = [create_engine("postgresql+psycopg://u@db:5432/app") for _ in range(2)]
    assert database_identity(server[0]) == database_identity(server[1])


async def test_two_in_memory_sqlite_engines_never_share_entries(make_cache: Any) -> None:
    """Item 3: a row cached from one in-memory database is not served on another's empty table."""
    cache = await make_cache(bind=False)
    first = create_async_engine("sqlite+aiosqlite://")
    second = create_async_engine("sqlite+aiosqlite://")
    try:
        for engine in (first, second):
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
            await cache.bind(engine)
        async with AsyncSession(first) as s:
            s.add(User(id=1, name="only in first"))
            await s.commit()
        stmt = select(User).order_by(User.id)
        for _ in range(2):
            async with AsyncSession(first) as s:
                assert [u.name for u in (await s.scalars(stmt))] == ["only in first"]
                assert (await s.get(User, 1)).name == "only in first"
        async with AsyncSession(second) as s:
            assert list(await s.scalars(stmt)) == []
            assert await s.get(User, 1) is None
    finally:
        await first.dispose()
        await second.dispose()


async def test_database_id_still_joins_two_engines(make_cache: Any, tmp_path: Path) -> None:
    """Item 3: `bind(engine, database_id=...)` overrides the per-engine identity."""
    cache = await make_cache(bind=False)
    path = tmp_path / "one.sqlite"
    first = create_async_engine(f"sqlite+aiosqlite:///{path}")
    second = create_async_engine(f"sqlite+aiosqlite:///{path}")
    try:
        async with first.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        await cache.bind(first, database_id="shared-one")
        await cache.bind(second, database_id="shared-one")
        async with AsyncSession(first) as s:
            s.add(User(id=1, name="x"))
            await s.commit()
        async with AsyncSession(first) as s:
            assert (await s.get(User, 1)).name == "x"
        counter: list[str] = []
        event.listen(second.sync_engine, "before_cursor_execute", lambda *a: counter.append(a[2]))
        async with AsyncSession(second) as s:
            assert (await s.get(User, 1)).name == "x"
        assert counter == []  # served from the entry the first engine filled
    finally:
        await first.dispose()
        await second.dispose()


# -- item 4: DDL is a table-wide write ----------------------------------------------------------


async def _cache_users(sessions: Any) -> None:
    await _seed_users(sessions)
    for _ in range(2):
        async with sessions() as s:
            assert (await s.get(User, 1)).name == "user1"
            assert len(list(await s.scalars(select(User)))) == 2
            assert await s.scalar(select(func.count()).select_from(User)) == 2


async def _assert_users_gone(sessions: Any) -> None:
    async with sessions() as s:
        assert await s.get(User, 1) is None
        assert list(await s.scalars(select(User))) == []
        assert await s.scalar(select(func.count()).select_from(User)) == 0


async def test_drop_all_and_create_all_leave_no_entry_behind(cache, sessions, engine) -> None:
    """Item 4: `metadata.drop_all()` + `create_all()` make every table of the metadata stale."""
    await _cache_users(sessions)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    await _assert_users_gone(sessions)


async def test_table_drop_and_create_leave_no_entry_behind(cache, sessions, engine) -> None:
    """Item 4: `Table.drop()` / `Table.create()` are table-wide writes of that table."""
    async with sessions() as s:
        s.add(Seat(row="A", number=1, holder="h"))
        await s.commit()
    for _ in range(2):
        async with sessions() as s:
            assert (await s.get(Seat, ("A", 1))).holder == "h"
            assert len(list(await s.scalars(select(Seat)))) == 1
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: Seat.__table__.drop(c))
        await conn.run_sync(lambda c: Seat.__table__.create(c))
    async with sessions() as s:
        assert await s.get(Seat, ("A", 1)) is None
        assert list(await s.scalars(select(Seat))) == []


async def test_a_ddl_string_naming_a_table_makes_it_stale(cache, sessions, engine) -> None:
    """Item 4: `DDL("...")` with no table: every table its text names is written as a whole."""
    await _cache_users(sessions)
    async with engine.begin() as conn:
        await conn.execute(DDL("DELETE FROM user_roles"))
        await conn.execute(DDL("DELETE FROM orders"))
        await conn.execute(DDL("DELETE FROM users"))
    await _assert_users_gone(sessions)


async def test_a_ddl_string_naming_no_known_table_makes_every_table_stale(
    cache, sessions, engine, stack
) -> None:
    """Item 4: a DDL text naming none of the known tables (a view, a trigger, a function may
    reach any of them) is treated as a write of every table."""
    await _cache_users(sessions)
    unbound = create_async_engine(stack.db_url)  # a change the cache cannot see
    try:
        async with unbound.begin() as conn:
            for table in ("user_roles", "orders", "users"):
                await conn.execute(text(f"DELETE FROM {table}"))
    finally:
        await unbound.dispose()
    async with engine.begin() as conn:
        await conn.execute(DDL("DROP VIEW IF EXISTS ff_no_such_view"))
    await _assert_users_gone(sessions)


async def test_text_ddl_through_a_connection_makes_its_table_stale(cache, sessions, engine) -> None:
    """Item 4: `text("DROP TABLE ...")` / `text("CREATE TABLE ...")` re-creating a table."""
    async with sessions() as s:
        s.add(Seat(row="A", number=1, holder="h"))
        await s.commit()
    for _ in range(2):
        async with sessions() as s:
            assert (await s.get(Seat, ("A", 1))).holder == "h"
            assert len(list(await s.scalars(select(Seat)))) == 1
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE seats"))
        await conn.execute(
            text(
                'CREATE TABLE seats ("row" VARCHAR(2) NOT NULL, number INTEGER NOT NULL, '
                'holder VARCHAR(50), PRIMARY KEY ("row", number))'
            )
        )
    async with sessions() as s:
        assert await s.get(Seat, ("A", 1)) is None
        assert list(await s.scalars(select(Seat))) == []


# -- item 6: eager loads that read further tables -----------------------------------------------


async def _seed_team(sessions: Any) -> None:
    async with sessions() as s:
        s.add(Team(id=1, name="t"))
        await s.flush()
        s.add_all([Member(id=1, team_id=1, name="m1"), Member(id=2, team_id=1, name="m2")])
        await s.commit()


async def _add_badge(sessions: Any, member_id: int, badge_id: int = 1) -> None:
    async with sessions() as s:
        s.add(Badge(id=badge_id, member_id=member_id))
        await s.commit()


async def test_an_eager_collection_whose_column_property_reads_a_third_table(
    cache, sessions, field_tables, sql
) -> None:
    """Item 6: `lazy="selectin"` members carry a correlated count of badges: a new badge counts."""
    await _seed_team(sessions)

    async def counts() -> list[int]:
        async with sessions() as s:
            team = (await s.scalars(select(Team).where(Team.name == "t"))).one()
            return [m.badge_count for m in team.members]

    assert await counts() == [0, 0]
    sql.reset()
    assert await counts() == [0, 0]
    assert sql.selects == 0  # a hit
    await _add_badge(sessions, 2)
    assert await counts() == [0, 1]


async def test_the_entitys_own_column_property_reads_its_table(
    cache, sessions, field_tables, sql
) -> None:
    """Item 6: a statement's own entity column_property (correlated subquery) counts its table."""
    await _seed_team(sessions)

    async def counts() -> list[int]:
        async with sessions() as s:
            return [m.badge_count for m in await s.scalars(select(Member).order_by(Member.id))]

    assert await counts() == [0, 0]
    sql.reset()
    assert await counts() == [0, 0]
    assert sql.selects == 0
    await _add_badge(sessions, 1)
    assert await counts() == [1, 0]


@pytest.mark.parametrize("loader", [selectinload, joinedload], ids=["selectin", "joined"])
async def test_an_eager_relationship_whose_primaryjoin_reads_a_third_table(
    cache, sessions, field_tables, sql, loader
) -> None:
    """Item 6: an eager load of a relationship whose primaryjoin has EXISTS on another table."""
    await _seed_team(sessions)
    stmt = select(Team).options(loader(Team.decorated)).where(Team.name == "t")

    async def decorated() -> list[str]:
        async with sessions() as s:
            team = (await s.scalars(stmt)).unique().one()
            return [m.name for m in team.decorated]

    assert await decorated() == []
    sql.reset()
    assert await decorated() == []
    assert sql.selects == 0
    await _add_badge(sessions, 2)
    assert await decorated() == ["m2"]


# -- item 7: volatile functions inside SQL text fragments ---------------------------------------


@pytest.mark.parametrize(
    "column",
    [
        pytest.param(lambda: literal_column("random()"), id="literal_column"),
        pytest.param(lambda: literal_column("RANDOM ( )"), id="literal_column_spaced"),
        pytest.param(lambda: literal_column("pg_catalog.now()"), id="qualified"),
        pytest.param(lambda: literal_column("current_timestamp"), id="bare_word"),
        pytest.param(lambda: literal_column("localtime"), id="bare_localtime"),
        pytest.param(lambda: type_coerce(literal_column("random()"), Float), id="type_coerce"),
        pytest.param(lambda: literal_column("random()").label("r"), id="label"),
        pytest.param(lambda: text("random()"), id="text"),
        pytest.param(lambda: func.RANDOM(), id="func_upper"),
        pytest.param(lambda: func.pg_catalog.random(), id="func_package"),
    ],
)
async def test_a_volatile_call_written_in_a_text_fragment_is_never_cached(
    cache, sessions, sql, column
) -> None:
    """Item 7: `literal_column("random()")`, bare `current_timestamp`, `text()` in a column."""
    await _seed_users(sessions)
    stmt = select(User.id, column()).order_by(User.id)
    for _ in range(2):
        async with sessions() as s:
            # the function need not exist on this database: the plan is what is tested
            with contextlib.suppress(Exception):
                await s.execute(stmt)
    sql.reset()
    async with sessions() as s:
        with contextlib.suppress(Exception):
            await s.execute(stmt)
    assert sql.selects == 1
    reasons = _bypasses(cache, "tests.models.User", "fetch")
    assert set(reasons) & {"volatile_function", "text"}, reasons


async def test_a_volatile_call_in_a_text_where_clause_is_never_cached(cache, sessions, sql) -> None:
    """Item 7: `text()` inside `.where()` calling a volatile function."""
    await _seed_users(sessions)
    stmt = select(User).where(text("random() IS NOT NULL")).order_by(User.id)
    for _ in range(2):
        assert await _names(sessions, stmt) == ["user1", "user2"]
    sql.reset()
    assert await _names(sessions, stmt) == ["user1", "user2"]
    assert sql.selects == 1


async def test_a_plain_literal_column_is_still_cached(cache, sessions, sql) -> None:
    """Item 7: `literal_column("1")` reads nothing and calls nothing: it may be cached."""
    await _seed_users(sessions)
    stmt = select(User.id, literal_column("1").label("one")).order_by(User.id)

    async def rows() -> list[tuple[Any, ...]]:
        async with sessions() as s:
            return [tuple(r) for r in await s.execute(stmt)]

    assert await rows() == [(1, 1), (2, 1)]
    sql.reset()
    assert await rows() == [(1, 1), (2, 1)]
    assert sql.selects == 0


async def test_a_literal_column_reading_another_table_is_never_cached(cache, sessions, sql) -> None:
    """Item 7: a literal fragment holding a subquery reads tables nobody can see: bypassed."""
    await _seed_users(sessions)
    stmt = select(User.id, literal_column("(SELECT count(*) FROM orders)").label("n")).order_by(
        User.id
    )
    for _ in range(2):
        async with sessions() as s:
            await s.execute(stmt)
    sql.reset()
    async with sessions() as s:
        await s.execute(stmt)
    assert sql.selects == 1


# -- item 13: values the cache cannot carry -----------------------------------------------------


async def test_a_value_the_cache_cannot_copy_is_not_cached_and_never_raises(
    cache, sessions, field_tables, sql
) -> None:
    """Item 13: a str subclass whose constructor takes extra arguments: no TypeError, a bypass."""
    async with sessions() as s:
        s.add(Note(id=1, tagged="hello"))
        await s.commit()
    for _ in range(2):
        async with sessions() as s:
            note = await s.get(Note, 1)
            assert type(note.tagged) is Tagged and note.tagged == "hello"
            notes = list(await s.scalars(select(Note)))
            assert type(notes[0].tagged) is Tagged
    await cache.flush_pending()
    sql.reset()
    async with sessions() as s:
        note = await s.get(Note, 1)
        assert type(note.tagged) is Tagged
    assert sql.selects == 1
    reasons = _bypasses(cache, f"{__name__}.Note", "get")
    assert reasons, cache.stats()["models"]


async def test_a_str_subclass_value_never_comes_back_as_plain_str(
    cache, sessions, field_tables
) -> None:
    """Item 13: a hit returns the same type as the uncached read, or is not cached."""
    async with sessions() as s:
        s.add(Note(id=1, plain="hello"))
        await s.commit()
    for _ in range(3):
        async with sessions() as s:
            note = await s.get(Note, 1)
            assert type(note.plain) is Plain
            row = (await s.execute(select(Note.plain))).one()
            assert type(row[0]) is Plain
        await cache.flush_pending()


async def test_an_application_uuid_subclass_never_comes_back_as_uuid(
    cache, sessions, field_tables
) -> None:
    """Item 13: only a driver's UUID subclass may become uuid.UUID on a hit."""
    async with sessions() as s:
        s.add(Note(id=1, ident=uuid.uuid4()))
        await s.commit()
    for _ in range(3):
        async with sessions() as s:
            assert type((await s.get(Note, 1)).ident) is TaggedUUID
            assert type((await s.execute(select(Note.ident))).scalar_one()) is TaggedUUID
        await cache.flush_pending()


async def test_a_zoneinfo_datetime_comes_back_with_the_same_zone(
    cache, sessions, field_tables, sql
) -> None:
    """Item 16: a datetime whose tzinfo is a `ZoneInfo` is cached, and a hit returns it with the
    same tzinfo class and key (here across a DST change, so fold and offset matter)."""
    winter = datetime.datetime(2026, 1, 15, 12, 0, tzinfo=datetime.timezone.utc)
    fall_back = datetime.datetime(2026, 10, 25, 0, 30, tzinfo=datetime.timezone.utc)  # fold=1
    async with sessions() as s:
        s.add_all([Note(id=1, at=winter), Note(id=2, at=fall_back)])
        await s.commit()

    async def read() -> tuple[list[datetime.datetime], list[datetime.datetime]]:
        async with sessions() as s:
            entities = [n.at for n in await s.scalars(select(Note).order_by(Note.id))]
            columns = list(await s.scalars(select(Note.at).order_by(Note.id)))
            return entities, columns

    first = await read()
    await cache.flush_pending()
    assert cache.stats()["models"][f"{__name__}.Note"]["fetch"]["stores"] == 2
    _forget_recent_fills(cache)
    sql.reset()
    second = await read()
    assert sql.selects == 0  # both were served from the cache
    for miss, hit in zip([*first[0], *first[1]], [*second[0], *second[1]], strict=True):
        assert hit == miss
        assert type(hit.tzinfo) is type(miss.tzinfo) is ZoneInfo
        assert hit.tzinfo.key == miss.tzinfo.key == "Europe/Berlin"
        assert (hit.utcoffset(), hit.fold, hit.replace(tzinfo=None)) == (
            miss.utcoffset(),
            miss.fold,
            miss.replace(tzinfo=None),
        )


async def test_a_pickled_value_that_cannot_be_rebuilt_is_not_cached(
    make_cache, sessions, field_tables, sql
) -> None:
    """Item 13: with the pickle format, a value that pickles but cannot unpickle is refused."""
    cache = await make_cache(serializer="pickle", secret=b"s" * 32)
    async with sessions() as s:
        s.add(Note(id=1, tagged="hello"))
        await s.commit()
    for _ in range(2):
        async with sessions() as s:
            assert type((await s.get(Note, 1)).tagged) is Tagged
        await cache.flush_pending()
    assert cache.stats()["payload_errors"] == 0


# -- item 14: a model that failed to configure ---------------------------------------------------


async def test_a_model_that_cannot_configure_does_not_break_other_models(
    cache, sessions, sql
) -> None:
    """Item 14: a broken mapped class elsewhere never makes the cache raise on count/select_from."""

    class BrokenBase(DeclarativeBase):
        pass

    class Broken(BrokenBase):
        __tablename__ = "ff_broken"
        id: Mapped[int] = mapped_column(primary_key=True)
        ghost = relationship("ClassThatDoesNotExist")

    with pytest.raises(Exception, match="__tablename__"):  # fails half way: never mapped

        class NoTable(BrokenBase):
            id: Mapped[int] = mapped_column(primary_key=True)

    try:
        await _seed_users(sessions)
        for _ in range(2):
            async with sessions() as s:
                assert await s.scalar(select(func.count()).select_from(User)) == 2
                assert await s.scalar(select(func.count(User.id))) == 2
                assert len((await s.execute(select(User.id).select_from(User))).all()) == 2
                assert (await s.scalars(select(Product).select_from(Product))).all() == []
                assert await s.scalar(select(func.count()).select_from(Category)) == 0
        sql.reset()
        async with sessions() as s:
            assert await s.scalar(select(func.count()).select_from(User)) == 2
        assert sql.selects == 0  # still cached
    finally:
        with contextlib.suppress(Exception):
            BrokenBase.registry.dispose()
        del Broken, BrokenBase
        gc.collect()


# -- sync sessions: the same rules hold for bind_sync ---------------------------------------------


def test_sync_engines_in_memory_do_not_share_entries(stack: Any) -> None:
    """Item 3 with sync engines and `bind_sync`."""
    cache = sqlacache.configure(
        models={"*": {"timeout": 300}}, backend=stack.backend, prefix=f"t{uuid.uuid4().hex[:10]}"
    )
    first, second = create_engine("sqlite://"), create_engine("sqlite:///:memory:")
    try:
        for engine in (first, second):
            Base.metadata.create_all(engine)
            cache.bind_sync(engine)
        with Session(first) as s:
            s.add(User(id=1, name="a"))
            s.commit()
        for _ in range(2):
            with Session(first) as s:
                assert s.get(User, 1).name == "a"
        with sessionmaker(second)() as s:
            assert s.get(User, 1) is None
            assert s.scalars(select(User)).all() == []
    finally:
        cache.invalidate_all_sync()
        cache.disconnect_sync()
        first.dispose()
        second.dispose()


def test_every_tzinfo_the_serializer_accepts_comes_back_the_same() -> None:
    """Item 16: naive, UTC, plain and named fixed offsets, ZoneInfo: equal values, same tzinfo."""
    from sqlacache.serialize import Serializer, Snapshot, Unserializable

    base = datetime.datetime(2026, 3, 29, 1, 30)
    values = [
        None,
        base,
        base.replace(tzinfo=datetime.timezone.utc),
        base.replace(tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))),
        base.replace(tzinfo=datetime.timezone(datetime.timedelta(hours=1), "CET")),
        base.replace(tzinfo=datetime.timezone.utc).astimezone(ZoneInfo("Europe/Berlin")),
        base.replace(tzinfo=ZoneInfo("America/New_York")),
    ]
    snapshot = Snapshot([], [], [], [False], [[v] for v in values], False)
    serializer = Serializer()
    back = [row[0] for row in serializer.loads(serializer.dumps(snapshot), lambda m, k: None).rows]
    for original, copy_ in zip(values, back, strict=True):
        assert copy_ == original
        if original is not None:
            assert type(copy_.tzinfo) is type(original.tzinfo)
            assert getattr(copy_.tzinfo, "key", None) == getattr(original.tzinfo, "key", None)
            assert copy_.tzname() == original.tzname()
            assert copy_.replace(tzinfo=None) == original.replace(tzinfo=None)

    class OwnZone(datetime.tzinfo):
        def utcoffset(self, dt: Any) -> datetime.timedelta:
            return datetime.timedelta(0)

    odd = Snapshot([], [], [], [False], [[base.replace(tzinfo=OwnZone())]], False)
    with pytest.raises(Unserializable):
        serializer.dumps(odd)


def test_which_tables_a_ddl_statement_writes() -> None:
    """Item 4: constructs name their tables; texts the known tables they mention, else all."""
    from sqlalchemy import Column, Index, Integer, MetaData, Sequence, Table, UniqueConstraint
    from sqlalchemy.schema import (
        AddConstraint,
        CreateIndex,
        CreateSequence,
        CreateTable,
        DropSchema,
        DropTable,
    )

    from sqlacache.ddl import ddl_write_names, known_tables

    users, seats = User.__table__, Seat.__table__
    everything = {t.fullname for t in known_tables()}
    assert {"users", "orders", "seats", "ff_notes"} <= everything
    assert ddl_write_names(CreateTable(users), None, None) == {"users"}
    assert ddl_write_names(DropTable(seats), None, {None: "tenant_a"}) == {"tenant_a.seats"}
    # constructs on a table of its own: AddConstraint marks its constraint as created apart, and
    # an Index joins its table, which must not change the shared test tables
    probe = Table("ff_probe", MetaData(), Column("a", Integer), UniqueConstraint("a"))
    assert ddl_write_names(CreateIndex(Index("ix_ff_probe", probe.c.a)), None, None) == {"ff_probe"}
    unique = next(c for c in probe.constraints if isinstance(c, UniqueConstraint))
    assert ddl_write_names(AddConstraint(unique), None, None) == {"ff_probe"}
    assert ddl_write_names(CreateSequence(Sequence("s")), None, None) == set()
    assert ddl_write_names(DropSchema("tenant_a", cascade=True), None, None) == everything
    assert ddl_write_names(DDL("ALTER TABLE users ADD x INT"), None, None) == {"users"}
    assert ddl_write_names(DDL("CREATE TRIGGER t AFTER INSERT ON %(table)s ..."), None, None) == (
        everything
    )
    attached = DDL("CREATE TRIGGER t ...")
    attached.target = seats
    assert ddl_write_names(attached, None, None) == {"seats"}
    assert ddl_write_names(None, 'DROP TABLE "public"."seats"', None) == {"seats", "public.seats"}
    assert ddl_write_names(None, "TRUNCATE users CASCADE", None) >= {"users", "orders", "items"}
    assert ddl_write_names(None, "DROP VIEW some_view", None) == everything


async def test_a_disposed_engine_still_tracks_its_writes(make_cache, tmp_path: Path) -> None:
    """Noticed: after `engine.dispose()` (SQLAlchemy's advice after a fork) the engine's writes
    must still make other processes' entries stale. Two engines on one database stand for two
    processes sharing the cache."""
    cache = await make_cache(bind=False)
    path = tmp_path / "two.sqlite"
    reader = create_async_engine(f"sqlite+aiosqlite:///{path}")
    writer = create_async_engine(f"sqlite+aiosqlite:///{path}")
    try:
        async with reader.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        await cache.bind(reader, database_id="one-database")
        await cache.bind(writer, database_id="one-database")
        async with AsyncSession(reader) as s:
            s.add(User(id=1, name="before"))
            await s.commit()
        for _ in range(2):
            async with AsyncSession(reader) as s:
                assert (await s.get(User, 1)).name == "before"
        await writer.dispose()
        async with AsyncSession(writer) as s:
            (await s.get(User, 1)).name = "after"
            await s.commit()
        async with AsyncSession(reader) as s:
            assert (await s.get(User, 1)).name == "after"
    finally:
        await reader.dispose()
        await writer.dispose()


def test_a_value_whose_encoding_raises_is_unserializable_not_an_error() -> None:
    """Item 13: whatever a value's own methods raise while it is encoded, the result is refused
    with `Unserializable` (counted as a bypass), never passed on to the application."""
    from sqlacache.serialize import Serializer, Snapshot, Unserializable

    class Broken(datetime.tzinfo):
        def utcoffset(self, dt: Any) -> datetime.timedelta:
            raise RuntimeError("no offset today")

    value = datetime.datetime(2026, 1, 1, tzinfo=Broken())
    for serializer in (Serializer(), Serializer("pickle", secret=b"k" * 32)):
        with pytest.raises(Unserializable):
            serializer.dumps(Snapshot([], [], [], [False], [[value]], False))
