"""What the benchmarks of the built artifact (``bench/cold_start.py``, ``bench/memory.py``) share: a read-only copy of
``.aws-sam/build``, a fresh stack and emulator per round, and the events each function is given.

Every function of the template gets its own kind of event, shaped as Lambda delivers it: EventBridge events for
signup, SQS batches (10 records, the template's ``BatchSize``) for the queue, refresh worker and lifecycle functions,
the schedule's event for the sweeper and the reconcile function.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
from common import REPO_ROOT

from local.artifact import BuiltArtifact
from local.emulator.testing import EmulatorHandle, running_emulator
from local.stack import LocalStack, provision

EVENTS = REPO_ROOT / "events"
#: Records per SQS batch: the template's BatchSize for every queue.
BATCH = 10
#: The emulator's token lifetime; a refresh margin above it makes every stored user due.
TOKEN_LIFETIME = 3600
DUE_MARGIN = {"REFRESH_MARGIN_SECONDS": str(2 * TOKEN_LIFETIME)}


@dataclass
class Round:
    """One round's world: its own emulator and its own stack (table, queues, secrets) in the shared moto server."""

    stack: LocalStack
    emulator: EmulatorHandle
    tag: str

    def client(self, service: str) -> Any:
        return boto3.client(service, endpoint_url=self.stack.endpoint_url, region_name=self.stack.region)


@contextmanager
def read_only_copy(artifact: BuiltArtifact) -> Iterator[BuiltArtifact]:
    """A copy of the build without write permission anywhere, as Lambda's code folders are."""
    scratch = Path(tempfile.mkdtemp(prefix="built-"))
    try:
        yield artifact.read_only_copy(scratch / "build")
    finally:
        for folder, _dirs, _files in os.walk(scratch):
            Path(folder).chmod(stat.S_IRWXU)
        shutil.rmtree(scratch)


@contextmanager
def fresh_round(endpoint: str, number: int, prefix: str) -> Iterator[Round]:
    """A new emulator and a new stack, so that no round finds the users, leases or audit of another."""
    instances = {"default": {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())}}
    with running_emulator(instances=instances, token_lifetime=TOKEN_LIFETIME) as upstream:
        stack = provision(
            endpoint,
            template_path=REPO_ROOT / "template.yaml",
            parameters={"UserServiceUrl": upstream.url},
            stack_name=f"{prefix}-{number}-{uuid.uuid4().hex[:4]}",
            instance_credentials=instances,
            admin_credentials=upstream.admin_account,
        )
        yield Round(stack=stack, emulator=upstream, tag=f"r{number}")


def sqs_event(bodies: list[Any], queue_arn: str) -> dict[str, Any]:
    """An SQS batch as Lambda's event source mapping delivers it (each body a JSON value, or a message's text)."""
    now_ms = int(time.time() * 1000)
    return {
        "Records": [
            {
                "messageId": str(uuid.uuid4()),
                "receiptHandle": f"handle-{n}",
                "body": body if isinstance(body, str) else json.dumps(body),
                "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": str(now_ms)},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1",
            }
            for n, body in enumerate(bodies)
        ]
    }


def signup_event(client_id: str) -> dict[str, Any]:
    """events/signup.json for a new user, sent now."""
    sample: dict[str, Any] = json.loads((EVENTS / "signup.json").read_text(encoding="utf-8"))
    sample["id"] = str(uuid.uuid4())
    sample["time"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    sample["detail"]["ClientId"] = client_id
    return sample


def scheduled_event(sample: str) -> dict[str, Any]:
    """A schedule's event (events/refresh-sweep.json, events/reconcile.json)."""
    event: dict[str, Any] = json.loads((EVENTS / sample).read_text(encoding="utf-8"))
    return event


def client_ids(prefix: str, count: int = BATCH) -> list[str]:
    return [f"{prefix}-{n}" for n in range(count)]


def registration_batch(world: Round, prefix: str) -> dict[str, Any]:
    """A queue batch of 10 new users, each with a profile as the app would send it."""
    bodies = [
        {"ClientId": client_id, "FirstName": "Ada", "LastName": "Lovelace", "Email": f"{client_id}@example.com"}
        for client_id in client_ids(prefix)
    ]
    return sqs_event(bodies, world.stack.queue_arn("RegistrationQueue"))


def bulk_message(world: Round, quantity: int) -> dict[str, Any]:
    """One queue message asking for ``quantity`` anonymous users (CreateMany, 100 a call)."""
    body = {"Quantity": quantity, "RequestId": f"bench-{uuid.uuid4()}", "CreateAccessToken": True}
    return sqs_event([body], world.stack.queue_arn("RegistrationQueue"))


def lifecycle_batch(world: Round, prefix: str) -> dict[str, Any]:
    """A lifecycle batch of 10 profile updates, one per user registered under ``prefix`` (events/lifecycle-updated
    .json's shape: an EventBridge event the lifecycle rule put on the queue)."""
    occurred = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    bodies = [
        {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": "UserUpdated",
            "source": "customer.app",
            "account": "123456789012",
            "time": occurred,
            "region": "us-east-1",
            "resources": [],
            "detail": {"ClientId": client_id, "OccurredAt": occurred, "City": "Ockham", "LastName": "King"},
        }
        for client_id in client_ids(prefix)
    ]
    return sqs_event(bodies, world.stack.queue_arn("LifecycleQueue"))


def refresh_batches(world: Round, batches: int) -> list[dict[str, Any]]:
    """``batches`` batches of 10 jobs the sweeper queued (each job's message as SQS delivers it)."""
    sqs = world.client("sqs")
    url = world.stack.queue_url("RefreshQueue")
    bodies: list[str] = []
    deadline = time.monotonic() + 30
    while len(bodies) < batches * BATCH and time.monotonic() < deadline:
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=600).get("Messages", [])
        bodies.extend(m["Body"] for m in messages)
    if len(bodies) < batches * BATCH:
        raise RuntimeError(f"expected {batches * BATCH} refresh jobs on the queue, found {len(bodies)}")
    arn = world.stack.queue_arn("RefreshQueue")
    return [sqs_event(bodies[n * BATCH : (n + 1) * BATCH], arn) for n in range(batches)]


def failures(name: str, report: dict[str, Any]) -> None:
    """Raise when an invocation failed or reported failed records: a benchmark of failing work measures nothing."""
    for invocation in report.get("invocations", []):
        if "error" in invocation:
            raise RuntimeError(f"{name} failed: {invocation['error']}\n{report.get('stdout', '')[-3000:]}")
        result = invocation.get("result")
        if isinstance(result, dict) and result.get("batchItemFailures"):
            raise RuntimeError(f"{name} reported failed records: {result}\n{report.get('stdout', '')[-3000:]}")
