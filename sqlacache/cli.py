"""Command line for operators: `python -m sqlacache demo | stats | invalidate | invalidate-all`.

`invalidate` and `invalidate-all` are for after a manual SQL fix. They talk to the shared Redis of
the application, named by `--backend` (or $SQLACACHE_BACKEND) and `--prefix`, or read from the
application's own configured cache with `--app` (which also imports its models, so table names and
primary-key types are known). The command never reports success for what it did not do: an unknown
table or model exits 2, an unreachable Redis exits 1 saying nothing was invalidated.
"""

from __future__ import annotations

import argparse
import datetime
import decimal
import difflib
import importlib
import itertools
import json
import os
import re
import sys
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table

from .errors import CacheError, ConfigError, TransportError

EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE = 0, 1, 2

ENVIRONMENT = {
    "SQLACACHE_BACKEND": "the Redis URL, as given to configure(backend=...)",
    "SQLACACHE_PREFIX": "the prefix, as given to configure(prefix=...) (default: sqlacache)",
    "SQLACACHE_APP": "the application's cache object, as for --app",
}

EPILOG = (
    """\
examples:
  python -m sqlacache demo
  python -m sqlacache --backend redis://localhost:6379/1 stats
  python -m sqlacache --backend redis://localhost:6379/1 invalidate users --pk 42 --pk 43
  python -m sqlacache invalidate order_lines --pk A-17,3 --backend redis://h:6379/1   (composite key)
  python -m sqlacache --app myapp.cache:cache invalidate myapp.models.User --pk 42
  python -m sqlacache --backend redis://h:6379/1 --prefix myapp invalidate-all

Options may come before or after the command. Primary keys are converted to the column's type when
the models are known (--app, or a dotted model path that imports): --pk 007 stays "007" on a String
column and becomes 7 on an Integer column. Otherwise they are kept as given (strings), and a key
written as an integer is invalidated as that integer too (the type is unknown; an extra key costs
nothing, a missed one would leave the entry stale).

environment:
"""
    + "".join(f"  {name:<18} {text}\n" for name, text in ENVIRONMENT.items())
    + """
exit status: 0 done; 1 Redis unreachable (nothing, or not everything, was invalidated);
2 usage error (unknown table or model, bad key, no backend, an --app that does not load).
"""
)


class CommandError(Exception):
    """A failure to report in one line, with the exit status."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


def _add_common(parser: argparse.ArgumentParser, top: bool) -> None:
    # Sub-commands repeat the options with SUPPRESS defaults so they may follow the command
    # without overwriting what came before it.
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    parser.add_argument(
        "--app",
        default=default(os.environ.get("SQLACACHE_APP")),
        help="the application's configured cache as 'package.module:attribute' "
        "(attribute defaults to 'cache'); imports your models too  [$SQLACACHE_APP]",
    )
    parser.add_argument(
        "--backend",
        default=default(os.environ.get("SQLACACHE_BACKEND")),
        help="the Redis URL when --app is not given  [$SQLACACHE_BACKEND]",
    )
    parser.add_argument(
        "--prefix",
        default=default(os.environ.get("SQLACACHE_PREFIX")),
        help="the cache prefix when --app is not given (default: sqlacache)  [$SQLACACHE_PREFIX]",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sqlacache",
        description=(__doc__ or "").split("\n\n")[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    demo = commands.add_parser("demo", help="run the demo on mem:// and SQLite (no services)")
    stats = commands.add_parser(
        "stats", help="what the shared Redis holds under the prefix (not per-process counters)"
    )
    invalidate = commands.add_parser(
        "invalidate", help="make a table or model stale after manual SQL (all rows, or --pk)"
    )
    invalidate.add_argument(
        "target", help="a table name ('users') or model path ('app.models.User')"
    )
    invalidate.add_argument(
        "--pk",
        action="append",
        default=None,
        help="a primary key (repeatable); a composite key as comma-separated values in "
        "primary-key order",
    )
    invalidate.add_argument(
        "--force",
        action="store_true",
        help="invalidate a table name even though neither the models nor the cache know it",
    )
    invalidate_all = commands.add_parser(
        "invalidate-all", help="make everything under the prefix stale (nothing else is touched)"
    )
    for sub in (demo, stats, invalidate, invalidate_all):
        _add_common(sub, top=False)
    return parser


# -- loading the cache --------------------------------------------------------------------------


def _load_cache(args: argparse.Namespace) -> Any:
    from . import configure
    from .manager import CacheManager

    if args.app:
        module_name, _, attribute = args.app.partition(":")
        attribute = attribute or "cache"
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise CommandError(
                f"--app {args.app!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}"
            ) from None
        cache = getattr(module, attribute, None)
        if not isinstance(cache, CacheManager):
            found = (
                "nothing"
                if cache is None
                else f"the class {cache.__qualname__}"
                if isinstance(cache, type)
                else f"a {type(cache).__name__}"
            )
            raise CommandError(
                f"--app {args.app!r}: {module_name}.{attribute} is {found}, not a sqlacache cache "
                "(name the object configure() returned, e.g. 'myapp.cache:cache')"
            )
        if args.prefix and args.prefix != cache.config.prefix:
            raise CommandError(
                f"--prefix {args.prefix!r} contradicts the app's prefix {cache.config.prefix!r}"
            )
    else:
        if not args.backend:
            raise CommandError(
                "no backend: give --backend redis://host:6379/0 (or set $SQLACACHE_BACKEND), or "
                "--app package.module:cache. The default of configure(), mem://, lives inside "
                "each application process, where this command cannot reach it."
            )
        try:
            cache = configure(args.backend, models={}, prefix=args.prefix or "sqlacache")
        except ConfigError as exc:
            raise CommandError(f"--backend: {exc}") from None
    if cache.config.backend.is_memory:
        raise CommandError(
            "the backend is mem://, which lives inside each application process: this command "
            "cannot reach it (restart the processes, or use Redis)"
        )
    return cache


class _Redis:
    """The command's own view of the shared Redis: reachability, databases, known tables."""

    def __init__(self, cache: Any) -> None:
        import redis

        backend = cache.config.backend
        options = {
            k: v for k, v in backend.options.items() if k not in ("pool_timeout", "max_connections")
        }
        options.setdefault("socket_timeout", 5.0)
        options.setdefault("socket_connect_timeout", 5.0)
        self.url = backend.display
        self.client = redis.Redis.from_url(backend.url, **options)
        self.namespace = cache.namespace
        self.errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

    def check(self, consequence: str) -> None:
        try:
            self.client.ping()
        except self.errors as exc:
            raise CommandError(
                f"Redis unreachable at {self.url} ({type(exc).__name__}: {exc}): {consequence}",
                EXIT_UNREACHABLE,
            ) from None

    def databases(self) -> list[str]:
        return sorted(_text(m) for m in self.client.smembers(self.namespace.databases_key))

    def other_prefixes(self) -> list[str]:
        found = set()
        for key in self.client.scan_iter(match="*:{*}:dbs", count=1000):
            found.add(_text(key).split(":", 1)[0])
        return sorted(found)

    def tables(self) -> set[str]:
        """Tables some entry under the prefix depends on (their version keys never expire)."""
        names = set()
        for kind in ("v", "b"):
            match = _glob_escape(f"{self.namespace.meta_prefix}{kind}:") + "*"
            for key in self.client.scan_iter(match=match, count=1000):
                names.add(_text(key).rsplit(":", 1)[1])
        return names

    def close(self) -> None:
        self.client.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


# -- resolving targets and keys ------------------------------------------------------------------


def _mapped_tables() -> dict[str, Table]:
    from .mapped import MAPPERS

    tables: dict[str, Table] = {}
    for mapper in MAPPERS.all_mappers():
        for table in mapper.tables:
            if isinstance(table, Table):
                tables.setdefault(table.fullname, table)
                tables.setdefault(table.name, table)
    return tables


def _model_paths() -> list[str]:
    from .mapped import MAPPERS

    return [f"{m.class_.__module__}.{m.class_.__qualname__}" for m in MAPPERS.all_mappers()]


def _resolve_target(name: str) -> Any:
    """A mapped Table for a table name or dotted model path, else None (unknown to the models)."""
    tables = _mapped_tables()
    if name in tables:
        return tables[name]
    if "." in name:
        from .policy import import_class

        try:
            return import_class(name)  # the manager invalidates all its tables (inheritance)
        except ConfigError:
            return None
    return None


def _pk_columns(target: Any) -> list[Any] | None:
    if isinstance(target, Table):
        return list(target.primary_key.columns)
    if isinstance(target, type):
        from sqlalchemy import inspect

        return list(inspect(target).mapper.primary_key)
    return None


def _convert(text: str, column: Any) -> Any:
    """`text` as the column's Python type, as a read of that row would carry it."""
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        return text
    try:
        if python_type is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "t", "f", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "t", "yes")
        if python_type in (int, float, decimal.Decimal, uuid.UUID):
            return python_type(text)
        if python_type in (datetime.datetime, datetime.date, datetime.time):
            return python_type.fromisoformat(text)
        if python_type is bytes:
            return text.encode()
    except (ValueError, decimal.InvalidOperation):
        raise CommandError(
            f"--pk {text!r} is not a valid {python_type.__name__} for column {column.name!r}"
        ) from None
    return text


def _parse_pks(texts: Sequence[str], columns: list[Any] | None) -> list[Any]:
    """The keys named by `--pk`, typed by the primary-key columns when they are known.

    Unknown columns: each key as given (strings), and, where a value is written as an integer,
    also with that value as an int. The column might be either, and invalidating a key that does
    not exist costs nothing, while missing the real one would leave the entry stale.
    """
    keys: list[Any] = []
    for text in texts:
        parts: list[Any] = text.split(",")
        if columns is not None:
            if len(parts) != len(columns):
                names = ", ".join(c.name for c in columns)
                raise CommandError(
                    f"--pk {text!r} has {len(parts)} value(s); the primary key is ({names})"
                )
            parts = [_convert(part, column) for part, column in zip(parts, columns, strict=True)]
            variants = [parts]
        else:
            choices = [[p, int(p)] if _INTEGER.fullmatch(p) else [p] for p in parts]
            variants = [list(combination) for combination in itertools.product(*choices)]
        for variant in variants:
            key = variant[0] if len(variant) == 1 else tuple(variant)
            if key not in keys:
                keys.append(key)
    return keys


_INTEGER = re.compile(r"[+-]?[0-9]+")


def _unknown(name: str, choices: Sequence[str], prefix: str) -> CommandError:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return CommandError(
        f"unknown table or model {name!r}: no imported model maps it and no entry under prefix "
        f"{prefix!r} reads it, so nothing was invalidated{hint} "
        "(--app imports your models; --force invalidates the name anyway)"
    )


# -- commands -----------------------------------------------------------------------------------


def _invalidate(args: argparse.Namespace, cache: Any, shared: _Redis) -> str:
    shared.check("nothing was invalidated")
    prefix = cache.config.prefix
    databases = shared.databases()
    if not databases and not args.force:
        others = [p for p in shared.other_prefixes() if p != prefix]
        hint = f" (prefixes in this Redis: {', '.join(others)})" if others else ""
        raise CommandError(
            f"no application has used prefix {prefix!r} in {shared.url}: nothing to invalidate"
            f"{hint}"
        )
    target: Any = _resolve_target(args.target)
    unknown_tables = False
    if target is None:
        known = shared.tables()
        if args.target not in known and not args.force:
            raise _unknown(args.target, [*known, *_mapped_tables(), *_model_paths()], prefix)
        target, unknown_tables = args.target, True
    columns = _pk_columns(target)
    pks = None if args.pk is None else _parse_pks(args.pk, columns)
    try:
        cache.invalidate_sync(target, pks=pks, unknown_tables=unknown_tables)
    except TransportError as exc:
        raise CommandError(
            f"Redis failed during the invalidation ({exc}): it may be incomplete; run the command "
            "again",
            EXIT_UNREACHABLE,
        ) from None
    shared.check("the invalidation may be incomplete; run the command again")
    what = args.target if pks is None else f"{args.target} rows {pks!r}"
    note = (
        " (column types unknown: integer-looking keys were invalidated as text and as integers;"
        " --app makes this exact)"
        if pks is not None and columns is None
        else ""
    )
    return f"invalidated {what} under prefix {prefix!r} ({len(databases)} database(s)){note}"


def _invalidate_all(cache: Any, shared: _Redis) -> str:
    shared.check("nothing was invalidated")
    try:
        cache.invalidate_all_sync()
    except TransportError as exc:
        raise CommandError(
            f"Redis failed ({exc}): nothing was invalidated", EXIT_UNREACHABLE
        ) from None
    return f"invalidated everything under prefix {cache.config.prefix!r}"


def _stats(cache: Any, shared: _Redis) -> str:
    shared.check("no statistics")
    try:
        data = cache.namespace_stats_sync()
    except TransportError as exc:
        raise CommandError(f"Redis failed: {exc}", EXIT_UNREACHABLE) from None
    data["scope"] = (
        "shared: what Redis holds under this prefix, for every process. Hit and miss counters "
        "are per process: read cache.stats() inside the application (or its metrics exporter)."
    )
    data.pop("note", None)
    data["backend"] = cache.config.backend.display
    return json.dumps(data, indent=2, sort_keys=True)


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from .demo import run_demo

        run_demo()
        return EXIT_OK
    cache = _load_cache(args)
    try:
        import redis  # noqa: F401 - a clear message rather than an ImportError below
    except ImportError:
        raise CommandError(
            'the command line needs redis-py: pip install "sqlacache[redis]"'
        ) from None
    shared = _Redis(cache)
    try:
        if args.command == "stats":
            print(_stats(cache, shared))
        elif args.command == "invalidate":
            print(_invalidate(args, cache, shared))
        elif args.command == "invalidate-all":
            print(_invalidate_all(cache, shared))
    finally:
        shared.close()
        cache.disconnect_sync()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except CommandError as exc:
        print(f"sqlacache: {exc}", file=sys.stderr)
        return exc.status
    except CacheError as exc:
        print(f"sqlacache: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
