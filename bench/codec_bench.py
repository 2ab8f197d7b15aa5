"""How much of a hit's decode and a miss's encode a faster JSON library would save.

    .venv/bin/pip install orjson msgspec      # optional: a library that is absent is skipped
    .venv/bin/python bench/codec_bench.py [--repeat 2000]

Payloads are the cache's own: `Serializer.dumps` of snapshots shaped as `freeze` builds them, for
1, 20 and 100 rows of the bench's `users` table and for P10's 20 posts with their authors. For
each, the whole `Serializer.dumps`/`loads` (column pass + JSON) is timed, then only the JSON
document's encode and decode with the standard library, orjson and msgspec. A library replaces
only the JSON step, so "saves" is stdlib JSON minus the library's, per call. orjson also encodes
`datetime` itself (RFC 3339, as `isoformat()` writes it for fixed offsets), which would drop the
column pass's isoformat step on a miss: timed as "orjson, datetimes native".

No library here ever builds anything but dicts, lists, strings and numbers from the bytes: decoding
cannot execute code. Single process, best of 5 repeats of `--repeat` calls, on a loaded machine:
only the ratios within one run mean much.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections.abc import Callable
from typing import Any

from sqlacache.serialize import Serializer, Snapshot

USER_KEYS = ["id", "name", "email", "age", "active", "created"]
POST_KEYS = ["id", "author_id", "title", "body", "created"]
START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


def user_values(i: int) -> tuple[Any, ...]:
    return (
        i,
        f"user {i}",
        f"user{i}@example.com",
        18 + i % 60,
        i % 7 != 0,
        START + datetime.timedelta(minutes=i, microseconds=i),
    )


def users_snapshot(n: int) -> Snapshot:
    """What `freeze` makes of `select(User)` (or `session.get`) returning `n` rows."""
    return Snapshot(
        mappers=["harness.User"],
        keys=[USER_KEYS],
        entities=[(0, user_values(1000 + i), [], {}) for i in range(n)],
        entity_columns=[True],
        rows=list(range(n)),
        single_entity=True,
    )


def posts_snapshot(n: int = 20) -> Snapshot:
    """P10's list: `n` posts, each with its (many-to-one) author, authors repeating."""
    entities: list[tuple[int, Any, list[int], dict[str, Any]]] = []
    author_at: dict[int, int] = {}
    posts = []
    for i in range(n):
        post_id = 2_000 - i
        author = 1 + (post_id * 7) % 500
        position = len(entities)
        posts.append(position)
        entities.append(
            (
                0,
                (
                    post_id,
                    author,
                    f"post {post_id}: on caching and other hard problems",
                    f"body of post {post_id} " * 20,
                    START + datetime.timedelta(hours=post_id),
                ),
                [],
                {},
            )
        )
        if author not in author_at:
            author_at[author] = len(entities)
            entities.append((1, user_values(author), [], {}))
        entities[position][3]["author"] = author_at[author]
    return Snapshot(
        mappers=["realistic.Post", "harness.User"],
        keys=[POST_KEYS, USER_KEYS],
        entities=entities,
        entity_columns=[True],
        rows=posts,
        single_entity=True,
    )


def best_us(fn: Callable[[], Any], repeat: int) -> float:
    """Best of 5 runs of `repeat` calls, µs per call: the least disturbed by other processes."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / repeat / 1000)
    return best


def _with_native_datetimes(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with `dt` columns left as datetimes, as orjson could encode them."""
    copy = dict(doc)
    kv = []
    for codecs, columns in zip(doc["kc"], doc["kv"], strict=True):
        kv.append(
            [
                [datetime.datetime.fromisoformat(v) for v in column] if codec == "dt" else column
                for codec, column in zip(codecs, columns, strict=True)
            ]
        )
    copy["kv"] = kv
    return copy


def measure(label: str, snapshot: Snapshot, repeat: int) -> dict[str, Any]:
    serializer = Serializer()
    payload = serializer.dumps(snapshot)
    body = payload[3:]
    doc = json.loads(body)
    out: dict[str, Any] = {"payload": label, "bytes": len(payload)}
    out["serializer.dumps"] = best_us(lambda: serializer.dumps(snapshot), repeat)
    out["serializer.loads"] = best_us(lambda: serializer.loads(payload, lambda m, k: None), repeat)
    codecs: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "json (stdlib)": (
            lambda: json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8"),
            lambda: json.loads(body),
        )
    }
    try:
        import orjson

        native = _with_native_datetimes(doc)
        assert orjson.dumps(native) == orjson.dumps(doc), "orjson's datetimes differ"
        assert orjson.loads(orjson.dumps(doc)) == doc
        codecs["orjson"] = (lambda: orjson.dumps(doc), lambda: orjson.loads(body))
        codecs["orjson, datetimes native"] = (lambda: orjson.dumps(native), lambda: None)
    except ImportError:
        pass
    try:
        import msgspec

        encoder, decoder = msgspec.json.Encoder(), msgspec.json.Decoder()
        assert decoder.decode(encoder.encode(doc)) == doc
        codecs["msgspec"] = (lambda: encoder.encode(doc), lambda: decoder.decode(body))
    except ImportError:
        pass
    for name, (dumps, loads) in codecs.items():
        out[name] = {
            "dumps": best_us(dumps, repeat),
            "loads": None if name.endswith("native") else best_us(loads, repeat),
        }
    return out


def dt_pass_us(snapshot: Snapshot, repeat: int) -> float:
    """The encode-side isoformat pass over the `created` columns alone."""
    import operator

    iso = operator.methodcaller("isoformat")
    columns = [
        [values[-1] for mapper, values, _m, _r in snapshot.entities if mapper == m]
        for m in range(len(snapshot.mappers))
    ]
    return best_us(lambda: [list(map(iso, c)) for c in columns], repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=2_000)
    args = parser.parse_args()
    payloads = [
        ("get: 1 user", users_snapshot(1)),
        ("fetch: 20 users", users_snapshot(20)),
        ("fetch: 100 users", users_snapshot(100)),
        ("P10 list: 20 posts + authors", posts_snapshot(20)),
    ]
    for label, snapshot in payloads:
        repeat = max(50, args.repeat // max(1, len(snapshot.entities) // 5))
        found = measure(label, snapshot, repeat)
        stdlib = found["json (stdlib)"]
        print(
            f"\n{label}: {found['bytes']} bytes; Serializer.dumps {found['serializer.dumps']:.1f} µs,"
            f" loads {found['serializer.loads']:.1f} µs (column pass + stdlib JSON);"
            f" isoformat pass {dt_pass_us(snapshot, repeat):.1f} µs"
        )
        print(
            f"  {'codec':<26}{'dumps µs':>10}{'loads µs':>10}{'saves on a miss':>17}{'on a hit':>10}"
        )
        for name in [k for k in found if isinstance(found[k], dict)]:
            row = found[name]
            loads = row["loads"]
            print(
                f"  {name:<26}{row['dumps']:>10.1f}"
                + (f"{loads:>10.1f}" if loads is not None else f"{'-':>10}")
                + f"{stdlib['dumps'] - row['dumps']:>17.1f}"
                + (f"{stdlib['loads'] - loads:>10.1f}" if loads is not None else f"{'-':>10}")
            )


if __name__ == "__main__":
    main()
