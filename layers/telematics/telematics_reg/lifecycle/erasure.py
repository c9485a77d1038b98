"""Erasure reaches the dead letters: after a deletion, no dead letter of that user remains.

The dead-letter queues keep whole message bodies (so an operator can fix and redrive them), and a registration or
an update body holds the user's profile. A deletion therefore removes every letter that names the user (its
``ClientId`` with its ``Instance``, wherever the body nests it: a queue message, an EventBridge event, a Lambda
on-failure record). SQS cannot delete by content, so each queue is read through: every message is received, the
user's are deleted, the others made visible again at once.

A message in flight while the queue is read (an operator listing the DLQ, another erasure reading it) cannot be
seen; the erasure then reports itself incomplete and the deletion's message is retried, which reads the queues
again (the deletion itself is already final).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from telematics_reg.errors import TelematicsError

_CLIENT_KEYS = frozenset({"clientid", "client_id"})


class ErasureIncompleteError(TelematicsError):
    """Some dead letters could not be read (in flight elsewhere): retry the erasure."""


def names_user(body: str, instance: str, client_id: str) -> bool:
    """Whether a message body names the user (``ClientId`` and ``Instance``, default ``default``), at any depth.

    Example
    -------
    >>> names_user('{"detail": {"clientId": "c-1", "FirstName": "Ada"}}', "default", "c-1")
    True
    >>> names_user('{"ClientId": "c-1", "Instance": "eu"}', "default", "c-1")
    False
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return _names(document, instance, client_id, depth=0)


def _names(value: Any, instance: str, client_id: str, depth: int) -> bool:
    if depth > 8:
        return False
    if isinstance(value, dict):
        lowered = {k.lower(): v for k, v in value.items() if isinstance(k, str)}
        ids = [v for k, v in lowered.items() if k in _CLIENT_KEYS]
        flags = lowered.get("userfields")
        if isinstance(flags, dict):
            ids += [v for k, v in flags.items() if isinstance(k, str) and k.lower() in _CLIENT_KEYS]
        if client_id in ids and str(lowered.get("instance") or "default") == instance:
            return True
        return any(_names(v, instance, client_id, depth + 1) for v in value.values())
    if isinstance(value, list):
        return any(_names(v, instance, client_id, depth + 1) for v in value)
    if isinstance(value, str) and client_id in value and value[:1] == "{":
        # A body nested as a JSON string (an SQS record's "body" inside a Lambda failure record).
        return names_user(value, instance, client_id)
    return False


class DeadLetterEraser(Protocol):
    def erase(self, instance: str, client_id: str) -> int:
        """Remove the user's dead letters; returns how many. Raises :class:`ErasureIncompleteError`."""
        ...


class SqsDeadLetterEraser:
    """Reads every dead-letter queue through and deletes the user's letters."""

    def __init__(self, client: Any, *, queue_urls: Sequence[str], hold_seconds: int = 30) -> None:
        self._client = client
        self._queue_urls = [url for url in queue_urls if url]
        self._hold = hold_seconds

    def erase(self, instance: str, client_id: str) -> int:
        removed = 0
        incomplete = False
        for url in self._queue_urls:
            count, complete = self._erase_in(url, instance, client_id)
            removed += count
            incomplete = incomplete or not complete
        if incomplete:
            raise ErasureIncompleteError(f"{removed} dead letters removed; some were in flight: retry")
        return removed

    def _erase_in(self, url: str, instance: str, client_id: str) -> tuple[int, bool]:
        removed = 0
        held: list[str] = []
        try:
            while True:
                response = self._client.receive_message(
                    QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=self._hold, WaitTimeSeconds=0
                )
                messages = response.get("Messages", [])
                if not messages:
                    break
                for message in messages:
                    if names_user(message.get("Body", ""), instance, client_id):
                        self._client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
                        removed += 1
                    else:
                        held.append(message["ReceiptHandle"])
        finally:
            for start in range(0, len(held), 10):
                self._client.change_message_visibility_batch(
                    QueueUrl=url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": 0}
                        for i, handle in enumerate(held[start : start + 10])
                    ],
                )
        attributes = self._client.get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"]
        ).get("Attributes", {})
        return removed, int(attributes.get("ApproximateNumberOfMessagesNotVisible", "0")) == 0
