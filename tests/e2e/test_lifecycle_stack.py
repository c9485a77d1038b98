"""The lifecycle as an independent harness sees it: template.yaml provisioned in moto, the emulator upstream, the
functions run with their template environment; events published on the bus and messages sent to the queues
(stale, racing, redelivered and malformed among them), the invariants checked in DynamoDB, the DLQs and the
emulator."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from boto3.dynamodb.types import TypeDeserializer

from local.runner import LocalService, RuntimeOptions
from local.stack import LocalStack

from .conftest import ROOT, aws, wait_for

REGION = "ap-southeast-2"


@pytest.fixture(scope="module")
def service() -> Iterator[LocalService]:
    instances = {
        alias: {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())} for alias in ("default", "fleet-eu")
    }
    local = LocalService(
        template_path=ROOT / "template.yaml",
        stack_name="lifecycle",
        region=REGION,
        parameters={"LogLevel": "WARNING"},
        instances=instances,
        options=RuntimeOptions(failure_visibility_timeout=1, schedule_interval=30.0, async_retry_delay=0.5),
    )
    with local:
        yield local


@pytest.fixture(scope="module")
def stack(service: LocalService) -> LocalStack:
    return service.stack


def iso_ms(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def put(stack: LocalStack, detail_type: str, detail: dict[str, Any]) -> None:
    response = aws(stack, "events").put_events(
        Entries=[
            {
                "EventBusName": stack.parameters["SignupEventBusName"],
                "Source": stack.parameters["SignupEventSource"],
                "DetailType": detail_type,
                "Detail": json.dumps(detail),
            }
        ]
    )
    assert response["FailedEntryCount"] == 0, response


def items_of(stack: LocalStack, client_id: str, instance: str = "default") -> list[dict[str, Any]]:
    dynamodb = aws(stack, "dynamodb")
    table = stack.outputs["TokensTableName"]
    found = dynamodb.query(
        TableName=table,
        IndexName="ByClient",
        KeyConditionExpression="ClientKey = :k",
        ExpressionAttributeValues={":k": {"S": f"{instance}#{client_id}"}},
    )["Items"]
    deserializer = TypeDeserializer()
    items = []
    for key in found:
        item = dynamodb.get_item(TableName=table, Key={"pk": key["pk"]}, ConsistentRead=True).get("Item")
        if item:
            items.append({k: deserializer.deserialize(v) for k, v in item.items()})
    return items


def upstream_users(service: LocalService, client_id: str) -> list[dict[str, Any]]:
    counters = service.emulator.counters()["users_by_client_id"]
    found = []
    for key, count in counters.items():
        if key.endswith(f"/{client_id}") and count:
            found.append(key)
    users = []
    for item in items_for_all(service, client_id):
        user = service.emulator.user(item["DeviceToken"])
        if user is not None:
            users.append(user)
    return users


def items_for_all(service: LocalService, client_id: str) -> list[dict[str, Any]]:
    return items_of(service.stack, client_id) + items_of(service.stack, client_id, "fleet-eu")


def registered(stack: LocalStack, client_id: str, instance: str = "default") -> dict[str, Any]:
    return wait_for(
        lambda: next((i for i in items_of(stack, client_id, instance) if i["Status"] == "ACTIVE"), None),
        timeout=30,
        what=f"{client_id} registered",
    )


def dead_letters(stack: LocalStack, logical_id: str) -> list[dict[str, Any]]:
    sqs = aws(stack, "sqs")
    url = stack.queue_url(logical_id)
    seen: list[dict[str, Any]] = []
    while True:
        batch = sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=1, MessageAttributeNames=["All"]
        ).get("Messages", [])
        if not batch:
            return seen
        seen.extend(batch)


def test_updates_apply_in_order_and_a_stale_one_is_dropped(service: LocalService, stack: LocalStack) -> None:
    client_id = f"lc-upd-{uuid.uuid4().hex[:8]}"
    put(stack, "UserSignedUp", {"ClientId": client_id, "FirstName": "Ada"})
    user = registered(stack, client_id)
    now = time.time()
    put(stack, "UserUpdated", {"ClientId": client_id, "City": "Paris", "OccurredAt": iso_ms(now + 2)})
    wait_for(
        lambda: (u := service.emulator.user(user["DeviceToken"])) and u["Profile"].get("City") == "Paris",
        timeout=30,
        what="update applied upstream",
    )
    put(stack, "UserUpdated", {"ClientId": client_id, "City": "Rome", "OccurredAt": iso_ms(now + 1)})
    put(stack, "UserDeactivated", {"clientId": client_id, "occurredAt": iso_ms(now + 3)})
    wait_for(lambda: items_of(stack, client_id)[0].get("Deactivated") is True, timeout=30, what="deactivated")
    time.sleep(2)
    upstream = service.emulator.user(user["DeviceToken"])
    assert upstream is not None
    assert upstream["Profile"]["City"] == "Paris"  # the older change was never applied over the newer one
    (item,) = items_of(stack, client_id)
    assert item["LastChangeAt"] == int((now + 3) * 1000)


def test_deletion_is_final_complete_and_reaches_dead_letters(service: LocalService, stack: LocalStack) -> None:
    client_id = f"lc-del-{uuid.uuid4().hex[:8]}"
    signed_up = time.time()
    put(stack, "UserSignedUp", {"ClientId": client_id, "FirstName": "Ada", "OccurredAt": iso_ms(signed_up)})
    user = registered(stack, client_id)
    # A letter holding the user's profile sits in the registration DLQ (a bad duplicate of its registration).
    aws(stack, "sqs").send_message(
        QueueUrl=stack.outputs["RegistrationQueueUrl"],
        MessageBody=json.dumps({"ClientId": client_id, "Gender": "Robot"}),
    )
    wait_for(
        lambda: any(client_id in m["Body"] for m in dead_letters(stack, "RegistrationDeadLetterQueue")),
        timeout=30,
        what="the bad letter dead-lettered",
    )
    time.sleep(1.5)
    put(stack, "UserDeleted", {"ClientId": client_id, "OccurredAt": iso_ms(signed_up + 5)})
    wait_for(lambda: items_of(stack, client_id)[0]["Status"] == "DELETED", timeout=30, what="tombstone")
    (tombstone,) = items_of(stack, client_id)
    assert not {"AccessToken", "RefreshToken", "DueShard", "AccessExpiresAt"} & set(tombstone)
    assert tombstone["ExpiresAt"] > time.time() + 80 * 86400
    assert service.emulator.user(user["DeviceToken"]) is None
    time.sleep(1.5)
    assert not any(client_id in m["Body"] for m in dead_letters(stack, "RegistrationDeadLetterQueue"))
    # Redelivered registration, late update, duplicate deletion: nothing recreated, nothing sent upstream.
    creates = service.emulator.counters()["creates"]
    put(stack, "UserSignedUp", {"ClientId": client_id, "FirstName": "Ada", "OccurredAt": iso_ms(signed_up)})
    put(stack, "UserUpdated", {"ClientId": client_id, "City": "Rome", "OccurredAt": iso_ms(signed_up + 1)})
    put(stack, "UserDeleted", {"ClientId": client_id, "OccurredAt": iso_ms(signed_up + 5)})
    time.sleep(4)
    assert service.emulator.counters()["creates"] == creates
    assert [i["Status"] for i in items_of(stack, client_id)] == ["DELETED"]
    assert service.emulator.user(user["DeviceToken"]) is None
    # A registration after the deletion is a new user with a new DeviceToken.
    put(stack, "UserSignedUp", {"ClientId": client_id, "FirstName": "Ada"})
    new = registered(stack, client_id)
    assert new["DeviceToken"] != user["DeviceToken"]
    assert service.emulator.user(new["DeviceToken"]) is not None


def test_a_deletion_racing_its_registration_leaves_nothing(service: LocalService, stack: LocalStack) -> None:
    client_id = f"lc-race-{uuid.uuid4().hex[:8]}"
    t0 = time.time()
    put(stack, "UserSignedUp", {"ClientId": client_id, "FirstName": "Ada", "OccurredAt": iso_ms(t0)})
    put(stack, "UserDeleted", {"ClientId": client_id, "OccurredAt": iso_ms(t0 + 0.001)})
    wait_for(
        lambda: (items := items_of(stack, client_id)) and all(i["Status"] == "DELETED" for i in items),
        timeout=40,
        what="the race settled",
    )
    time.sleep(3)
    items = items_of(stack, client_id)
    assert [i["Status"] for i in items] == ["DELETED"]
    assert service.emulator.user(items[0]["DeviceToken"]) is None
    assert not {"AccessToken", "RefreshToken"} & set(items[0])


def test_a_move_keeps_the_device_token_and_switches_the_instance(service: LocalService, stack: LocalStack) -> None:
    client_id = f"lc-move-{uuid.uuid4().hex[:8]}"
    put(stack, "UserSignedUp", {"ClientId": client_id})
    user = registered(stack, client_id)
    put(stack, "UserMoved", {"ClientId": client_id, "ToInstance": "fleet-eu"})
    moved = wait_for(lambda: next(iter(items_of(stack, client_id, "fleet-eu")), None), timeout=30, what="moved")
    assert moved["DeviceToken"] == user["DeviceToken"]
    assert moved["InstanceId"] == service.emulator.instance_id("fleet-eu")
    upstream = service.emulator.user(user["DeviceToken"])
    assert upstream is not None
    assert upstream["InstanceId"] == service.emulator.instance_id("fleet-eu")


def test_bad_input_dead_letters_with_its_reason_and_never_reaches_the_upstream(
    service: LocalService, stack: LocalStack
) -> None:
    marker = f"lc-bad-{uuid.uuid4().hex[:8]}"
    before = service.emulator.counters()
    put(stack, "UserUpdated", {"ClientId": marker, "Gender": "Robot"})
    put(stack, "UserMoved", {"ClientId": marker, "ToInstance": "no-such-instance"})
    aws(stack, "sqs").send_message(
        QueueUrl=stack.outputs["LifecycleQueueUrl"], MessageBody=json.dumps({"Action": "Explode", "ClientId": marker})
    )
    letters = wait_for(
        lambda: (
            (found := [m for m in dead_letters(stack, "LifecycleDeadLetterQueue") if marker in m["Body"]])
            and len(found) == 3
            and found
        ),
        timeout=30,
        what="three lifecycle dead letters",
    )
    reasons = sorted(m["MessageAttributes"]["Reason"]["StringValue"] for m in letters)
    assert reasons == ["invalid_fields", "unknown_action", "unknown_instance"]
    after = service.emulator.counters()
    assert after.get("management_calls", before.get("management_calls")) == before.get("management_calls")


def test_the_whole_run_made_one_admin_login(service: LocalService) -> None:
    assert service.emulator.counters()["admin_logins"] == 1
