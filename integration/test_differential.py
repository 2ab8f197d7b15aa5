"""tests/test_differential.py on Redis + PostgreSQL."""

from tests.test_differential import *  # noqa: F403
