"""Serialisation: a result snapshot to bytes and back, without ever executing code.

The default format is JSON. Values that JSON cannot carry are converted by a per-column codec
chosen from a fixed table (datetime, Decimal, UUID, bytes, ...), so decoding never looks up a class
named by the payload. Pickle is available only with a `secret`: such payloads are HMAC-SHA256
signed with a fixed algorithm and verified with `hmac.compare_digest` before anything is unpickled.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import enum
import gzip
import hashlib
import hmac
import json
import operator
import pickle
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

FORMAT_VERSION = 2


class PayloadError(Exception):
    """A stored payload that cannot be decoded or verified: treated as a miss and evicted."""


class Unserializable(Exception):
    """A result holding a value the safe format cannot represent: it is not cached."""


@dataclass
class Snapshot:
    """A result, independent of any session: plain values, entities by index, rows by reference.

    - `mappers`: dotted class names of the mapped classes that occur.
    - `keys[m]`: the column attributes recorded for mapper `m`.
    - `entities`: `(mapper index, values, missing positions, relationships)`; relationships map
      an attribute to an entity index, a list of indexes, or None.
    - `entity_columns`: for each result column, whether it holds entities.
    - `rows`: for a single-entity result, entity indexes; otherwise lists of cells.
    """

    mappers: list[str]
    keys: list[list[str]]
    entities: list[tuple[int, Sequence[Any], list[int], dict[str, Any]]]
    entity_columns: list[bool]
    rows: list[Any]
    single_entity: bool


# -- codecs --------------------------------------------------------------------------------------

#: the codec of a column whose values all have this exact type
_KIND_CODECS: dict[type, str] = {
    str: "",
    int: "",
    float: "",
    bool: "",
    datetime.datetime: "dt",
    datetime.date: "da",
    datetime.time: "t",
    datetime.timedelta: "td",
    decimal.Decimal: "d",
    bytes: "b",
    uuid.UUID: "u",
}
_JSON_KINDS = frozenset({str, int, float, bool, list, dict})
_NONE = type(None)


def _is_json_native(value: Any, depth: int = 0) -> bool:
    kind = type(value)
    if kind in (str, int, float, bool) or value is None:
        return True
    if depth > 32:
        return False
    if kind is list:
        return all(_is_json_native(v, depth + 1) for v in value)
    if kind is dict:
        return all(type(k) is str and _is_json_native(v, depth + 1) for k, v in value.items())
    return False


def _column_codec(values: Sequence[Any]) -> str:
    """One codec for a whole column, from the set of its value types (one pass in C)."""
    kinds = set(map(type, values))
    kinds.discard(_NONE)
    if not kinds:
        return ""
    if len(kinds) == 1:
        kind = next(iter(kinds))
        codec = _KIND_CODECS.get(kind)
        if codec is not None:
            if codec == "dt":
                return _datetime_codec(values)
            if codec == "t" and not _fixed_offsets(values):
                raise Unserializable("a time of day with a named time zone")
            return codec
        if issubclass(kind, uuid.UUID) and _is_driver_type(kind):  # asyncpg's UUID
            return "u"
        if issubclass(kind, enum.Enum):
            return "e"
    if kinds <= _JSON_KINDS and (kinds & {list, dict}):
        # a JSON column: any mix of JSON values, as long as nothing inside needs a codec
        if all(_is_json_native(v) for v in values):
            return ""
        raise Unserializable("a JSON value holding values JSON cannot carry")
    if all(issubclass(k, uuid.UUID) and _is_driver_type(k) for k in kinds):
        return "u"
    raise Unserializable(f"a column of {', '.join(sorted(k.__qualname__ for k in kinds))}")


#: packages of database drivers: their subclasses of a standard type may become that base type on
#: a hit (as documented). An application's own subclass comes back as itself, or is not cached.
_DRIVER_PACKAGES = frozenset(
    {"asyncpg", "psycopg", "psycopg2", "pg8000", "pymysql", "MySQLdb", "aiomysql", "asyncmy"}
    | {"oracledb", "cx_Oracle", "pyodbc", "aioodbc", "sqlite3", "aiosqlite", "uuid"}
)


def _is_driver_type(kind: type) -> bool:
    return kind.__module__.partition(".")[0] in _DRIVER_PACKAGES


def _fixed_offsets(values: Sequence[Any]) -> bool:
    """Whether ISO format carries every value's tzinfo exactly (none, or an unnamed offset)."""
    zones = {v.tzinfo for v in values if v is not None}
    return all(z is None or (type(z) is datetime.timezone and _plain_offset(z)) for z in zones)


def _plain_offset(zone: datetime.timezone) -> bool:
    """A fixed offset that `fromisoformat` gives back as an equal object with the same name."""
    return zone is datetime.timezone.utc or zone.tzname(None) == datetime.timezone(
        zone.utcoffset(None)
    ).tzname(None)


def _datetime_codec(values: Sequence[Any]) -> str:
    """ "dt" (ISO text) when that carries every tzinfo; "dz" (ISO text plus the zone) otherwise.

    psycopg 3 returns `zoneinfo.ZoneInfo` time zones and a hit must return the same tzinfo as
    the database read did, so the zone is stored by its key and restored as that ZoneInfo.
    """
    if _fixed_offsets(values):
        return "dt"
    for zone in {v.tzinfo for v in values if v is not None}:
        if zone is None or type(zone) is datetime.timezone:
            continue
        if type(zone) is not ZoneInfo or not zone.key:
            raise Unserializable(f"a datetime with a {type(zone).__qualname__} time zone")
    return "dz"


def _encode_zoned(value: datetime.datetime) -> Any:
    zone = value.tzinfo
    text = value.isoformat()
    if zone is None or (type(zone) is datetime.timezone and _plain_offset(zone)):
        return text
    if type(zone) is ZoneInfo:
        return [text, zone.key]
    offset = zone.utcoffset(None)
    assert offset is not None  # a datetime.timezone always has one
    return [text, offset.total_seconds(), zone.tzname(None)]


def _decode_zoned(value: Any) -> datetime.datetime:
    if type(value) is str:
        return datetime.datetime.fromisoformat(value)
    moment = datetime.datetime.fromisoformat(value[0])
    if len(value) == 2:
        # the same instant in the named zone: wall time and fold as the database read gave them
        return moment.astimezone(ZoneInfo(value[1]))
    zone = datetime.timezone(datetime.timedelta(seconds=value[1]), value[2])
    return moment.astimezone(zone)


_ISOFORMAT = operator.methodcaller("isoformat")  # C-level: no Python frame per value

_ENCODERS: dict[str, Callable[[Any], Any]] = {
    "dt": _ISOFORMAT,
    "dz": _encode_zoned,
    "da": _ISOFORMAT,
    "t": _ISOFORMAT,
    "td": lambda v: [v.days, v.seconds, v.microseconds],
    "d": str,
    "b": lambda v: base64.b64encode(v).decode("ascii"),
    "u": str,
    "e": lambda v: v.name,
}

_DECODERS: dict[str, Callable[[Any], Any]] = {
    "dt": datetime.datetime.fromisoformat,
    "dz": _decode_zoned,
    "da": datetime.date.fromisoformat,
    "t": datetime.time.fromisoformat,
    "td": lambda v: datetime.timedelta(days=v[0], seconds=v[1], microseconds=v[2]),
    "d": decimal.Decimal,
    "b": lambda v: base64.b64decode(v, validate=True),
    "u": uuid.UUID,
}


def _encode_column(values: Sequence[Any], codec: str) -> Sequence[Any]:
    if not codec:
        return values
    encode = _ENCODERS[codec]
    if None in values:
        return [None if v is None else encode(v) for v in values]
    return list(map(encode, values))


def _decode_column(values: list[Any], decode: Callable[[Any], Any]) -> list[Any]:
    if None in values:
        return [None if v is None else decode(v) for v in values]
    return list(map(decode, values))


#: one encoder and decoder for every payload: `json.dumps` with arguments builds a new encoder
#: on every call, which is a measurable part of encoding a small result
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_DECODE = json.loads


# -- the serializer ------------------------------------------------------------------------------

#: (dotted class name, attribute) -> the Enum class of that column in the local mapping
EnumResolver = Callable[[str, str], "type[enum.Enum] | None"]


class Serializer:
    """Turns snapshots into bytes and back, per the configured format, compression and secret."""

    def __init__(
        self, name: str = "sqlalchemy", compress: str | None = None, secret: bytes | None = None
    ) -> None:
        self.pickle = name in ("default", "pickle", "dill")
        self.compress = compress
        self.secret = secret

    # -- public --

    def dumps(self, snapshot: Snapshot) -> bytes:
        try:
            body = self._pickle(snapshot) if self.pickle else self._json(snapshot)
        except Unserializable:
            raise
        except Exception as exc:  # a value's own methods may raise: not cached, never an error
            raise Unserializable(f"{type(exc).__name__}: {exc}") from None
        tag = b"P" if self.pickle else b"J"
        if self.compress == "zlib":
            body, ctag = zlib.compress(body, 3), b"z"
        elif self.compress == "gzip":
            body, ctag = gzip.compress(body, 3, mtime=0), b"g"
        else:
            ctag = b"0"
        header = tag + ctag
        if self.secret is not None:
            return (
                header + b"S" + hmac.new(self.secret, header + body, hashlib.sha256).digest() + body
            )
        return header + b"-" + body

    def loads(self, data: bytes, enum_for: EnumResolver) -> Snapshot:
        try:
            return self._loads(data, enum_for)
        except PayloadError:
            raise
        except Exception as exc:  # any malformed input is a payload error, never a crash
            raise PayloadError(f"undecodable payload: {type(exc).__name__}") from None

    # -- internals --

    def _loads(self, data: bytes, enum_for: EnumResolver) -> Snapshot:
        if len(data) < 3:
            raise PayloadError("truncated payload")
        tag, ctag, signed = data[0:1], data[1:2], data[2:3]
        if signed == b"S":
            if self.secret is None:
                raise PayloadError("signed payload but no secret configured")
            mac, body = data[3:35], data[35:]
            expected = hmac.new(self.secret, data[0:2] + body, hashlib.sha256).digest()
            if not hmac.compare_digest(mac, expected):
                raise PayloadError("payload signature mismatch")
        elif signed == b"-":
            if self.secret is not None:
                raise PayloadError("unsigned payload while a secret is configured")
            body = data[3:]
        else:
            raise PayloadError("unknown payload header")
        if ctag == b"z":
            body = zlib.decompress(body)
        elif ctag == b"g":
            body = gzip.decompress(body)
        elif ctag != b"0":
            raise PayloadError("unknown compression")
        if tag == b"P":
            if signed != b"S":  # never unpickle what nobody signed
                raise PayloadError("unsigned pickle payload")
            snapshot = pickle.loads(body)
            if not isinstance(snapshot, Snapshot):
                raise PayloadError("pickle payload of the wrong type")
            return snapshot
        if tag != b"J":
            raise PayloadError("unknown payload format")
        return self._from_json(_DECODE(body), enum_for)

    def _pickle(self, snapshot: Snapshot) -> bytes:
        """Pickle, and unpickle once: a value that pickles but cannot be rebuilt (a constructor
        needing more arguments) would fail every hit instead of being refused once."""
        try:
            body = pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL)
            pickle.loads(body)
        except Exception as exc:
            raise Unserializable(f"a value pickle cannot carry: {type(exc).__name__}") from None
        return body

    def _json(self, snapshot: Snapshot) -> bytes:
        """Column-major JSON: per mapper, one list per attribute; rows as columns too."""
        by_mapper: list[list[Sequence[Any]]] = [[] for _ in snapshot.mappers]
        owners: list[int] = []
        missing: list[list[Any]] = []
        relations: list[list[Any]] = []
        for position, (mapper_index, values, absent, rels) in enumerate(snapshot.entities):
            owners.append(mapper_index)
            by_mapper[mapper_index].append(values)
            if absent:
                missing.append([position, absent])
            if rels:
                relations.append([position, rels])
        key_codecs: list[list[str]] = []
        columns_by_mapper: list[list[Sequence[Any]]] = []
        for mapper_index, keys in enumerate(snapshot.keys):
            columns = (
                list(zip(*by_mapper[mapper_index], strict=True)) if by_mapper[mapper_index] else []
            )
            if not columns:
                columns = [() for _ in keys]
            codecs = [_column_codec(column) for column in columns]
            key_codecs.append(codecs)
            columns_by_mapper.append(
                [
                    _encode_column(column, codec)
                    for column, codec in zip(columns, codecs, strict=True)
                ]
            )
        if snapshot.single_entity:
            row_columns: list[Sequence[Any]] = [snapshot.rows]
            scalar_codecs = [""]
        else:
            width = len(snapshot.entity_columns)
            row_columns = (
                list(zip(*snapshot.rows, strict=True))
                if snapshot.rows
                else [() for _ in range(width)]
            )
            scalar_codecs = []
            for position, column in enumerate(row_columns):
                codec = "" if snapshot.entity_columns[position] else _column_codec(column)
                if codec == "e":
                    raise Unserializable("enum values in a column result")
                scalar_codecs.append(codec)
                row_columns[position] = _encode_column(column, codec)
        doc = {
            "v": FORMAT_VERSION,
            "m": snapshot.mappers,
            "k": snapshot.keys,
            "kc": key_codecs,
            "kv": columns_by_mapper,
            "eo": owners,
            "em": missing,
            "er": relations,
            "ec": snapshot.entity_columns,
            "sc": scalar_codecs,
            "r": row_columns,
            "n": len(snapshot.rows),
            "s": snapshot.single_entity,
        }
        try:
            return _ENCODE(doc).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise Unserializable(str(exc)) from None

    def _from_json(self, doc: dict[str, Any], enum_for: EnumResolver) -> Snapshot:
        if doc.get("v") != FORMAT_VERSION:
            raise PayloadError("payload of another format version")
        mappers: list[str] = doc["m"]
        keys: list[list[str]] = doc["k"]
        entity_rows: list[list[tuple[Any, ...]]] = []
        for mapper_index, (codecs, columns) in enumerate(zip(doc["kc"], doc["kv"], strict=True)):
            decoded: list[Sequence[Any]] = []
            for position, (codec, column) in enumerate(zip(codecs, columns, strict=True)):
                if not codec:
                    decoded.append(column)
                    continue
                if codec == "e":
                    enum_class = enum_for(mappers[mapper_index], keys[mapper_index][position])
                    if enum_class is None:
                        raise PayloadError("enum value for a column without an enum type")
                    decoded.append(_decode_column(column, enum_class.__getitem__))
                else:
                    decoded.append(_decode_column(column, _DECODERS[codec]))
            entity_rows.append(list(zip(*decoded, strict=True)) if decoded and decoded[0] else [])
        cursor = [0] * len(mappers)
        missing = dict((position, absent) for position, absent in doc["em"])
        relations = dict((position, rels) for position, rels in doc["er"])
        entities = []
        for position, mapper_index in enumerate(doc["eo"]):
            rows = entity_rows[mapper_index]
            values = rows[cursor[mapper_index]] if rows else ()
            cursor[mapper_index] += 1
            entities.append(
                (mapper_index, values, missing.get(position, []), relations.get(position, {}))
            )
        single = bool(doc["s"])
        columns = []
        for column, codec in zip(doc["r"], doc["sc"], strict=True):
            columns.append(_decode_column(column, _DECODERS[codec]) if codec else column)
        rows_out: list[Any] = (
            columns[0] if single else [list(r) for r in zip(*columns, strict=True)]
        )
        if not single and not columns:
            rows_out = [[] for _ in range(int(doc["n"]))]
        return Snapshot(
            mappers=mappers,
            keys=keys,
            entities=entities,
            entity_columns=doc["ec"],
            rows=rows_out,
            single_entity=single,
        )
