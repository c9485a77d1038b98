"""Secrets stay secret: with the service's logs at DEBUG and its metrics switched on, a run through every flow
(signup, queue, bulk, poison, refresh, dead token, Login fallback, NEEDS_RELOGIN, read path) leaves no issued
token, refresh token or InstanceKey in any metric blob, any printed line, or any event published on the bus;
and an InstanceKey pasted into the secret with a stray character leaks nowhere either.

(Log lines are checked for the whole test session by the guard in tests/conftest.py.)
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from local.emulator.testing import EmulatorHandle, running_emulator
from local.runner import invocation_record
from local.stack import LocalStack, provision
from telematics_reg.credentials import CredentialsConfigError
from telematics_reg.observability import SERVICE
from tests.conftest import secrets_in

from .conftest import INSTANCES, MALFORMED_INSTANCES, Functions, drain, signup_event, sqs_event
from .test_token_maintenance import Service, service  # noqa: F401 - the fixture is used by name

MARGIN = 1000  # above the 600 s lifetime the service fixture gives registered users


def _tap_every_outcome(svc: Service) -> str:
    bus = svc.stack.parameters["SignupEventBusName"]
    name = f"{svc.stack.stack_name}-audit"
    queue_url: str = svc.sqs.create_queue(QueueName=name)["QueueUrl"]
    arn = svc.sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    svc.events.put_rule(Name=name, EventBusName=bus, EventPattern=json.dumps({"source": ["telematics.registration"]}))
    svc.events.put_targets(Rule=name, EventBusName=bus, Targets=[{"Id": "audit", "Arn": arn}])
    return queue_url


def _drain(svc: Service, queue_url: str) -> list[str]:
    bodies = []
    while messages := svc.sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", []):
        for message in messages:
            bodies.append(message["Body"])
            svc.sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return bodies


def _tokens(svc: Service) -> set[str]:
    items = svc.dynamodb.scan(TableName=svc.table)["Items"]
    return {item[k]["S"] for item in items for k in ("AccessToken", "RefreshToken") if k in item}


def test_no_token_or_instance_key_in_metrics_output_or_published_events(
    service: Service,  # noqa: F811 - the fixture imported above
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")  # read when each invocation flushes its metrics
    svc = service
    audit = _tap_every_outcome(svc)
    run = uuid.uuid4().hex[:6]
    seen: set[str] = set()

    # Registration: the queue (singles, a bulk, poison) and a signup.
    queue_fn = svc.functions.get("RegistrationQueueFunction", POWERTOOLS_LOG_LEVEL="DEBUG")
    bodies: list[Any] = [{"ClientId": f"{run}-{n}"} for n in range(4)]
    bodies += [{"Quantity": 3}, "{poison", {"ClientId": f"{run}-0"}]
    queue_fn.invoke(sqs_event(bodies, queue_arn=svc.stack.queue_arn("RegistrationQueue")))
    svc.functions.get("SignupFunction", POWERTOOLS_LOG_LEVEL="DEBUG").invoke(signup_event({"ClientId": f"{run}-s"}))
    seen |= _tokens(svc)

    # Maintenance: one revoked refresh token (Login recovers it), one with Login refused too (NEEDS_RELOGIN).
    device_tokens = svc.register([f"{run}-r1", f"{run}-r2"])
    seen |= _tokens(svc)
    svc.emulator.revoke(device_tokens=device_tokens)
    svc.emulator.disable_login([device_tokens[1]])
    svc.emulator.set_config(token_lifetime_s=2000)
    svc.cycle(MARGIN, svc.worker(MARGIN, POWERTOOLS_LOG_LEVEL="DEBUG"))
    seen |= _tokens(svc)

    # The read path, forced to refresh.
    token = svc.read_path().valid_token(instance="default", client_id=f"{run}-1", min_validity_seconds=10_000)
    seen |= _tokens(svc) | {token.access_token}

    printed = capsys.readouterr()
    events = _drain(svc, audit)
    keys = [creds["InstanceKey"] for creds in INSTANCES.values()]
    known = sorted(seen) + keys

    assert len(seen) > 20  # the run issued and rotated real tokens
    assert '"CloudWatchMetrics"' in printed.out  # the metrics were really emitted (EMF on stdout)
    detail_types = {json.loads(body)["detail-type"] for body in events}
    assert {"TelematicsUserRegistered", "TelematicsRegistrationFailed", "TelematicsTokenRefreshFailed"} <= detail_types
    assert not secrets_in(printed.out + printed.err, known)
    for body in events:
        assert not secrets_in(body, known), body


# --- a malformed InstanceKey ------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
BROKEN = [alias for alias in MALFORMED_INSTANCES if alias != "default"]


@pytest.fixture
def malformed(moto_endpoint: str, aws_env: None) -> Iterator[tuple[LocalStack, EmulatorHandle]]:
    """An emulator and a stack whose secret hold the malformed keys exactly as given (as a local run passes them)."""
    with running_emulator(instances=MALFORMED_INSTANCES, token_lifetime=3600) as upstream:
        stack = provision(
            moto_endpoint,
            template_path=ROOT / "template.yaml",
            parameters={"UserServiceUrl": upstream.url, "LogLevel": "DEBUG"},
            stack_name=f"malformed-{uuid.uuid4().hex[:6]}",
            instance_credentials=upstream.instances,
        )
        yield stack, upstream


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def test_a_malformed_instance_key_reaches_no_log_error_dead_letter_or_event(
    malformed: tuple[LocalStack, EmulatorHandle], caplog: pytest.LogCaptureFixture
) -> None:
    stack, upstream = malformed
    caplog.set_level(logging.DEBUG, logger=SERVICE)
    sqs = boto3.client("sqs", endpoint_url=stack.endpoint_url, region_name=stack.region)
    events = boto3.client("events", endpoint_url=stack.endpoint_url, region_name=stack.region)
    audit: str = sqs.create_queue(QueueName=f"{stack.stack_name}-audit")["QueueUrl"]
    audit_arn = sqs.get_queue_attributes(QueueUrl=audit, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    bus = stack.parameters["SignupEventBusName"]
    rule = f"{stack.stack_name}-audit"
    events.put_rule(Name=rule, EventBusName=bus, EventPattern=json.dumps({"source": ["telematics.registration"]}))
    events.put_targets(Rule=rule, EventBusName=bus, Targets=[{"Id": "audit", "Arn": audit_arn}])
    functions = Functions(stack)
    signup = functions.get("SignupFunction", POWERTOOLS_LOG_LEVEL="DEBUG")
    queue = functions.get("RegistrationQueueFunction", POWERTOOLS_LOG_LEVEL="DEBUG")
    texts: list[str] = []

    # The signup function: the invocation fails (Lambda retries it, then sends its record to the on-failure
    # destination); neither the error nor that record may carry the key.
    for alias in BROKEN:
        event = signup_event({"ClientId": f"s-{alias}", "Instance": alias})
        with pytest.raises(CredentialsConfigError) as caught:
            signup.invoke(event)
        assert str(caught.value) == f"credentials secret: instance {alias!r} is invalid (InstanceKey)"
        record = invocation_record(
            function_arn=stack.attributes["SignupFunction"]["Arn"],
            request_id=str(uuid.uuid4()),
            condition="RetriesExhausted",
            approximate_invoke_count=3,
            event=event,
            error=caught.value,
        )
        texts.append(json.dumps(record))
        texts += [f"{type(e).__name__}: {e} {e!r}" for e in _chain(caught.value)]

    # The queue function: the broken aliases' records fail (retried, then redriven), the good one registers.
    bodies = [{"ClientId": f"q-{alias}", "Instance": alias} for alias in [*BROKEN, "default"]]
    response = queue.invoke(sqs_event(bodies, queue_arn=stack.queue_arn("RegistrationQueue")))
    assert len(response["batchItemFailures"]) == len(BROKEN)
    texts.append(json.dumps(response))

    counters = upstream.counters()
    assert counters["users_total"] == 1  # the good alias only: nothing was sent with a malformed key
    for logical_id in ("RegistrationDeadLetterQueue", "SignupDeadLetterQueue"):
        texts += [json.dumps(message) for message in drain(sqs, stack.queue_url(logical_id))]
    texts += [json.dumps(message) for message in drain(sqs, audit)]
    texts.append(caplog.text)
    texts += [repr(r.__dict__) for r in caplog.records]
    assert any("credentials secret: instance" in text for text in texts)  # the failures were reported...

    keys = [creds["InstanceKey"].strip() for creds in MALFORMED_INSTANCES.values()]
    for text in texts:
        assert not secrets_in(text, keys), text[:500]  # ...without any key, malformed or not
