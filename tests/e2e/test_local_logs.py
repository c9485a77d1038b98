"""The local stack's log can be followed: one JSON object per line whoever writes it, and every handler line carries
its own invocation's function name and correlation id, however many invocations run at once in the process."""

from __future__ import annotations

import io
import json
import logging
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

from local.lambda_runtime import LocalFunction
from local.logs import JsonLineFormatter, JsonLines, configure, redirect_terminal_handlers
from telematics_reg.observability import logger

_SIGNUP_LIKE = """
import time
from telematics_reg.observability import logger

@logger.inject_lambda_context(correlation_id_path="id", clear_state=True)
def lambda_handler(event, context):
    for step in range(5):
        time.sleep(0.002)
        logger.info("signup step", extra={"expected_function": context.function_name, "expected_id": event["id"]})
"""

_QUEUE_LIKE = """
import time
from telematics_reg.batching import process_sqs_batch
from telematics_reg.observability import logger

@logger.inject_lambda_context(clear_state=True)
def lambda_handler(event, context):
    def record_handler(record):
        for step in range(3):
            time.sleep(0.002)
            logger.info(
                "record step",
                extra={"expected_function": context.function_name, "expected_id": record.message_id},
            )

    return process_sqs_batch(event, record_handler, max_workers=4)
"""


def _function(tmp_path: Path, name: str, body: str) -> LocalFunction:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "handler.py").write_text(textwrap.dedent(body), encoding="utf-8")
    return LocalFunction(name, handler="handler.lambda_handler", code_path=folder, environment={}, timeout=30)


def _record(message_id: str) -> dict[str, Any]:
    return {
        "messageId": message_id,
        "receiptHandle": "r",
        "body": "{}",
        "attributes": {},
        "messageAttributes": {},
        "md5OfBody": "",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:1:q",
        "awsRegion": "us-east-1",
    }


def test_concurrent_invocations_log_their_own_function_and_correlation_id(tmp_path: Path) -> None:
    captured = io.StringIO()
    lines = JsonLines(captured)
    previous = logger.registered_handler.stream  # type: ignore[attr-defined]
    redirect_terminal_handlers(lines)
    signup = [_function(tmp_path, f"Signup{n}", _SIGNUP_LIKE) for n in range(3)]
    queue = [_function(tmp_path, f"Queue{n}", _QUEUE_LIKE) for n in range(3)]
    try:
        calls: list[tuple[LocalFunction, dict[str, Any]]]
        calls = [(fn, {"id": f"event-{uuid.uuid4()}"}) for fn in signup for _ in range(4)]
        calls += [
            (fn, {"Records": [_record(f"msg-{uuid.uuid4()}") for _ in range(4)]}) for fn in queue for _ in range(3)
        ]
        threads = [threading.Thread(target=fn.invoke, args=(event,)) for fn, event in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        lines.flush()
    finally:
        logger.registered_handler.setStream(previous)  # type: ignore[attr-defined]

    parsed = [json.loads(line) for line in captured.getvalue().splitlines()]
    steps = [line for line in parsed if line.get("message") in {"signup step", "record step"}]
    assert len(steps) == 3 * 4 * 5 + 3 * 3 * 4 * 3
    wrong = [
        line
        for line in steps
        if line.get("function_name") != line["expected_function"] or line.get("correlation_id") != line["expected_id"]
    ]
    assert wrong == [], wrong[:3]
    records = [line for line in steps if line["message"] == "record step"]
    assert all(line["message_id"] == line["expected_id"] for line in records)


def test_every_kind_of_output_becomes_one_json_object_per_line() -> None:
    captured = io.StringIO()
    lines = JsonLines(captured)
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonLineFormatter())
    plain = logging.getLogger("test.plain.botocore")
    plain.addHandler(handler)
    plain.propagate = False
    try:
        plain.warning("Connection pool is full, discarding connection: %s", "127.0.0.1")
        error = RuntimeError("boom\nsecond line")
        plain.error("could not publish", exc_info=(RuntimeError, error, None))
    finally:
        plain.removeHandler(handler)
    lines.write('{"_aws": {"Timestamp": 1, "CloudWatchMetrics": []}, "UsersRegistered": [1.0]}\n')
    lines.write('Traceback (most recent call last):\n  File "x.py", line 1\nValueError: x\n')
    lines.write("half a line ")
    lines.write("and the rest\n")
    lines.flush()

    parsed = [json.loads(line) for line in captured.getvalue().splitlines()]

    assert all(isinstance(line, dict) for line in parsed)
    assert parsed[0]["logger"] == "test.plain.botocore"
    assert parsed[0]["message"] == "Connection pool is full, discarding connection: 127.0.0.1"
    assert "second line" in parsed[1]["exception"]
    assert parsed[1]["exception_name"] == "RuntimeError"
    assert "_aws" in parsed[2]
    assert [line["message"] for line in parsed[3:6]] == [
        "Traceback (most recent call last):",
        '  File "x.py", line 1',
        "ValueError: x",
    ]
    assert parsed[6]["message"] == "half a line and the rest"


def test_configure_sends_the_root_logger_as_json(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logger.registered_handler.stream)  # type: ignore[attr-defined]
    with path.open("w", encoding="utf-8") as stream:
        try:
            lines = configure(stream)
            logging.getLogger("local.runner").info("invocation finished: %s", "succeeded", extra={"outcome": "ok"})
            lines.flush()
        finally:
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
            logger.registered_handler.setStream(saved[2])  # type: ignore[attr-defined]
    line = json.loads(path.read_text(encoding="utf-8"))
    assert line["message"] == "invocation finished: succeeded"
    assert line["outcome"] == "ok"


def test_configure_writes_each_handler_line_once_when_the_service_logger_was_built_first(tmp_path: Path) -> None:
    # The service's Powertools logger exists already (imported above, as make run's flows import it before the
    # logs are configured); its records must not reach the root handler configure installs as well.
    path = tmp_path / "run.log"
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logger.registered_handler.stream)  # type: ignore[attr-defined]
    with path.open("w", encoding="utf-8") as stream:
        try:
            lines = configure(stream)
            logger.info("registration stored", extra={"client_id": "c-1"})
            lines.flush()
        finally:
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
            logger.registered_handler.setStream(saved[2])  # type: ignore[attr-defined]
    written = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [line["message"] for line in written] == ["registration stored"]
    assert written[0]["service"] == "telematics-registration"  # Powertools' line, not the root handler's
