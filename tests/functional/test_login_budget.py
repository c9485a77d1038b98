"""The fleet's Login budget and block on DynamoDB (moto): many workers at once, on clocks that disagree, never start
more Logins in any sliding minute than the budget, and none at all once one Login got 429; the HTTP client spends the
budget on every Login (Create recovery included) and opens the block on a 429 from the emulator."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from local.emulator.testing import EmulatorHandle
from local.stack import LocalStack
from telematics_reg.budget import LOGIN_BUDGET_PK, DynamoLoginBudget
from telematics_reg.errors import LoginDeferredError, RateLimitedError
from telematics_reg.models import CreateUserRequest, InstanceCredentials, UserFields
from telematics_reg.upstream import UserServiceClient

from .conftest import INSTANCES

PER_MINUTE = 3
SKEW = 5.0
SPEED = 20.0  # simulated seconds per real second: three minutes of Logins in about nine seconds


@pytest.fixture
def table(stack: LocalStack) -> Iterator[str]:
    """The session stack's tokens table, with no budget or block left by anyone (before and after)."""
    name = stack.outputs["TokensTableName"]
    client = boto3.client("dynamodb", endpoint_url=stack.endpoint_url, region_name=stack.region)
    client.delete_item(TableName=name, Key={"pk": {"S": LOGIN_BUDGET_PK}})
    yield name
    client.delete_item(TableName=name, Key={"pk": {"S": LOGIN_BUDGET_PK}})


def _dynamodb(stack: LocalStack) -> Any:
    return boto3.client("dynamodb", endpoint_url=stack.endpoint_url, region_name=stack.region)


def test_many_workers_needing_login_never_exceed_the_budget_in_any_sliding_minute_and_all_stop_after_one_429(
    stack: LocalStack, table: str
) -> None:
    workers = 12
    start, real_start = 2_000_000_000.0, time.monotonic()
    block_after, run_for = 6.0, 10.0  # real seconds: about 2 min of Logins, one 429 (at the first Login after),
    # then Logins attempted for the rest of the run

    def true_time() -> float:
        return start + (time.monotonic() - real_start) * SPEED

    grants: list[float] = []  # true time of each Login granted (the clock value its condition used, less the skew)
    after_block: list[float] = []  # Logins granted to an attempt that began after the block was stored
    blocked = threading.Event()
    lock = threading.Lock()

    def worker(index: int) -> None:
        offset = SKEW * (index / (workers - 1) - 0.5)  # clocks spread over the allowed skew, from -2.5 s to +2.5 s
        last = threading.local()

        def clock() -> float:
            last.value = true_time() + offset
            return float(last.value)

        budget = DynamoLoginBudget(
            _dynamodb(stack), table_name=table, per_minute=PER_MINUTE, clock_skew_seconds=SKEW, clock=clock
        )
        while time.monotonic() - real_start < run_for:
            began_after_block = blocked.is_set()
            try:
                budget.acquire()
            except LoginDeferredError:
                time.sleep(0.01)
                continue
            with lock:
                grants.append(last.value - offset)
                if began_after_block:
                    after_block.append(last.value - offset)
                if not blocked.is_set() and time.monotonic() - real_start >= block_after:
                    budget.block(None)  # this Login was answered 429, without Retry-After
                    blocked.set()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    grants.sort()
    assert len(grants) >= 2 * PER_MINUTE, grants  # the run spent the budget over more than one window
    windows = [grants[i + PER_MINUTE] - grants[i] for i in range(len(grants) - PER_MINUTE)]
    assert min(windows) >= 60.0, windows  # never PER_MINUTE + 1 Logins within 60 s, whoever's clock
    assert blocked.is_set()
    assert after_block == []
    item = _dynamodb(stack).get_item(TableName=table, Key={"pk": {"S": LOGIN_BUDGET_PK}}, ConsistentRead=True)["Item"]
    assert float(item["BlockedUntil"]["N"]) > true_time() + 3500  # an hour without Retry-After


def test_the_client_spends_the_budget_on_every_login_and_a_429_blocks_every_login_of_the_fleet(
    stack: LocalStack, table: str, emulator: EmulatorHandle
) -> None:
    creds = InstanceCredentials.model_validate(INSTANCES["default"])

    def client() -> UserServiceClient:
        budget = DynamoLoginBudget(_dynamodb(stack), table_name=table, per_minute=PER_MINUTE, clock_skew_seconds=SKEW)
        return UserServiceClient(emulator.url, max_attempts=2, login_budget=budget)

    worker, other = client(), client()  # two functions sharing the table
    user = worker.create(creds, CreateUserRequest(custom_token=uuid.uuid4(), user_fields=UserFields(client_id="lb-1")))
    worker.login(creds, user.device_token)
    # A Retry-After longer than the client waits out: the 429 comes back at once, not after retries.
    emulator.set_faults(rate_limit_rate=1.0, retry_after_s=120, calls=["login"])

    with pytest.raises(RateLimitedError):
        worker.login(creds, user.device_token)

    emulator.clear_faults()
    before = emulator.counters()
    with pytest.raises(LoginDeferredError, match="blocked"):
        other.login(creds, user.device_token)
    # A Create whose answer is lost is recovered by Login: not while Login is blocked (the message is retried).
    emulator.set_faults(script=[{"call": "create", "fault": "drop_after_commit"}])
    body = CreateUserRequest(custom_token=uuid.uuid4(), user_fields=UserFields(client_id="lb-2"))
    with pytest.raises(LoginDeferredError):
        other.create(creds, body)

    after = emulator.counters()
    assert after["logins"] == before["logins"]
    assert after["requests_total"] - before["requests_total"] == 1  # the Create only: no Login went out
    item = _dynamodb(stack).get_item(TableName=table, Key={"pk": {"S": LOGIN_BUDGET_PK}}, ConsistentRead=True)["Item"]
    assert float(item["BlockedUntil"]["N"]) >= time.time() + 110
