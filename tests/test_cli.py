"""The command line never reports success for what it did not do, and fails in one clear line.

No services here: an unreachable Redis is a loopback port nobody listens on. The invalidations that
reach a real Redis are in integration/test_cli.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sqlacache import cli
from tests.models import Seat, User

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("redis")


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SQLACACHE_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sqlacache", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    for name in cli.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


def test_without_backend_the_command_says_how_to_name_one(capsys):
    assert cli.main(["invalidate", "users"]) == 2
    err = capsys.readouterr().err
    assert "--backend" in err and "SQLACACHE_BACKEND" in err and "mem://" in err


def test_mem_backend_is_refused_because_it_lives_in_each_process(capsys):
    assert cli.main(["--backend", "mem://", "invalidate-all"]) == 2
    assert "inside each application process" in capsys.readouterr().err


def test_unreachable_redis_exits_1_and_says_nothing_was_invalidated(capsys):
    url = closed_port_url()
    assert cli.main(["--backend", url, "invalidate", "users", "--pk", "1"]) == 1
    err = capsys.readouterr().err
    assert "nothing was invalidated" in err and "unreachable" in err
    assert cli.main(["--backend", url, "invalidate-all"]) == 1
    assert "nothing was invalidated" in capsys.readouterr().err


def test_options_are_accepted_after_the_command(capsys):
    url = closed_port_url()
    assert cli.main(["invalidate-all", "--backend", url, "--prefix", "app"]) == 1
    assert "nothing was invalidated" in capsys.readouterr().err
    args = cli._parser().parse_args(["--prefix", "a", "stats", "--backend", url])
    assert (args.prefix, args.backend) == ("a", url)


def test_environment_variables_name_the_backend_and_prefix(monkeypatch):
    monkeypatch.setenv("SQLACACHE_BACKEND", "redis://example:6379/2")
    monkeypatch.setenv("SQLACACHE_PREFIX", "app")
    args = cli._parser().parse_args(["stats"])
    assert (args.backend, args.prefix) == ("redis://example:6379/2", "app")
    args = cli._parser().parse_args(["stats", "--prefix", "other"])
    assert args.prefix == "other"


def test_app_that_does_not_import_fails_without_traceback():
    done = run_cli("--app", "no_such_package.cache:cache", "invalidate-all")
    assert done.returncode == 2
    assert "cannot import 'no_such_package.cache'" in done.stderr
    assert "Traceback" not in done.stderr


def test_app_naming_something_that_is_not_a_cache_fails_without_traceback():
    done = run_cli("invalidate-all", "--app", "tests.models:User")
    assert done.returncode == 2
    assert "tests.models.User is the class User, not a sqlacache cache" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_cli("invalidate-all", "--app", "tests.models")  # attribute defaults to "cache"
    assert done.returncode == 2 and "tests.models.cache is nothing" in done.stderr


def test_bad_backend_url_fails_in_one_line():
    done = run_cli("--backend", "memcached://x", "stats")
    assert done.returncode == 2 and "unknown backend scheme" in done.stderr
    assert "Traceback" not in done.stderr


def test_primary_keys_follow_the_column_type_where_the_models_are_known():
    user_pk = cli._pk_columns(User)
    assert cli._parse_pks(["007"], user_pk) == [7]
    seat_pk = cli._pk_columns(Seat)
    assert cli._parse_pks(["007,3"], seat_pk) == [("007", 3)]  # String column: stays "007"
    with pytest.raises(cli.CommandError, match="primary key is"):
        cli._parse_pks(["7"], seat_pk)
    with pytest.raises(cli.CommandError, match="not a valid int"):
        cli._parse_pks(["abc"], user_pk)


def test_primary_keys_without_models_are_kept_as_given_and_integers_also_as_ints():
    assert cli._parse_pks(["abc"], None) == ["abc"]
    assert cli._parse_pks(["007"], None) == ["007", 7]
    assert cli._parse_pks(["A,3"], None) == [("A", "3"), ("A", 3)]


def test_unknown_table_suggestion_names_the_close_match():
    error = cli._unknown("user", ["users", "orders"], "app")
    assert error.status == 2 and "did you mean 'users'" in str(error)
    assert "nothing was invalidated" in str(error)


def test_help_has_examples_and_environment(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "--pk 42" in out
    for name in cli.ENVIRONMENT:
        assert name in out


def test_demo_runs_from_the_command_line():
    done = run_cli("demo")
    assert done.returncode == 0, done.stderr
    assert "hits" in done.stdout and "invalidations" in done.stdout
