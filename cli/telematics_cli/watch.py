"""``--wait``: what became of each sent registration, instead of "sent".

Every row ends in one of three places (README, "No lost registrations"), and each is visible without the logs:

* **registered** / **duplicate**: the user is stored under its (Instance, ClientId) (the ``ByClient`` index), or
  every chunk of a bulk request is done (its ``BULK#`` progress item). *duplicate* means the ClientId was already
  stored before the row was sent, or an earlier row of the same send named it: the service answered with the
  existing user and made no second one;
* **dead-lettered**, with the reason: a letter in the registration or signup dead-letter queue whose original
  message id (our ``OriginalMessageId`` attribute, the SQS message id of a message SQS redrove, or the event id of
  a Lambda on-failure record) is the row's. The queues are peeked: nothing is removed;
* **pending** when the timeout ends first: still queued, or being retried.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

from telematics_cli.dlq import QUEUES, Peek, classify
from telematics_cli.target import Target
from telematics_reg.store import bulk_pk, client_key

Status = Literal["registered", "duplicate", "dead-lettered", "pending"]
WATCHED_QUEUES: Final = ("registration", "signup")
_FINISHED_CHUNK: Final = "DONE"


@dataclass
class SentRow:
    """One message sent: its id (SQS message id, or the signup event's id) and what it asked for."""

    label: str
    message_id: str
    instance: str = "default"
    client_id: str | None = None
    request_id: str | None = None
    quantity: int = 0
    #: The ClientId was stored before this row was sent (or an earlier row of the same send had it).
    existed: bool = False
    status: Status = "pending"
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "row": self.label,
            "message_id": self.message_id,
            "client_id": self.client_id,
            "request_id": self.request_id,
            "status": self.status,
            "detail": self.detail,
        }


class RegistrationWatch:
    """Waits for the outcome of sent rows (see the module docstring)."""

    def __init__(
        self,
        target: Target,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._target = target
        self._dynamodb = target.client("dynamodb")
        self._sqs = target.client("sqs")
        self._table = target.output("TokensTableName")
        self._sleep = sleep
        self._clock = clock
        self._named: set[tuple[str, str]] = set()

    def _device_token(self, instance: str, client_id: str) -> str | None:
        items = self._dynamodb.query(
            TableName=self._table,
            IndexName="ByClient",
            KeyConditionExpression="ClientKey = :k",
            ExpressionAttributeValues={":k": {"S": client_key(instance, client_id)}},
            Limit=1,
        ).get("Items", [])
        return str(items[0]["DeviceToken"]["S"]) if items else None

    def before_send(self, rows: Iterable[SentRow]) -> None:
        """Note, before the rows are sent, which ClientIds are already stored (their rows are duplicates)."""
        for row in rows:
            if row.client_id is None:
                continue
            key = (row.instance, row.client_id)
            row.existed = key in self._named or self._device_token(*key) is not None
            self._named.add(key)

    def _user_done(self, row: SentRow) -> bool:
        assert row.client_id is not None
        device_token = self._device_token(row.instance, row.client_id)
        if device_token is None:
            return False
        item = self._dynamodb.get_item(
            TableName=self._table,
            Key={"pk": {"S": f"USER#{device_token}"}},
            ProjectionExpression="#s",
            ExpressionAttributeNames={"#s": "Status"},
            ConsistentRead=True,
        ).get("Item", {})
        if item.get("Status", {}).get("S") == "PENDING":
            return False  # claimed, Create in flight
        row.status = "duplicate" if row.existed else "registered"
        row.detail = f"DeviceToken {device_token}"
        return True

    def _bulk_done(self, row: SentRow) -> bool:
        assert row.request_id is not None
        item = self._dynamodb.get_item(
            TableName=self._table, Key={"pk": {"S": bulk_pk(row.instance, row.request_id)}}, ConsistentRead=True
        ).get("Item")
        if not item:
            return False
        count = int(item["ChunkCount"]["N"])
        states = [item.get(f"Chunk{n}", {}).get("S") for n in range(count)]
        if not all(state == _FINISHED_CHUNK for state in states):
            return False  # a chunk still running; a lost or rejected one ends as a dead letter
        stored = sum(int(item.get(f"Stored{n}", {}).get("N", "0")) for n in range(count))
        row.status = "registered"
        row.detail = f"bulk {row.request_id}: {stored} users stored"
        return True

    def _letters(self, pending: dict[str, SentRow]) -> None:
        for name in WATCHED_QUEUES:
            url = self._target.outputs.get(QUEUES[name].output)
            if not url:
                continue
            attributes = self._sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
            depth = int(attributes["Attributes"].get("ApproximateNumberOfMessages", 0))
            if depth == 0:
                continue
            peek = Peek(self._sqs, url, 30)
            try:
                for message in peek.messages(depth):
                    letter = classify(message)
                    original = message.get("MessageAttributes", {}).get("OriginalMessageId", {}).get("StringValue")
                    for candidate in (original, letter.message_id, (letter.event or {}).get("id")):
                        row = pending.get(str(candidate)) if candidate else None
                        if row is not None:
                            row.status = "dead-lettered"
                            row.detail = letter.reason + (f": {letter.detail}" if letter.detail else "")
                            break
            finally:
                peek.release()

    def wait(
        self, rows: list[SentRow], *, timeout: float, progress: Callable[[int, int], None] | None = None
    ) -> list[SentRow]:
        """Poll until every row has an outcome or ``timeout`` seconds pass; returns the rows, outcomes filled in."""
        deadline = self._clock() + timeout
        while True:
            pending = {row.message_id: row for row in rows if row.status == "pending"}
            self._letters(pending)
            for row in list(pending.values()):
                if row.status != "pending":
                    continue
                if row.client_id is not None:
                    self._user_done(row)
                elif row.request_id is not None:
                    self._bulk_done(row)
            left = sum(1 for row in rows if row.status == "pending")
            if progress is not None:
                progress(len(rows) - left, len(rows))
            if not left or self._clock() >= deadline:
                break
            self._sleep(1.0)
        for row in rows:
            if row.status == "pending":
                row.detail = "no outcome yet: still queued, or being retried"
        return rows


def summary(rows: Iterable[SentRow]) -> dict[str, int]:
    """Rows per outcome."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    return counts
