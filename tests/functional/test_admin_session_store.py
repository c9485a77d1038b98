"""The fleet's admin session on moto and the emulator: the lease and commit conditions as DynamoDB evaluates them,
and the Login count the emulator sees for a dropped Refresh answer and for cold containers starting together.

Each test gets a table of its own (the schema of the stack's tokens table): the session item and the Login budget
live in it, and no other test's session is judged. The emulator is reset for each test."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import boto3
import pytest

from local.emulator.testing import EmulatorHandle
from local.fake_lifecycle import StaticAdminCredentials
from local.stack import LocalStack
from telematics_reg.budget import DynamoLoginBudget
from telematics_reg.lifecycle.admin import (
    AdminLoginCause,
    AdminSessionUnavailableError,
    DynamoAdminSessionStore,
    FleetAdminSession,
)
from telematics_reg.management_models import AdminCredentials, AdminSession
from telematics_reg.store import DynamoTokenStore
from telematics_reg.upstream import UserServiceClient

NOW = 1_900_000_000.0


@pytest.fixture
def dynamodb(stack: LocalStack) -> Any:
    return boto3.client("dynamodb", endpoint_url=stack.endpoint_url, region_name=stack.region)


@pytest.fixture
def table(dynamodb: Any, stack: LocalStack) -> str:
    described = dynamodb.describe_table(TableName=stack.outputs["TokensTableName"])["Table"]
    name = f"admin-{uuid.uuid4().hex[:10]}"
    dynamodb.create_table(
        TableName=name,
        AttributeDefinitions=[a for a in described["AttributeDefinitions"] if a["AttributeName"] == "pk"],
        KeySchema=described["KeySchema"],
        BillingMode="PAY_PER_REQUEST",
    )
    return name


@pytest.fixture
def sessions(dynamodb: Any, table: str) -> DynamoAdminSessionStore:
    return DynamoAdminSessionStore(DynamoTokenStore(dynamodb, table_name=table))


def _pair(n: int) -> AdminSession:
    return AdminSession.model_validate(
        {"AccessToken": {"Token": f"jwt-{n}", "ExpiresIn": 86_400}, "RefreshToken": f"rt-{n}"}
    )


def _commit(sessions: DynamoAdminSessionStore, version: int | None, owner: str, n: int, now: float = NOW) -> bool:
    return sessions.commit(
        version=version,
        owner=owner,
        session=_pair(n),
        expires_at=int(now) + 86_400,
        renew_at=int(now) + 86_100,
        now=now,
    )


# ---------------------------------------------------------------------------------------------- the conditions


def test_a_renewal_whose_lapsed_lease_was_taken_over_can_neither_renew_commit_nor_release_on_dynamodb(
    sessions: DynamoAdminSessionStore,
) -> None:
    first = sessions.lease(version=None, owner="w1", now=NOW, ttl=180)
    assert first is not None
    assert not first.lease_lapsed
    assert not first.committed
    assert sessions.lease(version=None, owner="w2", now=NOW + 180, ttl=180) is None  # live by W2's clock
    assert _commit(sessions, None, "w1", 1)
    assert sessions.lease(version=None, owner="w2", now=NOW + 1, ttl=180) is None  # the session moved on

    held = sessions.lease(version=1, owner="w1", now=NOW + 10, ttl=180)
    assert held is not None
    assert (held.version, held.refresh_token, held.lease_lapsed) == (1, "rt-1", False)
    # W1 stalls past its lease; W2 (or the real time) is past it: W2 takes the lease over and is told it lapsed.
    taken = sessions.lease(version=1, owner="w2", now=NOW + 191, ttl=180)
    assert taken is not None
    assert taken.lease_lapsed

    assert sessions.renew_lease(version=1, owner="w1", now=NOW + 192, ttl=180) is None
    assert not _commit(sessions, 1, "w1", 2, NOW + 192)
    sessions.release(owner="w1", login_cause=None)  # not W1's any more: no effect
    # What W1 may still do: note that the token it spent is dead (true of version 1 whoever holds the lease).
    assert sessions.mark_dead(version=1, login_cause=AdminLoginCause.COMMIT_LOST)
    item = sessions.get()
    assert item is not None
    assert (item.lease_owner, item.version, item.refresh_token_dead, item.login_cause) == ("w2", 1, True, "commit_lost")

    # The new holder renews and commits; the commit clears the dead mark and its cause.
    assert sessions.renew_lease(version=1, owner="w2", now=NOW + 200, ttl=180) == int(NOW) + 380
    assert _commit(sessions, 1, "w2", 3, NOW + 201)
    item = sessions.get()
    assert item is not None
    assert (item.version, item.refresh_token, item.lease_owner, item.refresh_token_dead, item.login_cause) == (
        2,
        "rt-3",
        None,
        False,
        None,
    )
    assert item.renew_at == int(NOW) + 201 + 86_100
    assert not sessions.mark_dead(version=1, login_cause=AdminLoginCause.COMMIT_LOST)  # about version 1 only


def test_a_release_with_a_cause_leaves_the_token_dead_for_the_next_renewal_on_dynamodb(
    sessions: DynamoAdminSessionStore,
) -> None:
    assert sessions.lease(version=None, owner="w1", now=NOW, ttl=180) is not None
    assert _commit(sessions, None, "w1", 1)
    assert sessions.lease(version=1, owner="w1", now=NOW + 5, ttl=180) is not None
    sessions.release(owner="w1", login_cause=AdminLoginCause.REFRESH_ANSWER_LOST)
    leased = sessions.lease(version=1, owner="w2", now=NOW + 6, ttl=180)
    assert leased is not None
    assert not leased.lease_lapsed  # released, not lapsed
    assert (leased.refresh_token_dead, leased.login_cause) == (True, "refresh_answer_lost")
    # A commit needs the lease as well as the version.
    assert not _commit(sessions, 1, "w1", 2, NOW + 7)
    assert _commit(sessions, 1, "w2", 2, NOW + 7)


# ---------------------------------------------------------------------------------------------- with the emulator


def _admin_session(
    emulator: EmulatorHandle, dynamodb: Any, table: str, *, clock: Callable[[], float] = time.time
) -> FleetAdminSession:
    assert emulator.admin_account is not None
    upstream = UserServiceClient(
        emulator.url,
        max_attempts=2,
        login_budget=DynamoLoginBudget(dynamodb, table_name=table, per_minute=3, clock_skew_seconds=2),
    )
    return FleetAdminSession(
        upstream=upstream,
        store=DynamoAdminSessionStore(DynamoTokenStore(dynamodb, table_name=table)),
        credentials=StaticAdminCredentials(
            AdminCredentials(email=emulator.admin_account["Email"], password=emulator.admin_account["Password"])
        ),
        clock=clock,
    )


def _find(session: FleetAdminSession) -> list[Any]:
    upstream: UserServiceClient = session._upstream  # type: ignore[assignment]
    return session.call(lambda token: upstream.find_users(token, client_id="nobody"))


def test_a_dropped_admin_refresh_answer_costs_one_login_and_no_token_is_presented_twice(
    emulator: EmulatorHandle, dynamodb: Any, table: str
) -> None:
    first = _admin_session(emulator, dynamodb, table)
    assert _find(first) == []
    # A day later by this container's clock: the admin JWT is due, and the Refresh's answer is dropped after commit.
    later = _admin_session(emulator, dynamodb, table, clock=lambda: time.time() + 86_400)
    emulator.set_faults(script=[{"call": "refresh", "fault": "drop_after_commit"}])
    assert _find(later) == []  # recovered by Login at once
    assert _find(first) == []  # the other container finds the new session stored

    counters = emulator.counters()
    assert counters["faults_by_call"] == {"admin_refresh": {"drop_after_commit": 1}}
    assert (counters["admin_logins"], counters["admin_refreshes"]) == (2, 1)  # 1 + 1 lost answer
    assert counters["admin_rejected_refresh_tokens"] == 0
    assert (later.logins_by_cause, later.answers_lost) == ({"refresh_answer_lost": 1}, 1)


def test_cold_containers_starting_together_make_one_admin_login(
    emulator: EmulatorHandle, dynamodb: Any, table: str
) -> None:
    emulator.set_faults(latency_ms=1500, calls=["login"])  # every container arrives while the Login is in flight
    containers = [_admin_session(emulator, dynamodb, table) for _ in range(4)]
    results: list[object] = []
    start = threading.Barrier(len(containers))

    def run(container: FleetAdminSession) -> None:
        start.wait()
        try:
            results.append(_find(container))
        except AdminSessionUnavailableError as exc:  # pragma: no cover - reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in containers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [[]] * len(containers)
    assert emulator.counters()["admin_logins"] == 1
    assert sum(c.logins for c in containers) == 1
