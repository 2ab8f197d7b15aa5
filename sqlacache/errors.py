"""The exceptions sqlacache raises to its callers.

Cache faults never reach application reads or commits; these are for configuration mistakes
and for the explicit management calls (`invalidate`, `invalidate_all`) that must report an outage.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CacheError(Exception):
    """Base class of every sqlacache exception."""


class ConfigError(CacheError, ValueError):
    """The configuration, or an argument of a management call, is invalid; the message names it."""


class TransportError(CacheError):
    """The cache backend could not be reached for an explicit management call.

    The invalidation that failed stays queued and is delivered when the backend answers again.
    """


class CacheUnavailable(CacheError):
    """Internal: the backend failed or the circuit breaker is open; the caller falls back to SQL."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """ "; did you mean 'x'?" for the closest of `choices`, or "" (error messages name the fix)."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
