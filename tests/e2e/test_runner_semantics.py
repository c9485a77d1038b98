"""The Lambda semantics the local runtime reproduces, checked without starting anything: partial batch
responses read as Lambda reads them, the SQS record shape, the asynchronous invocation record, schedules."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from local.demo import REDRIVEN, dead_letter_reason
from local.runner import failed_message_ids, invocation_record, schedule_period, sqs_record

IDS = ["m-1", "m-2", "m-3"]


@pytest.mark.parametrize("response", [None, {}, "", {"batchItemFailures": []}, {"batchItemFailures": None}])
def test_an_empty_partial_batch_response_is_a_complete_success(response: Any) -> None:
    assert failed_message_ids(response, IDS, report_batch_item_failures=True) == set()


def test_listed_items_fail_and_the_rest_succeed() -> None:
    response = {"batchItemFailures": [{"itemIdentifier": "m-2"}]}
    assert failed_message_ids(response, IDS, report_batch_item_failures=True) == {"m-2"}


@pytest.mark.parametrize(
    "response",
    [
        {"batchItemFailures": [{"itemIdentifier": "not-in-batch"}]},
        {"batchItemFailures": [{"itemIdentifier": ""}]},
        {"batchItemFailures": [{"itemIdentifier": None}]},
        {"batchItemFailures": [{"id": "m-1"}]},
        {"batchItemFailures": "m-1"},
        ["m-1"],
    ],
)
def test_an_invalid_partial_batch_response_fails_the_whole_batch(response: Any) -> None:
    assert failed_message_ids(response, IDS, report_batch_item_failures=True) == set(IDS)


def test_without_report_batch_item_failures_a_returned_list_is_ignored() -> None:
    response = {"batchItemFailures": [{"itemIdentifier": "m-2"}]}
    assert failed_message_ids(response, IDS, report_batch_item_failures=False) == set()


def test_an_sqs_record_has_the_shape_lambda_delivers() -> None:
    message = {
        "MessageId": "m-1",
        "ReceiptHandle": "rh",
        "MD5OfBody": "md5",
        "Body": '{"ClientId": "c"}',
        "Attributes": {"ApproximateReceiveCount": "2", "SentTimestamp": "1"},
        "MD5OfMessageAttributes": "md5a",
        "MessageAttributes": {
            "Reason": {"DataType": "String", "StringValue": "x"},
            "Blob": {"DataType": "Binary", "BinaryValue": b"\x00\x01"},
        },
    }

    record = sqs_record(message, queue_arn="arn:aws:sqs:eu-west-1:123456789012:q", region="eu-west-1")

    assert record["messageId"] == "m-1"
    assert record["receiptHandle"] == "rh"
    assert record["body"] == '{"ClientId": "c"}'
    assert record["attributes"]["ApproximateReceiveCount"] == "2"
    assert record["eventSource"] == "aws:sqs"
    assert record["eventSourceARN"] == "arn:aws:sqs:eu-west-1:123456789012:q"
    assert record["awsRegion"] == "eu-west-1"
    assert record["md5OfMessageAttributes"] == "md5a"
    assert record["messageAttributes"]["Reason"] == {
        "stringValue": "x",
        "stringListValues": [],
        "binaryListValues": [],
        "dataType": "String",
    }
    assert base64.b64decode(record["messageAttributes"]["Blob"]["binaryValue"]) == b"\x00\x01"


def test_an_invocation_record_carries_the_event_the_error_and_the_attempts() -> None:
    def handler() -> None:
        raise PermissionError("instance key rejected")

    with pytest.raises(PermissionError) as caught:
        handler()
    error = caught.value

    record = invocation_record(
        function_arn="arn:aws:lambda:us-east-1:123456789012:function:f",
        request_id="r-1",
        condition="RetriesExhausted",
        approximate_invoke_count=3,
        event={"detail": {"ClientId": "c"}},
        error=error,
    )

    assert record["version"] == "1.0"
    assert record["requestContext"] == {
        "requestId": "r-1",
        "functionArn": "arn:aws:lambda:us-east-1:123456789012:function:f:$LATEST",
        "condition": "RetriesExhausted",
        "approximateInvokeCount": 3,
    }
    assert record["requestPayload"] == {"detail": {"ClientId": "c"}}
    assert record["responseContext"]["functionError"] == "Unhandled"
    assert record["responsePayload"]["errorType"] == "PermissionError"
    assert record["responsePayload"]["errorMessage"] == "instance key rejected"
    assert dead_letter_reason({"Body": json.dumps(record)}) == "RetriesExhausted: PermissionError"


def test_dead_letter_reasons_come_from_whoever_wrote_the_message() -> None:
    assert (
        dead_letter_reason({"Body": "{}", "MessageAttributes": {"Reason": {"StringValue": "not_json"}}}) == "not_json"
    )
    assert dead_letter_reason({"Body": "x", "MessageAttributes": {"ERROR_CODE": {"StringValue": "E"}}}) == (
        "undeliverable: E"
    )
    assert dead_letter_reason({"Body": '{"ClientId": "c"}'}) == REDRIVEN


@pytest.mark.parametrize(
    ("expression", "seconds"),
    [("rate(5 minutes)", 300.0), ("rate(1 minute)", 60.0), ("rate(2 hours)", 7200.0), ("rate(1 day)", 86400.0)],
)
def test_rate_expressions_give_their_period(expression: str, seconds: float) -> None:
    assert schedule_period(expression) == seconds


@pytest.mark.parametrize("expression", ["cron(0 12 * * ? *)", "at(2026-11-21T10:00:00)", "rate(5 fortnights)"])
def test_other_expressions_are_not_fired_by_period(expression: str) -> None:
    assert schedule_period(expression) is None
