"""50 clients at once for a few seconds: no unexpected error, and the counters agree with what they did."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from local.emulator.testing import EmulatorHandle, running_emulator

CLIENTS = 50
DURATION_S = 5.0
TIMEOUT_S = 15.0


@dataclass
class Tally:
    creates: int = 0
    create_many_calls: int = 0
    create_many_users: int = 0
    refreshes: int = 0
    logins: int = 0
    requests: int = 0
    client_ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Worker:
    """One client with its own pooled session, looping create → refresh (both paths) → sometimes login."""

    def __init__(self, emulator: EmulatorHandle, index: int, tally: Tally) -> None:
        self.emulator = emulator
        self.alias = "default" if index % 2 else "fleet-eu"
        self.index = index
        self.tally = tally
        self.session = requests.Session()

    def call(self, name: str, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
        self.tally.requests += 1
        try:
            response = self.session.post(self.emulator.url + path, json=body, headers=headers, timeout=TIMEOUT_S)
        except requests.RequestException as exc:
            self.tally.errors.append(f"{name}: {exc!r}")
            return None
        if response.status_code != 200 or response.json().get("Status") != 200:
            self.tally.errors.append(f"{name}: {response.status_code} {response.text[:200]}")
            return None
        return response.json()["Result"]

    def refresh(self, pair: dict[str, Any], path: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.call(
            "refresh", path, {"AccessToken": pair["AccessToken"]["Token"], "RefreshToken": pair["RefreshToken"]}
        )
        if result is not None:
            self.tally.refreshes += 1
        return result

    def run(self, deadline: float) -> None:
        headers = self.emulator.headers(self.alias)
        iteration = 0
        while time.monotonic() < deadline and not self.tally.errors:
            iteration += 1
            client_id = f"w{self.index}-{iteration}-{uuid.uuid4().hex[:6]}"
            pair = self.call("create", "/v1/Registration/Create", {"UserFields": {"ClientId": client_id}}, headers)
            if pair is None:
                continue
            self.tally.creates += 1
            self.tally.client_ids.append(client_id)
            for path in ("/v1/Auth/RefreshToken", "/v1/RefreshToken"):
                pair = self.refresh(pair, path) if pair is not None else None
            if pair is not None and iteration % 3 == 0:
                login = {
                    "LoginFields": {"DeviceToken": pair["DeviceToken"]},
                    "Password": self.emulator.instance_key(self.alias),
                }
                pair = self.call("login", "/v1/Auth/Login", login, {"InstanceId": headers["InstanceId"]})
                if pair is not None:
                    self.tally.logins += 1
                    self.refresh(pair, "/v1/Auth/RefreshToken")
            if iteration % 10 == 0:
                result = self.call("create_many", "/v1/Registration/CreateMany", {"Quantity": 2}, headers)
                if result is not None:
                    self.tally.create_many_calls += 1
                    self.tally.create_many_users += len(result["Results"])
        self.session.close()


@pytest.mark.slow
def test_fifty_concurrent_clients_see_no_error_and_consistent_counters() -> None:
    instances = {
        alias: {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())} for alias in ("default", "fleet-eu")
    }
    with running_emulator(
        instances,
        login_limit_per_minute=0,
        login_limit_reason="a load test of the emulator itself: fifty clients call Login as fast as they can",
    ) as emulator:
        tallies = [Tally() for _ in range(CLIENTS)]
        workers = [Worker(emulator, index, tally) for index, tally in enumerate(tallies)]
        deadline = time.monotonic() + DURATION_S
        threads = [threading.Thread(target=worker.run, args=(deadline,)) for worker in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=DURATION_S + 60)
        assert not any(thread.is_alive() for thread in threads)

        counters = emulator.counters()

    errors = [error for tally in tallies for error in tally.errors]
    assert errors == []
    creates = sum(tally.creates for tally in tallies)
    assert creates > CLIENTS  # every client got through several loops
    assert counters["creates"] == creates
    assert counters["create_many_calls"] == sum(tally.create_many_calls for tally in tallies)
    assert counters["create_many_users"] == sum(tally.create_many_users for tally in tallies)
    assert counters["users_total"] == creates + counters["create_many_users"]
    assert sum(counters["users_by_instance"].values()) == counters["users_total"]
    assert counters["refreshes"] == sum(tally.refreshes for tally in tallies)
    assert counters["logins"] == sum(tally.logins for tally in tallies)
    assert counters["rejected_refresh_tokens"] == 0
    assert counters["failed_logins"] == 0
    assert counters["requests_total"] == sum(tally.requests for tally in tallies)
    by_client = counters["users_by_client_id"]
    assert len(by_client) == creates
    assert set(by_client.values()) == {1}
    expected_keys = {
        f"{instances[worker.alias]['InstanceId']}/{client_id}"
        for worker, tally in zip(workers, tallies, strict=True)
        for client_id in tally.client_ids
    }
    assert set(by_client) == expected_keys
