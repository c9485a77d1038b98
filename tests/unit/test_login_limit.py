"""The service under the upstream's Login limit, against the fakes: a 429 on any Login stops every Login of the fleet
until it lifts, users needing Login wait with their reason (never NEEDS_RELOGIN), refreshes go on, and the Logins
that recover a Create count too."""

from __future__ import annotations

import uuid

import pytest

from telematics_reg.errors import LoginDeferredError, RateLimitedError
from telematics_reg.outcomes import TokenRefreshFailed
from telematics_reg.refresh import RefreshJob, RefreshOutcome
from telematics_reg.store import UserRecord, UserStatus

from .conftest import World


def _register(world: World, client_id: str) -> UserRecord:
    result = world.intake.handle({"ClientId": client_id}, message_id=f"m-{client_id}", source="queue")
    record = world.store.get_user(str(result.device_token))
    assert record is not None
    return record


def _job(world: World, record: UserRecord) -> RefreshOutcome:
    current = world.store.get_user(record.device_token)
    assert current is not None
    return world.refresher.refresh_job(RefreshJob(current.device_token, current.version))


def test_a_429_on_one_login_blocks_every_login_while_refreshes_go_on_and_users_wait_with_their_reason(
    world: World,
) -> None:
    dead = [_register(world, f"blk-{n}") for n in range(3)]
    healthy = _register(world, "blk-ok")
    for record in dead:
        world.upstream.revoke(uuid.UUID(record.device_token))
    world.clock.now += 3300
    world.upstream.fail_next(RateLimitedError("Too Many Requests", status=429, call="login"), calls=["login"])
    started = world.clock()

    outcomes = [_job(world, record) for record in dead]
    refreshed = _job(world, healthy)

    assert outcomes == [RefreshOutcome.DEFERRED] * 3
    assert refreshed is RefreshOutcome.REFRESHED  # refreshes are not Logins: they go on
    assert world.upstream.calls["login"] == 1  # the one that got 429; the others were never sent
    assert world.budget.blocked_until == started + 3600  # no Retry-After: an hour
    for record in dead:
        stored = world.store.get_user(record.device_token)
        assert stored is not None
        assert stored.status is UserStatus.ACTIVE  # deferred, not NEEDS_RELOGIN
        assert stored.refresh_token_dead  # the retry goes straight to Login, never replays the dead token
        assert stored.retry_after is not None
    blocked = [world.store.get_user(r.device_token) for r in dead[1:]]
    assert all(b is not None and "blocked" in (b.last_error or "") for b in blocked)
    assert all(b is not None and (b.retry_after or 0) >= started + 3600 for b in blocked)
    assert world.publisher.of_type(TokenRefreshFailed) == []

    # Once the block has lifted, the next attempts log in.
    world.clock.now = max((world.store.get_user(r.device_token).retry_after or 0) for r in dead) + 1  # type: ignore[union-attr]
    assert [_job(world, record) for record in dead] == [RefreshOutcome.LOGGED_IN] * 3
    assert world.upstream.calls["login"] == 4


def test_while_login_is_blocked_a_create_is_not_recovered_by_login_and_its_message_is_retried(world: World) -> None:
    # The user exists upstream (an earlier Create whose answer was lost) but not here: Create answers "exists" and
    # the client would recover it by Login, which the block forbids.
    client_id = "blk-create"
    first = world.intake.handle({"ClientId": client_id}, message_id="m-1", source="queue")
    world.store.users.clear()
    world.budget.block(None)
    logins = world.upstream.calls["login"]

    with pytest.raises(LoginDeferredError, match="blocked"):
        world.intake.handle({"ClientId": client_id}, message_id="m-2", source="queue")

    assert world.upstream.calls["login"] == logins
    assert world.store.get_user(str(first.device_token)) is None  # claim given back: the retry may claim it again
    world.clock.now += 3601
    again = world.intake.handle({"ClientId": client_id}, message_id="m-2", source="queue")
    assert again.device_token == first.device_token
    assert world.upstream.calls["login"] == logins + 1
