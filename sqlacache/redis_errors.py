"""Telling a Redis that says the configuration is wrong from a Redis that is down.

An outage passes (the cache steps aside until Redis answers again); a wrong password, a database
number the server does not have or an ACL user without the needed commands never passes by
itself. `classify_redis_error` names the setting to fix, so that `bind()` can raise it and a
running process can log it as an error and show it in `stats()`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .errors import ConfigError

#: what a user without these cannot do to the cache (for the ACL advice)
NEEDED_COMMANDS = "PING INFO MGET SET UNLINK SADD SMEMBERS SCAN EVALSHA EVAL PUBLISH SUBSCRIBE"


def classify_redis_error(
    exc: BaseException, url: str | None = None, options: Mapping[str, Any] | None = None
) -> str | None:
    """A sentence naming the wrong setting if Redis's answer in `exc` (or what it wraps) says
    the configuration is wrong; None for an outage, a timeout or any other failure."""
    for error in _chain(exc):
        problem = _classify_one(error, url, options or {})
        if problem is not None:
            return problem
    return None


def _classify_one(error: BaseException, url: str | None, options: Mapping[str, Any]) -> str | None:
    try:
        from redis import exceptions
    except ImportError:  # pragma: no cover - only Redis backends call this
        return None
    text = str(error)
    lowered = text.lower()
    user = _setting(url, options, "username") or "default"
    if isinstance(error, exceptions.AuthenticationError):
        if "without any password configured" in lowered or "no password is set" in lowered:
            return (
                "the backend URL gives a password but this Redis has none configured for user "
                f"{user!r} ({text}): remove the password from the URL, or configure it on the "
                "server"
            )
        if "authentication required" in lowered:
            return (
                f"this Redis requires a password ({text}): give it in the backend URL, "
                "redis://[username]:PASSWORD@host:port/db"
            )
        return (
            f"Redis rejected the username {user!r} and password of the backend URL ({text}): "
            "check the username and the password in redis://username:password@host:port/db"
        )
    if isinstance(error, exceptions.NoPermissionError) or text.startswith("NOPERM"):
        return (
            f"the Redis ACL user {user!r} of the backend URL may not do what the cache needs "
            f"({text}): allow it {NEEDED_COMMANDS} on the prefix's keys and its "
            "invalidation channel (ACL SETUSER ... ~prefix:* &prefix:inv:*), or use "
            "another user in the URL"
        )
    if isinstance(error, exceptions.ResponseError):
        if "db index is out of range" in lowered or "invalid db index" in lowered:
            db = _setting(url, options, "db")
            number = f" {db}" if db is not None else ""
            return (
                f"the database number{number} of the backend URL does not exist on this Redis "
                f"({text}): use a number below its `databases` setting, e.g. redis://host:6379/0"
            )
        if "not allowed in cluster mode" in lowered or text.startswith(("MOVED", "CLUSTERDOWN")):
            return (
                f"this Redis is a cluster node ({text}), and the backend URL is a plain redis:// "
                "URL: point it at a standalone Redis"
            )
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from, innermost last (at most a few)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        yield current
        # redis-py wraps some errors of the connection handshake in a ConnectionError
        wrapped = [arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException)]
        current = current.__cause__ or current.__context__ or (wrapped[0] if wrapped else None)


def _setting(url: str | None, options: Mapping[str, Any], part: str) -> str | None:
    """A connection setting as the backend configuration gives it: an option, else in the URL."""
    if options.get(part) is not None:
        return str(options[part])
    if not url:
        return None
    try:
        from redis.connection import parse_url

        value = parse_url(url).get(part)
    except Exception:
        return None
    return None if value is None else str(value)


def require_cluster_mode(info: Any, url: str, *, wanted: bool) -> None:
    """Raise `ConfigError` when a server's `INFO cluster` contradicts the backend URL: a cluster
    URL on a plain Redis, or a plain URL on a cluster node."""
    _require_cluster(_cluster_enabled(info), url, wanted)


def _cluster_enabled(info: Any) -> bool:
    return (
        str(info.get("cluster_enabled", 0)) in ("1", "True", "true")
        if isinstance(info, dict)
        else False
    )


def _require_cluster(enabled: bool, url: str, wanted: bool) -> None:
    if enabled == wanted:
        return
    if wanted:
        raise ConfigError(
            f"backend {url!r} asks for Redis Cluster (cluster=true), but that server is not a "
            "cluster node (cluster_enabled:0): drop '?cluster=true' or point it at a cluster node"
        )
    raise ConfigError(
        f"backend {url!r}: that Redis server has cluster mode enabled, use "
        "'?cluster=true' (or the mapping form with 'startup_nodes')"
    )
