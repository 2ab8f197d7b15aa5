"""Configuration: validating what `configure()` receives into a `CacheConfig`.

Every mistake is reported as a `ConfigError` that names the culprit. The `models` mapping is
checked, and resolved per mapped class, by `policy`: its dotted class paths and `module.*`
patterns are imported at `bind()`; everything else is checked at `configure()`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Mapper

from .backend_config import BackendConfig, parse_backend
from .errors import ConfigError, did_you_mean
from .policy import ModelPolicies, ModelPolicy, check_models, check_timeout, check_verify

if TYPE_CHECKING:
    from .manager import CacheManager

_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]+")

#: Upstream's serializer names that select our safe, non-executable format.
SAFE_SERIALIZERS = frozenset({"sqlalchemy", "json", "null", "safe"})
#: Names that select pickle; only allowed with a `secret` (payloads are HMAC-signed).
PICKLE_SERIALIZERS = frozenset({"default", "pickle", "dill"})
COMPRESSIONS = frozenset({"gzip", "zlib"})

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


#: The keys of `cache.config` read as a mapping, as upstream 0.1.x's dict had them (first), then the
#: rest of `configure()`'s arguments.
CONFIG_KEYS = (
    "backend",
    "models",
    "wildcard",
    "serializer",
    "prefix",
    "default_timeout",
    "compress",
    "secret",
    "volatile_functions",
    "key_context",
    "operation_timeout",
    "breaker_threshold",
    "breaker_probe_interval",
    "lease_timeout",
    "lock_timeout",
    "max_rows",
    "max_bytes",
)


@dataclass(eq=False)
class CacheConfig(Mapping[str, Any]):
    """Validated configuration. Built by `configure()`; immutable in practice once bound.

    Read by attribute (`config.prefix`) or, as upstream 0.1.x's dict was, by key
    (`config["prefix"]`, `["models"]`, `["default_timeout"]`, `["backend"]`, ...).
    `config["backend"]` is what `configure()` was given (a URL or a mapping with "url");
    `config.backend` the parsed form.
    """

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
    verify: float = 0.0
    #: [local tier] None (off) or {"size": entries, "max_bytes": bytes}; see local_tier.py
    local: Mapping[str, int] | None = None
    local_heartbeat: float = 0.5
    #: [cashews bridge] the application's `cashews.Cache`, whose tags follow every commit
    cashews: Any = None
    _policies: ModelPolicies = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._policies = ModelPolicies(self.models, self.default_timeout, self.verify)

    @property
    def max_timeout(self) -> int:
        """The longest TTL any configured model may give an entry."""
        timeouts = [self.default_timeout]
        for entry in self.models.values():
            if entry and "timeout" in entry:
                timeouts.append(int(entry["timeout"]))
        return max(timeouts)

    # -- upstream's dict view -------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        if key == "backend":
            source = self.backend.source
            return dict(source) if isinstance(source, Mapping) else source
        if key == "models":
            return dict(self.models)
        if key == "wildcard":
            return self.models.get("*")
        if key in CONFIG_KEYS:
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Any:
        return iter(CONFIG_KEYS)

    def __len__(self) -> int:
        return len(CONFIG_KEYS)

    # -- per model (upstream's get_model_config / is_enabled) -----------------------------------

    def model_config(self, model: Any) -> dict[str, Any] | None:
        """What applies to a mapped class: {"ops", "timeout", "lock"}, or None if not cached."""
        return self._policies.model_config(model)

    def is_enabled(self, model: Any, op: str) -> bool:
        """Whether statements of `op` on `model` are cached by configuration."""
        return self._policies.is_enabled(model, op)

    def resolve_imports(self) -> None:
        """Import every dotted path and module pattern; raise `ConfigError` naming a bad one."""
        self._policies.resolve_imports()

    def policy_for(self, mapper: Mapper[Any]) -> ModelPolicy:
        """The policy of a mapped class, memoised: most specific entry first, field by field."""
        return self._policies.policy_for(mapper)


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
    verify: float = 0.0,
    local: bool | Mapping[str, int] | None = None,
    local_heartbeat: float = 0.5,
    cashews: Any = None,
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
    check_models(models)
    serializer_name = (serializer or "sqlalchemy").lower()
    if serializer_name not in SAFE_SERIALIZERS | PICKLE_SERIALIZERS:
        raise ConfigError(
            f"unknown serializer {serializer!r}"
            f"{did_you_mean(serializer_name, SAFE_SERIALIZERS | PICKLE_SERIALIZERS)}"
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
    verify_fraction = check_verify(verify, "verify")
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
    local_config = _local_tier(local, backend_config)
    _positive("local_heartbeat", local_heartbeat)
    _check_cashews(cashews)
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
        verify=verify_fraction,
        local=local_config,
        local_heartbeat=float(local_heartbeat),
        cashews=cashews,
    )


LOCAL_DEFAULTS = {"size": 10_000, "max_bytes": 64 << 20}


def _local_tier(local: Any, backend: BackendConfig) -> Mapping[str, int] | None:
    """`local=True` or `{"size": n, "max_bytes": b}`; refused where nothing could keep it exact."""
    if local is None or local is False:
        return None
    if local is True:
        settings = dict(LOCAL_DEFAULTS)
    elif isinstance(local, Mapping):
        unknown = [k for k in local if k not in LOCAL_DEFAULTS]
        if unknown:
            raise ConfigError(
                f"{unknown[0]!r} is not a local tier option"
                f"{did_you_mean(str(unknown[0]), LOCAL_DEFAULTS)} (options: size, max_bytes)"
            )
        settings = {**LOCAL_DEFAULTS, **local}
        for name, value in settings.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"local[{name!r}] must be a positive integer, got {value!r}")
    else:
        raise ConfigError(f"local must be True, False or a dict of size/max_bytes, got {local!r}")
    if backend.is_memory:
        raise ConfigError(
            "local=... needs a shared backend (redis://): on mem:// every entry already lives in "
            "this process, and there is no pub/sub to keep a second in-process copy exact"
        )
    return settings


def _check_cashews(cashews: Any) -> None:
    if cashews is None:
        return
    if not callable(getattr(cashews, "delete_tags", None)):
        raise ConfigError(
            f"cashews must be a cashews.Cache (e.g. `from cashews import cache`), got {cashews!r}"
        )


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def configure(*args: Any, **kwargs: Any) -> CacheManager:
    """`sqlacache.configure`, at upstream 0.1.x's import path `sqlacache.config.configure`."""
    from . import configure as configure_  # the package imports this module

    return configure_(*args, **kwargs)
