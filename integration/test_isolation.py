"""tests/test_isolation.py on Redis + PostgreSQL."""

from tests.test_isolation import *  # noqa: F403
