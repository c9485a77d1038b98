"""The refresh lease's conditions as DynamoDB (moto) evaluates them: a worker whose lease lapsed and was taken over
can no longer renew it, store a pair, or mark the user; the new holder can."""

from __future__ import annotations

import uuid
from typing import Any

import boto3
import pytest

from local.stack import LocalStack
from telematics_reg.lifecycle.records import LEASE_PREFIX, DynamoLifecycleRecords
from telematics_reg.store import ConditionFailedError, DynamoTokenStore, NewUser, Tokens, UserStatus

NOW = 1_900_000_000.0


@pytest.fixture
def store(stack: LocalStack) -> DynamoTokenStore:
    client: Any = boto3.client("dynamodb", endpoint_url=stack.endpoint_url, region_name=stack.region)
    return DynamoTokenStore(client, table_name=stack.outputs["TokensTableName"])


def _user(store: DynamoTokenStore) -> str:
    device_token = str(uuid.uuid4())
    tokens = Tokens("at-0", "rt-0", int(NOW) + 600)
    store.put_new_users([NewUser(device_token, "default", str(uuid.uuid4()), tokens)], now=NOW)
    return device_token


def _pair(n: int) -> Tokens:
    return Tokens(f"at-{n}", f"rt-{n}", int(NOW) + 3600)


def test_a_worker_whose_lapsed_lease_was_taken_over_can_neither_renew_commit_nor_mark_on_dynamodb(
    store: DynamoTokenStore,
) -> None:
    user = _user(store)
    assert store.acquire_lease(device_token=user, version=1, owner="w1", now=NOW, ttl=180) is not None
    # W2's clock (or the real time) is past W1's lease: W2 takes it over.
    taken = store.acquire_lease(device_token=user, version=1, owner="w2", now=NOW + 181, ttl=180)
    assert taken is not None
    assert taken.lease_lapsed

    assert store.renew_lease(device_token=user, version=1, owner="w1", now=NOW + 182, ttl=180) is None
    with pytest.raises(ConditionFailedError):
        store.commit_tokens(device_token=user, expected_version=1, owner="w1", tokens=_pair(1), now=NOW + 182)
    with pytest.raises(ConditionFailedError):
        store.mark_needs_relogin(device_token=user, expected_version=1, owner="w1", reason="401", now=NOW + 182)
    # What W1 may still do: note that the token it spent is dead (true of version 1 whoever holds the lease).
    assert store.mark_refresh_token_dead(device_token=user, version=1, reason="spent", now=NOW + 182)

    held = store.get_user(user)
    assert held is not None
    assert (held.lease_owner, held.version, held.status, held.refresh_token) == ("w2", 1, UserStatus.ACTIVE, "rt-0")
    assert held.refresh_token_dead

    # The new holder renews and commits; the commit clears the dead mark.
    assert store.renew_lease(device_token=user, version=1, owner="w2", now=NOW + 190, ttl=180) == int(NOW) + 370
    committed = store.commit_tokens(device_token=user, expected_version=1, owner="w2", tokens=_pair(2), now=NOW + 200)
    assert (committed.version, committed.refresh_token, committed.lease_owner) == (2, "rt-2", None)
    assert not committed.refresh_token_dead
    # A note about version 1 no longer applies to version 2.
    assert not store.mark_refresh_token_dead(device_token=user, version=1, reason="spent", now=NOW + 201)


def test_a_commit_or_mark_needs_the_lease_as_well_as_the_version_on_dynamodb(store: DynamoTokenStore) -> None:
    user = _user(store)
    # Right version, but nobody holds the lease (a stale worker's write after its lease was released).
    with pytest.raises(ConditionFailedError):
        store.commit_tokens(device_token=user, expected_version=1, owner="w1", tokens=_pair(1), now=NOW)
    with pytest.raises(ConditionFailedError):
        store.mark_needs_relogin(device_token=user, expected_version=1, owner="w1", reason="401", now=NOW)
    assert store.renew_lease(device_token=user, version=1, owner="w1", now=NOW, ttl=180) is None

    assert store.acquire_lease(device_token=user, version=1, owner="w1", now=NOW, ttl=180) is not None
    store.mark_needs_relogin(device_token=user, expected_version=1, owner="w1", reason="login refused", now=NOW)
    marked = store.get_user(user)
    assert marked is not None
    assert (marked.status, marked.version, marked.lease_owner) == (UserStatus.NEEDS_RELOGIN, 2, None)


@pytest.mark.parametrize("ending", ["commit", "release"])
def test_the_end_of_a_change_s_lease_lets_the_next_sweep_queue_the_user_again_on_dynamodb(
    store: DynamoTokenStore, ending: str
) -> None:
    # A sweep queued the user; its job met the change's lease and was consumed without refreshing. Once the change
    # ends, the next sweep queues the user again instead of waiting for the job's QueuedUntil to lapse.
    records = DynamoLifecycleRecords(store)
    user = _user(store)
    assert store.mark_queued(device_token=user, version=1, until=int(NOW) + 420, now=NOW)
    owner = f"{LEASE_PREFIX}m-1/1"
    records.lease(device_token=user, occurred_at=int(NOW * 1000), owner=owner, now=NOW, ttl=120)
    assert store.acquire_lease(device_token=user, version=1, owner="job", now=NOW + 1, ttl=180) is None
    assert not store.mark_queued(device_token=user, version=1, until=int(NOW) + 480, now=NOW + 60)
    if ending == "commit":
        records.commit(device_token=user, owner=owner, occurred_at=int(NOW * 1000), now=NOW + 2, deactivated=True)
    else:
        records.release(device_token=user, owner=owner)
    assert store.mark_queued(device_token=user, version=1, until=int(NOW) + 480, now=NOW + 60)
    assert store.acquire_lease(device_token=user, version=1, owner="job", now=NOW + 61, ttl=180) is not None
