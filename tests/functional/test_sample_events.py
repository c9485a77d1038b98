"""The samples in events/ are real: each goes through its function (as `sam local invoke -e` would send it) and
does what its name says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from local.emulator.testing import EmulatorHandle
from local.stack import LocalStack

from .conftest import Functions, drain

EVENTS = Path(__file__).resolve().parents[2] / "events"


def _load(name: str, stack: LocalStack, queue: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / name).read_text())
    for record in event.get("Records", []):
        # The samples name a deployed account's queue; here the records come from the local stack's.
        record["eventSourceARN"] = stack.queue_arn(queue or "RegistrationQueue")
    return event


def test_every_sample_is_covered_here() -> None:
    assert {p.name for p in EVENTS.glob("*.json")} == set(SIGNUP) | set(QUEUE) | {
        "signup-duplicate.json",
        "refresh-sweep.json",
        "refresh-jobs.json",
        "reconcile.json",
    } | {p.name for p in EVENTS.glob("lifecycle-*.json")}  # through the lifecycle intake: tests/unit/test_lifecycle.py


# (A sample's ClientId may already be registered by another test of the session: then it is a duplicate.)
SIGNUP = {
    "signup.json": {"registered", "duplicate"},
    "signup-camelcase.json": {"registered", "duplicate"},
    "signup-poison.json": {"dead_lettered"},
}
QUEUE = {
    "queue-registrations.json": 0,
    "queue-bulk.json": 0,
    "queue-poison.json": 0,  # every record dead-lettered at once: none left for retry
    "queue-mixed.json": 0,
    "queue-duplicate.json": 0,
}


@pytest.mark.parametrize(("name", "statuses"), sorted(SIGNUP.items()))
def test_signup_samples(
    name: str, statuses: set[str], stack: LocalStack, functions: Functions, emulator: EmulatorHandle
) -> None:
    result = functions.get("SignupFunction").invoke(_load(name, stack))

    assert result["status"] in statuses


def test_the_duplicate_signup_sample_reports_the_first_users_device_token(
    stack: LocalStack, functions: Functions, emulator: EmulatorHandle
) -> None:
    signup = functions.get("SignupFunction")
    first = signup.invoke(_load("signup.json", stack))

    again = signup.invoke(_load("signup-duplicate.json", stack))

    assert again == {"status": "duplicate", "deviceToken": first["deviceToken"], "reason": None}


@pytest.mark.parametrize(("name", "failures"), sorted(QUEUE.items()))
def test_queue_samples(
    name: str, failures: int, stack: LocalStack, functions: Functions, emulator: EmulatorHandle, sqs: Any
) -> None:
    event = _load(name, stack)

    response = functions.get("RegistrationQueueFunction").invoke(event)

    assert len(response["batchItemFailures"]) == failures
    letters = drain(sqs, stack.queue_url("RegistrationDeadLetterQueue"))
    if name == "queue-poison.json":
        assert len(letters) == len(event["Records"])
        reasons = {m["MessageAttributes"]["Reason"]["StringValue"] for m in letters}
        assert reasons == {"not_json", "invalid_fields", "unknown_instance"}
    if name == "queue-mixed.json":
        assert [m["MessageAttributes"]["Reason"]["StringValue"] for m in letters] == ["not_json"]


def test_reconcile_sample(stack: LocalStack, functions: Functions, emulator: EmulatorHandle) -> None:
    # A wake-up of the schedule: the lost chunks other tests left are looked at (each waits out its window, or is
    # judged), and the audit starts (its first wake-up) or goes on.
    report = functions.get("ReconcileFunction").invoke(_load("reconcile.json", stack))
    assert all({"Instance", "RequestId", "Chunk", "Outcome"} <= set(adoption) for adoption in report["Adoptions"])
    assert report["Audit"]["Status"] != "off"


def test_refresh_samples(stack: LocalStack, functions: Functions, emulator: EmulatorHandle) -> None:
    report = functions.get("RefreshSweeperFunction").invoke(_load("refresh-sweep.json", stack))
    assert {"users_due", "queued", "items_read"} <= set(report)

    # The job names a user this stack does not have: nothing to refresh, and nothing fails.
    response = functions.get("RefreshWorkerFunction").invoke(_load("refresh-jobs.json", stack, "RefreshQueue"))
    assert response == {"batchItemFailures": []}
