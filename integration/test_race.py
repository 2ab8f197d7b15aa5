"""tests/test_race.py on Redis + PostgreSQL."""

from tests.test_race import *  # noqa: F403
