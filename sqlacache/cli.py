"""Command line for operators: `python -m sqlacache demo | stats | invalidate | invalidate-all`.

`invalidate` and `invalidate-all` are for after a manual SQL fix: they talk to the shared backend
(Redis) named by `--backend` and `--prefix`, or by a configured cache object given with `--app`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from typing import Any

from .errors import CacheError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sqlacache", description=__doc__)
    parser.add_argument(
        "--app",
        help="a configured cache object as 'package.module:attribute' (imports your models too)",
    )
    parser.add_argument(
        "--backend",
        default=os.environ.get("SQLACACHE_BACKEND", "redis://localhost:6379/0"),
        help="backend URL when --app is not given (default: $SQLACACHE_BACKEND or redis://localhost:6379/0)",
    )
    parser.add_argument("--prefix", default=os.environ.get("SQLACACHE_PREFIX", "sqlacache"))
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run the demo on mem:// and SQLite (no services needed)")
    commands.add_parser("stats", help="what the backend holds under the prefix")
    invalidate = commands.add_parser(
        "invalidate", help="make a model or table stale (after manual SQL)"
    )
    invalidate.add_argument("target", help="a dotted model path 'app.models.User' or a table name")
    invalidate.add_argument(
        "--pk",
        action="append",
        default=None,
        help="a primary key (repeatable); composite keys as comma-separated values",
    )
    commands.add_parser("invalidate-all", help="make everything under the prefix stale")
    return parser


def _load_cache(args: argparse.Namespace) -> Any:
    from . import configure

    if args.app:
        module_name, _, attribute = args.app.partition(":")
        module = importlib.import_module(module_name)
        return getattr(module, attribute or "cache")
    if args.backend.startswith("mem://"):
        raise CacheError("mem:// lives inside each process: the command line cannot reach it")
    return configure(args.backend, models={}, prefix=args.prefix)


def _parse_pk(text: str) -> Any:
    parts = [int(p) if p.lstrip("-").isdigit() else p for p in text.split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


async def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from .demo import run_demo

        await run_demo()
        return 0
    cache = _load_cache(args)
    try:
        if args.command == "stats":
            print(json.dumps(await cache.namespace_stats(), indent=2, sort_keys=True))
        elif args.command == "invalidate":
            pks = None if args.pk is None else [_parse_pk(p) for p in args.pk]
            await cache.invalidate(args.target, pks=pks, unknown_tables=True)
            print(f"invalidated {args.target}" + ("" if pks is None else f" rows {pks}"))
        elif args.command == "invalidate-all":
            await cache.invalidate_all()
            print(f"invalidated everything under prefix {cache.config.prefix!r}")
    finally:
        await cache.disconnect()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except CacheError as exc:
        print(f"sqlacache: {exc}", file=sys.stderr)
        return 2
