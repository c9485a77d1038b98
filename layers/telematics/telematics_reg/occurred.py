"""``OccurredAt``: when a registration or a lifecycle change occurred, which orders a user's changes (README "User
lifecycle"). A message without it is ordered by when it was sent, so whatever sends one again later (``load`` on a
re-run, ``dlq redrive``, a dead letter's body) must say when it first occurred, or it would look newer than it is.
"""

from __future__ import annotations

import json
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
        stamp = iso_ms(epoch_ms)
    except (ValueError, RecursionError, OverflowError, OSError):
        return body
    if not isinstance(document, dict) or has_occurred_at(document):
        return body
    document = {k: v for k, v in document.items() if not (isinstance(k, str) and k.lower() == _KEY)}
    document["OccurredAt"] = stamp
    return json.dumps(document, ensure_ascii=False)
