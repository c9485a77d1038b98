"""The lifecycle commands of ``telematics-reg`` (update, deactivate, reactivate, delete, move; ``load`` with
``Action`` rows; ``show --upstream``) and the dead-letter privacy of ``dlq list`` / ``dlq redrive``, against moto,
the emulator and the provisioned template, with the registration and lifecycle functions run in-process on what
the queues really hold (their real ``SentTimestamp``)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.dynamodb.types import TypeDeserializer

from local.emulator.testing import EmulatorHandle
from local.lambda_runtime import LocalFunction
from local.stack import LocalStack, provision
from telematics_cli import dlq, main, rows
from telematics_cli.lifecycle import judge
from telematics_cli.stamps import OccurredAtStamp, iso_ms
from telematics_reg.batching import BatchFailedError
from telematics_reg.lifecycle.changes import Action, LifecycleChange
from telematics_reg.store import UserRecord, UserStatus

from .conftest import INSTANCES, ROOT, Functions, drain

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture(scope="module")
def lc_stack(moto_endpoint: str, aws_env: None, upstream: EmulatorHandle) -> LocalStack:
    """A stack of its own whose admin secret holds the emulator's admin account (the lifecycle's one session)."""
    name = f"clilc-{uuid.uuid4().hex[:6]}"
    return provision(
        moto_endpoint,
        template_path=ROOT / "template.yaml",
        parameters={"UserServiceUrl": upstream.url, "SignupEventBusName": f"{name}-bus", "LogLevel": "WARNING"},
        stack_name=name,
        instance_credentials=INSTANCES,
        admin_credentials=upstream.admin_account,
    )


@pytest.fixture
def lc(lc_stack: LocalStack, sqs: Any) -> LocalStack:
    for logical_id in (
        "RegistrationQueue",
        "LifecycleQueue",
        "RegistrationDeadLetterQueue",
        "LifecycleDeadLetterQueue",
        "SignupDeadLetterQueue",
    ):
        drain(sqs, lc_stack.queue_url(logical_id))
    return lc_stack


@pytest.fixture
def cli(lc: LocalStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    stack_file = lc.save(tmp_path / "stack.json")

    def run(*args: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--local-stack", str(stack_file), *(str(a) for a in args)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def deliver(sqs: Any, stack: LocalStack, queue: str, function: LocalFunction) -> list[str]:
    """What Lambda's event source mapping does: the queue's messages, as received (real attributes, among them
    ``SentTimestamp``), through the function; those it reports failed are made visible again. Returns the ids of
    the failed ones."""
    url = stack.queue_url(queue)
    received = sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=30, AttributeNames=["All"], WaitTimeSeconds=0
    ).get("Messages", [])
    if not received:
        return []
    records = [
        {
            "messageId": m["MessageId"],
            "receiptHandle": m["ReceiptHandle"],
            "body": m["Body"],
            "attributes": m.get("Attributes", {}),
            "messageAttributes": {},
            "md5OfBody": m.get("MD5OfBody", ""),
            "eventSource": "aws:sqs",
            "eventSourceARN": stack.queue_arn(queue),
            "awsRegion": stack.region,
        }
        for m in received
    ]
    try:
        response = function.invoke({"Records": records})
        failed = {f["itemIdentifier"] for f in response["batchItemFailures"]}
    except BatchFailedError:  # every record failed: Lambda retries the whole batch
        failed = {m["MessageId"] for m in received}
    for message in received:
        if message["MessageId"] in failed:
            sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0)
        else:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return sorted(failed)


def register(sqs: Any, stack: LocalStack, functions: Functions, client_id: str, **profile: Any) -> str:
    sqs.send_message(
        QueueUrl=stack.outputs["RegistrationQueueUrl"], MessageBody=json.dumps({"ClientId": client_id, **profile})
    )
    assert deliver(sqs, stack, "RegistrationQueue", functions.get("RegistrationQueueFunction")) == []
    (item,) = [i for i in items(stack, sqs, client_id) if i["Status"] == "ACTIVE"]
    return str(item["DeviceToken"])


def items(stack: LocalStack, sqs: Any, client_id: str, instance: str = "default") -> list[dict[str, Any]]:
    dynamodb = boto3.client("dynamodb", endpoint_url=stack.endpoint_url, region_name=stack.region)
    table = stack.outputs["TokensTableName"]
    keys = dynamodb.query(
        TableName=table,
        IndexName="ByClient",
        KeyConditionExpression="ClientKey = :k",
        ExpressionAttributeValues={":k": {"S": f"{instance}#{client_id}"}},
    )["Items"]
    deserializer = TypeDeserializer()
    found = []
    for key in keys:
        item = dynamodb.get_item(TableName=table, Key={"pk": key["pk"]}, ConsistentRead=True).get("Item")
        if item:
            found.append({k: deserializer.deserialize(v) for k, v in item.items()})
    return found


@pytest.fixture
def functions_lc(lc: LocalStack) -> Functions:
    return Functions(lc)


def queued(sqs: Any, url: str) -> list[dict[str, Any]]:
    return [json.loads(m["Body"]) for m in drain(sqs, url)]


def occurred_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


# ---------------------------------------------------------------------------------------------- one user


def test_update_sends_the_functions_contract_with_occurred_at_now_and_waits_for_the_applied_user(
    cli: Cli, sqs: Any, lc: LocalStack, functions_lc: Functions, upstream: EmulatorHandle
) -> None:
    client_id = f"upd-{uuid.uuid4().hex[:8]}"
    device_token = register(sqs, lc, functions_lc, client_id, FirstName="Ada", City="London")
    before = int(time.time() * 1000)

    code, out, err = cli(
        "update", "--client-id", client_id, "--set", "City=Paris", "--set", "ChildrenCount=2", "--no-tracking",
        "--json",
    )  # fmt: skip

    assert code == 0, err
    report = json.loads(out)
    (message,) = queued(sqs, lc.outputs["LifecycleQueueUrl"])
    assert message == {
        "Action": "Update",
        "ClientId": client_id,
        "Instance": "default",
        "City": "Paris",
        "ChildrenCount": 2,
        "UserFields": {"EnableTracking": False},
        "OccurredAt": report["OccurredAt"],
    }
    assert before <= occurred_ms(report["OccurredAt"]) <= int(time.time() * 1000)
    assert report["MessageId"]

    with _worker(sqs, lc, functions_lc):
        code, out, err = cli("update", "--client-id", client_id, "--set", "City=Rome", "--wait", "--json")

    assert code == 0, err
    outcome = json.loads(out)["Outcome"]
    assert (outcome["Status"], outcome["User"]["DeviceToken"]) == ("applied", device_token)
    assert outcome["User"]["LastChangeAt"] == occurred_ms(json.loads(out)["OccurredAt"])
    assert "AccessToken" not in outcome["User"] or "…(" in outcome["User"]["AccessToken"]  # redacted
    user = upstream.user(device_token)
    assert user is not None
    assert user["Profile"]["City"] == "Rome"


def test_bad_changes_are_refused_before_anything_is_sent(cli: Cli, sqs: Any, lc: LocalStack) -> None:
    url = lc.outputs["LifecycleQueueUrl"]
    cases: list[tuple[list[str], str]] = [
        (["update", "--client-id", "c-1", "--set", "Gender=Robot"], "Gender"),
        (["update", "--client-id", "c-1"], "changes nothing"),
        (["update", "--client-id", "c-1", "--set", "Shoe=42"], "Shoe"),
        (["update", "--client-id", "c-1", "--set", "ClientId=c-2"], "--client-id"),
        (["update", "--client-id", "c-1", "--set", "City"], "FIELD=VALUE"),
        (["update", "--client-id", "", "--set", "City=Paris"], "ClientId"),
        (["update", "--client-id", "c-1", "--instance", "nowhere", "--set", "City=Paris"], "no such instance"),
        (["move", "--client-id", "c-1", "--to-instance", "nowhere"], "--to-instance 'nowhere'"),
        (["deactivate", "--client-id", "c-1", "--wait", "--timeout", "0"], "more than 0"),
    ]
    for args, expected in cases:
        code, _, err = cli(*args)
        assert code == 2, (args, err)
        assert expected in err, (args, err)
    assert queued(sqs, url) == []


def test_delete_asks_for_the_client_id_unless_yes_and_waits_for_the_tombstone(
    cli: Cli,
    sqs: Any,
    lc: LocalStack,
    functions_lc: Functions,
    upstream: EmulatorHandle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client_id = f"del-{uuid.uuid4().hex[:8]}"
    device_token = register(sqs, lc, functions_lc, client_id, Email="ada@example.com")
    url = lc.outputs["LifecycleQueueUrl"]

    code, _, err = cli("delete", "--client-id", client_id)  # no terminal to ask on
    assert code == 2
    assert "--yes" in err

    class Terminal:
        def __init__(self, answer: str) -> None:
            self.answer = answer

        def isatty(self) -> bool:
            return True

        def readline(self) -> str:
            return self.answer + "\n"

    monkeypatch.setattr("sys.stdin", Terminal("yes"))
    code, _, err = cli("delete", "--client-id", client_id)
    assert code == 1
    assert "not confirmed" in err
    assert device_token in err  # the prompt names the user it would erase
    assert queued(sqs, url) == []

    monkeypatch.setattr("sys.stdin", Terminal(client_id))
    with _worker(sqs, lc, functions_lc):
        code, out, err = cli("delete", "--client-id", client_id, "--wait", "--json")

    assert code == 0, err
    outcome = json.loads(out)["Outcome"]
    assert outcome["Status"] == "applied"
    assert outcome["User"]["Status"] == "DELETED"
    assert {"AccessToken", "RefreshToken", "Email"}.isdisjoint(outcome["User"])
    assert upstream.user(device_token) is None


def test_deactivate_reactivate_and_move_wait_for_the_stored_user_to_follow(
    cli: Cli, sqs: Any, lc: LocalStack, functions_lc: Functions, upstream: EmulatorHandle
) -> None:
    client_id = f"mv-{uuid.uuid4().hex[:8]}"
    device_token = register(sqs, lc, functions_lc, client_id)

    with _worker(sqs, lc, functions_lc):
        code, out, err = cli("deactivate", "--client-id", client_id, "--wait", "--json")
        assert code == 0, err
        assert json.loads(out)["Outcome"]["User"]["Deactivated"] is True
        code, out, err = cli("reactivate", "--client-id", client_id, "--wait", "--json")
        assert code == 0, err
        assert json.loads(out)["Outcome"]["User"].get("Deactivated") in (None, False)
        code, out, err = cli("move", "--client-id", client_id, "--to-instance", "fleet-eu", "--wait")

    assert code == 0, err
    assert "applied" in out
    assert "fleet-eu" in out
    user = upstream.user(device_token)
    assert user is not None
    assert user["InstanceId"] == INSTANCES["fleet-eu"]["InstanceId"]
    (item,) = items(lc, sqs, client_id, "fleet-eu")
    assert (item["DeviceToken"], item["Instance"]) == (device_token, "fleet-eu")


def test_a_wait_reports_a_dead_letter_and_a_timeout_without_hanging(
    cli: Cli, sqs: Any, lc: LocalStack, functions_lc: Functions, monkeypatch: pytest.MonkeyPatch
) -> None:
    client_id = f"nobody-{uuid.uuid4().hex[:8]}"

    code, out, err = cli("deactivate", "--client-id", client_id, "--wait", "--timeout", "1")

    assert code == 1
    assert "unknown_user" in err  # warned before sending: the change waits for a registration
    assert "no outcome yet" in out
    assert "no registered user yet" in out

    # The function dead-letters what waited too long: --wait finds the letter by its OriginalMessageId.
    drain(sqs, lc.outputs["LifecycleQueueUrl"])
    with _worker(sqs, lc, functions_lc, UNKNOWN_USER_SECONDS="0"):
        code, out, err = cli("deactivate", "--client-id", client_id, "--wait", "--timeout", "30", "--json")

    assert code == 1, err
    outcome = json.loads(out)["Outcome"]
    assert (outcome["Status"], outcome["Reason"]) == ("dead_lettered", "unknown_user")


# --------------------------------------------------------------------------------------------------- load


def test_load_sends_action_rows_to_the_lifecycle_queue_in_file_order_and_refuses_an_unknown_action(
    cli: Cli, sqs: Any, lc: LocalStack, functions_lc: Functions, upstream: EmulatorHandle, tmp_path: Path
) -> None:
    client_id = f"ld-{uuid.uuid4().hex[:8]}"
    device_token = register(sqs, lc, functions_lc, client_id)
    source = tmp_path / "changes.csv"
    rows = [
        "ClientId,Action,City,UserFields.EnableTracking",
        f"{client_id}-new,,Oslo,true",
        f"{client_id},Update,Rome,",
        f"{client_id},update,Milan,false",
        f"{client_id},Deactivate,,",
        f"{client_id},Erase,,",
    ]
    source.write_text("\n".join(rows) + "\n", encoding="utf-8")

    code, out, _ = cli("load", source, "--no-progress", "--json")

    assert code == 1
    report = json.loads(out)
    assert report["errors"] == [
        {"line": 6, "problems": [{"field": "Action", "message": report["errors"][0]["problems"][0]["message"]}]}
    ]
    assert "Update, Deactivate, Reactivate, Delete, Move" in report["errors"][0]["problems"][0]["message"]
    assert queued(sqs, lc.outputs["LifecycleQueueUrl"]) == []
    assert queued(sqs, lc.outputs["RegistrationQueueUrl"]) == []

    source.write_text("\n".join(rows[:-1]) + "\n", encoding="utf-8")
    code, out, err = cli("load", source, "--no-progress", "--json")

    assert code == 0, err
    assert (json.loads(out)["sent"], json.loads(out)["lifecycle_rows"]) == (4, 3)
    (registration,) = queued(sqs, lc.outputs["RegistrationQueueUrl"])
    assert registration == {"ClientId": f"{client_id}-new", "City": "Oslo", "UserFields": {"EnableTracking": True}}
    changes = drain(sqs, lc.outputs["LifecycleQueueUrl"])
    bodies = sorted((json.loads(m["Body"]) for m in changes), key=lambda b: b["OccurredAt"])
    assert [(b["Action"], b.get("City")) for b in bodies] == [
        ("Update", "Rome"),
        ("update", "Milan"),
        ("Deactivate", None),
    ]
    assert bodies[1]["UserFields"] == {"EnableTracking": False}
    assert len({b["OccurredAt"] for b in bodies}) == 3  # strictly increasing in file order

    # Delivered in the reverse order, they still end as the file says: the older changes are dropped as stale.
    for body in reversed(bodies):
        sqs.send_message(QueueUrl=lc.outputs["LifecycleQueueUrl"], MessageBody=json.dumps(body))
        assert deliver(sqs, lc, "LifecycleQueue", functions_lc.get("LifecycleFunction")) == []
    user = upstream.user(device_token)
    assert user is not None
    assert user["Profile"].get("City") != "Rome"  # the first update never applied over the later ones
    (item,) = items(lc, sqs, client_id)
    assert item["Deactivated"] is True


# ---------------------------------------------------------------------------------------------- upstream


def test_show_upstream_finds_the_user_through_the_fleets_stored_admin_session(
    cli: Cli, sqs: Any, lc: LocalStack, functions_lc: Functions, upstream: EmulatorHandle
) -> None:
    client_id = f"show-{uuid.uuid4().hex[:8]}"
    device_token = register(sqs, lc, functions_lc, client_id, FirstName="Ada")
    logins_before = upstream.counters()["admin_logins"]

    code, out, err = cli("show", "--client-id", client_id, "--upstream", "--json")
    assert code == 0, err
    first = json.loads(out)
    code, out, err = cli("show", "--device-token", device_token, "--upstream")
    assert code == 0, err
    assert device_token in out
    with _worker(sqs, lc, functions_lc):
        code, _, err = cli("deactivate", "--client-id", client_id, "--wait")
        assert code == 0, err
    code, out, err = cli("show", "--client-id", client_id, "--upstream", "--json")

    assert code == 0, err
    assert first["Stored"]["DeviceToken"] == device_token
    (user,) = first["Upstream"]
    assert user["DeviceToken"] == device_token
    assert user["UserFields"][0]["ClientId"] == client_id
    assert first["Differences"] == []
    after = json.loads(out)
    assert after["Upstream"][0]["Status"] != user["Status"]
    assert after["Differences"] == []  # the stored Deactivated follows the upstream's Status
    # Three CLI finds and the function's update: at most the one Login that started the fleet's session.
    assert upstream.counters()["admin_logins"] - logins_before <= 1
    dynamodb = boto3.client("dynamodb", endpoint_url=lc.endpoint_url, region_name=lc.region)
    session = dynamodb.get_item(TableName=lc.outputs["TokensTableName"], Key={"pk": {"S": "ADMIN#SESSION"}})["Item"]
    assert session["AccessToken"]["S"] not in out + err  # the fleet's admin JWT, never shown
    assert session["AccessToken"]["S"][:12] not in out + err


# ---------------------------------------------------------------------------------------------- dead letters


def test_dlq_list_shows_ids_reasons_and_a_summary_but_bodies_only_with_bodies(
    cli: Cli, sqs: Any, lc: LocalStack
) -> None:
    client_id = f"private-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"ClientId": client_id, "Email": "ada@example.com", "Phone": "+15550100"})
    dlq_url = lc.outputs["RegistrationDeadLetterQueueUrl"]
    sqs.send_message(
        QueueUrl=dlq_url,
        MessageBody=body,
        MessageAttributes={
            "Reason": {"DataType": "String", "StringValue": "invalid_fields"},
            "ErrorDetail": {"DataType": "String", "StringValue": '[{"Key": "Phone", "Message": "bad"}]'},
            "Source": {"DataType": "String", "StringValue": "queue"},
            "OriginalMessageId": {"DataType": "String", "StringValue": "m-original"},
        },
    )
    lifecycle_dlq = lc.outputs["LifecycleDeadLetterQueueUrl"]
    sqs.send_message(QueueUrl=lifecycle_dlq, MessageBody=json.dumps({"Action": "Update", "ClientId": client_id}))

    for args in (["dlq", "list", "--json"], ["dlq", "list"]):
        code, out, _ = cli(*args)
        assert code == 0
        assert client_id not in out
        assert "ada@example.com" not in out
    code, out, _ = cli("dlq", "list", "--json")
    report = {q["queue"]: q for q in json.loads(out)["queues"]}
    (group,) = report["registration"]["groups"]
    (example,) = group["examples"]
    assert (group["reason"], example["OriginalMessageId"]) == ("invalid_fields", "m-original")
    assert example["Summary"].startswith("registration, ")
    assert "ClientId, Email, Phone" in example["Summary"]
    assert "Body" not in example
    (lifecycle_group,) = report["lifecycle"]["groups"]
    assert lifecycle_group["examples"][0]["Summary"].startswith("lifecycle Update")

    code, out, _ = cli("dlq", "list", "--queue", "registration", "--bodies", "--json")
    assert code == 0
    (example,) = json.loads(out)["queues"][0]["groups"][0]["examples"]
    assert json.loads(example["Body"]) == json.loads(body)


def test_a_letter_redriven_after_its_users_deletion_is_dropped_not_registered_anew(
    cli: Cli,
    sqs: Any,
    lc: LocalStack,
    functions_lc: Functions,
    upstream: EmulatorHandle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client_id = f"redrive-{uuid.uuid4().hex[:8]}"
    device_token = register(sqs, lc, functions_lc, client_id, Email="ada@example.com")
    # A duplicate of its registration failed its deliveries and SQS moved it to the DLQ (no OccurredAt in it).
    sqs.send_message(
        QueueUrl=lc.outputs["RegistrationDeadLetterQueueUrl"],
        MessageBody=json.dumps({"ClientId": client_id, "Email": "ada@example.com"}),
    )
    time.sleep(0.01)

    # The interleaving: the redrive holds the letter (in flight) when the deletion runs, so the deletion's
    # erasure cannot see it, then sends it back after the deletion.
    send_back = dlq._send_back
    deleted: list[str] = []

    def delete_then_send_back(target: Any, spec: Any, letter: Any) -> str:
        if not deleted:
            code, out, err = cli("delete", "--client-id", client_id, "--yes", "--json")
            assert code == 0, err
            deleted.append(json.loads(out)["MessageId"])
            failed = deliver(sqs, lc, "LifecycleQueue", functions_lc.get("LifecycleFunction"))
            assert failed == deleted  # the erasure saw a letter in flight: the deletion's message is retried
            (tombstone,) = items(lc, sqs, client_id)
            assert tombstone["Status"] == "DELETED"
        return send_back(target, spec, letter)

    monkeypatch.setattr(dlq, "_send_back", delete_then_send_back)
    code, out, err = cli("dlq", "redrive", "--queue", "registration", "--json")
    assert code == 0, err
    assert json.loads(out)["moved"] == 1

    (redriven,) = sqs.receive_message(
        QueueUrl=lc.outputs["RegistrationQueueUrl"], AttributeNames=["All"], VisibilityTimeout=0
    )["Messages"]
    assert occurred_ms(json.loads(redriven["Body"])["OccurredAt"]) < int(redriven["Attributes"]["SentTimestamp"])
    assert deliver(sqs, lc, "RegistrationQueue", functions_lc.get("RegistrationQueueFunction")) == []
    assert deliver(sqs, lc, "LifecycleQueue", functions_lc.get("LifecycleFunction")) == []  # the erasure completes

    (tombstone,) = items(lc, sqs, client_id)  # nothing recreated here ...
    assert (tombstone["DeviceToken"], tombstone["Status"]) == (device_token, "DELETED")
    assert upstream.users(client_id=client_id) == []  # ... nor upstream
    assert queued(sqs, lc.outputs["RegistrationDeadLetterQueueUrl"]) == []


def test_a_change_dead_lettered_unknown_user_and_redriven_after_a_newer_one_is_dropped_as_stale(
    cli: Cli, sqs: Any, lc: LocalStack, functions_lc: Functions, upstream: EmulatorHandle
) -> None:
    client_id = f"late-{uuid.uuid4().hex[:8]}"
    queue = lc.outputs["LifecycleQueueUrl"]
    # C: an update without OccurredAt (ordered by its send) for a user not registered yet.
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"Action": "Update", "ClientId": client_id, "City": "Old"}))
    time.sleep(0.05)
    between = int(time.time() * 1000)
    time.sleep(0.05)
    # Its user never appeared within the bound: dead-lettered unknown_user, later than it occurred.
    assert deliver(sqs, lc, "LifecycleQueue", functions_lc.get("LifecycleFunction", UNKNOWN_USER_SECONDS="0")) == []
    (letter,) = sqs.receive_message(
        QueueUrl=lc.outputs["LifecycleDeadLetterQueueUrl"],
        AttributeNames=["All"],
        MessageAttributeNames=["All"],
        VisibilityTimeout=0,
    )["Messages"]
    assert letter["MessageAttributes"]["Reason"]["StringValue"] == "unknown_user"
    occurred = occurred_ms(letter["MessageAttributes"]["OccurredAt"]["StringValue"])
    assert occurred < between < int(letter["Attributes"]["SentTimestamp"])
    assert occurred_ms(json.loads(letter["Body"])["OccurredAt"]) == occurred  # the body says it too

    # The user registers; U, a change that occurred after C, is applied.
    device_token = register(sqs, lc, functions_lc, client_id)
    newer = {"Action": "Update", "ClientId": client_id, "City": "New", "OccurredAt": iso_ms(between)}
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(newer))
    assert deliver(sqs, lc, "LifecycleQueue", functions_lc.get("LifecycleFunction")) == []
    assert upstream.user(device_token)["Profile"]["City"] == "New"  # type: ignore[index]

    code, out, err = cli("dlq", "redrive", "--queue", "lifecycle", "--json")
    assert code == 0, err
    assert json.loads(out)["moved"] == 1
    (redriven,) = sqs.receive_message(QueueUrl=queue, AttributeNames=["All"], VisibilityTimeout=0)["Messages"]
    assert occurred_ms(json.loads(redriven["Body"])["OccurredAt"]) == occurred
    assert deliver(sqs, lc, "LifecycleQueue", functions_lc.get("LifecycleFunction")) == []

    # C is older than U: dropped as stale, never applied over it.
    assert upstream.user(device_token)["Profile"]["City"] == "New"  # type: ignore[index]
    (item,) = [i for i in items(lc, sqs, client_id) if i["Status"] == "ACTIVE"]
    assert int(item["LastChangeAt"]) == between
    assert queued(sqs, lc.outputs["LifecycleDeadLetterQueueUrl"]) == []


def test_a_registration_dead_letter_carries_the_time_it_was_ordered_by_and_the_redrive_uses_it(
    cli: Cli, sqs: Any, lc: LocalStack, functions_lc: Functions
) -> None:
    # A registration naming an instance the secret does not hold: dead-lettered at once, after it was sent.
    sqs.send_message(
        QueueUrl=lc.outputs["RegistrationQueueUrl"],
        MessageBody=json.dumps({"ClientId": f"nowhere-{uuid.uuid4().hex[:8]}", "Instance": "nowhere"}),
    )
    (sent,) = sqs.receive_message(
        QueueUrl=lc.outputs["RegistrationQueueUrl"], AttributeNames=["All"], VisibilityTimeout=0
    )["Messages"]
    first_sent = int(sent["Attributes"]["SentTimestamp"])
    time.sleep(0.05)
    assert deliver(sqs, lc, "RegistrationQueue", functions_lc.get("RegistrationQueueFunction")) == []
    (letter,) = sqs.receive_message(
        QueueUrl=lc.outputs["RegistrationDeadLetterQueueUrl"],
        AttributeNames=["All"],
        MessageAttributeNames=["All"],
        VisibilityTimeout=0,
    )["Messages"]
    assert occurred_ms(letter["MessageAttributes"]["OccurredAt"]["StringValue"]) == first_sent
    assert int(letter["Attributes"]["SentTimestamp"]) > first_sent

    code, _, err = cli("dlq", "redrive", "--queue", "registration", "--json")
    assert code == 0, err
    (redriven,) = sqs.receive_message(QueueUrl=lc.outputs["RegistrationQueueUrl"], VisibilityTimeout=0)["Messages"]
    assert occurred_ms(json.loads(redriven["Body"])["OccurredAt"]) == first_sent


# ------------------------------------------------------------------------------------------------ helpers


class _worker:  # a context manager used like a function
    """The lifecycle function fed from its queue in a background thread while a command waits."""

    def __init__(self, sqs: Any, stack: LocalStack, functions: Functions, **overrides: str) -> None:
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._function = functions.get("LifecycleFunction", **overrides)
        self._sqs, self._stack = sqs, stack
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not deliver(self._sqs, self._stack, "LifecycleQueue", self._function):
                    time.sleep(0.2)
            except BaseException as exc:  # noqa: BLE001 - reported when the block ends
                self._errors.append(exc)
                return

    def __enter__(self) -> None:
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._errors, self._errors


# ------------------------------------------------------------------------------------------- outcome rules


def _record(**values: Any) -> UserRecord:
    base: dict[str, Any] = {"device_token": "d-1", "instance": "default", "instance_id": "i", "version": 1}
    return UserRecord(**(base | values))


@pytest.mark.parametrize(
    ("action", "records", "expected"),
    [
        (Action.UPDATE, [_record(status=UserStatus.ACTIVE, last_change_at=100)], ("applied", None)),
        (Action.UPDATE, [_record(status=UserStatus.ACTIVE, last_change_at=200)], ("superseded", "newer_change")),
        (Action.UPDATE, [_record(status=UserStatus.ACTIVE, last_change_at=50)], None),
        (Action.UPDATE, [_record(status=UserStatus.PENDING)], None),
        (Action.UPDATE, [_record(status=UserStatus.DELETED, deleted_at=150)], ("dropped", "user_deleted")),
        (Action.DELETE, [_record(status=UserStatus.DELETING, deleted_at=100)], None),
        (Action.DELETE, [_record(status=UserStatus.DELETED, deleted_at=100)], ("applied", None)),
        (Action.DELETE, [_record(status=UserStatus.DELETED, deleted_at=300)], ("dropped", "duplicate")),
        (Action.DELETE, [_record(status=UserStatus.DELETED, deleted_at=50)], None),
    ],
)
def test_the_outcome_a_wait_reads_from_the_users_items(
    action: Action, records: list[UserRecord], expected: tuple[str, str | None] | None
) -> None:
    change = LifecycleChange(action, client_id="c-1", instance="default", occurred_at=100)
    found = judge(change, records)
    assert (None if found is None else (found.status, found.reason)) == expected


def test_json_lines_rows_with_an_action_are_lifecycle_changes_and_an_empty_action_a_registration(
    tmp_path: Path,
) -> None:
    source = tmp_path / "changes.jsonl"
    lines = [
        {"ClientId": "c-1", "Action": "", "FirstName": "Ada"},
        {"clientId": "c-1", "action": "move", "toInstance": "fleet-eu"},
        {"ClientId": "c-1", "Action": 5},
        {"Action": "Delete"},
        {"ClientId": "c-1", "Action": "Deactivate", "City": "Paris"},
        {"ClientId": "c-1", "Action": "Update", "UserFields": {"EnableTracking": True}},
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")

    found = list(rows.read_rows(source, rows.InputFormat.JSONL, "sha"))

    assert [(r.line, r.valid, r.lifecycle) for r in found] == [
        (1, True, False),
        (2, True, True),
        (3, False, True),
        (4, False, True),
        (5, False, True),
        (6, True, True),
    ]
    assert json.loads(found[0].body or "") == {"ClientId": "c-1", "FirstName": "Ada"}  # no Action key sent
    assert [e.key for e in found[2].errors] == ["Action"]
    assert [e.key for e in found[3].errors] == ["ClientId"]
    assert [e.key for e in found[4].errors] == ["City"]


def test_occurred_at_stamps_increase_in_the_order_asked_even_when_the_clock_stands_still_or_steps_back() -> None:
    times = iter([100.0, 100.0, 99.0, 101.0])
    stamp = OccurredAtStamp(clock=lambda: next(times))

    stamped = [json.loads(stamp.stamp(json.dumps({"ClientId": "c", "Action": "Update"}))) for _ in range(4)]

    assert [occurred_ms(s["OccurredAt"]) for s in stamped] == [100_000, 100_001, 100_002, 101_000]
    given = json.dumps({"ClientId": "c", "Action": "Update", "occurredAt": "2026-01-01T00:00:00.000Z"})
    assert stamp.stamp(given) == given  # a row's own OccurredAt is kept: a re-send is then a duplicate
