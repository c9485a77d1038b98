"""Large bulks finish without an operator: a delivery that stored users before running short of time sends the
bulk back onto the queue, so progress never spends one of the queue's receives.

The queue below behaves as SQS does for the event source (per-message delays, the visibility timeout after a
failed record, receive counts, the move to the DLQ after ``maxReceiveCount``); the DynamoDB conditions behind
the chunk claims are checked against moto in tests/functional/test_bulk_pipeline.py.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from handle_registration_queue import handle_registration_batch

from local.fakes import FakeUserService
from telematics_reg.batching import BatchFailedError
from telematics_reg.errors import OutcomeUnknownError, TransientUpstreamError
from telematics_reg.intake import RegistrationIntake
from telematics_reg.models import CreateResult, CreateUserRequest, InstanceCredentials
from telematics_reg.outcomes import UserRegistered
from telematics_reg.registration import RegistrationService
from telematics_reg.store import ChunkState

from .conftest import DEVICE_TOKEN_KEY, FakeClock, World

INVOCATION_SECONDS = 60  # the queue function's Timeout
BULK_CALL_SECONDS = 10  # what a Create needs left of the invocation to start
CREATE_SECONDS = 0.5  # so one invocation makes (60 - 10) / 0.5 = 100 users


@dataclass
class QueuedMessage:
    message_id: str
    body: str
    visible_at: float
    receive_count: int = 0


class FakeRegistrationQueue:
    """The registration queue as its event source sees it, and the intake's :class:`BulkContinuations`."""

    def __init__(
        self, clock: FakeClock, *, delay_seconds: int = 5, visibility_timeout: int = 360, max_receive_count: int = 5
    ) -> None:
        self._clock = clock
        self._ids = (f"msg-{n}" for n in itertools.count(1))
        self.delay_seconds = delay_seconds
        self.visibility_timeout = visibility_timeout
        self.max_receive_count = max_receive_count
        self.messages: dict[str, QueuedMessage] = {}
        self.dead_lettered: list[QueuedMessage] = []
        self.continuations: list[str] = []
        self.sent_bodies: list[str] = []
        self.receive_counts: dict[str, int] = {}
        self.failing_sends = 0

    # --- BulkContinuations
    def send(self, body: str) -> str:
        if self.failing_sends:
            self.failing_sends -= 1
            raise ConnectionError("sqs: connection reset")
        message_id = self.put(body, delay_seconds=self.delay_seconds)
        self.continuations.append(message_id)
        self.sent_bodies.append(body)
        return message_id

    # --- what producers and the event source do
    def put(self, body: str, *, delay_seconds: int = 0) -> str:
        message_id = next(self._ids)
        self.messages[message_id] = QueuedMessage(message_id, body, self._clock.now + delay_seconds)
        return message_id

    def receive(self, count: int = 10) -> list[QueuedMessage]:
        batch: list[QueuedMessage] = []
        for message in sorted(self.messages.values(), key=lambda m: m.visible_at):
            if len(batch) == count or message.visible_at > self._clock.now:
                continue
            if message.receive_count >= self.max_receive_count:
                # SQS moves a message to the DLQ when it would be received once more than maxReceiveCount.
                self.dead_lettered.append(self.messages.pop(message.message_id))
                continue
            message.receive_count += 1
            message.visible_at = self._clock.now + self.visibility_timeout
            self.receive_counts[message.message_id] = message.receive_count
            batch.append(message)
        return batch

    def delete(self, message_id: str) -> None:
        self.messages.pop(message_id, None)


class SlowCreates(FakeUserService):
    """A User Service without CreateMany whose Create takes ``CREATE_SECONDS`` of the invocation's time."""

    def __init__(self, clock: FakeClock, creds: InstanceCredentials) -> None:
        super().__init__(instances=[creds], clock=clock, create_many_offered=False)
        self._world_clock = clock
        #: Runs before each Create (while the delivery calling it holds its chunk's claim).
        self.before_create: Callable[[], None] | None = None

    def create(self, creds: InstanceCredentials, body: CreateUserRequest, **kwargs: Any) -> CreateResult:
        self._world_clock.now += CREATE_SECONDS
        if self.before_create is not None:
            self.before_create()
        return super().create(creds, body, **kwargs)


def _wire(world: World, queue: FakeRegistrationQueue | None) -> SlowCreates:
    """The queue function's intake over a slow User Service; ``queue`` receives the continuations (None: the
    intake has none, as before this change)."""
    world.upstream = SlowCreates(world.clock, world.creds)
    world.service = RegistrationService(
        upstream=world.upstream,
        store=world.store,
        credentials=world.credentials,
        publisher=world.publisher,
        device_token_key=DEVICE_TOKEN_KEY,
        clock=world.clock,
        sleep=world.clock.sleep,
        bulk_call_seconds=BULK_CALL_SECONDS,
    )
    world.intake = RegistrationIntake(
        service=world.service, dead_letters=world.dead_letters, publisher=world.publisher, continuations=queue
    )
    return world.upstream


def _event(batch: list[QueuedMessage]) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": m.message_id,
                "receiptHandle": f"h-{m.message_id}-{m.receive_count}",
                "body": m.body,
                "attributes": {"ApproximateReceiveCount": str(m.receive_count)},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:registration",
                "awsRegion": "us-east-1",
            }
            for m in batch
        ]
    }


def _invoke(world: World, batch: list[QueuedMessage]) -> set[str]:
    """One invocation of the queue function with its own time; returns the ids of the failed records."""
    deadline = world.clock.now + INVOCATION_SECONDS
    try:
        response = handle_registration_batch(
            _event(batch), world.intake, concurrency=1, time_left=lambda: deadline - world.clock.now
        )
    except BatchFailedError:  # every record failed: the invocation fails, and they all come back
        return {m.message_id for m in batch}
    return {item["itemIdentifier"] for item in response["batchItemFailures"]}


def _run_event_source(
    world: World, queue: FakeRegistrationQueue, *, max_invocations: int = 200, lost_responses: int = 0
) -> int:
    """Deliver until the queue is empty, as the SQS event source does; returns the number of invocations.

    The first ``lost_responses`` invocations are cut off after their work and before their response reaches
    the event source: none of their records is deleted, so each comes back after the visibility timeout.
    """
    invocations = 0
    while queue.messages and invocations < max_invocations:
        batch = queue.receive()
        if not batch:
            if not queue.messages:  # the last one went to the DLQ
                break
            world.clock.now = max(world.clock.now, min(m.visible_at for m in queue.messages.values()))
            continue
        invocations += 1
        failed = _invoke(world, batch)
        if invocations <= lost_responses:
            continue
        for message in batch:
            if message.message_id not in failed:
                queue.delete(message.message_id)
    return invocations


def _stored(world: World, request_id: str) -> list[str]:
    return [u.device_token for u in world.store.users.values() if u.bulk_request_id == request_id]


def _announced(world: World) -> list[str]:
    return [e.device_token for e in world.publisher.of_type(UserRegistered) if isinstance(e, UserRegistered)]


def test_a_large_bulk_without_create_many_finishes_by_continuations_with_one_receive_per_message(
    world: World,
) -> None:
    queue = FakeRegistrationQueue(world.clock)
    _wire(world, queue)
    first = queue.put(json.dumps({"Quantity": 1000}))  # no RequestId: known by the first message's id

    invocations = _run_event_source(world, queue)

    assert (queue.messages, queue.dead_lettered, world.dead_letters.letters) == ({}, [], [])
    assert set(queue.receive_counts.values()) == {1}  # progress never spent a receive
    assert len(world.upstream.users) == 1000
    stored = _stored(world, first)
    assert len(stored) == len(set(stored)) == 1000
    assert sorted(_announced(world)) == sorted(stored)  # each user announced once
    assert list(world.store.bulks) == [("default", first)]  # every continuation continued the same bulk
    assert set(world.store.bulks[("default", first)].chunks.values()) == {ChunkState.DONE}
    assert 10 <= invocations <= 11  # about 100 users per invocation
    assert len(queue.continuations) == invocations - 1
    assert {json.loads(body)["RequestId"] for body in queue.sent_bodies} == {first}


def test_transient_failures_and_lost_answers_mid_bulk_spend_no_receive_and_make_every_user_once(world: World) -> None:
    # The soak's faults on a bulk of 1,000 without CreateMany: now and then a Create fails through every retry
    # (503s), and now and then one's answer is lost after the upstream made the user.
    queue = FakeRegistrationQueue(world.clock)
    upstream = _wire(world, queue)
    first = queue.put(json.dumps({"Quantity": 1000}))
    creates = itertools.count(1)

    def now_and_then() -> None:
        n = next(creates)
        if n % 97 == 0:
            upstream.fail_next(TransientUpstreamError("unavailable", status=503, call="create"), times=4)
        elif n % 61 == 0:
            upstream.fail_next(OutcomeUnknownError("answer lost", call="create"), calls=["create"], after_commit=True)

    upstream.before_create = now_and_then
    _run_event_source(world, queue)

    assert (queue.messages, queue.dead_lettered, world.dead_letters.letters) == ({}, [], [])
    assert set(queue.receive_counts.values()) == {1}  # neither a failure nor a lost answer spent a receive
    assert len(world.upstream.users) == 1000
    stored = _stored(world, first)
    assert len(stored) == len(set(stored)) == 1000
    assert sorted(stored) == sorted(str(t) for t in world.upstream.users)


def test_without_continuations_the_same_bulk_spends_a_receive_per_stop_and_is_dead_lettered_unfinished(
    world: World,
) -> None:
    # What the queue function did before: each early stop failed the record (the intake has no continuations).
    queue = FakeRegistrationQueue(world.clock)
    _wire(world, None)
    first = queue.put(json.dumps({"Quantity": 1000}))

    _run_event_source(world, queue)

    assert [m.message_id for m in queue.dead_lettered] == [first]
    assert queue.receive_counts[first] == 5
    assert 450 <= len(_stored(world, first)) < 1000


def test_a_delivery_that_stored_nobody_because_a_twin_holds_the_chunk_is_retried_not_sent_back(world: World) -> None:
    queue = FakeRegistrationQueue(world.clock)
    _wire(world, queue)
    body = json.dumps({"Quantity": 300, "RequestId": "load-twin"})
    world.store.start_bulk(instance="default", request_id="load-twin", quantity=300, chunk_size=100, now=0)
    world.store.claim_chunk(instance="default", request_id="load-twin", index=0, owner="twin", now=world.clock.now)
    message_id = queue.put(body)

    failed = _invoke(world, queue.receive())

    assert failed == {message_id}
    assert queue.continuations == []
    assert len(world.upstream.users) == 0


def test_a_delivery_with_no_time_for_a_single_create_is_retried_not_sent_back(world: World) -> None:
    queue = FakeRegistrationQueue(world.clock)
    _wire(world, queue)
    queue.put(json.dumps({"Quantity": 300, "RequestId": "load-late"}))
    batch = queue.receive()

    with pytest.raises(BatchFailedError):  # its only record failed
        handle_registration_batch(_event(batch), world.intake, concurrency=1, time_left=lambda: BULK_CALL_SECONDS - 1)

    assert queue.continuations == []


def test_a_failing_upstream_is_retried_not_sent_back_so_the_dlq_still_catches_a_bulk_that_cannot_progress(
    world: World,
) -> None:
    queue = FakeRegistrationQueue(world.clock)
    _wire(world, queue)
    world.upstream.fail_next(TransientUpstreamError("unavailable", status=503, call="create"), times=10_000)
    message_id = queue.put(json.dumps({"Quantity": 300, "RequestId": "load-down"}))

    _run_event_source(world, queue)

    assert [m.message_id for m in queue.dead_lettered] == [message_id]
    assert queue.continuations == []


def test_a_failed_re_send_fails_the_record_and_the_retry_continues_with_nothing_lost(world: World) -> None:
    queue = FakeRegistrationQueue(world.clock)
    _wire(world, queue)
    queue.failing_sends = 1
    first = queue.put(json.dumps({"Quantity": 250, "RequestId": "load-resend"}))

    assert _invoke(world, queue.receive()) == {first}  # stored 100, could not re-send: retried
    assert len(_stored(world, "load-resend")) == 101
    _run_event_source(world, queue)

    assert queue.receive_counts[first] == 2  # the one receive the failed send cost
    assert (queue.dead_lettered, world.dead_letters.letters) == ([], [])
    assert len(world.upstream.users) == 250
    assert sorted(_stored(world, "load-resend")) == sorted(str(t) for t in world.upstream.users)


def test_duplicate_continuations_are_harmless_every_user_is_made_and_stored_once(world: World) -> None:
    # Two duplicates at once. The first invocation re-sends the bulk, then is cut off before its response: its
    # own message comes back after the visibility timeout, beside the continuation chain. And SQS delivers the
    # first continuation twice: the copy arrives while the other delivery is mid-chunk.
    queue = FakeRegistrationQueue(world.clock)
    upstream = _wire(world, queue)
    first = queue.put(json.dumps({"Quantity": 1000, "RequestId": "load-dup"}))
    twin: list[set[str]] = []
    sent_by_twin: list[int] = []

    def deliver_a_copy_of_the_continuation() -> None:
        if len(upstream.users) == 150 and not twin:
            sent_before = len(queue.continuations)
            twin.append(_invoke(world, [queue.messages["msg-2"]]))
            sent_by_twin.append(len(queue.continuations) - sent_before)

    upstream.before_create = deliver_a_copy_of_the_continuation
    _run_event_source(world, queue, lost_responses=1)

    assert twin == [{"msg-2"}]  # the copy found the chunk claimed and was left to be retried,
    assert sent_by_twin == [0]  # not sent back: it stored nobody
    assert queue.receive_counts[first] == 2  # the cut-off one did come back
    assert (queue.messages, queue.dead_lettered, world.dead_letters.letters) == ({}, [], [])
    assert len(world.upstream.users) == 1000  # not one more: CustomTokens and chunk claims
    stored = _stored(world, "load-dup")
    assert len(stored) == len(set(stored)) == 1000
    assert sorted(_announced(world)) == sorted(stored)
    assert set(world.store.bulks[("default", "load-dup")].chunks.values()) == {ChunkState.DONE}
    # Each continuation follows at least one user stored, so duplicates cannot multiply them.
    assert len(queue.continuations) <= 1000 // 100 + 2


def test_a_signup_bulk_is_never_sent_back_onto_the_queue(world: World) -> None:
    queue = FakeRegistrationQueue(world.clock)
    _wire(world, queue)

    result = world.intake.handle({"Quantity": 300}, message_id="e-1", source="signup", time_left=lambda: 11.0)

    assert (result.status, result.reason) == ("dead_lettered", "invalid_fields")
    assert queue.continuations == []
