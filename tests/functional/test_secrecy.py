"""Secrets stay secret: with the service's logs at DEBUG and its metrics switched on, a run through every flow
(signup, queue, bulk, poison, refresh, dead token, Login fallback, NEEDS_RELOGIN, read path) leaves no issued
token, refresh token or InstanceKey in any metric blob, any printed line, or any event published on the bus.

(Log lines are checked for the whole test session by the guard in tests/conftest.py.)
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.conftest import secrets_in

from .conftest import INSTANCES, signup_event, sqs_event
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
