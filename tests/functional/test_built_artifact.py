"""The built artifact itself, run as Lambda runs it: every function from `.aws-sam/build`, each in a fresh
interpreter of the runtime's Python holding nothing but boto3, with ``PYTHONDONTWRITEBYTECODE=1`` on a read-only
copy of the build, against moto and the emulator, through the samples of events/ and through the registration and
refresh flows end to end.

Needs `sam build`'s output and the runtime stand-in (`.venv-runtime`): `make test` provides both (and sets
TELEMATICS_BUILD_DIR and TELEMATICS_RUNTIME_PYTHON); run by hand without them, these tests are skipped.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from local.artifact import BuiltArtifact
from local.emulator.testing import EmulatorHandle
from local.stack import LocalStack, provision
from tests.conftest import secrets_in

from .conftest import INSTANCES, ROOT, drain

EVENTS = ROOT / "events"

#: The samples each function is invoked with, in this order (one container per function, as Lambda would).
SAMPLES = {
    "SignupFunction": ["signup.json", "signup-duplicate.json", "signup-camelcase.json", "signup-poison.json"],
    "RegistrationQueueFunction": [
        "queue-registrations.json",
        "queue-bulk.json",
        "queue-poison.json",
        "queue-mixed.json",
        "queue-duplicate.json",
    ],
    "RefreshSweeperFunction": ["refresh-sweep.json"],
    "RefreshWorkerFunction": ["refresh-jobs.json"],
    # Every change in the lives of customer-1001 and customer-1002 (registered by signup.json and
    # signup-camelcase.json), in the order of tests/unit/test_lifecycle.py, then the malformed changes (each
    # dead-lettered with its reason, without the upstream).
    "LifecycleFunction": [
        "lifecycle-updated.json",
        "lifecycle-stale.json",
        "lifecycle-deactivated.json",
        "lifecycle-reactivated.json",
        "lifecycle-moved.json",
        "lifecycle-deleted.json",
        "lifecycle-operator-actions.json",
        "lifecycle-poison.json",
    ],
    "ReconcileFunction": ["reconcile.json"],
}
#: The lifecycle function applies a batch's records one after the other, so that the samples' outcomes do not hang
#: on which of a user's concurrent records wins its lease (the loser would be retried by SQS, then dropped or
#: dead-lettered depending on what applied meanwhile); the concurrent case has tests of its own
#: (tests/unit/test_lifecycle.py, tests/e2e/test_lifecycle_stack.py).
OVERRIDES = {"LifecycleFunction": {"UPSTREAM_CONCURRENCY": "1"}}
#: The queue whose records a function's samples stand for.
SOURCE_QUEUES = {"RefreshWorkerFunction": "RefreshQueue", "LifecycleFunction": "LifecycleQueue"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltArtifact]:
    build_dir = os.environ.get("TELEMATICS_BUILD_DIR")
    if not build_dir:
        pytest.skip("needs sam build's output: run `make test` or `make build artifact`")
    scratch = tmp_path_factory.mktemp("built")
    yield BuiltArtifact(Path(build_dir)).read_only_copy(scratch / "build")
    for folder, _dirs, _files in os.walk(scratch):
        Path(folder).chmod(stat.S_IRWXU)


@pytest.fixture(scope="module")
def runtime_python() -> Path:
    python = os.environ.get("TELEMATICS_RUNTIME_PYTHON")
    if not python:
        pytest.skip("needs the runtime stand-in: run `make test` or `make artifact`")
    return Path(python)


@pytest.fixture(scope="module")
def artifact_stack(moto_endpoint: str, aws_env: None, upstream: EmulatorHandle) -> LocalStack:
    """A stack of its own, so that what the built functions do (a sweep above all) touches no other test's users."""
    return provision(
        moto_endpoint,
        template_path=ROOT / "template.yaml",
        parameters={"UserServiceUrl": upstream.url, "LogLevel": "DEBUG"},
        stack_name="artifact",
        instance_credentials=INSTANCES,
        admin_credentials=upstream.admin_account,
    )


def _sample(name: str, stack: LocalStack, queue: str = "RegistrationQueue") -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / name).read_text(encoding="utf-8"))
    for record in event.get("Records", []):
        record["eventSourceARN"] = stack.queue_arn(queue)
    return event


def _files(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def _results(report: dict[str, Any]) -> list[Any]:
    errors = [i["error"] for i in report["invocations"] if "error" in i]
    assert errors == []
    return [i["result"] for i in report["invocations"]]


def _assert_ran_from_the_build(report: dict[str, Any], built: BuiltArtifact, logical_id: str) -> None:
    layer = str(built.layer_dir)
    assert str(report["handler_module"]).startswith(str(built.functions[logical_id].code_dir))
    for module in ("telematics_reg", "boto3", "botocore", "pydantic"):
        assert str(report[module]).startswith(layer), (module, report[module])
    assert report["dont_write_bytecode"] is True
    assert report["python"][:2] == [3, 12]
    assert "aws_xray_sdk" not in report["modules"]
    keys = [creds["InstanceKey"] for creds in INSTANCES.values()]
    assert secrets_in(report["stdout"], keys) == []


def _items_of(stack: LocalStack, client_id: str) -> list[dict[str, Any]]:
    """The table's items of a ClientId, in every instance."""
    dynamodb = boto3.client("dynamodb", endpoint_url=stack.endpoint_url, region_name=stack.region)
    table = stack.physical["TokensTable"]
    items = []
    for instance in INSTANCES:
        keys = dynamodb.query(
            TableName=table,
            IndexName="ByClient",
            KeyConditionExpression="ClientKey = :k",
            ExpressionAttributeValues={":k": {"S": f"{instance}#{client_id}"}},
        )["Items"]
        for key in keys:
            item = dynamodb.get_item(TableName=table, Key={"pk": key["pk"]}, ConsistentRead=True).get("Item")
            if item:
                items.append({name: next(iter(value.values())) for name, value in item.items()})
    return items


def test_every_function_of_the_build_runs_the_samples_with_only_boto3_beside_it(
    built: BuiltArtifact, runtime_python: Path, artifact_stack: LocalStack, emulator: EmulatorHandle
) -> None:
    assert set(built.functions) == set(SAMPLES)
    before = _files(built.build_dir)
    sqs = boto3.client("sqs", endpoint_url=artifact_stack.endpoint_url, region_name=artifact_stack.region)
    reports = {}
    for logical_id, names in SAMPLES.items():
        queue = SOURCE_QUEUES.get(logical_id, "RegistrationQueue")
        events = [_sample(name, artifact_stack, queue) for name in names]
        reports[logical_id] = built.run(
            logical_id,
            runtime_python=runtime_python,
            stack=artifact_stack,
            events=events,
            overrides=OVERRIDES.get(logical_id),
        )
        _assert_ran_from_the_build(reports[logical_id], built, logical_id)

    signup, duplicate, camel, poison = _results(reports["SignupFunction"])
    assert signup["status"] == "registered"
    assert duplicate == {"status": "duplicate", "deviceToken": signup["deviceToken"], "reason": None}
    assert camel["status"] == "registered"
    assert poison["status"] == "dead_lettered"
    assert [r["batchItemFailures"] for r in _results(reports["RegistrationQueueFunction"])] == [[]] * 5
    letters = drain(sqs, artifact_stack.queue_url("RegistrationDeadLetterQueue"))
    reasons = {m["MessageAttributes"]["Reason"]["StringValue"] for m in letters}
    assert {"not_json", "invalid_fields", "unknown_instance"} <= reasons
    assert {"users_due", "queued", "items_read"} <= set(_results(reports["RefreshSweeperFunction"])[0])
    assert _results(reports["RefreshWorkerFunction"]) == [{"batchItemFailures": []}]
    changes = drain(sqs, artifact_stack.queue_url("LifecycleDeadLetterQueue"))
    poisoned = {record["messageId"] for record in _sample("lifecycle-poison.json", artifact_stack)["Records"]}
    assert {m["MessageAttributes"]["OriginalMessageId"]["StringValue"] for m in changes} == poisoned
    assert len(changes) == len(poisoned)
    # customer-1001 was updated, deactivated, reactivated, moved to fleet-eu, then erased there: gone upstream, and
    # only its tombstone here, without a token or a profile field.
    assert emulator.users(client_id="customer-1001") == []
    (erased,) = _items_of(artifact_stack, "customer-1001")
    assert (erased["Instance"], erased["Status"]) == ("fleet-eu", "DELETED")
    assert {"RefreshToken", "AccessToken", "FirstName", "Email", "DueShard"} & set(erased) == set()
    # customer-1002 was renamed, deactivated and moved by the operator's messages: one user, in fleet-eu.
    (moved,) = emulator.users(client_id="customer-1002")
    assert moved["InstanceId"] == INSTANCES["fleet-eu"]["InstanceId"]
    (kept,) = _items_of(artifact_stack, "customer-1002")
    assert (kept["Instance"], kept["DeviceToken"], kept["Deactivated"]) == ("fleet-eu", moved["DeviceToken"], True)
    (wake_up,) = _results(reports["ReconcileFunction"])
    assert wake_up["Adoptions"] == []
    assert wake_up["Audit"]["Status"] != "off"
    assert _files(built.build_dir) == before, "a built function wrote into its read-only code folders"


def test_the_registration_and_refresh_flows_run_from_the_build(
    built: BuiltArtifact, runtime_python: Path, artifact_stack: LocalStack, emulator: EmulatorHandle
) -> None:
    stack = artifact_stack
    sqs = boto3.client("sqs", endpoint_url=stack.endpoint_url, region_name=stack.region)
    dynamodb = boto3.client("dynamodb", endpoint_url=stack.endpoint_url, region_name=stack.region)
    drain(sqs, stack.queue_url("RefreshQueue"))
    event = _sample("signup.json", stack)
    event["detail"]["ClientId"] = f"artifact-{uuid.uuid4()}"

    # Given a user registered by the built signup function
    (registered,) = _results(built.run("SignupFunction", runtime_python=runtime_python, stack=stack, events=[event]))
    assert registered["status"] == "registered"
    key = {"pk": {"S": f"USER#{registered['deviceToken']}"}}
    stored = dynamodb.get_item(TableName=stack.physical["TokensTable"], Key=key, ConsistentRead=True)["Item"]

    # When the built sweeper finds it due (a margin above the token's life) and queues a job without delay
    due = {"REFRESH_MARGIN_SECONDS": "7200", "REFRESH_SPREAD_SECONDS": "0"}
    (report,) = _results(
        built.run(
            "RefreshSweeperFunction",
            runtime_python=runtime_python,
            stack=stack,
            events=[_sample("refresh-sweep.json", stack)],
            overrides=due,
        )
    )
    assert report["queued"] >= 1
    messages = drain(sqs, stack.queue_url("RefreshQueue"))
    jobs = [m for m in messages if registered["deviceToken"] in m["Body"]]
    assert len(jobs) == 1
    records = [
        {
            "messageId": m["MessageId"],
            "receiptHandle": m["ReceiptHandle"],
            "body": m["Body"],
            "attributes": {"ApproximateReceiveCount": "1"},
            "messageAttributes": {},
            "eventSource": "aws:sqs",
            "eventSourceARN": stack.queue_arn("RefreshQueue"),
            "awsRegion": stack.region,
        }
        for m in jobs
    ]

    # Then the built refresh worker refreshes it: a new version with new tokens, committed in the table
    (response,) = _results(
        built.run(
            "RefreshWorkerFunction",
            runtime_python=runtime_python,
            stack=stack,
            events=[{"Records": records}],
            overrides={"REFRESH_MARGIN_SECONDS": "7200"},
        )
    )
    assert response == {"batchItemFailures": []}
    refreshed = dynamodb.get_item(TableName=stack.physical["TokensTable"], Key=key, ConsistentRead=True)["Item"]
    assert int(refreshed["Version"]["N"]) > int(stored["Version"]["N"])
    assert refreshed["RefreshToken"] != stored["RefreshToken"]
    assert emulator.counters()["refreshes"] >= 1
