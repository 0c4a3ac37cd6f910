"""Freshness: a nonce is accepted once, and only within its window.

A verifier that did not check the quote's nonce accepted replayed quotes (Veraison services #427). Here
the verifier issues every nonce itself and remembers when; a quote is fresh only if it answers a nonce
this verifier issued, not yet answered, and not older than the window. Memory is bounded: beyond
`capacity` outstanding nonces the oldest is forgotten, and a quote answering a forgotten nonce is refused
as unknown (failing closed). Time is injected (`clock`) so tests run on a frozen clock.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from trustcap.evidence import failure as fid
from trustcap.evidence.failure import Failure, Severity

__all__ = ["NONCE_LEN", "NonceRegistry"]

NONCE_LEN = 32


class NonceRegistry:
    """The nonces one verifier has sent; `check` peeks, `consume` accepts a nonce exactly once."""

    def __init__(
        self,
        window_seconds: float,
        *,
        capacity: int = 4096,
        clock: Callable[[], float] = time.time,
        token: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if window_seconds <= 0 or capacity <= 0:
            raise ValueError("window and capacity must be positive")
        self.window = float(window_seconds)
        self.capacity = capacity
        self._clock = clock
        self._token = token
        self._issued: OrderedDict[bytes, float] = OrderedDict()
        self._used: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._issued) + len(self._used)

    def _expire(self, now: float) -> None:
        for table in (self._issued, self._used):
            while table and next(iter(table.values())) + self.window < now:
                table.popitem(last=False)

    def issue(self) -> bytes:
        """A fresh random nonce, remembered with its issue time."""
        now = self._clock()
        self._expire(now)
        nonce = self._token(NONCE_LEN)
        self._issued[nonce] = now
        while len(self._issued) > self.capacity:
            self._issued.popitem(last=False)
        return nonce

    def check(self, nonce: bytes) -> Failure | None:
        """The reason `nonce` would be refused now, or None; does not consume it."""
        now = self._clock()
        nonce = bytes(nonce)
        issued = self._issued.get(nonce)
        if issued is None:
            if nonce in self._used:
                return Failure("nonce", fid.NONCE_REPLAYED, Severity.CRITICAL, "nonce was already answered once")
            return Failure(
                "nonce", fid.NONCE_UNKNOWN, Severity.CRITICAL, "nonce was not issued by this verifier (or has expired)"
            )
        if issued + self.window < now:
            return Failure(
                "nonce", fid.NONCE_EXPIRED, Severity.MEDIUM, f"nonce is older than the {self.window:g} s window"
            )
        return None

    def consume(self, nonce: bytes) -> Failure | None:
        """Accept `nonce` once: None if it was fresh (and is now used), else the reason it is refused."""
        failure = self.check(nonce)
        if failure is not None:
            return failure
        nonce = bytes(nonce)
        issued = self._issued.pop(nonce)
        self._used[nonce] = issued
        while len(self._used) > self.capacity:
            self._used.popitem(last=False)
        return None
