"""Turning a run's measurements into the performance bars, one printed table, a JSON file and a bar chart.

Every ratio is computed here from the medians stored in the JSON, so a stored result can be
re-rendered and re-judged without re-running the benchmark.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READ_WORKLOADS = ("get", "fetch20", "fetch100", "count")
READ_LABELS = {
    "get": "get by pk",
    "fetch20": "fetch 20",
    "fetch100": "fetch 100",
    "count": "count",
}
ROUND_TRIP_ROWS = {
    ("get", "hit"): "get_hit",
    ("get", "miss"): "get_miss",
    ("fetch100", "hit"): "fetch100_hit",
    ("fetch100", "miss"): "fetch100_miss",
}
READ_VARIANTS = ("hit", "miss", "uncached", "floor", "floor_get", "uncached_2get", "rtt")
#: Redis-only references: one GET, and the floor or the uncached operation followed by GETs in
#: the same timed operation (on a loaded machine a round trip after CPU work costs far more
#: than one in a tight loop, and a cached operation always pays the former)
SEQUENTIAL_REFERENCES = ("rtt", "floor_get", "uncached_2get")
VARIANT_LABELS = {"rtt": "RTT", "floor_get": "floor+GET", "uncached_2get": "unc+2 GET"}
STAMPEDES = {
    "first_burst": "first burst, get",
    "get_cold": "get, never read",
    "get_after_write": "get, after a write",
    "fetch100_cold": "fetch 100, new key",
}


def _median(phase: dict[str, Any], workload: str, variant: str) -> float:
    return float(phase["reads"][workload][variant]["median_us"])


def _commit_extra(phase: dict[str, Any]) -> float:
    commit = phase["commit"]
    return float(commit["cached"]["median_us"] - commit["uncached"]["median_us"])


# -- the bars ------------------------------------------------------------------------------------

#: what a bar's judge returns: (what was measured, passed or None for "for reference", value)
Verdict = tuple[str, bool | None, float]
Judge = Callable[[dict[str, Any]], Verdict]


@dataclass(frozen=True)
class Bar:
    """One row of the bars: judged on the phase `phase` of the run, or "n/a" without it.

    `judge` is None for a bar whose feature is not built yet; building it is giving the bar a
    judge (most are one of the helpers below with another phase name) and adding the phase in
    `run.backends()`.
    """

    name: str
    backend: str
    target: str
    phase: str
    judge: Callable[[dict[str, Any]], Verdict] | None


def _hit_vs_floor(limit: float) -> Judge:
    def judge(phase: dict[str, Any]) -> Verdict:
        ratio = _median(phase, "get", "hit") / _median(phase, "get", "floor")
        return f"{ratio:.3f} x floor", ratio <= limit, ratio

    return judge


def _local_hit(phase: dict[str, Any]) -> Verdict:
    ratio = _median(phase, "get", "hit") / _median(phase, "get", "floor")
    trips = phase.get("round_trips", {}).get("get_hit", {}).get("round_trips")
    measured = f"{ratio:.3f} x floor, {trips if trips is not None else '?'} round trips per hit"
    return measured, ratio <= 1.10 and trips == 0, ratio


def _hit_vs_floor_rtt(workload: str, limit: float, trips_key: str | None) -> Judge:
    def judge(phase: dict[str, Any]) -> Verdict:
        reference = _median(phase, workload, "floor") + _median(phase, workload, "rtt")
        ratio = _median(phase, workload, "hit") / reference
        measured = f"{ratio:.3f} x (floor+RTT)"
        ok = ratio <= limit
        if "floor_get" in phase["reads"][workload]:
            sequential = _median(phase, workload, "hit") / _median(phase, workload, "floor_get")
            measured += f" [{sequential:.2f} x floor-then-GET]"
        if trips_key is not None:
            trips = phase["round_trips"][trips_key]["round_trips"]
            measured += f", {trips:g} round trip(s) per hit"
            ok = ok and trips == 1
        return measured, ok, ratio

    return judge


def _miss(phase: dict[str, Any]) -> Verdict:
    extra = {
        w: (_median(phase, w, "miss") - _median(phase, w, "uncached")) / _median(phase, w, "rtt")
        for w in READ_WORKLOADS
    }
    worst = max(extra, key=lambda w: extra[w])
    detail = ", ".join(f"{w} {v:+.1f}" for w, v in extra.items())
    measured = f"worst {worst}: uncached {extra[worst]:+.1f} RTT ({detail})"
    if all("uncached_2get" in phase["reads"][w] for w in READ_WORKLOADS):
        sequential = ", ".join(
            f"{w} {_median(phase, w, 'miss') / _median(phase, w, 'uncached_2get'):.2f}"
            for w in READ_WORKLOADS
        )
        measured += f" [x uncached-then-2-GETs: {sequential}]"
    return measured, extra[worst] <= 2, extra[worst]


def _commit(phase: dict[str, Any]) -> Verdict:
    commit = phase["commit"]
    extra = _commit_extra(phase) / float(commit["rtt"]["median_us"])
    measured = f"uncached {extra:+.1f} RTT"
    if "uncached_2get" in commit:
        ratio = commit["cached"]["median_us"] / commit["uncached_2get"]["median_us"]
        measured += f" [{ratio:.2f} x uncached-commit-then-2-GETs]"
    return measured, extra <= 2, extra


def _throughput(judged: bool) -> Judge:
    def judge(phase: dict[str, Any]) -> Verdict:
        tp = phase["throughput"]["tasks_50"]
        ratio = tp["cached"]["ops_per_s"] / tp["floor"]["ops_per_s"]
        unc = tp["cached"]["ops_per_s"] / tp["uncached"]["ops_per_s"]
        floor = tp["floor"]["ops_per_s"] / tp["uncached"]["ops_per_s"]
        measured = f"{ratio:.2f} x floor ({unc:.2f} x uncached; floor {floor:.2f} x uncached)"
        return measured, (ratio >= 0.8) if judged else None, ratio

    return judge


def _stampede(phase: dict[str, Any]) -> Verdict:
    herd = phase["stampede"]
    worst = max(STAMPEDES, key=lambda k: herd[k])
    detail = ", ".join(f"{k} {herd[k]}" for k in STAMPEDES)
    ok = all(herd[k] == 1 for k in STAMPEDES)
    return f"{herd[worst]} DB queries ({detail})", ok, float(herd[worst])


def _realistic(phase: dict[str, Any]) -> Verdict:
    real = phase["realistic"]
    warm, after = real["warm"], real["after_write"]
    measured = (
        f"warm {warm['sql']} SQL ({warm['hits']} hits, {warm['misses']} misses); "
        f"after one write {after['sql']} SQL ({after['hits']} hits, {after['misses']} misses)"
    )
    timing = real.get("timing")
    if timing:
        measured += (
            f"; warm {timing['warm']['median_us'] / timing['uncached']['median_us']:.2f} x uncached,"
            f" {timing['warm']['median_us'] / timing['floor']['median_us']:.2f} x floor"
        )
    return measured, warm["sql"] == 0 and real["warm_again"]["sql"] == 0, float(warm["sql"])


NOT_BUILT = None
BARS: tuple[Bar, ...] = (
    Bar("P1 get hit", "mem://", "<= 1.10 x floor", "mem", _hit_vs_floor(1.10)),
    Bar(
        "P2 get hit",
        "redis://",
        "<= 1.15 x (floor+RTT), 1 round trip",
        "redis",
        _hit_vs_floor_rtt("get", 1.15, "get_hit"),
    ),
    Bar(
        "P2L get hit",
        "redis://+tier",
        "<= 1.10 x floor, 0 round trips",
        "redis_tier",
        _local_hit,
    ),
    Bar(
        "P3 fetch 100 hit",
        "redis://",
        "<= 1.0 x (floor100+RTT)",
        "redis",
        _hit_vs_floor_rtt("fetch100", 1.0, None),
    ),
    Bar("P4 miss", "redis://", "<= uncached + 2 RTT", "redis", _miss),
    Bar("P5 commit", "redis://", "<= uncached commit + 2 RTT", "redis", _commit),
    Bar(
        "P6 throughput 50 tasks", "redis://+tier", ">= 0.8 x floor", "redis_tier", _throughput(True)
    ),
    Bar("P6 (reference, no tier)", "mem://", ">= 0.8 x floor", "mem", _throughput(False)),
    Bar("P6 (reference, no tier)", "redis://", ">= 0.8 x floor", "redis", _throughput(False)),
    Bar("P7 stampede", "mem://", "1 database query", "mem", _stampede),
    Bar("P7 stampede", "redis://", "1 database query", "redis", _stampede),
    Bar(
        "P8 tier staleness",
        "redis://+tier",
        "<= 5 ms p99 on loopback",
        "redis_tier",
        lambda phase: ("measured across OS processes: integration/test_local_tier.py", None, 0.0),
    ),
    Bar(
        "P9 get hit, cluster",
        "cluster",
        "<= 1.25 x (floor+RTT), one pipelined call",
        "cluster",
        _hit_vs_floor_rtt("get", 1.25, None),
    ),
    Bar("P10 realistic request", "mem://", "warm: 0 SQL statements", "mem", _realistic),
    Bar("P10 realistic request", "redis://", "warm: 0 SQL statements", "redis", _realistic),
)


def bars(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every bar of `BARS`, judged on this run's figures: "pass", "fail", "info" (a reference
    figure, not the bar's own configuration) or "n/a" (feature not built, or phase not run)."""
    phases = results["phases"]
    out: list[dict[str, Any]] = []
    for spec in BARS:
        row: dict[str, Any] = {"bar": spec.name, "backend": spec.backend, "target": spec.target}
        phase = phases.get(spec.phase)
        if spec.judge is None:
            row.update(measured="n/a (not built)", verdict="n/a", value=None)
        elif phase is None:
            row.update(measured="n/a (not measured in this run)", verdict="n/a", value=None)
        else:
            measured, ok, value = spec.judge(phase)
            verdict = "info" if ok is None else ("pass" if ok else "fail")
            row.update(measured=measured, verdict=verdict, value=round(value, 3))
        out.append(row)
    return out


# -- the printed table ---------------------------------------------------------------------------

_HEAD = (
    f"{'workload':<12}{'variant':<10}"
    f"{'mem µs':>10}{'x unc':>7}  {'vs reference':<16}"
    f"{'redis µs':>10}{'x unc':>7}  {'vs reference':<20}{'RT/op':>6}{'cmd/op':>7}"
)


def _cell_us(value: float | None) -> str:
    return f"{value:>10.0f}" if value is not None else f"{'-':>10}"


def _cell_ratio(value: float | None) -> str:
    return f"{value:>7.2f}" if value is not None else f"{'':>7}"


def _reference(phase: dict[str, Any], workload: str, variant: str, redis: bool) -> str:
    value = _median(phase, workload, variant)
    if variant == "hit":
        floor = _median(phase, workload, "floor")
        if redis:
            return f"{value / (floor + _median(phase, workload, 'rtt')):.2f} x (floor+RTT)"
        return f"{value / floor:.2f} x floor"
    if variant == "miss":
        extra = value - _median(phase, workload, "uncached")
        if redis:
            return f"unc {extra / _median(phase, workload, 'rtt'):+.1f} RTT"
        return f"unc {extra:+.0f} µs"
    return ""


def print_report(results: dict[str, Any]) -> None:
    phases = results["phases"]
    mem, red = phases.get("mem"), phases.get("redis")
    meta = results["meta"]
    lines: list[str] = []
    rule = "-" * len(_HEAD)
    lines += ["", rule, _HEAD, rule]

    def row(
        workload: str,
        variant: str,
        mem_cells: tuple[float | None, float | None, str],
        red_cells: tuple[float | None, float | None, str],
        trips: dict[str, Any] | None = None,
    ) -> None:
        rt = f"{trips['round_trips']:>6g}{trips['commands']:>7g}" if trips else ""
        lines.append(
            f"{workload + ' ' * (12 - len(workload)) + variant:<22}"
            f"{_cell_us(mem_cells[0])}{_cell_ratio(mem_cells[1])}  {mem_cells[2]:<16}"
            f"{_cell_us(red_cells[0])}{_cell_ratio(red_cells[1])}  {red_cells[2]:<20}{rt}"
        )

    empty: tuple[float | None, float | None, str] = (None, None, "")

    def read_cells(phase: dict[str, Any] | None, workload: str, variant: str, redis: bool) -> Any:
        if phase is None or variant not in phase["reads"][workload]:
            return empty
        value = _median(phase, workload, variant)
        ratio = value / _median(phase, workload, "uncached") if variant != "rtt" else None
        return (value, ratio, _reference(phase, workload, variant, redis))

    for workload in READ_WORKLOADS:
        for i, variant in enumerate(READ_VARIANTS):
            if variant in SEQUENTIAL_REFERENCES and red is None:
                continue
            trips_key = ROUND_TRIP_ROWS.get((workload, variant))
            trips = red["round_trips"].get(trips_key) if red and trips_key else None
            name = READ_LABELS[workload] if i == 0 else ""
            shown = VARIANT_LABELS.get(variant, variant)
            row(
                name,
                shown,
                read_cells(mem, workload, variant, False),
                read_cells(red, workload, variant, True),
                trips,
            )
        lines.append("")

    def commit_cells(phase: dict[str, Any] | None, variant: str, redis: bool) -> Any:
        if phase is None or variant not in phase["commit"]:
            return empty
        commit = phase["commit"]
        value = float(commit[variant]["median_us"])
        if variant == "rtt":
            return (value, None, "")
        ratio = value / float(commit["uncached"]["median_us"])
        reference = ""
        if variant == "cached":
            extra = _commit_extra(phase)
            reference = (
                f"unc {extra / float(commit['rtt']['median_us']):+.1f} RTT"
                if redis
                else f"unc {extra:+.0f} µs"
            )
        return (value, ratio, reference)

    for i, variant in enumerate(("cached", "uncached", "uncached_2get", "rtt")):
        if variant in SEQUENTIAL_REFERENCES and red is None:
            continue
        trips = red["commit"].get("round_trips") if red and variant == "cached" else None
        row(
            "commit" if i == 0 else "",
            VARIANT_LABELS.get(variant, variant),
            commit_cells(mem, variant, False),
            commit_cells(red, variant, True),
            trips,
        )
    lines.append("")

    def tp_cells(phase: dict[str, Any] | None, tasks: int, variant: str) -> Any:
        if phase is None:
            return empty
        tp = phase["throughput"][f"tasks_{tasks}"]
        if variant not in tp:
            return empty
        value = float(tp[variant]["ops_per_s"])
        return (value, value / float(tp["uncached"]["ops_per_s"]), "ops/s")

    _realistic_lines(mem, red, row, lines)
    lines.append("")
    lines.append("throughput: 95 % get by pk, 5 % load-change-commit, on 1 000 hot rows")
    for tasks in (1, 50):
        for i, variant in enumerate(("cached", "uncached", "floor")):
            label = f"  {tasks} task{'s' if tasks > 1 else ''}" if i == 0 else ""
            row(label, variant, tp_cells(mem, tasks, variant), tp_cells(red, tasks, variant))
    lines.append("")

    def herd_cells(phase: dict[str, Any] | None, key: str) -> Any:
        if phase is None:
            return empty
        return (float(phase["stampede"][key]), None, "DB queries")

    readers = (mem or red or {}).get("stampede", {}).get("readers", 100)
    lines.append(f"P7: {readers} concurrent cold reads of one key")
    # the first burst meets the Redis pool of a process that has only run one task so far
    for key, label in STAMPEDES.items():
        row(f"  {label}", "", herd_cells(mem, key), herd_cells(red, key))
    lines.append(rule)
    lines.append(
        "µs = median per operation (fresh AsyncSession each); x unc = / uncached median of the "
        "same run; RT/op = Redis round trips counted in the client, cmd/op = calls in INFO "
        "commandstats (pipelined and Lua-invoked commands count one each)."
    )
    lines.append("")
    lines.append(
        "Performance bars (ratios within this one run; absolute µs depend on the machine's load)"
    )
    for item in results["bars"]:
        lines.append(
            f"  {item['verdict'].upper():<5} {item['bar']:<25}{item['backend']:<15}{item['measured']}"
            f"   (target {item['target']})"
        )
    for label, phase in (("mem://", mem), ("redis://", red)):
        if phase is None:
            continue
        errors = phase.get("transport_errors") or {}
        if errors:
            where = ", ".join(f"{section} {count}" for section, count in errors.items())
            last = (phase.get("circuit_breaker") or {}).get("last_error")
            lines.append(
                f"  WARNING {label}: cache transport errors ({where}; last: {last}); the circuit"
                " breaker opened and those operations ran uncached"
            )
    for warning in meta.get("warnings", []):
        lines.append(f"  WARNING: {warning}")
    for note in meta["notes"]:
        lines.append(f"  NOTE: {note}")
    print("\n".join(lines))


REALISTIC_RUNS = (
    ("cold", "cold"),
    ("warm", "warm"),
    ("after_write", "after 1 write"),
    ("warm_again", "warm again"),
)


def _realistic_lines(
    mem: dict[str, Any] | None,
    red: dict[str, Any] | None,
    row: Callable[..., None],
    lines: list[str],
) -> None:
    """P10: the warm request timed, then its SQL and cache counters per step and per run."""
    lines.append(
        "P10 realistic request: get user, 20 posts + authors (selectinload), count, get post,"
        " its comments (lazy)"
    )

    def cells(phase: dict[str, Any] | None, variant: str) -> Any:
        timing = (phase or {}).get("realistic", {}).get("timing")
        if not timing or variant not in timing:
            return (None, None, "")
        value = float(timing[variant]["median_us"])
        if variant == "rtt":
            return (value, None, "")
        reference = ""
        if variant == "warm":
            reference = f"{value / float(timing['floor']['median_us']):.2f} x floor"
        return (value, value / float(timing["uncached"]["median_us"]), reference)

    for variant in ("warm", "uncached", "floor", "rtt"):
        if variant == "rtt" and red is None:
            continue
        trips = (red or {}).get("realistic", {}).get("round_trips") if variant == "warm" else None
        row(
            "  request",
            "RTT" if variant == "rtt" else variant,
            cells(mem, variant),
            cells(red, variant),
            trips,
        )
    lines.append(
        f"  {'SQL / hits / misses':<30}" + "".join(f"{label:>14}" for _k, label in REALISTIC_RUNS)
    )
    for label, phase in (("mem://", mem), ("redis://", red)):
        real = (phase or {}).get("realistic")
        if not real:
            continue
        runs = [real[key] for key, _label in REALISTIC_RUNS]
        lines.append(
            f"  {label + ' whole request':<30}"
            + "".join(f"{r['sql']:>6} /{r['hits']:>2} /{r['misses']:>2}" for r in runs)
        )
        for step in runs[0]["steps"]:
            lines.append(
                f"    {step:<28}"
                + "".join(
                    f"{r['steps'][step]['sql']:>6} /{r['steps'][step]['hits']:>2}"
                    f" /{r['steps'][step]['misses']:>2}"
                    for r in runs
                )
            )
        bypassed = sorted({b for r in runs for s in r["steps"].values() for b in s["bypasses"]})
        if bypassed:
            lines.append(f"    bypasses counted: {', '.join(bypassed)}")


# -- files ---------------------------------------------------------------------------------------


def write_json(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def write_chart(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = results["phases"]
    panels = [name for name in ("mem", "redis") if name in phases]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(6 * (len(panels) + 1), 4.8))
    variants = ("hit", "floor", "miss", "uncached")
    colours = {"hit": "#2a9d8f", "floor": "#8ab17d", "miss": "#e9c46a", "uncached": "#e76f51"}
    width = 0.2
    for ax, name in zip(axes, panels, strict=False):
        phase = phases[name]
        for i, variant in enumerate(variants):
            values = [_median(phase, w, variant) for w in READ_WORKLOADS]
            xs = [x + (i - 1.5) * width for x in range(len(READ_WORKLOADS))]
            ax.bar(xs, values, width, label=variant, color=colours[variant])
        if name == "redis":
            rtt = _median(phase, "get", "rtt")
            ax.axhline(rtt, color="grey", linestyle=":", linewidth=1, label=f"RTT {rtt:.0f} µs")
        ax.set_xticks(range(len(READ_WORKLOADS)), [READ_LABELS[w] for w in READ_WORKLOADS])
        ax.set_yscale("log")
        ax.set_ylabel("median µs per operation (log)")
        ax.set_title(f"reads, {phase['backend'].split('//')[0]}//")
        ax.legend(fontsize=8)
    ax = axes[-1]
    labels, cached, uncached = [], [], []
    for name in panels:
        for tasks in (1, 50):
            tp = phases[name]["throughput"][f"tasks_{tasks}"]
            labels.append(f"{name}\n{tasks} task{'s' if tasks > 1 else ''}")
            cached.append(tp["cached"]["ops_per_s"])
            uncached.append(tp["uncached"]["ops_per_s"])
    xs = list(range(len(labels)))
    ax.bar([x - 0.2 for x in xs], cached, 0.4, label="cached", color=colours["hit"])
    ax.bar([x + 0.2 for x in xs], uncached, 0.4, label="uncached", color=colours["uncached"])
    ax.set_xticks(xs, labels)
    ax.set_ylabel("operations / s")
    ax.set_title("throughput, 95 % get / 5 % commit, 1 000 hot rows")
    ax.legend(fontsize=8)
    meta = results["meta"]
    fig.suptitle(
        f"sqlacache {meta['versions']['sqlacache']} bench: {meta['versions']['database']}"
        + (f", {meta['versions']['redis']}" if "redis" in meta["versions"] else "")
        + f" ({meta['when']})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit(
            "usage: python bench/report.py bench/results/<run>.json  (re-prints and re-judges)"
        )
    stored = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    stored["bars"] = bars(stored)
    print_report(stored)
