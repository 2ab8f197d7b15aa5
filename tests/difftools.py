"""The randomized differential test of the whole contract: the machinery.

A seeded random sequence of operations runs against one database twice over: every read goes
through the cache (sessions on the engine the cache is bound to) and again uncached (a session on
a second engine the cache knows nothing about, or, inside a transaction, the same session with
`cache=False`). Results are compared as plain data, never as objects. The first mismatch fails the
run with the seed, the step index and the last operations, so it can be replayed with
`SQLACACHE_DIFF_SEED=<seed>`.

Writes pick their targets from a shadow of the committed state, re-read (uncached) after every
write, so a sequence depends only on the seed. The single exception is the interleaving of
concurrent reads with a writer (`asyncio.gather`), which timing decides; what those reads may
return is checked against both committed states, before and after the writer.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import enum
import json
import random
import uuid
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, exists, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import joinedload, selectin_polymorphic, selectinload, with_polymorphic

from tests.models import Employee, Item, Manager, Order, Role, Seat, Status, User, user_roles

# -- value domains: small, so that reads repeat (and hit) and writes move rows in and out ---------

USER_IDS = range(1, 25)
ORDER_IDS = range(1, 61)
ITEM_IDS = range(1, 101)
ROLE_IDS = range(1, 6)
EMP_IDS = range(1, 17)
SEAT_ROWS = ("A", "B", "C")
SEAT_NUMBERS = range(1, 5)
NAMES = ("ann", "bob", "cy", "dee")
ROLE_NAMES = ("admin", "dev", "ops", "qa", "hr", "sales")
SKUS = ("a", "b", "c", "d")
TOTALS = tuple(range(0, 100, 10))
SCORES = (None, decimal.Decimal("1.50"), decimal.Decimal("2.25"), decimal.Decimal("10.00"))
BUDGETS = (0, 100, 200, 300, 400)
HOLDERS = (None, "x", "y")
DATAS = (None, {"k": 1}, {"k": 2, "tags": ["a", "b"]}, {"nested": {"x": None}})

users_t = User.__table__
orders_t = Order.__table__
items_t = Item.__table__
roles_t = Role.__table__
employees_t = Employee.__table__
managers_t = Manager.__table__
seats_t = Seat.__table__

NOCACHE = {"cache": False}
UNLOADED = "<unloaded>"


class Mismatch(AssertionError):
    pass


# -- plain data -------------------------------------------------------------------------------------


def norm(value: Any) -> Any:
    """A comparable, sortable, printable form of a column value (types kept apart)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, decimal.Decimal):
        return ("dec", str(value))
    if isinstance(value, enum.Enum):
        return ("enum", value.value)
    if isinstance(value, uuid.UUID):
        return ("uuid", str(value))
    if isinstance(value, (dict, list)):
        return ("json", json.dumps(value, sort_keys=True))
    if isinstance(value, (datetime.datetime, datetime.date)):
        return ("dt", value.isoformat())
    if isinstance(value, float):
        return ("float", repr(value))
    return ("other", type(value).__name__, repr(value))


def attr(obj: Any, key: str) -> Any:
    """The loaded value of an attribute: never a lazy load (an unloaded one is UNLOADED)."""
    return obj.__dict__.get(key, UNLOADED)


def coll(obj: Any, key: str, fn: Callable[[Any], Any]) -> Any:
    value = attr(obj, key)
    if value is UNLOADED:
        return UNLOADED
    return tuple(fn(x) for x in value)


def user_t(u: User | None) -> Any:
    if u is None:
        return None
    return (
        "User",
        attr(u, "id"),
        *(norm(attr(u, k)) for k in ("name", "active", "score", "status", "data", "token")),
    )


def role_t(r: Role) -> Any:
    return ("Role", attr(r, "id"), attr(r, "name"))


def item_t(i: Item | None) -> Any:
    if i is None:
        return None
    return ("Item", attr(i, "id"), attr(i, "order_id"), attr(i, "sku"))


def order_t(o: Order | None) -> Any:
    if o is None:
        return None
    return ("Order", attr(o, "id"), attr(o, "user_id"), attr(o, "total"), coll(o, "items", item_t))


def order_user_t(o: Order) -> Any:
    user = attr(o, "user")
    return (*order_t(o), UNLOADED if user is UNLOADED else user_t(user))


def user_orders_t(u: User | None) -> Any:
    return None if u is None else (*user_t(u), coll(u, "orders", order_t))


def user_roles_t(u: User | None) -> Any:
    return None if u is None else (*user_t(u), coll(u, "roles", role_t))


def user_full_t(u: User) -> Any:
    return (*user_t(u), coll(u, "orders", order_t), coll(u, "roles", role_t))


def emp_t(e: Employee | None) -> Any:
    if e is None:
        return None
    budget = norm(attr(e, "budget")) if isinstance(e, Manager) else "-"
    return (type(e).__name__, attr(e, "id"), attr(e, "kind"), attr(e, "name"), budget)


def seat_t(s: Seat | None) -> Any:
    if s is None:
        return None
    return ("Seat", attr(s, "row"), attr(s, "number"), attr(s, "holder"))


def rows_t(rows: Iterable[Any]) -> list[Any]:
    return [tuple(norm(v) for v in row) for row in rows]


def unordered(values: Iterable[Any]) -> list[Any]:
    return sorted(values, key=repr)


# -- the reads ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadSpec:
    name: str
    params: Callable[[random.Random], tuple[Any, ...]]
    run: Callable[[AsyncSession, tuple[Any, ...], dict[str, Any]], Awaitable[Any]]
    single: bool  # one SQL statement: a read concurrent with one writer sees one committed state

    def describe(self, params: tuple[Any, ...]) -> str:
        return f"{self.name}{params!r}"


async def _entities(
    s: AsyncSession, stmt: Any, o: dict[str, Any], unique: bool = False
) -> list[Any]:
    result = await s.execute(stmt, execution_options=o)
    if unique:
        result = result.unique()
    return list(result.scalars().all())


async def _rows(s: AsyncSession, stmt: Any, o: dict[str, Any]) -> list[Any]:
    return rows_t((await s.execute(stmt, execution_options=o)).all())


async def _scalar(s: AsyncSession, stmt: Any, o: dict[str, Any]) -> Any:
    return norm((await s.execute(stmt, execution_options=o)).scalar())


def _one(choices: Iterable[Any]) -> Callable[[random.Random], tuple[Any, ...]]:
    values = tuple(choices)
    return lambda rng: (rng.choice(values),)


def _some(choices: Iterable[Any], k: int) -> Callable[[random.Random], tuple[Any, ...]]:
    values = tuple(choices)
    return lambda rng: (tuple(sorted(rng.sample(values, k))),)


def _none(rng: random.Random) -> tuple[Any, ...]:
    return ()


def _seat_pk(rng: random.Random) -> tuple[Any, ...]:
    return (rng.choice(SEAT_ROWS), rng.choice(SEAT_NUMBERS))


async def r_get_user(s, p, o):
    return user_t(await s.get(User, p[0], execution_options=o))


async def r_get_order(s, p, o):
    return order_t(await s.get(Order, p[0], execution_options=o))


async def r_get_item(s, p, o):
    return item_t(await s.get(Item, p[0], execution_options=o))


async def r_get_employee(s, p, o):
    return emp_t(await s.get(Employee, p[0], execution_options=o))


async def r_get_manager(s, p, o):
    return emp_t(await s.get(Manager, p[0], execution_options=o))


async def r_get_seat(s, p, o):
    return seat_t(await s.get(Seat, p, execution_options=o))


async def r_get_role(s, p, o):
    r = await s.get(Role, p[0], execution_options=o)
    return None if r is None else role_t(r)


async def r_get_user_orders(s, p, o):
    u = await s.get(User, p[0], options=[selectinload(User.orders)], execution_options=o)
    return user_orders_t(u)


async def r_get_user_roles(s, p, o):
    u = await s.get(User, p[0], options=[selectinload(User.roles)], execution_options=o)
    return user_roles_t(u)


async def r_get_user_roles_joined(s, p, o):
    u = await s.get(User, p[0], options=[joinedload(User.roles)], execution_options=o)
    return user_roles_t(u)


async def r_stmt_get_user(s, p, o):
    found = await _entities(s, select(User).where(User.id == p[0]), o)
    return [user_t(u) for u in found]


async def r_stmt_get_order(s, p, o):
    found = await _entities(s, select(Order).where(Order.id == p[0]), o)
    return [order_t(x) for x in found]


async def r_stmt_get_seat(s, p, o):
    found = await _entities(s, select(Seat).where(Seat.row == p[0], Seat.number == p[1]), o)
    return [seat_t(x) for x in found]


async def r_users_active(s, p, o):
    stmt = select(User).where(User.active.is_(p[0])).order_by(User.id)
    return [user_t(u) for u in await _entities(s, stmt, o)]


async def r_users_by_name(s, p, o):
    stmt = select(User).where(User.name == p[0])
    return unordered(user_t(u) for u in await _entities(s, stmt, o))


async def r_users_score_gt(s, p, o):
    stmt = select(User).where(User.score > p[0])
    return unordered(user_t(u) for u in await _entities(s, stmt, o))


async def r_orders_total_ge(s, p, o):
    stmt = select(Order).where(Order.total >= p[0]).order_by(Order.id)
    return [order_t(x) for x in await _entities(s, stmt, o)]


async def r_users_join_orders(s, p, o):
    stmt = select(User).join(User.orders).where(Order.total > p[0])
    return unordered(user_t(u) for u in await _entities(s, stmt, o))


async def r_user_cols_join_orders_distinct(s, p, o):
    stmt = (
        select(User.id, User.name).join(Order, Order.user_id == User.id).where(Order.total > p[0])
    ).distinct()
    return unordered(await _rows(s, stmt, o))


async def r_orders_of_name(s, p, o):
    stmt = select(Order).join(Order.user).where(User.name == p[0]).order_by(Order.id)
    return [order_t(x) for x in await _entities(s, stmt, o)]


async def r_orders_joined_user(s, p, o):
    stmt = (
        select(Order)
        .options(joinedload(Order.user))
        .where(Order.user_id == p[0])
        .order_by(Order.id)
    )
    return [order_user_t(x) for x in await _entities(s, stmt, o)]


async def r_orders_joined_user_roles(s, p, o):
    stmt = (
        select(Order)
        .options(joinedload(Order.user).selectinload(User.roles))
        .where(Order.total == p[0])
        .order_by(Order.id)
    )
    out = []
    for x in await _entities(s, stmt, o):
        user = attr(x, "user")
        out.append((*order_t(x), UNLOADED if user is UNLOADED else user_roles_t(user)))
    return out


async def r_users_joined_roles(s, p, o):
    stmt = select(User).options(joinedload(User.roles)).where(User.active.is_(p[0]))
    stmt = stmt.order_by(User.id)
    return [user_roles_t(u) for u in await _entities(s, stmt, o, unique=True)]


async def r_users_full(s, p, o):
    stmt = (
        select(User)
        .where(User.id.in_(p[0]))
        .options(selectinload(User.orders).selectinload(Order.items), selectinload(User.roles))
        .order_by(User.id)
    )
    return [user_full_t(u) for u in await _entities(s, stmt, o)]


async def r_users_with_role(s, p, o):
    stmt = select(User).join(User.roles).where(Role.name == p[0]).order_by(User.id)
    return [user_t(u) for u in await _entities(s, stmt, o)]


async def r_users_in_subquery(s, p, o):
    sub = select(Order.user_id).where(Order.total > p[0])
    stmt = select(User).where(User.id.in_(sub)).order_by(User.id)
    return [user_t(u) for u in await _entities(s, stmt, o)]


async def r_users_exists_item(s, p, o):
    has = (
        select(Item.id)
        .join(Order, Item.order_id == Order.id)
        .where(Order.user_id == User.id, Item.sku == p[0])
        .exists()
    )
    stmt = select(User.id, User.name).where(has)
    return unordered(await _rows(s, stmt, o))


async def r_count_orders_of(s, p, o):
    stmt = select(func.count()).select_from(Order).where(Order.user_id == p[0])
    return await _scalar(s, stmt, o)


async def r_count_active(s, p, o):
    return await _scalar(s, select(func.count(User.id)).where(User.active.is_(p[0])), o)


async def r_count_items_sku(s, p, o):
    return await _scalar(s, select(func.count(Item.id)).where(Item.sku == p[0]), o)


async def r_count_members_of_role(s, p, o):
    stmt = select(func.count()).select_from(user_roles).where(user_roles.c.role_id == p[0])
    return await _scalar(s, stmt, o)


async def r_exists_orders_of(s, p, o):
    return await _scalar(s, select(exists().where(Order.user_id == p[0])), o)


async def r_exists_item_sku_total(s, p, o):
    inner = select(Item).join(Order, Item.order_id == Order.id)
    stmt = select(inner.where(Item.sku == p[0], Order.total > p[1]).exists())
    return await _scalar(s, stmt, o)


async def r_exists_manager_budget(s, p, o):
    return await _scalar(s, select(exists().where(Manager.budget >= p[0])), o)


async def r_user_columns(s, p, o):
    stmt = select(User.id, User.name, User.score, User.status).where(User.active.is_(p[0]))
    return unordered(await _rows(s, stmt, o))


async def r_order_sums(s, p, o):
    stmt = select(Order.user_id, func.sum(Order.total), func.count(Order.id)).group_by(
        Order.user_id
    )
    return unordered(await _rows(s, stmt, o))


async def r_role_member_counts(s, p, o):
    stmt = (
        select(Role.name, func.count(user_roles.c.user_id))
        .select_from(Role)
        .outerjoin(user_roles, user_roles.c.role_id == Role.id)
        .group_by(Role.id, Role.name)
    )
    return unordered(await _rows(s, stmt, o))


async def r_items_of_orders(s, p, o):
    stmt = select(Item).where(Item.order_id.in_(p[0])).order_by(Item.id)
    return [item_t(i) for i in await _entities(s, stmt, o)]


async def r_employees(s, p, o):
    stmt = select(Employee).order_by(Employee.id)
    return [emp_t(e) for e in await _entities(s, stmt, o)]


async def r_employees_polymorphic(s, p, o):
    poly = with_polymorphic(Employee, [Manager])
    stmt = select(poly).where(poly.name != p[0]).order_by(poly.id)
    return [emp_t(e) for e in await _entities(s, stmt, o)]


async def r_employees_selectin_polymorphic(s, p, o):
    stmt = (
        select(Employee)
        .options(selectin_polymorphic(Employee, [Manager]))
        .where(Employee.name == p[0])
        .order_by(Employee.id)
    )
    return [emp_t(e) for e in await _entities(s, stmt, o)]


async def r_managers_budget_ge(s, p, o):
    stmt = select(Manager).where(Manager.budget >= p[0]).order_by(Manager.id)
    return [emp_t(e) for e in await _entities(s, stmt, o)]


async def r_employee_names(s, p, o):
    stmt = select(Employee.kind, Employee.name).where(Employee.id <= p[0])
    return unordered(await _rows(s, stmt, o))


async def r_seats_row(s, p, o):
    stmt = select(Seat).where(Seat.row == p[0]).order_by(Seat.number)
    return [seat_t(x) for x in await _entities(s, stmt, o)]


async def r_roles(s, p, o):
    return [role_t(r) for r in await _entities(s, select(Role).order_by(Role.id), o)]


_NAMES_OR_MISSING = (*NAMES, "zed")
_USER_PKS = range(1, 27)  # includes pks that never exist

READS: tuple[ReadSpec, ...] = (
    ReadSpec("get_user", _one(_USER_PKS), r_get_user, True),
    ReadSpec("get_order", _one(range(1, 63)), r_get_order, False),
    ReadSpec("get_item", _one(range(1, 103)), r_get_item, True),
    ReadSpec("get_employee", _one(range(1, 18)), r_get_employee, True),
    ReadSpec("get_manager", _one(range(1, 18)), r_get_manager, True),
    ReadSpec("get_seat", _seat_pk, r_get_seat, True),
    ReadSpec("get_role", _one(range(1, 7)), r_get_role, True),
    ReadSpec("get_user_selectin_orders", _one(_USER_PKS), r_get_user_orders, False),
    ReadSpec("get_user_selectin_roles", _one(_USER_PKS), r_get_user_roles, False),
    ReadSpec("get_user_joined_roles", _one(_USER_PKS), r_get_user_roles_joined, True),
    ReadSpec("stmt_get_user", _one(_USER_PKS), r_stmt_get_user, True),
    ReadSpec("stmt_get_order", _one(range(1, 63)), r_stmt_get_order, False),
    ReadSpec("stmt_get_seat", _seat_pk, r_stmt_get_seat, True),
    ReadSpec("users_active", _one((True, False)), r_users_active, True),
    ReadSpec("users_by_name", _one(_NAMES_OR_MISSING), r_users_by_name, True),
    ReadSpec("users_score_gt", _one(SCORES[1:]), r_users_score_gt, True),
    ReadSpec("orders_total_ge", _one(TOTALS), r_orders_total_ge, False),
    ReadSpec("users_join_orders", _one(TOTALS), r_users_join_orders, True),
    ReadSpec(
        "user_cols_join_orders_distinct", _one(TOTALS), r_user_cols_join_orders_distinct, True
    ),
    ReadSpec("orders_of_name", _one(_NAMES_OR_MISSING), r_orders_of_name, False),
    ReadSpec("orders_joined_user", _one(_USER_PKS), r_orders_joined_user, False),
    ReadSpec("orders_joined_user_roles", _one(TOTALS), r_orders_joined_user_roles, False),
    ReadSpec("users_joined_roles", _one((True, False)), r_users_joined_roles, True),
    ReadSpec("users_full", _some(_USER_PKS, 3), r_users_full, False),
    ReadSpec("users_with_role", _one(ROLE_NAMES), r_users_with_role, True),
    ReadSpec("users_in_subquery", _one(TOTALS), r_users_in_subquery, True),
    ReadSpec("users_exists_item", _one(SKUS), r_users_exists_item, True),
    ReadSpec("count_orders_of", _one(_USER_PKS), r_count_orders_of, True),
    ReadSpec("count_active", _one((True, False)), r_count_active, True),
    ReadSpec("count_items_sku", _one(SKUS), r_count_items_sku, True),
    ReadSpec("count_members_of_role", _one(range(1, 7)), r_count_members_of_role, True),
    ReadSpec("exists_orders_of", _one(_USER_PKS), r_exists_orders_of, True),
    ReadSpec(
        "exists_item_sku_total",
        lambda rng: (rng.choice(SKUS), rng.choice(TOTALS)),
        r_exists_item_sku_total,
        True,
    ),
    ReadSpec("exists_manager_budget", _one(BUDGETS), r_exists_manager_budget, True),
    ReadSpec("user_columns", _one((True, False)), r_user_columns, True),
    ReadSpec("order_sums", _none, r_order_sums, True),
    ReadSpec("role_member_counts", _none, r_role_member_counts, True),
    ReadSpec("items_of_orders", _some(range(1, 63), 4), r_items_of_orders, True),
    ReadSpec("employees", _none, r_employees, True),
    ReadSpec("employees_polymorphic", _one(_NAMES_OR_MISSING), r_employees_polymorphic, True),
    ReadSpec(
        "employees_selectin_polymorphic",
        _one(_NAMES_OR_MISSING),
        r_employees_selectin_polymorphic,
        False,
    ),
    ReadSpec("managers_budget_ge", _one(BUDGETS), r_managers_budget_ge, True),
    ReadSpec("employee_names", _one(range(1, 18)), r_employee_names, True),
    ReadSpec("seats_row", _one(SEAT_ROWS), r_seats_row, True),
    ReadSpec("roles", _none, r_roles, True),
)


# -- the committed state the writes choose from -------------------------------------------------


@dataclass
class Shadow:
    users: dict[int, tuple[str, bool]]
    orders: dict[int, int]  # id -> user_id
    items: dict[int, int]  # id -> order_id
    roles: set[int]
    members: set[tuple[int, int]]  # (user_id, role_id)
    emps: dict[int, str]  # id -> kind
    seats: set[tuple[str, int]]

    @classmethod
    async def load(cls, engine: AsyncEngine) -> Shadow:
        async with engine.connect() as c:

            async def rows(stmt: Any) -> list[Any]:
                return list((await c.execute(stmt)).all())

            return cls(
                users={
                    r[0]: (r[1], r[2])
                    for r in await rows(select(users_t.c.id, users_t.c.name, users_t.c.active))
                },
                orders=dict(await rows(select(orders_t.c.id, orders_t.c.user_id))),
                items=dict(await rows(select(items_t.c.id, items_t.c.order_id))),
                roles={r[0] for r in await rows(select(roles_t.c.id))},
                members={
                    (r[0], r[1])
                    for r in await rows(select(user_roles.c.user_id, user_roles.c.role_id))
                },
                emps=dict(await rows(select(employees_t.c.id, employees_t.c.kind))),
                seats={(r[0], r[1]) for r in await rows(select(seats_t.c.row, seats_t.c.number))},
            )


class Op:
    """The choices of one write operation: targets from the shadow, minus what this op removed.

    `blocked` tables may have lost rows behind the session's identity map (bulk DML, database
    cascades): the rest of the operation leaves them alone. `gone` are rows this op deleted.
    """

    def __init__(self, rng: random.Random, shadow: Shadow) -> None:
        self.rng = rng
        self.sh = shadow
        self.allocated: dict[str, set[Any]] = defaultdict(set)
        self.gone: dict[str, set[Any]] = defaultdict(set)
        self.blocked: set[str] = set()
        self.touched_members: set[int] = set()

    def existing(self, table: str) -> list[Any]:
        if table in self.blocked:
            return []
        ids = {
            "users": self.sh.users,
            "orders": self.sh.orders,
            "items": self.sh.items,
            "roles": self.sh.roles,
            "emps": self.sh.emps,
            "seats": self.sh.seats,
        }[table]
        return sorted(set(ids) - self.gone[table])

    def pick(self, table: str) -> Any:
        found = self.existing(table)
        return self.rng.choice(found) if found else None

    def new_id(self, table: str) -> Any:
        space: Iterable[Any] = {
            "users": USER_IDS,
            "orders": ORDER_IDS,
            "items": ITEM_IDS,
            "emps": EMP_IDS,
            "seats": [(r, n) for r in SEAT_ROWS for n in SEAT_NUMBERS],
        }[table]
        taken = {
            "users": self.sh.users,
            "orders": self.sh.orders,
            "items": self.sh.items,
            "emps": self.sh.emps,
            "seats": self.sh.seats,
        }[table]
        free = [i for i in space if i not in taken and i not in self.allocated[table]]
        if not free:
            return None
        chosen = self.rng.choice(free)
        self.allocated[table].add(chosen)
        return chosen

    def user_values(self, uid: int) -> dict[str, Any]:
        rng = self.rng
        return {
            "id": uid,
            "name": rng.choice(NAMES),
            "active": rng.random() < 0.7,
            "score": rng.choice(SCORES),
            "status": rng.choice(list(Status)),
            "data": rng.choice(DATAS),
        }


# -- session mutations (no commit): each returns what it did, or None when it had nothing to do -------

Mutation = Callable[[Op, AsyncSession], Awaitable[str | None]]


async def m_insert_user(op: Op, s: AsyncSession) -> str | None:
    uid = op.new_id("users")
    if uid is None:
        return None
    rng = op.rng
    user = User(**op.user_values(uid))
    role_ids = sorted(rng.sample(ROLE_IDS, rng.randint(0, 2)))
    if role_ids:
        roles = (await s.execute(select(Role).where(Role.id.in_(role_ids)))).scalars().all()
        user.roles = list(roles)
        op.touched_members.add(uid)
    orders = []
    for _ in range(rng.randint(0, 2)):
        oid = op.new_id("orders")
        if oid is None:
            break
        items = []
        for _ in range(rng.randint(0, 2)):
            iid = op.new_id("items")
            if iid is not None:
                items.append(Item(id=iid, sku=rng.choice(SKUS)))
        orders.append(Order(id=oid, total=rng.choice(TOTALS), items=items))
    user.orders = orders
    s.add(user)
    shape = [(o.id, [i.id for i in o.items]) for o in orders]
    return f"orm insert User({uid}) roles={role_ids} orders={shape}"


async def m_update_user(op: Op, s: AsyncSession) -> str | None:
    uid = op.pick("users")
    if uid is None:
        return None
    user = await s.get(User, uid)
    if user is None:
        return None
    values = op.user_values(uid)
    keys = op.rng.sample(["name", "active", "score", "status", "data"], op.rng.randint(1, 2))
    changes = {k: values[k] for k in keys}
    for key, value in changes.items():
        setattr(user, key, value)
    return f"orm update User({uid}) {changes}"


async def m_delete_user_orm(op: Op, s: AsyncSession) -> str | None:
    candidates = [
        u
        for u in op.existing("users")
        if u not in set(op.sh.orders.values()) and u not in op.touched_members
    ]
    if not candidates:
        return None
    uid = op.rng.choice(candidates)
    stmt = (
        select(User)
        .where(User.id == uid)
        .options(selectinload(User.orders), selectinload(User.roles))
        .execution_options(populate_existing=True, cache=False)
    )
    user = (await s.execute(stmt)).scalar_one_or_none()
    if user is None or user.orders:
        return None
    await s.delete(user)
    op.gone["users"].add(uid)
    op.touched_members.add(uid)
    return f"orm delete User({uid}) (had roles {[r.id for r in user.roles]})"


async def m_bulk_delete_user(op: Op, s: AsyncSession) -> str | None:
    uid = op.pick("users")
    if uid is None:
        return None
    await s.execute(delete(User).where(User.id == uid))
    op.blocked |= {"users", "orders", "items"}
    op.touched_members.add(uid)
    return f"session bulk delete(User).where(id == {uid}) (db cascades its orders/items/roles)"


async def m_move_order(op: Op, s: AsyncSession) -> str | None:
    oid, uid = op.pick("orders"), op.pick("users")
    if oid is None or uid is None:
        return None
    order = await s.get(Order, oid)
    if order is None:
        return None
    if op.rng.random() < 0.5:
        order.user_id = uid
        return f"orm move Order({oid}).user_id = {uid}"
    user = await s.get(User, uid)
    if user is None:
        return None
    order.user = user
    return f"orm move Order({oid}).user = User({uid})"


async def m_update_order(op: Op, s: AsyncSession) -> str | None:
    oid = op.pick("orders")
    if oid is None:
        return None
    order = await s.get(Order, oid)
    if order is None:
        return None
    order.total = op.rng.choice(TOTALS)
    return f"orm update Order({oid}).total = {order.total}"


async def m_insert_order(op: Op, s: AsyncSession) -> str | None:
    uid = op.pick("users")
    oid = op.new_id("orders")
    if uid is None or oid is None:
        return None
    items = []
    for _ in range(op.rng.randint(0, 3)):
        iid = op.new_id("items")
        if iid is not None:
            items.append(Item(id=iid, sku=op.rng.choice(SKUS)))
    s.add(Order(id=oid, user_id=uid, total=op.rng.choice(TOTALS), items=items))
    return f"orm insert Order({oid}) user={uid} items={[i.id for i in items]}"


async def m_delete_order_orm(op: Op, s: AsyncSession) -> str | None:
    busy = set(op.sh.items.values())
    candidates = [o for o in op.existing("orders") if o not in busy]
    if not candidates or "items" in op.blocked:
        return None
    oid = op.rng.choice(candidates)
    order = await s.get(Order, oid)
    if order is None:
        return None
    n = await s.scalar(
        select(func.count()).select_from(Item).where(Item.order_id == oid),
        execution_options=NOCACHE,
    )
    if n:
        return None
    await s.delete(order)
    op.gone["orders"].add(oid)
    return f"orm delete Order({oid})"


async def m_insert_item(op: Op, s: AsyncSession) -> str | None:
    oid, iid = op.pick("orders"), op.new_id("items")
    if oid is None or iid is None:
        return None
    if op.rng.random() < 0.5:
        s.add(Item(id=iid, order_id=oid, sku=op.rng.choice(SKUS)))
        return f"orm insert Item({iid}) order={oid}"
    order = await s.get(Order, oid)
    if order is None:
        return None
    order.items.append(Item(id=iid, sku=op.rng.choice(SKUS)))
    return f"orm append Item({iid}) to Order({oid}).items"


async def m_update_item(op: Op, s: AsyncSession) -> str | None:
    iid = op.pick("items")
    if iid is None:
        return None
    item = await s.get(Item, iid)
    if item is None:
        return None
    if op.rng.random() < 0.5:
        item.sku = op.rng.choice(SKUS)
        return f"orm update Item({iid}).sku = {item.sku}"
    oid = op.pick("orders")
    if oid is None:
        return None
    item.order_id = oid
    return f"orm move Item({iid}).order_id = {oid}"


async def m_delete_item_orm(op: Op, s: AsyncSession) -> str | None:
    iid = op.pick("items")
    if iid is None:
        return None
    item = await s.get(Item, iid)
    if item is None:
        return None
    await s.delete(item)
    op.gone["items"].add(iid)
    return f"orm delete Item({iid})"


async def m_membership(op: Op, s: AsyncSession) -> str | None:
    uid = op.pick("users")
    if uid is None:
        return None
    stmt = (
        select(User)
        .where(User.id == uid)
        .options(selectinload(User.roles))
        .execution_options(populate_existing=True, cache=False)
    )
    user = (await s.execute(stmt)).scalar_one_or_none()
    if user is None:
        return None
    op.touched_members.add(uid)
    rid = op.rng.choice(ROLE_IDS)
    role = await s.get(Role, rid)
    if role is None:
        return None
    if role in user.roles:
        user.roles.remove(role)
        return f"orm remove Role({rid}) from User({uid}).roles"
    user.roles.append(role)
    return f"orm add Role({rid}) to User({uid}).roles"


async def m_rename_role(op: Op, s: AsyncSession) -> str | None:
    rid = op.rng.choice(ROLE_IDS)
    role = await s.get(Role, rid)
    if role is None:
        return None
    role.name = op.rng.choice(ROLE_NAMES)
    return f"orm update Role({rid}).name = {role.name}"


async def m_employee(op: Op, s: AsyncSession) -> str | None:
    rng = op.rng
    kind = rng.choice(("insert", "rename", "budget", "delete"))
    if kind == "insert":
        eid = op.new_id("emps")
        if eid is None:
            return None
        if rng.random() < 0.5:
            s.add(Manager(id=eid, name=rng.choice(NAMES), budget=rng.choice(BUDGETS)))
            return f"orm insert Manager({eid})"
        s.add(Employee(id=eid, name=rng.choice(NAMES)))
        return f"orm insert Employee({eid})"
    if kind == "budget":
        managers = [e for e in op.existing("emps") if op.sh.emps[e] == "manager"]
        if not managers:
            return None
        mid = rng.choice(managers)
        manager = await s.get(Manager, mid)
        if manager is None:
            return None
        manager.budget = rng.choice(BUDGETS)
        return f"orm update Manager({mid}).budget = {manager.budget}"
    eid = op.pick("emps")
    if eid is None:
        return None
    emp = await s.get(Employee, eid)
    if emp is None:
        return None
    if kind == "rename":
        emp.name = rng.choice(NAMES)
        return f"orm update {type(emp).__name__}({eid}).name = {emp.name}"
    await s.delete(emp)
    op.gone["emps"].add(eid)
    return f"orm delete {type(emp).__name__}({eid})"


async def m_seat(op: Op, s: AsyncSession) -> str | None:
    rng = op.rng
    kind = rng.choice(("insert", "update", "delete", "bulk"))
    if kind == "insert":
        pk = op.new_id("seats")
        if pk is None:
            return None
        s.add(Seat(row=pk[0], number=pk[1], holder=rng.choice(HOLDERS)))
        return f"orm insert Seat{pk}"
    if kind == "bulk":
        row, holder = rng.choice(SEAT_ROWS), rng.choice(HOLDERS)
        await s.execute(update(Seat).where(Seat.row == row).values(holder=holder))
        return f"session bulk update(Seat).where(row == {row!r}).values(holder={holder!r})"
    pk = op.pick("seats")
    if pk is None:
        return None
    seat = await s.get(Seat, pk)
    if seat is None:
        return None
    if kind == "update":
        seat.holder = rng.choice(HOLDERS)
        return f"orm update Seat{pk}.holder = {seat.holder!r}"
    await s.delete(seat)
    op.gone["seats"].add(pk)
    return f"orm delete Seat{pk}"


async def m_bulk_update(op: Op, s: AsyncSession) -> str | None:
    rng = op.rng
    kind = rng.choice(("users", "orders", "items", "managers"))
    if kind == "users":
        name, active = rng.choice(NAMES), rng.random() < 0.6
        await s.execute(update(User).where(User.name == name).values(active=active))
        return f"session bulk update(User).where(name == {name!r}).values(active={active})"
    if kind == "orders":
        uid = rng.choice(USER_IDS)
        await s.execute(
            update(Order).where(Order.user_id == uid).values(total=(Order.total + 10) % 100)
        )
        return f"session bulk update(Order).where(user_id == {uid}).values(total=(total+10)%100)"
    if kind == "items":
        old, new = rng.choice(SKUS), rng.choice(SKUS)
        await s.execute(update(Item).where(Item.sku == old, Item.id % 3 == 0).values(sku=new))
        return f"session bulk update(Item).where(sku == {old!r}, id % 3 == 0).values(sku={new!r})"
    mid, budget = rng.choice(EMP_IDS), rng.choice(BUDGETS)
    await s.execute(update(Manager).where(Manager.id == mid).values(budget=budget))
    return f"session bulk update(Manager).where(id == {mid}).values(budget={budget})"


async def m_bulk_delete(op: Op, s: AsyncSession) -> str | None:
    rng = op.rng
    kind = rng.choice(("user", "orders", "items", "employee", "members"))
    if kind == "user":
        return await m_bulk_delete_user(op, s)
    if kind == "orders":
        if "orders" in op.blocked:
            return None
        uid, total = rng.choice(USER_IDS), rng.choice(TOTALS)
        await s.execute(delete(Order).where(Order.user_id == uid, Order.total >= total))
        op.blocked |= {"orders", "items"}
        return (
            f"session bulk delete(Order).where(user_id == {uid}, total >= {total}) (cascades items)"
        )
    if kind == "items":
        if "items" in op.blocked:
            return None
        oid = rng.choice(ORDER_IDS)
        await s.execute(delete(Item).where(Item.order_id == oid))
        op.blocked.add("items")
        return f"session bulk delete(Item).where(order_id == {oid})"
    if kind == "employee":
        if "emps" in op.blocked:
            return None
        eid = rng.choice(EMP_IDS)
        await s.execute(delete(Employee).where(Employee.id == eid))
        op.blocked.add("emps")
        return f"session bulk delete(Employee).where(id == {eid}) (db cascades managers)"
    rid = rng.choice(ROLE_IDS)
    await s.execute(delete(user_roles).where(user_roles.c.role_id == rid))
    return f"session delete(user_roles).where(role_id == {rid})"


async def m_bulk_insert(op: Op, s: AsyncSession) -> str | None:
    rng = op.rng
    kind = rng.choice(("users", "orders", "items", "members"))
    if kind == "users":
        rows = [
            op.user_values(u) for u in (op.new_id("users") for _ in range(rng.randint(1, 3))) if u
        ]
        if not rows:
            return None
        await s.execute(insert(User), rows)
        return f"session bulk insert(User) ids={[r['id'] for r in rows]}"
    if kind == "orders":
        rows = []
        for _ in range(rng.randint(1, 3)):
            oid, uid = op.new_id("orders"), op.pick("users")
            if oid is not None and uid is not None:
                rows.append({"id": oid, "user_id": uid, "total": rng.choice(TOTALS)})
        if not rows:
            return None
        await s.execute(insert(Order), rows)
        return f"session bulk insert(Order) {[(r['id'], r['user_id']) for r in rows]}"
    if kind == "items":
        rows = []
        for _ in range(rng.randint(1, 3)):
            iid, oid = op.new_id("items"), op.pick("orders")
            if iid is not None and oid is not None:
                rows.append({"id": iid, "order_id": oid, "sku": rng.choice(SKUS)})
        if not rows:
            return None
        await s.execute(insert(Item), rows)
        return f"session bulk insert(Item) {[(r['id'], r['order_id']) for r in rows]}"
    users = [u for u in op.existing("users") if u not in op.touched_members]
    pairs = [(u, r) for u in users for r in ROLE_IDS if (u, r) not in op.sh.members]
    if not pairs:
        return None
    chosen = sorted(rng.sample(pairs, min(len(pairs), rng.randint(1, 3))))
    for u, _ in chosen:
        op.touched_members.add(u)
    await s.execute(insert(user_roles), [{"user_id": u, "role_id": r} for u, r in chosen])
    return f"session insert(user_roles) {chosen}"


MUTATIONS: tuple[tuple[Mutation, int], ...] = (
    (m_insert_user, 3),
    (m_update_user, 5),
    (m_delete_user_orm, 1),
    (m_bulk_delete_user, 1),
    (m_move_order, 3),
    (m_update_order, 3),
    (m_insert_order, 3),
    (m_delete_order_orm, 1),
    (m_insert_item, 3),
    (m_update_item, 3),
    (m_delete_item_orm, 2),
    (m_membership, 4),
    (m_rename_role, 1),
    (m_employee, 4),
    (m_seat, 2),
    (m_bulk_update, 3),
    (m_bulk_delete, 2),
    (m_bulk_insert, 3),
)


def choose_mutation(rng: random.Random) -> Mutation:
    fns, weights = zip(*MUTATIONS, strict=True)
    return rng.choices(fns, weights)[0]


# -- Core DML on the engine --------------------------------------------------------------------------


def core_statement(op: Op) -> tuple[Any, str] | None:
    """One Core DML statement on a Table, and its description."""
    rng = op.rng
    kind = rng.choice(CORE_KINDS)
    if kind == "user_name":
        ids, name = sorted(rng.sample(USER_IDS, 2)), rng.choice(NAMES)
        stmt = update(users_t).where(users_t.c.id.in_(ids)).values(name=name)
        return stmt, f"core update users set name={name!r} where id in {ids}"
    if kind == "user_active":
        name, active = rng.choice(NAMES), rng.random() < 0.5
        stmt = update(users_t).where(users_t.c.name == name).values(active=active)
        return stmt, f"core update users set active={active} where name={name!r}"
    if kind == "delete_user":
        uid = op.pick("users")
        if uid is None:
            return None
        op.blocked |= {"users", "orders", "items"}
        op.touched_members.add(uid)
        stmt = delete(users_t).where(users_t.c.id == uid)
        return stmt, f"core delete users where id={uid} (db cascades)"
    if kind == "insert_user":
        uid = op.new_id("users")
        if uid is None:
            return None
        return insert(users_t).values(**op.user_values(uid)), f"core insert users id={uid}"
    if kind == "insert_order":
        oid, uid = op.new_id("orders"), op.pick("users")
        if oid is None or uid is None:
            return None
        total = rng.choice(TOTALS)
        stmt = insert(orders_t).values(id=oid, user_id=uid, total=total)
        return stmt, f"core insert orders id={oid} user={uid} total={total}"
    if kind == "move_order":
        oid, uid = op.pick("orders"), op.pick("users")
        if oid is None or uid is None:
            return None
        stmt = update(orders_t).where(orders_t.c.id == oid).values(user_id=uid)
        return stmt, f"core update orders set user_id={uid} where id={oid}"
    if kind == "order_total":
        total, uid = rng.choice(TOTALS), rng.choice(USER_IDS)
        stmt = update(orders_t).where(orders_t.c.user_id == uid).values(total=total)
        return stmt, f"core update orders set total={total} where user_id={uid}"
    if kind == "insert_item":
        iid, oid = op.new_id("items"), op.pick("orders")
        if iid is None or oid is None:
            return None
        stmt = insert(items_t).values(id=iid, order_id=oid, sku=rng.choice(SKUS))
        return stmt, f"core insert items id={iid} order={oid}"
    if kind == "delete_items":
        sku = rng.choice(SKUS)
        op.blocked.add("items")
        stmt = delete(items_t).where(items_t.c.sku == sku, items_t.c.id % 4 == 1)
        return stmt, f"core delete items where sku={sku!r} and id%4==1"
    if kind == "add_member":
        users = [u for u in op.existing("users") if u not in op.touched_members]
        pairs = [(u, r) for u in users for r in ROLE_IDS if (u, r) not in op.sh.members]
        if not pairs:
            return None
        u, r = rng.choice(pairs)
        op.touched_members.add(u)
        return insert(user_roles).values(user_id=u, role_id=r), f"core insert user_roles ({u}, {r})"
    if kind == "del_member":
        uid = rng.choice(USER_IDS)
        stmt = delete(user_roles).where(user_roles.c.user_id == uid)
        return stmt, f"core delete user_roles where user_id={uid}"
    if kind == "role_name":
        rid, name = rng.choice(ROLE_IDS), rng.choice(ROLE_NAMES)
        stmt = update(roles_t).where(roles_t.c.id == rid).values(name=name)
        return stmt, f"core update roles set name={name!r} where id={rid}"
    if kind == "budget":
        mid, budget = rng.choice(EMP_IDS), rng.choice(BUDGETS)
        stmt = update(managers_t).where(managers_t.c.id == mid).values(budget=budget)
        return stmt, f"core update managers set budget={budget} where id={mid}"
    if kind == "emp_name":
        eid, name = rng.choice(EMP_IDS), rng.choice(NAMES)
        stmt = update(employees_t).where(employees_t.c.id == eid).values(name=name)
        return stmt, f"core update employees set name={name!r} where id={eid}"
    if kind == "delete_emp":
        eid = op.pick("emps")
        if eid is None:
            return None
        op.blocked.add("emps")
        stmt = delete(employees_t).where(employees_t.c.id == eid)
        return stmt, f"core delete employees where id={eid} (db cascades managers)"
    row, holder = rng.choice(SEAT_ROWS), rng.choice(HOLDERS)
    stmt = update(seats_t).where(seats_t.c.row == row).values(holder=holder)
    return stmt, f"core update seats set holder={holder!r} where row={row!r}"


CORE_KINDS = (
    "user_name", "user_active", "delete_user", "insert_user", "insert_order", "move_order",
    "order_total", "insert_item", "delete_items", "add_member", "del_member", "role_name",
    "budget", "emp_name", "delete_emp", "seat",
)  # fmt: skip


# -- the runner --------------------------------------------------------------------------------------


class _Rollback(Exception):
    pass


class Runner:
    def __init__(
        self,
        seed: int,
        stack_name: str,
        sessions: async_sessionmaker[AsyncSession],
        engine: AsyncEngine,
        truth_engine: AsyncEngine,
    ) -> None:
        self.seed = seed
        self.stack_name = stack_name
        self.rng = random.Random(seed)
        self.sessions = sessions
        self.engine = engine
        self.truth_engine = truth_engine
        self.truth_sessions = async_sessionmaker(truth_engine, expire_on_commit=False)
        self.log: deque[str] = deque(maxlen=60)  # lines: the last ~20 operations
        self.step = 0
        self.recent: deque[tuple[ReadSpec, tuple[Any, ...]]] = deque(maxlen=40)
        self.shadow: Shadow | None = None
        self.counts: dict[str, int] = defaultdict(int)

    # -- bookkeeping ----------------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.log.append(f"#{self.step} {text}")

    def fail(self, what: str, cached: Any, truth: Any, extra: str = "") -> None:
        history = "\n".join(f"    {line}" for line in self.log)
        raise Mismatch(
            f"differential mismatch on {self.stack_name}: seed={self.seed} step={self.step}\n"
            f"  read: {what}\n"
            f"  cached:   {cached!r}\n"
            f"  uncached: {truth!r}\n"
            f"{extra}"
            f"  last operations (oldest first):\n{history}\n"
            f"  replay: SQLACACHE_DIFF_SEED={self.seed} SQLACACHE_DIFF_OPS={self.step + 1}"
        )

    async def refresh(self) -> None:
        self.shadow = await Shadow.load(self.truth_engine)

    def op(self) -> Op:
        assert self.shadow is not None
        return Op(self.rng, self.shadow)

    def choose_read(self) -> tuple[ReadSpec, tuple[Any, ...]]:
        rng = self.rng
        if self.recent and rng.random() < 0.6:
            return rng.choice(list(self.recent))
        spec = rng.choice(READS)
        chosen = (spec, spec.params(rng))
        if chosen not in self.recent:
            self.recent.append(chosen)
        return chosen

    # -- reads ----------------------------------------------------------------------------------

    async def cached(self, spec: ReadSpec, params: tuple[Any, ...]) -> Any:
        async with self.sessions() as s:
            return await spec.run(s, params, {})

    async def truth(self, spec: ReadSpec, params: tuple[Any, ...]) -> Any:
        async with self.truth_sessions() as s:
            return await spec.run(s, params, NOCACHE)

    async def compare(self, spec: ReadSpec, params: tuple[Any, ...], context: str) -> None:
        cached = await self.cached(spec, params)
        truth = await self.truth(spec, params)
        self.counts["comparisons"] += 1
        if cached != truth:
            self.fail(f"{spec.describe(params)} [{context}]", cached, truth)

    async def compare_in_session(
        self, s: AsyncSession, spec: ReadSpec, params: tuple[Any, ...], context: str
    ) -> None:
        """The same read, cached then uncached, in one session (inside its transaction).

        Objects the cached read brought into the identity map are expunged before the uncached
        read, so that it loads them from the database instead of returning them as they are.
        The session's own objects stay, including pending ones the read's autoflush persisted.
        """
        # Held through both reads: the identity map is weak, and an object collected in between
        # would be reloaded by the second read (losing, e.g., a collection's in-memory order).
        own = [*s.identity_map.values(), *s.new]
        own_ids = {id(obj) for obj in own}
        cached = await spec.run(s, params, {})
        pending = {*s.new, *s.dirty, *s.deleted}
        for obj in list(s.identity_map.values()):
            if id(obj) not in own_ids and obj not in pending:
                s.expunge(obj)
        truth = await spec.run(s, params, NOCACHE)
        del own
        self.counts["comparisons"] += 1
        self.counts["in_session_comparisons"] += 1
        if cached != truth:
            self.fail(f"{spec.describe(params)} [{context}]", cached, truth)

    # -- steps ----------------------------------------------------------------------------------

    async def read_step(self) -> None:
        spec, params = self.choose_read()
        self.note(f"read {spec.describe(params)}")
        await self.compare(spec, params, "fresh session")

    async def mutate(self, op: Op, s: AsyncSession, n: int) -> None:
        for _ in range(n):
            fn = choose_mutation(op.rng)
            self.note(f"  {fn.__name__} ...")
            done = await fn(op, s)
            self.log[-1] = f"#{self.step}   {done or fn.__name__ + ': nothing to do'}"
            self.counts["mutations"] += 1

    def session_write(self) -> Callable[[], Awaitable[None]]:
        """A transaction of 1-3 mutations that commits once (may run concurrently with reads)."""
        op = self.op()
        n = op.rng.randint(1, 3)
        mutation_rng = random.Random(op.rng.random())

        async def run() -> None:
            op.rng = mutation_rng
            self.note(f"session write ({n} mutations), commit")
            async with self.sessions() as s:
                await self.mutate(op, s, n)
                await s.commit()

        return run

    def core_write(self) -> Callable[[], Awaitable[None]]:
        """Core DML on the engine; at most one commit (may run concurrently with reads)."""
        op = self.op()
        rng = op.rng
        mode = rng.choice(("begin", "begin", "connect_commit", "rollback", "savepoint"))
        statements = [
            found for found in (core_statement(op) for _ in range(rng.randint(1, 3))) if found
        ]
        rollback_savepoint = rng.random() < 0.5

        async def run() -> None:
            self.note(
                f"core DML on the engine, mode={mode}: " + "; ".join(d for _, d in statements)
            )
            if mode == "begin":
                async with self.engine.begin() as conn:
                    for stmt, _ in statements:
                        await conn.execute(stmt)
            elif mode in ("connect_commit", "rollback"):
                async with self.engine.connect() as conn:
                    for stmt, _ in statements:
                        await conn.execute(stmt)
                    if mode == "rollback":
                        await conn.rollback()
                    else:
                        await conn.commit()
            else:
                async with self.engine.begin() as conn:
                    first, rest = statements[:1], statements[1:]
                    for stmt, _ in first:
                        await conn.execute(stmt)
                    savepoint = await conn.begin_nested()
                    for stmt, _ in rest:
                        await conn.execute(stmt)
                    if rollback_savepoint:
                        await savepoint.rollback()
                    else:
                        await savepoint.commit()
                self.note(f"  (savepoint {'rolled back' if rollback_savepoint else 'released'})")

        return run

    async def transaction_step(self) -> None:
        """Writes, reads inside the transaction, a savepoint, commit or rollback, reads after."""
        op = self.op()
        rng = op.rng
        commit = rng.random() < 0.6
        self.note(f"transaction (ends with {'commit' if commit else 'rollback'})")
        async with self.sessions() as s:
            await self.in_tx_reads(s, rng.randint(0, 1), "in transaction, before writing")
            await self.mutate(op, s, rng.randint(1, 3))
            await self.in_tx_reads(s, rng.randint(1, 3), "in transaction, after its writes")
            if rng.random() < 0.6 and await self.savepoint_is_sound(s):
                release = rng.random() < 0.5
                self.note(f"  begin_nested (will {'release' if release else 'roll back'})")
                try:
                    async with s.begin_nested():
                        await self.mutate(op, s, rng.randint(1, 2))
                        await self.in_tx_reads(s, rng.randint(0, 2), "inside a savepoint")
                        if not release:
                            raise _Rollback
                except _Rollback:
                    pass
                self.note(f"  savepoint {'released' if release else 'rolled back'}")
                await self.in_tx_reads(s, rng.randint(0, 2), "after the savepoint")
            if commit:
                await s.commit()
            else:
                await s.rollback()
            self.note(f"  {'committed' if commit else 'rolled back'}")
            # the same session, in its next transaction (expire_on_commit=False keeps objects)
            await self.in_tx_reads(s, rng.randint(0, 2), "same session after the transaction")

    async def savepoint_is_sound(self, s: AsyncSession) -> bool:
        """False where the driver would turn the savepoint into the whole transaction.

        pysqlite/aiosqlite in their default (legacy) mode emit BEGIN only before DML: a SAVEPOINT
        sent first opens the transaction itself, and its RELEASE commits it, so a later
        `session.rollback()` undoes nothing. The database would then disagree with what
        SQLAlchemy, and so the cache, was told; that is a driver quirk, not a cache fault.
        """
        if self.engine.dialect.name != "sqlite":
            return True
        await s.flush()  # what begin_nested() would do first; it may open the transaction
        raw = await (await s.connection()).get_raw_connection()
        return bool(raw.driver_connection.in_transaction)

    async def in_tx_reads(self, s: AsyncSession, n: int, context: str) -> None:
        for _ in range(n):
            spec, params = self.choose_read()
            self.note(f"  read {spec.describe(params)} [{context}]")
            await self.compare_in_session(s, spec, params, context)

    async def concurrent_step(self) -> None:
        """Several cached reads at once with (usually) one writer, then check what they saw."""
        rng = self.rng
        writer_kind = rng.choice(("session", "core", "none"))
        reads = [self.choose_read() for _ in range(rng.randint(2, 5))]
        if rng.random() < 0.5:  # the same read several times: misses that join one fill
            reads += [reads[0]] * rng.randint(1, 3)
        delays = [rng.randint(0, 6) for _ in reads]
        writer = (
            self.session_write()
            if writer_kind == "session"
            else self.core_write()
            if writer_kind == "core"
            else None
        )
        self.note(
            f"concurrent: writer={writer_kind}, reads="
            + ", ".join(spec.describe(p) for spec, p in reads)
        )
        before = [await self.truth(spec, p) for spec, p in reads]

        async def read(i: int) -> Any:
            for _ in range(delays[i]):
                await asyncio.sleep(0)
            spec, params = reads[i]
            return await self.cached(spec, params)

        coros = [read(i) for i in range(len(reads))]
        writer_at = rng.randint(0, len(coros))
        if writer is not None:
            coros.insert(writer_at, writer())
        results = list(await asyncio.gather(*coros))
        if writer is not None:
            results.pop(writer_at)
        after = [await self.truth(spec, p) for spec, p in reads]
        for (spec, params), got, old, new in zip(reads, results, before, after, strict=True):
            if not spec.single:
                continue  # several statements: each may see another committed state, uncached too
            self.counts["concurrent_checks"] += 1
            if got != old and got != new:
                self.fail(
                    f"{spec.describe(params)} [concurrent with the writer]",
                    got,
                    new,
                    f"  (before the writer: {old!r})\n",
                )
        for spec, params in dict.fromkeys(reads):
            await self.compare(spec, params, "after the concurrent step")

    async def run(self, steps: int) -> None:
        await self.refresh()
        for self.step in range(steps):
            r = self.rng.random()
            if r < 0.50:
                await self.read_step()
                self.counts["read_steps"] += 1
                continue
            if r < 0.72:
                await self.session_write()()
                self.counts["session_writes"] += 1
            elif r < 0.82:
                await self.core_write()()
                self.counts["core_writes"] += 1
            elif r < 0.93:
                await self.transaction_step()
                self.counts["transactions"] += 1
            else:
                await self.concurrent_step()
                self.counts["concurrent_steps"] += 1
            await self.refresh()
            await self.follow_up()

    async def follow_up(self) -> None:
        """Right after a write, re-read what was read last: entries it must have made stale."""
        for _ in range(self.rng.randint(1, 2)):
            latest = list(self.recent)[-10:]
            spec, params = self.rng.choice(latest) if latest else self.choose_read()
            self.note(f"read {spec.describe(params)} [right after the write]")
            await self.compare(spec, params, "right after a write")


# -- initial data ----------------------------------------------------------------------------------


async def seed_data(engine: AsyncEngine, rng: random.Random) -> None:
    """A starting population, written before the cache is bound."""
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with sessions() as s:
        roles = [Role(id=i, name=ROLE_NAMES[i - 1]) for i in ROLE_IDS]
        s.add_all(roles)
        next_order, next_item = 1, 1
        for uid in range(1, 15):
            op_values = Op(rng, Shadow({}, {}, {}, set(), set(), {}, set())).user_values(uid)
            user = User(**op_values)
            user.roles = rng.sample(roles, rng.randint(0, 2))
            for _ in range(rng.randint(0, 3)):
                items = []
                for _ in range(rng.randint(0, 3)):
                    items.append(Item(id=next_item, sku=rng.choice(SKUS)))
                    next_item += 1
                user.orders.append(Order(id=next_order, total=rng.choice(TOTALS), items=items))
                next_order += 1
            s.add(user)
        for eid in range(1, 9):
            if eid % 2:
                s.add(Manager(id=eid, name=rng.choice(NAMES), budget=rng.choice(BUDGETS)))
            else:
                s.add(Employee(id=eid, name=rng.choice(NAMES)))
        for row in SEAT_ROWS[:2]:
            for number in (1, 2, 3):
                s.add(Seat(row=row, number=number, holder=rng.choice(HOLDERS)))
        await s.commit()
