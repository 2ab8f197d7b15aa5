"""tests/test_example_cashews.py on Redis + PostgreSQL."""

from tests.test_example_cashews import *  # noqa: F403
