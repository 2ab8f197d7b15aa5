"""A trace of the cluster soak, to tell where a stale read came from (SQLACACHE_SOAK_TRACE=DIR).

In each worker process, `install` wraps `ClusterNodes._round` and appends one JSON line per round
to DIR/trace-<worker>.jsonl: wall-clock start and end, each group's node, its commands (keys,
stamps and tokens, values cut at the stamp) and its replies or the exception. The worker adds its
own lines: `write` (row, sequence number, start and end of the transaction), `COMMIT` (the moment
the COMMIT is sent), `fetch` (the truth read and the cached read of the 10-row list), `stale`.
The test writes DIR/faults.json (the faults' windows).

    python -m integration.soak_trace DIR

prints, for every stale read, the reader's reads, the round that served it, the write it missed
with that transaction's COMMIT and bumps, and the fill that stored the entry served.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

_out: Any = None
_worker = -1


def short(value: Any) -> Any:
    """A reply or argument as JSON: bytes as text up to the first newline (an entry's stamp)."""
    if isinstance(value, bytes):
        head, newline, _ = value.partition(b"\n")
        return head[:120].decode(errors="replace") + ("\\n..." if newline else "")
    if isinstance(value, BaseException):
        return f"!{type(value).__name__}: {value}"
    if isinstance(value, list | tuple):
        return [short(v) for v in value]
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + "..."
    return value


def emit(record: dict[str, Any]) -> None:
    if _out is not None:
        record.setdefault("w", _worker)
        _out.write(json.dumps(record, default=str) + "\n")


def install(directory: str, worker: int) -> None:
    global _out, _worker
    from sqlacache.backends import cluster_nodes

    _worker = worker
    _out = Path(directory, f"trace-{worker}.jsonl").open("w", buffering=1 << 16)  # noqa: SIM115
    original = cluster_nodes.ClusterNodes._round
    names: dict[str, str] = {}

    def command(cmd: Any) -> list[Any]:
        if cmd and cmd[0] == "EVALSHA":
            return ["EVALSHA:" + names.get(cmd[1], "?"), *short(list(cmd[2:]))]
        if cmd and cmd[0] == "EVAL":
            return ["EVAL", *short(list(cmd[2:]))]
        return list(short(list(cmd)))

    async def traced(self: Any, groups: Any, extra: float = 0.0) -> Any:
        if not names:
            names.update({sha: name for name, sha in getattr(self, "_shas", {}).items()})
        sent = [
            {"node": f"{a[0]}:{a[1]}", "ask": asking, "cmds": [command(c) for c in commands]}
            for (a, asking), commands in groups
        ]
        started = time.time()
        try:
            replies = await original(self, groups, extra)
        except BaseException as exc:
            emit({"k": "round", "t0": started, "t1": time.time(), "g": sent, "exc": short(exc)})
            raise
        emit({"k": "round", "t0": started, "t1": time.time(), "g": sent, "r": short(replies)})
        return replies

    cluster_nodes.ClusterNodes._round = traced  # type: ignore[method-assign]


def close() -> None:
    global _out
    if _out is not None:
        _out.close()
        _out = None


# -- reading a trace ----------------------------------------------------------------------------


def _commands(record: dict[str, Any]) -> list[tuple[list[Any], Any]]:
    """Each command of a round with its reply (or the round's exception)."""
    out = []
    for index, group in enumerate(record["g"]):
        for position, cmd in enumerate(group["cmds"]):
            reply = record["r"][index][position] if "r" in record else record["exc"]
            out.append((cmd, reply))
    return out


def _announcement(cmd: list[Any]) -> bool:
    """A bump that takes leases: the announcement of a transaction's writes, at its flush."""
    if not cmd[0].startswith("EVAL") or "fill" in cmd[0] or len(cmd) < 2:
        return False
    args = cmd[2 + int(cmd[1]) :]
    return len(args) > 3 and isinstance(args[2], int) and args[2] > 0


def report(directory: str) -> None:
    records: list[dict[str, Any]] = []
    for path in sorted(Path(directory).glob("trace-*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records.sort(key=lambda r: r.get("t0", r.get("t", 0.0)))
    faults_path = Path(directory, "faults.json")
    faults = json.loads(faults_path.read_text()) if faults_path.exists() else None
    zero = faults["started"] if faults else records[0].get("t0", records[0].get("t", 0.0))
    if faults:
        print("faults:", [(n, round(b - zero, 2), round(e - zero, 2)) for n, b, e in faults["log"]])

    def at(t: float) -> str:
        return f"{t - zero:.4f}s"

    for stale in (r for r in records if r["k"] == "stale"):
        reader = stale["w"]
        fetch = [
            r for r in records if r["k"] == "fetch" and r["w"] == reader and r["t1"] <= stale["t"]
        ][-1]
        print(
            f"\nstale read by worker {reader}: user {stale['pk']} {stale['name']}, the database"
            f" had {stale['truth']}; truth read at {at(fetch['t_truth'])}, cached read"
            f" {at(fetch['t0'])}-{at(fetch['t1'])}"
        )
        served: tuple[str, str] | None = None
        for r in records:
            if r["k"] == "round" and r["w"] == reader and fetch["t0"] <= r["t0"] <= fetch["t1"]:
                for cmd, reply in _commands(r):
                    print(f"  round {at(r['t0'])} {cmd[0]} {cmd[1:]} -> {reply}")
                    if cmd[0] == "GET" and isinstance(reply, str):
                        served = (cmd[1], reply.split("\\n")[0])
        pk, seq = stale["pk"], int(stale["truth"].rsplit(":", 1)[1])
        write = next(
            (r for r in records if r["k"] == "write" and r["pk"] == pk and r["seq"] == seq), None
        )
        if write is not None:
            writer = write["w"]
            span = [
                r
                for r in records
                if r["w"] == writer and write["t0"] <= r.get("t0", r.get("t", 0)) <= write["t1"]
            ]
            commits = [r["t"] for r in span if r["k"] == "COMMIT"]
            print(
                f"  the write it missed: worker {writer}, {at(write['t0'])}-{at(write['t1'])},"
                f" COMMIT sent at {at(commits[-1]) if commits else '?'}"
            )
            for r in span:
                for cmd, reply in _commands(r) if r["k"] == "round" else []:
                    if cmd[0].startswith("EVAL") and "fill" not in cmd[0]:
                        kind = "announcement" if _announcement(cmd) else "bump"
                        print(f"    {kind} sent {at(r['t0'])}, answered {at(r['t1'])} -> {reply}")
        if served is not None:
            key, stamp = served
            for r in records:
                for cmd, _ in _commands(r) if r["k"] == "round" else []:
                    if cmd[0] == "SET" and cmd[1] == key and str(cmd[2]).split("\\n")[0] == stamp:
                        print(
                            f"  the entry served was stored by worker {r['w']} at {at(r['t0'])}"
                            f" on {r['g'][0]['node']}"
                        )


if __name__ == "__main__":
    report(sys.argv[1])
