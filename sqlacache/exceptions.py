"""Upstream 0.1.x's import path for the exceptions: `from sqlacache.exceptions import ConfigError`."""

from .errors import CacheError, ConfigError, TransportError

__all__ = ["CacheError", "ConfigError", "TransportError"]
