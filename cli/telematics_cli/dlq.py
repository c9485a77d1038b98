"""``dlq list`` and ``dlq redrive``: dead letters grouped by reason, and moved back to where they came from.

Where a dead letter's reason comes from:

* our own dead letters (bad input, unknown instance, upstream rejection, a lost bulk chunk) carry the message
  attributes ``Reason``, ``ErrorDetail``, ``Source`` and ``OriginalMessageId``;
* a Lambda on-failure destination record (the signup function's async retries ran out) is a JSON document whose
  ``requestContext.condition`` and ``responsePayload.errorMessage`` say why; ``requestPayload`` is the event;
* EventBridge and Scheduler dead letters (a target could not be invoked) carry ``ERROR_CODE``/``ERROR_MESSAGE``;
* anything else was moved by SQS after ``maxReceiveCount`` failed deliveries: ``max-receives``.

Reading never loses a message: messages are received with a short visibility timeout, never deleted by
``list``, and made visible again (visibility 0) when the listing ends. ``redrive`` deletes a message from its
dead-letter queue only after it was sent back successfully.

Privacy: a body holds a user's profile, so ``list`` shows ids, reasons and a summary without values (kind, size,
key names) unless ``--bodies`` is given. ``redrive`` writes ``OccurredAt`` into a body that names a user and lacks
it (the time the function ordered it by, which our letters carry in their ``OccurredAt`` attribute), so a letter
from before its user's deletion is dropped when redriven after it, not registered anew, and an old change redriven
after a newer one is dropped as stale, not applied over it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from botocore.exceptions import ClientError
from rich.table import Table

from telematics_cli import output
from telematics_cli.errors import EXIT_DATA, EXIT_OK, CliError
from telematics_cli.stamps import stamp_occurred_at
from telematics_cli.target import Target
from telematics_reg.errors import InvalidMessageError
from telematics_reg.intake import event_time_ms
from telematics_reg.models import BulkRegistrationRequest, parse_registration_message
from telematics_reg.registration import stamp_request_id

LIST_VISIBILITY: Final = 30
REDRIVE_VISIBILITY: Final = 120
MAX_RECEIVES: Final = "max-receives"
EXAMPLE_WIDTH: Final = 160


@dataclass(frozen=True)
class DeadLetterQueue:
    name: str
    output: str
    #: How its letters go back: "queue" (to the output ``redrive_output``), "bus" (as events), or None.
    redrive: str | None
    redrive_output: str | None = None


QUEUES: Final = {
    "registration": DeadLetterQueue("registration", "RegistrationDeadLetterQueueUrl", "queue", "RegistrationQueueUrl"),
    "signup": DeadLetterQueue("signup", "SignupDeadLetterQueueUrl", "bus"),
    "refresh": DeadLetterQueue("refresh", "RefreshDeadLetterQueueUrl", "queue", "RefreshQueueUrl"),
    "sweep": DeadLetterQueue("sweep", "SweepDeadLetterQueueUrl", None),
    "lifecycle": DeadLetterQueue("lifecycle", "LifecycleDeadLetterQueueUrl", "queue", "LifecycleQueueUrl"),
}
QUEUE_CHOICES: Final = (*QUEUES, "all")


@dataclass
class Letter:
    """One dead letter as received, with its reason worked out."""

    message_id: str
    receipt_handle: str
    body: str
    reason: str
    detail: str
    source: str
    sent_at: str | None
    receive_count: int
    #: ``SentTimestamp`` (epoch ms): the first send of a letter SQS moved; for our own letters, when the function
    #: dead-lettered it (after the message occurred).
    sent_ms: int | None = None
    #: The original EventBridge event, when the letter holds one (EventBridge DLQ, Lambda destination record).
    event: dict[str, Any] | None = None
    #: Id of the message that was dead-lettered (our ``OriginalMessageId``; SQS keeps the id when it moves one).
    original_message_id: str | None = None
    #: Our ``OccurredAt`` attribute (epoch ms): when the message occurred, as the function ordered it.
    occurred_ms: int | None = None

    def matches(self, reasons: list[str], needle: str | None) -> bool:
        if reasons and self.reason not in reasons:
            return False
        return needle is None or needle in self.body or needle in self.detail

    def example(self, *, body: bool = True) -> dict[str, Any]:
        """The letter for a listing: ids, reason detail and a summary; the body (personal data) only if asked."""
        shown: dict[str, Any] = {
            "MessageId": self.message_id,
            "OriginalMessageId": self.original_message_id,
            "Source": self.source,
            "SentAt": self.sent_at,
            "Detail": output.truncate(output.redact_text(self.detail), EXAMPLE_WIDTH * 2),
            "Summary": summary(self.body),
        }
        if body:
            shown["Body"] = output.truncate(output.redact_body(self.body), EXAMPLE_WIDTH)
        return shown


def summary(body: str) -> str:
    """What a body is, without any of its values (a ClientId, a profile): its kind, size and top-level keys.

    Example
    -------
    >>> summary('{"ClientId": "c-1", "FirstName": "Ada"}')
    'registration, 39 bytes: ClientId, FirstName'
    >>> summary('{"detail-type": "UserUpdated", "detail": {"ClientId": "c-1", "City": "Paris"}}')
    'event UserUpdated, 78 bytes: ClientId, City'
    """
    size = f"{len(body.encode('utf-8', errors='surrogatepass')):,} bytes"
    try:
        document = json.loads(body)
    except ValueError:
        return f"not JSON, {size}"
    if not isinstance(document, dict):
        return f"not an object, {size}"
    kind = "registration"
    if "requestContext" in document and isinstance(document.get("requestPayload"), dict):
        document = document["requestPayload"]
        kind = "lambda record"
    if "detail-type" in document and isinstance(document.get("detail"), dict):
        kind = f"{kind + ' of ' if kind != 'registration' else ''}event {str(document['detail-type'])[:64]}"
        document = document["detail"]
    lowered = {str(k).lower(): v for k, v in document.items()}
    if isinstance(lowered.get("action"), str) and lowered["action"]:
        kind = f"lifecycle {str(lowered['action'])[:16]}"
    elif "quantity" in lowered:
        kind = "bulk"
    keys = ", ".join(str(k)[:40] for k in list(document)[:20]) + (", …" if len(document) > 20 else "")
    return f"{kind}, {size}: {keys}" if keys else f"{kind}, {size}"


def _attribute(message: dict[str, Any], name: str) -> str | None:
    value = message.get("MessageAttributes", {}).get(name, {}).get("StringValue")
    return str(value) if value is not None else None


def classify(message: dict[str, Any]) -> Letter:
    """Work out why a message is in a dead-letter queue (see the module docstring)."""
    body = str(message.get("Body", ""))
    system = message.get("Attributes", {})
    sent = system.get("SentTimestamp")
    letter = Letter(
        message_id=str(message.get("MessageId", "")),
        receipt_handle=str(message.get("ReceiptHandle", "")),
        body=body,
        reason=MAX_RECEIVES,
        detail="",
        source=str(system.get("DeadLetterQueueSourceArn", "")).rsplit(":", 1)[-1],
        sent_at=output.iso(int(sent) / 1000) if sent else None,
        receive_count=int(system.get("ApproximateReceiveCount", 0) or 0),
        sent_ms=int(sent) if sent else None,
    )
    letter.original_message_id = _attribute(message, "OriginalMessageId") or letter.message_id
    letter.occurred_ms = event_time_ms(_attribute(message, "OccurredAt"))
    reason = _attribute(message, "Reason")
    if reason:
        letter.reason = reason
        letter.detail = _attribute(message, "ErrorDetail") or ""
        letter.source = _attribute(message, "Source") or letter.source
        return letter
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("requestContext"), dict):
        context = document["requestContext"]
        response = document.get("responsePayload")
        letter.reason = f"lambda:{context.get('condition', 'failure')}"
        if isinstance(response, dict):
            letter.detail = f"{response.get('errorType', 'Error')}: {response.get('errorMessage', '')}"
        letter.source = str(context.get("functionArn", "")).split(":function:")[-1].split(":")[0]
        payload = document.get("requestPayload")
        letter.event = payload if isinstance(payload, dict) and "detail" in payload else None
        return letter
    error_code = _attribute(message, "ERROR_CODE")
    if error_code:
        letter.reason = f"delivery:{error_code}"
        letter.detail = _attribute(message, "ERROR_MESSAGE") or ""
        letter.source = (_attribute(message, "RULE_ARN") or _attribute(message, "SCHEDULE_ARN") or "").rsplit("/", 1)[
            -1
        ]
    if isinstance(document, dict) and "detail-type" in document and "detail" in document:
        letter.event = document
    if letter.reason == MAX_RECEIVES and letter.receive_count:
        letter.detail = f"moved by SQS after failed deliveries (received {letter.receive_count} times here)"
    return letter


@dataclass
class Peek:
    """Receives a queue's messages without losing any: each is hidden briefly, then shown again (or deleted)."""

    sqs: Any
    url: str
    visibility: int
    _held: dict[str, str] = field(default_factory=dict)  # message id -> receipt handle, not yet released
    _seen: set[str] = field(default_factory=set)

    def messages(self, limit: int) -> Iterator[dict[str, Any]]:
        empty = 0
        while len(self._seen) < limit and empty < 2:
            batch = self.sqs.receive_message(
                QueueUrl=self.url,
                MaxNumberOfMessages=min(10, limit - len(self._seen)),
                VisibilityTimeout=self.visibility,
                WaitTimeSeconds=1 if empty else 0,
                MessageAttributeNames=["All"],
                AttributeNames=["All"],
            ).get("Messages", [])
            if not batch:
                empty += 1
                continue
            empty = 0
            # Every message of the batch is held (hidden) from now on: record them all before yielding any, so that a
            # caller that stops part-way (redrive --limit) releases the rest instead of hiding them for the timeout.
            for message in batch:
                self._held[str(message["MessageId"])] = str(message["ReceiptHandle"])
            for message in batch:
                message_id = str(message["MessageId"])
                if message_id in self._seen:
                    continue  # a listing slower than the visibility timeout sees some twice
                self._seen.add(message_id)
                yield message

    def delete(self, message_id: str) -> None:
        handle = self._held.pop(message_id)
        self.sqs.delete_message(QueueUrl=self.url, ReceiptHandle=handle)

    def release(self) -> None:
        """Make every message still held visible again at once."""
        held = list(self._held.items())
        self._held.clear()
        for start in range(0, len(held), 10):
            entries = [
                {"Id": str(n), "ReceiptHandle": handle, "VisibilityTimeout": 0}
                for n, (_, handle) in enumerate(held[start : start + 10])
            ]
            try:
                self.sqs.change_message_visibility_batch(QueueUrl=self.url, Entries=entries)
            except ClientError as exc:  # they become visible anyway when the timeout ends
                output.warn(f"could not release messages early ({exc}); they reappear within {self.visibility} s")


def selected(target: Target, queue: str, *, for_redrive: bool) -> list[tuple[DeadLetterQueue, str]]:
    names = list(QUEUES) if queue == "all" else [queue]
    chosen: list[tuple[DeadLetterQueue, str]] = []
    for name in names:
        spec = QUEUES[name]
        if for_redrive and spec.redrive is None:
            if queue != "all":
                raise CliError(
                    "sweep dead letters are not redriven: each is a missed schedule tick, and the next scheduled "
                    "sweep does the same work (`dlq list --queue sweep` shows why they failed)"
                )
            continue
        url = target.outputs.get(spec.output)
        if url:
            chosen.append((spec, url))
        elif queue != "all":
            target.output(spec.output)  # raises a clear error
    return chosen


def depth(sqs: Any, url: str) -> int:
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    return int(attributes["Attributes"].get("ApproximateNumberOfMessages", 0))


# -------------------------------------------------------------------------------------------------------- list


def run_list(target: Target, *, queue: str, limit: int, examples: int, as_json: bool, bodies: bool = False) -> int:
    sqs = target.client("sqs")
    report: list[dict[str, Any]] = []
    for spec, url in selected(target, queue, for_redrive=False):
        groups: dict[str, dict[str, Any]] = {}
        peek = Peek(sqs, url, LIST_VISIBILITY)
        examined = 0
        # An empty queue costs one call, and a listing stops once it has seen every visible letter instead of
        # waiting on the queue to prove it empty (letters in flight elsewhere are not waited for either).
        visible = depth(sqs, url)
        try:
            for message in peek.messages(min(limit, visible)) if visible else iter(()):
                examined += 1
                letter = classify(message)
                group = groups.setdefault(letter.reason, {"reason": letter.reason, "count": 0, "sources": set(),
                                                          "examples": []})  # fmt: skip
                group["count"] += 1
                if letter.source:
                    group["sources"].add(letter.source)
                if len(group["examples"]) < examples:
                    group["examples"].append(letter.example(body=bodies))
        finally:
            peek.release()
        ordered = sorted(groups.values(), key=lambda g: (-g["count"], g["reason"]))
        for group in ordered:
            group["sources"] = sorted(group["sources"])
        report.append({"queue": spec.name, "url": url, "depth": visible, "examined": examined, "groups": ordered})
    if as_json:
        output.print_json({"target": target.description, "queues": report})
        return EXIT_OK
    console = output.stdout()
    for entry in report:
        title = f"{entry['queue']} dead letters: {entry['depth']:,} in the queue, {entry['examined']:,} examined"
        if not entry["groups"]:
            console.print(f"{title} — empty")
            continue
        table = Table(title=title, title_justify="left", show_lines=True)
        table.add_column("Reason", style="bold")
        table.add_column("Count", justify="right")
        table.add_column("Source")
        table.add_column("Examples", overflow="fold")
        for group in entry["groups"]:
            lines = []
            for example in group["examples"]:
                text = example["Body"] if bodies else f"{example['MessageId']}: {example['Summary']}"
                if example["Detail"]:
                    text += f"\n  ↳ {example['Detail']}"
                lines.append(output.escape(text))
            table.add_row(
                output.escape(group["reason"]),
                f"{group['count']:,}",
                output.escape(", ".join(group["sources"])),
                "\n".join(lines),
            )
        console.print(table)
    if not bodies and any(entry["groups"] for entry in report):
        output.info("bodies hidden (they hold personal data): --bodies shows them")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------- redrive


class RedriveError(Exception):
    pass


def _send_back(target: Target, spec: DeadLetterQueue, letter: Letter) -> str:
    """Put the letter back where it came from; returns where. Raises RedriveError when it cannot."""
    if spec.redrive == "queue":
        assert spec.redrive_output is not None
        url = target.output(spec.redrive_output)
        body = letter.body
        if spec.name == "registration":
            body = _with_occurred_at(_with_bulk_id(letter), letter)
        elif spec.name == "lifecycle":
            body = _with_occurred_at(letter.body, letter)
        target.client("sqs").send_message(QueueUrl=url, MessageBody=body)
        return url.rsplit("/", 1)[-1]
    bus = target.output("EventBusName")
    if letter.event is not None:
        source = str(letter.event.get("source", ""))
        detail_type = str(letter.event.get("detail-type", "UserSignedUp"))
        detail = letter.event.get("detail")
    else:
        try:
            detail = json.loads(letter.body)
        except ValueError:
            raise RedriveError("its body is not JSON, so it cannot be an event detail") from None
        source = target.outputs.get("SignupEventSource") or target.parameters.get("SignupEventSource", "")
        detail_type = "UserSignedUp"
    if not source:
        raise RedriveError("the signup event source is unknown (no SignupEventSource output)")
    if not isinstance(detail, dict):
        raise RedriveError("its event detail is not a JSON object")
    detail = json.loads(_with_occurred_at(json.dumps(detail), letter))
    response = target.client("events").put_events(
        Entries=[{"EventBusName": bus, "Source": source, "DetailType": detail_type, "Detail": json.dumps(detail)}]
    )
    if response.get("FailedEntryCount"):
        entry = response.get("Entries", [{}])[0]
        raise RedriveError(f"EventBridge refused it: {entry.get('ErrorCode')}: {entry.get('ErrorMessage')}")
    return f"bus {bus} as {detail_type}"


def _with_occurred_at(body: str, letter: Letter) -> str:
    """The body to send back, with ``OccurredAt`` when it names a user and says not when it occurred.

    Sent back as is, it would be ordered by the time of the redrive: a registration dead-lettered before its
    user's deletion and redriven after it would register the user anew, and an old change would apply over newer
    ones. When it occurred: our letter's ``OccurredAt`` attribute (the time the function ordered it by), else its
    event's ``time``, else its ``SentTimestamp`` (a letter SQS moved keeps its first send's). Never our own letter's
    ``SentTimestamp`` when the attribute is there: that is when the function gave up, which for a change that waited
    for its user (``unknown_user``) is up to ``UNKNOWN_USER_SECONDS`` later, after changes that came after it::

        change C at t0 (no user yet) ... dead-lettered at t0 + 900 s (unknown_user), OccurredAt t0
        user registered; update U at t1 (t0 < t1 < t0 + 900 s) applied: LastChangeAt t1
        redrive C: OccurredAt t0 < t1 -> dropped (stale), never applied over U
        (stamped with its SentTimestamp t0 + 900 s > t1 it would have been applied over U)
    """
    try:
        document = json.loads(body)
    except ValueError:
        return body
    if not isinstance(document, dict) or ("detail-type" in document and "detail" in document):
        return body  # an EventBridge event: its own ``time`` orders it
    if any(isinstance(k, str) and k.lower() in ("quantity", "requestid") for k in document):
        return body  # a bulk: anonymous users, no order to keep (and the bulk contract takes no OccurredAt)
    when = letter.occurred_ms
    when = when or (event_time_ms(letter.event.get("time")) if letter.event is not None else None)
    when = when or letter.sent_ms
    return stamp_occurred_at(body, when) if when else body


def _with_bulk_id(letter: Letter) -> str:
    """The body to send back: a bulk without ``RequestId`` gets the id it was registered under.

    That bulk is known by the id of the message that brought it; sent back as is, it would arrive as a new
    message with a new id and be made again from the start. The id is our ``OriginalMessageId`` attribute, or
    for a letter SQS moved after ``maxReceiveCount``, its message id (which SQS keeps when it moves a message).
    """
    try:
        request = parse_registration_message(letter.body)
    except InvalidMessageError:
        return letter.body
    if not isinstance(request, BulkRegistrationRequest) or request.request_id is not None:
        return letter.body
    return stamp_request_id(letter.body, letter.original_message_id or letter.message_id)


def run_redrive(
    target: Target,
    *,
    queue: str,
    reasons: list[str],
    match: str | None,
    dry_run: bool,
    limit: int | None,
    scan_limit: int,
    as_json: bool,
) -> int:
    sqs = target.client("sqs")
    moved: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    examined = 0
    for spec, url in selected(target, queue, for_redrive=True):
        peek = Peek(sqs, url, REDRIVE_VISIBILITY)
        try:
            for message in peek.messages(scan_limit):
                if limit is not None and len(moved) >= limit:
                    break
                examined += 1
                letter = classify(message)
                if not letter.matches(reasons, match):
                    continue
                entry = {"queue": spec.name, **letter.example(), "Reason": letter.reason}
                if dry_run:
                    moved.append(entry)
                    continue
                try:
                    entry["To"] = _send_back(target, spec, letter)
                except (RedriveError, ClientError) as exc:
                    failed.append({**entry, "Error": str(exc)})
                    continue
                peek.delete(letter.message_id)  # only now that it is safely back
                moved.append(entry)
        finally:
            peek.release()
    verb = "would move" if dry_run else "moved"
    if as_json:
        output.print_json(
            {"dry_run": dry_run, "examined": examined, "moved": len(moved), "letters": moved, "failed": failed}
        )
    else:
        console = output.stdout()
        table = Table(title=f"{verb} {len(moved):,} of {examined:,} dead letters examined", title_justify="left")
        table.add_column("Queue")
        table.add_column("Reason")
        table.add_column("Body", overflow="fold")
        if not dry_run:
            table.add_column("To")
        for entry in moved:
            row = [entry["queue"], output.escape(entry["Reason"]), output.escape(entry["Body"])]
            table.add_row(*row, *([] if dry_run else [output.escape(entry["To"])]))
        console.print(table)
        for entry in failed:
            console.print(f"[red]not moved[/red] {entry['MessageId']}: {output.escape(entry['Error'])}")
        if dry_run:
            console.print("dry run: nothing was moved (drop --dry-run to move them)")
    return EXIT_DATA if failed else EXIT_OK
