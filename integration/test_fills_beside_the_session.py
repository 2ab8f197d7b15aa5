"""tests/test_fills_beside_the_session.py on Redis + PostgreSQL."""

from tests.test_fills_beside_the_session import *  # noqa: F403
