"""tests/test_reads.py on Redis Cluster + PostgreSQL."""

from tests.test_reads import *  # noqa: F403
