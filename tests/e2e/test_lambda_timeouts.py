"""A handler that overruns its Timeout is cut off, as Lambda cuts it off: the invocation fails at the deadline, its
SQS records come back (and end in the DLQ after maxReceiveCount), and the handler makes no outside call after it,
even when it catches ``Exception`` or works on a batch processor's threads."""

from __future__ import annotations

import http.server
import json
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from local import moto_server
from local.lambda_runtime import FunctionTimeoutError, LocalFunction
from local.runner import LocalRuntime, RuntimeOptions
from local.stack import provision

from .conftest import wait_for


class _Counter(http.server.BaseHTTPRequestHandler):
    """An upstream that answers every request at once and remembers when each came."""

    hits: list[float]

    def do_GET(self) -> None:
        type(self).hits.append(time.monotonic())
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def upstream() -> Iterator[tuple[str, list[float]]]:
    handler: type[_Counter] = type("Counter", (_Counter,), {"hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.hits
    finally:
        server.shutdown()
        server.server_close()


def _function(tmp_path: Path, body: str, *, timeout: int = 1) -> LocalFunction:
    folder = tmp_path / f"fn_{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "handler.py").write_text(textwrap.dedent(body), encoding="utf-8")
    return LocalFunction(
        "Overrunner", handler="handler.lambda_handler", code_path=folder, environment={}, timeout=timeout
    )


def _calls_after(hits: list[float], moment: float) -> int:
    return sum(1 for hit in hits if hit > moment)


def test_an_overrunning_handler_fails_at_its_timeout_and_calls_nothing_afterwards(
    tmp_path: Path, upstream: tuple[str, list[float]]
) -> None:
    url, hits = upstream
    function = _function(
        tmp_path,
        f"""
        import requests

        def lambda_handler(event, context):
            session = requests.Session()
            while True:  # a retry loop that swallows every error, as a careless handler might
                try:
                    session.get({url!r}, timeout=5)
                except Exception:
                    pass
        """,
    )

    started = time.monotonic()
    with pytest.raises(FunctionTimeoutError, match=r"Task timed out after 1\.00 seconds"):
        function.invoke({})
    deadline = time.monotonic()

    assert 0.9 <= deadline - started < 3.0
    assert hits, "the handler ran before its deadline"
    time.sleep(1.0)
    assert _calls_after(hits, deadline + 0.2) == 0  # `except Exception` did not keep it going
    assert function.cut_offs == 1


def test_threads_of_a_batch_processor_are_cut_off_with_their_invocation(
    tmp_path: Path, upstream: tuple[str, list[float]]
) -> None:
    url, hits = upstream
    function = _function(
        tmp_path,
        f"""
        import requests
        from telematics_reg.batching import process_sqs_batch

        def lambda_handler(event, context):
            def record_handler(record):
                session = requests.Session()
                while True:
                    try:
                        session.get({url!r}, timeout=5)
                    except Exception:
                        pass

            return process_sqs_batch(event, record_handler, max_workers=4)
        """,
    )
    records = [
        {
            "messageId": f"m-{n}",
            "receiptHandle": "r",
            "body": "{}",
            "attributes": {},
            "messageAttributes": {},
            "md5OfBody": "",
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:1:q",
            "awsRegion": "us-east-1",
        }
        for n in range(4)
    ]
    before = set(threading.enumerate())

    with pytest.raises(FunctionTimeoutError):
        function.invoke({"Records": records})
    deadline = time.monotonic()

    time.sleep(1.0)
    assert _calls_after(hits, deadline + 0.2) == 0
    wait_for(
        lambda: not [t for t in set(threading.enumerate()) - before if t.is_alive() and "watch" not in t.name],
        timeout=10,
        what="the invocation's threads to end",
    )


def test_a_handler_that_finishes_in_time_is_unaffected(tmp_path: Path) -> None:
    function = _function(
        tmp_path,
        "def lambda_handler(event, context):\n    return {'remaining': context.get_remaining_time_in_millis() > 0}\n",
        timeout=2,
    )

    assert function.invoke({}) == {"remaining": True}
    assert function.cut_offs == 0


def test_an_error_of_the_handler_is_the_invocations_outcome(tmp_path: Path) -> None:
    function = _function(tmp_path, "def lambda_handler(event, context):\n    raise ValueError('bad event')\n")

    with pytest.raises(ValueError, match="bad event"):
        function.invoke({})


_TEMPLATE = """\
AWSTemplateFormatVersion: "2010-09-09"
Transform: AWS::Serverless-2016-10-31
Resources:
  Work:
    Type: AWS::SQS::Queue
    Properties:
      VisibilityTimeout: 12
      RedrivePolicy:
        deadLetterTargetArn: !GetAtt WorkDeadLetters.Arn
        maxReceiveCount: 2
  WorkDeadLetters:
    Type: AWS::SQS::Queue
  Overrunner:
    Type: AWS::Serverless::Function
    Properties:
      Runtime: python3.11
      CodeUri: {code}
      Handler: handler.lambda_handler
      Timeout: 2
      Events:
        Jobs:
          Type: SQS
          Properties:
            Queue: !GetAtt Work.Arn
            BatchSize: 1
"""


def test_a_timed_out_sqs_batch_comes_back_and_is_dead_lettered_after_max_receives(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "handler.py").write_text(
        "import time\n\ndef lambda_handler(event, context):\n    while True:\n        time.sleep(0.05)\n",
        encoding="utf-8",
    )
    template = tmp_path / "template.yaml"
    template.write_text(_TEMPLATE.format(code=code), encoding="utf-8")
    server = moto_server.start()
    try:
        endpoint = moto_server.endpoint(server)
        stack = provision(endpoint, template_path=template, stack_name="overrun", region="eu-west-3")
        sqs = boto3.client(
            "sqs", endpoint_url=endpoint, region_name="eu-west-3", aws_access_key_id="x", aws_secret_access_key="x"
        )
        with LocalRuntime(stack, RuntimeOptions(failure_visibility_timeout=0, poll_wait_seconds=1)) as runtime:
            sqs.send_message(QueueUrl=stack.queue_url("Work"), MessageBody=json.dumps({"job": 1}))

            letters = wait_for(
                lambda: sqs.receive_message(QueueUrl=stack.queue_url("WorkDeadLetters")).get("Messages"),
                timeout=40,
                what="the message in the dead-letter queue",
                every=0.5,
            )
            stats = runtime.stats().function("Overrunner")
        assert json.loads(letters[0]["Body"]) == {"job": 1}
        assert stats.timeouts == 2  # delivered twice (maxReceiveCount), cut off at 2 s each time
        assert stats.records_failed == 2
    finally:
        server.stop()
