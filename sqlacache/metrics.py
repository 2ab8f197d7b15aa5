"""Optional exporters of `cache.stats()` to Prometheus and OpenTelemetry.

Both read the counters when scraped or collected, so they add nothing to the request path:

    from prometheus_client import REGISTRY
    from sqlacache.metrics import PrometheusCollector
    REGISTRY.register(PrometheusCollector(cache))

    from sqlacache.metrics import register_opentelemetry
    register_opentelemetry(cache)          # uses the global MeterProvider

`prometheus-client` and `opentelemetry-api` are imported only by these functions; without them
they raise `ConfigError` naming the extra that installs them (`sqlacache[prometheus]`,
`sqlacache[opentelemetry]`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .manager import CacheManager

_OP_COUNTERS = ("hits", "misses", "stores", "errors")
#: verification mode, per model and op (Prometheus `sqlacache_verify_checked_total`, ...;
#: OpenTelemetry `sqlacache.verify.checked`, ...)
_VERIFY_COUNTERS = ("verify_checked", "verify_mismatches", "verify_inconclusive")
_VERIFY_HELP = {
    "verify_checked": "Sampled hits compared with the database",
    "verify_mismatches": "Sampled hits that differed from the database (the entry was evicted)",
    "verify_inconclusive": "Sampled hits that could not be compared (e.g. a concurrent write)",
}


def _require(module: str, extra: str) -> Any:
    """Import an optional exporter dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f'{module} is not installed ({exc}): pip install "sqlacache[{extra}]"'
        ) from None


def _op_samples(stats: dict[str, Any]) -> Iterator[tuple[str, str, str, int]]:
    """(counter, model, op, value) for every model and op seen."""
    for model, ops in stats["models"].items():
        for op, counters in ops.items():
            for counter in _OP_COUNTERS:
                yield counter, model, op, counters[counter]


def _verify_samples(stats: dict[str, Any]) -> Iterator[tuple[str, str, str, int]]:
    """(counter, model, op, value) of verification mode for every model and op seen."""
    for model, ops in stats["models"].items():
        for op, counters in ops.items():
            for counter in _VERIFY_COUNTERS:
                yield counter, model, op, counters.get(counter, 0)


def _bypass_samples(stats: dict[str, Any]) -> Iterator[tuple[str, str, str, int]]:
    for model, ops in stats["models"].items():
        for op, counters in ops.items():
            for reason, value in counters["bypasses"].items():
                yield model, op, reason, value


class PrometheusCollector:
    """A `prometheus_client` collector: register it once per cache."""

    def __init__(self, cache: CacheManager, namespace: str = "sqlacache") -> None:
        _require("prometheus_client", "prometheus")  # at registration, not at the first scrape
        self.cache = cache
        self.namespace = namespace

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.cache.stats()
        prefix = self.cache.config.prefix
        ns = self.namespace
        families = {
            name: CounterMetricFamily(
                f"{ns}_{name}", f"Cache {name} per model and op", labels=["prefix", "model", "op"]
            )
            for name in _OP_COUNTERS
        }
        for counter, model, op, value in _op_samples(stats):
            families[counter].add_metric([prefix, model, op], value)
        yield from families.values()
        checks = {
            name: CounterMetricFamily(
                f"{ns}_{name}", _VERIFY_HELP[name], labels=["prefix", "model", "op"]
            )
            for name in _VERIFY_COUNTERS
        }
        for counter, model, op, value in _verify_samples(stats):
            checks[counter].add_metric([prefix, model, op], value)
        yield from checks.values()
        bypasses = CounterMetricFamily(
            f"{ns}_bypasses",
            "Reads that did not use the cache, by reason",
            labels=["prefix", "model", "op", "reason"],
        )
        for model, op, reason, value in _bypass_samples(stats):
            bypasses.add_metric([prefix, model, op, reason], value)
        yield bypasses
        invalidations = CounterMetricFamily(
            f"{ns}_invalidations", "Invalidations per table", labels=["prefix", "table"]
        )
        for table, value in stats["invalidations"].items():
            invalidations.add_metric([prefix, table], value)
        yield invalidations
        for name in ("payload_errors", "transport_errors", "undelivered_invalidations"):
            family = CounterMetricFamily(f"{ns}_{name}", name.replace("_", " "), labels=["prefix"])
            family.add_metric([prefix], stats[name])
            yield family
        breaker = GaugeMetricFamily(
            f"{ns}_circuit_breaker_open", "1 while the cache is skipped", labels=["prefix"]
        )
        breaker.add_metric([prefix], 1 if stats["circuit_breaker"]["state"] == "open" else 0)
        yield breaker
        pending = GaugeMetricFamily(
            f"{ns}_pending_invalidations",
            "Invalidations waiting for the backend",
            labels=["prefix"],
        )
        pending.add_metric([prefix], stats["pending_invalidations"])
        yield pending


def register_opentelemetry(cache: CacheManager, meter_provider: Any = None) -> None:
    """Observable counters and gauges on an OpenTelemetry meter, read at each collection."""
    _require("opentelemetry.metrics", "opentelemetry")
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Observation

    provider = meter_provider or metrics.get_meter_provider()
    meter = provider.get_meter("sqlacache")
    prefix = cache.config.prefix

    def op_callback(counter: str) -> Any:
        def observe(options: CallbackOptions) -> Iterator[Observation]:
            for name, model, op, value in _op_samples(cache.stats()):
                if name == counter:
                    yield Observation(value, {"prefix": prefix, "model": model, "op": op})

        return observe

    for counter in _OP_COUNTERS:
        meter.create_observable_counter(
            f"sqlacache.{counter}", callbacks=[op_callback(counter)], description=f"cache {counter}"
        )

    def verify_callback(counter: str) -> Any:
        def observe(options: CallbackOptions) -> Iterator[Observation]:
            for name, model, op, value in _verify_samples(cache.stats()):
                if name == counter:
                    yield Observation(value, {"prefix": prefix, "model": model, "op": op})

        return observe

    for counter in _VERIFY_COUNTERS:
        meter.create_observable_counter(
            "sqlacache." + counter.replace("_", "."),
            callbacks=[verify_callback(counter)],
            description=_VERIFY_HELP[counter],
        )

    def bypasses(options: CallbackOptions) -> Iterator[Observation]:
        for model, op, reason, value in _bypass_samples(cache.stats()):
            yield Observation(value, {"prefix": prefix, "model": model, "op": op, "reason": reason})

    def breaker(options: CallbackOptions) -> Iterator[Observation]:
        open_ = cache.stats()["circuit_breaker"]["state"] == "open"
        yield Observation(1 if open_ else 0, {"prefix": prefix})

    meter.create_observable_counter("sqlacache.bypasses", callbacks=[bypasses])
    meter.create_observable_gauge("sqlacache.circuit_breaker.open", callbacks=[breaker])
