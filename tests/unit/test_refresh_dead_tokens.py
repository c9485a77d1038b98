"""Found by the soak (bench/soak.py): a refresh token known to be dead, or possibly spent by a call whose answer was
lost, must never be presented to the upstream again when the Login that should replace it has to wait.

Before the fix, every retry of such a user spent one more refresh with the same token: each was rejected (the
emulator counted a revoked token rejected twice, or a spent token presented again), and to an upstream that treats
a replayed refresh token as theft, it looks like one.
"""

from __future__ import annotations

import contextlib
import uuid

from telematics_reg.errors import LoginDeferredError, OutcomeUnknownError, TransientUpstreamError
from telematics_reg.refresh import RefreshJob, RefreshOutcome
from telematics_reg.store import UserRecord, UserStatus

from .conftest import World


def _register(world: World, client_id: str) -> UserRecord:
    result = world.intake.handle({"ClientId": client_id}, message_id=f"m-{client_id}", source="queue")
    record = world.store.get_user(str(result.device_token))
    assert record is not None
    return record


def _job(world: World, device_token: str) -> RefreshOutcome:
    current = world.store.get_user(device_token)
    assert current is not None
    return world.refresher.refresh_job(RefreshJob(current.device_token, current.version))


def _past_retry_after(world: World, device_token: str) -> None:
    current = world.store.get_user(device_token)
    assert current is not None
    assert current.retry_after is not None
    world.clock.now = current.retry_after + 1.0


def test_given_a_revoked_token_and_no_login_budget_then_the_retry_logs_in_without_presenting_it_again(
    world: World,
) -> None:
    record = _register(world, "dead-1")
    world.upstream.revoke(uuid.UUID(record.device_token))
    world.clock.now += 3300
    with contextlib.suppress(LoginDeferredError):
        while True:
            world.budget.acquire()  # this minute's Login budget is spent by others

    assert _job(world, record.device_token) is RefreshOutcome.DEFERRED
    assert world.upstream.rejected_refresh_tokens == 1
    marked = world.store.get_user(record.device_token)
    assert marked is not None
    assert marked.refresh_token_dead

    _past_retry_after(world, record.device_token)
    outcome = _job(world, record.device_token)

    stored = world.store.get_user(record.device_token)
    assert outcome is RefreshOutcome.LOGGED_IN
    assert world.upstream.calls["refresh"] == 1  # the revoked token was presented once, not on every retry
    assert world.upstream.rejected_refresh_tokens == 1
    assert stored is not None
    assert stored.status is UserStatus.ACTIVE
    assert not stored.refresh_token_dead  # the committed pair is live: back to plain refreshes
    world.clock.now = (stored.access_expires_at or 0) - 60
    assert _job(world, record.device_token) is RefreshOutcome.REFRESHED
    assert world.upstream.rejected_refresh_tokens == 1


def test_given_a_lost_refresh_answer_and_a_failed_login_then_the_spent_token_is_not_presented_again(
    world: World,
) -> None:
    record = _register(world, "dead-2")
    world.clock.now += 3300
    # The upstream rotates and the answer is lost (the stored token is now spent); the Login that should recover
    # the user is not processed (503 every time the client tries).
    world.upstream.fail_next(OutcomeUnknownError("answer lost", call="refresh"), calls=["refresh"], after_commit=True)
    world.upstream.fail_next(TransientUpstreamError("unavailable", status=503, call="login"), calls=["login"])

    assert _job(world, record.device_token) is RefreshOutcome.DEFERRED

    _past_retry_after(world, record.device_token)
    outcome = _job(world, record.device_token)

    assert outcome is RefreshOutcome.LOGGED_IN
    assert world.upstream.calls["refresh"] == 1  # only the call whose answer was lost
    assert world.upstream.rejected_refresh_tokens == 0  # the spent token never went out again
    assert world.upstream.calls["login"] == 2
