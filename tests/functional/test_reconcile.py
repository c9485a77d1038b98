"""Reconciliation against moto and the emulator: adoption of a lost CreateMany chunk (exact, fewer, overlapping
windows, dry run) and the drift audit (each class, resume across invocations, exclusivity, deletions mid-walk).

Each test of the audit gets a table of its own (the schema of the stack's tokens table), so the users other tests
leave behind are not judged; the emulator is reset for each test.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from uuid import UUID

import boto3
import pytest
from boto3.dynamodb.types import TypeDeserializer

from local.emulator.testing import EmulatorHandle
from local.fake_lifecycle import RecordingDeadLetterEraser, StaticAdminCredentials
from local.fakes import RecordingPublisher, StaticDeviceTokenKey
from local.stack import LocalStack
from telematics_cli import main
from telematics_reg.credentials import StaticCredentials
from telematics_reg.lifecycle.admin import DynamoAdminSessionStore, FleetAdminSession
from telematics_reg.lifecycle.changes import Action, LifecycleChange
from telematics_reg.lifecycle.records import DynamoLifecycleRecords
from telematics_reg.lifecycle.service import LifecycleService
from telematics_reg.management_models import AdminCredentials, UserUpdate, UserUpdateFields
from telematics_reg.models import (
    BulkRegistrationRequest,
    CreateManyRequest,
    CreateUserRequest,
    InstanceCredentials,
    UserFields,
)
from telematics_reg.outcomes import UserRegistered
from telematics_reg.reconcile.adoption import ChunkAdopter
from telematics_reg.reconcile.audit import DriftAudit
from telematics_reg.reconcile.events import UserGone
from telematics_reg.reconcile.records import DynamoReconcileRecords
from telematics_reg.refresh import RefreshJob, TokenRefresher
from telematics_reg.registration import BulkIncompleteError, RegistrationService, device_token_for, tokens_of
from telematics_reg.store import ChunkState, DynamoTokenStore, NewUser, Tokens, UserStatus, pending_key
from telematics_reg.timing import LeaseTiming
from telematics_reg.upstream import UserServiceClient

from .conftest import INSTANCES, Functions, drain, sqs_event

KEY = "reconcile-test-device-token-key-0123456789"
_deserialize = TypeDeserializer().deserialize


@dataclass
class Env:
    store: DynamoTokenStore
    records: DynamoReconcileRecords
    upstream: UserServiceClient
    admin: FleetAdminSession
    credentials: StaticCredentials
    publisher: RecordingPublisher
    emulator: EmulatorHandle

    def creds(self, alias: str = "default") -> InstanceCredentials:
        return self.credentials.get(alias)

    def adopter(self, *, ahead: float = 1000.0, margin: int = 5) -> ChunkAdopter:
        # The clock runs ahead so that the wait for overlapping calls is over (the window itself is real time).
        return ChunkAdopter(
            upstream=self.upstream,
            admin=self.admin,
            records=self.records,
            credentials=self.credentials,
            publisher=self.publisher,
            claim_seconds=120,
            clock_skew_seconds=10,
            window_margin_seconds=margin,
            refresh_margin_seconds=900,
            login_interval_seconds=20.0,
            clock=lambda: time.time() + ahead,
        )

    def audit(
        self,
        *,
        page_size: int = 1000,
        ahead: float = 5.0,
        lease: int = 180,
        settle_seconds: int = 900,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> DriftAudit:
        return DriftAudit(
            upstream=self.upstream,
            admin=self.admin,
            records=self.records,
            credentials=self.credentials,
            device_token_key=StaticDeviceTokenKey(KEY),
            publisher=self.publisher,
            interval_seconds=86_400,
            lease_seconds=lease,
            created_margin_seconds=0,
            page_size=page_size,
            scan_page_size=25,
            settle_seconds=settle_seconds,
            clock=clock or (lambda: time.time() + ahead),
            sleep=sleep,
        )


def _table_like(dynamodb: Any, source: str) -> str:
    """A new, empty table with the schema of ``source`` (its key and indexes)."""
    described = dynamodb.describe_table(TableName=source)["Table"]
    name = f"reconcile-{uuid.uuid4().hex[:10]}"
    indexes = [
        {"IndexName": i["IndexName"], "KeySchema": i["KeySchema"], "Projection": i["Projection"]}
        for i in described.get("GlobalSecondaryIndexes", [])
    ]
    dynamodb.create_table(
        TableName=name,
        AttributeDefinitions=described["AttributeDefinitions"],
        KeySchema=described["KeySchema"],
        BillingMode="PAY_PER_REQUEST",
        GlobalSecondaryIndexes=indexes,
    )
    return name


def _env(table: str, dynamodb: Any, emulator: EmulatorHandle) -> Env:
    store = DynamoTokenStore(dynamodb, table_name=table, shards=8)
    upstream = UserServiceClient(emulator.url, max_attempts=2)
    assert emulator.admin_account is not None
    admin = FleetAdminSession(
        upstream=upstream,
        store=DynamoAdminSessionStore(store),
        credentials=StaticAdminCredentials(
            AdminCredentials(email=emulator.admin_account["Email"], password=emulator.admin_account["Password"])
        ),
    )
    return Env(
        store,
        DynamoReconcileRecords(store),
        upstream,
        admin,
        StaticCredentials(INSTANCES),
        RecordingPublisher(),
        emulator,
    )


@pytest.fixture
def fresh(stack: LocalStack, dynamodb: Any, emulator: EmulatorHandle) -> Iterator[Env]:
    """A table of its own and a reset emulator."""
    table = _table_like(dynamodb, stack.outputs["TokensTableName"])
    yield _env(table, dynamodb, emulator)
    dynamodb.delete_table(TableName=table)


# ----------------------------------------------------------------------------------------------------- adoption


def _lose_a_chunk(env: Env, quantity: int, lost: int = 1) -> str:
    """A bulk registered by the service whose first ``lost`` CreateMany answers are dropped after the commit."""
    env.emulator.set_faults(script=[{"call": "create_many", "fault": "drop_after_commit"}] * lost)
    service = RegistrationService(
        upstream=env.upstream,
        bulk_upstream=UserServiceClient(env.emulator.url, max_attempts=1),
        store=env.store,
        credentials=env.credentials,
        device_token_key=StaticDeviceTokenKey(KEY),
        publisher=RecordingPublisher(),
    )
    request_id = f"lost-{uuid.uuid4().hex[:8]}"
    request = BulkRegistrationRequest.model_validate({"Quantity": quantity, "RequestId": request_id})
    with pytest.raises(BulkIncompleteError) as lost_chunk:  # dead-lettered bulk_incomplete by the intake
        service.register_bulk(request, source="queue", message_id=str(uuid.uuid4()))
    assert lost_chunk.value.errors[0].key == "Chunk0"
    env.emulator.clear_faults()
    return request_id


def _bulk_users(dynamodb: Any, table: str, request_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {
        "TableName": table,
        "FilterExpression": "BulkRequestId = :r",
        "ExpressionAttributeValues": {":r": {"S": request_id}},
    }
    while True:
        page = dynamodb.scan(**kwargs)
        items += [{k: _deserialize(v) for k, v in item.items()} for item in page["Items"]]
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def test_a_lost_create_many_answer_is_adopted_and_its_users_logged_in_within_the_budget(
    fresh: Env, dynamodb: Any
) -> None:
    shared = fresh
    request_id = _lose_a_chunk(shared, quantity=150)
    table = shared.store._table
    assert len(_bulk_users(dynamodb, table, request_id)) == 50
    key = pending_key("default", request_id, 0)
    assert key in shared.records.pending_adoptions()
    progress = shared.records.get_bulk("default", request_id)
    assert progress is not None
    assert progress.chunks[0] is ChunkState.UNKNOWN
    assert progress.ended[0] >= progress.claims[0].since  # the call's window is kept

    # Too early: a call overlapping the window may still be storing its users.
    (early,) = shared.adopter(ahead=0).adopt_pending()
    assert early.outcome == "waiting"
    assert key in shared.records.pending_adoptions()

    (adopted,) = shared.adopter().adopt_pending()

    assert (adopted.outcome, adopted.adopted, len(adopted.candidates)) == ("adopted", 100, 100)
    users = _bulk_users(dynamodb, table, request_id)
    assert len(users) == 150 == len({u["DeviceToken"] for u in users})
    tokenless = sorted((u for u in users if u["Status"] == "TOKENLESS"), key=lambda u: int(u["AccessExpiresAt"]))
    assert len(tokenless) == 100
    assert all(u["AdoptedFrom"] == f"{request_id}#0" and "DueShard" in u for u in tokenless)
    due = [int(u["AccessExpiresAt"]) for u in tokenless]
    assert due[-1] - due[0] == 99 * 20  # due at the fleet's Login pace, not all at once
    final = shared.records.get_bulk("default", request_id)
    assert final is not None
    assert (final.chunks[0], final.stored[0]) == (ChunkState.DONE, 100)
    assert key not in shared.records.pending_adoptions()
    events = [e for e in shared.publisher.of_type(UserRegistered) if isinstance(e, UserRegistered)]
    assert len(events) == 100
    assert all(e.bulk_request_id == request_id and not e.has_tokens for e in events)
    assert shared.emulator.counters()["users_total"] == 150

    # Adopting again finds nothing to do, and the refresh path logs an adopted user in (one Login of the budget).
    assert shared.adopter().adopt_request("default", request_id) == []
    refresher = TokenRefresher(
        upstream=shared.upstream,
        store=shared.store,
        credentials=shared.credentials,
        publisher=shared.publisher,
        margin_seconds=900,
        timing=LeaseTiming(lease_seconds=180, call_seconds=30, clock_skew_seconds=10, commit_seconds=10),
    )
    first = tokenless[0]
    outcome = refresher.refresh_job(RefreshJob(first["DeviceToken"], int(first["Version"])))
    assert outcome.value == "logged_in"
    stored = shared.store.get_user(first["DeviceToken"])
    assert stored is not None
    assert stored.status is UserStatus.ACTIVE
    assert stored.tokens is not None


def test_fewer_users_than_the_chunk_are_reported_with_the_candidates_and_nothing_is_stored(
    fresh: Env, dynamodb: Any
) -> None:
    shared = fresh
    table = shared.store._table
    request_id = _lose_a_chunk(shared, quantity=100)
    adopter = shared.adopter()
    (judged,) = adopter.adopt_request("default", request_id, dry_run=True)
    assert judged.outcome == "would_adopt"
    victim = judged.candidates[0]
    shared.admin.call(lambda token: shared.upstream.delete_user(token, UUID(victim)))

    (reported,) = adopter.adopt_pending()

    assert reported.outcome == "needs_operator"
    assert "99 users" in reported.reason
    assert "fewer" in reported.reason
    assert sorted(reported.candidates) == sorted(set(judged.candidates) - {victim})
    assert _bulk_users(dynamodb, table, request_id) == []
    progress = shared.records.get_bulk("default", request_id)
    assert progress is not None
    assert progress.chunks[0] is ChunkState.UNKNOWN
    item = dynamodb.get_item(TableName=table, Key={"pk": {"S": f"BULK#default#{request_id}"}})
    note = json.loads(item["Item"]["Adoption0"]["S"])
    assert note["Outcome"] == "needs_operator"
    assert len(note["Candidates"]) == 99
    assert pending_key("default", request_id, 0) not in shared.records.pending_adoptions()


def test_two_lost_chunks_whose_calls_overlap_are_never_guessed(fresh: Env, dynamodb: Any) -> None:
    shared = fresh
    first = _lose_a_chunk(shared, quantity=100)
    second = _lose_a_chunk(shared, quantity=100)
    adopter = shared.adopter(margin=60)  # the two calls are seconds apart: their windows overlap

    results = {r.request_id: r for r in adopter.adopt_pending() if r.request_id in (first, second)}

    assert {r.outcome for r in results.values()} == {"needs_operator"}
    assert second in results[first].reason
    assert first in results[second].reason
    table = shared.store._table
    assert _bulk_users(dynamodb, table, first) == _bulk_users(dynamodb, table, second) == []


def test_more_users_than_the_chunk_in_its_window_are_reported(fresh: Env, dynamodb: Any) -> None:
    shared = fresh
    request_id = _lose_a_chunk(shared, quantity=100)
    # Made by someone else in the same instance, in the window, anonymous and not ours to store.
    shared.upstream.create_many(shared.creds(), CreateManyRequest(quantity=3))
    adopter = shared.adopter(margin=60)

    (reported,) = adopter.adopt_request("default", request_id)

    assert reported.outcome == "needs_operator"
    assert "103 users" in reported.reason
    assert "more" in reported.reason
    assert _bulk_users(dynamodb, shared.store._table, request_id) == []


class Killed(BaseException):
    """Lambda stopping the runner mid-call: not an ``Exception``, so nothing in the service catches it."""


class _DiesWhileStoring(DynamoTokenStore):
    """The token store of a runner killed after ``survive`` batch writes of users (25 users each)."""

    def __init__(self, client: Any, *, table_name: str, survive: int) -> None:
        super().__init__(client, table_name=table_name, shards=8)
        self.survive = survive

    def _batch_write(self, requests: list[dict[str, Any]]) -> dict[str, Any]:
        if self.survive <= 0:
            raise Killed
        self.survive -= 1
        return super()._batch_write(requests)


def _service(env: Env, store: DynamoTokenStore, *, ahead: float = 0.0) -> RegistrationService:
    return RegistrationService(
        upstream=env.upstream,
        bulk_upstream=UserServiceClient(env.emulator.url, max_attempts=1),
        store=store,
        credentials=env.credentials,
        device_token_key=StaticDeviceTokenKey(KEY),
        publisher=RecordingPublisher(),
        clock=lambda: time.time() + ahead,
    )


def test_a_chunk_partly_stored_when_its_runner_died_is_adopted_counting_the_users_it_stored(
    fresh: Env, dynamodb: Any
) -> None:
    # The soak's case: the runner was killed while storing a CreateMany answer of 50, after 25 users. The chunk stayed
    # CALLING, the redelivery reported it (UNKNOWN, bulk_incomplete), and adoption counted only the 25 unstored users.
    env, table = fresh, fresh.store._table
    request_id = f"partly-{uuid.uuid4().hex[:8]}"
    request = BulkRegistrationRequest.model_validate({"Quantity": 50, "RequestId": request_id})
    dying = _DiesWhileStoring(dynamodb, table_name=table, survive=1)
    with pytest.raises(Killed):
        _service(env, dying).register_bulk(request, source="queue", message_id=str(uuid.uuid4()))
    assert len(_bulk_users(dynamodb, table, request_id)) == 25
    assert env.emulator.counters()["users_total"] == 50
    # The redelivery, once the dead runner's claim lapsed: the chunk is reported, never called again.
    with pytest.raises(BulkIncompleteError):
        _service(env, env.store, ahead=200).register_bulk(request, source="queue", message_id=str(uuid.uuid4()))
    progress = env.records.get_bulk("default", request_id)
    assert progress is not None
    assert progress.chunks[0] is ChunkState.UNKNOWN

    (adopted,) = env.adopter().adopt_pending()

    assert (adopted.outcome, adopted.adopted) == ("adopted", 25), adopted.reason
    users = _bulk_users(dynamodb, table, request_id)
    assert len(users) == 50 == len({u["DeviceToken"] for u in users})
    assert sorted(u["Status"] for u in users) == ["ACTIVE"] * 25 + ["TOKENLESS"] * 25
    assert all(u.get("BulkChunk") == f"{request_id}#0" or u.get("AdoptedFrom") == f"{request_id}#0" for u in users)
    assert env.emulator.counters()["users_total"] == 50  # every user made upstream is stored, once
    final = env.records.get_bulk("default", request_id)
    assert final is not None
    assert (final.chunks[0], final.stored[0]) == (ChunkState.DONE, 50)
    # Nobody announced the 25 the runner stored (it died before the chunk was done): the adoption announces all 50.
    events = [e for e in env.publisher.of_type(UserRegistered) if isinstance(e, UserRegistered)]
    assert sorted(e.device_token for e in events) == sorted(u["DeviceToken"] for u in users)
    assert sorted(e.has_tokens for e in events) == [False] * 25 + [True] * 25
    # The letter redriven (README, troubleshooting): the bulk completes, nobody is made again.
    done = _service(env, env.store).register_bulk(request, source="queue", message_id=str(uuid.uuid4()))
    assert (done.stored, done.chunks_done_now) == (50, 0)
    assert env.emulator.counters()["users_total"] == 50


class _DiesCalling(UserServiceClient):
    """The bulk client of a runner killed as its CreateMany goes out: the upstream never sees the call."""

    def create_many(self, *args: Any, **kwargs: Any) -> Any:
        raise Killed


def _lost_before_the_call(env: Env, dynamodb: Any, quantity: int, *, ago: int = 600) -> str:
    """A bulk whose first chunk's runner died before its CreateMany reached the upstream, ``ago`` seconds ago: the
    chunk is CALLING under a claim that lapsed long since."""
    request_id = f"unmade-{uuid.uuid4().hex[:8]}"
    request = BulkRegistrationRequest.model_validate({"Quantity": quantity, "RequestId": request_id})
    service = _service(env, env.store)
    service._bulk_upstream = _DiesCalling(env.emulator.url, max_attempts=1)
    with pytest.raises(Killed):
        service.register_bulk(request, source="queue", message_id=str(uuid.uuid4()))
    dynamodb.update_item(
        TableName=env.store._table,
        Key={"pk": {"S": f"BULK#default#{request_id}"}},
        UpdateExpression="SET Since0 = Since0 - :ago",
        ExpressionAttributeValues={":ago": {"N": str(ago)}},
    )
    return request_id


def test_a_lost_chunk_is_reopened_only_under_the_call_that_was_judged(fresh: Env, dynamodb: Any) -> None:
    env = fresh
    request_id = _lost_before_the_call(env, dynamodb, 20)
    with pytest.raises(BulkIncompleteError):
        _service(env, env.store).register_bulk(
            BulkRegistrationRequest.model_validate({"Quantity": 20, "RequestId": request_id}),
            source="queue",
            message_id=str(uuid.uuid4()),
        )
    progress = env.records.get_bulk("default", request_id)
    assert progress is not None
    claim = progress.claims[0]
    other = replace(claim, since=claim.since + 1)

    assert not env.records.reopen_chunk("default", request_id, 0, other, now=time.time())  # another call's claim
    assert env.records.reopen_chunk("default", request_id, 0, claim, now=time.time())
    assert not env.records.reopen_chunk("default", request_id, 0, claim, now=time.time())  # done once only

    reopened = env.records.get_bulk("default", request_id)
    assert reopened is not None
    assert reopened.chunks[0] is ChunkState.TODO
    assert 0 not in reopened.claims
    assert 0 not in reopened.ended


# -------------------------------------------------------------------------------------------------------- audit


def _registered(env: Env, client_id: str, alias: str = "default") -> str:
    """A user made upstream the way the service makes it (derived CustomToken, ClientId) and stored."""
    creds = env.creds(alias)
    token = device_token_for(str(creds.instance_id), client_id, key=StaticDeviceTokenKey(KEY).get())
    body = CreateUserRequest(custom_token=UUID(token), user_fields=UserFields(client_id=client_id))
    result = env.upstream.create(creds, body)
    assert str(result.device_token) == token
    tokens = Tokens("at", "rt", int(time.time()) + 3600)
    env.store.put_new_users(
        [NewUser(token, alias, str(creds.instance_id), tokens, client_id=client_id)], now=time.time() - 60
    )
    return token


def _registered_with_tokens(env: Env, client_id: str) -> str:
    """As :func:`_registered`, storing the pair the upstream issued (so that a Refresh succeeds)."""
    creds = env.creds()
    token = device_token_for(str(creds.instance_id), client_id, key=StaticDeviceTokenKey(KEY).get())
    body = CreateUserRequest(custom_token=UUID(token), user_fields=UserFields(client_id=client_id))
    tokens = tokens_of(env.upstream.create(creds, body), time.time())
    assert tokens is not None
    env.store.put_new_users(
        [NewUser(token, "default", str(creds.instance_id), tokens, client_id=client_id)], now=time.time() - 60
    )
    return token


def _update(env: Env, token: str, changes: UserUpdate) -> None:
    env.admin.call(lambda admin: env.upstream.update_user(admin, UUID(token), changes))


def test_the_audit_finds_each_class_of_drift_and_stops_refreshing_a_user_gone(fresh: Env) -> None:
    ok = _registered(fresh, "ok-1")
    gone = _registered(fresh, "gone-1")
    deactivated = _registered(fresh, "deactivated-1")
    reflagged = _registered(fresh, "reflagged-1")
    moved = _registered(fresh, "moved-1")
    creds = fresh.creds()
    orphan = device_token_for(str(creds.instance_id), "orphan-1", key=StaticDeviceTokenKey(KEY).get())
    fresh.upstream.create(
        creds, CreateUserRequest(custom_token=UUID(orphan), user_fields=UserFields(client_id="orphan-1"))
    )
    fresh.upstream.create_many(creds, CreateManyRequest(quantity=2))  # a lost chunk's: counted, left to adoption
    fresh.upstream.create(creds, CreateUserRequest(user_fields=UserFields(client_id="not-ours")))  # another system's
    fresh.admin.call(lambda t: fresh.upstream.delete_user(t, UUID(gone)))
    _update(fresh, deactivated, UserUpdate(status="Deactivated"))
    _update(fresh, reflagged, UserUpdate(user_fields=UserUpdateFields(client_id="renamed-1")))
    fresh.admin.call(lambda t: fresh.upstream.change_instance(t, UUID(moved), fresh.creds("fleet-eu")))

    step = fresh.audit().run(force=True)

    assert step.status == "finished"
    report = step.report
    assert report is not None
    assert report.counts == {"gone": 1, "deactivated": 1, "reflagged": 1, "moved": 1, "unstored": 1}
    assert report.samples["gone"] == [gone]
    assert report.samples["deactivated"] == [deactivated]
    assert report.samples["reflagged"] == [reflagged]
    assert report.samples["moved"] == [moved]
    assert report.samples["unstored"] == [orphan]
    assert report.anonymous_unstored == 2
    assert report.audited == 4
    record = fresh.store.get_user(gone)
    assert record is not None
    assert record.status is UserStatus.GONE
    assert (record.due_shard, record.tokens) == (None, None)  # out of the refresh index: no refresh, no token kept
    assert [e.device_token for e in fresh.publisher.events if isinstance(e, UserGone)] == [gone]
    still = fresh.store.get_user(ok)
    assert still is not None
    assert still.status is UserStatus.ACTIVE
    assert still.due_shard is not None
    last = fresh.audit().last_report()
    assert last is not None
    assert last["Counts"]["gone"] == 1

    # A change of flags after this audit read them is found by the next; a user gone is not judged again.
    _update(fresh, ok, UserUpdate(user_fields=UserUpdateFields(enable_tracking=False)))
    again = fresh.audit().run(force=True).report
    assert again is not None
    assert again.counts["gone"] == 0
    assert ok in again.samples["reflagged"]
    assert len(fresh.publisher.events) == 1


def test_a_flag_change_the_service_applied_is_not_reported_as_drift_by_the_next_audit(fresh: Env) -> None:
    own = _registered(fresh, "own-1")
    other = _registered(fresh, "other-1")
    assert fresh.audit().run(force=True).status == "finished"  # the reference: the flags as this audit read them
    lifecycle = LifecycleService(
        upstream=fresh.upstream,
        records=DynamoLifecycleRecords(fresh.store),
        credentials=fresh.credentials,
        device_token_key=StaticDeviceTokenKey(KEY),
        admin=fresh.admin,
        publisher=fresh.publisher,
        eraser=RecordingDeadLetterEraser(),
    )
    update = UserUpdate(user_fields=UserUpdateFields(enable_tracking=False, enable_real_time_location=True))
    change = LifecycleChange(Action.UPDATE, "own-1", "default", int(time.time() * 1000), update=update)
    assert lifecycle.apply(change).status == "applied"
    # The same kind of change made behind the service's back is drift.
    _update(fresh, other, UserUpdate(user_fields=UserUpdateFields(enable_tracking=False)))

    report = fresh.audit().run(force=True).report

    assert report is not None
    assert report.samples["reflagged"] == [other]
    assert own not in report.samples.get("reflagged", [])


def test_a_dry_run_changes_no_user(fresh: Env) -> None:
    gone = _registered(fresh, "gone-dry")
    fresh.admin.call(lambda t: fresh.upstream.delete_user(t, UUID(gone)))

    report = fresh.audit().run(force=True, dry_run=True).report

    assert report is not None
    assert report.counts["gone"] == 1
    record = fresh.store.get_user(gone)
    assert record is not None
    assert record.status is UserStatus.ACTIVE
    assert fresh.publisher.events == []


def test_the_audit_resumes_across_invocations_and_a_deletion_mid_walk_skips_nobody(fresh: Env) -> None:
    tokens = [_registered(fresh, f"resume-{n:02d}") for n in range(35)]
    gone = tokens[30]
    fresh.admin.call(lambda t: fresh.upstream.delete_user(t, UUID(gone)))
    audit = fresh.audit(page_size=10)

    first = audit.run(force=True, time_left=lambda: 0.0)  # one page, then a checkpoint
    assert first.status == "in_progress"
    assert first.report is not None
    assert first.report.pages == 1
    # Users already walked are deleted now: with page numbers, the next page would skip as many users.
    for token in tokens[:3]:
        fresh.admin.call(lambda t, tok=token: fresh.upstream.delete_user(t, UUID(tok)))
    steps = [first]
    while steps[-1].status != "finished":
        steps.append(fresh.audit(page_size=10).run(time_left=lambda: 0.0))
        assert len(steps) < 20

    report = steps[-1].report
    assert report is not None
    assert report.counts["gone"] == 1
    assert report.samples["gone"] == [gone]
    assert report.audited == 34
    assert report.invocations == len(steps)
    assert report.pages == 4  # 34 users at 10 a page: upstream calls bounded by pages
    assert fresh.audit().run().status == "not_due"  # the next run waits for the interval


def test_two_audits_never_run_at_once_and_a_dead_holder_is_taken_over_after_its_lease(fresh: Env) -> None:
    for n in range(12):
        _registered(fresh, f"lease-{n:02d}")
    audit = fresh.audit(page_size=10, lease=30)
    assert audit.run(force=True, time_left=lambda: 0.0).status == "in_progress"
    # Another invocation holds the lease (alive): a second audit does nothing.
    assert fresh.records.take_audit_lease("other", now=time.time(), ttl=30) is not None
    assert audit.run(time_left=lambda: 0.0).status == "busy"
    # That invocation died: once its lease lapsed (by this clock), the run resumes from its last checkpoint.
    later = fresh.audit(page_size=10, lease=30, ahead=60)
    step = later.run()
    assert step.status == "finished"
    assert step.report is not None
    assert step.report.audited == 12
    assert step.report.drift == 0


# ------------------------------------------------------------------------------- a gone user's lease at the sweep


def _refresher(env: Env, upstream: Any = None, store: Any = None) -> TokenRefresher:
    return TokenRefresher(
        upstream=upstream or env.upstream,
        store=store or env.store,
        credentials=env.credentials,
        publisher=env.publisher,
        margin_seconds=10**6,  # every user is due
        timing=LeaseTiming(lease_seconds=180, call_seconds=30, clock_skew_seconds=10, commit_seconds=10),
    )


def _gone_events(env: Env) -> list[str]:
    return [e.device_token for e in env.publisher.events if isinstance(e, UserGone)]


class _AuditDuringRefresh:
    """The upstream, with the audit run while a refresh call is in flight (the worker holds the user's lease)."""

    def __init__(self, env: Env, steps: list[Any]) -> None:
        self._env, self._steps = env, steps

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env.upstream, name)

    def refresh(self, access_token: str, refresh_token: str) -> Any:
        self._steps.append(self._env.audit().run(force=True, time_left=lambda: 61.0))
        return self._env.upstream.refresh(access_token, refresh_token)


def test_a_user_gone_whose_refresh_holds_its_lease_at_the_sweep_is_marked_by_the_same_run_once_it_ends(
    fresh: Env,
) -> None:
    gone = _registered(fresh, "gone-leased")
    kept = _registered(fresh, "kept-leased")
    fresh.admin.call(lambda t: fresh.upstream.delete_user(t, UUID(gone)))
    record = fresh.store.get_user(gone)
    assert record is not None
    steps: list[Any] = []

    # The refresh takes the lease; its call is in flight when the audit walks and sweeps. The mark must not step on
    # the holder. The call then fails (the user is gone: Refresh 400, Login 404) and the worker lets the lease go.
    _refresher(fresh, upstream=_AuditDuringRefresh(fresh, steps)).refresh_job(RefreshJob(gone, record.version))

    (during,) = steps
    assert during.status == "in_progress"  # waiting for the lease of a user it judged gone
    assert during.report.samples["gone"] == [gone]
    assert _gone_events(fresh) == []
    # The next wake-up (well within the interval) finishes the same run: the user is marked now, not a day later.
    step = fresh.audit().run(time_left=lambda: 61.0)
    assert step.status == "finished"
    assert step.report is not None
    assert step.report.run_id == during.report.run_id
    assert (step.report.counts["gone"], step.report.gone_not_marked) == (1, 0)
    marked = fresh.store.get_user(gone)
    assert marked is not None
    assert marked.status is UserStatus.GONE
    assert (marked.due_shard, marked.tokens, marked.lease_owner) == (None, None, None)
    assert _gone_events(fresh) == [gone]
    still = fresh.store.get_user(kept)
    assert still is not None
    assert still.status is UserStatus.ACTIVE


class _AuditBeforeCommit:
    """The token store, with the user deleted upstream and the audit run between a refresh's answer and its commit:
    the pair was rotated just before the deletion, and is committed (a new version) after the sweep."""

    def __init__(self, env: Env, steps: list[Any]) -> None:
        self._env, self._steps = env, steps

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env.store, name)

    def commit_tokens(self, **kwargs: Any) -> Any:
        env = self._env
        env.admin.call(lambda t: env.upstream.delete_user(t, UUID(kwargs["device_token"])))
        self._steps.append(env.audit().run(force=True, time_left=lambda: 61.0))
        return env.store.commit_tokens(**kwargs)


def test_a_user_gone_whose_refresh_commits_a_new_version_after_the_sweep_is_marked_at_that_version(
    fresh: Env,
) -> None:
    gone = _registered_with_tokens(fresh, "gone-committed")
    record = fresh.store.get_user(gone)
    assert record is not None
    steps: list[Any] = []

    outcome = _refresher(fresh, store=_AuditBeforeCommit(fresh, steps)).refresh_job(RefreshJob(gone, record.version))

    assert outcome.value == "refreshed"  # the holder's commit was not stepped on
    (during,) = steps
    assert during.status == "in_progress"
    committed = fresh.store.get_user(gone)
    assert committed is not None
    assert (committed.status, committed.version) == (UserStatus.ACTIVE, record.version + 1)
    step = fresh.audit().run(time_left=lambda: 61.0)
    assert step.status == "finished"
    assert step.report is not None
    assert step.report.gone_not_marked == 0
    marked = fresh.store.get_user(gone)
    assert marked is not None
    assert (marked.status, marked.version, marked.tokens, marked.due_shard) == (
        UserStatus.GONE,
        record.version + 2,
        None,
        None,
    )
    assert _gone_events(fresh) == [gone]


def test_without_a_time_limit_the_audit_waits_for_the_lease_and_gives_up_after_its_bound(fresh: Env) -> None:
    short = _registered(fresh, "gone-short-lease")
    long = _registered(fresh, "gone-long-lease")
    for token in (short, long):
        fresh.admin.call(lambda t, tok=token: fresh.upstream.delete_user(t, UUID(tok)))
    now = time.time()
    for token, ttl in ((short, 30), (long, 10_000)):  # holders that died: their leases lapse at their expiry
        record = fresh.store.get_user(token)
        assert record is not None
        assert fresh.store.acquire_lease(device_token=token, version=record.version, owner="w", now=now, ttl=ttl)
    offset = [5.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        offset[0] += seconds

    # The audit's clock moves only by its sleeps (real time spent in moto would count towards the bound).
    audit = fresh.audit(settle_seconds=300, clock=lambda: now + offset[0], sleep=sleep)

    step = audit.run(force=True)  # as the CLI runs it: no time limit

    assert step.status == "finished"
    assert step.report is not None
    assert step.report.counts["gone"] == 2
    assert step.report.gone_not_marked == 1  # the lease that outlives the bound is never stepped on
    assert 300 <= sum(slept) <= 400
    assert max(slept) <= 5  # read again every few seconds: a holder usually lets its lease go early
    marked, left = fresh.store.get_user(short), fresh.store.get_user(long)
    assert marked is not None
    assert left is not None
    assert (marked.status, left.status) == (UserStatus.GONE, UserStatus.ACTIVE)
    assert left.lease_owner == "w"
    assert _gone_events(fresh) == [short]


# ---------------------------------------------------------------------------------------------------------- CLI


def test_the_cli_judges_a_lost_chunk_and_runs_the_audit(
    stack: LocalStack,
    emulator: EmulatorHandle,
    dynamodb: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = _env(stack.outputs["TokensTableName"], dynamodb, emulator)
    request_id = _lose_a_chunk(env, quantity=100)
    secrets = boto3.client("secretsmanager", endpoint_url=stack.endpoint_url, region_name=stack.region)
    assert emulator.admin_account is not None
    arn = secrets.create_secret(Name=f"admin-{uuid.uuid4().hex[:8]}", SecretString=json.dumps(emulator.admin_account))[
        "ARN"
    ]
    stack_file = stack.save(tmp_path / "stack.json")

    def cli(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(["--local-stack", str(stack_file), *args, "--admin-credentials-secret-arn", arn, "--json"])
        return code, capsys.readouterr().out

    # Just lost: a call overlapping its window may still be storing users, so it waits (exit 1), nothing stored.
    code, out = cli("bulk", "adopt", request_id, "--dry-run")
    assert code == 1
    (chunk,) = json.loads(out)["Chunks"]
    assert (chunk["Chunk"], chunk["Outcome"]) == (0, "waiting")

    code, out = cli("bulk", "adopt", "no-such-bulk")
    assert code == 1

    code, out = cli("reconcile", "--dry-run", "--instance", "fleet-eu")
    report = json.loads(out)
    assert report["DryRun"] is True
    assert report["Instances"] == ["fleet-eu"]
    assert set(report["Counts"]) == {"gone", "deactivated", "reflagged", "moved", "unstored"}
    assert code == (1 if report["Drift"] else 0)
    code, out = cli("reconcile", "--report")
    assert code == (1 if report["Drift"] else 0)
    assert json.loads(out)["RunId"] == report["RunId"]


def test_the_operator_retries_a_lost_chunk_that_made_nobody_and_the_redriven_letter_makes_it_once(
    stack: LocalStack,
    emulator: EmulatorHandle,
    dynamodb: Any,
    sqs: Any,
    functions: Functions,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The README's troubleshooting for bulk_incomplete, as an operator follows it.
    env = _env(stack.outputs["TokensTableName"], dynamodb, emulator)
    request_id = _lost_before_the_call(env, dynamodb, 30)
    body = json.dumps({"Quantity": 30, "RequestId": request_id})
    queue_url = stack.outputs["RegistrationQueueUrl"]
    queue_fn = functions.get("RegistrationQueueFunction")
    queue_arn = stack.queue_arn("RegistrationQueue")
    assert queue_fn.invoke(sqs_event([body], queue_arn=queue_arn)) == {"batchItemFailures": []}
    secrets = boto3.client("secretsmanager", endpoint_url=stack.endpoint_url, region_name=stack.region)
    assert emulator.admin_account is not None
    arn = secrets.create_secret(Name=f"admin-{uuid.uuid4().hex[:8]}", SecretString=json.dumps(emulator.admin_account))[
        "ARN"
    ]
    stack_file = stack.save(tmp_path / "stack.json")

    def cli(*args: str) -> tuple[int, dict[str, Any]]:
        capsys.readouterr()
        code = main(["--local-stack", str(stack_file), *args, "--json"])
        return code, json.loads(capsys.readouterr().out)

    def adopt(*args: str) -> tuple[int, dict[str, Any]]:
        return cli("bulk", "adopt", request_id, *args, "--admin-credentials-secret-arn", arn)

    def letters() -> list[tuple[str, str]]:
        """The dead letters (reason, error detail), left in place."""
        code, listed = cli("dlq", "list", "--queue", "registration")
        assert code == 0
        (queue,) = listed["queues"]
        return [(group["reason"], example["Detail"]) for group in queue["groups"] for example in group["examples"]]

    def redrive_and_process() -> None:
        code, moved = cli(
            "dlq", "redrive", "--queue", "registration", "--reason", "bulk_incomplete", "--match", request_id
        )
        assert (code, moved["moved"]) == (0, 1)
        bodies = [m["Body"] for m in drain(sqs, queue_url)]
        assert queue_fn.invoke(sqs_event(bodies, queue_arn=queue_arn)) == {"batchItemFailures": []}

    ((reason, detail),) = letters()
    assert reason == "bulk_incomplete"
    assert "Chunk0" in detail

    # "Redriving the letter reports the same chunks again and makes nothing."
    redrive_and_process()
    assert [reason for reason, _ in letters()] == ["bulk_incomplete"]
    assert emulator.counters()["users_total"] == 0

    # Adoption finds no user of the chunk: it is reported with no candidates (exit 1).
    code, report = adopt()
    assert code == 1
    (chunk,) = report["Chunks"]
    assert (chunk["Outcome"], chunk["Candidates"], chunk["StoredUnderChunk"]) == ("needs_operator", [], 0)

    code, report = adopt("--retry-unmade", "--dry-run")
    assert code == 0
    assert [c["Outcome"] for c in report["Chunks"]] == ["would_reopen"]
    progress = env.records.get_bulk("default", request_id)
    assert progress is not None
    assert progress.chunks[0] is ChunkState.UNKNOWN

    code, report = adopt("--retry-unmade")
    assert code == 0
    assert [c["Outcome"] for c in report["Chunks"]] == ["reopened"]
    assert f"--match {request_id}" in report["Next"]

    redrive_and_process()
    assert letters() == []
    users = _bulk_users(dynamodb, stack.outputs["TokensTableName"], request_id)
    assert len(users) == 30 == len({u["DeviceToken"] for u in users}) == emulator.counters()["users_total"]
    final = env.records.get_bulk("default", request_id)
    assert final is not None
    assert (final.chunks[0], final.stored[0]) == (ChunkState.DONE, 30)
    code, report = adopt("--retry-unmade")
    assert (code, report["Chunks"]) == (0, [])  # nothing lost any more
