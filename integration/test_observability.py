"""tests/test_observability.py on Redis + PostgreSQL."""

from tests.test_observability import *  # noqa: F403
