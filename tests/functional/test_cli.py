"""The operators' command line (``telematics-reg``) against moto, the emulator and the provisioned template: its
``main(argv)`` is driven as a shell would, pointed at the session's stack through a saved local stack file."""

from __future__ import annotations

import json
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.dynamodb.types import TypeDeserializer
from botocore.exceptions import EndpointConnectionError

from local.emulator.testing import EmulatorHandle
from local.stack import LocalStack
from telematics_cli import main
from telematics_cli.target import Target
from telematics_reg.models import read_jwt_claims

from .conftest import INSTANCES, Functions, drain, signup_event, sqs_event

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def stack_file(stack: LocalStack, tmp_path: Path) -> Path:
    return stack.save(tmp_path / "stack.json")


@pytest.fixture
def cli(stack_file: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Runs ``telematics-reg --local-stack <stack file> ARGS``; returns (exit code, stdout, stderr)."""

    def run(*args: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--local-stack", str(stack_file), *(str(a) for a in args)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def registration_queue(stack: LocalStack, sqs: Any) -> Iterator[str]:
    url = stack.outputs["RegistrationQueueUrl"]
    drain(sqs, url)
    yield url
    drain(sqs, url)


def _process(sqs: Any, stack: LocalStack, functions: Functions, queue_url: str) -> list[str]:
    """What Lambda's event source mapping would do: every queued message through the queue function."""
    bodies = [m["Body"] for m in drain(sqs, queue_url)]
    queue_fn = functions.get("RegistrationQueueFunction")
    for start in range(0, len(bodies), 10):
        event = sqs_event(bodies[start : start + 10], queue_arn=stack.queue_arn("RegistrationQueue"))
        assert queue_fn.invoke(event) == {"batchItemFailures": []}
    return bodies


def _depth(sqs: Any, url: str) -> dict[str, int]:
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return {
        "visible": int(attributes["ApproximateNumberOfMessages"]),
        "in_flight": int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    }


def _users_for(emulator: EmulatorHandle, client_id: str, alias: str = "default") -> int:
    counters = emulator.counters()
    return int(counters["users_by_client_id"].get(f"{INSTANCES[alias]['InstanceId']}/{client_id}", 0))


def _item(dynamodb: Any, stack: LocalStack, device_token: str) -> dict[str, Any]:
    response = dynamodb.get_item(
        TableName=stack.outputs["TokensTableName"], Key={"pk": {"S": f"USER#{device_token}"}}, ConsistentRead=True
    )
    deserializer = TypeDeserializer()
    return {k: deserializer.deserialize(v) for k, v in response.get("Item", {}).items()}


def _device_token(dynamodb: Any, stack: LocalStack, client_id: str, instance: str = "default") -> str:
    found = dynamodb.query(
        TableName=stack.outputs["TokensTableName"],
        IndexName="ByClient",
        KeyConditionExpression="ClientKey = :k",
        ExpressionAttributeValues={":k": {"S": f"{instance}#{client_id}"}},
    )["Items"]
    assert len(found) == 1
    return str(found[0]["DeviceToken"]["S"])


def _set_expiry(dynamodb: Any, stack: LocalStack, device_token: str, expires_at: int) -> None:
    dynamodb.update_item(
        TableName=stack.outputs["TokensTableName"],
        Key={"pk": {"S": f"USER#{device_token}"}},
        UpdateExpression="SET AccessExpiresAt = :e",
        ExpressionAttributeValues={":e": {"N": str(expires_at)}},
    )


def _register(
    sqs: Any, stack: LocalStack, functions: Functions, queue_url: str, cli: Cli, tmp_path: Path, client_ids: list[str]
) -> None:
    """Register users the way an operator does: a file loaded with the CLI, processed by the queue function."""
    source = tmp_path / f"users-{uuid.uuid4().hex[:6]}.jsonl"
    source.write_text("".join(json.dumps({"ClientId": c}) + "\n" for c in client_ids), encoding="utf-8")
    code, _, err = cli("load", source, "--no-progress")
    assert code == 0, err
    _process(sqs, stack, functions, queue_url)


# ------------------------------------------------------------------------------------------------------ load


def test_load_reports_every_bad_row_with_its_line_and_sends_nothing(
    cli: Cli, sqs: Any, registration_queue: str, tmp_path: Path
) -> None:
    source = tmp_path / "users.csv"
    source.write_text(
        "ClientId,FirstName,Email,Instance,Quantity,UserFields.EnableTracking,ChildrenCount\n"
        "c-1,Ada,ada@example.com,,,,\n"  # line 2: fine
        "c-2,Bob,,fleet-eu,,maybe,\n"  # line 3: not a boolean
        ",Eve,,,,,\n"  # line 4: no ClientId
        "\n"  # line 5: blank, skipped
        ",,,,25,,\n"  # line 6: a bulk row, fine
        "c-7,,,,,,-2\n"  # line 7: ChildrenCount below 0
        "c-8,,,bad alias!,,,\n"  # line 8: Instance pattern
        "c-9,,,,,,,extra\n",  # line 9: more cells than columns
        encoding="utf-8",
    )

    code, out, _ = cli("load", source, "--json", "--no-progress")

    assert code == 1
    report = json.loads(out)
    assert report["sent"] == 0
    assert (report["rows"], report["valid"], report["invalid"]) == (7, 2, 5)
    problems = {e["line"]: [p["field"] for p in e["problems"]] for e in report["errors"]}
    assert problems == {
        3: ["UserFields.EnableTracking"],
        4: ["ClientId"],
        7: ["ChildrenCount"],
        8: ["Instance"],
        9: [""],
    }
    assert _depth(sqs, registration_queue)["visible"] == 0
    assert not (tmp_path / "users.csv.load-state.json").exists()

    # The first N, with a count of the rest, in the table a person reads.
    code, out, _ = cli("load", source, "--max-errors", "2", "--no-progress")
    assert code == 1
    assert "… and 3 more invalid rows" in out
    assert "nothing sent" in out

    # JSON Lines: every kind of broken line, by its physical line number.
    lines = tmp_path / "users.jsonl"
    lines.write_text(
        '{"ClientId": "j-1"}\n'
        "\n"
        "{not json\n"  # line 3
        '["an", "array"]\n'  # line 4
        '{"Quantity": "5"}\n'  # line 5: a string, not a number
        '{"ClientId": "j-6", "Foo": 1}\n',  # line 6: unknown field
        encoding="utf-8",
    )
    code, out, _ = cli("load", lines, "--json", "--no-progress")
    assert code == 1
    assert [(e["line"], e["problems"][0]["field"]) for e in json.loads(out)["errors"]] == [
        (3, ""),
        (4, ""),
        (5, "Quantity"),
        (6, "Foo"),
    ]
    assert _depth(sqs, registration_queue)["visible"] == 0


def test_load_sends_in_batches_registers_everyone_once_and_a_rerun_sends_nothing(
    cli: Cli,
    sqs: Any,
    stack: LocalStack,
    functions: Functions,
    emulator: EmulatorHandle,
    registration_queue: str,
    tmp_path: Path,
) -> None:
    run = uuid.uuid4().hex[:8]
    clients = [f"{run}-{n}" for n in range(25)]
    source = tmp_path / "users.csv"
    rows = [f"{c},Name {n},{c}@example.com,{'fleet-eu' if n % 5 == 0 else ''}," for n, c in enumerate(clients)]
    source.write_text("ClientId,FirstName,Email,Instance,Quantity\n" + "\n".join(rows) + "\n,,,,7\n", encoding="utf-8")

    code, out, _ = cli("load", source, "--json", "--no-progress", "--parallel", "3")

    assert code == 0
    report = json.loads(out)
    assert (report["sent"], report["batches"], report["failed"], report["already_sent"]) == (26, 3, 0, 0)
    bodies = _process(sqs, stack, functions, registration_queue)
    assert len(bodies) == 26
    bulk = [json.loads(b) for b in bodies if "Quantity" in b]
    assert bulk == [{"Quantity": 7, "RequestId": f"{report['sha256']}:27"}]
    for n, client_id in enumerate(clients):
        assert _users_for(emulator, client_id, "fleet-eu" if n % 5 == 0 else "default") == 1
    assert emulator.counters()["users_total"] == 25 + 7
    state = json.loads((tmp_path / "users.csv.load-state.json").read_text())
    (entry,) = state["loads"].values()
    assert (entry["last_line"], entry["complete"], entry["queue_url"]) == (27, True, registration_queue)

    # The same file again: the checkpoint says everything was sent.
    code, out, _ = cli("load", source, "--json", "--no-progress")
    assert code == 0
    again = json.loads(out)
    assert (again["sent"], again["already_sent"]) == (0, 26)
    assert _depth(sqs, registration_queue)["visible"] == 0

    # Even sending it all again (--restart) registers nobody twice: ClientIds and the bulk's RequestId are keys.
    code, out, _ = cli("load", source, "--json", "--no-progress", "--restart")
    assert (code, json.loads(out)["sent"]) == (0, 26)
    _process(sqs, stack, functions, registration_queue)
    assert emulator.counters()["users_total"] == 25 + 7
    assert all(_users_for(emulator, c, "fleet-eu" if n % 5 == 0 else "default") == 1 for n, c in enumerate(clients))


def test_an_interrupted_load_resumes_after_the_last_row_it_sent(
    cli: Cli, sqs: Any, registration_queue: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = uuid.uuid4().hex[:8]
    source = tmp_path / "users.ndjson"
    source.write_text("".join(json.dumps({"ClientId": f"{run}-{n}"}) + "\n" for n in range(25)), encoding="utf-8")
    real_client = Target.client
    calls = {"batches": 0}

    class FlakySqs:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def send_message_batch(self, **kwargs: Any) -> Any:
            calls["batches"] += 1
            if calls["batches"] > 2:
                raise EndpointConnectionError(endpoint_url="http://sqs.example")
            return self._inner.send_message_batch(**kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

    def flaky_client(self: Target, service: str) -> Any:
        client = real_client(self, service)
        return FlakySqs(client) if service == "sqs" else client

    monkeypatch.setattr(Target, "client", flaky_client)
    code, _, err = cli("load", source, "--no-progress", "--parallel", "1")
    monkeypatch.undo()

    assert code == 2
    assert "cannot reach" in err
    state = json.loads((tmp_path / "users.ndjson.load-state.json").read_text())
    (entry,) = state["loads"].values()
    assert (entry["last_line"], entry["complete"]) == (20, False)

    code, out, err = cli("load", source, "--json", "--no-progress")

    assert code == 0
    report = json.loads(out)
    assert (report["sent"], report["already_sent"]) == (5, 20)
    assert "resuming after line 20" in err
    sent = [json.loads(m["Body"])["ClientId"] for m in drain(sqs, registration_queue)]
    assert sorted(sent) == sorted(f"{run}-{n}" for n in range(25))  # every row once, none twice


def test_skip_invalid_sends_the_rest_and_an_entry_sqs_refuses_is_reported_then_sent_by_the_rerun(
    cli: Cli, sqs: Any, registration_queue: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = uuid.uuid4().hex[:8]
    source = tmp_path / "users.jsonl"
    lines = [json.dumps({"ClientId": f"{run}-{n}"}) for n in range(12)]
    lines[3] = '{"ClientId": ""}'  # line 4: invalid
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    real_client = Target.client

    class RefusingSqs:  # SQS refuses line 8 for good (a sender fault), once
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> dict[str, Any]:
            kept = [e for e in Entries if e["Id"] != "line-8"]
            response: dict[str, Any] = self._inner.send_message_batch(QueueUrl=QueueUrl, Entries=kept)
            if len(kept) < len(Entries):
                refused = {"Id": "line-8", "SenderFault": True, "Code": "InvalidMessageContents", "Message": "no"}
                response["Failed"] = [*response.get("Failed", []), refused]
            return response

    monkeypatch.setattr(
        Target,
        "client",
        lambda self, service: (
            RefusingSqs(real_client(self, service)) if service == "sqs" else real_client(self, service)
        ),
    )
    code, out, _ = cli("load", source, "--skip-invalid", "--json", "--no-progress", "--parallel", "1")
    monkeypatch.undo()

    assert code == 1
    report = json.loads(out)
    assert (report["sent"], report["skipped_invalid"], report["failed"]) == (10, 1, 1)
    assert report["failures"] == [{"line": 8, "code": "InvalidMessageContents", "message": "no"}]
    assert [e["line"] for e in report["errors"]] == [4]
    state = json.loads((tmp_path / "users.jsonl.load-state.json").read_text())
    assert next(iter(state["loads"].values()))["last_line"] == 7  # nothing past the unsent row counts as sent
    assert len(drain(sqs, registration_queue)) == 10

    code, out, _ = cli("load", source, "--skip-invalid", "--json", "--no-progress")

    assert code == 0
    again = json.loads(out)
    assert (again["sent"], again["already_sent"], again["skipped_invalid"]) == (5, 6, 0)
    resent = sorted(json.loads(m["Body"])["ClientId"] for m in drain(sqs, registration_queue))
    assert resent == sorted(f"{run}-{n}" for n in range(7, 12))  # line 8, and those after it once more


@pytest.mark.slow
def test_a_100k_row_file_is_validated_and_sent_with_bounded_memory(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = 100_000
    source = tmp_path / "big.csv"
    with source.open("w", encoding="utf-8") as handle:
        handle.write("ClientId,FirstName,Email,Instance\n")
        for n in range(rows):
            handle.write(f"big-{n:06d},First {n},user{n}@example.com,default\n")
    received = {"entries": 0, "max_batch": 0, "last_id": ""}

    class CountingSqs:  # stands in for SQS: the point is the CLI's memory, not 100k registrations
        def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> dict[str, Any]:
            received["entries"] += len(Entries)
            received["max_batch"] = max(received["max_batch"], len(Entries))
            return {"Successful": [{"Id": e["Id"]} for e in Entries], "Failed": []}

    real_client = Target.client
    monkeypatch.setattr(
        Target, "client", lambda self, service: CountingSqs() if service == "sqs" else real_client(self, service)
    )
    tracemalloc.start()
    try:
        started = time.monotonic()
        code, out, err = cli("load", source, "--json", "--no-progress", "--parallel", "4")
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert code == 0, err
    report = json.loads(out)
    assert (report["rows"], report["valid"], report["sent"], report["batches"]) == (rows, rows, rows, rows // 10)
    assert (received["entries"], received["max_batch"]) == (rows, 10)
    assert peak < 50 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"
    state = json.loads((tmp_path / "big.csv.load-state.json").read_text())
    assert next(iter(state["loads"].values()))["last_line"] == rows + 1
    print(f"100k rows validated and sent in {elapsed:.1f} s, peak traced memory {peak / 1e6:.1f} MB")

    # --dry-run streams the same way and needs no queue at all.
    code, out, _ = cli("load", source, "--json", "--no-progress", "--dry-run")
    assert (code, json.loads(out)["would_send"]) == (0, rows)


# ---------------------------------------------------------------------------------------------------- status


def test_status_counts_users_by_status_tokens_due_the_oldest_overdue_and_queue_depths(
    cli: Cli,
    sqs: Any,
    dynamodb: Any,
    stack: LocalStack,
    functions: Functions,
    emulator: EmulatorHandle,
    registration_queue: str,
    tmp_path: Path,
) -> None:
    code, out, _ = cli("status", "--json")
    assert code == 0
    before = json.loads(out)
    run = uuid.uuid4().hex[:8]
    clients = [f"{run}-status-{n}" for n in range(3)]
    _register(sqs, stack, functions, registration_queue, cli, tmp_path, clients)
    now = int(time.time())
    due = _device_token(dynamodb, stack, clients[0])
    overdue = _device_token(dynamodb, stack, clients[1])
    _set_expiry(dynamodb, stack, due, now + 60)
    _set_expiry(dynamodb, stack, overdue, now - 10 * 86_400)  # older than anything else in the table
    sqs.send_message(QueueUrl=stack.outputs["RegistrationDeadLetterQueueUrl"], MessageBody="{}")

    code, out, _ = cli("status", "--json")

    assert code == 0
    after = json.loads(out)
    assert after["users"]["ACTIVE"] - before["users"]["ACTIVE"] == 3
    assert after["users_total"] - before["users_total"] == 3
    assert after["refresh"]["shards"] == int(stack.parameters["RefreshIndexShards"])
    assert after["refresh"]["due_soon"] - before["refresh"]["due_soon"] == 2
    oldest = after["refresh"]["oldest_overdue"]
    assert oldest["DeviceToken"] == overdue
    assert oldest["OverdueSeconds"] >= 10 * 86_400
    assert after["queues"]["RegistrationDeadLetterQueue"]["visible"] == 1
    assert after["queues"]["RegistrationQueue"] == {"visible": 0, "in_flight": 0, "delayed": 0}
    assert set(after["queues"]) == {
        "RegistrationQueue",
        "RegistrationDeadLetterQueue",
        "SignupDeadLetterQueue",
        "RefreshQueue",
        "RefreshDeadLetterQueue",
        "SweepDeadLetterQueue",
    }

    # The table for people, and a margin of the operator's choosing.
    code, out, _ = cli("status", "--margin", "0", "--no-scan")
    assert code == 0
    assert "Users by status" in out
    assert "not counted" in out
    assert "RegistrationDeadLetterQueue" in out
    _set_expiry(dynamodb, stack, overdue, now + 3600)


# ------------------------------------------------------------------------------------------------ show, token


def test_show_redacts_tokens_unless_asked_and_shows_expiry_and_state(
    cli: Cli,
    sqs: Any,
    dynamodb: Any,
    stack: LocalStack,
    functions: Functions,
    emulator: EmulatorHandle,
    registration_queue: str,
    tmp_path: Path,
) -> None:
    client_id = f"{uuid.uuid4().hex[:8]}-show"
    _register(sqs, stack, functions, registration_queue, cli, tmp_path, [client_id])
    device_token = _device_token(dynamodb, stack, client_id)
    item = _item(dynamodb, stack, device_token)

    code, out, _ = cli("show", "--client-id", client_id, "--json")

    assert code == 0
    shown = json.loads(out)
    assert shown["DeviceToken"] == device_token
    assert (shown["Status"], shown["Version"], shown["ClientId"], shown["Instance"]) == (
        "ACTIVE",
        1,
        client_id,
        "default",
    )
    assert shown["AccessToken"] == f"{item['AccessToken'][:6]}…({len(item['AccessToken'])} chars)"
    assert shown["RefreshToken"].endswith(f"…({len(item['RefreshToken'])} chars)")
    assert item["AccessToken"] not in out
    assert item["RefreshToken"] not in out
    assert 3000 < shown["AccessExpiresInSeconds"] <= 3600

    code, out, _ = cli("show", "--device-token", device_token)
    assert code == 0
    assert device_token in out
    assert "ACTIVE" in out
    assert item["AccessToken"] not in out.replace("\n", "")
    assert "(in " in out  # the expiry, relative

    code, out, _ = cli("show", "--device-token", device_token, "--json", "--reveal-tokens")
    assert json.loads(out)["AccessToken"] == item["AccessToken"]

    code, _, err = cli("show", "--client-id", "nobody-" + client_id)
    assert code == 1
    assert "no user" in err


def test_token_prints_a_valid_jwt_and_refreshes_one_about_to_expire(
    cli: Cli,
    sqs: Any,
    dynamodb: Any,
    stack: LocalStack,
    functions: Functions,
    emulator: EmulatorHandle,
    registration_queue: str,
    tmp_path: Path,
) -> None:
    client_id = f"{uuid.uuid4().hex[:8]}-token"
    _register(sqs, stack, functions, registration_queue, cli, tmp_path, [client_id])
    device_token = _device_token(dynamodb, stack, client_id)
    stored = _item(dynamodb, stack, device_token)

    code, out, _ = cli("token", "--client-id", client_id)

    assert code == 0
    assert out == stored["AccessToken"] + "\n"  # only the token on stdout
    claims = read_jwt_claims(out.strip())
    assert claims is not None
    assert claims["exp"] > time.time() + 300
    assert emulator.counters()["refreshes"] == 0

    # About to expire: refreshed under the lease, committed, and the new token printed.
    _set_expiry(dynamodb, stack, device_token, int(time.time()) + 30)
    code, out, err = cli("token", "--device-token", device_token, "--json")

    assert code == 0, err
    answer = json.loads(out)
    assert answer["DeviceToken"] == device_token
    assert answer["AccessToken"] != stored["AccessToken"]
    assert answer["AccessToken"].count(".") == 2
    assert answer["ExpiresAt"] > time.time() + 300
    assert emulator.counters()["refreshes"] == 1
    after = _item(dynamodb, stack, device_token)
    assert (after["AccessToken"], after["Version"]) == (answer["AccessToken"], stored["Version"] + 1)
    assert "LeaseOwner" not in after

    code, out, err = cli("token", "--client-id", "nobody-" + client_id)
    assert (code, out) == (1, "")
    assert "no such user" in err


# ------------------------------------------------------------------------------------------------------- dlq


def _lambda_failure_record(event: dict[str, Any], function_arn: str) -> str:
    """What Lambda puts on an on-failure destination after the async retries of an event ran out."""
    return json.dumps(
        {
            "version": "1.0",
            "timestamp": "2026-11-21T10:00:00.000Z",
            "requestContext": {
                "requestId": str(uuid.uuid4()),
                "functionArn": f"{function_arn}:$LATEST",
                "condition": "RetriesExhausted",
                "approximateInvokeCount": 3,
            },
            "requestPayload": event,
            "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
            "responsePayload": {"errorMessage": "Task timed out after 60.00 seconds", "errorType": "TimeoutError"},
        }
    )


def test_dlq_list_groups_dead_letters_by_reason_without_removing_any_or_showing_tokens(
    cli: Cli, sqs: Any, stack: LocalStack, functions: Functions, emulator: EmulatorHandle
) -> None:
    run = uuid.uuid4().hex[:8]
    bodies: list[Any] = [
        "{not json",
        {"FirstName": f"{run} no id"},
        {"ClientId": f"{run}-x", "Gender": "Robot"},
        {"ClientId": f"{run}-y", "Instance": "nowhere"},
    ]
    queue_fn = functions.get("RegistrationQueueFunction")
    assert queue_fn.invoke(sqs_event(bodies, queue_arn=stack.queue_arn("RegistrationQueue"))) == {
        "batchItemFailures": []
    }
    registration_dlq = stack.outputs["RegistrationDeadLetterQueueUrl"]
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    sqs.send_message(QueueUrl=registration_dlq, MessageBody=json.dumps({"ClientId": f"{run}-z", "Note": jwt}))
    signup_dlq = stack.outputs["SignupDeadLetterQueueUrl"]
    event = signup_event({"ClientId": f"{run}-signup"})
    sqs.send_message(
        QueueUrl=signup_dlq, MessageBody=_lambda_failure_record(event, stack.functions["SignupFunction"].arn)
    )

    code, out, _ = cli("dlq", "list", "--json", "--bodies")

    assert code == 0
    report = {q["queue"]: q for q in json.loads(out)["queues"]}
    assert set(report) == {"registration", "signup", "refresh", "sweep", "lifecycle"}
    groups = {g["reason"]: g for g in report["registration"]["groups"]}
    assert {reason: g["count"] for reason, g in groups.items()} == {
        "invalid_fields": 2,
        "not_json": 1,
        "unknown_instance": 1,
        "max-receives": 1,
    }
    assert groups["invalid_fields"]["sources"] == ["queue"]
    assert "Gender" in json.dumps(groups["invalid_fields"]["examples"])
    assert jwt not in out
    assert "eyJhbG…(" in groups["max-receives"]["examples"][0]["Body"]
    (signup,) = report["signup"]["groups"]
    assert (signup["reason"], signup["count"]) == ("lambda:RetriesExhausted", 1)
    assert "TimeoutError: Task timed out" in signup["examples"][0]["Detail"]
    assert signup["sources"] == [stack.functions["SignupFunction"].name]

    # Nothing was lost or left hidden by the listing.
    assert _depth(sqs, registration_dlq) == {"visible": 5, "in_flight": 0}
    assert _depth(sqs, signup_dlq) == {"visible": 1, "in_flight": 0}
    code, out, _ = cli("dlq", "list", "--queue", "registration")
    assert code == 0
    assert "invalid_fields" in out
    assert "max-receives" in out


def test_dlq_redrive_moves_only_what_matches_and_a_dry_run_moves_nothing(
    cli: Cli, sqs: Any, stack: LocalStack, functions: Functions, emulator: EmulatorHandle, registration_queue: str
) -> None:
    run = uuid.uuid4().hex[:8]
    registration_dlq = stack.outputs["RegistrationDeadLetterQueueUrl"]
    queue_fn = functions.get("RegistrationQueueFunction")
    bodies = [{"ClientId": f"{run}-a", "Instance": "nowhere"}, {"ClientId": f"{run}-b", "Instance": "nowhere"}]
    queue_fn.invoke(sqs_event([*bodies, "{not json"], queue_arn=stack.queue_arn("RegistrationQueue")))
    assert _depth(sqs, registration_dlq)["visible"] == 3

    code, out, _ = cli(
        "dlq", "redrive", "--queue", "registration", "--reason", "unknown_instance", "--match", f"{run}-a",
        "--dry-run", "--json",
    )  # fmt: skip

    assert code == 0
    dry = json.loads(out)
    assert (dry["dry_run"], dry["moved"]) == (True, 1)
    assert f"{run}-a" in dry["letters"][0]["Body"]
    assert _depth(sqs, registration_dlq) == {"visible": 3, "in_flight": 0}
    assert _depth(sqs, registration_queue)["visible"] == 0

    code, out, _ = cli("dlq", "redrive", "--queue", "registration", "--reason", "unknown_instance", "--json")

    assert code == 0
    assert json.loads(out)["moved"] == 2
    moved = [json.loads(m["Body"]) for m in drain(sqs, registration_queue)]
    # What was sent, with when it occurred (the letter's send time: a redrive must not make it look newer).
    assert all(b.pop("OccurredAt") for b in moved)
    assert sorted(moved, key=lambda b: b["ClientId"]) == bodies
    remaining = drain(sqs, registration_dlq)
    assert [m["MessageAttributes"]["Reason"]["StringValue"] for m in remaining] == ["not_json"]

    # Signup dead letters go back on the bus as events: ours as UserSignedUp, a Lambda record as its event.
    signup_dlq = stack.outputs["SignupDeadLetterQueueUrl"]
    (tap,) = [t.tap_queue_url for r in stack.rules for t in r.targets if t.function == "SignupFunction"]
    assert tap is not None
    drain(sqs, tap)
    assert functions.get("SignupFunction").invoke(signup_event({"FirstName": f"{run} no id"}))["status"] == (
        "dead_lettered"
    )
    original = signup_event({"ClientId": f"{run}-timed-out"}, source=stack.outputs["SignupEventSource"])
    sqs.send_message(
        QueueUrl=signup_dlq, MessageBody=_lambda_failure_record(original, stack.functions["SignupFunction"].arn)
    )

    code, out, _ = cli("dlq", "redrive", "--queue", "signup", "--json")

    assert code == 0
    assert json.loads(out)["moved"] == 2
    events = [json.loads(m["Body"]) for m in drain(sqs, tap)]
    assert sorted(e["detail"].get("ClientId", e["detail"].get("FirstName")) for e in events) == sorted(
        [f"{run}-timed-out", f"{run} no id"]
    )
    assert {e["detail-type"] for e in events} == {"UserSignedUp"}
    assert _depth(sqs, signup_dlq)["visible"] == 0

    code, _, err = cli("dlq", "redrive", "--queue", "sweep")
    assert code == 2
    assert "not redriven" in err


def test_dlq_redrive_with_a_limit_leaves_every_letter_it_did_not_move_visible(
    cli: Cli, sqs: Any, stack: LocalStack
) -> None:
    # A redrive that stops at --limit mid-batch hid the rest of that batch for its visibility timeout (120 s): an
    # erasure reading the DLQ meanwhile reported itself incomplete, and a listing missed them.
    registration_dlq = stack.outputs["RegistrationDeadLetterQueueUrl"]
    drain(sqs, registration_dlq)
    run = uuid.uuid4().hex[:8]
    for n in range(5):
        sqs.send_message(QueueUrl=registration_dlq, MessageBody=f"{{not json {run}-{n}")

    code, out, _ = cli("dlq", "redrive", "--queue", "registration", "--limit", "1", "--json")

    assert code == 0
    assert json.loads(out)["moved"] == 1
    assert _depth(sqs, registration_dlq) == {"visible": 4, "in_flight": 0}
    drain(sqs, registration_dlq)
    drain(sqs, stack.outputs["RegistrationQueueUrl"])


# ---------------------------------------------------------------------------------------------------- errors


def test_clear_errors_and_exit_codes_for_what_an_operator_gets_wrong(
    stack_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(list(args))
        return code, capsys.readouterr().err

    # No local stack where one is named, and none by default (cwd without .local-stack/).
    code, err = run("--local-stack", str(tmp_path / "missing.json"), "status")
    assert code == 2
    assert "no local stack at" in err
    monkeypatch.chdir(tmp_path)
    code, err = run("status")
    assert code == 2
    assert "no stack to work on" in err
    assert "Traceback" not in err

    # Unreadable input files.
    code, err = run("--local-stack", str(stack_file), "load", str(tmp_path / "nope.csv"))
    assert code == 2
    assert "cannot read" in err
    assert "no such file" in err
    (tmp_path / "folder.csv").mkdir()
    code, err = run("--local-stack", str(stack_file), "load", str(tmp_path / "folder.csv"))
    assert (code, "directory" in err) == (2, True)
    (tmp_path / "users.txt").write_text("ClientId\nc-1\n")
    code, err = run("--local-stack", str(stack_file), "load", str(tmp_path / "users.txt"))
    assert code == 2
    assert "--format" in err

    # A CloudFormation stack that does not exist (moto answers DescribeStacks with ValidationError).
    code, err = run("--stack", "no-such-stack", "--region", "us-east-1", "status")
    assert code == 2
    assert "stack 'no-such-stack' does not exist in us-east-1" in err

    code, err = run("--stack", "no-such-stack", "--region", "eu-middle-9", "status")
    assert code == 2
    assert "unknown AWS region 'eu-middle-9'" in err

    # Usage errors are argparse's (exit 2).
    code, err = run("show")
    assert code == 2
    assert "one of the arguments --client-id --device-token is required" in err

    # No credentials at all.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, err = run("--stack", "anything", "--region", "us-east-1", "status")
    assert code == 2
    assert "no AWS credentials" in err


def test_a_deployed_stack_is_found_by_name_through_its_outputs(
    stack: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    """The --stack path: DescribeStacks gives the outputs and parameters (moto's CloudFormation stands in)."""
    name = f"deployed-{uuid.uuid4().hex[:8]}"
    template = {
        "Parameters": {"RefreshIndexShards": {"Type": "Number", "Default": "3"}},
        "Resources": {"Placeholder": {"Type": "AWS::SQS::Queue"}},
        "Outputs": {key: {"Value": value} for key, value in stack.outputs.items()},
    }
    boto3.client("cloudformation", endpoint_url=stack.endpoint_url, region_name=stack.region).create_stack(
        StackName=name, TemplateBody=json.dumps(template)
    )

    code = main(["--stack", name, "--region", stack.region, "status", "--json", "--no-scan"])

    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target"] == f"stack {name!r} in {stack.region}"
    assert report["table"] == stack.outputs["TokensTableName"]
    assert report["refresh"]["shards"] == 3


def test_the_local_stack_of_make_run_is_found_without_options_from_the_project_or_below(
    stack: LocalStack, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    stack.save(project / ".local-stack" / "stack.json")
    (project / "data").mkdir()
    monkeypatch.chdir(project / "data")

    code = main(["status", "--json", "--no-scan"])

    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["table"] == stack.outputs["TokensTableName"]
    assert str(project / ".local-stack" / "stack.json") in report["target"]


def test_relogin_brings_a_needs_relogin_user_back_into_the_refresh_index(
    cli: Cli,
    sqs: Any,
    dynamodb: Any,
    stack: LocalStack,
    functions: Functions,
    emulator: EmulatorHandle,
    registration_queue: str,
    tmp_path: Path,
) -> None:
    client_id = f"{uuid.uuid4().hex[:8]}-relogin"
    _register(sqs, stack, functions, registration_queue, cli, tmp_path, [client_id])
    device_token = _device_token(dynamodb, stack, client_id)
    code, _, _ = cli("relogin", "--client-id", client_id)
    assert code == 0  # ACTIVE: nothing to do, nothing spent
    assert emulator.counters()["logins"] == 0
    # Given the user was marked after its refresh token and Login both failed
    dynamodb.update_item(
        TableName=stack.outputs["TokensTableName"],
        Key={"pk": {"S": f"USER#{device_token}"}},
        UpdateExpression="SET #s = :s, LastError = :e ADD Version :one REMOVE DueShard",
        ExpressionAttributeNames={"#s": "Status"},
        ExpressionAttributeValues={":s": {"S": "NEEDS_RELOGIN"}, ":e": {"S": "login failed"}, ":one": {"N": "1"}},
    )
    emulator.disable_login([device_token])

    code, _, err = cli("relogin", "--device-token", device_token)
    assert code == 1, err  # Login still fails: still marked
    assert _item(dynamodb, stack, device_token)["Status"] == "NEEDS_RELOGIN"

    emulator.disable_login([device_token], disabled=False)  # the cause is fixed
    code, out, err = cli("relogin", "--client-id", client_id, "--json")

    assert code == 0, err
    assert json.loads(out)["Outcome"] == "logged_in"
    after = _item(dynamodb, stack, device_token)
    assert after["Status"] == "ACTIVE"
    assert "DueShard" in after
    assert after["AccessToken"].count(".") == 2
