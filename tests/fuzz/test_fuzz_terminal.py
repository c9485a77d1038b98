"""The operator's terminal: whatever a ClientId, a stored attribute, a dead letter or a file holds, what the CLI
prints carries no terminal control (C0 but tab and newline, DEL, C1, ESC/OSC sequences), and printing never
fails on it; and a ClientId with a control character is refused at the door."""

from __future__ import annotations

import json
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.dynamodb.types import TypeSerializer
from hypothesis import example, given
from hypothesis import strategies as st

from telematics_cli import output
from telematics_cli.app import main
from telematics_cli.target import Target
from telematics_reg.errors import InvalidMessageError
from telematics_reg.models import parse_registration_message

from .conftest import INPUTS
from .strategies import C0, C1, ESCAPE_SEQUENCES, any_json, hostile_text

# What may reach the terminal: no control character but newline (and tab, which Rich expands).
UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
OSC_PAYLOAD = "owned"  # inside every OSC sequence of the strategies: must not be shown either


def _assert_safe(printed: str) -> None:
    found = UNSAFE.search(printed)
    where = printed[max(0, found.start() - 40) : found.start() + 40] if found else ""
    assert found is None, f"control {found.group()!r} in output: {where!r}"


@given(text=hostile_text | st.text())
@example(text="".join(ESCAPE_SEQUENCES))
@example(text=C0 + C1)
def test_clean_leaves_no_terminal_control(text: str) -> None:
    INPUTS("terminal text")
    cleaned = output.clean(text)
    _assert_safe(cleaned)
    assert output.clean(cleaned) == cleaned
    if not UNSAFE.search(text) and not re.search(r"[\ud800-\udfff]", text):
        assert cleaned == text  # text without controls is shown as is


@given(client_id=hostile_text)
@example(client_id="c\x1b]0;owned\x07")
@example(client_id="c\x9b2J")
@example(client_id="tab\there")
def test_a_client_id_with_a_control_character_is_refused(client_id: str) -> None:
    INPUTS("ClientId")
    has_control = re.search(r"[\x00-\x1f\x7f-\x9f]", client_id) is not None
    for body in ({"ClientId": client_id}, {"UserFields": {"ClientId": client_id}}):
        if has_control:
            with pytest.raises(InvalidMessageError) as refused:
                parse_registration_message(json.dumps(body))
            if len(client_id) <= 128 and not re.search(r"[\ud800-\udfff]", client_id):  # else refused for that
                assert any("control characters" in e.message for e in refused.value.errors), refused.value.errors
        else:
            try:
                parse_registration_message(json.dumps(body))
            except InvalidMessageError as exc:
                problems = [e.message for e in exc.errors if "control characters" in e.message]
            else:
                problems = []
            assert problems == []


# --- show ---------------------------------------------------------------------------------------------------


class _FakeDynamoDB:
    def __init__(self, item: dict[str, Any]) -> None:
        serializer = TypeSerializer()
        self.item = {key: serializer.serialize(value) for key, value in item.items()}

    def query(self, **_: Any) -> dict[str, Any]:
        return {"Items": [{"DeviceToken": self.item["DeviceToken"]}]}

    def get_item(self, **_: Any) -> dict[str, Any]:
        return {"Item": self.item}


class _FakeSqs:
    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.messages = messages

    def receive_message(self, **_: Any) -> dict[str, Any]:
        batch, self.messages = self.messages[:10], self.messages[10:]
        return {"Messages": batch}

    def change_message_visibility_batch(self, **_: Any) -> dict[str, Any]:
        return {}

    def get_queue_attributes(self, **_: Any) -> dict[str, Any]:
        return {"Attributes": {"ApproximateNumberOfMessages": "1"}}


def _target(**clients: Any) -> Target:
    target = Target(
        description="fuzz target",
        region="us-east-1",
        session=boto3.session.Session(region_name="us-east-1"),
        endpoint_url=None,
        outputs={"TokensTableName": "tokens", "RegistrationDeadLetterQueueUrl": "http://sqs.invalid/q/dlq"},
        parameters={},
        environment={},
        unreachable_hint="",
    )
    target._clients.update(clients)
    return target


stored_values = st.one_of(hostile_text, st.integers(min_value=0, max_value=2**40), st.lists(hostile_text, max_size=2))


@given(
    attributes=st.fixed_dictionaries(
        {"ClientId": hostile_text, "LastError": hostile_text, "Status": st.sampled_from(["ACTIVE", "x\x1b[2J"])},
        optional={"Instance": hostile_text, "AccessToken": hostile_text, "Other\x1b]0;owned\x07": stored_values},
    ),
    as_json=st.booleans(),
)
@example(attributes={"ClientId": "[/]", "LastError": "\x1b]52;c;Y2xpcGJvYXJk\x07", "Status": "ACTIVE"}, as_json=False)
def test_show_prints_no_terminal_control(
    attributes: dict[str, Any], as_json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    INPUTS("CLI show")
    item = {"DeviceToken": str(uuid.uuid4()), "pk": "USER#x", **attributes}
    from telematics_cli import users  # noqa: PLC0415 - after the fixtures, as the command would

    code = users.run_show(
        _target(dynamodb=_FakeDynamoDB(item)),
        users.UserRef(client_id="c", instance="default", device_token=None),
        reveal=False,
        as_json=as_json,
    )
    printed = capsys.readouterr()
    assert code == 0
    _assert_safe(printed.out + printed.err)
    if as_json:
        json.loads(printed.out)  # the controls are escaped in JSON strings, the values unchanged
    elif not any(OSC_PAYLOAD in output.clean(f"{key} {value}") for key, value in item.items()):
        assert OSC_PAYLOAD not in printed.out  # a whole OSC sequence is dropped, not only its ESC


# --- dlq list -----------------------------------------------------------------------------------------------

letters = st.fixed_dictionaries(
    {"Body": hostile_text | any_json.map(json.dumps)},
    optional={
        "MessageAttributes": st.fixed_dictionaries(
            {"Reason": st.fixed_dictionaries({"StringValue": hostile_text})},
            optional={
                "ErrorDetail": st.fixed_dictionaries({"StringValue": hostile_text}),
                "Source": st.fixed_dictionaries({"StringValue": hostile_text}),
            },
        ),
    },
)


@given(messages=st.lists(letters, min_size=1, max_size=4), as_json=st.booleans())
@example(
    messages=[{"Body": '{"ClientId": "\\u001b]0;owned\\u0007"}', "MessageAttributes": {
        "Reason": {"StringValue": "[/]\x1b[2J"}, "ErrorDetail": {"StringValue": "\x9d0;owned\x9c"}}}],
    as_json=False,
)  # fmt: skip
def test_dlq_list_prints_no_terminal_control(
    messages: list[dict[str, Any]], as_json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    INPUTS("CLI dlq list")
    from telematics_cli import dlq  # noqa: PLC0415

    received = [
        {**m, "MessageId": f"id-{n}", "ReceiptHandle": f"r-{n}", "Attributes": {}} for n, m in enumerate(messages)
    ]
    code = dlq.run_list(_target(sqs=_FakeSqs(received)), queue="registration", limit=10, examples=5, as_json=as_json)
    printed = capsys.readouterr()
    assert code == 0
    _assert_safe(printed.out + printed.err)
    if as_json:
        json.loads(printed.out)


# --- load --dry-run -----------------------------------------------------------------------------------------


@given(header=st.lists(hostile_text.filter(str.strip), min_size=1, max_size=3, unique_by=str.lower),
       cells=st.lists(hostile_text, max_size=3), as_json=st.booleans())  # fmt: skip
@example(header=["ClientId", "[/]"], cells=["c", "x"], as_json=False)
@example(header=["ClientId"], cells=["c\x1b]0;owned\x07"], as_json=False)
def test_load_dry_run_prints_no_terminal_control(
    header: list[str], cells: list[str], as_json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    INPUTS("CLI load --dry-run")
    import csv  # noqa: PLC0415
    import io  # noqa: PLC0415

    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, cells])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.csv"
        path.write_text(buffer.getvalue(), encoding="utf-8", errors="surrogatepass")
        code = main(["load", str(path), "--dry-run", "--no-progress", *(["--json"] if as_json else [])])
    printed = capsys.readouterr()
    assert code in (0, 1), printed.err
    _assert_safe(printed.out + printed.err)
