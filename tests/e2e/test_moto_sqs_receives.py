"""SQS never hands a message in flight to a second receiver: the local stack's moto must not either, or the local
event source mappings deliver a message twice at once (a duplicate `make run` counted that AWS would never make)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from local import moto_server

MESSAGES = 300
RECEIVERS = 8


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = moto_server.start()
    try:
        yield moto_server.endpoint(server)
    finally:
        server.stop()


def _sqs(endpoint: str) -> Any:
    return boto3.client(
        "sqs", endpoint_url=endpoint, region_name="ap-south-1", aws_access_key_id="x", aws_secret_access_key="x"
    )


def test_concurrent_receivers_never_get_the_same_message(endpoint: str) -> None:
    sqs = _sqs(endpoint)
    url = sqs.create_queue(QueueName="receivers", Attributes={"VisibilityTimeout": "360"})["QueueUrl"]
    for start in range(0, MESSAGES, 10):
        sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(n), "MessageBody": str(start + n)} for n in range(10)])
    received: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def receive() -> None:
        client = _sqs(endpoint)
        while True:
            batch = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
            if not batch:
                return
            with lock:
                received.update(message["MessageId"] for message in batch)

    threads = [threading.Thread(target=receive) for _ in range(RECEIVERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert len(received) == MESSAGES
    assert [mid for mid, times in received.items() if times > 1] == []


def test_a_long_poll_waits_for_a_message_without_holding_up_other_receivers(endpoint: str) -> None:
    sqs = _sqs(endpoint)
    url = sqs.create_queue(QueueName="long-poll")["QueueUrl"]
    other = sqs.create_queue(QueueName="other")["QueueUrl"]
    sqs.send_message(QueueUrl=other, MessageBody="ready")
    result: dict[str, Any] = {}

    def wait() -> None:
        result["messages"] = _sqs(endpoint).receive_message(QueueUrl=url, WaitTimeSeconds=3).get("Messages", [])

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert sqs.receive_message(QueueUrl=other).get("Messages")  # not blocked by the long poll
    sqs.send_message(QueueUrl=url, MessageBody="late")
    waiter.join(10)

    assert [m["Body"] for m in result["messages"]] == ["late"]
