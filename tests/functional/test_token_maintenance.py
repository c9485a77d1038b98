"""Token maintenance (flow 3) end to end in one process: users registered through the queue function, the
sweeper function queueing refresh jobs on the RefreshQueue in moto, the jobs moved from that queue to the worker
function as real SQS events, and the User Service emulator rotating (or refusing) the tokens.

Every test gets a stack of its own (table, queues, bus), so a sweep sees only that test's users.

Tokens are made due without waiting: users are registered while the emulator issues short-lived tokens, and
each refresh cycle uses a margin above the lifetime of the tokens issued before it and below the lifetime of
those it issues (so a refreshed user is not due again in the same cycle)::

    register (tokens live 600 s) -> cycle 1: margin 1000, new tokens live 2000 s
                                 -> cycle 2: margin 3000, new tokens live 4000 s  ...
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import jwt
import pytest
from boto3.dynamodb.types import TypeDeserializer
from botocore.exceptions import ClientError

from local.emulator.testing import EmulatorHandle
from local.lambda_runtime import LocalFunction, environment
from local.stack import LocalStack, provision
from telematics_reg.credentials import SecretsManagerDeviceTokenKey
from telematics_reg.refresh import TokenRefresher, TokenUnavailableError
from telematics_reg.registration import device_token_for
from telematics_reg.settings import ServiceSettings
from telematics_reg.store import ConditionFailedError, DynamoTokenStore, Tokens
from telematics_reg.wiring import build_refresher

from .conftest import INSTANCES, Functions, drain, sqs_event

ROOT = Path(__file__).resolve().parents[2]
REGISTERED_LIFETIME = 600
# (margin of the cycle, lifetime of the tokens the emulator issues during it)
CYCLES = [(1000, 2000), (3000, 4000), (5000, 6000)]
SCHEDULED_EVENT = {
    "version": "0",
    "id": "5f1d7c1e-2a57-4f3e-9d1b-0a6a4b2f9c10",
    "detail-type": "Scheduled Event",
    "source": "aws.scheduler",
    "account": "123456789012",
    "time": "2026-11-21T10:05:00Z",
    "region": "us-east-1",
    "resources": ["arn:aws:scheduler:us-east-1:123456789012:schedule/default/telematics-refresh"],
    "detail": "{}",
}
_deserializer = TypeDeserializer()


# --------------------------------------------------------------------------------------------------- helpers


@dataclass
class Delivery:
    """What one receive-and-invoke round did."""

    message_ids: list[str]
    bodies: list[str]
    failed: list[str]
    responses: list[Any]
    receipts: dict[str, str] = field(default_factory=dict)


def _lambda_record(message: dict[str, Any], queue_arn: str) -> dict[str, Any]:
    """An SQS message as Lambda's event source mapping hands it to a function."""
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": dict(message.get("Attributes", {})),
        "messageAttributes": {
            name: {
                "stringValue": attribute.get("StringValue"),
                "binaryValue": attribute.get("BinaryValue"),
                "stringListValues": [],
                "binaryListValues": [],
                "dataType": attribute["DataType"],
            }
            for name, attribute in message.get("MessageAttributes", {}).items()
        },
        "md5OfBody": message.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": "us-east-1",
    }


def deliver_batch(sqs: Any, queue_url: str, queue_arn: str, targets: Sequence[LocalFunction]) -> Delivery | None:
    """Receive up to 10 messages from a moto queue and invoke ``targets`` with them as one SQS event.

    With several targets each gets the same batch at once (SQS delivers at least once: two containers may hold
    the same message). A message is deleted when no target reported it in ``batchItemFailures`` (an invocation
    that raised fails its whole batch); a failed one is left on the queue, invisible until its visibility
    timeout, as Lambda leaves it. ``None`` when the queue is empty.
    """
    messages = sqs.receive_message(
        QueueUrl=queue_url,
        MaxNumberOfMessages=10,
        AttributeNames=["All"],
        MessageAttributeNames=["All"],
        WaitTimeSeconds=0,
    ).get("Messages", [])
    if not messages:
        return None
    event = {"Records": [_lambda_record(m, queue_arn) for m in messages]}
    all_failed = {"batchItemFailures": [{"itemIdentifier": m["MessageId"]} for m in messages]}

    def invoke(fn: LocalFunction) -> Any:
        try:
            return fn.invoke(event)
        except Exception:  # noqa: BLE001 - a failed invocation: Lambda returns the whole batch to the queue
            return all_failed

    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        responses = list(pool.map(invoke, targets))
    failed = sorted({item["itemIdentifier"] for r in responses for item in r.get("batchItemFailures", [])})
    for message in messages:
        if message["MessageId"] not in failed:
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    receipts = {m["MessageId"]: m["ReceiptHandle"] for m in messages}
    return Delivery([m["MessageId"] for m in messages], [m["Body"] for m in messages], failed, responses, receipts)


def visibility_timeout_passes(sqs: Any, queue_url: str, deliveries: Sequence[Delivery]) -> None:
    """Make the failed messages of ``deliveries`` visible again now, as their visibility timeout would."""
    for delivery in deliveries:
        for message_id in delivery.failed:
            sqs.change_message_visibility(
                QueueUrl=queue_url, ReceiptHandle=delivery.receipts[message_id], VisibilityTimeout=0
            )


def deliver_all(sqs: Any, queue_url: str, queue_arn: str, targets: Sequence[LocalFunction]) -> list[Delivery]:
    """Move every visible message of a queue to ``targets``, batch by batch, until the queue looks empty."""
    deliveries = []
    while (delivery := deliver_batch(sqs, queue_url, queue_arn, targets)) is not None:
        deliveries.append(delivery)
    return deliveries


def _failures(deliveries: Sequence[Delivery]) -> list[str]:
    return [message_id for d in deliveries for message_id in d.failed]


def _jobs(deliveries: Sequence[Delivery]) -> list[str]:
    """The DeviceTokens of the refresh jobs delivered."""
    return [json.loads(body)["DeviceToken"] for d in deliveries for body in d.bodies]


@dataclass
class Service:
    """One test's own stack: its functions, clients on moto and helpers to drive token maintenance."""

    stack: LocalStack
    emulator: EmulatorHandle
    functions: Functions = field(init=False)
    sqs: Any = field(init=False)
    dynamodb: Any = field(init=False)
    events: Any = field(init=False)

    def __post_init__(self) -> None:
        self.functions = Functions(self.stack)
        kwargs = {"endpoint_url": self.stack.endpoint_url, "region_name": self.stack.region}
        self.sqs = boto3.client("sqs", **kwargs)
        self.dynamodb = boto3.client("dynamodb", **kwargs)
        self.events = boto3.client("events", **kwargs)

    @property
    def table(self) -> str:
        return self.stack.outputs["TokensTableName"]

    @property
    def refresh_queue(self) -> tuple[str, str]:
        return self.stack.queue_url("RefreshQueue"), self.stack.queue_arn("RefreshQueue")

    # -- registration

    def register(self, client_ids: Sequence[str], **fields: Any) -> list[str]:
        """Register users through the real queue function; returns their DeviceTokens."""
        queue_fn = self.functions.get("RegistrationQueueFunction")
        for start in range(0, len(client_ids), 10):
            bodies = [{"ClientId": c, **fields} for c in client_ids[start : start + 10]]
            response = queue_fn.invoke(sqs_event(bodies, queue_arn=self.stack.queue_arn("RegistrationQueue")))
            assert response == {"batchItemFailures": []}
        instance_id = INSTANCES["default"]["InstanceId"]
        key = SecretsManagerDeviceTokenKey(
            self.stack.outputs["DeviceTokenKeySecretArn"],
            client=boto3.client("secretsmanager", endpoint_url=self.stack.endpoint_url, region_name=self.stack.region),
        ).get()
        return [device_token_for(instance_id, c, key=key) for c in client_ids]

    # -- the two refresh functions

    def sweeper(self, margin: int) -> LocalFunction:
        # No spread: the jobs are visible at once (a spread delays them by up to REFRESH_SPREAD_SECONDS).
        return self.functions.get(
            "RefreshSweeperFunction", REFRESH_MARGIN_SECONDS=str(margin), REFRESH_SPREAD_SECONDS="0"
        )

    def worker(self, margin: int, **overrides: str) -> LocalFunction:
        return self.functions.get("RefreshWorkerFunction", REFRESH_MARGIN_SECONDS=str(margin), **overrides)

    def sweep(self, margin: int) -> dict[str, Any]:
        report: dict[str, Any] = self.sweeper(margin).invoke(SCHEDULED_EVENT)
        return report

    def run_jobs(self, worker: LocalFunction) -> list[Delivery]:
        return deliver_all(self.sqs, *self.refresh_queue, [worker])

    def cycle(self, margin: int, worker: LocalFunction | None = None) -> tuple[dict[str, Any], list[Delivery]]:
        """One sweep, then every queued job through a worker."""
        report = self.sweep(margin)
        return report, self.run_jobs(worker or self.worker(margin))

    def read_path(self, **overrides: str) -> TokenRefresher:
        """The app backend's read path, built as the worker builds its refresher, from the worker's environment."""
        env = self.stack.function_environment("RefreshWorkerFunction") | overrides
        with environment(env):
            return build_refresher(ServiceSettings())

    # -- state

    def item(self, device_token: str) -> dict[str, Any]:
        response = self.dynamodb.get_item(
            TableName=self.table, Key={"pk": {"S": f"USER#{device_token}"}}, ConsistentRead=True
        )
        item = {k: _deserializer.deserialize(v) for k, v in response.get("Item", {}).items()}
        return {k: int(v) if isinstance(v, Decimal) else v for k, v in item.items()}

    def items(self, device_tokens: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {d: self.item(d) for d in device_tokens}

    def tap(self, detail_type: str) -> str:
        """A queue receiving every ``detail_type`` event published on the service's bus (an EventBridge rule)."""
        bus = self.stack.parameters["SignupEventBusName"]
        name = f"{self.stack.stack_name}-tap-{uuid.uuid4().hex[:6]}"
        queue_url: str = self.sqs.create_queue(QueueName=name)["QueueUrl"]
        queue_arn = self.sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        self.events.put_rule(Name=name, EventBusName=bus, EventPattern=json.dumps({"detail-type": [detail_type]}))
        self.events.put_targets(Rule=name, EventBusName=bus, Targets=[{"Id": "tap", "Arn": queue_arn}])
        return queue_url


@pytest.fixture
def service(moto_endpoint: str, aws_env: None, emulator: EmulatorHandle) -> Service:
    name = f"tm-{uuid.uuid4().hex[:8]}"
    stack = provision(
        moto_endpoint,
        template_path=ROOT / "template.yaml",
        parameters={"UserServiceUrl": emulator.url, "SignupEventBusName": f"{name}-bus", "LogLevel": "WARNING"},
        stack_name=name,
        instance_credentials=INSTANCES,
    )
    emulator.set_config(token_lifetime_s=REGISTERED_LIFETIME)
    return Service(stack, emulator)


def _delta(before: dict[str, Any], after: dict[str, Any], *names: str) -> dict[str, int]:
    return {name: int(after[name]) - int(before[name]) for name in names}


class FailFirstCalls:
    """Makes the first ``times`` matching calls of a real boto3 client fail, as the AWS service would answer.

    A botocore ``before-call`` hook on the client a function built on its cold start (so the library code under
    test runs unchanged): a call of ``operation`` whose JSON request body ``matches`` raises ``ClientError(code)``
    instead of being sent. Nothing of ours is mocked.
    """

    def __init__(
        self,
        client: Any,
        operation: str,
        *,
        times: int,
        code: str,
        matches: Callable[[dict[str, Any]], bool] = lambda body: True,
    ) -> None:
        self.remaining = times
        self.raised = 0
        self.seen = 0
        self._code = code
        self._operation = operation
        self._matches = matches
        self._lock = threading.Lock()
        self._client = client
        self._event = f"before-call.{client.meta.service_model.service_id.hyphenize()}.{operation}"
        client.meta.events.register(self._event, self._before_call, unique_id=id(self))

    def _before_call(self, params: dict[str, Any], **_: Any) -> None:
        if not self._matches(json.loads(params["body"] or b"{}")):
            return
        with self._lock:
            self.seen += 1
            if self.remaining <= 0:
                return
            self.remaining -= 1
            self.raised += 1
        error = {"Code": self._code, "Message": "injected by the test"}
        raise ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": 400}}, self._operation)

    def remove(self) -> None:
        self._client.meta.events.unregister(self._event, unique_id=id(self))


def _is_token_commit(body: dict[str, Any]) -> bool:
    """The UpdateItem of ``DynamoTokenStore.commit_tokens`` (the rotated pair, conditioned on the version)."""
    return str(body.get("UpdateExpression", "")).startswith("SET AccessToken = :at")


def _refresher_of(worker: LocalFunction) -> Any:
    """The TokenRefresher the worker function built on its cold start (its store, budget and publisher)."""
    assert worker._module is not None
    return worker._module._refresher.get()


@pytest.fixture
def fail_first() -> Iterator[Callable[..., FailFirstCalls]]:
    installed: list[FailFirstCalls] = []

    def install(client: Any, operation: str, **kwargs: Any) -> FailFirstCalls:
        installed.append(FailFirstCalls(client, operation, **kwargs))
        return installed[-1]

    yield install
    for hook in installed:
        hook.remove()


# ----------------------------------------------------------------------------------------- concurrency


def _overlapping_cycle(
    service: Service, margin: int, *, sweeps: int, workers: int
) -> tuple[list[dict[str, Any]], list[Delivery]]:
    """``sweeps`` sweeper containers and ``workers`` worker pollers started together over the same users.

    Each poller moves batches from the RefreshQueue while the sweeps are still queueing, and hands every batch to
    two worker containers at once (SQS delivers at least once). Returns the sweep reports and the deliveries.
    """
    queue_url, queue_arn = service.refresh_queue
    sweepers = [service.sweeper(margin) for _ in range(sweeps)]
    containers = [service.worker(margin) for _ in range(workers)]
    start = threading.Barrier(sweeps + workers)
    sweeps_done = threading.Event()
    reports: list[dict[str, Any]] = []
    deliveries: list[Delivery] = []

    def sweep(fn: LocalFunction) -> None:
        start.wait()
        reports.append(fn.invoke(SCHEDULED_EVENT))

    def poll(index: int) -> None:
        start.wait()
        pair = [containers[index], containers[(index + 1) % len(containers)]]
        while True:
            finished = sweeps_done.is_set()  # read before receiving: an empty queue after that means done
            delivery = deliver_batch(service.sqs, queue_url, queue_arn, pair)
            if delivery is not None:
                deliveries.append(delivery)
            elif finished:
                return
            else:
                time.sleep(0.02)

    sweep_threads = [threading.Thread(target=sweep, args=(fn,)) for fn in sweepers]
    poll_threads = [threading.Thread(target=poll, args=(i,)) for i in range(workers)]
    for thread in sweep_threads + poll_threads:
        thread.start()
    for thread in sweep_threads:
        thread.join(timeout=60)
    sweeps_done.set()
    for thread in poll_threads:
        thread.join(timeout=60)
    return reports, deliveries


def test_given_overlapping_sweeps_and_workers_over_the_same_due_users_then_each_is_refreshed_once_per_cycle(
    service: Service, emulator: EmulatorHandle
) -> None:
    users = service.register([f"cc-{n}" for n in range(24)])
    # Latency widens the window between reading a user and committing it, where racing workers would collide.
    emulator.set_faults(latency_ms=[20, 60], calls=["refresh", "login"])

    for margin, lifetime in CYCLES:
        emulator.set_config(token_lifetime_s=lifetime)
        before, items_before = emulator.counters(), service.items(users)

        reports, deliveries = _overlapping_cycle(service, margin, sweeps=3, workers=3)

        after, items_after = emulator.counters(), service.items(users)
        assert len(reports) == 3
        # The sweeps overlapped, yet each due user was queued once...
        assert sum(r["queued"] for r in reports) == len(users)
        assert sorted(_jobs(deliveries)) == sorted(users)
        assert _failures(deliveries) == []
        # ...and, though every job reached two workers, refreshed once: no refresh token spent twice.
        assert _delta(before, after, "refreshes", "rejected_refresh_tokens", "logins", "failed_logins") == {
            "refreshes": len(users),
            "rejected_refresh_tokens": 0,
            "logins": 0,
            "failed_logins": 0,
        }
        for device_token in users:
            old, new = items_before[device_token], items_after[device_token]
            assert new["Status"] == "ACTIVE"
            assert new["Version"] == old["Version"] + 1
            assert new["RefreshToken"] != old["RefreshToken"]
            assert new["AccessExpiresAt"] > time.time() + margin
            assert not {"LeaseOwner", "QueuedUntil", "RetryAfter"} & set(new)


# ------------------------------------------------------------------------------------ commit after rotation


def test_given_the_commit_is_throttled_after_the_upstream_rotated_then_the_pair_is_stored_and_the_user_keeps_working(
    service: Service, emulator: EmulatorHandle, fail_first: Callable[..., FailFirstCalls]
) -> None:
    (user,) = service.register(["commit-1"])
    registered = service.item(user)
    (margin, lifetime), (next_margin, next_lifetime) = CYCLES[:2]
    emulator.set_config(token_lifetime_s=lifetime)
    worker = service.worker(margin)
    # DynamoDB throttles the commit three times, after the upstream has rotated (the old refresh token is spent).
    hook = fail_first(
        _refresher_of(worker)._store._client,
        "UpdateItem",
        times=3,
        code="ProvisionedThroughputExceededException",
        matches=_is_token_commit,
    )

    _, deliveries = service.cycle(margin, worker)

    assert hook.raised == 3
    assert hook.seen == 4  # three throttled, the fourth landed
    assert _failures(deliveries) == []
    stored = service.item(user)
    assert stored["Status"] == "ACTIVE"
    assert stored["Version"] == registered["Version"] + 1
    assert stored["RefreshToken"] != registered["RefreshToken"]
    assert emulator.counters()["refreshes"] == 1

    # The stored refresh token is the one the upstream rotated to: the next refresh spends it without trouble.
    emulator.set_config(token_lifetime_s=next_lifetime)
    _, later = service.cycle(next_margin)

    counters = emulator.counters()
    assert _failures(later) == []
    assert counters["refreshes"] == 2
    assert counters["rejected_refresh_tokens"] == 0
    assert counters["logins"] == counters["failed_logins"] == 0
    assert service.item(user)["Version"] == registered["Version"] + 2


# ------------------------------------------------------------------------------------------- dead tokens


def test_given_a_revoked_refresh_token_then_login_recovers_the_user_with_new_tokens(
    service: Service, emulator: EmulatorHandle
) -> None:
    (user,) = service.register(["revoked-1"])
    registered = service.item(user)
    assert emulator.revoke([user]) == [user]
    margin, lifetime = CYCLES[0]
    emulator.set_config(token_lifetime_s=lifetime)

    report, deliveries = service.cycle(margin)

    counters = emulator.counters()
    assert report["queued"] == 1
    assert _failures(deliveries) == []
    assert counters["rejected_refresh_tokens"] == 1
    assert counters["logins"] == 1
    stored = service.item(user)
    assert stored["Status"] == "ACTIVE"
    assert stored["Version"] == registered["Version"] + 1
    assert stored["RefreshToken"] != registered["RefreshToken"]
    assert stored["AccessExpiresAt"] > time.time() + margin
    assert "DueShard" in stored  # still kept fresh
    # The tokens Login issued are live: the next cycle refreshes them normally.
    next_margin, next_lifetime = CYCLES[1]
    emulator.set_config(token_lifetime_s=next_lifetime)
    service.cycle(next_margin)
    counters = emulator.counters()
    assert (counters["refreshes"], counters["rejected_refresh_tokens"], counters["logins"]) == (1, 1, 1)


def test_given_refresh_and_login_both_dead_then_the_user_is_marked_announced_and_dropped_from_the_sweep(
    service: Service, emulator: EmulatorHandle
) -> None:
    tap = service.tap("TelematicsTokenRefreshFailed")
    dead, healthy = service.register(["dead-1", "healthy-1"])
    registered = service.item(dead)
    emulator.revoke([dead])
    emulator.disable_login([dead])
    margin, lifetime = CYCLES[0]
    emulator.set_config(token_lifetime_s=lifetime)
    worker = service.worker(margin)

    report, deliveries = service.cycle(margin, worker)

    assert report["queued"] == 2
    assert _failures(deliveries) == []
    stored = service.item(dead)
    assert stored["Status"] == "NEEDS_RELOGIN"
    assert "DueShard" not in stored
    assert "login failed" in stored["LastError"]
    assert stored["RefreshToken"] == registered["RefreshToken"]  # nothing was overwritten or dropped
    assert service.item(healthy)["Status"] == "ACTIVE"
    (event,) = drain(service.sqs, tap)
    published = json.loads(event["Body"])
    assert published["detail-type"] == "TelematicsTokenRefreshFailed"
    assert published["detail"]["DeviceToken"] == dead
    assert published["detail"]["ClientId"] == "dead-1"
    for secret in (registered["AccessToken"], registered["RefreshToken"], INSTANCES["default"]["InstanceKey"]):
        assert secret not in event["Body"]
    attempts = emulator.counters()["logins"] + emulator.counters()["failed_logins"]
    assert attempts == 1

    # No retry loop: a later sweep, with every token due, does not see the user...
    emulator.set_config(token_lifetime_s=CYCLES[1][1])
    again, later = service.cycle(CYCLES[1][0])
    assert again["users_due"] == again["queued"] == 1
    assert _jobs(later) == [healthy]
    # ...and a stale job for it (an SQS redelivery) is dropped without an upstream call.
    requests_before = emulator.counters()["requests_total"]
    stale = sqs_event([{"DeviceToken": dead, "Version": registered["Version"]}], queue_arn=service.refresh_queue[1])
    assert worker.invoke(stale) == {"batchItemFailures": []}
    counters = emulator.counters()
    assert counters["requests_total"] == requests_before
    assert counters["logins"] + counters["failed_logins"] == 1
    assert drain(service.sqs, tap) == []


def test_given_the_announcement_is_refused_once_then_the_dead_user_is_still_announced_when_the_job_is_retried(
    service: Service, emulator: EmulatorHandle, fail_first: Callable[..., FailFirstCalls]
) -> None:
    tap = service.tap("TelematicsTokenRefreshFailed")
    (dead,) = service.register(["dead-2"])
    emulator.revoke([dead])
    emulator.disable_login([dead])
    margin, lifetime = CYCLES[0]
    emulator.set_config(token_lifetime_s=lifetime)
    worker = service.worker(margin)
    refused = fail_first(_refresher_of(worker)._publisher._client, "PutEvents", times=1, code="InternalException")

    _, first = service.cycle(margin, worker)
    # The job failed (Lambda leaves it on the queue); when its visibility timeout passes, SQS delivers it again.
    assert refused.raised == 1
    assert len(_failures(first)) == 1
    visibility_timeout_passes(service.sqs, service.refresh_queue[0], first)
    retried = service.run_jobs(worker)

    assert _failures(retried) == []
    assert service.item(dead)["Status"] == "NEEDS_RELOGIN"
    events = drain(service.sqs, tap)
    assert [json.loads(e["Body"])["detail"]["DeviceToken"] for e in events] == [dead]


def test_given_the_refresh_answer_is_lost_after_the_upstream_rotated_then_login_recovers_the_user(
    service: Service, emulator: EmulatorHandle
) -> None:
    (user,) = service.register(["lost-1"])
    registered = service.item(user)
    margin, lifetime = CYCLES[0]
    emulator.set_config(token_lifetime_s=lifetime)
    emulator.set_faults(script=[{"call": "refresh", "fault": "drop_after_commit"}])

    _, deliveries = service.cycle(margin)

    counters = emulator.counters()
    assert _failures(deliveries) == []
    assert counters["faults_served"]["drop_after_commit"] == 1
    assert counters["refreshes"] == 1  # the upstream rotated, and the answer never came
    assert counters["logins"] == 1
    stored = service.item(user)
    assert stored["Status"] == "ACTIVE"
    assert stored["Version"] == registered["Version"] + 1
    # What is stored is live: the next cycle refreshes it without a rejected token.
    emulator.set_config(token_lifetime_s=CYCLES[1][1])
    service.cycle(CYCLES[1][0])
    counters = emulator.counters()
    assert (counters["refreshes"], counters["rejected_refresh_tokens"], counters["logins"]) == (2, 0, 1)


def test_given_more_dead_tokens_than_the_login_budget_then_the_rest_are_deferred_not_given_up(
    service: Service, emulator: EmulatorHandle
) -> None:
    users = service.register([f"budget-{n}" for n in range(4)])
    emulator.revoke(users)
    margin, lifetime = CYCLES[0]
    emulator.set_config(token_lifetime_s=lifetime)
    worker = service.worker(margin, LOGIN_BUDGET_PER_MINUTE="2")
    started = time.time()

    _, deliveries = service.cycle(margin, worker)

    counters = emulator.counters()
    assert _failures(deliveries) == []
    assert counters["logins"] == 2
    items = service.items(users).values()
    assert sorted(i["Status"] for i in items) == ["ACTIVE"] * 4
    deferred = [i for i in items if "RetryAfter" in i]
    assert len(deferred) == 2
    for item in deferred:
        assert "Login budget spent" in item["LastError"]
        assert item["RetryAfter"] >= int(started) + 60  # when the sliding minute has room again


# ---------------------------------------------------------------------------------------------- 429 storm


def test_given_a_429_storm_then_refreshes_are_bounded_deferred_and_finished_by_a_later_sweep(
    service: Service, emulator: EmulatorHandle
) -> None:
    users = service.register([f"storm-{n}" for n in range(8)])
    registered = service.items(users)
    margin, lifetime = CYCLES[0]
    emulator.set_config(token_lifetime_s=lifetime)
    # Retry-After long enough that the checks below run before it passes, even on a loaded machine.
    emulator.set_faults(rate_limit_rate=1.0, retry_after_s=4, calls=["refresh", "login"])
    attempts = 2
    worker = service.worker(margin, UPSTREAM_MAX_ATTEMPTS=str(attempts))
    before = emulator.counters()

    report, deliveries = service.cycle(margin, worker)

    after = emulator.counters()
    assert report["queued"] == len(users)
    # The storm fails no job (nothing for the DLQ): each user is deferred, not retried by SQS.
    assert _failures(deliveries) == []
    # Bounded: each user was tried exactly UPSTREAM_MAX_ATTEMPTS times, and no Login was tried to get round it.
    assert after["requests_total"] - before["requests_total"] == attempts * len(users)
    assert after["faults_served"]["rate_limit"] == attempts * len(users)
    assert after["refreshes"] == after["logins"] == after["failed_logins"] == 0
    deferred = service.items(users)
    for device_token, item in deferred.items():
        assert item["Status"] == "ACTIVE"
        assert item["Version"] == registered[device_token]["Version"]
        assert item["RefreshToken"] == registered[device_token]["RefreshToken"]
        assert item["RetryAfter"] >= int(time.time())
        assert "RateLimited" in item["LastError"]
        assert "LeaseOwner" not in item

    # The storm is over, but the Retry-After is honoured: a sweep right away queues nobody.
    emulator.clear_faults()
    early = service.sweep(margin)
    assert early["queued"] == 0
    assert early["waiting_to_retry"] == len(users)

    # Once it has passed, the next sweep finishes the refresh.
    time.sleep(max(item["RetryAfter"] for item in deferred.values()) + 1.1 - time.time())
    late, finished = service.cycle(margin, worker)

    counters = emulator.counters()
    assert late["queued"] == len(users)
    assert _failures(finished) == []
    assert counters["refreshes"] == len(users)
    assert counters["rejected_refresh_tokens"] == 0
    for device_token, item in service.items(users).items():
        assert item["Version"] == registered[device_token]["Version"] + 1
        assert "RetryAfter" not in item
    assert drain(service.sqs, service.stack.queue_url("RefreshDeadLetterQueue")) == []
    assert drain(service.sqs, service.refresh_queue[0]) == []


# ---------------------------------------------------------------------------------------------- read path


def test_given_a_token_about_to_expire_when_the_app_asks_for_it_then_it_is_refreshed_first(
    service: Service, emulator: EmulatorHandle
) -> None:
    emulator.set_config(token_lifetime_s=30)
    (user,) = service.register(["read-1"])
    registered = service.item(user)
    emulator.set_config(token_lifetime_s=3600)
    refresher = service.read_path()

    token = refresher.valid_token(instance="default", client_id="read-1", min_validity_seconds=60)

    stored = service.item(user)
    assert emulator.counters()["refreshes"] == 1
    assert token.device_token == user
    assert token.access_token == stored["AccessToken"] != registered["AccessToken"]
    assert token.expires_at == stored["AccessExpiresAt"] > time.time() + 3000
    assert stored["Version"] == registered["Version"] + 1
    assert emulator.jwt_secret is not None
    claims = jwt.decode(token.access_token, emulator.jwt_secret, algorithms=["HS256"])
    assert claims["DeviceToken"] == user

    # A token with time left is handed out as stored, without an upstream call.
    again = refresher.valid_token(instance="default", client_id="read-1", min_validity_seconds=60)
    assert again == token
    assert emulator.counters()["refreshes"] == 1


def test_given_the_upstream_issues_tokens_shorter_than_asked_then_the_read_path_refreshes_once_not_in_a_loop(
    service: Service, emulator: EmulatorHandle
) -> None:
    emulator.set_config(token_lifetime_s=30)
    (user,) = service.register(["read-short"])
    refresher = service.read_path()

    token = refresher.valid_token(instance="default", client_id="read-short", min_validity_seconds=60)

    # The freshest token the upstream gives lives 30 s: one refresh, and that token, not a refresh per loop.
    assert emulator.counters()["refreshes"] == 1
    assert token.access_token == service.item(user)["AccessToken"]
    assert token.expires_at > time.time() + 20


def test_given_a_user_registered_without_tokens_when_the_app_asks_then_it_is_logged_in_and_kept_fresh(
    service: Service, emulator: EmulatorHandle
) -> None:
    (user,) = service.register(["tokenless-1"], CreateAccessToken=False)
    assert service.item(user)["Status"] == "TOKENLESS"
    refresher = service.read_path()

    token = refresher.valid_token(instance="default", client_id="tokenless-1")

    counters = emulator.counters()
    stored = service.item(user)
    assert counters["logins"] == 1
    assert counters["refreshes"] == 0
    assert token.access_token == stored["AccessToken"]
    assert stored["Status"] == "ACTIVE"
    assert "DueShard" in stored  # from now on the sweep keeps it fresh
    assert service.sweep(REGISTERED_LIFETIME + 60)["users_due"] == 1


def test_given_a_user_who_needs_relogin_when_the_app_asks_then_no_token_and_no_upstream_call(
    service: Service, emulator: EmulatorHandle
) -> None:
    (user,) = service.register(["relogin-1"])
    emulator.revoke([user])
    emulator.disable_login([user])
    service.cycle(CYCLES[0][0])
    assert service.item(user)["Status"] == "NEEDS_RELOGIN"
    requests_before = emulator.counters()["requests_total"]

    with pytest.raises(TokenUnavailableError, match="needs relogin"):
        service.read_path().valid_token(instance="default", client_id="relogin-1")

    assert emulator.counters()["requests_total"] == requests_before


def test_given_a_dead_token_deferred_for_the_login_budget_then_the_retry_logs_in_without_presenting_it_again(
    service: Service, emulator: EmulatorHandle
) -> None:
    # Found by the soak: each retry of a user whose Login had to wait spent one more refresh with the dead token.
    users = service.register(["dead-retry-1", "dead-retry-2"])
    emulator.revoke(users)
    margin, lifetime = CYCLES[0]
    emulator.set_config(token_lifetime_s=lifetime)
    before = emulator.counters()

    service.cycle(margin, service.worker(margin, LOGIN_BUDGET_PER_MINUTE="1"))

    (deferred,) = [user for user in users if "RetryAfter" in service.item(user)]
    assert service.item(deferred)["RefreshTokenDead"] is True
    # Time passes: the RetryAfter note lapses and the next attempt finds Login budget.
    service.dynamodb.update_item(
        TableName=service.table, Key={"pk": {"S": f"USER#{deferred}"}}, UpdateExpression="REMOVE RetryAfter"
    )
    _, retried = service.cycle(margin, service.worker(margin, LOGIN_BUDGET_PER_MINUTE="3"))

    after = emulator.counters()
    assert _failures(retried) == []
    assert _jobs(retried) == [deferred]
    assert _delta(before, after, "logins", "refreshes") == {"logins": 2, "refreshes": 0}
    rejected = (
        after["rejected_refresh_tokens_by_cause"]["revoked"] - before["rejected_refresh_tokens_by_cause"]["revoked"]
    )
    assert rejected == 2  # each revoked token presented once, not again on the retry
    recovered = service.item(deferred)
    assert recovered["Status"] == "ACTIVE"
    assert "RefreshTokenDead" not in recovered


def test_a_queued_job_leases_a_due_user_in_one_conditional_write_and_is_refused_one_not_due(
    service: Service, emulator: EmulatorHandle
) -> None:
    # The worker's lease carries the due checks (token expiring by due_by, no RetryAfter pending) in its condition,
    # so the usual refresh is two writes and no read; DynamoDB (moto) must refuse what is not due.
    emulator.set_config(token_lifetime_s=600)
    due, deferred = service.register(["lease-due", "lease-deferred"])
    store = DynamoTokenStore(service.dynamodb, table_name=service.table)
    now = time.time()
    version = service.item(due)["Version"]
    service.dynamodb.update_item(
        TableName=service.table,
        Key={"pk": {"S": f"USER#{deferred}"}},
        UpdateExpression="SET RetryAfter = :later",
        ExpressionAttributeValues={":later": {"N": str(int(now) + 30)}},
    )

    def lease(user: str, due_by: int) -> Any:
        return store.acquire_lease(
            device_token=user, version=version, owner=str(uuid.uuid4()), now=now, ttl=60, due_by=due_by
        )

    assert lease(due, int(now) + 300) is None  # expires in 600 s: not due within 300 s
    assert lease(deferred, int(now) + 900) is None  # due, but a retry is pending
    leased = lease(due, int(now) + 900)
    assert leased is not None
    assert leased.lease_expires_at == int(now) + 60
    assert lease(due, int(now) + 900) is None  # held now


def test_racing_workers_never_lease_the_same_version_twice_as_on_dynamodb(service: Service) -> None:
    # DynamoDB evaluates a write's condition and applies it as one step; the local stack's moto must too
    # (local/moto_server.py), or a lease racing a commit can see it half applied (the old lease removed, the old
    # version still there) and two workers spend the same refresh token. Workers here loop lease -> commit on
    # one user: every version must be leased by exactly one of them.
    (user,) = service.register(["race-1"])
    dynamodb = boto3.client("dynamodb", endpoint_url=service.stack.endpoint_url)
    store = DynamoTokenStore(dynamodb, table_name=service.table)
    leases: dict[int, list[str]] = {}
    deadline = time.monotonic() + 4

    def worker(owner: str) -> None:
        while time.monotonic() < deadline:
            record = store.get_user(user)
            assert record is not None
            leased = store.acquire_lease(
                device_token=user, version=record.version, owner=owner, now=time.time(), ttl=60
            )
            if leased is None:
                continue
            leases.setdefault(leased.version, []).append(owner)
            with contextlib.suppress(ConditionFailedError):
                store.commit_tokens(
                    device_token=user,
                    expected_version=leased.version,
                    owner=owner,
                    tokens=Tokens(f"at-{uuid.uuid4()}", f"rt-{uuid.uuid4()}", int(time.time()) + 3600),
                    now=time.time(),
                )

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(worker, [f"w{n}" for n in range(6)]))

    assert len(leases) > 20
    assert {v: owners for v, owners in leases.items() if len(owners) > 1} == {}
