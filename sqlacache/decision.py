"""The read decision: may this execution use the cache, and under which keys?

`decide(state)` returns a `Decision` (plan, policy, TTL, the keys of one fetch) or a `Skip` with
its reason. Everything that depends only on the statement's shape comes memoised from its `Plan`
(see `analysis`) and `KeySet`; what is left per call is the session's state and the parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Connection
from sqlalchemy.orm import ORMExecuteState, Session
from sqlalchemy.orm.attributes import instance_state

from . import _sqla
from .analysis import Plan, coerce_pk
from .database import Database, table_name
from .keys import UnstableValue, canonical, digest_base, digest_from, pk_text
from .policy import ModelPolicy, check_timeout
from .runtime import Runtime
from .snapshot import mapper_name

FORCE_OPTION = "sqlacache_force"


def force_options(instance_id: int, timeout: int | None) -> dict[str, Any]:
    """The execution options of `cache.execute()`: cached by this cache whatever the
    configuration's ops and None entries say, for `timeout` seconds if given."""
    options: dict[str, Any] = {FORCE_OPTION: instance_id}
    if timeout is not None:
        options["cache_timeout"] = timeout
    return options


@dataclass(frozen=True, slots=True)
class Skip:
    """This execution neither reads nor fills the cache. Counted under (model, op) with its
    reason when `model` is known; `NOT_OURS` (not a cached SELECT at all) is not counted."""

    reason: str
    model: str | None = None
    op: str = "-"


NOT_OURS = Skip("not_ours")


@dataclass(frozen=True)
class KeySet:
    """The key names a plan reads in one database under one schema map."""

    names: frozenset[str]  # table names, to compare with what the transaction wrote
    versions: tuple[str, ...]  # epoch, then table versions (or table-wide tokens for `get`)
    leases: tuple[str, ...]  # fetch: table leases; get: table-wide leases, then eager tables'
    row_prefixes: tuple[str, ...]  # get: one row-version key prefix per table of the entity
    row_lease_prefixes: tuple[str, ...]  # get: one row-lease key prefix per table of the entity
    row_guards: tuple[str, ...]  # get: the table version guarding each row version's creation
    entry_base: Any  # the entry digest fed with what is fixed here: statement, database, schema map
    schema_map: Mapping[Any, Any] | None


@dataclass(slots=True)
class Decision:
    """A cacheable read, with the keys of its one fetch: entry, versions, leases, row guards."""

    state: ORMExecuteState
    db: Database
    plan: Plan
    name: str
    policy: ModelPolicy
    ttl: int
    keyset: KeySet
    entry_key: str
    row_versions: list[str]
    row_leases: list[str]

    @property
    def op(self) -> str:
        return self.plan.op

    @property
    def version_keys(self) -> list[str]:
        return [*self.row_versions, *self.keyset.versions]

    def fetch_keys(self) -> list[str]:
        keyset = self.keyset
        return [
            self.entry_key,
            *self.row_versions,
            *keyset.versions,
            *self.row_leases,
            *keyset.leases,
            *keyset.row_guards,
        ]

    @property
    def single_entity(self) -> bool:
        shape = self.plan.shape
        return bool(shape and shape.single_entity) and not _sqla.only_return_tuples(
            self.state.load_options
        )


class _Skipped(Exception):
    """Internal: raised by the checks below, turned into a `Skip` by `decide`."""


def candidate(state: ORMExecuteState, runtime: Runtime) -> tuple[Database, Any] | None:
    """The bound database and bind of a SELECT the cache may serve, before any analysis."""
    if not state.is_select:
        return None
    options = state.execution_options
    if options.get("cache") is False or options.get("sqlacache_skip_interceptor"):
        return None
    bind = state.session.get_bind(**state.bind_arguments)
    db = runtime.databases.for_bind(bind)
    return None if db is None else (db, bind)


def decide(state: ORMExecuteState, db: Database, bind: Any, runtime: Runtime) -> Decision | Skip:
    """Whether and how this SELECT uses the cache (`candidate` said it may)."""
    statement = state.statement
    cache_key = _sqla.statement_cache_key(statement)
    if cache_key is None:
        return NOT_OURS
    plan = db.plans.plan_for(statement, cache_key)
    model = plan.model
    name = mapper_name(model) if model is not None else "-"
    if plan.bypass is not None:
        return Skip(plan.bypass, name, plan.op)
    assert model is not None
    config = runtime.config
    policy = config.policy_for(model)
    options = state.execution_options
    if options.get(FORCE_OPTION) != runtime.instance_id and not policy.allows(plan.op):
        return NOT_OURS
    ttl = _ttl(options, policy, config.default_timeout)  # a bad cache_timeout raises ConfigError
    try:
        _check_call(state)
        # schema_translate_map may come from the engine, an option engine, the connection, the
        # statement or the call: all of them change the SQL that runs
        schema_map = db.schema_map(_sqla.bind_execution_options(bind), options)
        keyset = _keyset(runtime, db, plan, schema_map)
        _check_session(state, keyset, runtime.tx_key)
        entry_key = runtime.namespace.entry(_entry_digest(state, keyset, cache_key, runtime))
        row_versions, row_leases = _row_keys(state, plan, keyset, cache_key.bindparams)
    except _Skipped as reason:
        return Skip(str(reason), name, plan.op)
    return Decision(state, db, plan, name, policy, ttl, keyset, entry_key, row_versions, row_leases)


def _ttl(options: Mapping[str, Any], policy: ModelPolicy, default: int) -> int:
    override = options.get("cache_timeout")
    if override is not None:
        return check_timeout(override, "cache_timeout")
    return policy.timeout if policy.enabled else default


def _check_call(state: ORMExecuteState) -> None:
    """What the call itself asks for that a cached result cannot give."""
    if state.is_column_load:
        raise _Skipped("column_load")
    load_options = state.load_options
    if _sqla.is_eager_loader_statement(load_options):
        # an eager loader's statement (selectin, subquery) inside a larger load: its objects'
        # own eager loads are scheduled on that load while rows are processed, so it must run
        # through the ORM; the enclosing statement's entry already holds the whole graph
        raise _Skipped("eager_load_statement")
    options = state.execution_options
    if _sqla.populates_existing(load_options) or options.get("populate_existing"):
        raise _Skipped("populate_existing")
    if (
        _sqla.yields_per(load_options)
        or options.get("stream_results")
        or options.get("yield_per")
        or options.get("max_row_buffer")
    ):
        raise _Skipped("streaming")


def _check_session(state: ORMExecuteState, keyset: KeySet, tx_key: Any) -> None:
    """Read-your-writes and pending edits: the transaction must see its own changes, and its
    uncommitted rows must never reach the cache. Autoflushes as the uncached query would."""
    session = state.session
    tracker = session.info.get(tx_key)
    if tracker is not None:
        if tracker.raw_sql:
            raise _Skipped("raw_sql")
        if tracker.written and not keyset.names.isdisjoint(tracker.written):
            raise _Skipped("own_writes")
        if tracker.reads_a_snapshot:
            raise _Skipped("isolation")
    bind = session.bind
    if isinstance(bind, Connection):  # a session joined to a transaction it did not begin
        outer = bind.info.get(tx_key)
        if outer is not None and not keyset.names.isdisjoint(outer.merged().all_tables()):
            raise _Skipped("own_writes")
    if not _sqla.has_pending_changes(session):
        return
    if not keyset.names.isdisjoint(_pending_tables(session, keyset)):
        raise _Skipped("pending_changes")
    if _sqla.autoflushes(session, state.load_options):
        _sqla.autoflush(session)
        tracker = session.info.get(tx_key)
        if tracker is not None and not keyset.names.isdisjoint(tracker.written):
            raise _Skipped("own_writes")


def _pending_tables(session: Session, keyset: KeySet) -> set[str]:
    schema_map = keyset.schema_map
    tables: set[str] = set()
    for obj in (*session.new, *session.dirty, *session.deleted):
        for table in instance_state(obj).mapper.tables:
            if isinstance(table, Table):
                tables.add(table_name(table, schema_map))
    return tables


def _keyset(
    runtime: Runtime, db: Database, plan: Plan, schema_map: Mapping[Any, Any] | None
) -> KeySet:
    schema_text = canonical(schema_map) if schema_map else ""
    memo = (db.identity, schema_text)
    keyset: KeySet | None = plan.keysets.get(memo)
    if keyset is None:
        keyset = _build_keyset(runtime, db, plan, schema_map, schema_text)
        plan.keysets[memo] = keyset
    return keyset


def _build_keyset(
    runtime: Runtime,
    db: Database,
    plan: Plan,
    schema_map: Mapping[Any, Any] | None,
    schema_text: str,
) -> KeySet:
    ns, dbid = runtime.namespace, db.identity

    def named(tables: Sequence[Table]) -> list[str]:
        return [table_name(t, schema_map) for t in tables]

    names = named(plan.tables)
    versions = [ns.epoch_key]
    row_prefixes: list[str] = []
    row_lease_prefixes: list[str] = []
    row_guards: list[str] = []
    if plan.op == "get":
        # a get depends on its own row and on table-wide writes, not on other rows
        rows = named(plan.row_tables)
        others = named(plan.other_tables)
        row_prefixes = [ns.row_version(dbid, t, "") for t in rows]
        row_lease_prefixes = [ns.row_lease(dbid, t, "") for t in rows]
        row_guards = [ns.table_version(dbid, t) for t in rows]
        versions += [ns.table_wide(dbid, t) for t in rows]
        versions += [ns.table_version(dbid, t) for t in others]
        leases = [ns.table_wide_lease(dbid, t) for t in rows]
        leases += [ns.lease(dbid, t) for t in others]
    else:
        versions += [ns.table_version(dbid, t) for t in names]
        leases = [ns.lease(dbid, t) for t in names]
    return KeySet(
        names=frozenset(names),
        versions=tuple(versions),
        leases=tuple(leases),
        row_prefixes=tuple(row_prefixes),
        row_lease_prefixes=tuple(row_lease_prefixes),
        row_guards=tuple(row_guards),
        entry_base=digest_base(plan.sql_digest, db.identity, schema_text),
        schema_map=schema_map,
    )


def _entry_digest(state: ORMExecuteState, keyset: KeySet, cache_key: Any, runtime: Runtime) -> str:
    """The entry's name: the keyset's fixed parts, then this call's values and options.

    Parameter values are taken in the order of the statement's bound parameters, with the
    call's parameters in place of those they name: SQLAlchemy names some parameters (lazy
    loads') after memory addresses, which differ between processes.
    """
    load_options = state.load_options
    try:
        values = canonical(_parameter_values(state, cache_key))
        context = ""
        if runtime.config.key_context is not None:
            context = canonical(runtime.config.key_context(state))
        token = canonical(_sqla.identity_token(load_options))
    except UnstableValue as exc:
        raise _Skipped("unstable_parameter") from exc
    except TypeError as exc:  # executemany parameters are not a SELECT's
        raise _Skipped("parameters") from exc
    flags = (
        f"{int(_sqla.only_return_tuples(load_options))}"
        f"{int(_sqla.invokes_all_eagers(load_options))}"
    )
    return digest_from(keyset.entry_base, values, token, context, flags)


def _parameter_values(state: ORMExecuteState, cache_key: Any) -> list[Any]:
    parameters: Any = state.parameters
    bindparams = cache_key.bindparams
    if not parameters:
        return [bp.effective_value for bp in bindparams]
    given = dict(parameters)  # a list of dicts (executemany) raises TypeError: not a SELECT's
    values = []
    for bp in bindparams:
        key = bp.key
        values.append(given.pop(key) if key in given else bp.effective_value)
    if given:  # parameters no bound parameter names (expanding IN lists, textual binds)
        values.append(dict(given))
    return values


def _row_keys(
    state: ORMExecuteState, plan: Plan, keyset: KeySet, bindparams: Any
) -> tuple[list[str], list[str]]:
    """A get's row-version keys and row-lease keys, from its primary-key parameters."""
    if not keyset.row_prefixes:
        return [], []
    params: Any = state.parameters or {}
    values = []
    for pk in plan.pk_params:
        if pk.key in params:
            value = params[pk.key]
        elif 0 <= pk.index < len(bindparams):
            value = bindparams[pk.index].effective_value
        else:
            raise _Skipped("pk_parameter")
        try:
            values.append(coerce_pk(value, pk.python_type))
        except (TypeError, ValueError) as exc:
            raise _Skipped("pk_parameter") from exc
    try:
        text = pk_text(values)
    except UnstableValue as exc:
        raise _Skipped("pk_parameter") from exc
    return (
        [prefix + text for prefix in keyset.row_prefixes],
        [prefix + text for prefix in keyset.row_lease_prefixes],
    )


@dataclass(slots=True)
class Fetched:
    """The answer to a decision's one fetch, split by what each key was."""

    entry: bytes | None
    versions: list[bytes | None]
    leased: bool
    guards_seen: list[bytes | None]
    fetched_at: float  # `time.monotonic()` before the fetch was sent (see `Fill.guard_rows`)
    local_mark: Any = None  # the in-process tier's mark before the fetch (see `local_tier`)

    @classmethod
    def split(
        cls, decision: Decision, found: list[bytes | None], fetched_at: float, mark: Any = None
    ) -> Fetched:
        keyset = decision.keyset
        versions_end = 1 + len(decision.row_versions) + len(keyset.versions)
        leases_end = versions_end + len(decision.row_leases) + len(keyset.leases)
        leases = found[versions_end:leases_end]
        return cls(
            entry=found[0],
            versions=found[1:versions_end],
            leased=leases.count(None) != len(leases),
            guards_seen=found[leases_end:],
            fetched_at=fetched_at,
            local_mark=mark,
        )
