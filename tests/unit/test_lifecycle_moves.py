"""Changes addressed to the instance a user was moved from (fakes): a redelivered move, a late or newer change to
the old alias, chained moves, a deletion through the old alias, and a redelivered registration after the move.

After ``UserMoved`` commits, the user's item is found under the new alias only (``ClientKey`` follows); a change
still addressed to the old alias must neither wait for a registration that will never come nor dead-letter as
``unknown_user``: the user's own order decides (older or equal: dropped with its reason; newer: applied)."""

from __future__ import annotations

import json
import uuid

import pytest

from telematics_reg.lifecycle.events import LifecycleFailed, UserDeleted, UserMoved, UserUpdated
from telematics_reg.models import InstanceCredentials
from telematics_reg.store import UserRecord, UserStatus

from . import test_lifecycle
from .test_lifecycle import Lifecycle, failures, iso_ms, upstream_user

lc = test_lifecycle.lc  # the fixture, shared with the lifecycle's other unit tests

CLIENT = "c-1"


def stored(lc: Lifecycle) -> UserRecord:
    """The one user item of CLIENT, wherever it is now."""
    (user,) = [u for u in lc.world.store.users.values() if u.client_id == CLIENT]
    return user


def move(lc: Lifecycle, at: int, to: str, *, instance: str = "default", mid: str = "") -> str:
    detail = {"ClientId": CLIENT, "Instance": instance, "ToInstance": to, "OccurredAt": iso_ms(at)}
    return lc.send("UserMoved", detail, mid=mid)


def update(lc: Lifecycle, at: int, city: str, *, instance: str = "default") -> str:
    return lc.send("UserUpdated", {"ClientId": CLIENT, "Instance": instance, "City": city, "OccurredAt": iso_ms(at)})


def asia(lc: Lifecycle) -> InstanceCredentials:
    """A third instance (``eu`` and ``fleet-eu`` of the fixture are two aliases of one instance)."""
    creds = InstanceCredentials.model_validate({"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())})
    lc.world.upstream._instances[creds.instance_id] = creds.instance_key.get_secret_value()  # type: ignore[index]
    lc.world.credentials._known["asia"] = creds
    return creds


def test_a_redelivered_move_is_dropped_as_a_duplicate_not_waiting_for_a_registration(lc: Lifecycle) -> None:
    lc.register(CLIENT)
    t = lc.ms()
    assert move(lc, t + 1000, "eu", mid="m-1") == "applied"
    assert lc.world.upstream.calls["change_instance"] == 1
    lc.world.clock.now += 5

    # SQS delivers the same message again (the first invocation was cut off after its commit).
    assert move(lc, t + 1000, "eu", mid="m-1") == "dropped"

    assert lc.world.upstream.calls["change_instance"] == 1
    (dropped,) = failures(lc)
    assert (dropped.reason, dropped.dead_lettered) == ("duplicate", False)
    assert dropped.device_token == stored(lc).device_token
    assert lc.dead_letters.letters == []
    user = stored(lc)
    assert (user.instance, user.moved_from) == ("eu", frozenset({"default"}))


def test_a_change_to_the_old_alias_that_occurred_before_the_move_is_dropped_as_stale(lc: Lifecycle) -> None:
    lc.register(CLIENT)
    t = lc.ms()
    assert move(lc, t + 2000, "eu") == "applied"

    assert update(lc, t + 1000, "Rome") == "dropped"

    assert lc.world.upstream.calls["update_user"] == 0
    (dropped,) = failures(lc)
    assert (dropped.reason, dropped.applied_at, dropped.dead_lettered) == ("stale", t + 2000, False)
    assert lc.dead_letters.letters == []


def test_a_newer_change_to_the_old_alias_follows_the_moved_user(lc: Lifecycle) -> None:
    lc.register(CLIENT)
    t = lc.ms()
    assert move(lc, t + 1000, "eu") == "applied"

    assert update(lc, t + 2000, "Rome") == "applied"

    (user,) = upstream_user(lc, CLIENT)
    assert user.profile["City"] == "Rome"  # type: ignore[attr-defined]
    assert user.instance_id == lc.eu.instance_id  # type: ignore[attr-defined]  # still where it was moved
    assert (stored(lc).instance, stored(lc).last_change_at) == ("eu", t + 2000)
    (event,) = [e for e in lc.world.publisher.events if isinstance(e, UserUpdated)]
    assert event.instance == "eu"
    assert failures(lc) == []


def test_chained_moves_remember_every_alias_the_user_was_moved_from(lc: Lifecycle) -> None:
    target = asia(lc)
    lc.register(CLIENT)
    t = lc.ms()
    assert move(lc, t + 1000, "eu") == "applied"
    assert move(lc, t + 2000, "asia", instance="eu") == "applied"
    user = stored(lc)
    assert (user.instance, user.instance_id) == ("asia", str(target.instance_id))
    assert user.moved_from == frozenset({"default", "eu"})
    assert lc.world.store.find_all_by_client("default", CLIENT) == []
    assert lc.world.store.find_all_by_client("eu", CLIENT) == []

    # Redeliveries of both moves: the first is now older than the user's last change, the second is it.
    assert move(lc, t + 1000, "eu") == "dropped"
    assert move(lc, t + 2000, "asia", instance="eu") == "dropped"
    assert [f.reason for f in failures(lc)] == ["stale", "duplicate"]
    assert lc.world.upstream.calls["change_instance"] == 2
    (upstream,) = upstream_user(lc, CLIENT)
    assert upstream.instance_id == target.instance_id  # type: ignore[attr-defined]

    # A newer change addressed to the first alias still reaches the user.
    assert update(lc, t + 3000, "Oslo") == "applied"
    assert upstream.profile["City"] == "Oslo"  # type: ignore[attr-defined]


def test_a_newer_move_to_where_the_user_already_is_does_not_call_the_upstream(lc: Lifecycle) -> None:
    lc.register(CLIENT)
    t = lc.ms()
    assert move(lc, t + 1000, "eu") == "applied"
    # Another move, sent later to the old alias, naming the instance the user is in.
    assert move(lc, t + 2000, "eu") == "applied"
    # An alias of the same upstream instance: the stored alias follows, the upstream has nothing to do.
    assert move(lc, t + 3000, "fleet-eu", instance="eu") == "applied"

    assert lc.world.upstream.calls["change_instance"] == 1
    user = stored(lc)
    assert (user.instance, user.last_change_at) == ("fleet-eu", t + 3000)
    assert user.moved_from == frozenset({"default", "eu"})
    moved = [(e.from_instance, e.instance) for e in lc.world.publisher.events if isinstance(e, UserMoved)]
    assert moved == [("default", "eu"), ("eu", "eu"), ("eu", "fleet-eu")]


@pytest.mark.parametrize("deleted", ["after", "before"], ids=["deleted_after_the_move", "deleted_before_the_move"])
def test_a_deletion_addressed_to_the_old_alias_erases_the_moved_user_everywhere(lc: Lifecycle, deleted: str) -> None:
    lc.register(CLIENT)
    t = lc.ms()
    # Dead letters of the user under both aliases (e.g. a failed update before the move, one after it).
    lc.eraser.bodies += [
        json.dumps({"ClientId": CLIENT, "FirstName": "Ada"}),
        json.dumps({"ClientId": CLIENT, "Instance": "eu", "Phone": "+100"}),
        json.dumps({"ClientId": "c-2"}),
    ]
    assert move(lc, t + 2000, "eu") == "applied"
    device_token = stored(lc).device_token
    deleted_at = t + 3000 if deleted == "after" else t + 1000  # a deletion is never stale: erasure wins

    detail = {"ClientId": CLIENT, "OccurredAt": iso_ms(deleted_at)}
    assert lc.send("UserDeleted", detail) == "applied"

    assert upstream_user(lc, CLIENT) == []
    tombstone = stored(lc)
    assert (tombstone.device_token, tombstone.status, tombstone.deleted_at) == (
        device_token,
        UserStatus.DELETED,
        deleted_at,
    )
    assert tombstone.tokens is None
    assert tombstone.due_shard is None
    assert lc.eraser.bodies == [json.dumps({"ClientId": "c-2"})]
    (event,) = [e for e in lc.world.publisher.events if isinstance(e, UserDeleted)]
    assert (event.device_token, event.client_id) == (device_token, CLIENT)

    # Its redelivery is a duplicate, and a late update to the old alias is dropped: neither waits nor dead-letters.
    lc.world.clock.now += 5
    assert lc.send("UserDeleted", detail) == "dropped"
    assert update(lc, t + 500, "Rome") == "dropped"
    assert [f.reason for f in failures(lc)] == ["duplicate", "user_deleted"]
    assert lc.dead_letters.letters == []
    assert lc.world.upstream.calls["update_user"] == 0


def test_a_deletion_through_the_new_alias_also_erases_dead_letters_of_the_old_one(lc: Lifecycle) -> None:
    lc.register(CLIENT)
    lc.eraser.bodies += [json.dumps({"ClientId": CLIENT, "FirstName": "Ada"}), json.dumps({"ClientId": "c-2"})]
    t = lc.ms()
    assert move(lc, t + 1000, "eu") == "applied"

    assert lc.send("UserDeleted", {"ClientId": CLIENT, "Instance": "eu", "OccurredAt": iso_ms(t + 2000)}) == "applied"

    assert lc.eraser.bodies == [json.dumps({"ClientId": "c-2"})]
    assert ("default", CLIENT) in lc.eraser.erased


def test_a_redelivered_registration_after_the_move_makes_no_second_user(lc: Lifecycle) -> None:
    t = lc.ms()
    lc.register(CLIENT, occurred_ms=t)
    assert move(lc, t + 1000, "eu") == "applied"
    creates = lc.world.upstream.calls["create"]

    lc.register(CLIENT, occurred_ms=t)

    assert lc.world.upstream.calls["create"] == creates
    (user,) = upstream_user(lc, CLIENT)
    assert user.instance_id == lc.eu.instance_id  # type: ignore[attr-defined]
    assert stored(lc).instance == "eu"
    assert not [e for e in lc.world.publisher.events if isinstance(e, LifecycleFailed) and e.dead_lettered]
