"""User lifecycle on fakes: order per user, waiting for registrations, final and complete deletions, moves, bad
input, and the fleet's one admin session (every interleaving the issue names)."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from local.fake_lifecycle import (
    InMemoryAdminSessionStore,
    StaticAdminCredentials,
)
from local.fakes import InMemoryLoginBudget, InMemoryRefreshJobQueue
from telematics_reg.errors import OutcomeUnknownError, TransientUpstreamError, UnauthorizedError
from telematics_reg.lifecycle.admin import AdminSessionUnavailableError, FleetAdminSession
from telematics_reg.lifecycle.changes import FUTURE_TOLERANCE_MS, Action
from telematics_reg.lifecycle.erasure import ErasureIncompleteError
from telematics_reg.lifecycle.events import LifecycleFailed, UserDeleted, UserMoved, UserUpdated
from telematics_reg.lifecycle.service import UserBusyError, UserNotRegisteredError
from telematics_reg.models import CreateUserRequest
from telematics_reg.occurred import iso_ms
from telematics_reg.outcomes import RegistrationFailed
from telematics_reg.refresh import RefreshOutcome, Sweeper
from telematics_reg.registration import device_token_for, successor_device_token
from telematics_reg.store import ConditionFailedError, Tokens, UserStatus

from .conftest import DEVICE_TOKEN_KEY, World
from .worlds import ADMIN, Lifecycle, new_lifecycle


@pytest.fixture
def lc(world: World) -> Lifecycle:
    return new_lifecycle(world)


def upstream_user(lc: Lifecycle, client_id: str) -> list[object]:
    return [u for u in lc.world.upstream.users.values() if u.client_id == client_id]


def failures(lc: Lifecycle) -> list[LifecycleFailed]:
    return [e for e in lc.world.publisher.events if isinstance(e, LifecycleFailed)]


# ------------------------------------------------------------------------------------------ order per user


def test_an_update_changes_only_what_it_gives(lc: Lifecycle) -> None:
    assert lc.register("c-1") == "registered"
    assert (
        lc.send("UserUpdated", {"clientId": "c-1", "lastName": "Lovelace", "userFields": {"enableTracking": False}})
        == "applied"
    )
    (user,) = upstream_user(lc, "c-1")
    assert user.profile["FirstName"] == "Ada"
    assert user.profile["LastName"] == "Lovelace"
    assert user.profile["UserFields"]["EnableTracking"] is False  # type: ignore[attr-defined]
    (event,) = [e for e in lc.world.publisher.events if isinstance(e, UserUpdated)]
    assert event.fields == ["LastName", "UserFields"]
    assert "Lovelace" not in event.model_dump_json()


def test_a_change_older_than_one_applied_is_dropped_and_says_why(lc: Lifecycle) -> None:
    lc.register("c-1")
    t = lc.ms()
    assert lc.send("UserUpdated", {"ClientId": "c-1", "City": "Paris", "OccurredAt": iso_ms(t + 2000)}) == "applied"
    calls = lc.world.upstream.calls["update_user"]
    assert lc.send("UserUpdated", {"ClientId": "c-1", "City": "Rome", "OccurredAt": iso_ms(t + 1000)}) == "dropped"
    assert lc.world.upstream.calls["update_user"] == calls  # never sent upstream
    (user,) = upstream_user(lc, "c-1")
    assert user.profile["City"] == "Paris"  # type: ignore[attr-defined]
    (dropped,) = failures(lc)
    assert dropped.reason == "stale"
    assert dropped.applied_at == t + 2000
    assert dropped.dead_lettered is False


def test_a_duplicate_delivery_is_not_applied_twice(lc: Lifecycle) -> None:
    lc.register("c-1")
    detail = {"ClientId": "c-1", "City": "Paris", "OccurredAt": iso_ms(lc.ms())}
    assert lc.send("UserUpdated", detail) == "applied"
    assert lc.send("UserUpdated", detail) == "dropped"
    assert lc.world.upstream.calls["update_user"] == 1
    assert failures(lc)[0].reason == "duplicate"


def test_a_change_waits_while_another_change_or_a_refresh_holds_the_user(lc: Lifecycle) -> None:
    lc.register("c-1")
    user = lc.world.store.find_by_client("default", "c-1")
    assert user is not None
    lc.world.store.users[user.device_token] = replace(
        user, lease_owner="refresh-1", lease_expires_at=int(lc.world.clock()) + 60
    )
    with pytest.raises(UserBusyError):
        lc.send("UserDeactivated", {"ClientId": "c-1"})
    assert lc.world.upstream.calls["update_user"] == 0
    lc.world.clock.now += 61  # the refresh's lease lapsed (its holder died mid-refresh)
    assert lc.send("UserDeactivated", {"ClientId": "c-1"}) == "applied"
    stored = lc.world.store.get_user(user.device_token)
    assert stored is not None
    assert stored.deactivated
    assert stored.lease_owner is None
    # The lapsed refresh may have spent the refresh token: the next refresh logs in instead of replaying it.
    assert stored.refresh_token_dead


@pytest.mark.parametrize("upstream_fails", [False, True], ids=["applied", "failed_and_released"])
def test_a_refresh_job_that_met_a_change_s_lease_is_queued_again_by_the_next_sweep(
    lc: Lifecycle, upstream_fails: bool
) -> None:
    # Sweep queues the user (QueuedUntil) -> the change leases it -> the job meets that lease (LEASE_CONFLICT, the
    # job is consumed, nobody refreshes) -> the change ends. The next sweep must queue the user again: QueuedUntil
    # was kept only while a job was on its way, and none is any more.
    lc.register("c-1")
    user = lc.world.store.find_by_client("default", "c-1")
    assert user is not None
    sweeper = Sweeper(
        store=lc.world.store,
        queue=(queue := InMemoryRefreshJobQueue()),
        margin_seconds=600,
        spread_seconds=0,
        lease_seconds=180,
        clock=lc.world.clock,
    )
    lc.world.clock.now += 3100  # due: the access token expires within the margin
    assert sweeper.sweep().queued == 1
    ((job, _delay),) = queue.jobs
    seen: list[RefreshOutcome] = []
    real_update = lc.world.upstream.update_user

    def update_while_the_job_runs(admin_token: object, device_token: uuid.UUID, changes: object) -> None:
        seen.append(lc.world.refresher.refresh_job(job))  # the queued job arrives while the change holds the user
        if upstream_fails:
            raise TransientUpstreamError("down", status=503)
        real_update(admin_token, device_token, changes)  # type: ignore[arg-type]

    lc.world.upstream.update_user = update_while_the_job_runs  # type: ignore[method-assign]
    lc.admin.call(lambda token: None)  # the session exists
    if upstream_fails:
        with pytest.raises(TransientUpstreamError):
            lc.send("UserDeactivated", {"ClientId": "c-1"})
    else:
        assert lc.send("UserDeactivated", {"ClientId": "c-1"}) == "applied"
    assert seen == [RefreshOutcome.LEASE_CONFLICT]

    lc.world.clock.now += 60  # the next scheduled sweep
    assert sweeper.sweep().queued == 1
    assert lc.world.refresher.refresh_job(queue.jobs[-1][0]) is RefreshOutcome.REFRESHED
    stored = lc.world.store.get_user(user.device_token)
    assert stored is not None
    assert stored.version == user.version + 1


def test_a_failed_upstream_call_releases_the_lease_and_is_retried(lc: Lifecycle) -> None:

    lc.register("c-1")
    lc.admin.call(lambda token: None)  # the session exists
    lc.world.upstream.fail_next(TransientUpstreamError("down", status=503), times=1, calls=["update_user"])
    detail = {"ClientId": "c-1", "City": "Paris", "OccurredAt": iso_ms(lc.ms())}
    with pytest.raises(TransientUpstreamError):
        lc.send("UserUpdated", detail)
    assert lc.send("UserUpdated", detail) == "applied"


# ------------------------------------------------------------------------------------------ not yet registered


def test_a_change_for_a_user_not_yet_registered_waits_then_dead_letters_unknown_user(lc: Lifecycle) -> None:
    sent = lc.ms()
    with pytest.raises(UserNotRegisteredError):
        lc.send("UserUpdated", {"ClientId": "c-9", "City": "Paris"}, sent_ms=sent)
    lc.world.clock.now += 901
    assert lc.send("UserUpdated", {"ClientId": "c-9", "City": "Paris"}, sent_ms=sent) == "dead_lettered"
    (letter,) = lc.dead_letters.letters
    assert letter.reason == "unknown_user"
    assert lc.world.upstream.calls["update_user"] == 0


def test_a_change_that_waited_is_applied_once_the_user_is_registered(lc: Lifecycle) -> None:
    sent = lc.ms()
    with pytest.raises(UserNotRegisteredError):
        lc.send("UserMoved", {"ClientId": "c-9", "ToInstance": "eu"}, sent_ms=sent)
    lc.register("c-9")
    lc.world.clock.now += 5
    assert lc.send("UserMoved", {"ClientId": "c-9", "ToInstance": "eu"}, sent_ms=sent) == "applied"


def test_a_registration_in_flight_makes_changes_wait(lc: Lifecycle) -> None:
    lc.world.store.claim_registration(
        device_token=str(uuid.uuid4()),
        instance="default",
        instance_id=str(lc.world.creds.instance_id),
        client_id="c-1",
        owner="o",
        now=lc.world.clock(),
        ttl=120,
    )
    with pytest.raises(UserNotRegisteredError):
        lc.send("UserReactivated", {"ClientId": "c-1"})


# ------------------------------------------------------------------------------------------------- deletion


def assert_erased(lc: Lifecycle, client_id: str) -> None:
    assert upstream_user(lc, client_id) == []
    for record in lc.world.store.find_all_by_client("default", client_id):
        assert record.status is UserStatus.DELETED
        assert record.tokens is None
        assert record.access_token is None
        assert record.refresh_token is None
        assert record.due_shard is None


def test_deletion_is_complete_upstream_here_and_in_dead_letters(lc: Lifecycle) -> None:
    lc.register("c-1")
    lc.eraser.bodies += [json.dumps({"ClientId": "c-1", "FirstName": "Ada"}), json.dumps({"ClientId": "c-2"})]
    assert lc.send("UserDeleted", {"ClientId": "c-1"}) == "applied"
    assert_erased(lc, "c-1")
    (tombstone,) = lc.world.store.find_all_by_client("default", "c-1")
    assert tombstone.deleted_at is not None
    assert lc.records.expires_at[tombstone.device_token] == int(lc.world.clock()) + 90 * 86400
    assert lc.eraser.bodies == [json.dumps({"ClientId": "c-2"})]
    (event,) = [e for e in lc.world.publisher.events if isinstance(e, UserDeleted)]
    assert event.device_token == tombstone.device_token
    # The sweeper never sees it: no DueShard, so no query of the refresh index returns it.
    assert all(
        not page.users
        for shard in range(4)
        for page in [lc.world.store.query_due(shard=f"{shard:03d}", horizon=2**40, limit=100)]
    )


def test_nothing_from_before_the_deletion_recreates_the_user_or_calls_the_upstream(lc: Lifecycle) -> None:
    t0 = lc.ms()
    lc.register("c-1", occurred_ms=t0)
    lc.world.clock.now += 1
    lc.send("UserDeleted", {"ClientId": "c-1"})
    creates, updates = lc.world.upstream.calls["create"], lc.world.upstream.calls["update_user"]
    lc.world.clock.now += 10
    assert lc.register("c-1", occurred_ms=t0) == "dropped"  # a redelivered registration
    assert lc.send("UserUpdated", {"ClientId": "c-1", "City": "Rome", "OccurredAt": iso_ms(t0 + 500)}) == "dropped"
    assert lc.send("UserDeleted", {"ClientId": "c-1", "OccurredAt": iso_ms(t0 + 1000)}) == "dropped"
    assert (lc.world.upstream.calls["create"], lc.world.upstream.calls["update_user"]) == (creates, updates)
    assert_erased(lc, "c-1")
    reasons = [e.reason for e in lc.world.publisher.events if isinstance(e, RegistrationFailed | LifecycleFailed)]
    assert reasons == ["user_deleted", "user_deleted", "duplicate"]


def test_a_registration_after_the_deletion_is_a_new_user_with_a_new_device_token(lc: Lifecycle) -> None:
    lc.register("c-1")
    old = lc.world.store.find_by_client("default", "c-1")
    assert old is not None
    lc.world.clock.now += 1
    lc.send("UserDeleted", {"ClientId": "c-1"})
    lc.world.clock.now += 1
    assert lc.register("c-1") == "registered"
    new = lc.world.store.find_by_client("default", "c-1")
    assert new is not None
    assert new.status is UserStatus.ACTIVE
    assert new.device_token == successor_device_token(old.device_token, key=DEVICE_TOKEN_KEY.get()) != old.device_token
    (user,) = upstream_user(lc, "c-1")
    assert str(user.device_token) == new.device_token  # type: ignore[attr-defined]
    # A change after the new registration reaches the new user; one from before the deletion does not.
    lc.world.clock.now += 1
    assert lc.send("UserDeactivated", {"ClientId": "c-1"}) == "applied"
    assert lc.send("UserDeleted", {"ClientId": "c-1", "OccurredAt": iso_ms(lc.ms(-2.5))}) == "dropped"
    assert upstream_user(lc, "c-1")


def test_a_deletion_racing_the_registration_ends_with_nothing_upstream_and_nothing_stored(lc: Lifecycle) -> None:
    # The deletion is handled first; the registration (which occurred before it) arrives after.
    t0 = lc.ms()
    lc.world.clock.now += 1
    assert lc.send("UserDeleted", {"ClientId": "c-1"}) == "applied"
    assert lc.register("c-1", occurred_ms=t0) == "dropped"
    assert lc.world.upstream.calls["create"] == 0
    assert_erased(lc, "c-1")


def test_a_deletion_waits_for_a_registration_in_flight_then_deletes_it(lc: Lifecycle) -> None:

    dt = device_token_for(str(lc.world.creds.instance_id), "c-1", key=DEVICE_TOKEN_KEY.get())
    lc.world.store.claim_registration(
        device_token=dt,
        instance="default",
        instance_id=str(lc.world.creds.instance_id),
        client_id="c-1",
        owner="o",
        now=lc.world.clock(),
        ttl=120,
    )
    with pytest.raises(UserBusyError):
        lc.send("UserDeleted", {"ClientId": "c-1"})
    # The registration's holder was cut off after its Create reached the upstream; its claim lapses.

    lc.world.upstream.create(
        lc.world.creds, CreateUserRequest.model_validate({"CustomToken": dt, "UserFields": {"ClientId": "c-1"}})
    )
    lc.world.clock.now += 121
    assert lc.send("UserDeleted", {"ClientId": "c-1"}) == "applied"
    assert_erased(lc, "c-1")


def test_a_refresh_that_leased_before_the_deletion_cannot_store_tokens_after_it(lc: Lifecycle) -> None:
    lc.register("c-1")
    user = lc.world.store.find_by_client("default", "c-1")
    assert user is not None
    leased = lc.world.store.acquire_lease(
        device_token=user.device_token, version=user.version, owner="r", now=lc.world.clock(), ttl=60
    )
    assert leased is not None
    lc.send("UserDeleted", {"ClientId": "c-1"})

    with pytest.raises(ConditionFailedError):
        lc.world.store.commit_tokens(
            device_token=user.device_token,
            expected_version=leased.version,
            owner="r",
            tokens=Tokens("a", "r", 1),
            now=lc.world.clock(),
        )
    assert_erased(lc, "c-1")


# ---------------------------------------------------------------------------------------------------- moves


def test_a_move_keeps_the_device_token_and_later_logins_use_the_new_instance(lc: Lifecycle) -> None:
    lc.register("c-1")
    before = lc.world.store.find_by_client("default", "c-1")
    assert before is not None
    assert lc.send("UserMoved", {"ClientId": "c-1", "ToInstance": "eu"}) == "applied"
    after = lc.world.store.get_user(before.device_token)
    assert after is not None
    assert after.instance == "eu"
    assert after.instance_id == str(lc.eu.instance_id)
    assert after.version == before.version + 1
    (user,) = upstream_user(lc, "c-1")
    assert user.instance_id == lc.eu.instance_id  # type: ignore[attr-defined]
    (event,) = [e for e in lc.world.publisher.events if isinstance(e, UserMoved)]
    assert (event.from_instance, event.instance) == ("default", "eu")
    # A Login now takes the new instance's credentials (the old ones would be refused).
    logins = lc.world.upstream.calls["login"]
    dead = replace(after, refresh_token_dead=True)
    lc.world.store.users[before.device_token] = dead
    outcome = lc.world.refresher.refresh_user(dead, force=True)
    assert outcome.value == "logged_in", outcome
    assert lc.world.upstream.calls["login"] == logins + 1


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("detail_type", "detail", "reason"),
    [
        ("UserUpdated", {"City": "Paris"}, "invalid_fields"),
        ("UserUpdated", {"ClientId": "c-1", "Gender": "Robot"}, "invalid_fields"),
        ("UserUpdated", {"ClientId": "c-1"}, "invalid_fields"),
        ("UserMoved", {"ClientId": "c-1", "ToInstance": "nowhere"}, "unknown_instance"),
        ("UserDeleted", {"ClientId": "c-1", "OccurredAt": "yesterday"}, "invalid_fields"),
        # Past the calendar once in UTC: refused, not an OverflowError retried until SQS moved it without a reason.
        ("UserUpdated", {"ClientId": "c-1", "City": "x", "OccurredAt": "9999-12-31T23:59:59-02:00"}, "invalid_fields"),
        ("UserDeleted", {"ClientId": "c-1", "OccurredAt": "9999-12-31T23:59:59.999Z"}, "invalid_fields"),
    ],
)
def test_bad_input_dead_letters_with_its_reason_and_never_reaches_the_upstream(
    lc: Lifecycle, detail_type: str, detail: dict[str, object], reason: str
) -> None:
    lc.register("c-1")
    before = sum(lc.world.upstream.calls[c] for c in ("update_user", "delete_user", "change_instance", "admin_login"))
    assert lc.send(detail_type, detail) == "dead_lettered"
    assert lc.dead_letters.letters[0].reason == reason
    after = sum(lc.world.upstream.calls[c] for c in ("update_user", "delete_user", "change_instance", "admin_login"))
    assert after == before
    (failed,) = failures(lc)
    assert failed.dead_lettered
    assert failed.reason == reason


def test_a_change_from_the_future_is_refused_and_does_not_shut_out_the_changes_that_follow(lc: Lifecycle) -> None:
    lc.register("c-1")
    ahead = lc.ms(FUTURE_TOLERANCE_MS / 1000 + 60)
    assert lc.send("UserDeactivated", {"ClientId": "c-1", "OccurredAt": iso_ms(ahead)}) == "dead_lettered"
    (letter,) = lc.dead_letters.letters
    assert (letter.reason, letter.errors[0].key) == ("invalid_fields", "OccurredAt")
    # Applied, it would have become the user's order marker: every change until then dropped as stale.
    assert lc.send("UserUpdated", {"ClientId": "c-1", "City": "Paris", "OccurredAt": iso_ms(lc.ms(1))}) == "applied"
    # Within the tolerance (a producer's clock a little ahead) it is applied.
    assert lc.send("UserDeactivated", {"ClientId": "c-1", "OccurredAt": iso_ms(lc.ms(120))}) == "applied"
    # An event whose own time is that far ahead (PutEvents lets the sender set it), without OccurredAt: the same.
    event = {"detail-type": "UserReactivated", "time": "2100-01-01T00:00:00Z", "detail": {"ClientId": "c-1"}}
    assert lc.intake.handle(json.dumps(event), message_id="far").status == "dead_lettered"
    assert lc.dead_letters.letters[-1].errors[0].key == "time"
    assert lc.world.upstream.calls["update_user"] == 2


def test_a_time_before_the_calendar_once_in_utc_is_a_time_not_a_crash(lc: Lifecycle) -> None:
    lc.register("c-1")
    assert lc.send("UserUpdated", {"ClientId": "c-1", "City": "Rome", "OccurredAt": iso_ms(lc.ms())}) == "applied"
    # 0001-01-01T00:00:00+02:00 is in year 0 in UTC: it raised OverflowError (retried, then moved without a reason).
    old = {"ClientId": "c-1", "City": "Oslo", "OccurredAt": "0001-01-01T00:00:00+02:00"}
    assert lc.send("UserUpdated", old) == "dropped"
    assert failures(lc)[0].reason == "stale"


def test_an_operator_message_with_an_unknown_action_dead_letters(lc: Lifecycle) -> None:
    status = lc.intake.handle(json.dumps({"Action": "Explode", "ClientId": "c-1"}), message_id="m")
    assert status.status == "dead_lettered"
    assert lc.dead_letters.letters[0].reason == "unknown_action"


def test_operator_messages_with_an_action_are_applied(lc: Lifecycle) -> None:
    lc.register("c-1")
    result = lc.intake.handle(
        json.dumps({"action": "deactivate", "clientId": "c-1"}), message_id="m", first_sent_ms=lc.ms()
    )
    assert result.status == "applied"
    assert upstream_user(lc, "c-1")[0].status == "Deactivated"  # type: ignore[attr-defined]
    assert Action.parse("MOVE") is Action.MOVE


# ----------------------------------------------------------------------------------------- admin session


def test_one_admin_login_for_the_fleet_cold_containers_reuse_the_stored_session(lc: Lifecycle) -> None:
    for n in range(3):
        lc.register(f"c-{n}")
    # Three "containers": each a FleetAdminSession of its own over the one stored session.
    for n in range(3):
        container = FleetAdminSession(
            upstream=lc.world.upstream,
            store=lc.sessions,
            credentials=StaticAdminCredentials(ADMIN),
            clock=lc.world.clock,
            sleep=lc.world.clock.sleep,
        )
        container.call(lambda token, n=n: lc.world.upstream.find_users(token, client_id=f"c-{n}"))
    assert lc.world.upstream.calls["admin_login"] == 1


def test_an_expired_admin_jwt_is_refreshed_not_logged_in_and_the_rotation_is_stored_first(lc: Lifecycle) -> None:
    lc.admin.call(lambda token: None)
    first = lc.sessions.item
    assert first is not None
    lc.world.clock.now += 86_400
    lc.admin.call(lambda token: None)
    second = lc.sessions.item
    assert second is not None
    assert second.version == first.version + 1
    assert second.refresh_token != first.refresh_token
    assert (lc.world.upstream.calls["admin_login"], lc.world.upstream.calls["admin_refresh"]) == (1, 1)


def test_a_401_renews_the_admin_session_once_and_repeats_the_call(lc: Lifecycle) -> None:
    lc.admin.call(lambda token: None)
    seen: list[str] = []

    def call(token: object) -> str:
        seen.append(str(getattr(token, "get_secret_value", lambda: token)()))
        if len(seen) == 1:
            raise UnauthorizedError("expired", status=401)
        return "ok"

    assert lc.admin.call(call) == "ok"
    assert len(seen) == 2
    assert seen[0] != seen[1]
    assert lc.world.upstream.calls["admin_refresh"] == 1
    assert lc.world.upstream.calls["admin_login"] == 1


def test_a_lost_admin_refresh_answer_goes_to_login_within_the_budget(lc: Lifecycle) -> None:
    lc.admin.call(lambda token: None)
    lc.world.clock.now += 86_400
    lc.world.upstream.fail_next(OutcomeUnknownError("lost", status=None), times=1, calls=["admin_refresh"])
    lc.admin.call(lambda token: None)  # recovered by Login at once (tests/unit/test_admin_session.py: the rest)
    assert lc.sessions.item is not None
    assert not lc.sessions.item.refresh_token_dead
    assert lc.world.upstream.calls["admin_login"] == 2
    assert lc.world.upstream.calls["admin_refresh"] == 1  # the maybe-spent token was never presented again


def test_no_admin_login_beyond_the_fleet_budget(lc: Lifecycle) -> None:

    lc.world.upstream.login_budget = InMemoryLoginBudget(per_minute=0)
    session = FleetAdminSession(
        upstream=lc.world.upstream,
        store=InMemoryAdminSessionStore(),
        credentials=StaticAdminCredentials(ADMIN),
        clock=lc.world.clock,
        sleep=lc.world.clock.sleep,
        wait_seconds=0,
    )
    with pytest.raises(AdminSessionUnavailableError):
        session.call(lambda token: None)
    assert lc.world.upstream.calls["admin_login"] == 0


# ---------------------------------------------------------------------------------------------- the samples

EVENTS = Path(__file__).resolve().parents[2] / "events"


def test_the_lifecycle_samples_do_what_their_names_say(lc: Lifecycle) -> None:
    for client_id in ("customer-1001", "customer-1002"):
        lc.register(client_id, occurred_ms=0)
    outcomes: dict[str, list[str]] = {}
    for name in (
        "lifecycle-updated.json",
        "lifecycle-stale.json",
        "lifecycle-deactivated.json",
        "lifecycle-reactivated.json",
        "lifecycle-moved.json",
        "lifecycle-deleted.json",
        "lifecycle-operator-actions.json",
        "lifecycle-poison.json",
    ):
        records = json.loads((EVENTS / name).read_text())["Records"]
        outcomes[name] = [
            lc.intake.handle(
                r["body"], message_id=r["messageId"], first_sent_ms=int(r["attributes"]["SentTimestamp"])
            ).status
            for r in records
        ]
    assert outcomes == {
        "lifecycle-updated.json": ["applied", "applied"],
        "lifecycle-stale.json": ["dropped"],
        "lifecycle-deactivated.json": ["applied"],
        "lifecycle-reactivated.json": ["applied"],
        "lifecycle-moved.json": ["applied"],
        "lifecycle-deleted.json": ["applied"],
        "lifecycle-operator-actions.json": ["applied", "applied", "applied", "applied"],
        "lifecycle-poison.json": ["dead_lettered"] * 5,
    }
    assert_erased_everywhere = [r.status for r in lc.world.store.find_all_by_client("fleet-eu", "customer-1001")]
    assert assert_erased_everywhere == [UserStatus.DELETED]


def test_a_deletion_whose_erasure_was_retried_is_still_announced(lc: Lifecycle) -> None:
    """The soak's interleaving: the user is deleted upstream and here, then the erasure of its dead letters finds a
    letter in flight (an operator listing the DLQ) and the message is retried. The retry finds the deletion final
    (a duplicate): it finishes the erasure and announces the deletion, marked Duplicate, so it is announced."""
    lc.register("c-1")
    lc.eraser.bodies.append(json.dumps({"ClientId": "c-1", "FirstName": "Ada"}))
    real_erase = lc.eraser.erase
    calls = {"n": 0}

    def erase_in_flight_once(instance: str, client_id: str) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ErasureIncompleteError("0 dead letters removed; some were in flight: retry")
        return real_erase(instance, client_id)

    lc.eraser.erase = erase_in_flight_once  # type: ignore[method-assign]
    body = {"ClientId": "c-1", "OccurredAt": iso_ms(lc.ms())}
    with pytest.raises(ErasureIncompleteError):
        lc.send("UserDeleted", body)
    assert not [e for e in lc.world.publisher.events if isinstance(e, UserDeleted)]

    assert lc.send("UserDeleted", body) == "dropped"  # the redelivery: already final

    (event,) = [e for e in lc.world.publisher.events if isinstance(e, UserDeleted)]
    assert event.duplicate is True
    assert event.client_id == "c-1"
    assert_erased(lc, "c-1")
    assert lc.eraser.bodies == []


def test_an_update_whose_user_is_deleted_while_it_waits_on_the_upstream_is_dropped_not_dead_lettered(
    lc: Lifecycle,
) -> None:
    """Found by the soak: the update holds its lease and calls the upstream; a deletion (final whatever lease a
    change holds) deletes the user upstream and here and erases its dead letters; the update's call answers "no
    such user". The update is dropped as ``user_deleted``: a dead letter would bring its profile back."""
    lc.register("c-1")
    real_update = lc.world.upstream.update_user

    def update_racing_a_deletion(*args: object, **kwargs: object) -> object:
        assert lc.send("UserDeleted", {"ClientId": "c-1"}) == "applied"
        return real_update(*args, **kwargs)  # type: ignore[arg-type]

    lc.world.upstream.update_user = update_racing_a_deletion  # type: ignore[method-assign]

    assert lc.send("UserUpdated", {"ClientId": "c-1", "City": "Rome"}) == "dropped"

    assert lc.dead_letters.letters == []
    assert_erased(lc, "c-1")
    (failed,) = failures(lc)
    assert failed.reason == "user_deleted"
    assert not failed.dead_lettered
