"""The vendor's Login limit: so many Login calls a minute per source address, then a block of Login only.

The vendor documents (admin-auth.md, error-handling.md): "POST /v1/Auth/Login is rate-limited to 5 calls per
minute per IP - exceeding this triggers a 1-hour block on that IP", user and admin Logins together. Modelled
here as a sliding window of 60 s over the Logins an address made (every one that reached the server, whatever
its answer); the call that would exceed the limit is answered 429 and begins the block; every Login from
that address is answered 429 with ``Retry-After`` (the seconds left) until the block ends. Refused calls do not
count towards the window. Other calls are never blocked.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 60.0
VENDOR_LIMIT_PER_MINUTE = 5
VENDOR_BLOCK_S = 3600


@dataclass(frozen=True)
class Refusal:
    """A Login refused: ``retry_after_s`` until the block ends; ``began`` when this call started the block."""

    retry_after_s: int
    began: bool


class LoginLimiter:
    """Thread-safe per-address window and blocks; the limit itself is passed in on every call (run-time config)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._calls: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}
        self.refused = 0
        self.blocks_begun = 0

    def admit(self, address: str, limit_per_minute: int, block_s: int) -> Refusal | None:
        """Count one Login from ``address``; None when it may proceed, else why it is refused.

        ``limit_per_minute == 0`` switches the limit off (no call is counted or refused).
        """
        if limit_per_minute <= 0:
            return None
        with self._lock:
            now = self._clock()
            until = self._blocked_until.get(address)
            if until is not None:
                if now < until:
                    self.refused += 1
                    return Refusal(math.ceil(until - now), began=False)
                del self._blocked_until[address]
            calls = self._calls.setdefault(address, deque())
            while calls and calls[0] <= now - WINDOW_S:
                calls.popleft()
            if len(calls) >= limit_per_minute:
                self._blocked_until[address] = now + block_s
                calls.clear()
                self.refused += 1
                self.blocks_begun += 1
                return Refusal(block_s, began=True)
            calls.append(now)
            return None

    def blocked_addresses(self) -> list[str]:
        with self._lock:
            now = self._clock()
            return sorted(address for address, until in self._blocked_until.items() if until > now)

    def reset(self) -> None:
        """Lift every block and forget every window and count."""
        with self._lock:
            self._calls.clear()
            self._blocked_until.clear()
            self.refused = 0
            self.blocks_begun = 0
