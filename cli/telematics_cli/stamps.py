"""``OccurredAt``: when a registration or a lifecycle change occurred, which orders a user's changes (README "User
lifecycle"). A message without it is ordered by when it was sent, so anything that sends one again later (``load``
on a re-run, ``dlq redrive``) must say when it first occurred, or it would look newer than it is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from telematics_reg.occurred import has_occurred_at, iso_ms, stamp_occurred_at

__all__ = ["OccurredAtStamp", "has_occurred_at", "iso_ms", "stamp_occurred_at"]


class OccurredAtStamp:
    """``OccurredAt`` values that follow the clock but strictly increase in the order they are asked for.

    ``load`` stamps its lifecycle rows in file order with it, so two changes of one user in one file are never
    equal (an equal time is dropped as a duplicate) and apply in the file's order, however the batches are sent.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._last = 0

    def next_ms(self) -> int:
        self._last = max(int(self._clock() * 1000), self._last + 1)
        return self._last

    def stamp(self, body: str) -> str:
        """``body`` with ``OccurredAt`` = :meth:`next_ms`, unless it gives one itself (kept: a re-send of the row is
        then a duplicate of the first, not a newer change)."""
        try:
            document = json.loads(body)
        except ValueError:
            return body
        if not isinstance(document, dict) or has_occurred_at(document):
            return body
        return stamp_occurred_at(body, self.next_ms())
