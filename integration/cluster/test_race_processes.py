"""integration/test_race_processes.py on Redis Cluster + PostgreSQL."""

from integration.test_race_processes import *  # noqa: F403
