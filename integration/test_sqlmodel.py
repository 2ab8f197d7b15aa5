"""tests/test_sqlmodel.py on Redis + PostgreSQL."""

from tests.test_sqlmodel import *  # noqa: F403
