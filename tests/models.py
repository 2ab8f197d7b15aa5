"""Models used across the test suite: one-to-many, many-to-many, inheritance, composite keys."""

from __future__ import annotations

import datetime
import decimal
import enum
import uuid

from sqlalchemy import JSON, Column, DateTime, ForeignKey, Numeric, String, Table
from sqlalchemy import Enum as SAEnum
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Status(enum.Enum):
    ACTIVE = "active"
    BANNED = "banned"


user_roles = Table(
    "user_roles",
    Base.metadata,
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("role_id", ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True),
)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    active: Mapped[bool] = mapped_column(default=True)
    score: Mapped[decimal.Decimal | None] = mapped_column(Numeric(10, 2), nullable=True)
    created: Mapped[datetime.datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    status: Mapped[Status] = mapped_column(SAEnum(Status), default=Status.ACTIVE)
    token: Mapped[uuid.UUID | None] = mapped_column(nullable=True)
    orders: Mapped[list[Order]] = relationship(back_populates="user", order_by="Order.id")
    roles: Mapped[list[Role]] = relationship(secondary=user_roles, order_by="Role.id")


class Role(Base):
    __tablename__ = "roles"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    total: Mapped[int] = mapped_column(default=0)
    user: Mapped[User] = relationship(back_populates="orders")
    items: Mapped[list[Item]] = relationship(lazy="selectin", order_by="Item.id")


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"))
    sku: Mapped[str] = mapped_column(String(20), default="sku")


class Employee(Base):
    __tablename__ = "employees"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(50))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Manager(Employee):
    __tablename__ = "managers"
    id: Mapped[int] = mapped_column(
        ForeignKey("employees.id", ondelete="CASCADE"), primary_key=True
    )
    budget: Mapped[int] = mapped_column(default=0)
    __mapper_args__ = {"polymorphic_identity": "manager"}


class Seat(Base):
    """A composite primary key."""

    __tablename__ = "seats"
    row: Mapped[str] = mapped_column(String(2), primary_key=True)
    number: Mapped[int] = mapped_column(primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(50), nullable=True)


class Unhashable(Base):
    """Compares by value and has no `__hash__`, as SQLModel's models do."""

    __tablename__ = "unhashables"
    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(20))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unhashable) and (self.id, self.label) == (other.id, other.label)

    __hash__ = None  # type: ignore[assignment]
