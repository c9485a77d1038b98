"""Two rotators must never both spend a user's tokens, and a worker that lost its lease must never store, mark or
discard over the worker that took it: the interleavings of a slow answer and clocks that disagree.

Each test runs two workers on threads against the same in-memory store and fake upstream. W1 is stopped inside its
upstream call (the answer is slow: its clock moves on) while W2, whose clock runs ahead, acts; then W1's answer
arrives. The upstream's single-use refresh tokens tell which pair is live: the stored one must be it.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from local.fakes import FakeUserService
from telematics_reg.errors import UnauthorizedError
from telematics_reg.models import CreateResult, InstanceCredentials
from telematics_reg.outcomes import TokenRefreshFailed
from telematics_reg.refresh import RefreshJob, RefreshOutcome, TokenRefresher
from telematics_reg.store import UserRecord, UserStatus

from .conftest import TIMING, World

WAIT = 5.0  # seconds a thread waits for the other before the test fails (never reached when all is well)


class SkewedClock:
    """Another worker's clock: the shared clock plus ``ahead`` seconds; its sleeps move the shared time."""

    def __init__(self, world: World, ahead: float, before_sleep: Callable[[], None] = lambda: None) -> None:
        self._world = world
        self._ahead = ahead
        self._before_sleep = before_sleep

    def __call__(self) -> float:
        return self._world.clock() + self._ahead

    def sleep(self, seconds: float) -> None:
        self._before_sleep()
        self._world.clock.now += seconds


@dataclass
class Steps:
    """Events that order the two workers."""

    w1_in_call: threading.Event = field(default_factory=threading.Event)
    w2_acted: threading.Event = field(default_factory=threading.Event)
    w1_done: threading.Event = field(default_factory=threading.Event)

    def w2_waits_for_w1(self) -> None:
        self.w2_acted.set()
        assert self.w1_done.wait(WAIT)


class SlowUpstream:
    """The fake upstream as one worker sees it: hooks run around its calls (a slow answer, a 401, ...)."""

    def __init__(self, real: FakeUserService) -> None:
        self._real = real
        self.around_refresh: Callable[[Callable[[], CreateResult]], CreateResult] = lambda call: call()
        self.around_login: Callable[[Callable[[], CreateResult]], CreateResult] = lambda call: call()

    def refresh(self, access_token: str, refresh_token: str) -> CreateResult:
        return self.around_refresh(lambda: self._real.refresh(access_token, refresh_token))

    def login(self, creds: InstanceCredentials, device_token: uuid.UUID) -> CreateResult:
        return self.around_login(lambda: self._real.login(creds, device_token))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _worker(world: World, upstream: SlowUpstream, clock: Callable[[], float], sleep: Callable[[float], None]) -> Any:
    return TokenRefresher(
        upstream=upstream,
        store=world.store,
        credentials=world.credentials,
        publisher=world.publisher,
        margin_seconds=600,
        timing=TIMING,
        clock=clock,
        sleep=sleep,
    )


def _register_due(world: World, client_id: str) -> UserRecord:
    result = world.intake.handle({"ClientId": client_id}, message_id=f"m-{client_id}", source="queue")
    world.clock.now += 3300  # tokens live 3600 s: due within the 600 s margin
    record = world.store.get_user(str(result.device_token))
    assert record is not None
    return record


def _run_w1(action: Callable[[], RefreshOutcome], steps: Steps) -> tuple[threading.Thread, list[RefreshOutcome]]:
    outcome: list[RefreshOutcome] = []

    def run() -> None:
        try:
            outcome.append(action())
        finally:
            steps.w1_done.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert steps.w1_in_call.wait(WAIT)
    return thread, outcome


def _live_refresh_token(world: World, device_token: str) -> str | None:
    return world.upstream.users[uuid.UUID(device_token)].refresh_token


def test_a_refresh_answer_as_slow_as_the_settings_allow_is_not_overtaken_by_the_read_path_on_a_clock_ahead(
    world: World,
) -> None:
    """The issue's interleaving: W1's Refresh rotates upstream but answers late; the read path (the CLI, never
    stopped at a Timeout), its clock ahead, asks for a token. It must not take the lease and log in (killing W1's
    pair), so that W1's commit stores a dead pair and the read path discards the only live one."""
    record = _register_due(world, "lease-1")
    steps = Steps()
    w1_upstream, w2_upstream = SlowUpstream(world.upstream), SlowUpstream(world.upstream)

    def slow_refresh(call: Callable[[], CreateResult]) -> CreateResult:
        result = call()  # rotated upstream: the stored refresh token is spent
        world.clock.now += TIMING.call_seconds  # the longest answer the client's settings allow
        steps.w1_in_call.set()
        assert steps.w2_acted.wait(WAIT)
        return result

    def slow_login(call: Callable[[], CreateResult]) -> CreateResult:
        result = call()
        steps.w2_waits_for_w1()  # W1's answer arrives while this Login's answer is on its way
        return result

    w1_upstream.around_refresh = slow_refresh
    w2_upstream.around_login = slow_login
    w1 = _worker(world, w1_upstream, world.clock, world.clock.sleep)
    w2_clock = SkewedClock(world, ahead=TIMING.clock_skew_seconds, before_sleep=steps.w2_waits_for_w1)
    w2 = _worker(world, w2_upstream, w2_clock, w2_clock.sleep)

    thread, w1_outcome = _run_w1(lambda: w1.refresh_job(RefreshJob(record.device_token, record.version)), steps)
    token = w2.valid_token(device_token=record.device_token, min_validity_seconds=300)
    steps.w2_acted.set()
    thread.join(WAIT)

    stored = world.store.get_user(record.device_token)
    assert stored is not None
    assert w1_outcome == [RefreshOutcome.REFRESHED]
    assert world.upstream.calls["login"] == 0  # the read path waited for the lease instead of logging in
    assert stored.refresh_token == _live_refresh_token(world, record.device_token)
    assert token.access_token == stored.access_token  # what the read path handed out is the stored, live token
    assert stored.version == record.version + 1


def test_a_slow_refresh_is_not_overtaken_by_a_worker_whose_login_fails_and_marks_the_user(world: World) -> None:
    """The variant: W2 (clock ahead) takes the lease W1 still needs, its Login is refused, and marking the user
    NEEDS_RELOGIN bumps the version, so W1's valid pair is discarded as well."""
    record = _register_due(world, "lease-2")
    world.upstream.disable_login(uuid.UUID(record.device_token))
    steps = Steps()
    w1_upstream = SlowUpstream(world.upstream)

    def slow_refresh(call: Callable[[], CreateResult]) -> CreateResult:
        result = call()
        world.clock.now += TIMING.call_seconds
        steps.w1_in_call.set()
        assert steps.w2_acted.wait(WAIT)
        return result

    w1_upstream.around_refresh = slow_refresh
    w1 = _worker(world, w1_upstream, world.clock, world.clock.sleep)
    w2_clock = SkewedClock(world, ahead=TIMING.clock_skew_seconds)
    w2 = _worker(world, SlowUpstream(world.upstream), w2_clock, w2_clock.sleep)

    thread, w1_outcome = _run_w1(lambda: w1.refresh_job(RefreshJob(record.device_token, record.version)), steps)
    w2_outcome = w2.refresh_job(RefreshJob(record.device_token, record.version))
    steps.w2_acted.set()
    thread.join(WAIT)

    stored = world.store.get_user(record.device_token)
    assert stored is not None
    assert (w1_outcome, w2_outcome) == ([RefreshOutcome.REFRESHED], RefreshOutcome.LEASE_CONFLICT)
    assert stored.status is UserStatus.ACTIVE
    assert stored.refresh_token == _live_refresh_token(world, record.device_token)
    assert world.publisher.of_type(TokenRefreshFailed) == []


def test_a_worker_that_ran_past_its_lease_cannot_store_its_pair_over_the_worker_that_took_it_over(
    world: World,
) -> None:
    """Past every bound (an answer trickling in longer than the lease): W2 rightly takes the lapsed lease and logs
    in, which kills W1's pair. W1's late commit must be refused (owner), not stored as the newest version, and it
    must say so rather than report a refresh."""
    record = _register_due(world, "lease-3")
    steps = Steps()
    w1_upstream, w2_upstream = SlowUpstream(world.upstream), SlowUpstream(world.upstream)

    def hung_refresh(call: Callable[[], CreateResult]) -> CreateResult:
        result = call()
        world.clock.now += TIMING.lease_seconds + 1
        steps.w1_in_call.set()
        assert steps.w2_acted.wait(WAIT)
        return result

    def slow_login(call: Callable[[], CreateResult]) -> CreateResult:
        result = call()
        steps.w2_waits_for_w1()
        return result

    w1_upstream.around_refresh = hung_refresh
    w2_upstream.around_login = slow_login
    w1 = _worker(world, w1_upstream, world.clock, world.clock.sleep)
    w2 = _worker(world, w2_upstream, world.clock, world.clock.sleep)

    thread, w1_outcome = _run_w1(lambda: w1.refresh_job(RefreshJob(record.device_token, record.version)), steps)
    w2_outcome = w2.refresh_job(RefreshJob(record.device_token, record.version))
    steps.w2_acted.set()
    thread.join(WAIT)

    stored = world.store.get_user(record.device_token)
    assert stored is not None
    assert (w1_outcome, w2_outcome) == ([RefreshOutcome.LEASE_LOST], RefreshOutcome.LOGGED_IN)
    assert stored.refresh_token == _live_refresh_token(world, record.device_token)
    assert stored.version == record.version + 1
    assert not stored.refresh_token_dead


def test_a_worker_that_ran_past_its_lease_cannot_mark_the_user_under_the_worker_that_took_it_over(
    world: World,
) -> None:
    """W1's Login (after a dead refresh token) runs past its lease and is refused with 401; meanwhile W2 took the
    lapsed lease and is logging in. W1 must not mark the user NEEDS_RELOGIN (nor announce it): that would bump the
    version under W2, whose commit of the only live pair would then fail."""
    record = _register_due(world, "lease-4")
    world.upstream.revoke(uuid.UUID(record.device_token))
    steps = Steps()
    w1_upstream, w2_upstream = SlowUpstream(world.upstream), SlowUpstream(world.upstream)

    def hung_then_refused(call: Callable[[], CreateResult]) -> CreateResult:
        world.clock.now += TIMING.lease_seconds + 1
        steps.w1_in_call.set()
        assert steps.w2_acted.wait(WAIT)
        raise UnauthorizedError("User Service login failed: Unauthorized", status=401, call="login")

    def slow_login(call: Callable[[], CreateResult]) -> CreateResult:
        steps.w2_waits_for_w1()
        return call()

    w1_upstream.around_login = hung_then_refused
    w2_upstream.around_login = slow_login
    w1 = _worker(world, w1_upstream, world.clock, world.clock.sleep)
    w2 = _worker(world, w2_upstream, world.clock, world.clock.sleep)

    thread, w1_outcome = _run_w1(lambda: w1.refresh_job(RefreshJob(record.device_token, record.version)), steps)
    w2_result: list[RefreshOutcome] = []
    w2_thread = threading.Thread(
        target=lambda: w2_result.append(w2.refresh_job(RefreshJob(record.device_token, record.version)))
    )
    w2_thread.start()
    thread.join(WAIT)
    w2_thread.join(WAIT)

    stored = world.store.get_user(record.device_token)
    assert stored is not None
    assert (w1_outcome, w2_result) == ([RefreshOutcome.LEASE_CONFLICT], [RefreshOutcome.LOGGED_IN])
    assert stored.status is UserStatus.ACTIVE
    assert stored.refresh_token == _live_refresh_token(world, record.device_token)
    assert world.publisher.of_type(TokenRefreshFailed) == []


def test_a_worker_refuses_to_start_a_call_its_lease_cannot_hold_and_renews_it_first(world: World) -> None:
    """Time spent under the lease before the call (here: a slow store) leaves too little lease for the longest
    call: the worker renews the lease (a write conditioned on its ownership) before calling, never calls on a
    lease that another worker's clock may already see lapsed."""
    record = _register_due(world, "lease-5")
    renewals: list[float] = []
    renew = world.store.renew_lease

    def counting_renew(**kwargs: Any) -> int | None:
        renewals.append(kwargs["now"])
        return renew(**kwargs)

    world.store.renew_lease = counting_renew  # type: ignore[method-assign]
    acquire = world.store.acquire_lease

    def slow_acquire(**kwargs: Any) -> UserRecord | None:
        leased = acquire(**kwargs)
        world.clock.now += TIMING.lease_seconds - TIMING.needed_for_call + 1  # the answer came back late
        return leased

    world.store.acquire_lease = slow_acquire  # type: ignore[method-assign]

    outcome = world.refresher.refresh_job(RefreshJob(record.device_token, record.version))

    assert outcome is RefreshOutcome.REFRESHED
    assert len(renewals) == 1
    assert world.upstream.calls["refresh"] == 1
