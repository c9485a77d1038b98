"""Token maintenance against in-memory fakes: leases, versions, dead tokens, budgets and the sweep."""

from __future__ import annotations

import random
import uuid

import pytest

from local.fakes import InMemoryRefreshJobQueue
from telematics_reg.errors import OutcomeUnknownError, RateLimitedError, RetryableUpstreamError, UnauthorizedError
from telematics_reg.outcomes import TokenRefreshFailed
from telematics_reg.refresh import RefreshJob, RefreshOutcome, Sweeper, TokenUnavailableError
from telematics_reg.store import StoreError, UserRecord, UserStatus

from .conftest import TIMING, World


def _register(world: World, client_id: str) -> UserRecord:
    result = world.intake.handle({"ClientId": client_id}, message_id=f"m-{client_id}", source="queue")
    record = world.store.get_user(str(result.device_token))
    assert record is not None
    return record


def _age(world: World, seconds: float) -> None:
    world.clock.now += seconds


def test_given_a_due_user_when_refreshed_then_a_new_pair_is_committed_with_the_next_version(world: World) -> None:
    before = _register(world, "r-1")
    _age(world, 3300)

    outcome = world.refresher.refresh_job(RefreshJob(before.device_token, before.version))

    after = world.store.get_user(before.device_token)
    assert outcome is RefreshOutcome.REFRESHED
    assert after is not None
    assert after.version == before.version + 1
    assert after.refresh_token != before.refresh_token
    assert after.lease_owner is None
    assert world.upstream.rejected_refresh_tokens == 0


def test_given_a_fresh_user_then_nothing_is_spent(world: World) -> None:
    record = _register(world, "r-2")

    assert world.refresher.refresh_job(RefreshJob(record.device_token, record.version)) is RefreshOutcome.FRESH
    assert world.upstream.calls["refresh"] == 0


def test_given_a_second_worker_with_the_same_job_then_it_does_not_spend_the_token_again(world: World) -> None:
    record = _register(world, "r-3")
    _age(world, 3300)
    job = RefreshJob(record.device_token, record.version)

    outcomes = [world.refresher.refresh_job(job), world.refresher.refresh_job(job)]

    assert outcomes == [RefreshOutcome.REFRESHED, RefreshOutcome.FRESH]
    assert world.upstream.calls["refresh"] == 1


def test_given_a_live_lease_then_another_refresher_backs_off(world: World) -> None:
    record = _register(world, "r-4")
    _age(world, 3300)
    world.store.acquire_lease(
        device_token=record.device_token, version=record.version, owner="w1", now=world.clock(), ttl=60
    )

    assert world.refresher.refresh_job(RefreshJob(record.device_token, record.version)) is RefreshOutcome.LEASE_CONFLICT
    assert world.upstream.calls["refresh"] == 0


def test_given_a_worker_died_mid_refresh_then_the_next_one_logs_in_rather_than_replay_a_maybe_spent_token(
    world: World,
) -> None:
    record = _register(world, "r-4b")
    _age(world, 3300)
    # A worker leased the user, had the upstream rotate the pair (spending the stored refresh token), and died
    # before its commit: its lease is left to lapse.
    assert world.store.acquire_lease(
        device_token=record.device_token, version=record.version, owner="dead", now=world.clock(), ttl=60
    )
    stored = world.store.get_user(record.device_token)
    assert stored is not None
    assert stored.tokens is not None
    world.upstream.refresh(stored.tokens.access_token, stored.tokens.refresh_token)
    _age(world, 61)

    outcome = world.refresher.refresh_job(RefreshJob(record.device_token, record.version))

    after = world.store.get_user(record.device_token)
    assert outcome is RefreshOutcome.LOGGED_IN
    assert world.upstream.rejected_refresh_tokens == 0  # the spent token was never presented again
    assert after is not None
    assert after.version == record.version + 1
    assert after.lease_owner is None


def test_given_the_commit_fails_after_the_upstream_rotated_then_it_is_retried_until_stored(world: World) -> None:
    record = _register(world, "r-5")
    _age(world, 3300)
    world.store.fail_next_commits = 3

    outcome = world.refresher.refresh_job(RefreshJob(record.device_token, record.version))

    stored = world.store.get_user(record.device_token)
    assert outcome is RefreshOutcome.REFRESHED
    assert stored is not None
    # The stored refresh token is the live one: the next refresh works.
    _age(world, 3300)
    assert world.refresher.refresh_job(RefreshJob(stored.device_token, stored.version)) is RefreshOutcome.REFRESHED
    assert world.upstream.rejected_refresh_tokens == 0


def test_given_the_commit_never_lands_then_it_raises_and_login_recovers_next_time(world: World) -> None:
    record = _register(world, "r-6")
    _age(world, 3300)
    world.store.fail_next_commits = 100

    with pytest.raises(StoreError):
        world.refresher.refresh_job(RefreshJob(record.device_token, record.version))
    world.store.fail_next_commits = 0
    _age(world, TIMING.lease_seconds + 1)  # the lease lapses

    outcome = world.refresher.refresh_job(RefreshJob(record.device_token, record.version))

    assert outcome is RefreshOutcome.LOGGED_IN
    assert world.upstream.calls["login"] == 1


def test_given_a_revoked_refresh_token_then_login_recovers_the_user(world: World) -> None:
    record = _register(world, "r-7")
    world.upstream.revoke(uuid.UUID(record.device_token))
    _age(world, 3300)

    outcome = world.refresher.refresh_job(RefreshJob(record.device_token, record.version))

    stored = world.store.get_user(record.device_token)
    assert outcome is RefreshOutcome.LOGGED_IN
    assert stored is not None
    assert stored.status is UserStatus.ACTIVE
    assert stored.due_shard is not None


def test_given_refresh_and_login_both_dead_then_marked_announced_and_out_of_the_index(world: World) -> None:
    record = _register(world, "r-8")
    world.upstream.revoke(uuid.UUID(record.device_token))
    world.upstream.disable_login(uuid.UUID(record.device_token))
    _age(world, 3300)

    outcome = world.refresher.refresh_job(RefreshJob(record.device_token, record.version))
    again = world.refresher.refresh_job(RefreshJob(record.device_token, record.version))

    stored = world.store.get_user(record.device_token)
    assert outcome is RefreshOutcome.NEEDS_RELOGIN
    assert again is RefreshOutcome.GONE  # no retry loop
    assert stored is not None
    assert stored.status is UserStatus.NEEDS_RELOGIN
    assert stored.due_shard is None
    (event,) = world.publisher.of_type(TokenRefreshFailed)
    assert event.detail()["DeviceToken"] == record.device_token
    assert "Token" not in str(event.detail()).replace("DeviceToken", "")
    assert world.upstream.calls["login"] == 1


def test_given_the_login_budget_is_spent_then_the_user_is_deferred_not_marked(world: World) -> None:
    records = [_register(world, f"b-{n}") for n in range(7)]
    for record in records:
        world.upstream.revoke(uuid.UUID(record.device_token))
    _age(world, 3300)

    outcomes = [world.refresher.refresh_job(RefreshJob(r.device_token, r.version)) for r in records]

    assert outcomes.count(RefreshOutcome.LOGGED_IN) == 5
    assert outcomes.count(RefreshOutcome.DEFERRED) == 2
    assert world.upstream.calls["login"] == 5


def test_given_a_429_then_the_user_is_deferred_with_retry_after_and_not_stampeded(world: World) -> None:
    record = _register(world, "r-9")
    _age(world, 3300)
    world.upstream.fail_next(RateLimitedError("slow down", status=429, retry_after=20), calls=["refresh"])

    outcome = world.refresher.refresh_job(RefreshJob(record.device_token, record.version))
    immediately = world.refresher.refresh_job(RefreshJob(record.device_token, record.version))

    stored = world.store.get_user(record.device_token)
    assert outcome is RefreshOutcome.DEFERRED
    assert immediately is RefreshOutcome.DEFERRED
    assert stored is not None
    assert stored.retry_after is not None
    assert stored.retry_after >= world.clock() + 20
    assert world.upstream.calls["refresh"] == 1


def test_given_a_5xx_then_the_user_is_deferred_but_retried_before_the_access_token_expires(world: World) -> None:
    # Plenty of time left: the usual 30-60 s back-off.
    calm = _register(world, "r-11")
    # 20 s left: the back-off shrinks to a quarter of that (5-10 s), so a sweep still finds the token alive.
    urgent = _register(world, "r-12")
    _age(world, 3300)
    world.upstream.fail_next(RetryableUpstreamError("busy", status=503, call="refresh"), calls=["refresh"])
    assert world.refresher.refresh_job(RefreshJob(calm.device_token, calm.version)) is RefreshOutcome.DEFERRED
    _age(world, 280)
    world.upstream.fail_next(RetryableUpstreamError("busy", status=503, call="refresh"), calls=["refresh"])
    assert world.refresher.refresh_job(RefreshJob(urgent.device_token, urgent.version)) is RefreshOutcome.DEFERRED

    calm_stored, urgent_stored = world.store.get_user(calm.device_token), world.store.get_user(urgent.device_token)
    assert calm_stored is not None
    assert calm_stored.retry_after is not None
    assert urgent_stored is not None
    assert urgent_stored.retry_after is not None
    assert urgent_stored.access_expires_at is not None
    assert 30 <= calm_stored.retry_after - (world.clock() - 280) <= 60
    assert world.clock() + 5 <= urgent_stored.retry_after <= world.clock() + 10 < urgent_stored.access_expires_at


def test_given_a_lost_refresh_answer_then_login_recovers(world: World) -> None:
    record = _register(world, "r-10")
    _age(world, 3300)
    world.upstream.fail_next(OutcomeUnknownError("dropped", call="refresh"), calls=["refresh"], after_commit=True)

    outcome = world.refresher.refresh_job(RefreshJob(record.device_token, record.version))

    assert outcome is RefreshOutcome.LOGGED_IN


def test_given_a_tokenless_user_then_the_read_path_logs_in_within_the_budget(world: World) -> None:
    result = world.intake.handle({"ClientId": "t-1", "CreateAccessToken": False}, message_id="m", source="queue")

    token = world.refresher.valid_token(instance="default", client_id="t-1")

    assert token.device_token == result.device_token
    assert token.access_token
    assert world.budget.spent == 1
    assert token.access_token not in repr(token)


def test_given_an_expiring_token_then_the_read_path_refreshes_first(world: World) -> None:
    record = _register(world, "r-11")
    _age(world, 3590)

    token = world.refresher.valid_token(device_token=record.device_token, min_validity_seconds=60)

    assert token.expires_at > world.clock() + 60
    assert world.upstream.calls["refresh"] == 1


def test_given_a_marked_user_then_the_read_path_says_so(world: World) -> None:
    record = _register(world, "r-12")
    world.upstream.revoke(uuid.UUID(record.device_token))
    world.upstream.disable_login(uuid.UUID(record.device_token))
    world.upstream.fail_next(UnauthorizedError("no", status=401), calls=["login"])
    _age(world, 3300)
    world.refresher.refresh_job(RefreshJob(record.device_token, record.version))

    with pytest.raises(TokenUnavailableError, match="needs relogin"):
        world.refresher.valid_token(device_token=record.device_token)


def test_sweep_queues_each_due_user_once_with_spread_and_skips_the_rest(world: World) -> None:
    due = [_register(world, f"d-{n}") for n in range(20)]
    _age(world, 3000)  # tokens (1 h) now expire within the 10 min margin
    fresh = [_register(world, f"f-{n}") for n in range(30)]
    queue = InMemoryRefreshJobQueue()
    sweeper = Sweeper(
        store=world.store,
        queue=queue,
        margin_seconds=600,
        spread_seconds=120,
        lease_seconds=60,
        page_size=7,
        clock=world.clock,
        rng=random.Random(1),
    )

    first = sweeper.sweep()
    second = sweeper.sweep()

    assert first.users_due == 20
    assert first.queued == 20
    assert first.items_read == 20  # the index holds only the due range: no other item is read
    assert second.already_queued == 20
    assert second.queued == 0
    assert {job.device_token for job, _ in queue.jobs} == {u.device_token for u in due}
    assert not {job.device_token for job, _ in queue.jobs} & {u.device_token for u in fresh}
    delays = [delay for _, delay in queue.jobs]
    assert max(delays) <= 120
    assert len(set(delays)) > 5


def test_given_a_user_marked_needs_relogin_when_relogin_is_requested_then_it_is_active_and_due_again(
    world: World,
) -> None:
    record = _register(world, "r-13")
    world.upstream.revoke(uuid.UUID(record.device_token))
    world.upstream.disable_login(uuid.UUID(record.device_token))
    _age(world, 3300)
    assert world.refresher.refresh_job(RefreshJob(record.device_token, record.version)) is RefreshOutcome.NEEDS_RELOGIN
    world.upstream.users[uuid.UUID(record.device_token)].login_disabled = False  # the cause is fixed

    outcome = world.refresher.relogin(instance="default", client_id="r-13")

    stored = world.store.get_user(record.device_token)
    assert outcome is RefreshOutcome.LOGGED_IN
    assert stored is not None
    assert stored.status is UserStatus.ACTIVE
    assert stored.due_shard is not None
    assert world.refresher.relogin(device_token=record.device_token) is RefreshOutcome.FRESH  # nothing to do now


def test_given_an_active_user_then_the_refresher_never_leases_it_as_a_relogin(world: World) -> None:
    record = _register(world, "r-14")

    assert world.refresher.relogin(device_token=record.device_token) is RefreshOutcome.FRESH
    assert world.upstream.calls["login"] == 0


def test_a_due_job_is_refreshed_without_reading_the_user_first_and_a_stale_job_still_finds_it(world: World) -> None:
    reads: list[str] = []
    get_user = world.store.get_user

    def counting_get_user(device_token: str) -> UserRecord | None:
        reads.append(device_token)
        return get_user(device_token)

    record = _register(world, "r-13")
    world.store.get_user = counting_get_user  # type: ignore[method-assign]
    _age(world, 3300)

    assert world.refresher.refresh_job(RefreshJob(record.device_token, record.version)) is RefreshOutcome.REFRESHED
    assert reads == []  # the lease carried the due checks: no read
    # A job queued at an older version (the user was refreshed since, and is due again): read, then refreshed.
    _age(world, 3300)
    assert world.refresher.refresh_job(RefreshJob(record.device_token, record.version)) is RefreshOutcome.REFRESHED
    assert reads == [record.device_token]
    # The same stale job once more: the user is fresh now, so nothing is spent.
    assert world.refresher.refresh_job(RefreshJob(record.device_token, record.version)) is RefreshOutcome.FRESH
    assert world.upstream.calls["refresh"] == 2
