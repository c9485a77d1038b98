"""Bulk requests against moto and the emulator: the DynamoDB conditions behind chunk claims, a redrive through
``telematics-reg dlq redrive``, a lost Create answer in the per-user fallback, and a reused RequestId."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.dynamodb.types import TypeDeserializer
from handle_registration_queue import handle_registration_batch

from local.emulator.testing import EmulatorHandle
from local.lambda_runtime import LocalFunction, environment
from local.stack import LocalStack
from telematics_cli import main
from telematics_reg.batching import BatchFailedError
from telematics_reg.settings import ServiceSettings
from telematics_reg.store import ChunkClaim, ChunkState, ConditionFailedError, DynamoTokenStore, NewUser
from telematics_reg.wiring import BULK_STORE_SECONDS, build_queue_intake

from .conftest import Functions, drain, sqs_event

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(stack: LocalStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    stack_file = stack.save(tmp_path / "stack.json")

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--local-stack", str(stack_file), *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def registration_queue(stack: LocalStack, sqs: Any) -> Any:
    url = stack.outputs["RegistrationQueueUrl"]
    drain(sqs, url)
    yield url
    drain(sqs, url)


def _deliver_until_quiet(sqs: Any, queue_url: str, queue_fn: LocalFunction, rounds: int = 8) -> None:
    """What the SQS event source does, with no visibility wait: failed records come back at once, and SQS
    moves a message to the DLQ after ``maxReceiveCount`` receives."""
    for _ in range(rounds):
        messages = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=0, AttributeNames=["All"]
        ).get("Messages", [])
        if not messages:
            return
        event = {
            "Records": [
                {
                    "messageId": m["MessageId"],
                    "receiptHandle": m["ReceiptHandle"],
                    "body": m["Body"],
                    "attributes": m.get("Attributes", {}),
                    "messageAttributes": {},
                    "md5OfBody": m["MD5OfBody"],
                    "eventSource": "aws:sqs",
                    "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:RegistrationQueue",
                    "awsRegion": "us-east-1",
                }
                for m in messages
            ]
        }
        try:
            response = queue_fn.invoke(event)
            failed = {item["itemIdentifier"] for item in response["batchItemFailures"]}
        except Exception:  # noqa: BLE001 - every record of the batch failed: all come back
            failed = {m["MessageId"] for m in messages}
        for message in messages:
            if message["MessageId"] not in failed:
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])


def _stored_for(dynamodb: Any, stack: LocalStack, request_id: str) -> list[dict[str, Any]]:
    deserializer = TypeDeserializer()
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {
        "TableName": stack.outputs["TokensTableName"],
        "FilterExpression": "BulkRequestId = :r",
        "ExpressionAttributeValues": {":r": {"S": request_id}},
    }
    while True:
        page = dynamodb.scan(**kwargs)
        items += [{k: deserializer.deserialize(v) for k, v in i.items()} for i in page.get("Items", [])]
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def test_a_bulk_without_request_id_dead_lettered_by_sqs_and_redriven_makes_exactly_its_quantity(
    stack: LocalStack,
    functions: Functions,
    emulator: EmulatorHandle,
    sqs: Any,
    dynamodb: Any,
    cli: Cli,
    registration_queue: str,
) -> None:
    # Chunk 0 is made; chunk 1 is answered 503 on every delivery until SQS moves the message to the DLQ.
    emulator.set_faults(
        script=[
            {"call": "create_many", "fault": "hang", "hang_s": 0.01},
            *[{"call": "create_many", "fault": "error", "status": 503}] * 12,
        ]
    )
    queue_fn = functions.get(
        "RegistrationQueueFunction", UPSTREAM_MAX_ATTEMPTS="1", BULK_CONTINUATION_DELAY_SECONDS="0"
    )
    message_id = sqs.send_message(QueueUrl=registration_queue, MessageBody=json.dumps({"Quantity": 200}))["MessageId"]

    _deliver_until_quiet(sqs, registration_queue, queue_fn)

    assert emulator.counters()["users_total"] == 100
    dlq = stack.outputs["RegistrationDeadLetterQueueUrl"]
    peek = sqs.receive_message(QueueUrl=dlq, VisibilityTimeout=0, MessageAttributeNames=["All"])["Messages"]
    # Moved by SQS, with no Reason: the continuation the first delivery sent after storing chunk 0 (it carries the
    # bulk's id, the first message's, stamped in its body), which then made no progress.
    assert len(peek) == 1
    assert json.loads(peek[0]["Body"]).get("RequestId") == message_id
    assert "Reason" not in peek[0].get("MessageAttributes", {})

    # The operator fixes the cause and redrives, as the README says.
    emulator.clear_faults()
    code, out, _ = cli("dlq", "redrive", "--queue", "registration", "--json")
    assert (code, json.loads(out)["moved"]) == (0, 1)
    _deliver_until_quiet(sqs, registration_queue, queue_fn)

    counters = emulator.counters()
    assert counters["users_total"] == 200  # not 300: the redrive continued the same bulk
    assert counters["create_many_calls"] == 2
    assert len(_stored_for(dynamodb, stack, message_id)) == 200
    assert drain(sqs, dlq) == []


def test_chunk_claims_in_dynamodb_admit_one_caller_and_fence_a_caller_that_was_taken_over(
    stack: LocalStack, aws_env: None
) -> None:
    client = boto3.client("dynamodb", endpoint_url=stack.endpoint_url, region_name=stack.region)
    store = DynamoTokenStore(client, table_name=stack.outputs["TokensTableName"])
    request_id = f"claims-{uuid.uuid4().hex[:8]}"
    where: dict[str, Any] = {"instance": "default", "request_id": request_id, "index": 0}
    store.start_bulk(instance="default", request_id=request_id, quantity=100, chunk_size=100, now=1000)

    store.claim_chunk(**where, owner="A", now=1000)
    with pytest.raises(ConditionFailedError):
        store.claim_chunk(**where, owner="twin", now=1001)  # a duplicate delivery: chunk is CALLING
    assert store.make_chunk_per_user(**where, owner="A") == 0
    user = NewUser(str(uuid.uuid4()), "default", str(uuid.uuid4()), None, request_id)
    store.store_chunk_user(**where, owner="A", position=0, user=user, now=1002)
    # The client's retry of that transaction after its answer was lost: done already, not a takeover.
    store.store_chunk_user(**where, owner="A", position=0, user=user, now=1002)
    progress = store.start_bulk(instance="default", request_id=request_id, quantity=100, chunk_size=100, now=1003)
    assert (progress.chunks[0], progress.claims[0], progress.made[0]) == (ChunkState.CALLING, ChunkClaim("A", 1000), 1)

    # A's claim lapsed: B and C both judge it abandoned; only one takes it over.
    store.claim_chunk(**where, owner="B", now=1200, abandoned=ChunkClaim("A", 1000))
    with pytest.raises(ConditionFailedError):
        store.claim_chunk(**where, owner="C", now=1200, abandoned=ChunkClaim("A", 1000))
    # A was only slow: it can neither store nor move the chunk any more.
    late = NewUser(str(uuid.uuid4()), "default", str(uuid.uuid4()), None, request_id)
    with pytest.raises(ConditionFailedError):
        store.store_chunk_user(**where, owner="A", position=1, user=late, now=1201)
    assert store.get_user(late.device_token) is None  # the transaction wrote nothing
    with pytest.raises(ConditionFailedError):
        store.set_chunk_state(**where, expected=[ChunkState.CALLING], new=ChunkState.TODO, now=1201, owner="A")
    with pytest.raises(ConditionFailedError):
        store.store_chunk_user(**where, owner="B", position=0, user=late, now=1201)  # position already counted
    store.store_chunk_user(**where, owner="B", position=1, user=late, now=1201)
    store.set_chunk_state(**where, expected=[ChunkState.CALLING], new=ChunkState.DONE, stored=2, now=1202, owner="B")

    done = store.start_bulk(instance="default", request_id=request_id, quantity=100, chunk_size=100, now=1203)
    assert (done.chunks[0], done.claims, done.made[0], done.stored[0]) == (ChunkState.DONE, {}, 2, 2)


def test_a_lost_create_answer_in_the_per_user_fallback_is_stored_once_without_a_login(
    stack: LocalStack, functions: Functions, emulator: EmulatorHandle, dynamodb: Any
) -> None:
    emulator.set_config(create_many_enabled=False)
    emulator.set_faults(script=[{"call": "create", "fault": "drop_after_commit"}])
    queue_fn = functions.get("RegistrationQueueFunction", UPSTREAM_MAX_ATTEMPTS="1")
    request_id = f"fallback-{uuid.uuid4().hex[:8]}"
    event = sqs_event([{"Quantity": 12, "RequestId": request_id}], queue_arn=stack.queue_arn("RegistrationQueue"))

    try:
        first = queue_fn.invoke(event)
        assert len(first["batchItemFailures"]) == 1
    except Exception:  # noqa: BLE001, S110 - a batch of one failed record is retried whole: the same outcome
        pass
    again = queue_fn.invoke(event)

    assert again == {"batchItemFailures": []}
    counters = emulator.counters()
    assert counters["users_total"] == 12
    assert counters["logins"] == 0
    stored = _stored_for(dynamodb, stack, request_id)
    assert len(stored) == 12
    assert sorted(item["Status"] for item in stored) == ["ACTIVE"] * 11 + ["TOKENLESS"]
    emulator.set_config(create_many_enabled=True)


def test_a_request_id_reused_for_another_quantity_is_dead_lettered_as_a_conflict(
    stack: LocalStack, functions: Functions, emulator: EmulatorHandle, sqs: Any
) -> None:
    queue_fn = functions.get("RegistrationQueueFunction")
    request_id = f"reuse-{uuid.uuid4().hex[:8]}"
    arn = stack.queue_arn("RegistrationQueue")

    assert queue_fn.invoke(sqs_event([{"Quantity": 150, "RequestId": request_id}], queue_arn=arn)) == {
        "batchItemFailures": []
    }
    assert queue_fn.invoke(sqs_event([{"Quantity": 250, "RequestId": request_id}], queue_arn=arn)) == {
        "batchItemFailures": []
    }

    assert emulator.counters()["users_total"] == 150
    (letter,) = drain(sqs, stack.queue_url("RegistrationDeadLetterQueue"))
    assert letter["MessageAttributes"]["Reason"]["StringValue"] == "request_id_conflict"
    assert "RequestId" in letter["MessageAttributes"]["ErrorDetail"]["StringValue"]


def test_a_large_bulk_without_create_many_finishes_by_continuations_at_one_receive_per_message(
    stack: LocalStack, functions: Functions, emulator: EmulatorHandle, sqs: Any, dynamodb: Any, registration_queue: str
) -> None:
    # The queue function's own wiring (moto, the emulator, the registration queue for continuations) and its
    # batch handler. Its time is metered rather than read off the wall clock, so that every invocation has room
    # for about 100 Creates on any machine: each look at the time left costs 0.37 s of a 60 s invocation, and a
    # Create starts only with 23 s left (connect + read timeouts + storing).
    emulator.set_config(create_many_enabled=False)
    queue_fn = functions.get("RegistrationQueueFunction", BULK_CONTINUATION_DELAY_SECONDS="1")
    with environment(queue_fn.environment):
        settings = ServiceSettings()
        intake = build_queue_intake(settings)
    bulk_call_seconds = settings.upstream_connect_timeout + settings.upstream_read_timeout + BULK_STORE_SECONDS
    seconds_per_look = (queue_fn.timeout - bulk_call_seconds) / 100
    first = sqs.send_message(QueueUrl=registration_queue, MessageBody=json.dumps({"Quantity": 450}))["MessageId"]

    receive_counts: dict[str, int] = {}
    made: list[int] = []
    quiet = 0
    while quiet < 3 and len(made) < 20:
        # The event source: long-polls, honours the continuations' DelaySeconds, deletes what succeeded.
        messages = sqs.receive_message(
            QueueUrl=registration_queue, MaxNumberOfMessages=10, WaitTimeSeconds=2, AttributeNames=["All"]
        ).get("Messages", [])
        if not messages:
            quiet += 1
            continue
        quiet = 0
        for message in messages:
            receive_counts[message["MessageId"]] = int(message["Attributes"]["ApproximateReceiveCount"])
        event = sqs_event(
            [m["Body"] for m in messages],
            queue_arn=stack.queue_arn("RegistrationQueue"),
            message_ids=[m["MessageId"] for m in messages],
        )
        looks = itertools.count()
        before = emulator.counters()["users_total"]
        try:
            response = handle_registration_batch(
                event,
                intake,
                concurrency=settings.upstream_concurrency,
                time_left=lambda looks=looks: queue_fn.timeout - next(looks) * seconds_per_look,
            )
            failed = {item["itemIdentifier"] for item in response["batchItemFailures"]}
        except BatchFailedError:  # every record of the batch failed: all come back
            failed = {m["MessageId"] for m in messages}
        made.append(emulator.counters()["users_total"] - before)
        for message in messages:
            if message["MessageId"] not in failed:
                sqs.delete_message(QueueUrl=registration_queue, ReceiptHandle=message["ReceiptHandle"])

    # One message per invocation, each a continuation of the last, each with room for ~100 Creates.
    assert len(made) == len(receive_counts) == 5
    assert all(95 <= n <= 100 for n in made[:-1])
    assert set(receive_counts.values()) == {1}  # progress never spent a receive
    assert emulator.counters()["users_total"] == 450
    stored = _stored_for(dynamodb, stack, first)
    assert len(stored) == len({item["pk"] for item in stored}) == 450
    assert drain(sqs, stack.outputs["RegistrationDeadLetterQueueUrl"]) == []

    # A late duplicate of a continuation (say, SQS delivering one twice) finds the bulk done: nothing more.
    late = sqs_event(
        [json.dumps({"Quantity": 450, "RequestId": first})], queue_arn=stack.queue_arn("RegistrationQueue")
    )
    assert handle_registration_batch(late, intake, concurrency=1) == {"batchItemFailures": []}
    assert emulator.counters()["users_total"] == 450
    assert drain(sqs, registration_queue) == []
    emulator.set_config(create_many_enabled=True)
