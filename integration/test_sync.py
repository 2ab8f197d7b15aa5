"""tests/test_sync.py on Redis + PostgreSQL."""

from tests.test_sync import *  # noqa: F403
