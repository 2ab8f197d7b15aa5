"""tests/test_example_app.py on Redis + PostgreSQL."""

from tests.test_example_app import *  # noqa: F403
