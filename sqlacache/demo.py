"""`python -m sqlacache demo`: the cache at work on mem:// and SQLite, no services needed.

Creates a small schema, reads the same rows twice, updates one, reads again, and prints what was a
hit, a miss and an invalidation, with timings and SQL statement counts. It uses a sync `Session` on
the standard library's sqlite3, so a plain `pip install sqlacache` runs it (no async driver).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import ForeignKey, String, create_engine, event, func, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)


class DemoBase(DeclarativeBase):
    pass


class Author(DemoBase):
    __tablename__ = "demo_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    posts: Mapped[list[Post]] = relationship(back_populates="author", order_by="Post.id")


class Post(DemoBase):
    __tablename__ = "demo_posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("demo_authors.id"))
    title: Mapped[str] = mapped_column(String(80))
    author: Mapped[Author] = relationship(back_populates="posts")


def run_demo(out: Callable[[str], Any] = print) -> list[tuple[str, str, int, float, str]]:
    """Run the scenario; return its rows (step, outcome, SQL statements, µs, value)."""
    from . import configure

    with tempfile.TemporaryDirectory() as folder:
        engine = create_engine(f"sqlite:///{Path(folder) / 'demo.sqlite'}")
        DemoBase.metadata.create_all(engine)
        sessions = sessionmaker(engine, expire_on_commit=False)
        with sessions() as session:
            session.add_all([Author(id=i, name=f"author {i}") for i in range(1, 4)])
            session.add_all(
                [Post(id=i, author_id=1 + i % 3, title=f"post {i}") for i in range(1, 7)]
            )
            session.commit()

        outcomes: list[str] = []
        cache = configure(
            "mem://",
            models={"*": {"timeout": 300}},
            on_hit=lambda model, op: outcomes.append("hit"),
            on_miss=lambda model, op: outcomes.append("miss"),
            on_invalidate=lambda table, pks: outcomes.append(f"invalidated {table}"),
        )
        cache.bind_sync(engine)
        statements: list[str] = []
        event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))

        rows: list[tuple[str, str, int, float, str]] = []

        def step(label: str, action: Callable[[Session], str]) -> None:
            outcomes.clear()
            statements.clear()
            start = time.perf_counter()
            with sessions() as session:
                value = action(session)
            elapsed = (time.perf_counter() - start) * 1e6
            outcome = ", ".join(dict.fromkeys(outcomes)) or "-"
            rows.append((label, outcome, len(statements), elapsed, value))

        def get_author(session: Session) -> str:
            author = session.get(Author, 1)
            return author.name if author else "None"

        def list_posts(session: Session) -> str:
            stmt = select(Author).options(selectinload(Author.posts)).order_by(Author.id)
            authors = session.execute(stmt).scalars().all()
            return "; ".join(f"{a.name}: {len(a.posts)} posts" for a in authors)

        def count_posts(session: Session) -> str:
            return str(session.scalar(select(func.count()).select_from(Post)))

        def rename(session: Session) -> str:
            author = session.get(Author, 1)
            assert author is not None
            author.name = "Alice"
            session.commit()
            return "author 1 -> Alice"

        def new_post(session: Session) -> str:
            session.add(Post(id=7, author_id=2, title="fresh"))
            session.commit()
            return "post 7 added"

        step("get(Author, 1)", get_author)
        step("get(Author, 1) again", get_author)
        step("authors + selectinload(posts)", list_posts)
        step("authors + posts again", list_posts)
        step("count(posts)", count_posts)
        step("count(posts) again", count_posts)
        step("update author 1, commit", rename)
        step("get(Author, 1) after commit", get_author)
        step("get(Author, 1) again", get_author)
        step("insert a post, commit", new_post)
        step("count(posts) after insert", count_posts)
        step("authors + posts after insert", list_posts)

        cache.disconnect_sync()
        engine.dispose()

    out(_table(rows))
    totals: dict[str, int] = {}
    for _, outcome, *_rest in rows:
        for part in outcome.split(", "):
            kind = part.split(" ")[0]
            totals[kind] = totals.get(kind, 0) + 1
    out(
        f"\n{totals.get('hit', 0)} hits, {totals.get('miss', 0)} misses, "
        f"{totals.get('invalidated', 0)} invalidations. A hit runs no SQL; every commit made the next "
        "read fresh."
    )
    return rows


def _table(rows: list[tuple[str, str, int, float, str]]) -> str:
    header = ("step", "cache", "SQL", "time", "result")
    body = [
        (label, outcome, str(n), f"{us:,.0f} µs", value[:60])
        for label, outcome, n, us, value in rows
    ]
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]
    line = "  ".join("{:<" + str(w) + "}" for w in widths)
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line.format(*header), sep, *(line.format(*r) for r in body)])


def main() -> None:
    run_demo()
