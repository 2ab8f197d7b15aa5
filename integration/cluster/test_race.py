"""tests/test_race.py on Redis Cluster + PostgreSQL."""

from tests.test_race import *  # noqa: F403
