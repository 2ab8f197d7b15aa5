"""Shared fixtures for tests/ (mem:// + SQLite) and integration/ (Redis + PostgreSQL)."""

pytest_plugins = ["tests.fixtures"]
