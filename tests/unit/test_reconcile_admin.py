"""The reconcile flow's simple admin session on the fake User Service: one Login, then refreshes; a refused JWT is
renewed once; a dead refresh token goes to Login; a spent Login budget defers without a call."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from telematics_reg.budget import InMemoryLoginBudget
from telematics_reg.errors import LoginDeferredError, UnauthorizedError
from telematics_reg.fakes import FakeUserService
from telematics_reg.management_models import AdminCredentials, UserPageQuery
from telematics_reg.reconcile.admin import LoggedInAdminSession, StaticAdminCredentials

ADMIN = AdminCredentials(email="ops@example.com", password="pw")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _session(fake: FakeUserService, clock: Clock) -> LoggedInAdminSession:
    return LoggedInAdminSession(
        upstream=fake, credentials=StaticAdminCredentials(ADMIN), margin_seconds=300, clock=clock
    )


def test_one_login_then_the_jwt_is_reused_and_refreshed_before_it_expires() -> None:
    clock = Clock()
    fake = FakeUserService(admin=ADMIN, clock=clock)
    session = _session(fake, clock)

    for _ in range(3):
        session.call(lambda token: fake.users_page(token, UserPageQuery()))
    clock.now += 86_400 - 200  # within the margin of the JWT's 24 h
    session.call(lambda token: fake.users_page(token, UserPageQuery()))

    assert (session.logins, session.refreshes) == (1, 1)
    assert fake.calls["admin_login"] == 1


def test_a_refused_jwt_is_renewed_once_and_the_call_repeated() -> None:
    clock = Clock()
    fake = FakeUserService(admin=ADMIN, clock=clock)
    session = _session(fake, clock)
    seen: list[SecretStr] = []

    def call(token: SecretStr) -> int:
        seen.append(token)
        if len(seen) == 1:
            raise UnauthorizedError("refused", status=401, call="users_page")
        return len(seen)

    assert session.call(call) == 2
    assert seen[0] != seen[1]
    assert (session.logins, session.refreshes) == (1, 1)


def test_a_dead_refresh_token_goes_to_login_within_the_budget() -> None:
    clock = Clock()
    fake = FakeUserService(admin=ADMIN, clock=clock)
    session = _session(fake, clock)
    session.call(lambda token: fake.users_page(token, UserPageQuery()))
    fake._admin_refresh_tokens.clear()
    clock.now += 86_400 - 100

    session.call(lambda token: fake.users_page(token, UserPageQuery()))

    assert (session.logins, session.refreshes) == (2, 0)


def test_no_admin_login_when_the_fleet_budget_is_spent() -> None:
    clock = Clock()
    budget = InMemoryLoginBudget(per_minute=0, clock=clock)
    fake = FakeUserService(admin=ADMIN, clock=clock, login_budget=budget)
    session = _session(fake, clock)

    with pytest.raises(LoginDeferredError):
        session.call(lambda token: fake.users_page(token, UserPageQuery()))
    assert fake.calls["admin_login"] == 0
