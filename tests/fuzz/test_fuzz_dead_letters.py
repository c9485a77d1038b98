"""Dead letters through SQS (moto, in-process): whatever a message holds, its dead letter can be sent, carries its
Reason, and keeps a JSON body's meaning. The one slower property: bounded to a few inputs under ``ci``."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from moto import mock_aws

from telematics_reg.dead_letters import SqsDeadLetters
from telematics_reg.intake import RegistrationIntake

from .conftest import INPUTS, scaled
from .strategies import hostile_text, message_bodies
from .worlds import new_world

# What SQS accepts in a message body or attribute.
SQS_TEXT = re.compile("[\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]*")


@pytest.fixture(scope="module")
def sqs() -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as patch, mock_aws():
        for name, value in {
            "AWS_ACCESS_KEY_ID": "t",
            "AWS_SECRET_ACCESS_KEY": "t",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            patch.setenv(name, value)
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        yield boto3.client("sqs", region_name="us-east-1")


class _CheckingSqs:
    """Passes calls to SQS, first checking that every text sent is one SQS accepts (moto does not check all)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def send_message(self, **kwargs: Any) -> Any:
        texts = [kwargs["MessageBody"], *(a["StringValue"] for a in kwargs["MessageAttributes"].values())]
        for text in texts:
            assert SQS_TEXT.fullmatch(text), f"SQS would refuse {text!r}"
        return self._client.send_message(**kwargs)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")  # as the service's parser: no oracle for such a body


hostile_keys = hostile_text | st.sampled_from(["\ud800", "\uffff", "\ufffe", "\x00", "\U0010ffff"])
bodies = st.one_of(
    message_bodies,
    st.dictionaries(hostile_keys, hostile_keys, min_size=1, max_size=3).map(
        lambda d: json.dumps({"ClientId": "c", **d})
    ),
)


@settings(max_examples=scaled(20))
@given(body=bodies, source=st.sampled_from(["queue", "signup"]))
@example(body='{"ClientId": "c", "\\ud800": 1}', source="queue")
@example(body='{"ClientId": "c", "\\uffff": "\\ufffe"}', source="queue")
@example(body="\ud800", source="signup")
@example(body="NaN", source="queue")
def test_every_dead_letter_reaches_sqs_with_its_reason(sqs: Any, body: str, source: Any) -> None:
    INPUTS("dead letter to SQS")
    url = sqs.create_queue(QueueName=f"fuzz-dlq-{uuid.uuid4().hex}")["QueueUrl"]
    world = new_world()
    intake = RegistrationIntake(
        service=world.service, dead_letters=SqsDeadLetters(_CheckingSqs(sqs), queue_url=url), publisher=world.publisher
    )

    result = intake.handle(body, message_id="m\ud800-1", source=source)

    if result.status != "dead_lettered":
        return
    (message,) = sqs.receive_message(QueueUrl=url, MessageAttributeNames=["All"], MaxNumberOfMessages=10)["Messages"]
    assert message["MessageAttributes"]["Reason"]["StringValue"] == result.reason
    try:
        original = json.loads(body, parse_constant=_not_json)
    except (ValueError, RecursionError):
        return
    assert json.loads(message["Body"]) == original  # a JSON body keeps its meaning
