"""``OccurredAt``: when a registration or a lifecycle change occurred, which orders a user's changes (README "User
lifecycle"). A message without it is ordered by when it was sent, so anything that sends one again later (``load``
on a re-run, ``dlq redrive``) must say when it first occurred, or it would look newer than it is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

_KEY = "occurredat"


def iso_ms(epoch_ms: int) -> str:
    """``2026-11-21T10:15:00.123Z``: the ``OccurredAt`` form of the contract.

    Example
    -------
    >>> iso_ms(1763719200123)
    '2025-11-21T10:00:00.123Z'
    """
    moment = datetime.fromtimestamp(epoch_ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def has_occurred_at(document: dict[str, object]) -> bool:
    return any(isinstance(k, str) and k.lower() == _KEY and v not in (None, "") for k, v in document.items())


def stamp_occurred_at(body: str, epoch_ms: int) -> str:
    """``body`` (a JSON object) with ``OccurredAt`` set to ``epoch_ms``, unless it gives one; other bodies as they are.

    Example
    -------
    >>> stamp_occurred_at('{"ClientId": "c-1"}', 1763719200123)
    '{"ClientId": "c-1", "OccurredAt": "2025-11-21T10:00:00.123Z"}'
    >>> stamp_occurred_at('{"ClientId": "c-1", "occurredAt": "2026-01-01T00:00:00.000Z"}', 1763719200123)
    '{"ClientId": "c-1", "occurredAt": "2026-01-01T00:00:00.000Z"}'
    """
    try:
        document = json.loads(body)
    except ValueError:
        return body
    if not isinstance(document, dict) or has_occurred_at(document):
        return body
    document = {k: v for k, v in document.items() if not (isinstance(k, str) and k.lower() == _KEY)}
    document["OccurredAt"] = iso_ms(epoch_ms)
    return json.dumps(document, ensure_ascii=False)


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
