"""Unit tests run on mem:// and SQLite: no services needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures import Stack


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    return Stack(
        name="memory", db_url=f"sqlite+aiosqlite:///{tmp_path}/test.sqlite", backend="mem://"
    )
