"""Configuration: validating what `configure()` receives and resolving it per mapped class.

Every mistake is reported as a `ConfigError` that names the culprit. Checks that need imports (dotted
class paths, `module.*` patterns) run at `bind()`; everything else runs at `configure()`.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Mapper

from ._sqla import mapper_registries
from .backend_config import BackendConfig, parse_backend
from .errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from .manager import CacheManager

OPS = ("get", "fetch", "count", "exists")
MODEL_OPTIONS = ("ops", "timeout", "lock", "verify", "local")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]+")
logger = logging.getLogger("sqlacache")

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


@dataclass(frozen=True)
class ModelPolicy:
    """What the configuration says about one mapped class."""

    enabled: bool
    ops: frozenset[str]
    timeout: int
    lock: bool = False
    #: the fraction of this model's hits also run on the database and compared (verification mode)
    verify: float = 0.0

    local: bool = True  # [local tier] may be served from the in-process tier

    def allows(self, op: str) -> bool:
        return self.enabled and op in self.ops


DISABLED = ModelPolicy(enabled=False, ops=frozenset(), timeout=1)


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
        policy = self.policy_for(_mapper_of(model))
        if not policy.enabled:
            return None
        return {"ops": policy.ops, "timeout": policy.timeout, "lock": policy.lock}

    def is_enabled(self, model: Any, op: str) -> bool:
        """Whether statements of `op` on `model` are cached by configuration."""
        if op not in OPS:
            raise ConfigError(
                f"unknown op {op!r}{did_you_mean(str(op), OPS)} (ops: {', '.join(OPS)})"
            )
        return self.policy_for(_mapper_of(model)).allows(op)

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
                class_entries[import_class(key)] = entry
        self._class_entries = class_entries
        self._module_entries = module_entries
        self._star = star
        self._imports_checked = True
        warn_unmatched_patterns(module_entries)

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
            # still read by `cache.execute()`, which caches such a model anyway
            return replace(DISABLED, verify=self.verify) if self.verify else DISABLED
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
            verify=float(fields.get("verify", self.verify)),
            local=bool(fields.get("local", True)),
        )


_ABSENT = object()


def _mapper_of(model: Any) -> Mapper[Any]:
    if isinstance(model, Mapper):
        return model
    info: Any = sa_inspect(model, raiseerr=False) if isinstance(model, type) else None
    mapper = getattr(info, "mapper", None)
    if not isinstance(mapper, Mapper):
        raise ConfigError(f"{model!r} is not a mapped class")
    return mapper


def warn_unmatched_patterns(module_entries: Mapping[str, Any]) -> list[str]:
    """Log a WARNING for each `module.*` pattern whose module maps no class (a typo, or models
    defined elsewhere): nothing it configures would ever be cached. Returns those patterns."""
    modules = {m.class_.__module__ for registry in mapper_registries() for m in registry.mappers}
    unmatched = [f"{name}.*" for name in module_entries if name not in modules]
    for pattern in unmatched:
        logger.warning(
            "sqlacache: models pattern %r matches no mapped class (mapped classes are defined in "
            "the module itself, not its submodules or where they are imported)",
            pattern,
        )
    return unmatched


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


def import_class(path: str) -> type:
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


def _normalise_ops(ops: Any, culprit: str) -> frozenset[str]:
    if ops == "all" or ops is None:
        return frozenset(OPS)
    if isinstance(ops, str):
        hint = f"; did you mean {{{ops!r}}}?" if ops in OPS else did_you_mean(ops, (*OPS, "all"))
        raise ConfigError(
            f"{culprit}: ops must be a set of {', '.join(OPS)} or 'all', got {ops!r}{hint}"
        )
    try:
        values = list(ops)
    except TypeError:
        raise ConfigError(f"{culprit}: ops must be a set or 'all', got {ops!r}") from None
    for op in values:
        if op not in OPS:
            raise ConfigError(f"{culprit}: unknown op {op!r}{did_you_mean(str(op), OPS)}")
    return frozenset(values)


def check_timeout(value: Any, culprit: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{culprit} must be a positive integer number of seconds, got {value!r}")
    return value


def check_verify(value: Any, culprit: str) -> float:
    """A verification fraction: a number from 0 (never) to 1 (every hit)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value <= 1  # also refuses NaN
    ):
        raise ConfigError(
            f"{culprit} must be a fraction of hits from 0 to 1 (e.g. 0.01), got {value!r}"
        )
    return float(value)


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
                f"{name!r} is not a model option in {culprit}{did_you_mean(str(name), MODEL_OPTIONS)}"
                f" (options: {', '.join(MODEL_OPTIONS)})"
            )
    if "ops" in entry:
        _normalise_ops(entry["ops"], culprit)
    if "timeout" in entry:
        check_timeout(entry["timeout"], f"{culprit}['timeout']")
    if "lock" in entry and not isinstance(entry["lock"], bool):
        raise ConfigError(f"{culprit}['lock'] must be True or False, got {entry['lock']!r}")
    if "verify" in entry:
        check_verify(entry["verify"], f"{culprit}['verify']")
    if "local" in entry and not isinstance(entry["local"], bool):
        raise ConfigError(f"{culprit}['local'] must be True or False, got {entry['local']!r}")


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
    for key, entry in models.items():
        _validate_model_key(key)
        _validate_model_entry(key, entry)
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


def pks_list(pks: Any) -> list[Any]:
    """`invalidate()`'s `pks` as a list of keys: one scalar (`pks=42`, `pks="a"`) is one key;
    a list, set or other iterable holds keys (scalars, or tuples in primary-key order)."""
    if isinstance(pks, (str, bytes)) or not isinstance(pks, Iterable):
        return [pks]
    if isinstance(pks, Mapping):
        raise ConfigError(f"pks must be a key, or a list of keys, not a mapping: {pks!r}")
    return list(pks)


def check_invalidate_all_call(pks: Any) -> None:
    """`invalidate(None)` means `invalidate_all()`; rows without a model mean nothing."""
    if pks is not None:
        raise ConfigError(
            f"invalidate(pks={pks!r}) needs the model or table the keys belong to: "
            "invalidate(User, pks=[...]); invalidate() alone makes everything stale"
        )


def configure(*args: Any, **kwargs: Any) -> CacheManager:
    """`sqlacache.configure`, at upstream 0.1.x's import path `sqlacache.config.configure`."""
    from . import configure as configure_  # the package imports this module

    return configure_(*args, **kwargs)
