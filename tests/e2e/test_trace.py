"""``telematics-reg trace`` follows one registration end to end on the local stack: a duplicate, a dead-lettered and
a refreshed registration, from their messages through each delivery and outcome to the current state; and the same
trace from CloudWatch Logs Insights (a fake logs client that runs the query the command builds)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from local.logs import captured_to
from local.runner import LocalService, RuntimeOptions
from telematics_cli import trace
from telematics_cli.app import main
from telematics_cli.target import Target, from_local
from telematics_cli.users import UserRef

from .conftest import ROOT, aws, put_signup, send_registration, user_by_client, wait_for

REVOKED = "revoked"


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalService, Path]]:
    folder = tmp_path_factory.mktemp("trace")
    service = LocalService(
        template_path=ROOT / "template.yaml",
        stack_name="trace",
        region="ca-central-1",
        parameters={"LogLevel": "INFO", "RefreshMarginSeconds": "60", "RefreshSpreadSeconds": "0"},
        unknown_instances={REVOKED: {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())}},
        token_lifetime=63,
        options=RuntimeOptions(failure_visibility_timeout=1, schedule_interval=1.0, async_retry_delay=0.5),
        state_path=folder / "stack.json",
    )
    with captured_to(folder / "run.log"), service:
        yield service, folder


def _trace(folder: Path, capsys: pytest.CaptureFixture[str], *args: str, known: bool = True) -> dict[str, Any]:
    code = main(["--local-stack", str(folder / "stack.json"), "trace", *args, "--json"])
    captured = capsys.readouterr()
    if code == 1 and not known:
        return {"timeline": [], "dead_letters": []}  # nothing known yet
    assert code == 0, captured.err
    # The handlers run in this process and print their metric lines on stdout too: find the trace among them.
    start = captured.out.index('{\n  "identity"')
    document: dict[str, Any] = json.JSONDecoder().raw_decode(captured.out, start)[0]
    return document


def _with_history(document: dict[str, Any], versions: int) -> dict[str, Any] | None:
    return document if len(document.get("refresh_history", [])) >= versions else None


def _whats(document: dict[str, Any]) -> list[str]:
    return [entry["what"] for entry in document["timeline"]]


def test_a_duplicate_registration_is_traced_through_both_entry_points(
    traced: tuple[LocalService, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    service, folder = traced
    client_id = f"dup-{uuid.uuid4().hex[:8]}"
    event_id = put_signup(service.stack, {"ClientId": client_id, "FirstName": "Ada"})
    wait_for(lambda: user_by_client(service.stack, client_id), timeout=30, what="the signup stored")
    message_id = send_registration(service.stack, {"ClientId": client_id})
    wait_for(
        lambda: any("duplicate answered" in w for w in _whats(_trace(folder, capsys, "--client-id", client_id))),
        timeout=30,
        what="the duplicate answered",
    )

    document = _trace(folder, capsys, "--client-id", client_id)

    assert {event_id, message_id} <= set(document["messages"])
    whats = _whats(document)
    assert whats.index("registered") < whats.index("duplicate answered")
    kinds = [(e["detail_type"], e["duplicate"]) for e in document["outcome_events"]]
    assert ("TelematicsUserRegistered", False) in kinds
    assert ("TelematicsUserRegistered", True) in kinds
    functions = {d["function"] for d in document["deliveries"]}
    assert functions == {"Signup", "RegistrationQueue"}  # one delivery through each entry point
    assert document["state"]["Status"] == "ACTIVE"
    assert document["identity"]["DeviceToken"] == document["state"]["DeviceToken"]
    assert document["refresh_history"][0]["via"] == "create"


def test_a_dead_lettered_registration_shows_its_reason_and_its_letter(
    traced: tuple[LocalService, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    service, folder = traced
    client_id = f"nowhere-{uuid.uuid4().hex[:8]}"
    message_id = send_registration(service.stack, {"ClientId": client_id, "Instance": "nowhere"})

    document = wait_for(
        lambda: (d := _trace(folder, capsys, "--client-id", client_id, known=False))["dead_letters"] and d,
        timeout=30,
        what="the dead letter",
    )

    assert document["messages"] == [message_id]
    assert "dead-lettered" in _whats(document)
    assert [(letter["Queue"], letter["Reason"]) for letter in document["dead_letters"]] == [
        ("registration", "unknown_instance")
    ]
    assert [e["detail_type"] for e in document["outcome_events"]] == ["TelematicsRegistrationFailed"]
    assert document["state"] is None  # never stored


def test_a_registration_retried_until_sqs_dead_letters_it_shows_every_delivery(
    traced: tuple[LocalService, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    service, folder = traced
    client_id = f"revoked-{uuid.uuid4().hex[:8]}"
    message_id = send_registration(service.stack, {"ClientId": client_id, "Instance": REVOKED})

    document = wait_for(
        lambda: (d := _trace(folder, capsys, "--message-id", message_id, known=False))["dead_letters"] and d,
        timeout=60,
        what="SQS to redrive the message after maxReceiveCount",
    )

    receives = [re.search(r"receive #(\d+): (\w+)", d["details"]) for d in document["deliveries"]]
    assert [(int(m.group(1)), m.group(2)) for m in receives if m] == [(n, "failed") for n in range(1, 6)]
    assert document["dead_letters"][0]["Reason"] == "max-receives"
    assert document["identity"]["ClientId"] == client_id


def test_a_refreshed_registration_shows_its_token_versions(
    traced: tuple[LocalService, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    service, folder = traced
    client_id = f"fresh-{uuid.uuid4().hex[:8]}"
    send_registration(service.stack, {"ClientId": client_id})
    document = wait_for(  # each commit is logged right after it lands
        lambda: _with_history(_trace(folder, capsys, "--client-id", client_id, known=False), 3),
        timeout=60,
        what="two rotations in the trace",
    )

    history = document["refresh_history"]
    assert [h["version"] for h in history][:3] == [1, 2, 3]
    assert [h["via"] for h in history][:3] == ["create", "refresh", "refresh"]
    assert document["state"]["Version"] >= 3
    assert all("eyJ" not in json.dumps(entry) for entry in document["timeline"])  # no token anywhere

    code = main(["--local-stack", str(folder / "stack.json"), "trace", "--client-id", client_id])
    text = capsys.readouterr().out
    assert code == 0
    assert "refresh history: v1 create" in text
    assert "v2 refresh" in text
    assert "current state: ACTIVE" in text


def test_nothing_known_is_a_data_error(traced: tuple[LocalService, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, folder = traced
    code = main(["--local-stack", str(folder / "stack.json"), "trace", "--client-id", "never-seen"])
    assert code == 1
    assert "nothing known about ClientId 'never-seen'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- the AWS path (faked)


class FakeInsights:
    """CloudWatch Logs with Logs Insights, for the query ``trace`` builds: filters of ``field = "v"`` and
    ``field in ["v", ...]`` joined by ``or``, sorted by time. Lines are the local stack's log."""

    def __init__(self, lines: list[dict[str, Any]]) -> None:
        self.lines = lines
        self.queries: list[dict[str, Any]] = []
        self.polls = 0

    def start_query(self, **kwargs: Any) -> dict[str, str]:
        self.queries.append(kwargs)
        return {"queryId": f"q-{len(self.queries)}"}

    def get_query_results(self, queryId: str) -> dict[str, Any]:
        self.polls += 1
        if self.polls % 2:
            return {"status": "Running", "results": []}
        query = self.queries[int(queryId.removeprefix("q-")) - 1]["queryString"]
        condition = re.search(r"\| filter (.*)\n", query)
        assert condition is not None
        wanted: list[tuple[str, set[str]]] = []
        for term in condition.group(1).split(" or "):
            name, operator, value = term.split(" ", 2)
            values = json.loads(value) if operator == "in" else [json.loads(value)]
            wanted.append((name, set(values)))
        rows = [
            [{"field": "@timestamp", "value": line.get("timestamp")}, {"field": "@message", "value": json.dumps(line)}]
            for line in self.lines
            if any(str(line.get(name)) in values for name, values in wanted)
        ]
        return {"status": "Complete", "results": rows}


def test_on_aws_the_logs_come_from_a_logs_insights_query(
    traced: tuple[LocalService, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    service, folder = traced
    client_id = f"insights-{uuid.uuid4().hex[:8]}"
    send_registration(service.stack, {"ClientId": client_id, "FirstName": 'Quote " and \\ back'})
    wait_for(  # the user is stored first, then announced and logged
        lambda: any(
            client_id in text and '"registration stored"' in text
            for text in (folder / "run.log").read_text(encoding="utf-8").splitlines()
        ),
        timeout=30,
        what="the registration logged",
    )
    lines = [json.loads(text) for text in (folder / "run.log").read_text(encoding="utf-8").splitlines()]
    handler_lines = [line for line in lines if "service" in line]  # Lambda's log groups hold the handlers' lines
    fake = FakeInsights(handler_lines)
    logs = trace.InsightsLogs(fake, ["/aws/lambda/a", "/aws/lambda/b"], sleep=lambda _: None)
    target = from_local(folder / "stack.json")
    options = trace.TraceOptions(ref=UserRef(client_id, "default", None), message_id=None, since_seconds=3600)

    document = trace.report(trace.gather(target, logs, options, now=time.time()))

    first = fake.queries[0]
    assert first["logGroupNames"] == ["/aws/lambda/a", "/aws/lambda/b"]
    assert f'client_id = "{client_id}"' in first["queryString"]
    assert "| sort @timestamp asc" in first["queryString"]
    assert "message_id in [" in fake.queries[1]["queryString"] or "message_id = " in fake.queries[1]["queryString"]
    assert "registered" in _whats(document)
    assert [e["detail_type"] for e in document["outcome_events"]] == ["TelematicsUserRegistered"]
    assert document["state"]["Status"] == "ACTIVE"


def test_logs_insights_strings_are_escaped() -> None:
    query = trace.insights_query(trace.Wanted(client_ids=frozenset({'a"b\\c'})))
    assert 'client_id = "a\\"b\\\\c"' in query


def test_the_log_groups_are_the_stacks_log_group_resources() -> None:
    class FakeCloudFormation:
        def get_paginator(self, name: str) -> Any:
            assert name == "list_stack_resources"
            return self

        def paginate(self, StackName: str) -> list[dict[str, Any]]:
            assert StackName == "prod"
            return [
                {
                    "StackResourceSummaries": [
                        {"ResourceType": "AWS::Logs::LogGroup", "PhysicalResourceId": "/aws/lambda/prod-Signup"},
                        {"ResourceType": "AWS::SQS::Queue", "PhysicalResourceId": "https://queue"},
                        {"ResourceType": "AWS::Logs::LogGroup", "PhysicalResourceId": "/aws/lambda/prod-Queue"},
                    ]
                }
            ]

    target = from_local_like_stack("prod")
    target._clients["cloudformation"] = FakeCloudFormation()

    assert trace.log_groups_of(target) == ["/aws/lambda/prod-Queue", "/aws/lambda/prod-Signup"]


def from_local_like_stack(name: str) -> Target:
    return Target(
        description=f"stack {name!r}",
        region="eu-west-1",
        session=boto3.session.Session(region_name="eu-west-1"),
        endpoint_url=None,
        outputs={},
        parameters={},
        environment={},
        unreachable_hint="",
        stack_name=name,
    )


def test_dead_letter_queues_are_only_peeked(
    traced: tuple[LocalService, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    service, folder = traced
    client_id = f"peek-{uuid.uuid4().hex[:8]}"
    send_registration(service.stack, {"ClientId": client_id, "Gender": "Robot"})
    wait_for(
        lambda: _trace(folder, capsys, "--client-id", client_id, known=False)["dead_letters"],
        timeout=30,
        what="the letter",
    )
    sqs = aws(service.stack, "sqs")
    url = service.stack.queue_url("RegistrationDeadLetterQueue")

    _trace(folder, capsys, "--client-id", client_id)

    depth = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
    assert int(depth["ApproximateNumberOfMessages"]) >= 1  # still there, and visible again at once
