"""Backends as configured: a URL or a mapping validated into a `BackendConfig`.

`mem://`, `redis://`, `rediss://`, `unix://` and Redis Cluster (`?cluster=true`, startup nodes).
Every redis-py connection option is accepted and typed as redis-py types it; the few that would
break the failure or security rules are refused, each with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from .errors import ConfigError, did_you_mean

logger = logging.getLogger("sqlacache")

#: Backend options refused, each with the reason: they would break failure handling, payload safety
#: or invalidation.
FORBIDDEN_URL_OPTIONS = {
    "pickle_type": "sqlacache serializes results itself; use configure(serializer=...)",
    "suppress": "sqlacache handles Redis errors itself: a failed command falls back to the database",
    "client_side": "cashews' client-side cache loses invalidations; it is not supported",
    "digestmod": "payloads are authenticated with HMAC-SHA256; the digest is not configurable",
    "decode_responses": "entries are read as raw bytes (signed payloads); decoding would corrupt them",
    "retry": (
        "sqlacache never retries a Redis command: a failure falls back to the database at once, and "
        "a retry would multiply the per-operation time bound"
    ),
    "cache": "redis-py's client-side cache would serve entries that invalidations no longer reach",
    "cache_config": "redis-py's client-side cache would serve entries that invalidations no longer reach",
    "cache_factory": "redis-py's client-side cache would serve entries that invalidations no longer reach",
    "connection_pool": "sqlacache builds its own pools (bounded, no retries); pass options instead",
    "single_connection_client": "sqlacache builds its own pools (bounded, no retries); pass options instead",
}
#: Accepted for compatibility, and ignored: sqlacache never retries (see "retry" above). A warning
#: says so at configure().
IGNORED_REDIS_OPTIONS = {
    "retry_on_timeout": FORBIDDEN_URL_OPTIONS["retry"],
    "retry_on_error": FORBIDDEN_URL_OPTIONS["retry"],
}
#: Options that only one of redis-py's two clients understands: sqlacache uses both (asyncio for
#: AsyncSession, sync for Session), so they would fail on the first connection of the other one.
ONE_CLIENT_ONLY = "redis.asyncio does not support it, and sqlacache uses both redis-py clients"
#: Parts of the URL itself, not options.
URL_PARTS = frozenset({"host", "port", "path"})
#: redis-py internals that are not connection options a user sets.
REDIS_INTERNALS = frozenset(
    {
        "event_dispatcher",
        "himport_registry",
        "orig_host_address",
        "orig_socket_connect_timeout",
        "orig_socket_timeout",
        "maint_notifications_config",
        "maint_notifications_pool_handler",
        "maintenance_notification_hash",
        "maintenance_state",
        "oss_cluster_maint_notifications_handler",
        "command_packer",
        "encoder_class",
        "parser",
    }
)
#: Every redis-py (>= 5) connection and pool option name: on mem:// they are accepted and ignored,
#: so a configuration moves between backends unchanged. (redis:// reads the installed redis-py.)
REDIS_OPTION_NAMES = frozenset(
    {
        "db", "username", "password", "credential_provider", "client_name", "lib_name",
        "lib_version", "driver_info", "encoding", "encoding_errors", "socket_timeout",
        "socket_connect_timeout", "socket_keepalive", "socket_keepalive_options", "socket_type",
        "socket_read_size", "retry_on_timeout", "retry_on_error", "health_check_interval",
        "max_connections", "timeout", "pool_timeout", "protocol", "legacy_responses",
        "parser_class", "redis_connect_func", "connection_class", "ssl", "ssl_keyfile",
        "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_data", "ssl_ca_path",
        "ssl_check_hostname", "ssl_password", "ssl_min_version", "ssl_ciphers",
        "ssl_include_verify_flags", "ssl_exclude_verify_flags", "ssl_validate_ocsp",
        "ssl_validate_ocsp_stapled", "ssl_ocsp_context", "ssl_ocsp_expected_cert",
    }
)  # fmt: skip
#: Options sqlacache itself reads on redis:// (the store's pool wait).
OWN_REDIS_OPTIONS = {"pool_timeout": float}
#: URL options understood by the in-process store.
MEMORY_URL_OPTIONS = {"size": int, "max_bytes": int, "check_interval": float}
REDIS_EXTRA_HINT = 'pip install "sqlacache[redis]"'


@dataclass(frozen=True)
class BackendConfig:
    """A parsed backend URL: the scheme, the URL without our options, and the options."""

    scheme: str
    url: str
    options: Mapping[str, Any]
    #: what configure() was given (a URL or upstream's mapping), for `cache.config["backend"]`
    source: Any = field(default=None, repr=False)
    #: options accepted for compatibility that have no effect (documented)
    ignored: tuple[str, ...] = ()
    #: Redis Cluster: `?cluster=true`, `"cluster": True` or `startup_nodes` in the mapping form
    cluster: bool = False
    #: (host, port) of every node given; the URL's own node is the first
    startup_nodes: tuple[tuple[str, int], ...] = ()

    @property
    def is_memory(self) -> bool:
        return self.scheme == "mem"

    @property
    def display(self) -> str:
        """The URL with its database number and without credentials, for messages."""
        db = self.options.get("db")
        return self.url if db is None or self.scheme == "unix" else f"{self.url}/{db}"


def parse_backend(backend: Any) -> BackendConfig:
    """Validate a backend URL (or upstream's mapping with a "url" key) and split off its options.

    On redis://, rediss:// and unix:// every redis-py connection option is accepted, from the URL
    query or the mapping, typed as redis-py types it; `db`, `username` and `password` move from the
    URL into the options so that nothing in the URL can silently override the mapping. On mem://
    redis-py's options are accepted and ignored. Refused: what `FORBIDDEN_URL_OPTIONS` lists.
    """
    extra: dict[str, Any] = {}
    source = backend
    nodes: list[tuple[str, int]] = []
    if isinstance(backend, list | tuple):  # a Redis Cluster's node URLs
        backend = {"startup_nodes": list(backend)}
    if isinstance(backend, Mapping):
        if "startup_nodes" in backend:
            nodes = _startup_nodes(backend["startup_nodes"])
            if not backend.get("url"):
                backend = {**backend, "url": f"redis://{nodes[0][0]}:{nodes[0][1]}"}
        if not backend.get("url"):
            raise ConfigError("backend mapping needs a non-empty 'url' (or 'startup_nodes')")
        extra = {str(k): v for k, v in backend.items() if k not in ("url", "startup_nodes")}
        if nodes:
            extra.setdefault("cluster", True)
        backend = backend["url"]
    if not isinstance(backend, str) or "://" not in backend:
        raise ConfigError(
            f"backend must be a URL such as 'redis://host:6379/0' or 'mem://', got {backend!r}"
        )
    parts = urlsplit(backend)
    scheme = parts.scheme.lower()
    if scheme not in ("mem", "redis", "rediss", "unix"):
        raise ConfigError(
            f"unknown backend scheme {scheme!r} in {backend!r} (use mem://, redis://, rediss:// "
            "or unix://)"
        )
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    for name in [*query, *extra]:
        if name.lower() in FORBIDDEN_URL_OPTIONS:
            raise ConfigError(
                f"backend option {name!r} is not allowed: {FORBIDDEN_URL_OPTIONS[name.lower()]}"
            )
    if scheme == "mem":
        return _memory_backend(backend, source, {**query, **extra})
    return _redis_backend(parts, source, query, extra, nodes)


def _memory_backend(url: str, source: Any, options: Mapping[str, Any]) -> BackendConfig:
    parsed: dict[str, Any] = {}
    ignored: list[str] = []
    for name, value in options.items():
        if name in MEMORY_URL_OPTIONS:
            try:
                parsed[name] = MEMORY_URL_OPTIONS[name](value)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"backend option {name!r} has an invalid value {value!r}"
                ) from None
        elif name == "cluster":
            raise ConfigError(
                "backend option 'cluster' asks for Redis Cluster, but mem:// lives in this "
                "process: use redis://host:port?cluster=true"
            )
        elif name in REDIS_OPTION_NAMES:
            ignored.append(name)  # connection options mean nothing in process: as upstream does
        else:
            known = (*MEMORY_URL_OPTIONS, *REDIS_OPTION_NAMES)
            raise ConfigError(
                f"unknown backend option {name!r} for mem://{did_you_mean(name, known)}"
                f" (mem:// options: {', '.join(MEMORY_URL_OPTIONS)}; Redis connection options are "
                "accepted and ignored)"
            )
    return BackendConfig(
        scheme="mem",
        url="mem://",
        options=parsed,
        source=source,
        ignored=tuple(ignored),
    )


def _redis_module() -> Any:
    """redis-py's connection module, or a `ConfigError` naming the extra that installs it."""
    try:
        import redis.connection
    except ImportError:
        raise ConfigError(
            f"a Redis backend needs redis-py, which is not installed: {REDIS_EXTRA_HINT}"
        ) from None
    return redis.connection


def redis_option_parsers(scheme: str) -> dict[str, Callable[[Any], Any] | None]:
    """Every option redis-py accepts for this scheme's connections and pools, with the function
    that types a string value (None: kept as given), read from the installed redis-py."""
    import inspect

    sync = _redis_module()
    import redis.asyncio.connection as aio

    cls_name = {"rediss": "SSLConnection", "unix": "UnixDomainSocketConnection"}.get(
        scheme, "Connection"
    )

    def params(cls: type) -> dict[str, inspect.Parameter]:
        found: dict[str, inspect.Parameter] = {}
        for klass in reversed(cls.__mro__):
            init = vars(klass).get("__init__")
            if init is None:
                continue
            for name, param in inspect.signature(init).parameters.items():
                if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                    found[name] = param
        found.pop("self", None)
        return found

    both = params(getattr(sync, cls_name))
    async_names = set(params(getattr(aio, cls_name))) | set(params(aio.ConnectionPool))
    both.update(params(sync.ConnectionPool))
    url_parsers: Mapping[str, Callable[[Any], Any]] = sync.URL_QUERY_ARGUMENT_PARSERS
    to_bool = sync.to_bool
    parsers: dict[str, Callable[[Any], Any] | None] = {}
    for name, param in both.items():
        if name in URL_PARTS or name in REDIS_INTERNALS:
            continue
        if name not in async_names:
            parsers[name] = _one_client_only
            continue
        default = param.default
        if name in url_parsers:
            parsers[name] = url_parsers[name]
        elif isinstance(default, bool):
            parsers[name] = to_bool
        elif isinstance(default, (int, float)):
            parsers[name] = type(default)
        else:
            parsers[name] = None
    parsers["timeout"] = url_parsers.get("timeout", float)  # BlockingConnectionPool's wait
    parsers.update(OWN_REDIS_OPTIONS)
    parsers["ssl"] = to_bool
    return parsers


def _one_client_only(value: Any) -> Any:
    raise _Refused(ONE_CLIENT_ONLY)


class _Refused(Exception):
    pass


def _redis_backend(
    parts: Any,
    source: Any,
    query: Mapping[str, str],
    extra: Mapping[str, Any],
    nodes: list[tuple[str, int]],
) -> BackendConfig:
    given_scheme = parts.scheme.lower()
    ssl_given = query.get("ssl", extra.get("ssl"))
    ssl = _redis_module().to_bool(ssl_given) if isinstance(ssl_given, str) else ssl_given
    if ssl and given_scheme == "unix":
        raise ConfigError("backend option 'ssl' does not apply to unix:// sockets")
    if ssl is False and given_scheme == "rediss":
        raise ConfigError("backend option ssl=false contradicts the rediss:// scheme")
    scheme = "rediss" if ssl and given_scheme == "redis" else given_scheme
    parsers = redis_option_parsers(scheme)
    options: dict[str, Any] = {}
    cluster = query.get("cluster", extra.get("cluster"))

    def take(name: str, value: Any, from_url: bool) -> None:
        if name in ("cluster", "ssl"):
            return
        if name.startswith("ssl_") and scheme != "rediss":
            raise ConfigError(
                f"backend option {name!r} needs TLS: use rediss://... or add ssl=true"
            )
        if name not in parsers:
            raise ConfigError(
                f"unknown backend option {name!r} for {scheme}://{did_you_mean(name, parsers)}"
                " (redis-py connection options are accepted)"
            )
        parser = parsers[name]
        try:
            if parser is not None and (from_url or isinstance(value, str)):
                value = parser(value)
        except _Refused as exc:
            raise ConfigError(f"backend option {name!r} is not supported: {exc}") from None
        except (TypeError, ValueError):
            raise ConfigError(f"backend option {name!r} has an invalid value {value!r}") from None
        if name in options and options[name] != value:
            raise ConfigError(
                f"backend option {name!r} is given twice with different values "
                f"({options[name]!r} and {value!r}): keep one"
            )
        options[name] = value

    # The URL's own parts first, then its query, then the mapping: a conflict is an error rather
    # than redis-py's silent "the URL wins".
    if parts.username:
        take("username", unquote(parts.username), False)
    if parts.password:
        take("password", unquote(parts.password), False)
    path = unquote(parts.path or "")
    if scheme != "unix" and path.strip("/") and "db" not in query:
        try:
            take("db", int(path.strip("/")), False)
        except ValueError:
            raise ConfigError(
                f"the path of {scheme}:// names the database number, got {path!r}"
            ) from None
    for name, value in query.items():
        take(name, value, True)
    for name, value in extra.items():
        take(name, value, False)
    is_cluster = cluster is True or str(cluster or "").lower() in ("1", "true", "yes")
    if nodes and not is_cluster:
        raise ConfigError("backend 'startup_nodes' name a Redis Cluster; drop 'cluster': False")
    if is_cluster:
        if scheme == "unix":
            raise ConfigError(
                "a Redis Cluster is reached over TCP: use redis://host:port?cluster=true"
            )
        if options.get("db", 0) != 0:
            raise ConfigError(
                f"a Redis Cluster has only database 0; drop the database number "
                f"{options['db']!r} from the backend"
            )
        options.pop("db", None)
        own = (parts.hostname or "127.0.0.1", parts.port or 6379)
        nodes = [own, *(node for node in nodes if node != own)]
    if "timeout" in options:  # redis-py's name for the pool wait
        options.setdefault("pool_timeout", options.pop("timeout"))
    for name in ("socket_timeout", "socket_connect_timeout", "pool_timeout"):
        value = options.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(
                f"backend option {name!r} must be a positive number of seconds, got {value!r}: "
                "every Redis operation is bounded so that a slow Redis cannot stall requests"
            )
    ignored = tuple(name for name in IGNORED_REDIS_OPTIONS if name in options)
    for name in ignored:
        options.pop(name)
        logger.warning(
            "sqlacache: backend option %r is accepted and has no effect: %s",
            name,
            IGNORED_REDIS_OPTIONS[name],
        )
    if scheme == "unix":
        url = "unix://" + path  # urlunsplit would drop the "//" redis-py requires
    else:
        netloc = parts.netloc.rpartition("@")[2]
        url = urlunsplit((scheme, netloc, "", "", ""))
    return BackendConfig(
        scheme=scheme,
        url=url,
        options=options,
        source=source,
        ignored=ignored,
        cluster=is_cluster,
        startup_nodes=tuple(nodes),
    )


def _startup_nodes(nodes: Any) -> list[tuple[str, int]]:
    """`startup_nodes` as (host, port) pairs; items are pairs or `redis://host:port` URLs."""
    if isinstance(nodes, str) or not isinstance(nodes, Iterable):
        raise ConfigError(f"backend 'startup_nodes' must be a list of (host, port), got {nodes!r}")
    out: list[tuple[str, int]] = []
    for node in nodes:
        if isinstance(node, str) and "://" in node:
            url = urlsplit(node)
            host, port = url.hostname, url.port or 6379
        elif isinstance(node, list | tuple) and len(node) == 2:
            host, port = node
        else:
            raise ConfigError(
                f"backend 'startup_nodes' item {node!r} is neither (host, port) nor a redis:// URL"
            )
        if not isinstance(host, str) or not host or isinstance(port, bool):
            raise ConfigError(f"backend 'startup_nodes' item {node!r} has no valid host")
        try:
            out.append((host, int(port)))
        except (TypeError, ValueError):
            raise ConfigError(f"backend 'startup_nodes' item {node!r} has no valid port") from None
    if not out:
        raise ConfigError("backend 'startup_nodes' is empty: name at least one cluster node")
    return out
