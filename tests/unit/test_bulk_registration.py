"""Bulk registration under the timings that break promises: twins, cut-offs, short time, redrives, reused ids.

Each test writes the interleaving against the in-memory fakes; the DynamoDB conditions behind them are checked
against moto in tests/functional/test_bulk_pipeline.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from handle_registration_queue import handle_registration_batch

from local.fakes import FakeUserService
from telematics_cli.dlq import Letter, _with_bulk_id
from telematics_reg.errors import OutcomeUnknownError, TransientUpstreamError
from telematics_reg.models import CreateResult, CreateUserRequest, InstanceCredentials
from telematics_reg.registration import (
    BulkDeferredError,
    RegistrationInProgressError,
    RegistrationService,
    stamp_request_id,
)
from telematics_reg.store import ChunkState, UserStatus

from .conftest import DEVICE_TOKEN_KEY, World


class Killed(BaseException):
    """The runtime cut the invocation off: nothing after this point of the handler runs."""


def _service(world: World, upstream: FakeUserService, **options: Any) -> RegistrationService:
    return RegistrationService(
        upstream=upstream,
        store=world.store,
        credentials=world.credentials,
        publisher=world.publisher,
        device_token_key=DEVICE_TOKEN_KEY,
        clock=world.clock,
        sleep=world.clock.sleep,
        **options,
    )


def _use(world: World, upstream: FakeUserService, **options: Any) -> None:
    """Rewire the world's intake onto ``upstream`` (a fake with a hook)."""
    world.upstream = upstream
    world.service = _service(world, upstream, **options)
    world.intake._service = world.service


def _stored_bulk_users(world: World, request_id: str) -> list[str]:
    return [u.device_token for u in world.store.users.values() if u.bulk_request_id == request_id]


def _redriven(letter_body: str, original_message_id: str) -> str:
    """What `telematics-reg dlq redrive` sends back for a registration dead letter."""
    letter = Letter("dlq-id", "handle", letter_body, "bulk_incomplete", "", "queue", None, 1)
    letter.original_message_id = original_message_id
    return _with_bulk_id(letter)


# ----------------------------------------------------------------------------------- defect 2: bulk id and redrive


def test_a_dead_lettered_bulk_without_request_id_redriven_continues_the_same_bulk_not_a_new_one(world: World) -> None:
    # Chunk 0's answer is lost (UNKNOWN, reported); chunk 1 is made. The letter is redriven (a new message id).
    lost = OutcomeUnknownError("dropped", call="create_many")
    world.upstream.fail_next(lost, calls=["create_many"], after_commit=True)

    first = world.intake.handle({"Quantity": 200}, message_id="m-1", source="queue")
    (letter,) = world.dead_letters.letters
    again = world.intake.handle(_redriven(letter.body, "m-1"), message_id="m-2", source="queue")

    assert first.status == again.status == "dead_lettered"
    assert json.loads(letter.body)["RequestId"] == "m-1"  # the letter carries the id its bulk used
    assert len(world.upstream.users) == 200  # not 300: the redrive made nothing again
    assert world.upstream.calls["create_many"] == 2
    assert len(_stored_bulk_users(world, "m-1")) == 100


def test_a_bulk_whose_second_chunk_kept_failing_continues_under_its_id_after_a_redrive(world: World) -> None:
    # The case: chunk 0 DONE, chunk 1 answered 503 on every delivery until SQS dead-lettered it (raw
    # body, same message id); the operator fixed the cause and redrove it.
    calls = 0
    healthy = False

    class SecondChunkDown(FakeUserService):
        def create_many(self, *args: Any, **kwargs: Any) -> list[CreateResult]:
            nonlocal calls
            calls += 1
            if calls > 1 and not healthy:
                self.calls["create_many"] += 1
                raise TransientUpstreamError("unavailable", status=503, call="create_many")
            return super().create_many(*args, **kwargs)

    _use(world, SecondChunkDown(instances=[world.creds], clock=world.clock), bulk_attempts=1)
    # maxReceiveCount deliveries of the same SQS message: the first stored chunk 0 and hands the rest on (its
    # continuation is not modelled here), the others make no progress and fail.
    with pytest.raises(BulkDeferredError):
        world.intake.handle({"Quantity": 200}, message_id="m-1", source="queue")
    for _ in range(4):
        with pytest.raises(TransientUpstreamError):
            world.intake.handle({"Quantity": 200}, message_id="m-1", source="queue")
    healthy = True

    result = world.intake.handle(_redriven('{"Quantity": 200}', "m-1"), message_id="m-redriven", source="queue")

    assert (result.status, result.stored) == ("bulk", 200)
    assert len(world.upstream.users) == 200
    assert len(_stored_bulk_users(world, "m-1")) == 200
    assert ("default", "m-redriven") not in world.store.bulks


def test_stamping_keeps_a_given_request_id_and_replaces_a_null_one() -> None:
    assert json.loads(stamp_request_id('{"quantity": 5, "requestId": null}', "m-1")) == {
        "quantity": 5,
        "RequestId": "m-1",
    }
    assert stamp_request_id('{"Quantity": 5, "RequestId": "x"}', "m-1") == '{"Quantity": 5, "RequestId": "x"}'
    assert stamp_request_id("not json", "m-1") == "not json"
    assert _redriven('{"ClientId": "c-1"}', "m-1") == '{"ClientId": "c-1"}'  # single registrations go back as sent


# ------------------------------------------------------------------------------- defect 3: a twin of a live chunk


def test_a_duplicate_delivery_while_a_chunk_is_in_flight_retries_later_instead_of_reporting_it_lost(
    world: World,
) -> None:
    twin: dict[str, Any] = {}

    class TwinArrivesMidCall(FakeUserService):
        def create_many(self, *args: Any, **kwargs: Any) -> list[CreateResult]:
            if not twin:
                # SQS delivers the same message again while the first delivery's CreateMany is in flight.
                world.clock.now += 30
                try:
                    twin["result"] = world.intake.handle({"Quantity": 150}, message_id="m-1", source="queue")
                except RegistrationInProgressError as exc:
                    twin["error"] = exc
            return super().create_many(*args, **kwargs)

    _use(world, TwinArrivesMidCall(instances=[world.creds], clock=world.clock))

    first = world.intake.handle({"Quantity": 150}, message_id="m-1", source="queue")
    retry = world.intake.handle({"Quantity": 150}, message_id="m-1", source="queue")

    assert isinstance(twin.get("error"), RegistrationInProgressError)  # retried, not dead-lettered
    assert world.dead_letters.letters == []
    assert (first.status, first.stored, retry.stored) == ("bulk", 150, 150)
    assert len(world.upstream.users) == 150
    assert world.store.bulks[("default", "m-1")].chunks == {0: ChunkState.DONE, 1: ChunkState.DONE}


def test_a_create_many_chunk_whose_caller_died_is_reported_only_after_the_claim_time(world: World) -> None:
    class DiesInCreateMany(FakeUserService):
        def create_many(self, *args: Any, **kwargs: Any) -> list[CreateResult]:
            super().create_many(*args, **kwargs)
            raise Killed

    _use(world, DiesInCreateMany(instances=[world.creds], clock=world.clock), claim_seconds=120)
    with pytest.raises(Killed):
        world.intake.handle({"Quantity": 100, "RequestId": "load-d"}, message_id="m-1", source="queue")
    _use(world, FakeUserService(instances=[world.creds], clock=world.clock), claim_seconds=120)
    world.clock.now += 100

    with pytest.raises(RegistrationInProgressError):
        world.intake.handle({"Quantity": 100, "RequestId": "load-d"}, message_id="m-1", source="queue")
    world.clock.now += 21
    late = world.intake.handle({"Quantity": 100, "RequestId": "load-d"}, message_id="m-1", source="queue")

    assert late.status == "dead_lettered"
    assert world.dead_letters.letters[0].reason == "bulk_incomplete"
    assert world.store.bulks[("default", "load-d")].chunks == {0: ChunkState.UNKNOWN}
    assert world.upstream.calls["create_many"] == 0  # never called again


# ----------------------------------------------------------------- defect 4: time, and resumable per-user chunks


def test_a_large_bulk_stops_starting_chunks_when_the_invocation_is_short_of_time_and_continues_next_delivery(
    world: World,
) -> None:
    started_with: list[float] = []

    class FakeContext:
        """Lambda's context: 60 s from the invocation's start, by the world's clock."""

        def __init__(self) -> None:
            self.deadline = world.clock.now + 60

        def get_remaining_time_in_millis(self) -> int:
            return max(0, int((self.deadline - world.clock.now) * 1000))

    class SlowCreateMany(FakeUserService):
        def create_many(self, *args: Any, **kwargs: Any) -> list[CreateResult]:
            started_with.append(context.get_remaining_time_in_millis() / 1000)
            world.clock.now += 8  # one chunk takes 8 s
            return super().create_many(*args, **kwargs)

    _use(world, SlowCreateMany(instances=[world.creds], clock=world.clock), bulk_call_seconds=20)
    bodies = {"m-1": {"Quantity": 1000, "RequestId": "big"}, "m-2": {"ClientId": "c-beside-the-bulk"}}
    event = {
        "Records": [
            {
                "messageId": message_id,
                "receiptHandle": f"h-{message_id}",
                "body": json.dumps(body),
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:registration",
                "awsRegion": "us-east-1",
            }
            for message_id, body in bodies.items()
        ]
    }
    responses = []
    for _ in range(4):  # each delivery is a new invocation with its own 60 s
        context = FakeContext()
        responses.append(
            handle_registration_batch(
                event,
                world.intake,
                concurrency=1,
                time_left=lambda context=context: context.get_remaining_time_in_millis() / 1000,
            )
        )
        if not responses[-1]["batchItemFailures"]:
            break

    assert min(started_with) >= 20  # no chunk started with less than a chunk's time left
    assert responses[0] == {"batchItemFailures": [{"itemIdentifier": "m-1"}]}  # retried, to continue
    assert responses[-1] == {"batchItemFailures": []}
    assert world.dead_letters.letters == []
    assert set(world.store.bulks[("default", "big")].chunks.values()) == {ChunkState.DONE}
    assert len(_stored_bulk_users(world, "big")) == 1000
    assert len(world.upstream.users) == 1001  # and the single registration beside it


class DiesAfterCreates(FakeUserService):
    """A User Service without CreateMany; the invocation is cut off right after the k-th Create committed."""

    def __init__(self, *, die_after: int | None, **kwargs: Any) -> None:
        super().__init__(create_many_offered=False, **kwargs)
        self.die_after = die_after
        self.made = 0

    def create(self, creds: InstanceCredentials, body: CreateUserRequest, **kwargs: Any) -> CreateResult:
        result = super().create(creds, body, **kwargs)
        self.made += 1
        if self.die_after is not None and self.made == self.die_after:
            raise Killed  # the upstream made the user; its answer never reaches the handler
        return result


def test_a_per_user_chunk_cut_off_mid_way_is_resumed_by_the_redelivery_with_every_user_stored_once(
    world: World,
) -> None:
    upstream = DiesAfterCreates(die_after=37, instances=[world.creds], clock=world.clock)
    _use(world, upstream, claim_seconds=120)
    body = {"Quantity": 150, "RequestId": "fallback-1"}

    with pytest.raises(Killed):
        world.intake.handle(body, message_id="m-1", source="queue")
    assert len(_stored_bulk_users(world, "fallback-1")) == 36  # all made but the one in flight
    upstream.die_after = None
    world.clock.now += 121  # SQS redelivers after the visibility timeout; the dead claim has lapsed
    result = world.intake.handle(body, message_id="m-1", source="queue")

    assert (result.status, result.stored) == ("bulk", 150)
    assert world.dead_letters.letters == []
    stored = _stored_bulk_users(world, "fallback-1")
    assert sorted(stored) == sorted(str(t) for t in upstream.users)  # every user made is stored, none twice
    assert len(upstream.users) == 150
    assert upstream.calls["login"] == 0  # the in-flight one is recovered without a Login
    tokenless = [u for u in world.store.users.values() if u.status is UserStatus.TOKENLESS]
    assert len(tokenless) == 1  # the one whose answer the cut-off lost: its tokens come by Login later
    assert world.store.bulks[("default", "fallback-1")].chunks == {0: ChunkState.DONE, 1: ChunkState.DONE}


def test_a_per_user_chunk_short_of_time_stops_between_creates_and_the_next_delivery_finishes_it(
    world: World,
) -> None:
    upstream = DiesAfterCreates(die_after=None, instances=[world.creds], clock=world.clock)
    _use(world, upstream, bulk_call_seconds=15)
    deadline = world.clock.now + 60
    original_create = upstream.create

    def slow_create(*args: Any, **kwargs: Any) -> CreateResult:
        world.clock.now += 1  # one Create takes a second here
        return original_create(*args, **kwargs)

    upstream.create = slow_create  # type: ignore[method-assign]
    time_left: Callable[[], float] = lambda: deadline - world.clock.now  # noqa: E731

    with pytest.raises(BulkDeferredError):
        world.intake.handle({"Quantity": 80, "RequestId": "f-2"}, message_id="m", source="queue", time_left=time_left)
    assert len(_stored_bulk_users(world, "f-2")) == 46  # Creates started with 60 down to 15 s left
    assert world.store.bulks[("default", "f-2")].chunks == {0: ChunkState.TODO}  # given back, not left CALLING
    deadline = world.clock.now + 60
    result = world.intake.handle(
        {"Quantity": 80, "RequestId": "f-2"}, message_id="m", source="queue", time_left=time_left
    )

    assert (result.status, result.stored) == ("bulk", 80)
    assert len(upstream.users) == 80
    assert all(u.status is UserStatus.ACTIVE for u in world.store.users.values())


def test_a_per_user_chunk_is_taken_over_only_after_its_claim_lapsed(world: World) -> None:
    upstream = DiesAfterCreates(die_after=10, instances=[world.creds], clock=world.clock)
    _use(world, upstream, claim_seconds=120)
    with pytest.raises(Killed):
        world.intake.handle({"Quantity": 50, "RequestId": "f-3"}, message_id="m", source="queue")
    upstream.die_after = None

    world.clock.now += 60
    with pytest.raises(RegistrationInProgressError):
        world.intake.handle({"Quantity": 50, "RequestId": "f-3"}, message_id="m", source="queue")
    assert upstream.made == 10  # the twin made nothing while the first might still be calling
    world.clock.now += 61
    result = world.intake.handle({"Quantity": 50, "RequestId": "f-3"}, message_id="m", source="queue")

    assert (result.status, result.stored) == ("bulk", 50)
    assert len(upstream.users) == 50


def test_a_lost_create_answer_in_a_per_user_chunk_is_repeated_at_once_not_reported(world: World) -> None:
    # The CustomToken makes the repeated Create "exists": the user is stored (TOKENLESS) by the same delivery.
    world.upstream.create_many_offered = False
    world.upstream.fail_next(OutcomeUnknownError("dropped", call="create"), calls=["create"], after_commit=True)

    result = world.intake.handle({"Quantity": 20, "RequestId": "f-4"}, message_id="m", source="queue")

    assert (result.status, result.stored) == ("bulk", 20)
    assert len(world.upstream.users) == 20
    assert len(_stored_bulk_users(world, "f-4")) == 20
    assert world.upstream.calls["login"] == 0


# ------------------------------------------------------------------------------- defect 6: a RequestId reused


@pytest.mark.parametrize("second_quantity", [250, 50])
def test_a_request_id_reused_with_another_quantity_is_refused_with_its_reason(
    world: World, second_quantity: int
) -> None:
    world.intake.handle({"Quantity": 150, "RequestId": "load-x"}, message_id="m-1", source="queue")
    calls = world.upstream.calls["create_many"]

    result = world.intake.handle({"Quantity": second_quantity, "RequestId": "load-x"}, message_id="m-2", source="queue")

    assert (result.status, result.reason) == ("dead_lettered", "request_id_conflict")
    (letter,) = world.dead_letters.letters
    assert letter.errors[0].key == "RequestId"
    assert "150" in letter.errors[0].message
    assert world.upstream.calls["create_many"] == calls
    assert len(world.upstream.users) == 150
