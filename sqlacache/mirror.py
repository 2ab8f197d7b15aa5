"""The in-process tier's mirror of the current version tokens, fed by the invalidation channel
and by this process's own bumps; when it may be trusted is argued in `local_tier`'s docstring.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

#: how many delivered (key, token) pairs the mirror remembers (see `Mirror.apply_own`)
DELIVERED_MEMORY = 10_000
#: message kinds on the invalidation channel (first byte)
VERSIONS = b"v"
TAGS = b"t"


@dataclass(frozen=True)
class Mark:
    """Where the mirror stood before a read or a bump was sent: (subscription epoch, sequence)."""

    epoch: int
    seq: int


class Mirror:
    """The current version tokens as the pub/sub stream says, with their change sequence."""

    def __init__(self, heartbeat: float, limit: int) -> None:
        self.heartbeat = heartbeat
        self.limit = limit
        self.lock = threading.Lock()
        self.tokens: OrderedDict[str, tuple[bytes | None, int]] = OrderedDict()
        #: the last (key, token) pairs the stream delivered: an own bump whose reply comes back
        #: after its own message (and maybe newer ones) finds it here
        self.delivered: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        #: own bumps whose message is still due: key -> (token, when applied)
        self.pending: dict[str, tuple[bytes, float]] = {}
        self.seq = 0
        self.epoch = 0
        self.live = False
        self.confirmed_at = float("-inf")
        self.evicted_seq = 0
        self.drops = 0

    # -- state ------------------------------------------------------------------------------------

    def fresh(self) -> bool:
        return self.live and time.monotonic() - self.confirmed_at <= self.heartbeat

    def mark(self) -> Mark | None:
        """Taken before a read or a bump is sent; None if the subscription is not live."""
        with self.lock:
            return Mark(self.epoch, self.seq) if self.live else None

    def go_live(self, complete_since: float) -> int:
        """A subscription was confirmed; the stream is complete from `complete_since` on."""
        with self.lock:
            self.epoch += 1
            self.live = True
            self.confirmed_at = complete_since
            return self.epoch

    def drop(self) -> None:
        """Forget everything: messages may have been lost."""
        with self.lock:
            if self.live:
                self.drops += 1
            self.epoch += 1
            self.live = False
            self.tokens.clear()
            self.pending.clear()
            self.delivered.clear()
            self.confirmed_at = float("-inf")

    def drop_tokens(self) -> None:
        """Forget every token but stay subscribed (e.g. after redelivering lost invalidations).

        Pending own bumps stay pending: their messages are still due, and older messages for
        those keys must still be ignored.
        """
        with self.lock:
            self.seq += 1
            self.evicted_seq = self.seq  # refuses learns from reads sent before now
            self.tokens.clear()

    def confirm(self, epoch: int, sent_at: float) -> None:
        """A heartbeat sent at `sent_at` came back: every bump executed before it is applied."""
        with self.lock:
            if epoch != self.epoch:
                return
            if sent_at > self.confirmed_at:
                self.confirmed_at = sent_at
            # An own bump applied before this heartbeat was sent had its message delivered
            # before the heartbeat: if it is still pending, the message came before the bump's
            # reply and was overwritten. The key stays unknown (None) until a read learns it.
            stale = [k for k, (_, at) in self.pending.items() if at < sent_at]
            for key in stale:
                del self.pending[key]

    # -- reads ------------------------------------------------------------------------------------

    def matches(self, keys: Sequence[str], tokens: Sequence[bytes]) -> bool:
        get = self.tokens.get
        with self.lock:
            for key, token in zip(keys, tokens, strict=True):
                known = get(key)
                if known is None or known[0] != token:
                    return False
        return True

    def learn(self, mark: Mark, keys: Sequence[str], values: Sequence[bytes | None]) -> None:
        """Versions read from Redis after `mark`: kept where no newer change can be missed."""
        with self.lock:
            if not self.live or mark.epoch != self.epoch:
                return
            for key, value in zip(keys, values, strict=True):
                if value is None or key in self.pending:
                    continue
                known = self.tokens.get(key)
                if known is None:
                    if self.evicted_seq > mark.seq:
                        continue
                elif known[1] > mark.seq:
                    continue  # changed on the stream since the read was sent
                self._set(key, value)

    # -- changes ----------------------------------------------------------------------------------

    def apply(self, epoch: int, token: bytes, keys: Sequence[str]) -> None:
        """A bump from the stream."""
        with self.lock:
            if epoch != self.epoch:
                return
            pending = self.pending
            delivered = self.delivered
            for key in keys:
                delivered[(key, token)] = None
                if len(delivered) > DELIVERED_MEMORY:
                    delivered.popitem(last=False)
                if key in pending:
                    if pending[key][0] != token:
                        continue  # older than this process's own bump, already applied
                    del pending[key]
                self._set(key, token)

    def apply_own(self, mark: Mark | None, token: bytes | None, keys: Sequence[str]) -> None:
        """This process bumped `keys` (token None: outcome unknown) and is about to return."""
        now = time.monotonic()
        with self.lock:
            expect = (
                token is not None and mark is not None and self.live and mark.epoch == self.epoch
            )
            for key in keys:
                known = self.tokens.get(key)
                if expect and (
                    (known is not None and known[0] == token) or (key, token) in self.delivered
                ):
                    # its own message came first: the key is as current as the stream
                    continue
                self._set(key, None)
                if expect:
                    assert token is not None
                    self.pending[key] = (token, now)
                else:
                    self.pending.pop(key, None)

    def _set(self, key: str, token: bytes | None) -> None:
        self.seq += 1
        tokens = self.tokens
        tokens[key] = (token, self.seq)
        tokens.move_to_end(key)
        while len(tokens) > self.limit:
            _, (_, seq) = tokens.popitem(last=False)
            if seq > self.evicted_seq:
                self.evicted_seq = seq
