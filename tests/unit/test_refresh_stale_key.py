"""A 401 from Login with a cached InstanceKey that was rotated since: the credentials are re-read and Login is tried
once more before the user is given up (README: a rotated key "is picked up on the next attempt")."""

from __future__ import annotations

import uuid

from telematics_reg.credentials import StaticCredentials
from telematics_reg.models import InstanceCredentials
from telematics_reg.outcomes import TokenRefreshFailed
from telematics_reg.refresh import RefreshJob, RefreshOutcome, TokenRefresher
from telematics_reg.store import UserStatus

from .conftest import TIMING, World


class RotatedSecret(StaticCredentials):
    """The secret holds a new key; this container cached the old one until it invalidates its cache."""

    def __init__(self, old: InstanceCredentials, new: InstanceCredentials) -> None:
        super().__init__({"default": old})
        self._new = new

    def invalidate(self) -> None:
        super().invalidate()
        self._known = {"default": self._new}


OLD_KEY = "0d0d0d0d-0000-4000-8000-00000000000d"


def _refresher(world: World, credentials: StaticCredentials) -> TokenRefresher:
    return TokenRefresher(
        upstream=world.upstream,
        store=world.store,
        credentials=credentials,
        publisher=world.publisher,
        margin_seconds=600,
        timing=TIMING,
        clock=world.clock,
        sleep=world.clock.sleep,
    )


def test_a_login_refused_with_a_stale_cached_key_is_retried_once_with_the_reread_key(world: World) -> None:
    result = world.intake.handle({"ClientId": "k-1"}, message_id="m-k-1", source="queue")
    device_token = str(result.device_token)
    world.upstream.revoke(uuid.UUID(device_token))
    world.clock.now += 3300
    stale = InstanceCredentials.model_validate({"InstanceId": str(world.creds.instance_id), "InstanceKey": OLD_KEY})
    credentials = RotatedSecret(stale, world.creds)
    record = world.store.get_user(device_token)
    assert record is not None

    outcome = _refresher(world, credentials).refresh_job(RefreshJob(device_token, record.version))

    stored = world.store.get_user(device_token)
    assert outcome is RefreshOutcome.LOGGED_IN
    assert world.upstream.calls["login"] == 2
    assert credentials.invalidations == 1
    assert world.budget.spent == 2  # each Login is counted
    assert stored is not None
    assert stored.status is UserStatus.ACTIVE
    assert world.publisher.of_type(TokenRefreshFailed) == []


def test_a_login_refused_with_the_current_key_is_not_retried_and_the_user_is_marked(world: World) -> None:
    result = world.intake.handle({"ClientId": "k-2"}, message_id="m-k-2", source="queue")
    device_token = str(result.device_token)
    world.upstream.revoke(uuid.UUID(device_token))
    world.upstream.disable_login(uuid.UUID(device_token))
    world.clock.now += 3300
    record = world.store.get_user(device_token)
    assert record is not None

    outcome = world.refresher.refresh_job(RefreshJob(device_token, record.version))

    assert outcome is RefreshOutcome.NEEDS_RELOGIN
    assert world.upstream.calls["login"] == 1  # the re-read key is the same: a second Login would be refused too
    assert world.credentials.invalidations == 1
    (event,) = world.publisher.of_type(TokenRefreshFailed)
    assert "401" in event.detail()["Reason"]
