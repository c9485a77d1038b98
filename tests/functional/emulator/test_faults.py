"""Fault injection: latency, 5xx, 429, hangs, commit-then-drop, one-shot scripts and the ``calls`` filter."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from local.emulator.testing import EmulatorHandle
from tests.functional.emulator.helpers import Api, assert_envelope, assert_token_pair


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def served(emulator: EmulatorHandle) -> dict[str, int]:
    faults: dict[str, int] = emulator.counters()["faults_served"]
    return faults


# ---------------------------------------------------------------------------------------------- latency


def test_fixed_latency_applies_to_the_chosen_calls_only(emulator: EmulatorHandle, api: Api) -> None:
    emulator.set_faults(latency_ms=300, calls=["create"])

    created, create_s = timed(api.created)
    refreshed, refresh_s = timed(lambda: api.refresh(created["AccessToken"]["Token"], created["RefreshToken"]))
    _, admin_s = timed(emulator.counters)

    assert 0.28 <= create_s < 2.0
    assert refresh_s < 0.25
    assert admin_s < 0.25
    assert_envelope(refreshed, 200)


def test_random_latency_stays_within_its_bounds(emulator: EmulatorHandle, api: Api) -> None:
    emulator.set_faults(latency_ms=[50, 250], seed=7)

    durations = [timed(api.created)[1] for _ in range(8)]

    assert min(durations) >= 0.045
    assert max(durations) < 1.5
    assert statistics.pstdev(durations) > 0.01, durations


# ---------------------------------------------------------------------------------------------- 5xx and 429


@pytest.mark.parametrize("status", [503, 500])
def test_error_rate_one_answers_5xx_before_doing_anything(emulator: EmulatorHandle, api: Api, status: int) -> None:
    emulator.set_faults(error_rate=1.0, error_status=status)

    responses = [
        api.create({"UserFields": {"ClientId": "c-1"}}),
        api.create_many({"Quantity": 5}),
        api.login("3fa85f64-5717-4562-b3fc-2c963f66afa6"),
        api.refresh("a", "b"),
    ]

    for response in responses:
        assert_envelope(response, status, "Fault")
    counters = emulator.counters()
    assert counters["users_total"] == 0
    assert counters["creates"] == 0
    assert counters["create_many_calls"] == 0
    assert counters["failed_logins"] == 0
    assert counters["rejected_refresh_tokens"] == 0
    assert counters["faults_served"]["error"] == 4
    assert counters["requests_total"] == 4


def test_rate_limit_answers_429_with_retry_after(emulator: EmulatorHandle, api: Api) -> None:
    emulator.set_faults(rate_limit_rate=1.0, retry_after_s=2)

    response = api.create()

    assert_envelope(response, 429, "Fault")
    assert response.headers["Retry-After"] == "2"
    emulator.set_faults(retry_after_s=0.2)
    assert api.create().headers["Retry-After"] == "1"  # whole seconds, rounded up
    counters = emulator.counters()
    assert counters["users_total"] == 0
    assert counters["faults_served"]["rate_limit"] == 2


def test_rates_mix_by_proportion(emulator: EmulatorHandle, api: Api) -> None:
    emulator.set_faults(error_rate=0.3, rate_limit_rate=0.3, seed=11)

    statuses = [api.create().status_code for _ in range(100)]

    assert 10 <= statuses.count(503) <= 50
    assert 10 <= statuses.count(429) <= 50
    assert statuses.count(200) == emulator.counters()["users_total"]
    assert served(emulator)["error"] == statuses.count(503)
    assert served(emulator)["rate_limit"] == statuses.count(429)


# ---------------------------------------------------------------------------------------------- hang


def test_hang_outlives_the_client_timeout_then_commits(emulator: EmulatorHandle, api: Api) -> None:
    emulator.set_faults(hang_rate=1.0, hang_s=0.8, calls=["create"])

    with pytest.raises(requests.exceptions.ReadTimeout):
        api.create({"UserFields": {"ClientId": "slow"}}, timeout=0.3)

    assert served(emulator)["hang"] == 1
    assert wait_for(lambda: emulator.counters()["users_total"] == 1, timeout_s=3)
    assert emulator.counters()["users_by_client_id"] == {f"{emulator.instance_id()}/slow": 1}
    (user,) = emulator.users(client_id="slow")
    assert user["CreatedBy"] == "create"


def test_hang_answers_a_patient_client(emulator: EmulatorHandle, api: Api) -> None:
    emulator.set_faults(hang_rate=1.0, hang_s=0.3)

    response, duration = timed(lambda: api.create(timeout=5))

    assert duration >= 0.28
    assert_token_pair(emulator, assert_envelope(response, 200)["Result"])


def test_hang_can_abandon_the_call_when_the_client_is_gone(emulator: EmulatorHandle, api: Api) -> None:
    emulator.set_faults(hang_rate=1.0, hang_s=0.6, hang_abandon_if_gone=True, calls=["create"])

    with pytest.raises(requests.exceptions.ReadTimeout):
        api.create(timeout=0.2)
    time.sleep(0.9)

    assert emulator.counters()["users_total"] == 0
    assert served(emulator)["hang"] == 1


# ---------------------------------------------------------------------------------------------- drop after commit


def test_drop_after_commit_creates_the_user_and_loses_the_answer(emulator: EmulatorHandle, api: Api) -> None:
    emulator.set_faults(drop_after_commit_rate=1.0, calls=["create"])

    with pytest.raises(requests.exceptions.ConnectionError):
        api.create({"UserFields": {"ClientId": "lost"}})

    counters = emulator.counters()
    assert counters["creates"] == 1
    assert counters["users_total"] == 1
    assert counters["users_by_client_id"] == {f"{emulator.instance_id()}/lost": 1}
    assert counters["faults_served"]["drop_after_commit"] == 1
    # The same pooled session keeps working once the fault is off.
    emulator.set_faults(drop_after_commit_rate=0.0)
    assert_envelope(api.create(), 200)


def test_drop_after_commit_on_refresh_rotates_the_tokens(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created()
    emulator.set_faults(script=[{"call": "refresh", "fault": "drop_after_commit"}])

    with pytest.raises(requests.exceptions.ConnectionError):
        api.refresh(created["AccessToken"]["Token"], created["RefreshToken"])

    user = emulator.user(created["DeviceToken"])
    assert user is not None
    assert user["TokensIssued"] == 2
    assert emulator.counters()["refreshes"] == 1
    # The old refresh token is spent: the client must recover by Login.
    assert_envelope(api.refresh(created["AccessToken"]["Token"], created["RefreshToken"]), 400, "RefreshToken")
    assert_envelope(api.login(created["DeviceToken"]), 200)


def test_faults_by_call_tell_the_admins_login_and_refresh_from_the_users(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created()
    admin = api.admin_login()
    emulator.set_faults(
        script=[
            {"call": "refresh", "fault": "drop_after_commit"},
            {"call": "refresh", "fault": "drop_after_commit"},
            {"call": "login", "fault": "drop_after_commit"},
            {"call": "login", "fault": "error"},
        ]
    )
    for send in (
        lambda: api.refresh(admin["AccessToken"]["Token"], admin["RefreshToken"]),
        lambda: api.refresh(created["AccessToken"]["Token"], created["RefreshToken"]),
        api.admin_login,
    ):
        with pytest.raises(requests.exceptions.ConnectionError):
            send()
    assert_envelope(api.login(created["DeviceToken"]), 503, "Fault")

    counters = emulator.counters()
    assert counters["faults_by_call"] == {
        "admin_refresh": {"drop_after_commit": 1},
        "refresh": {"drop_after_commit": 1},
        "admin_login": {"drop_after_commit": 1},
        "login": {"error": 1},
    }
    assert counters["faults_served"]["drop_after_commit"] == 3
    # The admin refresh token the dropped answer spent, presented again: counted apart from the users'.
    assert_envelope(api.refresh(admin["AccessToken"]["Token"], admin["RefreshToken"]), 400, "RefreshToken")
    assert emulator.counters()["admin_rejected_refresh_tokens"] == 1


def test_drop_after_commit_on_create_many(emulator: EmulatorHandle, api: Api) -> None:
    emulator.set_faults(drop_after_commit_rate=1.0, calls=["create_many"])

    with pytest.raises(requests.exceptions.ConnectionError):
        api.create_many({"Quantity": 3})

    counters = emulator.counters()
    assert counters["create_many_users"] == 3
    assert counters["users_total"] == 3


# ---------------------------------------------------------------------------------------------- script and calls


def test_script_serves_one_shot_faults_in_order_to_matching_calls(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created()
    emulator.set_faults(
        script=[
            {"call": "login", "fault": "rate_limit", "retry_after_s": 3},
            {"call": "create", "fault": "error", "status": 502},
            {"call": "create", "fault": "drop_after_commit"},
            {"call": "refresh", "fault": "error"},
        ]
    )

    first_create = api.create()
    with pytest.raises(requests.exceptions.ConnectionError):
        api.create()
    assert len(emulator.faults()["script"]) == 2
    third_create = api.create()
    login = api.login(created["DeviceToken"])
    refresh = api.refresh(created["AccessToken"]["Token"], created["RefreshToken"])
    second_refresh = api.refresh(created["AccessToken"]["Token"], created["RefreshToken"])

    assert_envelope(first_create, 502, "Fault")
    assert_envelope(third_create, 200)
    assert_envelope(login, 429, "Fault")
    assert login.headers["Retry-After"] == "3"
    assert_envelope(refresh, 503, "Fault")
    assert_envelope(second_refresh, 200)
    assert emulator.faults()["script"] == []
    assert served(emulator) == {"error": 2, "rate_limit": 1, "hang": 0, "drop_after_commit": 1}
    assert emulator.counters()["users_total"] == 3  # the first create, the dropped one, the third


def test_script_entry_without_call_matches_the_next_call(emulator: EmulatorHandle, api: Api) -> None:
    emulator.set_faults(script=[{"fault": "error"}], error_rate=0.0, calls=["login"])

    assert_envelope(api.create_many({"Quantity": 1}), 503, "Fault")  # scripts ignore the calls filter
    assert_envelope(api.create_many({"Quantity": 1}), 200)


def test_script_hang_uses_its_own_duration(emulator: EmulatorHandle, api: Api) -> None:
    emulator.set_faults(hang_s=30, script=[{"call": "create", "fault": "hang", "hang_s": 0.3}])

    response, duration = timed(lambda: api.create(timeout=5))

    assert_envelope(response, 200)
    assert 0.28 <= duration < 5


def test_calls_filter_limits_rate_faults(emulator: EmulatorHandle, api: Api) -> None:
    emulator.set_faults(error_rate=1.0, calls=["refresh"])
    created = api.created()

    assert_envelope(api.refresh(created["AccessToken"]["Token"], created["RefreshToken"]), 503, "Fault")
    assert_envelope(api.login(created["DeviceToken"]), 200)
    emulator.set_faults(calls=["refresh", "login"])
    assert_envelope(api.login(created["DeviceToken"]), 503, "Fault")
    assert served(emulator)["error"] == 2


def test_faults_never_touch_the_admin_api_or_other_calls(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created()
    admin_token = api.admin_token()
    emulator.set_faults(error_rate=1.0, drop_after_commit_rate=0.0, calls=["create", "login", "find"])

    assert emulator.health()
    assert emulator.counters()["users_total"] == 1
    assert_envelope(api.user_exists(ClientId="x"), 200)
    assert_envelope(api.update(admin_token, created["DeviceToken"], {"FirstName": "A"}), 200)
    assert served(emulator)["error"] == 0
    assert_envelope(api.find(admin_token, DeviceToken=created["DeviceToken"]), 503, "Fault")
    assert served(emulator)["error"] == 1


@pytest.mark.parametrize("call", ["update", "delete", "change_instance"])
def test_a_management_write_can_commit_and_lose_its_answer(emulator: EmulatorHandle, api: Api, call: str) -> None:
    created = api.created()
    token = api.admin_token()
    emulator.set_faults(script=[{"call": call, "fault": "drop_after_commit"}])
    writes = {
        "update": lambda: api.update(token, created["DeviceToken"], {"FirstName": "Dropped"}),
        "delete": lambda: api.delete(token, created["DeviceToken"]),
        "change_instance": lambda: api.change_instance(
            token,
            {
                "DeviceToken": created["DeviceToken"],
                "ToInstanceId": emulator.instance_id("fleet-eu"),
                "ToInstanceKey": emulator.instance_key("fleet-eu"),
            },
        ),
    }

    with pytest.raises(requests.ConnectionError):
        writes[call]()

    user = emulator.user(created["DeviceToken"])
    committed = {
        "update": lambda: user is not None and user["Profile"]["FirstName"] == "Dropped",
        "delete": lambda: user is None,
        "change_instance": lambda: user is not None and user["InstanceId"] == emulator.instance_id("fleet-eu"),
    }
    assert committed[call]()
    assert served(emulator)["drop_after_commit"] == 1


def test_faults_patch_keeps_unset_keys_and_reset_clears_them(emulator: EmulatorHandle) -> None:
    emulator.set_faults(latency_ms=[5, 10], error_rate=0.1, retry_after_s=4)

    faults = emulator.set_faults(error_status=504)

    assert faults["latency_ms"] == [5, 10]
    assert faults["error_rate"] == 0.1
    assert faults["retry_after_s"] == 4
    assert faults["error_status"] == 504
    assert faults["calls"] == [
        "create",
        "create_many",
        "refresh",
        "login",
        "find",
        "get_filtered_page",
        "update",
        "delete",
        "change_instance",
    ]
    emulator.reset()
    assert emulator.faults()["error_rate"] == 0
    assert emulator.faults()["error_status"] == 503
