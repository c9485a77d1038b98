"""Functional fixtures: a moto server with the resources of template.yaml, the User Service emulator, and the
service's functions run in-process with the environment the template gives them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from local import moto_server
from local.emulator.testing import EmulatorHandle, running_emulator
from local.lambda_runtime import LocalFunction
from local.stack import LocalStack, provision

ROOT = Path(__file__).resolve().parents[2]
INSTANCES = {
    "default": {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())},
    "fleet-eu": {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())},
}
# Credentials as an operator may paste them: keys with a stray character. Given as they are to an emulator and
# to the stack's secret (tests/functional/test_secrecy.py); the log guard looks for them too.
MALFORMED_INSTANCES = {
    "default": INSTANCES["default"],
    "newline": {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4()) + "\n"},
    "leading-space": {"InstanceId": str(uuid.uuid4()), "InstanceKey": " " + str(uuid.uuid4())},
    "trailing-space": {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4()) + " "},
}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    server = moto_server.start()
    yield moto_server.endpoint(server)
    server.stop()


@pytest.fixture(scope="session")
def aws_env(moto_endpoint: str) -> Iterator[None]:
    patch = pytest.MonkeyPatch()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_endpoint,
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_METRICS_DISABLED": "true",
    }.items():
        patch.setenv(key, value)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def upstream() -> Iterator[EmulatorHandle]:
    with running_emulator(instances=INSTANCES, token_lifetime=3600) as handle:
        yield handle


@pytest.fixture(scope="session")
def stack(moto_endpoint: str, aws_env: None, upstream: EmulatorHandle) -> LocalStack:
    return provision(
        moto_endpoint,
        template_path=ROOT / "template.yaml",
        parameters={"UserServiceUrl": upstream.url, "LogLevel": "DEBUG"},
        stack_name="functional",
        instance_credentials=INSTANCES,
        admin_credentials=upstream.admin_account,
    )


@pytest.fixture
def emulator(upstream: EmulatorHandle) -> Iterator[EmulatorHandle]:
    """The emulator with clean state and no faults for this test."""
    upstream.reset()
    yield upstream
    upstream.reset()


class Functions:
    """The template's functions, invocable in-process, with optional environment overrides per test."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack

    def get(self, logical_id: str, **overrides: str) -> LocalFunction:
        spec = self.stack.functions[logical_id]
        assert spec.code_path is not None
        environment = self.stack.function_environment(logical_id) | {
            "POWERTOOLS_TRACE_DISABLED": "true",
            "POWERTOOLS_METRICS_DISABLED": "true",
            **overrides,
        }
        return LocalFunction(
            logical_id,
            handler=spec.handler,
            code_path=Path(spec.code_path),
            environment=environment,
            timeout=spec.timeout,
            memory=spec.memory,
        ).warm()


@pytest.fixture
def functions(stack: LocalStack) -> Functions:
    return Functions(stack)


@pytest.fixture
def sqs(stack: LocalStack) -> Any:
    return boto3.client("sqs", endpoint_url=stack.endpoint_url, region_name=stack.region)


@pytest.fixture
def dynamodb(stack: LocalStack) -> Any:
    return boto3.client("dynamodb", endpoint_url=stack.endpoint_url, region_name=stack.region)


@pytest.fixture(autouse=True)
def _empty_dead_letter_queues(request: pytest.FixtureRequest) -> None:
    if "stack" not in request.fixturenames:
        return
    stack: LocalStack = request.getfixturevalue("stack")
    client = boto3.client("sqs", endpoint_url=stack.endpoint_url, region_name=stack.region)
    # Drained rather than purged: SQS allows one purge a minute per queue.
    for logical_id in ("RegistrationDeadLetterQueue", "SignupDeadLetterQueue", "RefreshDeadLetterQueue"):
        drain(client, stack.queue_url(logical_id))


def drain(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    """Every message currently in a queue, with its attributes (received and deleted)."""
    messages: list[dict[str, Any]] = []
    while True:
        batch = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, MessageAttributeNames=["All"], WaitTimeSeconds=0
        ).get("Messages", [])
        if not batch:
            return messages
        messages.extend(batch)
        for message in batch:
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])


def sqs_event(bodies: list[Any], *, queue_arn: str, message_ids: list[str] | None = None) -> dict[str, Any]:
    """An SQS event as Lambda delivers it to a function."""
    records = []
    for index, body in enumerate(bodies):
        message_id = message_ids[index] if message_ids else str(uuid.uuid4())
        records.append(
            {
                "messageId": message_id,
                "receiptHandle": f"handle-{message_id}",
                "body": body if isinstance(body, str) else json.dumps(body),
                "attributes": {
                    "ApproximateReceiveCount": "1",
                    "SentTimestamp": "1763719200000",
                    "SenderId": "AIDATEST",
                    "ApproximateFirstReceiveTimestamp": "1763719200001",
                },
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1",
            }
        )
    return {"Records": records}


def signup_event(detail: dict[str, Any], *, source: str = "customer.app") -> dict[str, Any]:
    """An EventBridge event as a rule delivers it to a function."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "UserSignedUp",
        "source": source,
        "account": "123456789012",
        "time": "2026-11-21T10:00:00Z",
        "region": "us-east-1",
        "resources": [],
        "detail": detail,
    }
