"""tests/test_field_findings.py on Redis + PostgreSQL, and the PostgreSQL-only findings."""

from tests.test_field_findings import *  # noqa: F403
