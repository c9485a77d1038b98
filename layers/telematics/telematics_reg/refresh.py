"""Flow 3: keep every user's access token fresh, safe against concurrent refreshers, faults and dead tokens.

Three pieces:

* :class:`Sweeper` finds users whose token expires within the margin through the sparse, sharded
  ``RefreshDue`` index (cost grows with the users due, not the table) and queues one refresh job per user,
  each delayed by a random part of the spread so that a bulk-loaded cohort does not refresh all at once;
* :class:`TokenRefresher` refreshes one user under a lease, commits the rotated pair conditioned on the
  version, and falls back to Login (within a budget shared by all workers) when the refresh token is dead;
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

from telematics_reg.budget import LoginBudget
from telematics_reg.errors import (
    DeadRefreshTokenError,
    OutcomeUnknownError,
    RateLimitedError,
    RetryableUpstreamError,
    TelematicsError,
    UnauthorizedError,
    UnknownInstanceError,
    UpstreamError,
)
from telematics_reg.observability import logger, metrics
from telematics_reg.outcomes import EventPublisher, TokenRefreshFailed
from telematics_reg.registration import tokens_of
from telematics_reg.store import ConditionFailedError, StoreError, Tokens, TokenStore, UserRecord, UserStatus

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
    DEFERRED = "deferred"  # upstream busy or Login budget spent: RetryAfter set, the next sweep takes it
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


class InMemoryRefreshJobQueue:
    def __init__(self) -> None:
        self.jobs: list[tuple[RefreshJob, int]] = []

    def enqueue(self, jobs: Sequence[tuple[RefreshJob, int]]) -> None:
        self.jobs.extend(jobs)


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


class TokenRefresher:
    """Refreshes one user's tokens at a time; safe to run on any number of threads and functions at once."""

    def __init__(
        self,
        *,
        upstream: UserService,
        store: TokenStore,
        credentials: CredentialsProvider,
        publisher: EventPublisher,
        budget: LoginBudget,
        margin_seconds: int,
        lease_seconds: int = 60,
        commit_attempts: int = 10,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._upstream = upstream
        self._store = store
        self._credentials = credentials
        self._publisher = publisher
        self._budget = budget
        self._margin = margin_seconds
        self._lease = lease_seconds
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
            outcome = self._refresh_leased(leased, owner)
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

        # Timeline of one refresh (W1, W2 are workers that read the same version v):
        #   W1 lease(v) ok --- refresh(RT_v) -> RT_v+1 --- commit if Version = v -> v+1, lease dropped
        #   W2 lease(v) fails (W1 holds it): W2 does nothing, so RT_v is spent once.
        #   If W1 stalls past its lease, W2 may lease v and spend RT_v again: the upstream rejects one of them
        #   (single-use tokens) and the version condition keeps the loser's commit out; the loser re-reads.
        owner = str(uuid.uuid4())
        leased = self._store.acquire_lease(
            device_token=record.device_token, version=record.version, owner=owner, now=now, ttl=self._lease
        )
        if leased is None:
            metrics.add_metric("LeaseConflicts", MetricUnit.Count, 1)
            return RefreshOutcome.LEASE_CONFLICT
        return self._refresh_leased(leased, owner)

    def _refresh_leased(self, leased: UserRecord, owner: str) -> RefreshOutcome:
        """The refresh itself, under the lease ``owner`` holds on ``leased``."""
        if leased.status is UserStatus.TOKENLESS or leased.tokens is None:
            return self._login(leased, owner, reason="no tokens stored")
        if leased.refresh_token_dead:
            # An earlier attempt saw the stored refresh token rejected, or lost the answer of a call that may have
            # spent it (a Refresh or a Login), and could not log in then. Presenting it again can only be rejected
            # again (and a replayed refresh token is what an upstream detecting token theft revokes sessions for):
            # go straight to Login.
            return self._login(leased, owner, reason="stored refresh token is dead")
        if leased.lease_lapsed:
            # The last refresh never released its lease: its worker died or stalled, maybe after the upstream
            # rotated the pair and before the commit. The stored refresh token may be spent: for the same reason,
            # Login rather than replay it.
            metrics.add_metric("LapsedLeases", MetricUnit.Count, 1)
            return self._login(leased, owner, reason="an earlier refresh did not finish (its lease lapsed)")

        stored = leased.tokens
        try:
            result = self._upstream.refresh(stored.access_token, stored.refresh_token)
        except DeadRefreshTokenError:
            # Re-read consistently: another worker may have rotated the token after our lease lapsed.
            current = self._store.get_user(leased.device_token)
            if current is not None and current.version != leased.version:
                return RefreshOutcome.LEASE_CONFLICT
            metrics.add_metric("DeadRefreshTokens", MetricUnit.Count, 1)
            return self._login(leased, owner, reason="refresh token rejected")
        except OutcomeUnknownError:
            # The refresh token may be spent and its successor lost with the answer: only Login can tell.
            return self._login(leased, owner, reason="refresh answer lost")
        except RetryableUpstreamError as exc:
            return self._defer(leased, owner, exc)
        except UnauthorizedError:
            return self._login(leased, owner, reason="refresh unauthorized")
        tokens = tokens_of(result, self._clock())
        if tokens is None:
            return self._defer(leased, owner, UpstreamError("refresh returned no tokens", call="refresh"))
        self._commit(leased, tokens)
        metrics.add_metric("TokensRefreshed", MetricUnit.Count, 1)
        return RefreshOutcome.REFRESHED

    def _login(self, leased: UserRecord, owner: str, *, reason: str) -> RefreshOutcome:
        try:
            creds = self._credentials.get(leased.instance)
        except UnknownInstanceError:
            return self._give_up(leased, owner, f"{reason}; instance {leased.instance!r} has no credentials")
        if not self._budget.try_acquire(str(creds.instance_id), self._clock()):
            metrics.add_metric("LoginBudgetExhausted", MetricUnit.Count, 1)
            retry_at = (int(self._clock()) // 60 + 1) * 60 + int(self._rng.uniform(0, 60))
            # Every way into _login leaves the stored refresh token dead or suspect: note it for the next attempt.
            self._store.release_lease(
                device_token=leased.device_token,
                owner=owner,
                retry_after=retry_at,
                error=f"{reason}; login budget spent",
                now=self._clock(),
                refresh_token_dead=True,
            )
            return RefreshOutcome.DEFERRED
        metrics.add_metric("LoginFallbacks", MetricUnit.Count, 1)
        try:
            result = self._upstream.login(creds, uuid.UUID(leased.device_token))
        except (RetryableUpstreamError, OutcomeUnknownError) as exc:
            # A Login whose answer was lost rotated the tokens too: the stored refresh token is dead either way.
            return self._defer(leased, owner, exc, refresh_token_dead=True)
        except UpstreamError as exc:
            if isinstance(exc, UnauthorizedError):
                self._credentials.invalidate()
            return self._give_up(leased, owner, f"{reason}; login failed: {exc}")
        tokens = tokens_of(result, self._clock())
        if tokens is None:
            return self._give_up(leased, owner, f"{reason}; login returned no tokens")
        self._commit(leased, tokens)
        return RefreshOutcome.LOGGED_IN

    def _defer(
        self, leased: UserRecord, owner: str, exc: UpstreamError, *, refresh_token_dead: bool = False
    ) -> RefreshOutcome:
        now = self._clock()
        if isinstance(exc, RateLimitedError) and exc.retry_after:
            base = exc.retry_after  # the upstream said when: honour it
        else:
            # Back off 30-60 s, but never so long that the access token expires while we wait: with little time left,
            # a quarter of it (at least DEFER_FLOOR_SECONDS), so a later sweep still finds it alive.
            left = (leased.access_expires_at or 0) - now
            base = min(DEFER_SECONDS, max(DEFER_FLOOR_SECONDS, left / 4))
        retry_at = int(now + base + self._rng.uniform(0, base))
        self._store.release_lease(
            device_token=leased.device_token,
            owner=owner,
            retry_after=retry_at,
            error=f"{type(exc).__name__}: {exc}",
            now=self._clock(),
            refresh_token_dead=refresh_token_dead,
        )
        metrics.add_metric("RefreshDeferred", MetricUnit.Count, 1)
        return RefreshOutcome.DEFERRED

    def _give_up(self, leased: UserRecord, owner: str, reason: str) -> RefreshOutcome:
        # Announce first, then mark. Marked first, an announcement that EventBridge refused was lost for good: the
        # retried job found the user NEEDS_RELOGIN (out of the index) and nothing ever published it. Announced
        # first, a failed mark only means the retried job announces again (at least once, never silently dropped).
        # The mark is still conditioned on our version; if it lost (another worker committed after our lease
        # lapsed, in the window since we re-read the user) the event just published was needless: rare, harmless.
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
                owner=owner,
                retry_after=None,
                error=reason,
                now=self._clock(),
                refresh_token_dead=True,
            )
            raise
        try:
            self._store.mark_needs_relogin(
                device_token=leased.device_token, expected_version=leased.version, reason=reason, now=self._clock()
            )
        except ConditionFailedError:
            return RefreshOutcome.LEASE_CONFLICT
        metrics.add_metric("NeedsRelogin", MetricUnit.Count, 1)
        logger.warning("user needs relogin", extra={"device_token": leased.device_token, "reason": reason})
        return RefreshOutcome.NEEDS_RELOGIN

    def _commit(self, leased: UserRecord, tokens: Tokens) -> None:
        # Timeline: the upstream has rotated (the stored refresh token is now spent), so until this write lands
        # the only valid pair lives in this process. Retry hard; the condition is the version we leased.
        #   lease(v) -> upstream rotates -> commit if Version = v  (fails only if someone else committed v+1)
        delay = 0.1
        for attempt in range(self._commit_attempts):
            try:
                self._store.commit_tokens(
                    device_token=leased.device_token,
                    expected_version=leased.version,
                    tokens=tokens,
                    now=self._clock(),
                )
                return
            except ConditionFailedError:
                # Someone committed after us on the upstream (we succeeded, so they came later): theirs is newer.
                metrics.add_metric("CommitConflicts", MetricUnit.Count, 1)
                logger.error("token commit lost to a newer version", extra={"device_token": leased.device_token})
                return
            except StoreError:
                metrics.add_metric("CommitRetries", MetricUnit.Count, 1)
                if attempt == self._commit_attempts - 1:
                    # Not stored: the next attempt finds the old refresh token dead and recovers by Login.
                    logger.error("rotated tokens could not be stored", extra={"device_token": leased.device_token})
                    raise
                self._sleep(self._rng.uniform(0, delay))
                delay = min(5.0, delay * 2)

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
            if outcome in (RefreshOutcome.LEASE_CONFLICT, RefreshOutcome.DEFERRED):
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
        leased = self._store.acquire_lease(
            device_token=record.device_token,
            version=record.version,
            owner=owner,
            now=self._clock(),
            ttl=self._lease,
            reactivate=True,
        )
        if leased is None:
            return RefreshOutcome.LEASE_CONFLICT
        return self._login(leased, owner, reason="relogin requested")

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
