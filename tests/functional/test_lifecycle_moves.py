"""A move's SQS message delivered again after the move committed, on moto + the emulator with the template's
lifecycle function: dropped as a duplicate (the upstream not called again, nothing dead-lettered), and the
changes still addressed to the old alias meet the user where it is now (``MovedFrom`` on its item)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from local.emulator.testing import EmulatorHandle
from local.stack import LocalStack

from .conftest import INSTANCES, Functions, drain
from .test_cli_lifecycle import deliver, items, register


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event(detail_type: str, detail: dict[str, Any]) -> str:
    """The whole EventBridge event, as the rule's SQS target delivers it."""
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return json.dumps({"detail-type": detail_type, "source": "customer.app", "time": now, "detail": detail})


def changes_of(upstream: EmulatorHandle) -> int:
    return int(upstream.counters()["management_calls"].get("change_instance", 0))


def test_a_redelivered_move_is_dropped_and_changes_to_the_old_alias_follow_the_user(
    stack: LocalStack, sqs: Any, functions: Functions, upstream: EmulatorHandle
) -> None:
    for logical_id in ("LifecycleQueue", "LifecycleDeadLetterQueue"):
        drain(sqs, stack.queue_url(logical_id))
    function = functions.get("LifecycleFunction")
    client_id = f"moved-{uuid.uuid4().hex[:8]}"
    device_token = register(sqs, stack, functions, client_id, City="London")
    url = stack.queue_url("LifecycleQueue")
    t = int(datetime.now(UTC).timestamp() * 1000)
    calls = changes_of(upstream)

    # The move is applied, but its invocation is cut off before the message is deleted: SQS delivers it again.
    detail = {"ClientId": client_id, "Instance": "default", "ToInstance": "fleet-eu", "OccurredAt": iso_ms(t + 1000)}
    sqs.send_message(QueueUrl=url, MessageBody=event("UserMoved", detail))
    (first,) = sqs.receive_message(QueueUrl=url, VisibilityTimeout=30, AttributeNames=["All"])["Messages"]
    record = {
        "messageId": first["MessageId"],
        "receiptHandle": first["ReceiptHandle"],
        "body": first["Body"],
        "attributes": first["Attributes"],
        "messageAttributes": {},
        "md5OfBody": first["MD5OfBody"],
        "eventSource": "aws:sqs",
        "eventSourceARN": stack.queue_arn("LifecycleQueue"),
        "awsRegion": stack.region,
    }
    assert function.invoke({"Records": [record]})["batchItemFailures"] == []
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"], VisibilityTimeout=0)
    assert items(stack, sqs, client_id, "default") == []  # the ByClient index knows the user as fleet-eu's only

    assert deliver(sqs, stack, "LifecycleQueue", function) == []  # the redelivery: no failure, deleted

    (moved,) = items(stack, sqs, client_id, "fleet-eu")
    assert (moved["DeviceToken"], moved["Instance"], moved["MovedFrom"]) == (device_token, "fleet-eu", {"default"})

    assert changes_of(upstream) == calls + 1
    user = upstream.user(device_token)
    assert user is not None
    assert user["InstanceId"] == INSTANCES["fleet-eu"]["InstanceId"]
    assert drain(sqs, stack.queue_url("LifecycleDeadLetterQueue")) == []
    assert drain(sqs, url) == []

    # A late update to the old alias (it occurred before the move) is dropped; a newer one follows the user.
    for city, at in (("Rome", t + 500), ("Oslo", t + 2000)):
        detail = {"ClientId": client_id, "Instance": "default", "City": city, "OccurredAt": iso_ms(at)}
        sqs.send_message(QueueUrl=url, MessageBody=event("UserUpdated", detail))
        assert deliver(sqs, stack, "LifecycleQueue", function) == []
    user = upstream.user(device_token)
    assert user is not None
    assert user["Profile"]["City"] == "Oslo"
    (moved,) = items(stack, sqs, client_id, "fleet-eu")
    assert int(moved["LastChangeAt"]) == t + 2000
    assert drain(sqs, stack.queue_url("LifecycleDeadLetterQueue")) == []

    # A deletion sent to the old alias erases the moved user, and the dead letters naming either alias.
    for body in ({"ClientId": client_id, "Email": "ada@example.com"}, {"ClientId": client_id, "Instance": "fleet-eu"}):
        sqs.send_message(QueueUrl=stack.outputs["RegistrationDeadLetterQueueUrl"], MessageBody=json.dumps(body))
    detail = {"ClientId": client_id, "Instance": "default", "OccurredAt": iso_ms(t + 3000)}
    sqs.send_message(QueueUrl=url, MessageBody=event("UserDeleted", detail))
    assert deliver(sqs, stack, "LifecycleQueue", function) == []
    assert upstream.user(device_token) is None
    (tombstone,) = items(stack, sqs, client_id, "fleet-eu")
    assert (tombstone["DeviceToken"], tombstone["Status"], tombstone["MovedFrom"]) == (
        device_token,
        "DELETED",
        {"default"},
    )
    assert "RefreshToken" not in tombstone
    assert drain(sqs, stack.outputs["RegistrationDeadLetterQueueUrl"]) == []
