"""tests/test_engines.py on Redis + PostgreSQL."""

from tests.test_engines import *  # noqa: F403
