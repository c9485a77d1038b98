"""End-to-end fixtures: the local stack of ``make run`` (moto + emulator + template resources + LocalRuntime),
driven only through the AWS APIs (PutEvents, SendMessage) and observed in DynamoDB, the DLQs and the emulator.

moto's state is per process and other suites provision the same template in this process: this one uses its own
region and stack name, so neither its buses nor its queues meet theirs.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.dynamodb.types import TypeDeserializer

from local.runner import LocalService, RuntimeOptions
from local.stack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
REGION = "eu-central-1"
#: An alias in the credentials secret that the emulator does not know: every call with it is answered 401.
REVOKED = "revoked"
#: Tokens live just past the smallest refresh margin the template allows, so they rotate every few seconds.
TOKEN_LIFETIME = 63
REFRESH_MARGIN = 60


@pytest.fixture(scope="module")
def service() -> Iterator[LocalService]:
    local = LocalService(
        template_path=ROOT / "template.yaml",
        stack_name="e2e",
        region=REGION,
        parameters={
            "LogLevel": "WARNING",
            "RefreshMarginSeconds": str(REFRESH_MARGIN),
            "RefreshSpreadSeconds": "0",
        },
        unknown_instances={REVOKED: {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())}},
        token_lifetime=TOKEN_LIFETIME,
        options=RuntimeOptions(failure_visibility_timeout=1, schedule_interval=1.0, async_retry_delay=0.5),
    )
    with local:
        yield local


@pytest.fixture(scope="module")
def stack(service: LocalService) -> LocalStack:
    return service.stack


def aws(stack: LocalStack, name: str) -> Any:
    return boto3.client(
        name,
        endpoint_url=stack.endpoint_url,
        region_name=stack.region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def wait_for[T](probe: Callable[[], T | None], *, timeout: float, what: str, every: float = 0.2) -> T:
    """The first truthy value of ``probe()``; fails the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


class DeadLetters:
    """Collects the messages of the stack's dead-letter queues (received and deleted), for every test to search."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.sqs = aws(stack, "sqs")
        self.seen: dict[str, list[dict[str, Any]]] = {}

    def _collect(self, logical_id: str) -> list[dict[str, Any]]:
        url = self.stack.queue_url(logical_id)
        found = self.seen.setdefault(logical_id, [])
        while True:
            batch = self.sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["All"], MessageAttributeNames=["All"]
            ).get("Messages", [])
            if not batch:
                return found
            found.extend(batch)
            for message in batch:
                self.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])

    def wait_for(self, logical_id: str, marker: str, *, timeout: float) -> dict[str, Any]:
        """The dead letter of ``logical_id`` whose body contains ``marker``."""

        def probe() -> dict[str, Any] | None:
            return next((m for m in self._collect(logical_id) if marker in m["Body"]), None)

        return wait_for(probe, timeout=timeout, what=f"a message with {marker!r} in {logical_id}")


@pytest.fixture(scope="module")
def dead_letters(stack: LocalStack) -> DeadLetters:
    return DeadLetters(stack)


def user_by_client(stack: LocalStack, client_id: str, instance: str = "default") -> dict[str, Any] | None:
    """The stored user of a ClientId, through the table's ByClient index and a consistent read."""
    dynamodb = aws(stack, "dynamodb")
    table = stack.outputs["TokensTableName"]
    found = dynamodb.query(
        TableName=table,
        IndexName="ByClient",
        KeyConditionExpression="ClientKey = :k",
        ExpressionAttributeValues={":k": {"S": f"{instance}#{client_id}"}},
    )["Items"]
    if not found:
        return None
    item = dynamodb.get_item(TableName=table, Key={"pk": found[0]["pk"]}, ConsistentRead=True).get("Item")
    deserializer = TypeDeserializer()
    return {key: deserializer.deserialize(value) for key, value in (item or {}).items()} or None


def put_signup(stack: LocalStack, detail: dict[str, Any]) -> str:
    """Publish a UserSignedUp event as the customer's app does; returns its id."""
    response = aws(stack, "events").put_events(
        Entries=[
            {
                "EventBusName": stack.parameters["SignupEventBusName"],
                "Source": stack.parameters["SignupEventSource"],
                "DetailType": "UserSignedUp",
                "Detail": json.dumps(detail),
            }
        ]
    )
    assert response["FailedEntryCount"] == 0, response
    return str(response["Entries"][0]["EventId"])


def send_registration(stack: LocalStack, body: str | dict[str, Any]) -> str:
    """Send one message to the registration queue; returns its id."""
    text = body if isinstance(body, str) else json.dumps(body)
    response = aws(stack, "sqs").send_message(QueueUrl=stack.outputs["RegistrationQueueUrl"], MessageBody=text)
    return str(response["MessageId"])
