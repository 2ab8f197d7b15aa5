"""tests/test_verify.py on Redis + PostgreSQL."""

from tests.test_verify import *  # noqa: F403
