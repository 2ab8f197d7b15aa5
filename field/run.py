"""The field test: real projects' own SQLAlchemy test suites, run without and with sqlacache.

For each project: fetch its source (a PyPI sdist that carries its tests, or a local path), build a
venv under `field/.work/venvs/` with its test dependencies and this repository installed
editable, then run its suite three times -- baseline (no cache), `mem://`, and `redis://` (a
prefix of its own per run) -- with `sqlacache_field_plugin` binding the cache to every engine the
suite creates and caching every model. Prints one table (outcomes and cache totals per run) and,
per project, the tests that pass without the cache and fail with it.

    python field/run.py                      # every project, every backend
    python field/run.py --only sqlmodel      # one project (repeatable)
    python field/run.py --src sqlmodel=/path/to/checkout   # a local source tree instead of PyPI
    python field/run.py --pg postgresql://postgres@127.0.0.1:5432/field   # add PostgreSQL rows
    python field/run.py --config '{"verify": 1.0}'   # extra configure() arguments, cached runs

Only the standard library is used here; every project gets its own venv.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / ".work"


@dataclass
class Project:
    """A project whose own test suite is run; `database` rows are run once per database."""

    name: str
    sdist: str | None  # pip requirement of the sdist that carries the tests; None: --src only
    deps: list[str]  # test dependencies (the project's own are installed from its source)
    tests: list[str]  # pytest arguments (paths, -k, deselects), relative to the source root
    databases: dict[str, dict[str, str]] = field(default_factory=lambda: {"sqlite": {}})
    needs_pg: set[str] = field(default_factory=set)  # database labels that need --pg
    install_source: bool = True  # pip install the source tree itself (for its dependencies)
    timeout: int = 600  # seconds per pytest run
    source_hint: str = ""  # where to get the source when there is no sdist with tests
    mkdirs: list[str] = field(default_factory=list)  # directories its suite expects to exist
    default: bool = True  # run without --only/--all (False: too slow for the 20-minute budget)


PROJECTS = [
    Project(
        name="fastapi-users-db-sqlalchemy",
        sdist="fastapi-users-db-sqlalchemy==7.0.0",
        deps=["aiosqlite", "asyncpg", "pytest", "pytest-asyncio", "pytest-mock", "httpx"],
        tests=["tests"],
        databases={
            "sqlite": {},
            "postgresql": {"DATABASE_URL": "{pg_asyncpg}"},
        },
        needs_pg={"postgresql"},
    ),
    Project(
        name="sqlmodel",
        sdist="sqlmodel==0.0.50",
        deps=[
            "aiosqlite",
            "alembic",
            "dirty-equals",
            "fastapi",
            "httpx",
            "jinja2",
            "pytest",
            "pyyaml",
            "typer",
            "black",
            "coverage",
            "psycopg[binary]",
        ],
        tests=["tests"],
        mkdirs=["coverage"],  # its docs tests copy coverage data there
        databases={
            "sqlite": {},
            "postgresql": {"DATABASE_URL": "{pg_psycopg}"},
        },
        needs_pg={"postgresql"},
    ),
    Project(
        # its sdist carries no tests: give a checkout (or a bare git dir) with --src fastcrud=PATH
        name="fastcrud",
        sdist=None,
        source_hint="a checkout of https://github.com/benavlabs/fastcrud",
        deps=[
            "pytest",
            "aiosqlite",
            "greenlet",
            "httpx>=0.26,<0.27",
            "pytest-asyncio>=1,<2",
            "uvicorn",
            "sqlmodel>=0.0.14,<0.0.15",
            "testcontainers>=4.7.1,<5",
            "asyncpg",
            "psycopg[binary]",
            "cryptography",
            "filelock",
        ],
        # its PostgreSQL and MySQL variants need Docker (testcontainers) and skip themselves
        tests=["tests"],
        databases={"sqlite": {}},
    ),
    Project(
        name="advanced-alchemy",
        sdist="advanced-alchemy==1.12.0",
        deps=[
            "aiosqlite",
            "attrs",
            "cattrs",
            "sqlmodel",
            "dogpile.cache",
            "pydantic-extra-types",
            "numpy",
            "cryptography",
            "pyotp",
            "rich-click",
            "fsspec",
            "pytest",
            "pytest-asyncio",
            "pytest-databases[postgres,oracle,cockroachdb,bigquery,spanner]",
            "pytest-lazy-fixtures",
            "pytest-mock",
            "pytest-click",
            "asgi-lifespan",
            "click",
            "time-machine",
            "fastapi",
            "litestar[cli]",
            "flask-sqlalchemy",
            "flask[async]",
            "sanic",
            "sanic-testing",
            "passlib",
            "argon2-cffi",
            "obstore",
            "pwdlib[argon2,bcrypt]",
            "typer",
        ],
        # the SQLite engines only: its other engines run in Docker containers
        tests=[
            "tests",
            "-m",
            "not (asyncmy or asyncpg or psycopg_async or psycopg_sync or oracledb_sync or "
            "oracledb_async or spanner or duckdb or mssql_sync or mssql_async or "
            "cockroachdb_sync or cockroachdb_async)",
        ],
        timeout=900,
        default=False,  # about 5 minutes per run on 2 CPUs: --only advanced-alchemy or --all
    ),
    Project(
        name="sqlalchemy-utils",
        sdist="sqlalchemy-utils==0.43.0",
        deps=[
            "pytest",
            "Pygments",
            "Jinja2",
            "docutils",
            "flexmock",
            "psycopg[binary]",
            "psycopg2-binary",
            "pg8000",
            "pytz",
            "python-dateutil",
            "Babel",
            "arrow",
            "pendulum",
            "intervals",
            "phonenumbers",
            "passlib",
            "colour",
            "furl",
            "cryptography",
        ],
        tests=["tests"],
        databases={
            # one run covers both: its SQLite tests and, with --pg, its PostgreSQL tests
            "sqlite+postgresql": {
                "SQLALCHEMY_UTILS_TEST_DB": "{pg_dbname}",
                "SQLALCHEMY_UTILS_TEST_POSTGRESQL_HOST": "{pg_host}",
                "SQLALCHEMY_UTILS_TEST_POSTGRESQL_USER": "{pg_user}",
            },
        },
    ),
]


def log(message: str) -> None:
    print(f"[field] {message}", flush=True)


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kwargs)


# -- sources and venvs ------------------------------------------------------------------------


def fetch_source(project: Project, local: dict[str, Path]) -> Path:
    """The project's source tree: a local path if given, else its sdist from PyPI, unpacked."""
    dest = WORK / "src" / project.name
    if project.name in local:
        path = local[project.name]
        if not (path / "HEAD").is_file() or (path / ".git").exists():
            return path
        # a bare git directory: its HEAD is unpacked once under field/.work/src
        if not (dest.is_dir() and any(dest.iterdir())):
            dest.mkdir(parents=True, exist_ok=True)
            tree = subprocess.run(
                ["git", "--git-dir", str(path), "archive", "HEAD"], check=True, capture_output=True
            )
            subprocess.run(["tar", "-x", "-C", str(dest)], input=tree.stdout, check=True)
        return dest
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    if project.sdist is None:
        raise LookupError(
            f"{project.name}: no sdist carries its tests; pass --src "
            f"{project.name}=PATH ({project.source_hint})"
        )
    downloads = WORK / "downloads" / project.name
    shutil.rmtree(downloads, ignore_errors=True)
    downloads.mkdir(parents=True)
    log(f"{project.name}: downloading the sdist {project.sdist}")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--dest",
            str(downloads),
            project.sdist,
        ]
    )
    archives = list(downloads.glob("*.tar.gz"))
    if len(archives) != 1:
        raise SystemExit(f"{project.name}: expected one sdist in {downloads}, got {archives}")
    unpack = WORK / "src" / f".{project.name}.tmp"
    shutil.rmtree(unpack, ignore_errors=True)
    with tarfile.open(archives[0]) as archive:
        archive.extractall(unpack, filter="data")
    (top,) = list(unpack.iterdir())
    shutil.rmtree(dest, ignore_errors=True)
    top.rename(dest)
    shutil.rmtree(unpack)
    return dest


def make_venv(project: Project, source: Path, package: Path) -> Path:
    """A venv with the test dependencies, the project and this repository (editable)."""
    venv = WORK / "venvs" / project.name
    python = venv / "bin" / "python"
    wanted = json.dumps(
        [
            project.deps,
            str(source),
            project.install_source,
            str(package),
            (package / "pyproject.toml").read_text(),
        ]
    )
    digest = hashlib.sha256(wanted.encode()).hexdigest()
    stamp = venv / ".field-installed"
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        return python
    log(f"{project.name}: building its venv")
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    targets = [*project.deps, "-e", f"{package}[redis]"]
    if project.install_source:
        targets.append(str(source))
    run([*pip, *targets])
    stamp.write_text(digest)
    return python


# -- runs -------------------------------------------------------------------------------------


def pg_values(pg: str | None) -> dict[str, str]:
    if not pg:
        return {"pg_dbname": "", "pg_host": "", "pg_user": ""}
    parts = urlsplit(pg)
    plain = urlunsplit(("postgresql", parts.netloc, parts.path, parts.query, ""))
    return {
        "pg_asyncpg": plain.replace("postgresql://", "postgresql+asyncpg://", 1),
        "pg_psycopg": plain.replace("postgresql://", "postgresql+psycopg://", 1),
        "pg_dbname": parts.path.lstrip("/"),
        "pg_host": parts.hostname or "127.0.0.1",
        "pg_user": parts.username or "postgres",
    }


def ini_file(source: Path) -> Path:
    """The project's own pytest configuration file, or an empty one."""
    for name in ("pytest.ini", ".pytest.ini"):
        if (source / name).is_file():
            return source / name
    pyproject = source / "pyproject.toml"
    if pyproject.is_file() and "[tool.pytest" in pyproject.read_text():
        return pyproject
    for name, section in (("tox.ini", "[pytest]"), ("setup.cfg", "[tool:pytest]")):
        if (source / name).is_file() and section in (source / name).read_text():
            return source / name
    empty = WORK / "empty-pytest.ini"
    empty.write_text("[pytest]\n")
    return empty


def run_suite(
    project: Project,
    python: Path,
    source: Path,
    database: str,
    db_env: dict[str, str],
    backend: str | None,
    extra_config: str,
) -> dict[str, Any]:
    """One pytest run of the project's suite; returns the plugin's JSON report."""
    label = backend.split(":")[0] if backend else "baseline"
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stem = f"{project.name}-{database}-{label}"
    report_path = logs / f"{stem}.json"
    report_path.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQLACACHE_")}
    env.update(db_env)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(source), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["SQLACACHE_FIELD_REPORT"] = str(report_path)
    # suites that start tools of their venv (coverage, alembic) find them first on PATH
    env["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])
    if backend:
        env["SQLACACHE_FIELD_BACKEND"] = backend
        env["SQLACACHE_FIELD_PREFIX"] = f"field-{uuid.uuid4().hex[:12]}"
        if extra_config:
            env["SQLACACHE_FIELD_CONFIG"] = extra_config
    cmd = [str(python), "-m", "pytest", "-p", "sqlacache_field_plugin", "-p", "no:cacheprovider"]
    # field/.work lies inside this repository: pin pytest's rootdir, ini file and conftest
    # search to the project, so this repository's own pytest configuration never applies
    cmd += ["--rootdir", str(source), "-c", str(ini_file(source)), "--confcutdir", str(source)]
    cmd += ["-q", "-rfE", "--tb=short", "-o", "addopts=", "--continue-on-collection-errors"]
    cmd += project.tests
    for name in project.mkdirs:
        (source / name).mkdir(exist_ok=True)
    started = time.monotonic()
    with open(logs / f"{stem}.log", "w", encoding="utf-8") as out:
        try:
            proc = subprocess.run(
                cmd, cwd=source, env=env, stdout=out, stderr=subprocess.STDOUT,
                timeout=project.timeout,
            )  # fmt: skip
            code: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.monotonic() - started
    if report_path.exists():
        report = json.loads(report_path.read_text())
    else:
        report = {"outcomes": {}, "failing": [], "missing_report": True}
    report["returncode"] = code
    report["wall_seconds"] = round(seconds, 1)
    report["log"] = str(logs / f"{stem}.log")
    return report


# -- the table --------------------------------------------------------------------------------


def bypass_reasons(stats: dict[str, Any], top: int = 3) -> str:
    reasons: Counter[str] = Counter()
    for ops in stats.get("models", {}).values():
        for counters in ops.values():
            reasons.update(counters.get("bypasses", {}))
    return ", ".join(f"{reason} {n}" for reason, n in reasons.most_common(top)) or "-"


def table(rows: list[dict[str, Any]]) -> str:
    header = [
        "project", "database", "backend", "passed", "failed", "errors", "skipped",
        "hits", "misses", "stores", "bypasses (top reasons)", "cache errors", "new failures",
    ]  # fmt: skip
    lines = [header]
    for row in rows:
        rep = row["report"]
        out = rep.get("outcomes", {})
        stats = rep.get("stats", {})
        totals = stats.get("totals", {})
        cached = row["backend"] != "baseline"
        lines.append(
            [
                row["project"],
                row["database"],
                row["backend"] + (" (timeout)" if rep.get("returncode") == "timeout" else ""),
                str(out.get("passed", "?")),
                str(out.get("failed", "?")),
                str(out.get("error", "?")),
                str(out.get("skipped", "?")),
                str(totals.get("hits", "-")) if cached else "-",
                str(totals.get("misses", "-")) if cached else "-",
                str(totals.get("stores", "-")) if cached else "-",
                (f"{totals.get('bypasses', 0)}: {bypass_reasons(stats)}" if cached else "-"),
                str(totals.get("errors", "-")) if cached else "-",
                str(len(row["new_failures"])) if cached else "-",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    rendered.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(rendered)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="project name (repeatable)")
    parser.add_argument("--all", action="store_true", help="also the slow projects")
    parser.add_argument(
        "--src", action="append", default=os.environ.get("FIELD_SRC", "").split(),
        help="NAME=PATH: a local source tree or bare git dir (env FIELD_SRC, space-separated)",
    )  # fmt: skip
    parser.add_argument(
        "--package", default=str(REPO),
        help="the sqlacache source tree installed editable into every venv (default: this one)",
    )  # fmt: skip
    parser.add_argument(
        "--backend", action="append", default=[], help="cached backends (default mem:// redis)"
    )
    parser.add_argument(
        "--redis", default=os.environ.get("FIELD_REDIS", "redis://127.0.0.1:6379/1")
    )
    parser.add_argument("--pg", default=os.environ.get("FIELD_PG", ""), help="postgresql://... URL")
    parser.add_argument(
        "--config", default=os.environ.get("SQLACACHE_FIELD_CONFIG", ""),
        help="JSON of extra configure() arguments for the cached runs, e.g. '{\"verify\": 1.0}'",
    )  # fmt: skip
    parser.add_argument("--json", default=str(WORK / "results.json"), help="write all results here")
    args = parser.parse_args(argv)

    local = {}
    for item in args.src:
        name, _, path = item.partition("=")
        local[name] = Path(path).resolve()
    backends = args.backend or ["mem://", args.redis]
    pg = pg_values(args.pg)
    projects = [
        p for p in PROJECTS if p.name in args.only or (not args.only and (p.default or args.all))
    ]
    unknown = set(args.only) - {p.name for p in PROJECTS}
    if unknown:
        raise SystemExit(
            f"unknown project(s) {sorted(unknown)}; known: {[p.name for p in PROJECTS]}"
        )

    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    for project in projects:
        try:
            source = fetch_source(project, local)
        except LookupError as exc:
            log(f"skipped: {exc}")
            continue
        python = make_venv(project, source, Path(args.package).resolve())
        for database, env_template in project.databases.items():
            if database in project.needs_pg and not args.pg:
                log(f"{project.name}/{database}: skipped (no --pg / FIELD_PG given)")
                continue
            db_env = {k: v.format(**pg) for k, v in env_template.items()}
            db_env = {k: v for k, v in db_env.items() if v}
            baseline_failing: set[str] = set()
            for backend in [None, *backends]:
                name = backend.split(":")[0] if backend else "baseline"
                log(f"{project.name}/{database}: running {name}")
                report = run_suite(project, python, source, database, db_env, backend, args.config)
                failing = set(report.get("failing", []))
                if backend is None:
                    baseline_failing = failing
                new = sorted(failing - baseline_failing) if backend else []
                rows.append(
                    {
                        "project": project.name,
                        "database": database,
                        "backend": name,
                        "report": report,
                        "new_failures": new,
                    }
                )
                out = report.get("outcomes", {})
                log(
                    f"  {out.get('passed', '?')} passed, {out.get('failed', '?')} failed, "
                    f"{out.get('error', '?')} errors in {report['wall_seconds']} s"
                    + (f"; {len(new)} new failures" if backend else "")
                )
    elapsed = time.monotonic() - started

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    print()
    print(table(rows))
    print()
    for row in rows:
        if row["new_failures"]:
            print(f"{row['project']} / {row['database']} / {row['backend']}: pass without the")
            print(f"cache, fail with it ({row['report']['log']}):")
            for nodeid in row["new_failures"]:
                hits = row["report"].get("failing_tests_cache", {}).get(nodeid, {})
                print(
                    f"  {nodeid}  (hits {hits.get('hits', '?')}, misses {hits.get('misses', '?')})"
                )
        rep = row["report"]
        for message, count in rep.get("bind_errors", {}).items():
            print(f"{row['project']} / {row['backend']}: bind error x{count}: {message}")
    print(f"\nfield test finished in {elapsed / 60:.1f} min; results in {args.json}")
    cached = [r for r in rows if r["backend"] != "baseline"]
    no_hits = [r for r in cached if not r["report"].get("stats", {}).get("totals", {}).get("hits")]
    regressions = sum(len(r["new_failures"]) for r in rows)
    if no_hits:
        print("cached runs with zero hits (they prove nothing):", [
            f"{r['project']}/{r['database']}/{r['backend']}" for r in no_hits
        ])  # fmt: skip
    return 1 if regressions or no_hits else 0


if __name__ == "__main__":
    sys.exit(main())
