"""A result's shape: the `ResultShape` a hit builds its Result from without SQL, and the text
that says what each result column is and which loader options fill its objects, identical in
every process (two statements with the same SQL may return different things: their entries differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.orm import Mapper

from . import _sqla
from .keys import UnstableValue, canonical


@dataclass(frozen=True)
class ResultShape:
    """What the ORM's result object looks like, so a hit can build the same one without SQL."""

    metadata: SimpleResultMetaData
    single_entity: bool
    filtered: bool
    requires_unique: bool


def result_shape(compiled: Any, compile_state: Any, statement: Any) -> ResultShape | None:
    entities = _sqla.orm_entities(compile_state)
    if entities:
        labels = [_sqla.entity_label(e) for e in entities]
        extra: list[Any] = [_sqla.entity_extra_objects(e) for e in entities]
        single = len(entities) == 1 and bool(entities[0].supports_single_entity)
        return ResultShape(
            metadata=_sqla.orm_row_metadata(labels, extra, entities),
            single_entity=single,
            filtered=_sqla.has_mapper_entities(compile_state),
            requires_unique=bool(getattr(compile_state, "multi_row_eager_loaders", False)),
        )
    result_columns = _sqla.compiled_result_columns(compiled)
    if not result_columns:
        return None
    labels = [rc[0] for rc in result_columns]
    extra = [tuple(rc[2]) for rc in result_columns]
    return ResultShape(
        metadata=SimpleResultMetaData(labels, extra),
        single_entity=False,
        filtered=False,
        requires_unique=False,
    )


def describe_result(statement: Any) -> str:
    """What each result column is, as text identical in every process.

    Two statements can render the same SQL and still return different things: an entity, its
    columns, a `Bundle` of them, another class mapped to the same table. Their entries must
    differ.
    """
    try:
        descriptions = statement.column_descriptions
    except Exception:
        return ""
    parts = []
    for desc in descriptions:
        entity, expr = desc.get("entity"), desc.get("expr")
        info = inspect(entity, raiseerr=False) if entity is not None else None
        mapper = getattr(info, "mapper", None)
        owner = "" if mapper is None else mapper_name_of(mapper)
        kind = "entity" if expr is entity and entity is not None else type(expr).__name__
        parts.append(f"{desc.get('name')}:{kind}:{owner}:{int(bool(desc.get('aliased')))}")
    return ";".join(parts)


def mapper_name_of(mapper: Mapper[Any]) -> str:
    return f"{mapper.class_.__module__}.{mapper.class_.__qualname__}"


def describe_options(statement: Any) -> str:
    """Loader options as text that is identical in every process (no memory addresses)."""
    parts: list[str] = []
    for option in _sqla.loader_options(statement):
        kind = type(option)
        if not kind.__module__.startswith("sqlalchemy."):
            raise UnstableValue(kind.__qualname__)
        parts.append(kind.__qualname__)
        for element in getattr(option, "context", ()):
            parts.append(_describe_load_element(element))
    return ";".join(parts)


def _describe_load_element(element: Any) -> str:
    path = getattr(element, "path", None)
    tokens: list[str] = []
    for token in getattr(path, "path", ()) or ():
        if isinstance(token, Mapper):
            tokens.append(f"{token.class_.__module__}.{token.class_.__qualname__}")
        elif hasattr(token, "key") and hasattr(token, "parent"):
            tokens.append(str(token.key))
        elif isinstance(token, str):
            tokens.append(token)
        else:
            info = inspect(token, raiseerr=False)
            if getattr(info, "is_aliased_class", False) and getattr(info, "name", None):
                tokens.append(f"aliased:{info.mapper.class_.__qualname__}:{info.name}")
            else:
                raise UnstableValue(type(token).__qualname__)
    strategy = getattr(element, "strategy", None)
    local_opts = getattr(element, "local_opts", None) or {}
    opts = ",".join(
        f"{k}={canonical(v)}" for k, v in sorted(local_opts.items(), key=lambda kv: str(kv[0]))
    )
    return f"{type(element).__name__}[{'/'.join(tokens)}]{strategy!r}{{{opts}}}"
