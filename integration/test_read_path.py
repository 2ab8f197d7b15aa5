"""tests/test_read_path.py on Redis + PostgreSQL."""

from tests.test_read_path import *  # noqa: F403
