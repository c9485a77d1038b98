"""The local stack of ``make run`` end to end: events and messages go in through the AWS APIs only, and each
test waits for the outcome where an operator would look for it (DynamoDB, the dead-letter queues, the
emulator's counters). The runtime routes them with Lambda's semantics (partial batches, redrive, async retries,
on-failure destinations, the schedule)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from local.runner import LocalService
from local.stack import LocalStack
from telematics_reg.credentials import SecretsManagerDeviceTokenKey
from telematics_reg.registration import device_token_for

from .conftest import REVOKED, DeadLetters, aws, put_signup, send_registration, user_by_client, wait_for


def _upstream_users(service: LocalService, client_id: str, alias: str = "default") -> int:
    counters = service.emulator.counters()["users_by_client_id"]
    instance_id = service.emulator.instance_id(alias) if alias in service.emulator.instances else alias
    return int(counters.get(f"{instance_id}/{client_id}", 0))


def test_a_signup_event_flows_to_a_stored_user(service: LocalService, stack: LocalStack) -> None:
    client_id = f"e2e-signup-{uuid.uuid4().hex[:8]}"

    put_signup(stack, {"ClientId": client_id, "FirstName": "Ada", "Gender": "Female"})

    user = wait_for(
        lambda: (u := user_by_client(stack, client_id)) and u["Status"] == "ACTIVE" and u,
        timeout=20,
        what=f"{client_id} stored",
    )
    key = SecretsManagerDeviceTokenKey(stack.outputs["DeviceTokenKeySecretArn"], client=aws(stack, "secretsmanager"))
    assert user["DeviceToken"] == device_token_for(service.emulator.instance_id(), client_id, key=key.get())
    assert user["AccessExpiresAt"] > time.time()
    assert _upstream_users(service, client_id) == 1
    upstream = service.emulator.user(user["DeviceToken"])
    assert upstream is not None
    assert upstream["Profile"]["FirstName"] == "Ada"


def test_a_poison_queue_message_lands_in_the_dlq_with_its_reason(
    service: LocalService, stack: LocalStack, dead_letters: DeadLetters
) -> None:
    client_id = f"e2e-poison-{uuid.uuid4().hex[:8]}"
    message_id = send_registration(stack, {"ClientId": client_id, "Gender": "Robot"})

    letter = dead_letters.wait_for("RegistrationDeadLetterQueue", client_id, timeout=20)

    attributes = {name: value["StringValue"] for name, value in letter["MessageAttributes"].items()}
    assert attributes["Reason"] == "invalid_fields"
    assert attributes["OriginalMessageId"] == message_id
    assert "Gender" in attributes["ErrorDetail"]
    assert json.loads(letter["Body"]) == {"ClientId": client_id, "Gender": "Robot"}  # kept as sent, to fix and redrive
    assert _upstream_users(service, client_id) == 0  # bad input never reaches the upstream


def test_a_message_that_keeps_failing_is_redriven_to_the_dlq_after_max_receive_count(
    service: LocalService, stack: LocalStack, dead_letters: DeadLetters
) -> None:
    sqs = aws(stack, "sqs")
    redrive = json.loads(
        sqs.get_queue_attributes(QueueUrl=stack.outputs["RegistrationQueueUrl"], AttributeNames=["RedrivePolicy"])[
            "Attributes"
        ]["RedrivePolicy"]
    )
    failures_before = service.runtime.stats().function("RegistrationQueueFunction").records_failed
    client_id = f"e2e-revoked-{uuid.uuid4().hex[:8]}"

    # The secret holds credentials for this alias that the upstream rejects (401): retried, never dead-lettered
    # by the function itself, so only SQS's redrive can end it.
    send_registration(stack, {"ClientId": client_id, "Instance": REVOKED})

    letter = dead_letters.wait_for("RegistrationDeadLetterQueue", client_id, timeout=40)
    assert "Reason" not in letter.get("MessageAttributes", {})  # moved by SQS, not sent by the function
    assert redrive["deadLetterTargetArn"] == stack.queue_arn("RegistrationDeadLetterQueue")
    assert int(letter["Attributes"]["ApproximateReceiveCount"]) > int(redrive["maxReceiveCount"])
    failed = service.runtime.stats().function("RegistrationQueueFunction").records_failed - failures_before
    assert failed >= int(redrive["maxReceiveCount"])
    assert user_by_client(stack, client_id, REVOKED) is None  # its claim was given back each time


def test_a_function_error_on_the_signup_path_ends_in_the_signup_dlq_after_retries(
    service: LocalService, stack: LocalStack, dead_letters: DeadLetters
) -> None:
    config = stack.event_invoke_configs["SignupFunction"]
    client_id = f"e2e-signup-revoked-{uuid.uuid4().hex[:8]}"

    event_id = put_signup(stack, {"ClientId": client_id, "Instance": REVOKED})

    letter = dead_letters.wait_for("SignupDeadLetterQueue", client_id, timeout=30)
    assert config["DestinationConfig"]["OnFailure"]["Destination"] == stack.queue_arn("SignupDeadLetterQueue")
    record: dict[str, Any] = json.loads(letter["Body"])  # Lambda's asynchronous invocation record
    assert record["requestContext"]["condition"] == "RetriesExhausted"
    assert record["requestContext"]["approximateInvokeCount"] == int(config["MaximumRetryAttempts"]) + 1
    assert record["requestContext"]["functionArn"].startswith(stack.functions["SignupFunction"].arn)
    assert record["responseContext"]["functionError"] == "Unhandled"
    assert record["responsePayload"]["errorType"] == "UnauthorizedError"
    assert record["requestPayload"]["id"] == event_id
    assert record["requestPayload"]["detail-type"] == "UserSignedUp"
    assert record["requestPayload"]["detail"]["ClientId"] == client_id


def test_the_schedule_fires_the_sweeper_and_tokens_rotate(service: LocalService, stack: LocalStack) -> None:
    client_id = f"e2e-rotate-{uuid.uuid4().hex[:8]}"
    send_registration(stack, {"ClientId": client_id})
    first = wait_for(
        lambda: (u := user_by_client(stack, client_id)) and u["Status"] == "ACTIVE" and u,
        timeout=20,
        what=f"{client_id} stored",
    )

    # Tokens live a few seconds past the refresh margin: each sweep after that queues a job, the worker rotates.
    rotated = wait_for(
        lambda: (u := user_by_client(stack, client_id)) and u["Version"] >= first["Version"] + 2 and u,
        timeout=30,
        what=f"two rotations of {client_id}'s tokens",
    )

    assert rotated["AccessToken"] != first["AccessToken"]
    assert rotated["RefreshToken"] != first["RefreshToken"]
    assert rotated["AccessExpiresAt"] > time.time()
    upstream = service.emulator.user(rotated["DeviceToken"])
    assert upstream is not None
    assert upstream["Refreshes"] >= 2
    assert service.emulator.counters()["rejected_refresh_tokens"] == 0
    stats = service.runtime.stats()
    assert stats.schedule_fires.get("RefreshSweeperFunctionSweep", 0) >= 1
    assert stats.function("RefreshSweeperFunction").invocations >= 1
    assert stats.function("RefreshWorkerFunction").invocations >= 1


def test_a_rule_event_stays_in_its_tap_until_its_asynchronous_invocation_is_finished(
    service: LocalService, stack: LocalStack, dead_letters: DeadLetters
) -> None:
    # Lambda's asynchronous event queue is durable: an event accepted from the rule must survive a crash of the
    # runtime while it waits for a retry. Locally its tap message stands for it, so it must not be deleted before
    # the event is finished with (here: three failed attempts, then the on-failure destination).
    sqs = aws(stack, "sqs")
    (tap,) = [t.tap_queue_url for rule in stack.rules for t in rule.targets if t.function == "SignupFunction"]
    assert tap is not None
    errors_before = service.runtime.stats().function("SignupFunction").errors
    client_id = f"e2e-tap-held-{uuid.uuid4().hex[:8]}"

    put_signup(stack, {"ClientId": client_id, "Instance": REVOKED})

    wait_for(
        lambda: service.runtime.stats().function("SignupFunction").errors > errors_before,
        timeout=20,
        what="the first failed attempt",
        every=0.02,
    )
    held = sqs.get_queue_attributes(QueueUrl=tap, AttributeNames=["ApproximateNumberOfMessagesNotVisible"])
    assert int(held["Attributes"]["ApproximateNumberOfMessagesNotVisible"]) >= 1  # waiting for its retry, held
    dead_letters.wait_for("SignupDeadLetterQueue", client_id, timeout=30)
    wait_for(
        lambda: (
            int(
                sqs.get_queue_attributes(QueueUrl=tap, AttributeNames=["ApproximateNumberOfMessagesNotVisible"])[
                    "Attributes"
                ]["ApproximateNumberOfMessagesNotVisible"]
            )
            == 0
        ),
        timeout=10,
        what="the tap message deleted once the event was finished",
    )
