"""Flow 3: keep every user's access token fresh, safe against concurrent refreshers, faults and dead tokens.

Three pieces:

* :class:`Sweeper` finds users whose token expires within the margin through the sparse, sharded
  ``RefreshDue`` index (cost grows with the users due, not the table) and queues one refresh job per user,
  each delayed by a random part of the spread so that a bulk-loaded cohort does not refresh all at once;
* :class:`TokenRefresher` refreshes one user under a lease, commits the rotated pair conditioned on the
  version, and falls back to Login (within the Login budget of the whole fleet) when the refresh token is dead;
* :meth:`TokenRefresher.valid_token` is the read path for the app backend.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from aws_lambda_powertools.metrics import MetricUnit

from telematics_reg.errors import (
    DeadRefreshTokenError,
    LoginDeferredError,
    OutcomeUnknownError,
    RateLimitedError,
    RetryableUpstreamError,
    TelematicsError,
    UnauthorizedError,
    UnknownInstanceError,
    UpstreamError,
)
from telematics_reg.models import CreateResult, InstanceCredentials
from telematics_reg.observability import logger, metrics
from telematics_reg.outcomes import EventPublisher, TokenRefreshFailed
from telematics_reg.registration import tokens_of
from telematics_reg.store import ConditionFailedError, StoreError, Tokens, TokenStore, UserRecord, UserStatus
from telematics_reg.timing import LeaseTiming

if TYPE_CHECKING:  # annotations only: importing the client (and requests) is left to the function's set-up
    from telematics_reg.credentials import CredentialsProvider
    from telematics_reg.upstream import UserService

#: Back-off after an upstream failure without a Retry-After (5xx, lost answer): DEFER_SECONDS plus up to as much
#: again, shortened when the access token expires sooner (down to DEFER_FLOOR_SECONDS).
DEFER_SECONDS = 30.0
DEFER_FLOOR_SECONDS = 5.0


class RefreshOutcome(StrEnum):
    REFRESHED = "refreshed"
    LOGGED_IN = "logged_in"  # the refresh token was dead (or the user had none) and Login recovered it
    FRESH = "fresh"  # nothing to do: not due (any more)
    LEASE_CONFLICT = "lease_conflict"  # another worker holds the user or moved it on
    LEASE_LOST = "lease_lost"  # our lease was taken over before our pair was stored: the new holder logs in
    DEFERRED = "deferred"  # upstream busy, Login budget spent or Login blocked: RetryAfter set, a later sweep takes it
    NEEDS_RELOGIN = "needs_relogin"  # refresh and Login both failed: marked, announced, out of the index
    GONE = "gone"  # no such user, or not one whose tokens we keep


@dataclass(frozen=True)
class RefreshJob:
    """One queued refresh: the user and the version the sweep saw."""

    device_token: str
    version: int

    def to_body(self) -> str:
        return json.dumps({"DeviceToken": self.device_token, "Version": self.version})

    @classmethod
    def from_body(cls, body: str) -> RefreshJob:
        data = json.loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("DeviceToken"), str):
            raise ValueError("refresh job needs a DeviceToken string")
        version = data.get("Version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError("refresh job needs an integer Version")
        return cls(data["DeviceToken"], version)


class RefreshJobQueue(Protocol):
    def enqueue(self, jobs: Sequence[tuple[RefreshJob, int]]) -> None:
        """Queue jobs, each with a delay in seconds (0..900)."""
        ...


class SqsRefreshJobQueue:
    """Refresh jobs on SQS, sent 10 at a time; entries SQS refuses are sent again, then reported."""

    def __init__(self, client: Any, *, queue_url: str) -> None:
        self._client = client
        self._queue_url = queue_url

    def enqueue(self, jobs: Sequence[tuple[RefreshJob, int]]) -> None:
        for start in range(0, len(jobs), 10):
            entries = [
                {"Id": str(i), "MessageBody": job.to_body(), "DelaySeconds": max(0, min(900, delay))}
                for i, (job, delay) in enumerate(jobs[start : start + 10])
            ]
            for _ in range(3):
                response = self._client.send_message_batch(QueueUrl=self._queue_url, Entries=entries)
                failed_ids = {f["Id"] for f in response.get("Failed", [])}
                entries = [e for e in entries if e["Id"] in failed_ids]
                if not entries:
                    break
            else:
                # The users stay due (and their QueuedUntil lapses): the next sweep queues them again.
                raise StoreError(f"{len(entries)} refresh jobs could not be queued")


@dataclass
class SweepReport:
    users_due: int = 0
    items_read: int = 0
    queued: int = 0
    already_queued: int = 0
    waiting_to_retry: int = 0
    leased: int = 0
    oldest_overdue_seconds: int = 0

    def add(self, other: SweepReport) -> None:
        for name in ("users_due", "items_read", "queued", "already_queued", "waiting_to_retry", "leased"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.oldest_overdue_seconds = max(self.oldest_overdue_seconds, other.oldest_overdue_seconds)


class Sweeper:
    """Queues a refresh job for every user whose token expires within ``margin_seconds``."""

    def __init__(
        self,
        *,
        store: TokenStore,
        queue: RefreshJobQueue,
        margin_seconds: int,
        spread_seconds: int,
        lease_seconds: int,
        page_size: int = 500,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._queue = queue
        self._margin = margin_seconds
        self._spread = spread_seconds
        self._lease = lease_seconds
        self._page_size = page_size
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy

    def sweep(self) -> SweepReport:
        """One pass over every shard of the index (shards in parallel). Reports what it saw and did."""
        now = self._clock()
        shards = [f"{n:03d}" for n in range(self._store.shards)]
        report = SweepReport()
        with ThreadPoolExecutor(max_workers=min(8, len(shards))) as pool:
            for shard_report in pool.map(lambda shard: self._sweep_shard(shard, now), shards):
                report.add(shard_report)
        metrics.add_metric("SweepUsersDue", MetricUnit.Count, report.users_due)
        metrics.add_metric("SweepJobsQueued", MetricUnit.Count, report.queued)
        metrics.add_metric("SweepLagSeconds", MetricUnit.Seconds, report.oldest_overdue_seconds)
        logger.info("sweep finished", extra={"sweep": report.__dict__})
        return report

    def _sweep_shard(self, shard: str, now: float) -> SweepReport:
        report = SweepReport()
        horizon = int(now) + self._margin
        start_key: dict[str, Any] | None = None
        while True:
            page = self._store.query_due(shard=shard, horizon=horizon, limit=self._page_size, start_key=start_key)
            report.items_read += page.items_read
            jobs: list[tuple[RefreshJob, int]] = []
            for user in page.users:
                report.users_due += 1
                expires_at = user.access_expires_at or 0
                if expires_at < now:
                    report.oldest_overdue_seconds = max(report.oldest_overdue_seconds, int(now - expires_at))
                if user.retry_after is not None and user.retry_after > now:
                    report.waiting_to_retry += 1
                    continue
                if user.lease_expires_at is not None and user.lease_expires_at >= now:
                    report.leased += 1
                    continue
                # Spread the work, but never past half the time the token has left.
                room = max(0.0, (expires_at - now) / 2)
                delay = int(self._rng.uniform(0, min(self._spread, room, 900)))
                until = int(now) + delay + 2 * self._lease + 60
                if not self._store.mark_queued(
                    device_token=user.device_token, version=user.version, until=until, now=now
                ):
                    report.already_queued += 1
                    continue
                jobs.append((RefreshJob(user.device_token, user.version), delay))
            if jobs:
                self._queue.enqueue(jobs)
                report.queued += len(jobs)
            start_key = page.next_key
            if not start_key:
                return report


class TokenUnavailableError(TelematicsError):
    """No valid access token can be had for this user right now (unknown user, NEEDS_RELOGIN, or busy)."""


@dataclass(frozen=True)
class ValidToken:
    device_token: str
    access_token: str
    expires_at: int

    def __repr__(self) -> str:
        return f"ValidToken(device_token={self.device_token!r}, expires_at={self.expires_at})"


@dataclass
class _HeldLease:
    """The lease this worker holds on one user: the record as leased, our owner id, and when the lease ends."""

    record: UserRecord
    owner: str
    expires_at: float
    calls: int = 0

    @property
    def device_token(self) -> str:
        return self.record.device_token


def _same_credentials(a: InstanceCredentials, b: InstanceCredentials) -> bool:
    return a.instance_id == b.instance_id and a.instance_key.get_secret_value() == b.instance_key.get_secret_value()


class TokenRefresher:
    """Refreshes one user's tokens at a time; safe to run on any number of threads and functions at once.

    Only the lease holder calls Refresh or Login for a user (each call spends the stored refresh token), and only
    while its lease has room for the whole call and its commit (``timing``, see :mod:`telematics_reg.timing`).
    Every write that follows a call is conditioned on the lease owner as well as the version, so a worker that
    lost its lease (it ran past every bound) can neither store a pair nor mark the user over the new holder.
    """

    def __init__(
        self,
        *,
        upstream: UserService,
        store: TokenStore,
        credentials: CredentialsProvider,
        publisher: EventPublisher,
        margin_seconds: int,
        timing: LeaseTiming,
        commit_attempts: int = 10,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._upstream = upstream
        self._store = store
        self._credentials = credentials
        self._publisher = publisher
        self._margin = margin_seconds
        self._timing = timing
        self._lease = timing.lease_seconds
        self._commit_attempts = commit_attempts
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy

    # ------------------------------------------------------------------------------------------- worker

    def refresh_job(self, job: RefreshJob) -> RefreshOutcome:
        """Refresh the user of a queued job, unless someone already did.

        The usual case takes two writes and no read: a lease conditioned on the job's version and on the user
        being due, then the commit. Only when that lease is refused is the user read, to tell why (refreshed
        since the sweep, deferred, leased by another worker, gone) and to refresh it if still due.
        """
        now = self._clock()
        owner = str(uuid.uuid4())
        leased = self._store.acquire_lease(
            device_token=job.device_token,
            version=job.version,
            owner=owner,
            now=now,
            ttl=self._lease,
            due_by=int(now + self._margin),
        )
        if leased is not None:
            outcome = self._refresh_leased(self._held(leased, owner, now))
        else:
            record = self._store.get_user(job.device_token)
            outcome = RefreshOutcome.GONE if record is None else self.refresh_user(record, force=False)
        metrics.add_metric(f"Refresh_{outcome.value}", MetricUnit.Count, 1)
        return outcome

    def refresh_user(self, record: UserRecord, *, force: bool) -> RefreshOutcome:
        """Refresh ``record`` (as read consistently) under a lease. ``force`` skips the due checks."""
        now = self._clock()
        if record.status not in (UserStatus.ACTIVE, UserStatus.TOKENLESS):
            return RefreshOutcome.GONE
        if not force and record.status is UserStatus.ACTIVE:
            if (record.access_expires_at or 0) > now + self._margin:
                return RefreshOutcome.FRESH
            if record.retry_after is not None and record.retry_after > now:
                return RefreshOutcome.DEFERRED

        # Timeline of one refresh (W1, W2 are workers that read the same version v; W2's clock may run ahead):
        #   W1 lease(v) ok --- refresh(RT_v) -> RT_v+1 --- commit if Version = v and LeaseOwner = W1 -> v+1
        #   W2 lease(v) fails while W1's lease is live by W2's clock: W2 does nothing, so RT_v is spent once.
        #   W1 starts a call only while its lease, less the clock skew, outlasts the longest call and its commit,
        #   so W2 can take the lease over only once W1's call is over; W2 then logs in (the lease lapsed, RT_v may
        #   be spent), and W1, had it not committed yet, can no longer commit (owner) nor mark the user.
        owner = str(uuid.uuid4())
        leased = self._store.acquire_lease(
            device_token=record.device_token, version=record.version, owner=owner, now=now, ttl=self._lease
        )
        if leased is None:
            metrics.add_metric("LeaseConflicts", MetricUnit.Count, 1)
            return RefreshOutcome.LEASE_CONFLICT
        return self._refresh_leased(self._held(leased, owner, now))

    def _held(self, leased: UserRecord, owner: str, now: float) -> _HeldLease:
        expires_at = leased.lease_expires_at if leased.lease_expires_at is not None else int(now) + self._lease
        return _HeldLease(leased, owner, float(expires_at))

    def _start_call(self, held: _HeldLease, call: str) -> bool:
        """Whether we may make a rotating call (Refresh or Login) now; False when our lease is gone.

        The first call follows the lease's conditional write directly and needs no further write while the lease
        has room for it. A further call (Login after a failed Refresh), or a first call with too little lease left,
        first renews the lease with a write conditioned on our ownership and the version: a lease lost in the
        meantime is never spent.
        """
        now = self._clock()
        if held.calls == 0 and self._timing.may_start_call(lease_expires_at=held.expires_at, now=now):
            held.calls += 1
            return True
        renewed = self._store.renew_lease(
            device_token=held.device_token, version=held.record.version, owner=held.owner, now=now, ttl=self._lease
        )
        if renewed is None:
            metrics.add_metric("LeaseLostBeforeCall", MetricUnit.Count, 1)
            logger.warning(
                "lease lost before a rotating call: not calling",
                extra={"device_token": held.device_token, "call": call},
            )
            return False
        held.expires_at = float(renewed)
        if not self._timing.may_start_call(lease_expires_at=held.expires_at, now=self._clock()):
            # Only when the renewal itself took longer than the lease has to spare (a very slow store).
            metrics.add_metric("LeaseTooShortForCall", MetricUnit.Count, 1)
            logger.warning("renewed lease too short for a call", extra={"device_token": held.device_token})
            return False
        held.calls += 1
        return True

    def _refresh_leased(self, held: _HeldLease) -> RefreshOutcome:
        """The refresh itself, under the lease ``held``."""
        leased = held.record
        if leased.status is UserStatus.TOKENLESS or leased.tokens is None:
            return self._login(held, reason="no tokens stored")
        if leased.refresh_token_dead:
            # An earlier attempt saw the stored refresh token rejected, or lost the answer of a call that may have
            # spent it (a Refresh or a Login), and could not log in then. Presenting it again can only be rejected
            # again (and a replayed refresh token is what an upstream detecting token theft revokes sessions for):
            # go straight to Login.
            return self._login(held, reason="stored refresh token is dead")
        if leased.lease_lapsed:
            # The last refresh never released its lease: its worker died or stalled, maybe after the upstream
            # rotated the pair and before the commit. The stored refresh token may be spent: for the same reason,
            # Login rather than replay it.
            metrics.add_metric("LapsedLeases", MetricUnit.Count, 1)
            return self._login(held, reason="an earlier refresh did not finish (its lease lapsed)")

        stored = leased.tokens
        if not self._start_call(held, "refresh"):
            return self._not_started(held)
        try:
            result = self._upstream.refresh(stored.access_token, stored.refresh_token)
        except DeadRefreshTokenError:
            # Re-read consistently: another worker may have rotated the token after our lease lapsed.
            current = self._store.get_user(leased.device_token)
            if current is None or current.version != leased.version or current.lease_owner != held.owner:
                return RefreshOutcome.LEASE_CONFLICT
            metrics.add_metric("DeadRefreshTokens", MetricUnit.Count, 1)
            return self._login(held, reason="refresh token rejected")
        except OutcomeUnknownError:
            # The refresh token may be spent and its successor lost with the answer: only Login can tell.
            return self._login(held, reason="refresh answer lost")
        except RetryableUpstreamError as exc:
            return self._defer(held, exc)
        except UnauthorizedError:
            return self._login(held, reason="refresh unauthorized")
        except UpstreamError as exc:
            # An answer no path above expects (403, a 3xx, another 4xx): the stored refresh token may or may not be
            # spent. Never presented again (the next attempt logs in); the lease is released, never left to lapse.
            return self._defer(held, exc, refresh_token_dead=True)
        if _names_another_user(result, leased.device_token):
            # A pair issued for another user must never be stored as this one's; ours may be spent by the call.
            return self._defer(held, UpstreamError("refresh answer names another user", call="refresh"), True)
        tokens = tokens_of(result, self._clock())
        if tokens is None:
            return self._defer(held, UpstreamError("refresh returned no tokens", call="refresh"))
        if not self._commit(held, tokens):
            return RefreshOutcome.LEASE_LOST
        metrics.add_metric("TokensRefreshed", MetricUnit.Count, 1)
        return RefreshOutcome.REFRESHED

    def _not_started(self, held: _HeldLease, *, refresh_token_dead: bool = False) -> RefreshOutcome:
        """No call was made because the lease was lost or too short: leave the user to the next attempt."""
        # Harmless if the lease is no longer ours (the release is conditioned on the owner).
        self._store.release_lease(
            device_token=held.device_token,
            owner=held.owner,
            retry_after=None,
            error="lease too short to start a call" if refresh_token_dead else None,
            now=self._clock(),
            refresh_token_dead=refresh_token_dead,
        )
        return RefreshOutcome.LEASE_CONFLICT

    def _login(self, held: _HeldLease, *, reason: str) -> RefreshOutcome:
        leased = held.record
        try:
            creds = self._credentials.get(leased.instance)
        except UnknownInstanceError:
            return self._give_up(held, f"{reason}; instance {leased.instance!r} has no credentials")
        # At most two Logins: the second only after a 401, with credentials re-read from the secret and different
        # from the first (a key rotated since this container cached it). The same key again would only be refused
        # again, and a Login is too scarce to spend on that.
        for attempt in (1, 2):
            if not self._start_call(held, "login"):
                # Every way into _login leaves the stored refresh token dead or suspect.
                return self._not_started(held, refresh_token_dead=True)
            try:
                # The fleet's Login budget is spent inside (LoginDeferredError when spent or blocked: nothing sent).
                result = self._upstream.login(creds, uuid.UUID(leased.device_token))
            except LoginDeferredError as exc:
                # Not a failure of the user: wait for the budget or the block, the reason noted; the stored refresh
                # token stays marked dead (every way into _login leaves it dead or suspect).
                jitter = self._rng.uniform(0, 60)
                self._store.release_lease(
                    device_token=leased.device_token,
                    owner=held.owner,
                    retry_after=int(max(exc.retry_at, self._clock()) + jitter),
                    error=f"{reason}; {exc.message}",
                    now=self._clock(),
                    refresh_token_dead=True,
                )
                metrics.add_metric("RefreshDeferred", MetricUnit.Count, 1)
                return RefreshOutcome.DEFERRED
            except (RetryableUpstreamError, OutcomeUnknownError) as exc:
                # A Login whose answer was lost rotated the tokens too: the stored refresh token is dead either way.
                return self._defer(held, exc, refresh_token_dead=True)
            except UnauthorizedError as exc:
                fresh = self._reread_credentials(leased.instance) if attempt == 1 else None
                if fresh is None or _same_credentials(fresh, creds):
                    return self._give_up(held, f"{reason}; login failed: {exc}")
                metrics.add_metric("LoginRetriedWithRereadCredentials", MetricUnit.Count, 1)
                logger.info(
                    "login refused with a cached key: retrying with the re-read one",
                    extra={"device_token": leased.device_token},
                )
                creds = fresh
                continue
            except UpstreamError as exc:
                return self._give_up(held, f"{reason}; login failed: {exc}")
            metrics.add_metric("LoginFallbacks", MetricUnit.Count, 1)
            if _names_another_user(result, leased.device_token):
                return self._defer(held, UpstreamError("login answer names another user", call="login"), True)
            tokens = tokens_of(result, self._clock())
            if tokens is None:
                return self._give_up(held, f"{reason}; login returned no tokens")
            if not self._commit(held, tokens, via="login"):
                return RefreshOutcome.LEASE_LOST
            return RefreshOutcome.LOGGED_IN
        raise AssertionError("unreachable")  # pragma: no cover

    def _reread_credentials(self, instance: str) -> InstanceCredentials | None:
        """The instance's credentials fetched again (the cached ones were refused), or None if it has none now."""
        self._credentials.invalidate()
        try:
            return self._credentials.get(instance)
        except UnknownInstanceError:
            return None

    def _defer(self, held: _HeldLease, exc: UpstreamError, refresh_token_dead: bool = False) -> RefreshOutcome:
        leased = held.record
        now = self._clock()
        if isinstance(exc, RateLimitedError) and exc.retry_after:
            base = exc.retry_after  # the upstream said when: honour it
        else:
            # Back off 30-60 s, but never so long that the access token expires while we wait: with little time left,
            # a quarter of it (at least DEFER_FLOOR_SECONDS), so a later sweep still finds it alive.
            left = (leased.access_expires_at or 0) - now
            base = min(DEFER_SECONDS, max(DEFER_FLOOR_SECONDS, left / 4))
        # Jitter up to as much again, at most 5 minutes (a Retry-After of an hour is not stretched to two).
        retry_at = int(now + base + self._rng.uniform(0, min(base, 300.0)))
        self._store.release_lease(
            device_token=leased.device_token,
            owner=held.owner,
            retry_after=retry_at,
            error=_without_tokens(f"{type(exc).__name__}: {exc}", leased),
            now=self._clock(),
            refresh_token_dead=refresh_token_dead,
        )
        metrics.add_metric("RefreshDeferred", MetricUnit.Count, 1)
        return RefreshOutcome.DEFERRED

    def _give_up(self, held: _HeldLease, reason: str) -> RefreshOutcome:
        leased = held.record
        # The reason is stored, logged and published: an upstream text quoting the user's own tokens is cut out.
        reason = _without_tokens(reason, leased)
        # Still ours? A worker that lost its lease must not announce (nor mark) a user another worker is recovering.
        # The renewal is conditioned on our ownership and the version, and makes room for what follows.
        renewed = self._store.renew_lease(
            device_token=leased.device_token,
            version=leased.version,
            owner=held.owner,
            now=self._clock(),
            ttl=self._lease,
        )
        if renewed is None:
            metrics.add_metric("LeaseLostBeforeGiveUp", MetricUnit.Count, 1)
            logger.warning("lease lost: not marking the user", extra={"device_token": leased.device_token})
            return RefreshOutcome.LEASE_CONFLICT
        # Announce first, then mark. Marked first, an announcement that EventBridge refused was lost for good: the
        # retried job found the user NEEDS_RELOGIN (out of the index) and nothing ever published it. Announced
        # first, a failed mark only means the retried job announces again (at least once, never silently dropped).
        # The mark is conditioned on our version and our lease; should it lose anyway (we lost the lease since the
        # renewal), the event just published was needless: rare, harmless.
        try:
            self._publisher.publish(
                TokenRefreshFailed(
                    device_token=leased.device_token,
                    instance=leased.instance,
                    client_id=leased.client_id,
                    reason=reason,
                )
            )
        except Exception:
            # Let the retried job (SQS redelivers it) go through Login and this announcement again (not the refresh:
            # its token is dead, that is how we got here).
            self._store.release_lease(
                device_token=leased.device_token,
                owner=held.owner,
                retry_after=None,
                error=reason,
                now=self._clock(),
                refresh_token_dead=True,
            )
            raise
        try:
            self._store.mark_needs_relogin(
                device_token=leased.device_token,
                expected_version=leased.version,
                owner=held.owner,
                reason=reason,
                now=self._clock(),
            )
        except ConditionFailedError:
            metrics.add_metric("LeaseLostBeforeGiveUp", MetricUnit.Count, 1)
            return RefreshOutcome.LEASE_CONFLICT
        metrics.add_metric("NeedsRelogin", MetricUnit.Count, 1)
        logger.warning("user needs relogin", extra={"device_token": leased.device_token, "reason": reason})
        return RefreshOutcome.NEEDS_RELOGIN

    def _commit(self, held: _HeldLease, tokens: Tokens, *, via: str = "refresh") -> bool:
        """Store the pair a call just returned; False when our lease was taken over first (nothing stored).

        Timeline: the upstream has rotated (the stored refresh token is now spent), so until this write lands the
        only valid pair lives in this process. Retry hard; the condition is the version we leased and our lease:
          lease(v) -> upstream rotates -> commit if Version = v and LeaseOwner = us
        It fails only if our lease lapsed and another worker took it over: that worker logs in (a lapsed lease means
        the stored token may be spent), which kills our pair. Nothing is left for us to store, but the failure is
        logged, counted, and the spent token at version v is marked dead, so no one presents it again.
        """
        leased = held.record
        delay = 0.1
        for attempt in range(self._commit_attempts):
            try:
                self._store.commit_tokens(
                    device_token=leased.device_token,
                    expected_version=leased.version,
                    owner=held.owner,
                    tokens=tokens,
                    now=self._clock(),
                )
                # The refresh history `telematics-reg trace` shows: which version, when, and by refresh or Login.
                logger.info(
                    "tokens committed",
                    extra={"device_token": leased.device_token, "version": leased.version + 1, "via": via},
                )
                return True
            except ConditionFailedError:
                self._lost_before_commit(held)
                return False
            except StoreError:
                metrics.add_metric("CommitRetries", MetricUnit.Count, 1)
                if attempt == self._commit_attempts - 1:
                    # Not stored: the lease lapses, and the next attempt recovers by Login.
                    logger.error("rotated tokens could not be stored", extra={"device_token": leased.device_token})
                    raise
                self._sleep(self._rng.uniform(0, delay))
                delay = min(5.0, delay * 2)
        raise AssertionError("unreachable")  # pragma: no cover

    def _lost_before_commit(self, held: _HeldLease) -> None:
        leased = held.record
        current = self._store.get_user(leased.device_token)
        moved_on = current is None or current.version != leased.version
        metrics.add_metric("CommitLeaseLost", MetricUnit.Count, 1)
        logger.error(
            "rotated pair not stored: the lease was taken over before the commit",
            extra={
                "device_token": leased.device_token,
                "leased_version": leased.version,
                "current_version": None if current is None else current.version,
                "seconds_past_lease": round(self._clock() - held.expires_at, 3),
            },
        )
        if not moved_on:
            # The token stored at our version is the one our call spent: never present it again.
            self._store.mark_refresh_token_dead(
                device_token=leased.device_token,
                version=leased.version,
                reason="a worker spent the stored refresh token and lost its lease before storing the result",
                now=self._clock(),
            )

    # ------------------------------------------------------------------------------------------- read path

    def valid_token(
        self,
        *,
        device_token: str | None = None,
        instance: str = "default",
        client_id: str | None = None,
        min_validity_seconds: int = 60,
        wait_seconds: float = 10.0,
    ) -> ValidToken:
        """A valid access token for a user (by DeviceToken, or by Instance + ClientId), refreshing under the
        lease if it expires within ``min_validity_seconds``.

        Example
        -------
        >>> token = refresher.valid_token(instance="default", client_id="customer-42")  # doctest: +SKIP
        >>> headers = {"Authorization": f"Bearer {token.access_token}"}  # doctest: +SKIP
        """
        record = self._lookup(device_token, instance, client_id)
        deadline = self._clock() + wait_seconds
        while True:
            now = self._clock()
            if record.status is UserStatus.NEEDS_RELOGIN:
                raise TokenUnavailableError(f"user {record.device_token} needs relogin: {record.last_error}")
            tokens = record.tokens
            if (
                record.status is UserStatus.ACTIVE
                and tokens is not None
                and tokens.expires_at > now + min_validity_seconds
            ):
                return ValidToken(record.device_token, tokens.access_token, tokens.expires_at)
            outcome = self.refresh_user(record, force=True)
            if outcome is RefreshOutcome.GONE:
                raise TokenUnavailableError(f"user {record.device_token} has no tokens we keep")
            if outcome in (RefreshOutcome.REFRESHED, RefreshOutcome.LOGGED_IN):
                # We just got a new pair: it is as fresh as the upstream makes them. If the upstream's tokens live
                # less than ``min_validity_seconds``, asking again would only spin, spending one refresh token per
                # loop until the deadline (and then fail anyway): hand out the new token while it is valid.
                current = self._store.get_user(record.device_token)
                fresh = current.tokens if current is not None and current.status is UserStatus.ACTIVE else None
                if current is not None and fresh is not None and fresh.expires_at > self._clock():
                    return ValidToken(current.device_token, fresh.access_token, fresh.expires_at)
            if self._clock() >= deadline:
                raise TokenUnavailableError(f"no valid token for {record.device_token} yet ({outcome.value})")
            if outcome in (RefreshOutcome.LEASE_CONFLICT, RefreshOutcome.LEASE_LOST, RefreshOutcome.DEFERRED):
                self._sleep(0.5)
            current = self._store.get_user(record.device_token)
            if current is None:
                raise TokenUnavailableError(f"user {record.device_token} disappeared")
            record = current

    def relogin(
        self, *, device_token: str | None = None, instance: str = "default", client_id: str | None = None
    ) -> RefreshOutcome:
        """Bring a ``NEEDS_RELOGIN`` user back once its cause is fixed: Login (within the shared budget), store
        the new pair, and put the user back in the refresh index. Other users are left alone (``FRESH``).

        Example
        -------
        >>> refresher.relogin(instance="default", client_id="customer-42")  # doctest: +SKIP
        <RefreshOutcome.LOGGED_IN: 'logged_in'>
        """
        record = self._lookup(device_token, instance, client_id)
        if record.status is not UserStatus.NEEDS_RELOGIN:
            return RefreshOutcome.FRESH
        owner = str(uuid.uuid4())
        now = self._clock()
        leased = self._store.acquire_lease(
            device_token=record.device_token,
            version=record.version,
            owner=owner,
            now=now,
            ttl=self._lease,
            reactivate=True,
        )
        if leased is None:
            return RefreshOutcome.LEASE_CONFLICT
        return self._login(self._held(leased, owner, now), reason="relogin requested")

    def _lookup(self, device_token: str | None, instance: str, client_id: str | None) -> UserRecord:
        if device_token:
            record = self._store.get_user(device_token)
        elif client_id:
            record = self._store.find_by_client(instance, client_id)
        else:
            raise ValueError("give a DeviceToken, or an Instance and ClientId")
        if record is None:
            raise TokenUnavailableError("no such user")
        return record


def _names_another_user(result: CreateResult, device_token: str) -> bool:
    """Whether an answer carries a DeviceToken that is not the user we asked about (an answer we cannot trust)."""
    named = getattr(result, "device_token", None)
    return named is not None and str(named).lower() != device_token.lower()


def _without_tokens(text: str, record: UserRecord) -> str:
    """``text`` (an upstream error quoted in a reason) with the user's stored tokens cut out: the client scrubs
    only what its own call sent, and a reason is stored, logged and published."""
    for secret in (record.access_token, record.refresh_token):
        if secret:
            text = text.replace(secret, "***")
    return text
