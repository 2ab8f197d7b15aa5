"""Snapshots: an ORM result as plain data, and plain data back into a session.

`freeze` records what the database returned, read from objects that this very load created, so a
session's own state (pending edits, stale loaded values) never enters the cache. `thaw` does what
the ORM does for a query result: objects already in the identity map are returned as they are, with
only their unloaded attributes filled in; the others are created as clean persistent objects.
"""

from __future__ import annotations

import copy
import enum
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sqlalchemy.exc as sa_exc
from sqlalchemy import Table
from sqlalchemy.engine.result import IteratorResult, Result
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import instance_state

from . import _sqla
from .analysis import Plan
from .mapped import mapper_tables, relationship_tables
from .result_shape import ResultShape
from .serialize import PayloadError, Snapshot


class NotSnapshottable(Exception):
    """The result cannot be cached as is (its reason is the message); it is still returned."""


# -- per-mapper facts, memoised -------------------------------------------------------------------

_COLUMN_KEYS: dict[Mapper[Any], list[str]] = {}
_ABSENT = object()
_PK_POSITIONS: dict[tuple[Mapper[Any], tuple[str, ...]], list[int]] = {}


def _column_keys(mapper: Mapper[Any]) -> list[str]:
    keys = _COLUMN_KEYS.get(mapper)
    if keys is None:
        keys = [prop.key for prop in mapper.column_attrs]
        _COLUMN_KEYS[mapper] = keys
    return keys


_MUTABLE_TYPES = (list, dict, set, bytearray)
_MUTABLE_POSITIONS: dict[Mapper[Any], tuple[int, ...]] = {}


def _mutable_positions(mapper: Mapper[Any]) -> tuple[int, ...]:
    """Column attributes whose values can be changed in place (JSON, ARRAY, unknown types).

    A snapshot must own such values: the objects handed to the caller share them otherwise.
    """
    found = _MUTABLE_POSITIONS.get(mapper)
    if found is None:
        positions = []
        for position, key in enumerate(_column_keys(mapper)):
            try:
                python_type = mapper.column_attrs[key].columns[0].type.python_type
            except (NotImplementedError, AttributeError, IndexError, KeyError):
                python_type = object
            if python_type in _MUTABLE_TYPES or python_type is object:
                positions.append(position)
        found = tuple(positions)
        _MUTABLE_POSITIONS[mapper] = found
    return found


class _Uncopyable(Exception):
    """A value `copy.deepcopy` cannot rebuild (a type whose constructor needs more arguments)."""


def _own(values: list[Any], positions: tuple[int, ...]) -> None:
    """Deep-copy the mutable values at `positions`, in place."""
    for position in positions:
        value = values[position]
        if value is not None and type(value) not in _IMMUTABLE_SCALARS:
            values[position] = _copy(value)


def _copy(value: Any) -> Any:
    try:
        return copy.deepcopy(value)
    except Exception as exc:  # any type's own copy protocol may fail: never the caller's error
        raise _Uncopyable(type(value).__qualname__) from exc


_IMMUTABLE_SCALARS = frozenset({str, int, float, bool, bytes})


class _EntityShape:
    """What freezing an instance of one mapper needs, computed once per mapper."""

    def __init__(self, mapper: Mapper[Any]) -> None:
        self.keys = _column_keys(mapper)
        self.key_set = frozenset(self.keys)
        self.getter: Callable[[dict[str, Any]], Sequence[Any]] = (
            operator.itemgetter(*self.keys)
            if len(self.keys) > 1
            else (lambda d, k=self.keys[0]: (d[k],))  # type: ignore[misc]
        )
        self.mutable = _mutable_positions(mapper)
        self.relationships = tuple(mapper.relationships)
        self.relationship_keys = frozenset(prop.key for prop in self.relationships)


_SHAPES: dict[Mapper[Any], _EntityShape] = {}


def _shape_of(mapper: Mapper[Any]) -> _EntityShape:
    found = _SHAPES.get(mapper)
    if found is None:
        found = _EntityShape(mapper)
        _SHAPES[mapper] = found
    return found


def _pk_positions(mapper: Mapper[Any], keys: tuple[str, ...]) -> list[int]:
    memo = (mapper, keys)
    positions = _PK_POSITIONS.get(memo)
    if positions is None:
        wanted = [mapper.get_property_by_column(col).key for col in mapper.primary_key]
        try:
            positions = [keys.index(k) for k in wanted]
        except ValueError:
            raise PayloadError("snapshot lacks a primary-key attribute") from None
        _PK_POSITIONS[memo] = positions
    return positions


def mapper_name(mapper: Mapper[Any]) -> str:
    return f"{mapper.class_.__module__}.{mapper.class_.__qualname__}"


# -- freeze --------------------------------------------------------------------------------------


class _Freezer:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.index: dict[int, int] = {}
        self.mapper_index: dict[Mapper[Any], int] = {}
        self.mappers: list[str] = []
        self.keys: list[list[str]] = []
        self.entities: list[tuple[int, Sequence[Any], list[int], dict[str, Any]]] = []
        self.missing_tables: set[Table] = set()
        self.new_mappers: set[Mapper[Any]] = set()
        self._pending: list[Any] = []
        self._last_mapper: Mapper[Any] | None = None
        self._last_position = -1
        self._shapes: list[_EntityShape] = []
        self._checked_relationships: set[Any] = set()

    def ref(self, obj: Any) -> int | None:
        if obj is None:
            return None
        found = self.index.get(id(obj))
        if found is not None:
            return found
        state = instance_state(obj)
        if state.key is None:
            raise NotSnapshottable("transient_object")
        mapper = state.mapper
        if mapper is self._last_mapper:
            mapper_position = self._last_position
        else:
            mapper_position = self._mapper_position(mapper)
            self._last_mapper, self._last_position = mapper, mapper_position
        position = len(self.entities)
        self.index[id(obj)] = position
        self.entities.append((mapper_position, (), [], {}))
        self._pending.append((position, state))
        return position

    def _mapper_position(self, mapper: Mapper[Any]) -> int:
        found = self.mapper_index.get(mapper)
        if found is None:
            found = len(self.mappers)
            self.mapper_index[mapper] = found
            self.mappers.append(mapper_name(mapper))
            self.keys.append(_column_keys(mapper))
            self._shapes.append(_shape_of(mapper))
            self._check_mapper(mapper)
        return found

    def _check_mapper(self, mapper: Mapper[Any]) -> None:
        if mapper not in self.plan.mappers:
            self.new_mappers.add(mapper)
        for table in mapper_tables(mapper):
            if table not in self.plan.table_set:
                self.missing_tables.add(table)

    def drain(self) -> None:
        while self._pending:
            position, state = self._pending.pop()
            mapper_position, _, _, rels = self.entities[position]
            dict_ = state.dict
            shape = self._shapes[mapper_position]
            values: Sequence[Any]
            missing: list[int] = []
            if shape.key_set <= dict_.keys():  # every column attribute loaded: one C call
                values = shape.getter(dict_)
            else:  # deferred or expired attributes stay unloaded in the copies
                get = dict_.get
                full = [get(key, _ABSENT) for key in shape.keys]
                missing = [i for i, value in enumerate(full) if value is _ABSENT]
                values = [None if value is _ABSENT else value for value in full]
            if shape.mutable and any(values[i] is not None for i in shape.mutable):
                values = list(values)
                try:
                    _own(values, shape.mutable)
                except _Uncopyable as exc:
                    raise NotSnapshottable("uncopyable_value") from exc
            self.entities[position] = (mapper_position, values, missing, rels)
            loaded = shape.relationship_keys & dict_.keys()
            if not loaded:
                continue
            for prop in shape.relationships:
                if prop.key not in loaded:
                    continue
                value = dict_[prop.key]
                if prop not in self._checked_relationships:
                    self._checked_relationships.add(prop)
                    self._check_relationship(prop)
                if prop.uselist:
                    if isinstance(value, dict):
                        value = value.values()
                    rels[prop.key] = [self.ref(o) for o in value]
                else:
                    rels[prop.key] = self.ref(value)

    def _check_relationship(self, prop: Any) -> None:
        for table in relationship_tables(prop):
            if table not in self.plan.table_set:
                self.missing_tables.add(table)


def freeze(
    rows: Sequence[Any],
    shape: ResultShape,
    single_entity: bool,
    plan: Plan,
) -> tuple[Snapshot, set[Table], set[Mapper[Any]]]:
    """Snapshot result rows; also return tables and mappers the plan did not foresee.

    Every object in `rows` must have been created by this very load (the caller reads beside a
    session that already held objects), so its loaded state is what the database returned.
    """
    freezer = _Freezer(plan)
    entity_columns: list[bool] = []
    out_rows: list[Any] = []
    if single_entity:
        if rows and not _is_entity_column(rows, None):
            raise NotSnapshottable("scalar_single_entity")
        out_rows = [freezer.ref(obj) for obj in rows]
        entity_columns = [True]
    else:
        # the rows' own width: legacy `Query` aggregates have unnamed columns, no keys at all
        width = len(rows[0]) if rows else len(shape.metadata.keys)
        entity_columns = [_is_entity_column(rows, i) for i in range(width)]
        try:
            for row in rows:
                out_rows.append(
                    [
                        freezer.ref(cell)
                        if entity_columns[i]
                        else (_copy(cell) if type(cell) in _MUTABLE_TYPES else cell)
                        for i, cell in enumerate(row)
                    ]
                )
        except _Uncopyable as exc:
            raise NotSnapshottable("uncopyable_value") from exc
    freezer.drain()
    snapshot = Snapshot(
        mappers=freezer.mappers,
        keys=freezer.keys,
        entities=freezer.entities,
        entity_columns=entity_columns,
        rows=out_rows,
        single_entity=single_entity,
    )
    return snapshot, freezer.missing_tables, freezer.new_mappers


def _is_entity_column(rows: Sequence[Any], position: int | None) -> bool:
    """Whether a column holds mapped objects only; a mix of objects and values is refused.

    Decided per type, not per cell: a column has few distinct types and many rows.
    """
    cells = rows if position is None else map(operator.itemgetter(position), rows)
    kinds = set(map(type, cells))
    kinds.discard(type(None))
    mapped = {_sqla.is_mapped_class(kind) for kind in kinds}
    if len(mapped) > 1:
        raise NotSnapshottable("mixed_column")
    return mapped == {True}


# -- thaw ----------------------------------------------------------------------------------------


def thaw(
    snapshot: Snapshot, session: Session, plan: Plan, identity_token: Any, *, shared: bool = False
) -> list[Any]:
    """Materialise a snapshot in `session` and return the result's raw rows.

    `shared`: the snapshot serves several readers (an in-process flight), so each gets its own
    copies of mutable values; a snapshot just decoded from bytes is already this reader's own.
    """
    by_name = plan.mappers_by_name
    kinds = []  # per mapper of the payload: what building its instances needs
    for position, name in enumerate(snapshot.mappers):
        mapper = by_name.get(name)
        if mapper is None:  # only classes this statement can return are ever instantiated
            raise PayloadError(f"unexpected class {name!r} in payload")
        keys = snapshot.keys[position]
        kinds.append(
            (
                keys,
                _pk_positions(mapper, tuple(keys)),
                _sqla.identity_class(mapper),
                mapper.class_manager.new_instance,
                _mutable_positions(mapper) if shared else (),
            )
        )
    identity_map = session.identity_map
    get_existing = identity_map.get
    objects: list[Any] = []
    fresh: list[bool] = []
    new_states: list[Any] = []
    for mapper_position, values, missing, _ in snapshot.entities:
        keys, pk_positions, identity_class, new_instance, mutable = kinds[mapper_position]
        if mutable:
            values = list(values)
            try:
                _own(values, mutable)
            except _Uncopyable as exc:
                raise PayloadError(f"uncopyable value: {exc}") from None
        # the identity key, as Mapper.identity_key_from_primary_key builds it
        identity = (identity_class, tuple([values[i] for i in pk_positions]), identity_token)
        existing = get_existing(identity)
        if existing is not None:
            _fill_unloaded(instance_state(existing), keys, values, missing)
            objects.append(existing)
            fresh.append(False)
            continue
        obj = new_instance()
        state = instance_state(obj)
        state.key = identity
        state.identity_token = identity_token
        dict_ = state.dict
        if missing:
            skip = set(missing)
            for i, key in enumerate(keys):
                if i not in skip:
                    dict_[key] = values[i]
        else:
            dict_.update(zip(keys, values, strict=False))
        objects.append(obj)
        fresh.append(True)
        new_states.append(state)
    for position, (_, _, _, rels) in enumerate(snapshot.entities):
        if rels:
            _set_relationships(objects[position], fresh[position], rels, objects)
    session_id = session.hash_key
    add = _sqla.add_to_identity_map(identity_map)
    for state in new_states:
        state.session_id = session_id
        add(state, state.key)
        _sqla.commit_loaded(state, identity_map)
        if state.manager.dispatch.load:
            state.manager.dispatch.load(state, None)
    if snapshot.single_entity:
        return [None if ref is None else objects[ref] for ref in snapshot.rows]
    columns = snapshot.entity_columns
    try:
        return [
            tuple(
                (None if cell is None else objects[cell])
                if columns[i]
                else (_copy(cell) if shared and type(cell) in _MUTABLE_TYPES else cell)
                for i, cell in enumerate(row)
            )
            for row in snapshot.rows
        ]
    except _Uncopyable as exc:
        raise PayloadError(f"uncopyable value: {exc}") from None


def _fill_unloaded(state: Any, keys: list[str], values: Sequence[Any], missing: list[int]) -> None:
    """Populate only what the object does not have loaded, as the ORM does for a query."""
    unloaded = state.unloaded
    if not unloaded:
        return
    skip = set(missing)
    filled = []
    dict_ = state.dict
    for i, key in enumerate(keys):
        if key in unloaded and i not in skip:
            dict_[key] = values[i]
            filled.append(key)
    if filled:
        _sqla.commit_attributes(state, dict_, filled)


def _set_relationships(obj: Any, fresh: bool, rels: dict[str, Any], objects: list[Any]) -> None:
    state = instance_state(obj)
    unloaded = None if fresh else state.unloaded
    for key, ref in rels.items():
        if unloaded is not None and key not in unloaded:
            continue
        try:
            impl = state.manager[key].impl
        except KeyError:
            raise PayloadError(f"unknown relationship {key!r}") from None
        if isinstance(ref, list):
            value: Any = [objects[i] for i in ref]
        else:
            value = None if ref is None else objects[ref]
        impl.set_committed_value(state, state.dict, value)


def enum_resolver(plan: Plan) -> Any:
    """Find the Enum class of an entity attribute from the local mapping, never from the payload."""
    by_name = {mapper_name(m): m for m in plan.mappers}

    def resolve(name: str, key: str) -> type[enum.Enum] | None:
        mapper = by_name.get(name)
        if mapper is None or key not in mapper.columns:
            return None
        return getattr(mapper.columns[key].type, "enum_class", None)

    return resolve


# -- the result object ---------------------------------------------------------------------------


def _require_unique(obj: Any) -> Any:
    raise sa_exc.InvalidRequestError(
        "The unique() method must be invoked on this Result, as it contains results that include "
        "joined eager loads against collections"
    )


def build_result(shape: ResultShape, single_entity: bool, rows: Iterable[Any]) -> Result[Any]:
    """The Result the ORM would have returned for these rows."""
    result: IteratorResult[Any] = IteratorResult(shape.metadata, iter(rows))
    _sqla.shape_result(
        result,
        filtered=shape.filtered,
        single_entity=single_entity,
        unique_filter=(set(), _require_unique) if shape.requires_unique else None,
    )
    return result


def materialise(
    snapshot: Snapshot,
    session: Session,
    plan: Plan,
    identity_token: Any,
    single_entity: bool,
    *,
    shared: bool = False,
) -> Result[Any]:
    """The Result a hit returns: the snapshot thawed into `session`, shaped as the ORM shapes it."""
    rows = thaw(snapshot, session, plan, identity_token, shared=shared)
    assert plan.shape is not None
    return build_result(plan.shape, single_entity, rows)
