"""The vendor's Login limit (admin-auth.md, error-handling.md): 5 Login calls a minute per source IP, user and
admin together; the next one is 429 and the IP is blocked from Login for an hour. On by default."""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter

from local.emulator.login_limit import LoginLimiter
from local.emulator.settings import load_settings
from local.emulator.testing import EmulatorError, EmulatorHandle, login_limit_relaxations, running_emulator
from tests.functional.emulator.helpers import Api, assert_envelope


class _FromAddress(HTTPAdapter):
    """Connect from another loopback address (Linux routes all of 127.0.0.0/8 to lo)."""

    def __init__(self, address: str) -> None:
        self._address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self._address, 0)
        super().init_poolmanager(*args, **kwargs)


def session_from(address: str) -> requests.Session:
    session = requests.Session()
    session.mount("http://", _FromAddress(address))
    return session


def test_the_sixth_login_in_a_minute_is_429_and_blocks_every_login_for_an_hour(
    emulator: EmulatorHandle, api: Api
) -> None:
    user = api.created()
    # User and admin Logins count together, failed ones too.
    answers = [
        api.login(user["DeviceToken"]).status_code,
        api.post("/v1/Auth/Login", emulator.admin_login_body()).status_code,
        api.login(user["DeviceToken"], password="wrong").status_code,
        api.login(user["DeviceToken"]).status_code,
        api.post("/v1/Auth/Login", emulator.admin_login_body()).status_code,
    ]
    assert answers == [200, 200, 401, 200, 200]

    sixth = api.login(user["DeviceToken"])

    assert_envelope(sixth, 429, "Login")
    assert sixth.headers["Retry-After"] == "3600"
    later = api.post("/v1/Auth/Login", emulator.admin_login_body())
    assert_envelope(later, 429, "Login")
    assert 3590 <= int(later.headers["Retry-After"]) <= 3600
    counters = emulator.counters()
    assert counters["logins_refused_by_limit"] == 2
    assert counters["login_blocks_begun"] == 1
    assert counters["login_blocked_addresses"] == ["127.0.0.1"]
    assert (counters["logins"], counters["admin_logins"]) == (2, 2)  # the refused ones did nothing


def test_only_login_is_blocked(emulator: EmulatorHandle, api: Api) -> None:
    user = api.created()
    token = api.admin_token()
    for _ in range(5):
        api.login(user["DeviceToken"], password="wrong")
    assert_envelope(api.login(user["DeviceToken"]), 429, "Login")

    assert_envelope(api.create(), 200)
    assert_envelope(api.refresh(user["AccessToken"]["Token"], user["RefreshToken"]), 200)
    assert_envelope(api.find(token, DeviceToken=user["DeviceToken"]), 200)
    assert_envelope(api.user_exists(ClientId="x"), 200)


def test_the_limit_is_per_source_address(emulator: EmulatorHandle, api: Api) -> None:
    for _ in range(6):
        api.post("/v1/Auth/Login", emulator.admin_login_body())
    assert emulator.counters()["login_blocked_addresses"] == ["127.0.0.1"]

    with session_from("127.0.0.2") as other:
        response = other.post(f"{emulator.url}/v1/Auth/Login", json=emulator.admin_login_body(), timeout=10)

    assert_envelope(response, 200)


def test_reset_lifts_the_block(emulator: EmulatorHandle, api: Api) -> None:
    for _ in range(6):
        api.post("/v1/Auth/Login", emulator.admin_login_body())

    emulator.reset()

    assert_envelope(api.post("/v1/Auth/Login", emulator.admin_login_body()), 200)
    counters = emulator.counters()
    assert (counters["logins_refused_by_limit"], counters["login_blocks_begun"]) == (0, 0)
    assert counters["login_blocked_addresses"] == []


def test_the_limit_can_be_switched_off_and_changed_at_run_time(emulator: EmulatorHandle, api: Api) -> None:
    emulator.relax_login_limit(0, why="this test checks that 0 switches the limit off")
    for _ in range(12):
        assert_envelope(api.post("/v1/Auth/Login", emulator.admin_login_body()), 200)

    emulator.set_config(login_limit_per_minute=1)  # stricter than the vendor: no reason needed

    assert emulator.config()["login_limit_per_minute"] == 1
    assert_envelope(api.post("/v1/Auth/Login", emulator.admin_login_body()), 200)
    assert_envelope(api.post("/v1/Auth/Login", emulator.admin_login_body()), 429, "Login")
    assert any("0 switches the limit off" in line for line in login_limit_relaxations())


def test_a_relaxation_must_say_why(emulator: EmulatorHandle) -> None:
    with pytest.raises(ValueError, match="relax_login_limit"):
        emulator.set_config(login_limit_per_minute=0)
    with pytest.raises(ValueError, match="reason"):
        emulator.relax_login_limit(50, why=" ")
    with pytest.raises(ValueError, match="reason"), running_emulator(login_limit_per_minute=0):
        pass
    assert emulator.config()["login_limit_per_minute"] == 5


def test_the_limit_and_block_are_set_at_start_and_printed() -> None:
    with running_emulator(
        login_limit_per_minute=2,  # EMULATOR_LOGIN_LIMIT_PER_MINUTE
        login_block_s=2,  # EMULATOR_LOGIN_BLOCK_S
        login_limit_reason="this test waits for the end of a block",
    ) as emulator:
        short = Api(emulator)
        assert emulator.config()["login_limit_per_minute"] == 2
        assert emulator.login_limit_line.startswith("login limit: 2 Logins a minute per source address")
        assert "relaxed" in emulator.login_limit_line  # a 2 s block is shorter than the vendor's hour
        assert_envelope(short.post("/v1/Auth/Login", emulator.admin_login_body()), 200)
        assert_envelope(short.post("/v1/Auth/Login", emulator.admin_login_body()), 200)
        third = short.post("/v1/Auth/Login", emulator.admin_login_body())
        assert_envelope(third, 429, "Login")
        assert third.headers["Retry-After"] == "2"
        time.sleep(2.2)
        # The block is over; the window forgot the calls that began it.
        assert_envelope(short.post("/v1/Auth/Login", emulator.admin_login_body()), 200)
        short.session.close()


def test_the_default_is_the_vendors_and_says_so() -> None:
    with running_emulator() as emulator:
        assert emulator.config()["login_limit_per_minute"] == 5
        assert emulator.config()["login_block_s"] == 3600
        assert emulator.login_limit_line.endswith("(the vendor's)")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EMULATOR_LOGIN_LIMIT_PER_MINUTE": "-1"}, "Login limit"),
        ({"EMULATOR_LOGIN_BLOCK_S": "0"}, "Login block"),
        ({"EMULATOR_LOGIN_LIMIT_PER_MINUTE": "many"}, "EMULATOR_LOGIN_LIMIT_PER_MINUTE"),
    ],
)
def test_a_bad_limit_at_start_fails_fast(env: dict[str, str], message: str) -> None:
    with pytest.raises(EmulatorError, match=message), running_emulator(env=env):
        pass


def test_the_flags_win_over_the_environment() -> None:
    settings = load_settings(
        ["--login-limit-per-minute", "0", "--login-block-s", "60", "--admin", '{"email": "a@b.c", "password": "p"}'],
        {"EMULATOR_LOGIN_LIMIT_PER_MINUTE": "3", "EMULATOR_LOGIN_BLOCK_S": "10", "EMULATOR_ADMIN": "{}"},
    )

    assert (settings.login_limit_per_minute, settings.login_block_s) == (0, 60)
    assert (settings.admin.email, settings.admin.password, settings.admin_generated) == ("a@b.c", "p", False)
    assert settings.login_limit_line().startswith("login limit: OFF")


# --- the window itself, on a clock of our own -------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_window_slides_instead_of_counting_calendar_minutes() -> None:
    clock = Clock()
    limiter = LoginLimiter(clock)
    clock.now = 1059.0
    assert all(limiter.admit("a", 5, 3600) is None for _ in range(5))

    clock.now = 1061.0  # a new calendar minute, but the five are still within the last 60 s

    refusal = limiter.admit("a", 5, 3600)
    assert refusal is not None
    assert (refusal.retry_after_s, refusal.began) == (3600, True)


def test_calls_older_than_a_minute_leave_the_window() -> None:
    clock = Clock()
    limiter = LoginLimiter(clock)
    for second in range(5):
        clock.now = 1000.0 + second * 10
        assert limiter.admit("a", 5, 3600) is None

    clock.now = 1060.5  # the first call (t=1000) has left the window

    assert limiter.admit("a", 5, 3600) is None
    assert limiter.admit("a", 5, 3600) is not None


def test_a_block_ends_after_block_s_and_counts_its_refusals() -> None:
    clock = Clock()
    limiter = LoginLimiter(clock)
    for _ in range(3):
        limiter.admit("a", 2, 100)
    clock.now += 40
    during = limiter.admit("a", 2, 100)
    assert during is not None
    assert (during.retry_after_s, during.began) == (60, False)
    assert limiter.admit("b", 2, 100) is None
    assert limiter.blocked_addresses() == ["a"]

    clock.now += 60

    assert limiter.admit("a", 2, 100) is None
    assert (limiter.refused, limiter.blocks_begun) == (2, 1)
    assert limiter.blocked_addresses() == []


def test_zero_switches_the_limit_off() -> None:
    limiter = LoginLimiter(Clock())

    assert all(limiter.admit("a", 0, 3600) is None for _ in range(100))
