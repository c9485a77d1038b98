"""The fleet's one admin session on fakes: every interleaving that could present an admin refresh token twice or log
in more than needed. The minimum: one Login for the whole fleet, plus exactly one more per admin answer lost (a lost
Refresh or Login answer leaves no usable token: only Login recovers it, within the fleet's Login budget).

Each "container" is a FleetAdminSession of its own over the one stored session, as the lifecycle and reconcile
functions' containers are. ``InFlight`` runs what happens while a call is in flight: after the request left, before
the upstream handles it (a slow answer, another worker acting meanwhile)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from local.fake_lifecycle import InMemoryAdminSessionStore, StaticAdminCredentials
from local.fakes import FakeUserService, InMemoryLoginBudget
from telematics_reg.errors import OutcomeUnknownError, TransientUpstreamError, UnauthorizedError
from telematics_reg.lifecycle.admin import AdminCredentialsError, AdminSessionUnavailableError, FleetAdminSession
from telematics_reg.management_models import AdminCredentials, AdminSession
from telematics_reg.store import StoreError

from .conftest import TIMING, FakeClock, World

ADMIN = AdminCredentials(email="ops@example.com", password="pw")
DAY = 86_400


class InFlight:
    """The fake User Service; ``before[call]`` hooks run once each while that call is in flight."""

    def __init__(self, fake: FakeUserService) -> None:
        self.fake = fake
        self.before: dict[str, list[Callable[[], None]]] = {}
        self.presented: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fake, name)

    def admin_refresh(self, access_token: Any, refresh_token: Any) -> AdminSession:
        self.presented.append(getattr(refresh_token, "get_secret_value", lambda: refresh_token)())
        self._in_flight("admin_refresh")
        return self.fake.admin_refresh(access_token, refresh_token)

    def admin_login(self, admin: AdminCredentials) -> AdminSession:
        self._in_flight("admin_login")
        return self.fake.admin_login(admin)

    def _in_flight(self, call: str) -> None:
        for hook in self.before.pop(call, []):
            hook()


@pytest.fixture
def upstream(world: World) -> InFlight:
    world.upstream.admin = ADMIN
    return InFlight(world.upstream)


@pytest.fixture
def store() -> InMemoryAdminSessionStore:
    return InMemoryAdminSessionStore()


def container(
    world: World,
    upstream: InFlight,
    store: Any,
    *,
    ahead: float = 0.0,
    **options: Any,
) -> FleetAdminSession:
    """A container's session; its clock runs ``ahead`` of the others' (the clock skew allowed is TIMING's)."""
    clock: Callable[[], float] = world.clock if not ahead else (lambda: world.clock() + ahead)
    return FleetAdminSession(
        upstream=upstream,  # type: ignore[arg-type]
        store=store,
        credentials=StaticAdminCredentials(ADMIN),
        timing=TIMING,
        clock=clock,
        sleep=world.clock.sleep,
        **options,
    )


def noop(token: object) -> str:
    return "ok"


def calls(world: World) -> tuple[int, int]:
    return world.upstream.calls["admin_login"], world.upstream.calls["admin_refresh"]


def assert_no_token_presented_twice(world: World, upstream: InFlight) -> None:
    assert len(upstream.presented) == len(set(upstream.presented)), "an admin refresh token was presented twice"
    assert world.upstream.rejected_admin_refresh_tokens == 0


# ---------------------------------------------------------------------------------- slow answers, clocks ahead


@pytest.mark.parametrize(
    ("call_seconds", "ahead"),
    [
        (100.0, 0.0),  # slower than a 60 s lease, within the longest call the client allows (142.2 s)
        (55.0, 10.0),  # within 60 s, but the second worker's clock runs 10 s ahead (the skew allowed)
        (140.0, 10.0),  # both at their bounds
    ],
)
def test_a_slow_admin_refresh_is_never_taken_over_so_its_token_is_presented_once(
    world: World, upstream: InFlight, store: InMemoryAdminSessionStore, call_seconds: float, ahead: float
) -> None:
    a = container(world, upstream, store)
    b = container(world, upstream, store, ahead=ahead, wait_seconds=0)
    a.call(noop)
    world.clock.now += DAY  # the admin JWT is due
    seen: list[str] = []

    def while_a_refreshes() -> None:
        world.clock.now += call_seconds
        try:
            seen.append(b.call(noop))
        except AdminSessionUnavailableError:
            seen.append("busy")  # b waits for a's renewal: the lifecycle change is retried

    upstream.before["admin_refresh"] = [while_a_refreshes]
    assert a.call(noop) == "ok"
    assert seen == ["busy"]
    assert_no_token_presented_twice(world, upstream)
    assert calls(world) == (1, 1)
    assert b.call(noop) == "ok"  # a's rotation is stored: b uses it
    assert calls(world) == (1, 1)


def test_a_lapsed_lease_means_the_token_may_be_spent_so_the_taker_logs_in_instead_of_presenting_it(
    world: World, upstream: InFlight, store: InMemoryAdminSessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    a = container(world, upstream, store)
    a.call(noop)
    world.clock.now += DAY
    # A worker leased the session and was cut off mid-Refresh, after the upstream rotated the pair: its lease lapses.
    item = store.get()
    assert item is not None
    assert item.access_token
    assert item.refresh_token
    assert store.lease(version=item.version, owner="cut-off", now=world.clock(), ttl=TIMING.lease_seconds)
    upstream.admin_refresh(item.access_token, item.refresh_token)
    world.clock.now += TIMING.lease_seconds + 1
    watch(caplog)

    b = container(world, upstream, store)
    assert b.call(noop) == "ok"
    assert_no_token_presented_twice(world, upstream)
    assert calls(world) == (2, 1)  # the first Login, and one for the answer the cut-off worker lost
    assert logins_logged(caplog) == [("renewal_unfinished", "ok")]
    assert b.call(noop) == "ok"
    assert calls(world) == (2, 1)


# ---------------------------------------------------------------------------------- lost answers


def test_a_lost_admin_refresh_answer_costs_one_login_at_once_and_its_token_is_never_presented_again(
    world: World, upstream: InFlight, store: InMemoryAdminSessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    a = container(world, upstream, store)
    b = container(world, upstream, store)
    a.call(noop)
    world.clock.now += DAY
    world.upstream.fail_next(OutcomeUnknownError("lost", status=None), calls=["admin_refresh"], after_commit=True)
    watch(caplog)
    assert a.call(noop) == "ok"  # recovered by Login in the same renewal: the change is not failed for it
    assert b.call(noop) == "ok"
    assert_no_token_presented_twice(world, upstream)
    assert calls(world) == (2, 1)
    assert (a.logins, a.refreshes, a.answers_lost) == (2, 0, 1)
    assert a.logins_by_cause == {"no_session": 1, "refresh_answer_lost": 1}
    assert logins_logged(caplog) == [("refresh_answer_lost", "ok")]
    assert answers_lost_logged(caplog) == ["admin_refresh"]


def test_a_lost_admin_login_answer_costs_exactly_one_more_login_in_any_container(
    world: World, upstream: InFlight, store: InMemoryAdminSessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    a = container(world, upstream, store)
    b = container(world, upstream, store)
    watch(caplog)
    lost = TransientUpstreamError("User Service admin_login: no answer", call="admin_login")
    world.upstream.fail_next(lost, calls=["admin_login"], after_commit=True)
    with pytest.raises(AdminSessionUnavailableError):
        a.call(noop)
    assert b.call(noop) == "ok"
    assert a.call(noop) == "ok"
    assert calls(world) == (2, 0)
    assert logins_logged(caplog) == [("no_session", "answer_lost"), ("login_answer_lost", "ok")]
    assert answers_lost_logged(caplog) == ["admin_login"]


def test_a_lost_refresh_answer_then_a_lost_login_answer_cost_two_logins(
    world: World, upstream: InFlight, store: InMemoryAdminSessionStore
) -> None:
    a = container(world, upstream, store)
    a.call(noop)
    world.clock.now += DAY
    world.upstream.fail_next(OutcomeUnknownError("lost", status=None), calls=["admin_refresh"], after_commit=True)
    world.upstream.fail_next(TransientUpstreamError("no answer"), calls=["admin_login"], after_commit=True)
    with pytest.raises(AdminSessionUnavailableError):
        a.call(noop)
    assert a.call(noop) == "ok"
    assert_no_token_presented_twice(world, upstream)
    assert calls(world) == (3, 1)  # 1 + 2 lost answers
    assert a.answers_lost == 2


def test_a_slow_lost_refresh_renews_the_lease_before_its_login_so_no_one_logs_in_alongside(
    world: World, upstream: InFlight, store: InMemoryAdminSessionStore
) -> None:
    a = container(world, upstream, store)
    b = container(world, upstream, store, ahead=10.0, wait_seconds=0)
    a.call(noop)
    world.clock.now += DAY

    def slow() -> None:
        world.clock.now += 100  # 80 s of lease left: too little for a Login and its commit
        world.upstream.fail_next(OutcomeUnknownError("lost", status=None), calls=["admin_refresh"], after_commit=True)

    def while_a_logs_in() -> None:
        world.clock.now += 130  # past the first lease by b's clock: only a renewed one keeps b out
        with pytest.raises(AdminSessionUnavailableError):
            b.call(noop)

    upstream.before["admin_refresh"] = [slow]
    upstream.before["admin_login"] = [while_a_logs_in]
    assert a.call(noop) == "ok"
    assert calls(world) == (2, 1)
    assert_no_token_presented_twice(world, upstream)


def test_a_login_deferred_after_a_lost_answer_leaves_the_token_dead_and_the_cause_for_the_next_login(
    world: World, upstream: InFlight, store: InMemoryAdminSessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    a = container(world, upstream, store)
    a.call(noop)
    world.clock.now += DAY
    world.upstream.login_budget = InMemoryLoginBudget(per_minute=0, clock=world.clock)
    world.upstream.fail_next(OutcomeUnknownError("lost", status=None), calls=["admin_refresh"], after_commit=True)
    watch(caplog)
    with pytest.raises(AdminSessionUnavailableError):
        a.call(noop)  # the budget is spent: nothing sent
    world.upstream.login_budget = InMemoryLoginBudget(per_minute=5, clock=world.clock)
    b = container(world, upstream, store)
    assert b.call(noop) == "ok"
    assert_no_token_presented_twice(world, upstream)
    assert calls(world) == (2, 1)
    assert logins_logged(caplog) == [("refresh_answer_lost", "ok")]


def test_a_store_failure_on_the_commit_is_retried_so_the_rotation_is_not_lost(
    world: World, upstream: InFlight, store: InMemoryAdminSessionStore
) -> None:
    class FlakyCommit(InMemoryAdminSessionStore):
        failures = 2

        def commit(self, **kwargs: Any) -> bool:
            if self.failures:
                self.failures -= 1
                raise StoreError("DynamoDB update_item failed: ProvisionedThroughputExceededException")
            return super().commit(**kwargs)

    flaky = FlakyCommit()
    a = container(world, upstream, flaky)
    a.call(noop)
    world.clock.now += DAY
    assert a.call(noop) == "ok"
    b = container(world, upstream, flaky)
    world.clock.now += TIMING.lease_seconds + 1
    assert b.call(noop) == "ok"
    assert_no_token_presented_twice(world, upstream)
    assert calls(world) == (1, 1)


# ---------------------------------------------------------------------------------- cold containers, 401s


def test_two_cold_containers_at_once_make_one_login(
    world: World, upstream: InFlight, store: InMemoryAdminSessionStore
) -> None:
    a = container(world, upstream, store)
    b = container(world, upstream, store)

    def while_a_logs_in() -> None:
        world.clock.now += 3
        with pytest.raises(AdminSessionUnavailableError):
            b.call(noop)  # waits its wait_seconds for a's Login, then says busy (the change is retried)

    upstream.before["admin_login"] = [while_a_logs_in]
    assert a.call(noop) == "ok"
    assert b.call(noop) == "ok"
    assert calls(world) == (1, 0)


def test_a_401_in_two_containers_renews_the_fleet_session_once(
    world: World, upstream: InFlight, store: InMemoryAdminSessionStore
) -> None:
    a = container(world, upstream, store)
    b = container(world, upstream, store)
    a.call(noop)
    b.call(noop)
    refused: set[str] = set()

    def management_call(token: Any) -> str:
        value = token.get_secret_value()
        if not refused or value in refused:  # the upstream stops taking the first JWT (say, revoked)
            refused.add(value)
            raise UnauthorizedError("Unauthorized", status=401)
        return "ok"

    assert a.call(management_call) == "ok"
    assert b.call(management_call) == "ok"  # its cached JWT is refused too: it finds a's renewal stored
    assert calls(world) == (1, 1)
    assert_no_token_presented_twice(world, upstream)


def test_a_lifetime_shorter_than_the_margin_does_not_renew_on_every_call(
    world: World, upstream: InFlight, store: InMemoryAdminSessionStore
) -> None:
    world.upstream.admin_token_lifetime = 120  # the soak's tokens live 120 s; the admin margin is 300 s
    a = container(world, upstream, store)
    for _ in range(10):
        a.call(noop)
        world.clock.now += 5
    assert calls(world) == (1, 0)
    world.clock.now += 60  # past half the lifetime: renewed before it expires
    a.call(noop)
    assert calls(world) == (1, 1)


def test_the_default_timing_is_the_production_one() -> None:
    clock = FakeClock()
    session = FleetAdminSession(
        upstream=FakeUserService(clock=clock),
        store=InMemoryAdminSessionStore(),
        credentials=StaticAdminCredentials(ADMIN),
        clock=clock,
    )
    assert session.timing.lease_seconds >= session.timing.needed_for_call


# ---------------------------------------------------------------------------------- what the logs say


def watch(caplog: pytest.LogCaptureFixture) -> None:
    """Capture the session's log lines from here on."""
    caplog.set_level(logging.INFO, logger="telematics-registration")
    caplog.clear()


def logins_logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (getattr(r, "cause", ""), getattr(r, "outcome", "")) for r in caplog.records if r.getMessage() == "admin Login"
    ]


def answers_lost_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, "call", "") for r in caplog.records if r.getMessage() == "admin answer lost"]


def test_unreadable_admin_credentials_give_the_lease_back_so_no_lost_answer_is_counted(
    world: World, upstream: InFlight, store: InMemoryAdminSessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    class Unreadable:
        def get(self) -> AdminCredentials:
            raise AdminCredentialsError("cannot read the admin credentials secret: GetParameterError")

    broken = FleetAdminSession(
        upstream=upstream,  # type: ignore[arg-type]
        store=store,
        credentials=Unreadable(),
        timing=TIMING,
        clock=world.clock,
        sleep=world.clock.sleep,
    )
    with pytest.raises(AdminCredentialsError):
        broken.call(noop)
    assert store.item is not None
    assert store.item.lease_owner is None
    watch(caplog)
    assert container(world, upstream, store).call(noop) == "ok"
    assert logins_logged(caplog) == [("no_session", "ok")]
    assert answers_lost_logged(caplog) == []
