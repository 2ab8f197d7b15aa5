"""P10, the realistic request: the reads one page of a web application makes, in one AsyncSession.

    the current user by primary key        session.get(User, me)
    20 posts with their authors            select(Post) ... selectinload(Post.author), limit 20
    a count                                select(count()) from posts
    one post by primary key                session.get(Post, viewed)
    its comments, by lazy load             await post.awaitable_attrs.comments

The current user is the author of the newest post, so the list's author load meets an object the
session already holds; the viewed post is not in the list, so its `get` is a real lookup. Warm and
without writes the request must send no SQL at all. The models live here, beside the bench's
`bench_users` table (same metadata, so `create_schema` drops and creates them with it).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from harness import Base, SQLCounter, User
from sqlalchemy import DateTime, ForeignKey, String, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column, relationship, selectinload

N_POSTS = 2_000
N_AUTHORS = 500  # authors are users 1..N_AUTHORS
COMMENTS_PER_POST = 5
PAGES = 10  # distinct (current user, viewed post) pairs a warm run cycles through
WRITTEN_POST = N_POSTS - 4  # the write: a post in every page's list


class Post(AsyncAttrs, Base):
    __tablename__ = "bench_posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("bench_users.id"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(String(2_000))
    created: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))
    author: Mapped[User] = relationship(lazy="select")
    comments: Mapped[list[Comment]] = relationship(
        back_populates="post", lazy="select", order_by="Comment.id"
    )


class Comment(Base):
    __tablename__ = "bench_comments"
    id: Mapped[int] = mapped_column(primary_key=True)
    post_id: Mapped[int] = mapped_column(ForeignKey("bench_posts.id"), index=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("bench_users.id"))
    body: Mapped[str] = mapped_column(String(1_000))
    created: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))
    post: Mapped[Post] = relationship(back_populates="comments")


def author_of(post_id: int) -> int:
    return 1 + (post_id * 7) % N_AUTHORS


async def seed(engine: AsyncEngine) -> None:
    """Posts and comments; `create_schema` has already created the (empty) tables."""
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    posts = [
        {
            "id": i,
            "author_id": author_of(i),
            "title": f"post {i}: on caching and other hard problems",
            "body": f"body of post {i} " * 20,
            "created": start + datetime.timedelta(hours=i),
        }
        for i in range(1, N_POSTS + 1)
    ]
    comments = [
        {
            "id": (p - 1) * COMMENTS_PER_POST + c + 1,
            "post_id": p,
            "author_id": author_of(p + c + 1),
            "body": f"comment {c} on post {p}",
            "created": start + datetime.timedelta(hours=p, minutes=c),
        }
        for p in range(1, N_POSTS + 1)
        for c in range(COMMENTS_PER_POST)
    ]
    async with engine.begin() as conn:
        await conn.execute(insert(Post), posts)
        for low in range(0, len(comments), 5_000):
            await conn.execute(insert(Comment), comments[low : low + 5_000])
    if engine.dialect.name == "postgresql":
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("VACUUM ANALYZE bench_posts, bench_comments"))


@dataclass(frozen=True)
class Page:
    me: int  # the current user: the author of the newest post
    viewed: int  # a post outside the list


def page(number: int) -> Page:
    return Page(me=author_of(N_POSTS), viewed=N_POSTS // 2 + number % PAGES)


STEPS = ("current user", "post list", "count", "post by pk", "comments (lazy)")


async def request(session: AsyncSession, p: Page, step: Callable[[str], None] | None = None) -> int:
    """One page's reads; `step(name)` is called after each read (the probe's hook)."""
    mark = step or (lambda _name: None)
    me = await session.get(User, p.me)
    assert me is not None
    mark(STEPS[0])
    stmt = select(Post).options(selectinload(Post.author)).order_by(Post.id.desc()).limit(20)
    posts = (await session.execute(stmt)).scalars().all()
    assert len(posts) == 20 and all(post.author is not None for post in posts)
    mark(STEPS[1])
    total = await session.scalar(select(func.count()).select_from(Post))
    mark(STEPS[2])
    post = await session.get(Post, p.viewed)
    assert post is not None
    mark(STEPS[3])
    comments = await post.awaitable_attrs.comments
    assert len(comments) == COMMENTS_PER_POST
    mark(STEPS[4])
    return int(total or 0)


def request_op(sessions: async_sessionmaker[AsyncSession]) -> Callable[[int], Awaitable[None]]:
    async def run(number: int) -> None:
        async with sessions() as session:
            await request(session, page(number))

    return run


async def write_one_post(sessions: async_sessionmaker[AsyncSession], value: int) -> None:
    """The write of "after one write": load one post of the list, change it, commit (the ORM
    knows the row, so only that row and the tables' list-like reads are invalidated)."""
    async with sessions() as session:
        post = await session.get(Post, WRITTEN_POST)
        assert post is not None
        title = f"edited {value} at {time.time_ns()}"  # never the value it has: a real UPDATE
        assert post.title != title
        post.title = title
        await session.commit()


# -- the probe: SQL and cache counters per step -------------------------------------------------


@dataclass
class StepCount:
    sql: int = 0
    hits: int = 0
    misses: int = 0
    stores: int = 0
    bypasses: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sql": self.sql,
            "hits": self.hits,
            "misses": self.misses,
            "stores": self.stores,
            "bypasses": self.bypasses,
        }


def _counters(stats: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (model, op): counters
        for model, ops in stats["models"].items()
        for op, counters in ops.items()
    }


def _delta(before: dict[str, Any], after: dict[str, Any], sql: int) -> StepCount:
    out = StepCount(sql=sql)
    old = _counters(before)
    for where, counters in _counters(after).items():
        prior = old.get(where, {"hits": 0, "misses": 0, "stores": 0, "bypasses": {}})
        out.hits += counters["hits"] - prior["hits"]
        out.misses += counters["misses"] - prior["misses"]
        out.stores += counters["stores"] - prior["stores"]
        for reason, n in counters["bypasses"].items():
            extra = n - prior["bypasses"].get(reason, 0)
            if extra:
                label = f"{where[0].rsplit('.', 1)[-1]}.{where[1]}:{reason}"
                out.bypasses[label] = out.bypasses.get(label, 0) + extra
    return out


async def probe(
    sessions: async_sessionmaker[AsyncSession],
    stats: Callable[[], dict[str, Any]],
    sql: SQLCounter,
    number: int,
) -> dict[str, Any]:
    """One request, with the SQL statements and the cache's counters of each step."""
    steps: dict[str, Any] = {}
    last_stats, last_sql = stats(), sql.selects + sql.writes

    def step(name: str) -> None:
        nonlocal last_stats, last_sql
        now = stats()
        sent = sql.selects + sql.writes
        steps[name] = _delta(last_stats, now, sent - last_sql).as_dict()
        last_stats, last_sql = now, sent

    async with sessions() as session:
        await request(session, page(number), step)
    return {
        "sql": sum(s["sql"] for s in steps.values()),
        "hits": sum(s["hits"] for s in steps.values()),
        "misses": sum(s["misses"] for s in steps.values()),
        "steps": steps,
    }


async def measure(
    sessions: async_sessionmaker[AsyncSession],
    stats: Callable[[], dict[str, Any]],
    sql: SQLCounter,
    settle: Callable[[], Awaitable[None]],
) -> dict[str, Any]:
    """Cold, warm, after one write, and warm again; counts only (timings are `run.py`'s)."""
    out: dict[str, Any] = {}
    out["cold"] = await probe(sessions, stats, sql, 0)
    await settle()
    out["warm"] = await probe(sessions, stats, sql, 0)
    writes = sql.writes
    await write_one_post(sessions, 0)
    assert sql.writes > writes, "the write sent no UPDATE"
    await settle()
    out["after_write"] = await probe(sessions, stats, sql, 0)
    await settle()
    out["warm_again"] = await probe(sessions, stats, sql, 0)
    return out


async def total_posts(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.scalar(select(func.count()).select_from(Post))) or 0)
