"""Dead letters with their reason: bad input goes here at once instead of being retried until maxReceiveCount.

The original body is kept so an operator can fix and redrive it; the reason travels in message attributes
(``Reason``, ``ErrorDetail``, ``Source``, ``OriginalMessageId``) so it can be listed without parsing, and
``OccurredAt`` (ISO 8601, ms) says when the message occurred as the function ordered it: the dead letter itself is
sent later (a change waits up to ``UNKNOWN_USER_SECONDS`` for its user), so its ``SentTimestamp`` would order it
after changes that came after it (``telematics-reg dlq redrive`` stamps this time into what it sends back).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from telematics_reg.errors import FieldError
from telematics_reg.occurred import iso_ms

# SQS allows 256 KiB per message including attributes; a reason is a summary, not a dump.
_MAX_DETAIL_CHARS = 2000
# Characters SQS refuses in a body or attribute (and a lone surrogate cannot even be encoded to send).
_NOT_FOR_SQS = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def sqs_text(text: str) -> str:
    """``text`` with each character SQS refuses written as a JSON escape (``\\uffff``).

    Such a character can only stand inside a string of a JSON body (a field name a message made up, say), so
    a JSON body keeps its meaning; without this the dead letter could not be sent and the message would be
    retried until SQS moved it, without its reason.
    """
    return _NOT_FOR_SQS.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


@dataclass(frozen=True)
class DeadLetter:
    body: str
    reason: str
    source: str
    errors: list[FieldError] = field(default_factory=list)
    original_message_id: str | None = None
    #: When the message occurred (epoch ms), as it was ordered: its ``OccurredAt``, else its event's ``time`` or its
    #: first send. ``None`` when not known (a body that is not a message at all).
    occurred_at_ms: int | None = None

    def detail(self) -> str:
        text = json.dumps([e.as_dict() for e in self.errors], ensure_ascii=False)
        return text if len(text) <= _MAX_DETAIL_CHARS else text[: _MAX_DETAIL_CHARS - 3] + "..."


class DeadLetterSink(Protocol):
    """Where messages that must not be retried go, with their reason."""

    def send(self, letter: DeadLetter) -> None:
        """Store ``letter``; raises when it could not (the caller then leaves the message to be retried)."""
        ...


class SqsDeadLetters:
    """Sends dead letters to an SQS queue (the same DLQ the source queue redrives to)."""

    def __init__(self, client: Any, *, queue_url: str) -> None:
        self._client = client
        self._queue_url = queue_url

    def send(self, letter: DeadLetter) -> None:
        attributes: dict[str, dict[str, str]] = {
            "Reason": {"DataType": "String", "StringValue": letter.reason},
            "Source": {"DataType": "String", "StringValue": letter.source},
            "ErrorDetail": {"DataType": "String", "StringValue": sqs_text(letter.detail())},
        }
        if letter.original_message_id:
            attributes["OriginalMessageId"] = {
                "DataType": "String",
                "StringValue": sqs_text(letter.original_message_id),
            }
        if letter.occurred_at_ms is not None:
            with contextlib.suppress(ValueError, OverflowError, OSError):  # a time past the calendar: not said
                attributes["OccurredAt"] = {"DataType": "String", "StringValue": iso_ms(letter.occurred_at_ms)}
        self._client.send_message(
            QueueUrl=self._queue_url, MessageBody=sqs_text(letter.body) or "(empty)", MessageAttributes=attributes
        )
