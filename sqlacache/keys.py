"""Key names and digests: every key, version and lease sqlacache writes lives under `{prefix}:`.

Version, lease and epoch keys share the hash tag `{prefix}` so that on Redis Cluster one script can
touch them together; entries are spread by their digest. Digests are built only from values whose
text form is identical in every process (never `repr` of an arbitrary object).
"""

from __future__ import annotations

import datetime
import decimal
import enum
import hashlib
import os
import uuid
from collections.abc import Iterable
from typing import Any

#: How much longer than the entries depending on it a row version lives.
ROW_VERSION_MARGIN_MS = 2000
#: The life of a row version that a write creates and no entry has raised since.
WRITTEN_ROW_TTL_MS = 5000
#: A fill stored within this many seconds of reading its stamp creates missing row versions
#: without a guard: a write in between would have left its row version for WRITTEN_ROW_TTL_MS.
#: The margin covers the store's own transit (bounded by the operation timeout).
FAST_FILL_SECONDS = 2.0
assert FAST_FILL_SECONDS < WRITTEN_ROW_TTL_MS / 1000 / 2

#: Python types whose `repr` is deterministic across processes and Python runs.
_STABLE_REPR_TYPES = frozenset(
    {
        int,
        str,
        float,
        bool,
        type(None),
        bytes,
        decimal.Decimal,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
        uuid.UUID,
    }
)


class UnstableValue(Exception):
    """A parameter whose text form differs between processes: the statement is not cached."""


def canonical(value: Any) -> str:
    """A process-independent text form of a bound parameter value."""
    kind = type(value)
    if kind in _STABLE_REPR_TYPES:
        return repr(value)
    if kind is tuple or kind is list:
        if _STABLE_REPR_TYPES.issuperset(map(type, value)):
            # the common case (a statement's parameters, an IN list) in one C-level repr; the
            # "t" marks it apart from the element-wise form below, which never starts with "t"
            return "t" + repr(tuple(value))
        return "(" + ",".join(canonical(v) for v in value) + ")"
    if isinstance(value, enum.Enum):
        return f"{kind.__module__}.{kind.__qualname__}.{value.name}"
    if isinstance(value, uuid.UUID):  # driver-specific UUID subclasses (asyncpg)
        return repr(uuid.UUID(str(value)))
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return kind.__name__ + value.isoformat()
    if kind is dict:
        # sorted by canonical text: keys of mixed types (a schema map's None) do not compare
        pairs = sorted((canonical(k), canonical(v)) for k, v in value.items())
        return "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"
    raise UnstableValue(kind.__qualname__)


def digest(*parts: str) -> str:
    """A short, collision-resistant hex digest of text parts."""
    return digest_base(*parts).hexdigest()


def digest_base(*parts: str) -> Any:
    """A digest fed with leading parts once, to be finished many times by `digest_from`:
    `digest_from(digest_base(a, b), c)` equals `digest(a, b, c)`."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h


def digest_from(base: Any, *parts: str) -> str:
    """The digest of `base`'s parts followed by `parts`; `base` itself is left as it was."""
    h = base.copy()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def new_token() -> bytes:
    """A version token: unique with overwhelming probability, never reused after expiry."""
    return os.urandom(9).hex().encode()


class Namespace:
    """Builds every key of one prefix. `db` is the database identity of a bound engine."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        tag = "{" + prefix + "}"
        self._meta = f"{prefix}:{tag}"
        self.meta_prefix = self._meta + ":"
        self.entry_prefix = f"{prefix}:e:"
        self.epoch_key = f"{self._meta}:epoch"
        self.databases_key = f"{self._meta}:dbs"

    def kinds(self) -> dict[str, tuple[str, ...]]:
        """The key prefixes of each kind of key this namespace writes (for operators' counts)."""
        meta = self.meta_prefix
        return {
            "entries": (self.entry_prefix,),
            "table_versions": (meta + "v:",),
            "table_wide_versions": (meta + "b:",),
            "row_versions": (meta + "r:",),
            "write_leases": (meta + "l:", meta + "lb:", meta + "lr:"),
            "fill_locks": (f"{self.prefix}:lock:",),
        }

    def channel(self, database: int) -> str:
        """The pub/sub channel of this prefix in one Redis database: every bump publishes its
        new tokens there (in-process tiers follow it), and the cashews bridge its tags."""
        return f"{self.prefix}:inv:{database}"

    def entry(self, entry_digest: str) -> str:
        return self.entry_prefix + entry_digest

    def fill_lock(self, entry_key: str) -> str:
        return f"{self.prefix}:lock:{entry_key[len(self.entry_prefix) :]}"

    def table_version(self, db: str, table: str) -> str:
        """Bumped by every write to the table: multi-row entries depend on it."""
        return f"{self._meta}:v:{db}:{table}"

    def table_wide(self, db: str, table: str) -> str:
        """Bumped only by table-wide events: `get` entries depend on it and on their row."""
        return f"{self._meta}:b:{db}:{table}"

    def row_version(self, db: str, table: str, pk: str) -> str:
        """Bumped by writes to one row; `pk` is its `pk_text`."""
        return f"{self._meta}:r:{db}:{table}:{pk}"

    def lease(self, db: str, table: str) -> str:
        """Held while a transaction writes the table: no multi-row entry reading it is filled."""
        return f"{self._meta}:l:{db}:{table}"

    def table_wide_lease(self, db: str, table: str) -> str:
        """Held while a transaction writes rows it cannot name: no `get` entry is filled."""
        return f"{self._meta}:lb:{db}:{table}"

    def row_lease(self, db: str, table: str, pk: str) -> str:
        """Held while a transaction writes this row: its `get` entries are not filled."""
        return f"{self._meta}:lr:{db}:{table}:{pk}"


def pk_text(pk: Iterable[Any]) -> str:
    """The text of a primary-key identity; must match between reads (params) and writes (rows)."""
    return "|".join(canonical(_normalise_pk_value(v)) for v in pk)


def _normalise_pk_value(value: Any) -> Any:
    # Reads coerce parameters to the column's Python type (analysis.coerce_pk); UUIDs of driver
    # subclasses and of `uuid.UUID` must still name the same row key, so both become text.
    if isinstance(value, uuid.UUID):
        return str(value)
    return value
