"""The stored entry: the stamp it was filled under, a newline, the serialised payload.

A hit is served only if the stamp equals the current versions of everything the statement reads,
fetched in the same round trip as the entry. Versions are random tokens and never contain a
newline, so the first newline ends the stamp.
"""

from __future__ import annotations

from collections.abc import Sequence


def stamp_of(versions: Sequence[bytes]) -> bytes:
    """The stamp of a set of version tokens, in the order the statement's keys list them."""
    return b",".join(versions)


def pack(stamp: bytes, payload: bytes) -> bytes:
    return stamp + b"\n" + payload


def valid_payload(entry: bytes | None, versions: Sequence[bytes | None]) -> bytes | None:
    """The entry's payload if it was filled under exactly these versions, else None.

    A missing version never validates: an entry filled while the key existed must not survive
    the key's loss (it may have been evicted or the backend restarted empty).
    """
    if entry is None or None in versions:
        return None
    stamp = b",".join(versions)  # type: ignore[arg-type]
    end = len(stamp)
    if entry[end : end + 1] != b"\n" or not entry.startswith(stamp):
        return None
    return entry[end + 1 :]
