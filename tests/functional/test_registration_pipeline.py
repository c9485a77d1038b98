"""The registration pipeline end to end in one process: the template's functions invoked with real Lambda event
shapes, moto holding the template's resources, and the User Service emulator as the upstream."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

from boto3.dynamodb.types import TypeDeserializer

from local.emulator.testing import EmulatorHandle
from local.stack import LocalStack

from .conftest import INSTANCES, Functions, drain, signup_event, sqs_event


def _user_item(dynamodb: Any, stack: LocalStack, device_token: str) -> dict[str, Any]:
    response = dynamodb.get_item(
        TableName=stack.outputs["TokensTableName"], Key={"pk": {"S": f"USER#{device_token}"}}, ConsistentRead=True
    )
    deserializer = TypeDeserializer()
    return {k: deserializer.deserialize(v) for k, v in response.get("Item", {}).items()}


def _users_for(emulator: EmulatorHandle, client_id: str, alias: str = "default") -> int:
    counters = emulator.counters()
    return int(counters["users_by_client_id"].get(f"{INSTANCES[alias]['InstanceId']}/{client_id}", 0))


def test_a_mixed_batch_reports_only_the_transient_failure_and_dead_letters_the_poison(
    stack: LocalStack, functions: Functions, emulator: EmulatorHandle, sqs: Any, dynamodb: Any
) -> None:
    run = uuid.uuid4().hex[:8]
    good = [f"{run}-good-{n}" for n in range(4)]
    bodies: list[Any] = [
        {"ClientId": good[0], "FirstName": "Ada"},
        {"clientId": good[1], "gender": "Female"},
        {"ClientId": good[2]},
        {"ClientId": good[3], "Instance": "fleet-eu"},
        {"ClientId": good[0]},  # duplicate of the first, in the same batch
        "{not json",
        {"FirstName": "no ClientId"},
        {"ClientId": f"{run}-x", "Gender": "Robot"},
        {"ClientId": f"{run}-y", "Instance": "nowhere"},
    ]
    ids = [str(uuid.uuid4()) for _ in bodies]
    # One Create answers 503, and with a single attempt the client cannot absorb it: that record must fail.
    emulator.set_faults(script=[{"call": "create", "fault": "error", "status": 503}])
    queue_fn = functions.get("RegistrationQueueFunction", UPSTREAM_MAX_ATTEMPTS="1")

    response = queue_fn.invoke(sqs_event(bodies, queue_arn=stack.queue_arn("RegistrationQueue"), message_ids=ids))

    failed = [item["itemIdentifier"] for item in response["batchItemFailures"]]
    assert len(failed) == 1
    assert failed[0] in {ids[0], ids[1], ids[2], ids[3], ids[4]}
    letters = drain(sqs, stack.queue_url("RegistrationDeadLetterQueue"))
    reasons = {m["MessageAttributes"]["OriginalMessageId"]["StringValue"]: m for m in letters}
    assert set(reasons) == {ids[5], ids[6], ids[7], ids[8]}
    assert reasons[ids[5]]["MessageAttributes"]["Reason"]["StringValue"] == "not_json"
    assert reasons[ids[5]]["Body"] == "{not json"
    assert reasons[ids[6]]["MessageAttributes"]["Reason"]["StringValue"] == "invalid_fields"
    assert "ClientId" in reasons[ids[6]]["MessageAttributes"]["ErrorDetail"]["StringValue"]
    assert "Gender" in reasons[ids[7]]["MessageAttributes"]["ErrorDetail"]["StringValue"]
    assert reasons[ids[8]]["MessageAttributes"]["Reason"]["StringValue"] == "unknown_instance"

    # SQS makes the failed record visible again: its redelivery registers it.
    index = ids.index(failed[0])
    retry = queue_fn.invoke(
        sqs_event([bodies[index]], queue_arn=stack.queue_arn("RegistrationQueue"), message_ids=[failed[0]])
    )
    assert retry == {"batchItemFailures": []}

    for client_id in good[:3]:
        assert _users_for(emulator, client_id) == 1
    assert _users_for(emulator, good[3], alias="fleet-eu") == 1
    assert emulator.counters()["users_total"] == 4


def test_a_create_committed_upstream_whose_answer_is_lost_leaves_one_user_stored_with_tokens(
    stack: LocalStack, functions: Functions, emulator: EmulatorHandle, dynamodb: Any
) -> None:
    client_id = f"drop-{uuid.uuid4().hex[:8]}"
    emulator.set_faults(script=[{"call": "create", "fault": "drop_after_commit"}])

    result = functions.get("SignupFunction").invoke(signup_event({"ClientId": client_id}))

    assert result["status"] == "registered"
    assert _users_for(emulator, client_id) == 1
    assert emulator.counters()["faults_served"]["drop_after_commit"] == 1
    item = _user_item(dynamodb, stack, result["deviceToken"])
    assert item["Status"] == "ACTIVE"
    assert item["AccessToken"].count(".") == 2
    assert item["RefreshToken"]
    assert item["ClientId"] == client_id


def test_the_same_client_id_through_both_functions_at_once_makes_one_user(
    stack: LocalStack, functions: Functions, emulator: EmulatorHandle
) -> None:
    client_id = f"both-{uuid.uuid4().hex[:8]}"
    emulator.set_faults(latency_ms=300)
    signup_fn = functions.get("SignupFunction")
    queue_fn = functions.get("RegistrationQueueFunction")
    results: dict[str, Any] = {}
    start = threading.Barrier(2)

    def via_signup() -> None:
        start.wait()
        results["signup"] = signup_fn.invoke(signup_event({"ClientId": client_id}))

    def via_queue() -> None:
        start.wait()
        results["queue"] = queue_fn.invoke(
            sqs_event([{"ClientId": client_id}], queue_arn=stack.queue_arn("RegistrationQueue"))
        )

    threads = [threading.Thread(target=via_signup), threading.Thread(target=via_queue)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert results["queue"] == {"batchItemFailures": []}
    assert results["signup"]["status"] in {"registered", "duplicate"}
    assert _users_for(emulator, client_id) == 1
    # The claim kept the second delivery from calling Create at all (no "exists" answer, no Login recovery).
    counters = emulator.counters()
    assert counters["creates"] == 1
    assert counters["logins"] == counters["failed_logins"] == 0


def test_a_redelivered_bulk_message_makes_no_extra_users(
    stack: LocalStack, functions: Functions, emulator: EmulatorHandle, dynamodb: Any
) -> None:
    queue_fn = functions.get("RegistrationQueueFunction")
    message_id = str(uuid.uuid4())
    event = sqs_event([{"Quantity": 230}], queue_arn=stack.queue_arn("RegistrationQueue"), message_ids=[message_id])

    first = queue_fn.invoke(event)
    second = queue_fn.invoke(event)

    assert first == second == {"batchItemFailures": []}
    counters = emulator.counters()
    assert counters["users_total"] == 230
    assert counters["create_many_calls"] == 3
    stored = dynamodb.scan(
        TableName=stack.outputs["TokensTableName"],
        FilterExpression="BulkRequestId = :r",
        ExpressionAttributeValues={":r": {"S": message_id}},
        Select="COUNT",
    )
    assert stored["Count"] == 230


def test_a_bulk_chunk_whose_answer_is_lost_is_dead_lettered_and_never_doubled(
    stack: LocalStack, functions: Functions, emulator: EmulatorHandle, sqs: Any
) -> None:
    queue_fn = functions.get("RegistrationQueueFunction")
    body = {"Quantity": 150, "RequestId": f"bulk-{uuid.uuid4().hex[:8]}"}
    emulator.set_faults(script=[{"call": "create_many", "fault": "drop_after_commit"}])

    first = queue_fn.invoke(sqs_event([body], queue_arn=stack.queue_arn("RegistrationQueue")))
    again = queue_fn.invoke(sqs_event([body], queue_arn=stack.queue_arn("RegistrationQueue")))

    assert first == again == {"batchItemFailures": []}
    counters = emulator.counters()
    assert counters["create_many_calls"] == 2  # the lost chunk once, the other chunk once
    assert counters["users_total"] == 150
    letters = drain(sqs, stack.queue_url("RegistrationDeadLetterQueue"))
    assert [m["MessageAttributes"]["Reason"]["StringValue"] for m in letters] == ["bulk_incomplete"] * 2
    assert "Chunk0" in letters[0]["MessageAttributes"]["ErrorDetail"]["StringValue"]


def test_a_bulk_request_falls_back_to_creates_when_create_many_is_not_offered(
    stack: LocalStack, functions: Functions, emulator: EmulatorHandle
) -> None:
    emulator.set_config(create_many_enabled=False)
    queue_fn = functions.get("RegistrationQueueFunction")
    event = sqs_event([{"Quantity": 12}], queue_arn=stack.queue_arn("RegistrationQueue"))

    assert queue_fn.invoke(event) == {"batchItemFailures": []}
    assert queue_fn.invoke(event) == {"batchItemFailures": []}

    counters = emulator.counters()
    assert counters["users_total"] == 12
    emulator.set_config(create_many_enabled=True)


def test_a_poison_signup_event_is_dead_lettered_with_its_reason(
    stack: LocalStack, functions: Functions, emulator: EmulatorHandle, sqs: Any
) -> None:
    event = signup_event({"FirstName": "no id", "ChildrenCount": -2})

    result = functions.get("SignupFunction").invoke(event)

    assert result["status"] == "dead_lettered"
    (letter,) = drain(sqs, stack.queue_url("SignupDeadLetterQueue"))
    assert letter["MessageAttributes"]["Source"]["StringValue"] == "signup"
    assert letter["MessageAttributes"]["OriginalMessageId"]["StringValue"] == event["id"]
    assert json.loads(letter["Body"]) == event["detail"]
    assert emulator.counters()["requests_total"] == 0
