"""Verification mode: a sampled cache hit is also run on the database, and the results compared.

Owns the sampling decision, the comparison (what the hit would have handed the application against
what the database handed it) and the report of a difference: counters, a rate-limited warning, the
`on_mismatch` hook and the eviction of the entry. The application is always served the database's
result, so a sampled hit behaves exactly like an uncached read.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import logging
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Result
from sqlalchemy.orm import Mapper, Session

from . import _sqla
from .errors import CacheUnavailable
from .fill import run_frozen
from .serialize import Snapshot
from .snapshot import NotSnapshottable, freeze, mapper_name

if TYPE_CHECKING:
    from .decision import Decision
    from .runtime import Runtime

logger = logging.getLogger("sqlacache")

#: (mapper name, primary-key values): an object's identity, as a result names it
Identity = tuple[str, tuple[Any, ...]]


def sampled(fraction: float) -> bool:
    """Whether this hit is checked; the caller has already seen that `fraction` is not 0."""
    return fraction >= 1.0 or random.random() < fraction


def verified_hit(
    runtime: Runtime, read: Decision, cached: Snapshot, versions: Sequence[bytes | None]
) -> Result[Any]:
    """Serve a sampled hit from the database, and compare the cached snapshot with its result.

    `versions` are those the hit was validated against. The cached snapshot is compared as
    plain data: it is never thawed into the session, which would put its values into objects
    the application may already hold.
    """
    before = _unloaded_before(read.state.session)
    served, rows = _run(read)  # database errors reach the caller, as they would uncached
    plan = read.plan
    runtime.stats.hit(plan.model, read.name, plan.op)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "sqlacache hit %s %s key=%s (verified against the database)",
            read.name,
            plan.op,
            read.entry_key,
        )
    try:
        outcome, reason = _check(runtime, read, cached, rows, before, versions)
    except Exception as exc:  # a fault in the check must never reach the application
        outcome, reason = "inconclusive", f"the check failed: {exc!r}"
        runtime.stats.log.warning(
            "verify-fault", "sqlacache: a verified hit could not be compared (%s)", reason
        )
    if outcome == "match":
        runtime.stats.verified(read.name, plan.op)
    elif outcome == "mismatch":
        _report(runtime, read, reason)
    else:
        runtime.stats.verify_inconclusive(read.name, plan.op)
        logger.debug("sqlacache verify %s %s inconclusive: %s", read.name, plan.op, reason)
    return served


def _run(read: Decision) -> tuple[Result[Any], Sequence[Any]]:
    """The statement run as a miss runs it: the Result to serve and its raw rows."""
    served, frozen = run_frozen(read)
    return served, frozen.data


def _unloaded_before(session: Session) -> dict[Identity, set[str]]:
    """The unloaded attributes of every object in the session, before the query runs.

    A query hands back an object the session already holds as it is, with only its unloaded
    attributes filled in, from the cache or from the database alike: those attributes, and
    nothing else of such an object, are what the application gets from this read.
    """
    identity_map = session.identity_map
    if not len(identity_map):
        return {}
    names: dict[Mapper[Any], str] = {}
    found: dict[Identity, set[str]] = {}
    for state in identity_map.all_states():
        if state.key is None:
            continue
        name = names.get(state.mapper)
        if name is None:
            name = names[state.mapper] = mapper_name(state.mapper)
        found[(name, tuple(state.key[1]))] = set(state.unloaded)
    return found


def _check(
    runtime: Runtime,
    read: Decision,
    cached: Snapshot,
    rows: Sequence[Any],
    before: Mapping[Identity, set[str]],
    versions: Sequence[bytes | None],
) -> tuple[str, str]:
    """("match" | "mismatch" | "inconclusive", why)."""
    if len(rows) != len(cached.rows):
        reason = f"{len(cached.rows)} rows cached, {len(rows)} in the database"
    else:
        shape = read.plan.shape
        assert shape is not None
        try:
            fresh, _, _ = freeze(rows, shape, read.single_entity, read.plan)
        except NotSnapshottable as exc:
            return "inconclusive", f"the database's result cannot be compared ({exc})"
        found = differences(
            cached, fresh, read.plan.mappers_by_name, before, ordered=_ordered(read.state)
        )
        if found is None:
            return "match", ""
        reason = found
    if not _no_write_since(runtime, read, versions):
        # a write committed between the hit and the query may explain the difference
        return "inconclusive", f"{reason}, during a concurrent write"
    return "mismatch", reason


def _ordered(state: Any) -> bool:
    """Whether the statement orders its rows; without ORDER BY the database may return them in
    any order, and a different order is not a stale result. (A statement that cannot have an
    ORDER BY is treated as ordered.)"""
    clauses = _sqla.order_by_clauses(state.statement)
    return clauses is None or bool(clauses)


def _no_write_since(runtime: Runtime, read: Decision, seen: Sequence[bytes | None]) -> bool:
    """True if what the entry reads has the versions the hit saw, and no write lease on it.

    A writer holds a lease from its first flush until its versions are bumped after COMMIT, so
    a difference seen with versions unmoved and no lease is one that no write the cache saw can
    explain. (This does not look at the entry's own stamp: a fault in the hit's check is caught.)
    """
    version_keys = read.version_keys
    keys = [read.entry_key, *version_keys, *read.row_leases, *read.keyset.leases]
    try:
        found = runtime.store.fetch(keys)  # a fetch names an entry first
    except CacheUnavailable:
        return False
    versions, leases = found[1 : 1 + len(version_keys)], found[1 + len(version_keys) :]
    return list(versions) == list(seen) and leases.count(None) == len(leases)


def _report(runtime: Runtime, read: Decision, reason: str) -> None:
    """Evict the entry, count the mismatch, tell the hook, and warn (rate-limited)."""
    plan = read.plan
    with contextlib.suppress(CacheUnavailable):
        runtime.store.delete(read.entry_key)
    runtime.stats.mismatched(plan.model, read.name, plan.op, read.entry_key)
    runtime.stats.log.warning(
        f"verify:{read.name}:{plan.op}",
        "sqlacache: verification mismatch: a cached %s %s differed from the database (%s); "
        "tables read: %s; key %s. The entry was evicted. Something wrote these tables without "
        "the cache seeing it (raw SQL, a trigger, another application): call "
        "cache.invalidate(...) after such writes.",
        read.name,
        plan.op,
        reason,
        ", ".join(sorted(read.keyset.names)),
        read.entry_key,
    )


# -- the comparison -------------------------------------------------------------------------------


class Unreadable(ValueError):
    """A snapshot whose objects cannot be identified (its message says why)."""


def differences(
    cached: Snapshot,
    fresh: Snapshot,
    mappers: Mapping[str, Mapper[Any]],
    before: Mapping[Identity, set[str]],
    *,
    ordered: bool,
) -> str | None:
    """None if a hit serving `cached` hands the application what `fresh` (the database's result,
    frozen from the objects the query returned) handed it; otherwise what differs, without values.

    Rows must match in order (unless the statement has no ORDER BY), cell by cell with `same`;
    objects by identity. Every object either snapshot holds is compared, which covers every
    eager-loaded relationship to any depth: a new object on all its loaded column attributes
    and relationships, an object the session held before the query (`before`) only on the
    attributes that were unloaded then, since the rest is the session's own either way.
    """
    if cached.single_entity != fresh.single_entity or cached.entity_columns != fresh.entity_columns:
        return "the result's columns"
    if len(cached.rows) != len(fresh.rows):
        return f"{len(cached.rows)} rows cached, {len(fresh.rows)} in the database"
    try:
        ours, theirs = _identities(cached, mappers), _identities(fresh, mappers)
    except Unreadable as exc:
        return str(exc)
    rows_a = _rows(cached, ours)
    rows_b = _rows(fresh, theirs)
    if not _same_list(rows_a, rows_b) and (
        ordered or not _same_list(sorted(rows_a, key=repr), sorted(rows_b, key=repr))
    ):
        return "the rows (which rows, their order or their column values)"
    index_b = {identity: i for i, identity in enumerate(theirs)}
    if len(index_b) != len(set(ours)) or not all(identity in index_b for identity in ours):
        return "which objects the result reaches"
    for i, identity in enumerate(ours):
        found = _entity_differences(
            cached, i, ours, fresh, index_b[identity], theirs, mappers, before.get(identity)
        )
        if found is not None:
            return found
    return None


def _identities(snapshot: Snapshot, mappers: Mapping[str, Mapper[Any]]) -> list[Identity]:
    pk_positions: list[list[int]] = []
    for position, name in enumerate(snapshot.mappers):
        mapper = mappers.get(name)
        if mapper is None:
            raise Unreadable(f"a {name} object, which this statement's cached entry cannot hold")
        keys = snapshot.keys[position]
        try:
            pk_positions.append(
                [keys.index(mapper.get_property_by_column(c).key) for c in mapper.primary_key]
            )
        except ValueError:
            raise Unreadable(f"a {name} object without its primary key") from None
    return [
        (snapshot.mappers[m], tuple(values[i] for i in pk_positions[m]))
        for m, values, _, _ in snapshot.entities
    ]


def _rows(snapshot: Snapshot, identities: list[Identity]) -> list[tuple[Any, ...]]:
    """Rows with objects replaced by their identities."""
    if snapshot.single_entity:
        return [(None if ref is None else identities[ref],) for ref in snapshot.rows]
    columns = snapshot.entity_columns
    return [
        tuple(
            (None if cell is None else identities[cell]) if columns[i] else cell
            for i, cell in enumerate(row)
        )
        for row in snapshot.rows
    ]


def _entity_differences(
    cached: Snapshot,
    i: int,
    ours: list[Identity],
    fresh: Snapshot,
    j: int,
    theirs: list[Identity],
    mappers: Mapping[str, Mapper[Any]],
    unloaded_before: set[str] | None,
) -> str | None:
    mapper_a, values_a, missing_a, rels_a = cached.entities[i]
    mapper_b, values_b, missing_b, rels_b = fresh.entities[j]
    name = cached.mappers[mapper_a]
    loaded_a = _loaded(cached.keys[mapper_a], values_a, missing_a)
    loaded_b = _loaded(fresh.keys[mapper_b], values_b, missing_b)
    if unloaded_before is None:  # a new object: everything it holds comes from this read
        if loaded_a.keys() != loaded_b.keys() or rels_a.keys() != rels_b.keys():
            return f"which attributes of a {name} are loaded"
        keys: Any = loaded_a.keys()
        relationships: Any = rels_a.keys()
    else:
        keys = [k for k in loaded_a if k in unloaded_before and k in loaded_b]
        relationships = [k for k in rels_a if k in unloaded_before and k in rels_b]
    for key in keys:
        if not same(loaded_a[key], loaded_b[key]):
            return f"{name}.{key}"
    mapper = mappers[name]
    for key in relationships:
        ref_a, ref_b = rels_a[key], rels_b[key]
        if isinstance(ref_a, list) and isinstance(ref_b, list):
            targets_a = [ours[r] for r in ref_a]
            targets_b = [theirs[r] for r in ref_b]
            if targets_a == targets_b:
                continue
            prop = mapper.relationships.get(key)
            unordered = prop is not None and not prop.order_by  # a collection in no defined order
            if unordered and sorted(targets_a, key=repr) == sorted(targets_b, key=repr):
                continue
            return f"{name}.{key}"
        if isinstance(ref_a, list) or isinstance(ref_b, list):
            return f"{name}.{key}"
        target_a = None if ref_a is None else ours[ref_a]
        target_b = None if ref_b is None else theirs[ref_b]
        if target_a != target_b:
            return f"{name}.{key}"
    return None


def _loaded(keys: Sequence[str], values: Sequence[Any], missing: Sequence[int]) -> dict[str, Any]:
    if not missing:
        return dict(zip(keys, values, strict=False))
    skip = set(missing)
    return {key: values[i] for i, key in enumerate(keys) if i not in skip}


def _same_list(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))


def same(a: Any, b: Any) -> bool:
    """Equal as a hit must reproduce a value: the same type and the same value.

    A driver's subclass matches its documented base type (asyncpg's UUID and `uuid.UUID`), but
    `True` never matches `1`; NaN matches NaN; a Decimal keeps its exponent (`1.50` is not
    `1.5`); a datetime or time keeps its tzinfo; containers are compared element by element.
    """
    kind_a, kind_b = type(a), type(b)
    if kind_a is not kind_b and (
        kind_a is bool
        or kind_b is bool
        or not (issubclass(kind_a, kind_b) or issubclass(kind_b, kind_a))
    ):
        return False
    if a is None:
        return True
    if isinstance(a, (list, tuple)):
        return _same_list(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(value, b[key]) for key, value in a.items())
    if isinstance(a, float):
        return a == b or (a != a and b != b)
    if isinstance(a, decimal.Decimal):
        return bool(a.compare_total(b) == 0)
    if isinstance(a, (datetime.datetime, datetime.time)):
        return bool(a == b) and a.tzinfo == b.tzinfo
    try:
        return bool(a == b)
    except Exception:  # an exotic type whose comparison raises: not provably equal
        return False
