"""The README's Quickstart runs as written: examples/quickstart.py is run as a script, and the README
shows exactly its code. integration/test_quickstart.py runs it on PostgreSQL + Redis."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.fixtures import Stack

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.py"


def quickstart_code() -> str:
    text = QUICKSTART.read_text()
    return text.split("# --- quickstart ---\n", 1)[1].split("# --- end ---", 1)[0].strip()


def test_readme_shows_the_quickstart_file_verbatim():
    assert quickstart_code() in (ROOT / "README.md").read_text()


def test_quickstart_runs_as_written(stack: Stack, tmp_path: Path):
    env = {**os.environ, "DATABASE_URL": stack.db_url, "CACHE_URL": stack.backend}
    if stack.db_url.startswith("sqlite"):
        env.pop("DATABASE_URL")  # the file's own default: a SQLite file in the working directory
    done = subprocess.run(
        [sys.executable, str(QUICKSTART)],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    match = re.fullmatch(r"Alice; 1 active; (\d+) hits, (\d+) misses\n", done.stdout)
    assert match, done.stdout
    assert int(match.group(1)) >= 1, "the repeat get must be a hit"
