"""tests/test_reads.py on Redis + PostgreSQL."""

from tests.test_reads import *  # noqa: F403
