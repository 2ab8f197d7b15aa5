"""Configuration: validating what `configure()` receives and resolving it per mapped class.

Every mistake is reported as a `ConfigError` that names the culprit. Checks that need imports (dotted
class paths, `module.*` patterns) run at `bind()`; everything else runs at `configure()`.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Mapper

from .errors import ConfigError

OPS = ("get", "fetch", "count", "exists")
MODEL_OPTIONS = ("ops", "timeout", "lock")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]+")

#: Upstream's serializer names that select our safe, non-executable format.
SAFE_SERIALIZERS = frozenset({"sqlalchemy", "json", "null", "safe"})
#: Names that select pickle; only allowed with a `secret` (payloads are HMAC-signed).
PICKLE_SERIALIZERS = frozenset({"default", "pickle", "dill"})
COMPRESSIONS = frozenset({"gzip", "zlib"})

#: URL options that would silently break failure handling or payload safety.
FORBIDDEN_URL_OPTIONS = {
    "pickle_type": "sqlacache serializes results itself; use configure(serializer=...)",
    "suppress": "sqlacache handles Redis errors itself (circuit breaker, SPEC §4)",
    "client_side": "cashews' client-side cache loses invalidations; it is not supported",
    "digestmod": "payloads are authenticated with HMAC-SHA256; the digest is not configurable",
}
#: URL options passed on to redis-py.
REDIS_URL_OPTIONS = {
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "max_connections": int,
    "pool_timeout": float,
    "health_check_interval": float,
    "client_name": str,
    "protocol": int,
    "ssl_cert_reqs": str,
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": lambda v: str(v).lower() in ("1", "true", "yes"),
}
#: URL options understood by the in-process store.
MEMORY_URL_OPTIONS = {"size": int, "max_bytes": int, "check_interval": float}

DEFAULT_VOLATILE_FUNCTIONS = frozenset(
    {
        "now",
        "current_timestamp",
        "current_date",
        "current_time",
        "current_user",
        "current_role",
        "current_schema",
        "current_schemas",
        "current_catalog",
        "current_setting",
        "current_database",
        "current_query",
        "session_user",
        "localtime",
        "localtimestamp",
        "clock_timestamp",
        "statement_timestamp",
        "transaction_timestamp",
        "timeofday",
        "random",
        "gen_random_uuid",
        "uuid_generate_v1",
        "uuid_generate_v4",
        "nextval",
        "currval",
        "lastval",
        "setval",
        "txid_current",
        "pg_backend_pid",
        "inet_client_addr",
        "rand",
        "uuid",
        "sysdate",
        "utc_timestamp",
        "unix_timestamp",
        "random_uuid",
    }
)


@dataclass(frozen=True)
class BackendConfig:
    """A parsed backend URL: the scheme, the URL without our options, and the options."""

    scheme: str
    url: str
    options: Mapping[str, Any]
    #: Redis Cluster: `?cluster=true`, `"cluster": True` or `startup_nodes` in the mapping form
    cluster: bool = False
    #: (host, port) of every node given; the URL's own node is the first
    startup_nodes: tuple[tuple[str, int], ...] = ()

    @property
    def is_memory(self) -> bool:
        return self.scheme == "mem"


@dataclass(frozen=True)
class ModelPolicy:
    """What the configuration says about one mapped class."""

    enabled: bool
    ops: frozenset[str]
    timeout: int
    lock: bool = False

    def allows(self, op: str) -> bool:
        return self.enabled and op in self.ops


DISABLED = ModelPolicy(enabled=False, ops=frozenset(), timeout=1)


@dataclass
class CacheConfig:
    """Validated configuration. Built by `configure()`; immutable in practice once bound."""

    backend: BackendConfig
    models: Mapping[Any, Mapping[str, Any] | None]
    prefix: str = "sqlacache"
    default_timeout: int = 3600
    serializer: str = "sqlalchemy"
    compress: str | None = None
    secret: bytes | None = None
    volatile_functions: frozenset[str] = DEFAULT_VOLATILE_FUNCTIONS
    key_context: Callable[[Any], Any] | None = None
    operation_timeout: float = 0.05
    breaker_threshold: int = 3
    breaker_probe_interval: float = 0.5
    lease_timeout: float = 60.0
    lock_timeout: float = 5.0
    max_rows: int = 10_000
    max_bytes: int = 4 * 1024 * 1024
    max_pending_tables: int = 1_000
    _resolved: dict[Mapper[Any], ModelPolicy] = field(default_factory=dict, repr=False)
    _class_entries: dict[type, Mapping[str, Any] | None] = field(default_factory=dict, repr=False)
    _module_entries: dict[str, Mapping[str, Any] | None] = field(default_factory=dict, repr=False)
    _star: tuple[bool, Mapping[str, Any] | None] = (False, None)
    _imports_checked: bool = field(default=False, repr=False)

    @property
    def max_timeout(self) -> int:
        """The longest TTL any configured model may give an entry."""
        timeouts = [self.default_timeout]
        for entry in self.models.values():
            if entry and "timeout" in entry:
                timeouts.append(int(entry["timeout"]))
        return max(timeouts)

    # -- resolution -------------------------------------------------------------------------------

    def resolve_imports(self) -> None:
        """Import every dotted path and module pattern; raise `ConfigError` naming a bad one."""
        if self._imports_checked:
            return
        class_entries: dict[type, Mapping[str, Any] | None] = {}
        module_entries: dict[str, Mapping[str, Any] | None] = {}
        star: tuple[bool, Mapping[str, Any] | None] = (False, None)
        for key, entry in self.models.items():
            if isinstance(key, type):
                class_entries[key] = entry
            elif key == "*":
                star = (True, entry)
            elif key.endswith(".*"):
                module_name = key[:-2]
                _import_module(module_name, key)
                module_entries[module_name] = entry
            else:
                class_entries[_import_class(key)] = entry
        self._class_entries = class_entries
        self._module_entries = module_entries
        self._star = star
        self._imports_checked = True

    def policy_for(self, mapper: Mapper[Any]) -> ModelPolicy:
        """The policy of a mapped class, memoised: most specific entry first, field by field."""
        try:
            return self._resolved[mapper]
        except KeyError:
            pass
        policy = self._compute_policy(mapper)
        self._resolved[mapper] = policy
        return policy

    def _compute_policy(self, mapper: Mapper[Any]) -> ModelPolicy:
        self.resolve_imports()
        chain: list[Mapping[str, Any] | None] = []
        specific = _nearest_class_entry(mapper, self._class_entries)
        if specific is not _ABSENT:
            chain.append(specific)  # type: ignore[arg-type]
        module = mapper.class_.__module__
        if module in self._module_entries:
            chain.append(self._module_entries[module])
        if self._star[0]:
            chain.append(self._star[1])
        if not chain or chain[0] is None:
            return DISABLED
        fields: dict[str, Any] = {}
        for entry in chain:
            for name in MODEL_OPTIONS:
                if entry and name in entry and name not in fields:
                    fields[name] = entry[name]
        return ModelPolicy(
            enabled=True,
            ops=_normalise_ops(fields.get("ops", "all"), "ops"),
            timeout=int(fields.get("timeout", self.default_timeout)),
            lock=bool(fields.get("lock", False)),
        )


_ABSENT = object()


def _nearest_class_entry(mapper: Mapper[Any], entries: Mapping[type, Any]) -> object:
    """The entry of the class itself, else of its nearest mapped ancestor that has one."""
    current: Mapper[Any] | None = mapper
    while current is not None:
        if current.class_ in entries:
            return entries[current.class_]
        current = current.inherits
    return _ABSENT


def _import_module(name: str, culprit: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(f"models key {culprit!r}: cannot import module {name!r} ({exc})") from exc


def _import_class(path: str) -> type:
    """Resolve "package.module.Class" (or a nested "module.Outer.Inner") to a mapped class."""
    parts = path.split(".")
    module = None
    split = len(parts) - 1
    while split > 0:
        try:
            module = importlib.import_module(".".join(parts[:split]))
            break
        except ImportError:
            split -= 1
    if module is None:
        raise ConfigError(f"models key {path!r}: no importable module in this dotted path")
    obj: Any = module
    for attr in parts[split:]:
        if not hasattr(obj, attr):
            raise ConfigError(
                f"models key {path!r}: module {'.'.join(parts[:split])!r} has no {attr!r}"
            )
        obj = getattr(obj, attr)
    if not isinstance(obj, type):
        raise ConfigError(f"models key {path!r} is not a class")
    if sa_inspect(obj, raiseerr=False) is None:
        raise ConfigError(f"models key {path!r}: {obj.__qualname__} is not a mapped class")
    return obj


# -- validation at configure() --------------------------------------------------------------------


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _normalise_ops(ops: Any, culprit: str) -> frozenset[str]:
    if ops == "all" or ops is None:
        return frozenset(OPS)
    if isinstance(ops, str):
        hint = f"; did you mean {{{ops!r}}}?" if ops in OPS else _did_you_mean(ops, (*OPS, "all"))
        raise ConfigError(
            f"{culprit}: ops must be a set of {', '.join(OPS)} or 'all', got {ops!r}{hint}"
        )
    try:
        values = list(ops)
    except TypeError:
        raise ConfigError(f"{culprit}: ops must be a set or 'all', got {ops!r}") from None
    for op in values:
        if op not in OPS:
            raise ConfigError(f"{culprit}: unknown op {op!r}{_did_you_mean(str(op), OPS)}")
    return frozenset(values)


def check_timeout(value: Any, culprit: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{culprit} must be a positive integer number of seconds, got {value!r}")
    return value


def _validate_model_entry(key: Any, entry: Any) -> None:
    culprit = f"models[{key!r}]"
    if entry is None:
        return
    if not isinstance(entry, Mapping):
        raise ConfigError(
            f"{culprit} must be a dict of options or None, got {type(entry).__name__}"
        )
    for name in entry:
        if name not in MODEL_OPTIONS:
            raise ConfigError(
                f"{name!r} is not a model option in {culprit}{_did_you_mean(str(name), MODEL_OPTIONS)}"
                f" (options: {', '.join(MODEL_OPTIONS)})"
            )
    if "ops" in entry:
        _normalise_ops(entry["ops"], culprit)
    if "timeout" in entry:
        check_timeout(entry["timeout"], f"{culprit}['timeout']")
    if "lock" in entry and not isinstance(entry["lock"], bool):
        raise ConfigError(f"{culprit}['lock'] must be True or False, got {entry['lock']!r}")


def _validate_model_key(key: Any) -> None:
    if isinstance(key, type):
        if sa_inspect(key, raiseerr=False) is None:
            raise ConfigError(f"models key {key.__qualname__} is not a mapped class")
        return
    if not isinstance(key, str):
        raise ConfigError(
            f"models keys must be dotted paths, 'module.*', '*' or classes; got {key!r}"
        )
    if key == "*":
        return
    if "." not in key or key.startswith(".") or key.endswith("."):
        raise ConfigError(
            f"models key {key!r} must be a dotted path 'module.Class', a pattern 'module.*' or '*'"
        )
    body = key[:-2] if key.endswith(".*") else key
    if "*" in body or not all(part.isidentifier() for part in body.split(".")):
        raise ConfigError(f"models key {key!r} is not a valid dotted path")


def parse_backend(backend: Any) -> BackendConfig:
    """Validate a backend URL (or upstream's mapping with a "url" key) and split off its options.

    Redis Cluster: `redis://host:port?cluster=true` (cashews' spelling), `{"url": ...,
    "cluster": True}`, `{"startup_nodes": [("host", port), ...]}` (tuples or URLs), or a list of
    node URLs.
    """
    extra: dict[str, Any] = {}
    nodes: list[tuple[str, int]] = []
    if isinstance(backend, list | tuple):
        backend = {"startup_nodes": list(backend)}
    if isinstance(backend, Mapping):
        if "startup_nodes" in backend:
            nodes = _startup_nodes(backend["startup_nodes"])
            if not backend.get("url"):
                backend = {**backend, "url": f"redis://{nodes[0][0]}:{nodes[0][1]}"}
        if not backend.get("url"):
            raise ConfigError("backend mapping needs a non-empty 'url' (or 'startup_nodes')")
        extra = {k: v for k, v in backend.items() if k not in ("url", "startup_nodes")}
        if nodes:
            extra.setdefault("cluster", True)
        backend = backend["url"]
    if not isinstance(backend, str) or "://" not in backend:
        raise ConfigError(
            f"backend must be a URL such as 'redis://host:6379/0' or 'mem://', got {backend!r}"
        )
    parts = urlsplit(backend)
    scheme = parts.scheme.lower()
    if scheme not in ("mem", "redis", "rediss"):
        raise ConfigError(
            f"unknown backend scheme {scheme!r} in {backend!r} (use mem://, redis:// or rediss://)"
        )
    options: dict[str, Any] = dict(parse_qsl(parts.query))
    options.update(extra)
    allowed = MEMORY_URL_OPTIONS if scheme == "mem" else {**REDIS_URL_OPTIONS, "cluster": str}
    parsed: dict[str, Any] = {}
    for name, value in options.items():
        lname = name.lower()
        if lname in FORBIDDEN_URL_OPTIONS:
            raise ConfigError(
                f"backend option {name!r} is not allowed: {FORBIDDEN_URL_OPTIONS[lname]}"
            )
        if lname not in allowed:
            raise ConfigError(
                f"unknown backend option {name!r} for {scheme}://{_did_you_mean(lname, allowed)}"
            )
        try:
            parsed[lname] = allowed[lname](value)  # type: ignore[operator]
        except (TypeError, ValueError):
            raise ConfigError(f"backend option {name!r} has an invalid value {value!r}") from None
    cluster = str(parsed.pop("cluster", "")).lower() in ("1", "true", "yes")
    if nodes and not cluster:
        raise ConfigError("backend 'startup_nodes' name a Redis Cluster; drop 'cluster': False")
    base = parts._replace(query="").geturl()
    if cluster:
        if parts.path not in ("", "/", "/0"):
            raise ConfigError(
                f"backend {backend!r}: a Redis Cluster has only database 0; drop {parts.path!r}"
            )
        own = (parts.hostname or "127.0.0.1", parts.port or 6379)
        nodes = [own, *(node for node in nodes if node != own)]
    return BackendConfig(
        scheme=scheme, url=base, options=parsed, cluster=cluster, startup_nodes=tuple(nodes)
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


def build_config(
    *,
    backend: Any,
    models: Mapping[Any, Any] | None,
    prefix: str,
    default_timeout: int,
    serializer: str | None,
    compress: str | None,
    secret: str | bytes | None,
    volatile_functions: Iterable[str] | None,
    key_context: Callable[[Any], Any] | None,
    operation_timeout: float,
    breaker_threshold: int,
    breaker_probe_interval: float,
    lease_timeout: float,
    lock_timeout: float,
    max_rows: int,
    max_bytes: int,
) -> CacheConfig:
    """Validate every argument of `configure()` and return the `CacheConfig`."""
    backend_config = parse_backend(backend)
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise ConfigError(f"prefix must match [A-Za-z0-9_.-]+, got {prefix!r}")
    check_timeout(default_timeout, "default_timeout")
    if models is None:
        models = {}
    if not isinstance(models, Mapping):
        raise ConfigError(f"models must be a dict, got {type(models).__name__}")
    for key, entry in models.items():
        _validate_model_key(key)
        _validate_model_entry(key, entry)
    serializer_name = (serializer or "sqlalchemy").lower()
    if serializer_name not in SAFE_SERIALIZERS | PICKLE_SERIALIZERS:
        raise ConfigError(
            f"unknown serializer {serializer!r}"
            f"{_did_you_mean(serializer_name, SAFE_SERIALIZERS | PICKLE_SERIALIZERS)}"
        )
    secret_bytes = secret.encode() if isinstance(secret, str) else secret
    if secret_bytes is not None and (not isinstance(secret_bytes, bytes) or len(secret_bytes) < 16):
        raise ConfigError("secret must be a str or bytes of at least 16 characters")
    if serializer_name in PICKLE_SERIALIZERS and not secret_bytes:
        raise ConfigError(
            f"serializer {serializer!r} unpickles what it reads; it requires secret=... so that "
            "payloads are authenticated (or use the default safe serializer)"
        )
    if compress is not None and compress != "null" and compress not in COMPRESSIONS:
        raise ConfigError(f"compress must be None, 'gzip' or 'zlib', got {compress!r}")
    volatile = DEFAULT_VOLATILE_FUNCTIONS
    if volatile_functions is not None:
        if isinstance(volatile_functions, str):
            raise ConfigError("volatile_functions must be an iterable of function names, not a str")
        volatile = volatile | {str(name).lower() for name in volatile_functions}
    if key_context is not None and not callable(key_context):
        raise ConfigError("key_context must be a callable taking the ORMExecuteState")
    _positive("operation_timeout", operation_timeout)
    _positive("breaker_probe_interval", breaker_probe_interval)
    _positive("lease_timeout", lease_timeout)
    _positive("lock_timeout", lock_timeout)
    for name, value in (
        ("breaker_threshold", breaker_threshold),
        ("max_rows", max_rows),
        ("max_bytes", max_bytes),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return CacheConfig(
        backend=backend_config,
        models=dict(models),
        prefix=prefix,
        default_timeout=default_timeout,
        serializer=serializer_name,
        compress=None if compress in (None, "null") else compress,
        secret=secret_bytes,
        volatile_functions=volatile,
        key_context=key_context,
        operation_timeout=float(backend_config.options.get("socket_timeout", operation_timeout)),
        breaker_threshold=breaker_threshold,
        breaker_probe_interval=float(breaker_probe_interval),
        lease_timeout=float(lease_timeout),
        lock_timeout=float(lock_timeout),
        max_rows=max_rows,
        max_bytes=max_bytes,
    )


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
