"""tests/test_quickstart.py on Redis + PostgreSQL."""

from tests.test_quickstart import *  # noqa: F403
