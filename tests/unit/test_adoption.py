"""Adoption of lost CreateMany chunks under the timings that leave one partly stored: a runner killed between any two
writes of its answer, a table that fails while it stores, an adoption run cut off, other chunks' users in the same
window; and the operator's retry of a chunk that provably made nobody.

Each test writes the interleaving against the in-memory fakes; the DynamoDB conditions and the upstream's listing
are checked against moto and the emulator in tests/functional/test_reconcile.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pytest

from local.fake_lifecycle import InMemoryAdminSessionStore, StaticAdminCredentials
from local.fake_reconcile import InMemoryAdoptionRecords
from local.fake_store import InMemoryTokenStore
from local.fakes import FakeUserService, RecordingPublisher
from telematics_reg.errors import FieldError, OutcomeUnknownError, UpstreamValidationError
from telematics_reg.lifecycle.admin import FleetAdminSession
from telematics_reg.management_models import AdminCredentials
from telematics_reg.models import BulkRegistrationRequest, CreateManyRequest, CreateResult, InstanceCredentials
from telematics_reg.outcomes import UserRegistered
from telematics_reg.reconcile.adoption import ChunkAdopter
from telematics_reg.reconcile.records import AdoptedUser
from telematics_reg.registration import BulkIncompleteError, RegistrationService
from telematics_reg.store import ChunkState, NewUser, StoreError, UserStatus, pending_key

from .conftest import DEVICE_TOKEN_KEY, World

ADMIN = AdminCredentials(email="ops@example.com", password="pw")
CLAIM = 120
#: Past the claim of a dead runner (a redelivery judges it abandoned) ...
AFTER_CLAIM = CLAIM + 1
#: ... and past the window's end plus a claim and the skew (adoption may list it).
WINDOW_CLOSED = 1000


class Killed(BaseException):
    """Lambda stopping the runner: not an ``Exception``, so nothing in the service catches it."""


class DyingStore(InMemoryTokenStore):
    """A token store whose runner is killed at its ``writes_left``-th write from now (each stored user is one write,
    as are a claim and a move of a chunk). ``None``: never."""

    def __init__(self) -> None:
        super().__init__(shards=4)
        self.writes_left: int | None = None
        self.failing_puts = 0

    def _write(self) -> None:
        if self.writes_left is not None:
            if self.writes_left <= 0:
                raise Killed
            self.writes_left -= 1

    def claim_chunk(self, **kwargs: Any) -> None:
        self._write()
        super().claim_chunk(**kwargs)

    def set_chunk_state(self, **kwargs: Any) -> None:
        self._write()
        super().set_chunk_state(**kwargs)

    def put_new_users(self, users: Sequence[NewUser], *, now: float) -> None:
        if self.failing_puts:
            self.failing_puts -= 1
            raise StoreError("DynamoDB batch_write_item failed: ProvisionedThroughputExceededException")
        for user in users:
            self._write()
            super().put_new_users([user], now=now)


class DyingAdoptionRecords(InMemoryAdoptionRecords):
    """Adoption's records, its run killed after ``puts_left`` adopted users (``None``: never)."""

    puts_left: int | None = None

    def put_adopted(self, user: AdoptedUser, *, now: float) -> bool:
        if self.puts_left is not None:
            if self.puts_left <= 0:
                raise Killed
            self.puts_left -= 1
        return super().put_adopted(user, now=now)


class Upstream(FakeUserService):
    """The User Service; ``kill_before_create_many`` kills the runner as its CreateMany goes out (nothing made)."""

    kill_before_create_many = False

    def create_many(
        self,
        creds: InstanceCredentials,
        body: CreateManyRequest,
        custom_tokens: Sequence[UUID] | None = None,
        *,
        fallback: bool = True,
    ) -> list[CreateResult]:
        if self.kill_before_create_many:
            raise Killed
        return super().create_many(creds, body, custom_tokens, fallback=fallback)


@dataclass
class Bulks:
    world: World
    upstream: Upstream
    store: DyingStore
    records: DyingAdoptionRecords
    publisher: RecordingPublisher
    service: RegistrationService
    adopter: ChunkAdopter

    def register(self, request_id: str, quantity: int, **options: Any) -> None:
        request = BulkRegistrationRequest.model_validate({"Quantity": quantity, "RequestId": request_id})
        self.service.register_bulk(request, source="queue", message_id=str(uuid.uuid4()), **options)

    def redeliver(self, request_id: str, quantity: int) -> None:
        """The message again, once the dead runner's claim lapsed: its chunk is reported (bulk_incomplete)."""
        self.world.clock.now += AFTER_CLAIM
        with pytest.raises(BulkIncompleteError):
            self.register(request_id, quantity)

    def chunk(self, request_id: str, index: int = 0) -> ChunkState:
        progress = self.records.get_bulk("default", request_id)
        assert progress is not None
        return progress.chunks[index]

    def stored_of(self, request_id: str) -> list[str]:
        return [u.device_token for u in self.store.users.values() if u.bulk_request_id == request_id]

    def anonymous_upstream(self) -> set[str]:
        return {str(u.device_token) for u in self.upstream.users.values() if u.client_id is None}

    def announced(self, request_id: str) -> list[UserRegistered]:
        return [
            e for e in self.publisher.of_type(UserRegistered) if isinstance(e, UserRegistered)
            and e.bulk_request_id == request_id
        ]  # fmt: skip


@pytest.fixture
def bulks(world: World) -> Bulks:
    upstream = Upstream(instances=[world.creds], token_lifetime=3600, clock=world.clock, admin=ADMIN)
    store = DyingStore()
    records = DyingAdoptionRecords(store)
    publisher = RecordingPublisher()
    service = RegistrationService(
        upstream=upstream,
        store=store,
        credentials=world.credentials,
        device_token_key=DEVICE_TOKEN_KEY,
        publisher=publisher,
        claim_seconds=CLAIM,
        clock=world.clock,
        sleep=world.clock.sleep,
    )
    admin = FleetAdminSession(
        upstream=upstream,
        store=InMemoryAdminSessionStore(),
        credentials=StaticAdminCredentials(ADMIN),
        clock=world.clock,
        sleep=world.clock.sleep,
    )
    adopter = ChunkAdopter(
        upstream=upstream,
        admin=admin,
        records=records,
        credentials=world.credentials,
        publisher=publisher,
        claim_seconds=CLAIM,
        clock_skew_seconds=10,
        window_margin_seconds=60,
        clock=world.clock,
    )
    return Bulks(world, upstream, store, records, publisher, service, adopter)


def _every_user_stored_once(bulks: Bulks, request_id: str, quantity: int) -> None:
    stored = bulks.stored_of(request_id)
    assert len(stored) == len(set(stored)) == quantity
    assert set(stored) == bulks.anonymous_upstream()  # nothing made upstream is left unstored, nothing stored twice
    progress = bulks.records.get_bulk("default", request_id)
    assert progress is not None
    assert set(progress.chunks.values()) == {ChunkState.DONE}
    assert sum(progress.stored.values()) == quantity


# --------------------------------------------------------------------------------------- a chunk partly stored


@pytest.mark.parametrize("stored_before_kill", [0, 1, 25, 49, 50])
def test_a_runner_killed_between_any_two_writes_of_a_chunk_answer_leaves_every_user_stored_once_after_adoption(
    bulks: Bulks, stored_before_kill: int
) -> None:
    # Writes of the chunk: its claim, then one per user stored, then DONE. 50 stored: killed before DONE.
    bulks.store.writes_left = 1 + stored_before_kill
    with pytest.raises(Killed):
        bulks.register("partly", 50)
    bulks.store.writes_left = None
    assert len(bulks.stored_of("partly")) == stored_before_kill
    assert bulks.chunk("partly") is ChunkState.CALLING
    bulks.redeliver("partly", 50)
    assert bulks.chunk("partly") is ChunkState.UNKNOWN

    bulks.world.clock.now += WINDOW_CLOSED
    (adopted,) = bulks.adopter.adopt_pending()

    assert adopted.outcome == "adopted", adopted.reason
    assert (adopted.stored, adopted.adopted) == (stored_before_kill, 50 - stored_before_kill)
    _every_user_stored_once(bulks, "partly", 50)
    users = [bulks.store.users[t] for t in bulks.stored_of("partly")]
    assert sum(u.status is UserStatus.ACTIVE for u in users) == stored_before_kill  # those have their tokens
    # The runner died before it announced anything: the adoption announces the chunk's 50 users.
    assert sorted(e.device_token for e in bulks.announced("partly")) == sorted(bulks.stored_of("partly"))
    assert pending_key("default", "partly", 0) not in bulks.records.pending_adoptions()
    # The letter redriven (README, troubleshooting): the bulk completes, nobody is made again.
    bulks.register("partly", 50)
    assert bulks.upstream.calls["create_many"] == 1
    _every_user_stored_once(bulks, "partly", 50)


def test_users_stored_under_another_chunk_or_request_are_never_counted_for_this_one(bulks: Bulks) -> None:
    # Chunk 0 (100) of "lost" dies before storing anything, and 30 of its users are deleted upstream meanwhile. In the
    # same window the chunk after it (30) and another bulk (10) are stored by their own calls. Counting the stored
    # users of the same request would make 70 + 30 = 100 and adopt a chunk that is not whole.
    bulks.store.writes_left = 1
    with pytest.raises(Killed):
        bulks.register("lost", 130)
    bulks.store.writes_left = None
    lost_users = sorted(bulks.anonymous_upstream())
    for token in lost_users[:30]:
        del bulks.upstream.users[UUID(token)]
    bulks.world.clock.now += 5
    bulks.register("other", 10)
    bulks.redeliver("lost", 130)  # chunk 1 of "lost" is made and stored now; chunk 0 is reported
    assert len(bulks.stored_of("lost")) == 30
    assert len(bulks.stored_of("other")) == 10

    bulks.world.clock.now += WINDOW_CLOSED
    (reported,) = bulks.adopter.adopt_pending()

    assert reported.outcome == "needs_operator"
    assert reported.reason == (
        "70 users without ClientId and not stored were created in the window, fewer than the chunk's 100"
    )
    assert reported.stored == 0
    assert sorted(reported.candidates) == lost_users[30:]
    assert bulks.chunk("lost", 0) is ChunkState.UNKNOWN
    assert len(bulks.stored_of("lost")) == 30


def test_an_adoption_run_cut_off_between_its_puts_is_finished_by_the_next_run(bulks: Bulks) -> None:
    bulks.store.writes_left = 1 + 20
    with pytest.raises(Killed):
        bulks.register("twice", 50)
    bulks.store.writes_left = None
    bulks.redeliver("twice", 50)
    bulks.world.clock.now += WINDOW_CLOSED
    bulks.records.puts_left = 12
    with pytest.raises(Killed):
        bulks.adopter.adopt_pending()
    bulks.records.puts_left = None
    assert bulks.chunk("twice") is ChunkState.UNKNOWN

    (adopted,) = bulks.adopter.adopt_pending()

    # 20 stored by the chunk's call and 12 by the first run count as the chunk's; the 18 left are adopted.
    assert (adopted.outcome, adopted.stored, adopted.adopted) == ("adopted", 32, 18)
    _every_user_stored_once(bulks, "twice", 50)
    assert {e.device_token for e in bulks.announced("twice")} == set(bulks.stored_of("twice"))


# ------------------------------------------------------------------------- the registration path holds the answer


def test_a_transient_table_failure_while_storing_an_answer_is_retried_by_the_same_delivery(bulks: Bulks) -> None:
    bulks.store.failing_puts = 3  # throttled three times in a row, after the CreateMany answer arrived

    bulks.register("throttled", 60, time_left=lambda: 60.0)

    _every_user_stored_once(bulks, "throttled", 60)
    assert len(bulks.announced("throttled")) == 60
    assert bulks.records.pending_adoptions() == {}


def test_an_answer_the_table_keeps_refusing_is_reported_at_once_and_its_users_adopted(bulks: Bulks) -> None:
    left = [30.0]

    def time_left() -> float:
        left[0] -= 4  # every attempt costs time: the delivery runs short before the table comes back
        return left[0]

    bulks.store.failing_puts = 1000
    with pytest.raises(StoreError):  # transient for the intake: the message is retried
        bulks.register("refused", 50, time_left=time_left)
    bulks.store.failing_puts = 0
    # Reported now, not left CALLING for a claim time: its window is closed and it waits for adoption.
    assert bulks.chunk("refused") is ChunkState.UNKNOWN
    assert pending_key("default", "refused", 0) in bulks.records.pending_adoptions()
    assert bulks.stored_of("refused") == []
    with pytest.raises(BulkIncompleteError):  # the redelivery reports it, never calls it again
        bulks.register("refused", 50)

    bulks.world.clock.now += WINDOW_CLOSED
    (adopted,) = bulks.adopter.adopt_pending()

    assert (adopted.outcome, adopted.adopted) == ("adopted", 50)
    _every_user_stored_once(bulks, "refused", 50)
    assert bulks.upstream.calls["create_many"] == 1


# ---------------------------------------------------------------------------- retry of a chunk that made nobody


def _lost_before_the_call(bulks: Bulks, request_id: str, quantity: int) -> None:
    """A chunk whose runner died as its CreateMany went out, before the upstream made anyone, then reported."""
    bulks.upstream.kill_before_create_many = True
    with pytest.raises(Killed):
        bulks.register(request_id, quantity)
    bulks.upstream.kill_before_create_many = False
    bulks.redeliver(request_id, quantity)


def test_a_lost_chunk_that_made_nobody_is_retried_by_the_operator_and_made_once(bulks: Bulks) -> None:
    _lost_before_the_call(bulks, "unmade", 40)
    bulks.world.clock.now += WINDOW_CLOSED
    (reported,) = bulks.adopter.adopt_pending()
    assert (reported.outcome, reported.candidates) == ("needs_operator", [])

    (judged,) = bulks.adopter.retry_unmade("default", "unmade", dry_run=True)
    assert judged.outcome == "would_reopen"
    assert bulks.chunk("unmade") is ChunkState.UNKNOWN  # a dry run changes nothing

    (reopened,) = bulks.adopter.retry_unmade("default", "unmade")

    assert reopened.outcome == "reopened"
    assert bulks.chunk("unmade") is ChunkState.TODO
    assert bulks.adopter.retry_unmade("default", "unmade") == []  # nothing lost any more: nothing to do twice
    bulks.register("unmade", 40)  # the dead letter, redriven
    _every_user_stored_once(bulks, "unmade", 40)
    assert bulks.upstream.calls["create_many"] == 1


def test_retry_unmade_waits_until_the_window_is_closed_beyond_any_claim(bulks: Bulks) -> None:
    _lost_before_the_call(bulks, "early", 40)

    (waiting,) = bulks.adopter.retry_unmade("default", "early")

    assert waiting.outcome == "waiting"
    assert bulks.chunk("early") is ChunkState.UNKNOWN


def test_retry_unmade_never_reopens_a_chunk_any_of_whose_users_may_exist(bulks: Bulks) -> None:
    # Its answer lost after the upstream made its users: they are candidates, the chunk is for adoption.
    bulks.store.writes_left = 1
    with pytest.raises(Killed):
        bulks.register("made", 30)
    bulks.store.writes_left = None
    bulks.redeliver("made", 30)
    # Partly stored by its own call.
    bulks.store.writes_left = 1 + 5
    with pytest.raises(Killed):
        bulks.register("partly", 30)
    bulks.store.writes_left = None
    bulks.redeliver("partly", 30)
    bulks.world.clock.now += WINDOW_CLOSED

    made = bulks.adopter.retry_unmade("default", "made")
    partly = bulks.adopter.retry_unmade("default", "partly")

    assert [r.outcome for r in made + partly] == ["needs_operator", "needs_operator"]
    assert "stored under this chunk" in partly[0].reason
    assert len(made[0].candidates) == 55  # every anonymous user we do not store, whichever chunk it may be of
    assert bulks.chunk("made") is bulks.chunk("partly") is ChunkState.UNKNOWN


def test_retry_unmade_sees_a_user_the_upstream_made_after_the_call_window(bulks: Bulks) -> None:
    # The upstream dated the chunk's users late (its clock, or a request processed late): outside the window adoption
    # lists, but a retry lists everything created since the call began, so it never calls the chunk a second time.
    _lost_before_the_call(bulks, "late", 20)
    bulks.world.clock.now += WINDOW_CLOSED
    bulks.upstream.create_many(bulks.world.creds, CreateManyRequest(quantity=20))
    bulks.world.clock.now += 1

    (refused,) = bulks.adopter.retry_unmade("default", "late")

    assert refused.outcome == "needs_operator"
    assert len(refused.candidates) == 20
    assert bulks.chunk("late") is ChunkState.UNKNOWN


# --------------------------------------------------------------------------------------- the README's redrive advice


def test_redriving_a_bulk_incomplete_letter_reports_a_failed_or_lost_chunk_again_and_never_calls_it(
    bulks: Bulks,
) -> None:
    # Chunk 0 rejected, chunk 1 lost (its answer dropped after the upstream made its users), chunk 2 made and stored.
    bulks.upstream.fail_next(
        UpstreamValidationError("rejected", status=422, errors=[FieldError("Quantity", "bad")]),
        calls=["create_many"],
    )
    bulks.upstream.fail_next(OutcomeUnknownError("read timeout"), calls=["create_many"], after_commit=True)
    with pytest.raises(BulkIncompleteError) as first:
        bulks.register("mixed", 250)
    made = set(bulks.anonymous_upstream())
    assert [e.key for e in first.value.errors][-2:] == ["Chunk0", "Chunk1"]

    for _ in range(2):  # redriven, twice
        with pytest.raises(BulkIncompleteError) as again:
            bulks.register("mixed", 250)
        assert {e.key for e in again.value.errors} == {"Chunk0", "Chunk1"}

    assert bulks.upstream.calls["create_many"] == 3
    assert bulks.anonymous_upstream() == made
    assert len(bulks.stored_of("mixed")) == 50
    assert [bulks.chunk("mixed", i) for i in range(3)] == [ChunkState.FAILED, ChunkState.UNKNOWN, ChunkState.DONE]
