"""The `models` mapping: its keys and entries checked at `configure()`, and resolved per mapped
class into a `ModelPolicy` (the most specific entry first, field by field).

Dotted class paths and `module.*` patterns need imports: they are resolved at `bind()`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Mapper

from ._sqla import mapper_registries
from .errors import ConfigError, did_you_mean

OPS = ("get", "fetch", "count", "exists")
MODEL_OPTIONS = ("ops", "timeout", "lock", "verify", "local")
logger = logging.getLogger("sqlacache")


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


class ModelPolicies:
    """The `models` mapping resolved per mapped class, memoised."""

    def __init__(
        self, models: Mapping[Any, Mapping[str, Any] | None], default_timeout: int, verify: float
    ) -> None:
        self.models = models
        self.default_timeout = default_timeout
        self.verify = verify
        self._resolved: dict[Mapper[Any], ModelPolicy] = {}
        self._class_entries: dict[type, Mapping[str, Any] | None] = {}
        self._module_entries: dict[str, Mapping[str, Any] | None] = {}
        self._star: tuple[bool, Mapping[str, Any] | None] = (False, None)
        self._imports_checked = False

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


# -- checks at configure() -------------------------------------------------------------------------


def check_models(models: Mapping[Any, Any]) -> None:
    """Check every key and entry of the `models` mapping; raise `ConfigError` naming a bad one."""
    for key, entry in models.items():
        _validate_model_key(key)
        _validate_model_entry(key, entry)


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
