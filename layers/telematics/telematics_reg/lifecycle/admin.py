"""One admin session for the whole fleet: the admin JWT and its refresh token live in the tokens table (item
``ADMIN#SESSION``, encrypted at rest with the stack's KMS key like every user's tokens), are renewed under a lease
like a user's, and are shared by every container. A cold function reads the stored session instead of logging in.

Renewal is a Refresh, under the same lease arithmetic as a user's (:class:`telematics_reg.timing.LeaseTiming`):
a Refresh or Login starts only while the lease, less the clock skew, outlasts the longest call and its commit, and
the commit is conditioned on the lease owner and the version. So a refresh token is presented once, ever:

* an answer lost (Refresh or Login), a rotation that could not be stored, or a renewal whose lease lapsed (its
  worker was cut off mid-call) leaves the stored refresh token dead or suspect: it is never presented again, and
  the session is recovered by Login (at once when the lease has room, else by the next renewal);
* Login otherwise only when nothing is stored, within the fleet's Login budget, which the User Service client
  spends on every Login, user or admin (:mod:`telematics_reg.budget`).

The fleet's whole run therefore makes one admin Login, plus one per admin answer lost. Each Login is logged
(``"admin Login"``, WARNING, with its ``cause`` and ``outcome``) and metered (``AdminLogins``), and each lost answer
too (``"admin answer lost"``, ``AdminAnswersLost``), so a run can check that count. A 401 on a management call
expires the stored JWT, renews once and repeats the call (:meth:`FleetAdminSession.call`).
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities import parameters
from pydantic import SecretStr, ValidationError

from telematics_reg.errors import (
    DeadRefreshTokenError,
    LoginDeferredError,
    OutcomeUnknownError,
    RateLimitedError,
    RetryableUpstreamError,
    TelematicsError,
    TransientUpstreamError,
    UnauthorizedError,
    UpstreamError,
)
from telematics_reg.management_models import AdminCredentials, AdminSession
from telematics_reg.observability import logger, metrics
from telematics_reg.store import ConditionFailedError, DynamoTokenStore, StoreError, iso
from telematics_reg.timing import LeaseTiming, longest_call_seconds
from telematics_reg.upstream import UserService

_T = TypeVar("_T")
ADMIN_PK = "ADMIN#SESSION"

#: The service's default lease arithmetic (ServiceSettings' defaults: a 180 s lease, the client's 4 attempts with
#: 3.05 + 10 s timeouts and Retry-After up to 30 s, 10 s of clock skew). Functions pass ``settings.lease_timing``.
DEFAULT_TIMING = LeaseTiming(
    lease_seconds=180,
    call_seconds=longest_call_seconds(max_attempts=4, connect_timeout=3.05, read_timeout=10.0, max_retry_after=30.0),
    clock_skew_seconds=10,
)


class AdminLoginCause(StrEnum):
    """Why an admin Login is needed: what left the fleet without a live refresh token."""

    NO_SESSION = "no_session"  # nothing stored: the fleet's first Login
    REFRESH_ANSWER_LOST = "refresh_answer_lost"  # a Refresh's answer was lost: the token may be spent
    LOGIN_ANSWER_LOST = "login_answer_lost"  # a Login's answer was lost: no token came back
    RENEWAL_UNFINISHED = "renewal_unfinished"  # a renewal's lease lapsed: its worker stopped mid-call or pre-commit
    COMMIT_LOST = "commit_lost"  # a rotated session could not be stored: the stored token is spent
    # HTTP 400 on the stored refresh token: it was presented before, or revoked upstream.
    REFRESH_TOKEN_REJECTED = "refresh_token_rejected"  # noqa: S105 - a cause's name, not a secret
    REFRESH_FAILED = "refresh_failed"  # an answer to Refresh that leaves the token's state unknown (401, 403, ...)


#: The causes that are a lost answer: each costs the fleet exactly one Login.
LOST_ANSWER_CAUSES = frozenset(
    {
        AdminLoginCause.REFRESH_ANSWER_LOST,
        AdminLoginCause.LOGIN_ANSWER_LOST,
        AdminLoginCause.RENEWAL_UNFINISHED,
        AdminLoginCause.COMMIT_LOST,
    }
)


class AdminSessionUnavailableError(TelematicsError):
    """No admin JWT now (another worker is renewing it, the Login budget is spent, the upstream refused, a Login's
    answer was lost): retry."""


class AdminCredentialsError(TelematicsError):
    """The admin credentials secret is missing or malformed (never shows its value)."""


@dataclass(frozen=True)
class StoredAdminSession:
    """The ``ADMIN#SESSION`` item. ``version`` -1: no session was ever committed (the item may hold a lease, or
    the cause of the Login the next renewal must make)."""

    version: int
    access_token: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    expires_at: int = 0
    renew_at: int | None = None
    refresh_token_dead: bool = False
    login_cause: str | None = None
    lease_owner: str | None = None
    lease_expires_at: int | None = None
    lease_lapsed: bool = False  # on the item as leased: an earlier lease was still there (it lapsed)

    @property
    def committed(self) -> bool:
        return self.version >= 0


class AdminSessionStore(Protocol):
    def get(self) -> StoredAdminSession | None: ...
    def lease(self, *, version: int | None, owner: str, now: float, ttl: int) -> StoredAdminSession | None: ...
    def renew_lease(self, *, version: int | None, owner: str, now: float, ttl: int) -> int | None: ...
    def commit(
        self,
        *,
        version: int | None,
        owner: str,
        session: AdminSession,
        expires_at: int,
        renew_at: int,
        now: float,
    ) -> bool: ...
    def release(self, *, owner: str, login_cause: str | None) -> None: ...
    def mark_dead(self, *, version: int, login_cause: str) -> bool: ...
    def expire(self, *, version: int) -> None: ...


def _version_condition(version: int | None, values: dict[str, Any]) -> str:
    if version is None:
        return "attribute_not_exists(Version)"
    values[":v"] = version
    return "Version = :v"


class DynamoAdminSessionStore:
    """The session item in the tokens table (same client, same encryption as the users' tokens)."""

    def __init__(self, store: DynamoTokenStore) -> None:
        self._store = store

    def get(self) -> StoredAdminSession | None:
        response = self._store._call("get_item", Key={"pk": {"S": ADMIN_PK}}, ConsistentRead=True)
        item = response.get("Item")
        if not item:
            return None
        return _stored({k: next(iter(v.values())) for k, v in item.items()})

    def lease(self, *, version: int | None, owner: str, now: float, ttl: int) -> StoredAdminSession | None:
        """Take the renewal lease; the item as leased, or ``None`` when another worker holds it or the session moved
        on. Condition: the session is the version read (or still absent), and no live lease by the taker's clock.

        A lease still on the item (lapsed) means the renewal that took it never finished: its worker may have spent
        the stored refresh token, so the new holder logs in rather than present it (``lease_lapsed``)::

            W1 lease(v) -- refresh(RT_v) ...cut off...                  (RT_v maybe spent, nothing stored)
            W2                                 lease(v) once lapsed -> lease_lapsed -> Login, never RT_v
        """
        values: dict[str, Any] = {":me": owner, ":until": int(now) + ttl, ":now": int(now)}
        condition = "(attribute_not_exists(LeaseExpiresAt) OR LeaseExpiresAt < :now) AND " + _version_condition(
            version, values
        )
        try:
            old = self._store._update(
                ADMIN_PK, "SET LeaseOwner = :me, LeaseExpiresAt = :until", condition, values, return_old=True
            )
        except ConditionFailedError:
            return None
        old = old or {}
        leased = _stored({**old, "LeaseOwner": owner, "LeaseExpiresAt": int(now) + ttl})
        return StoredAdminSession(**{**leased.__dict__, "lease_lapsed": "LeaseOwner" in old})

    def renew_lease(self, *, version: int | None, owner: str, now: float, ttl: int) -> int | None:
        """Extend our lease before a further call (Login after a lost Refresh); ``None`` if it is no longer ours."""
        values: dict[str, Any] = {":me": owner, ":until": int(now) + ttl}
        condition = "LeaseOwner = :me AND " + _version_condition(version, values)
        try:
            self._store._update(ADMIN_PK, "SET LeaseExpiresAt = :until", condition, values)
        except ConditionFailedError:
            return None
        return int(now) + ttl

    def commit(
        self,
        *,
        version: int | None,
        owner: str,
        session: AdminSession,
        expires_at: int,
        renew_at: int,
        now: float,
    ) -> bool:
        """Store a rotated pair; False when our lease was taken over first. Condition: our lease and the version we
        leased (the upstream has rotated: until this lands, the only valid pair lives in this process)::

            lease(v) -> upstream rotates the pair (the stored refresh token is now spent)
                     -> commit if LeaseOwner = us and Version = v
            A worker that took our lapsed lease over logs in (it cannot know whether RT_v is spent); our late
            commit must not overwrite its session, nor be overwritten by it unseen.
        """
        values: dict[str, Any] = {
            ":me": owner,
            ":at": session.access_token.token.get_secret_value(),
            ":rt": session.refresh_token.get_secret_value(),
            ":exp": expires_at,
            ":renew": renew_at,
            ":next": (version or 0) + 1,
            ":now": iso(now),
        }
        condition = "LeaseOwner = :me AND " + _version_condition(version, values)
        try:
            self._store._update(
                ADMIN_PK,
                "SET AccessToken = :at, RefreshToken = :rt, AccessExpiresAt = :exp, RenewAt = :renew, "
                "Version = :next, UpdatedAt = :now "
                "REMOVE LeaseOwner, LeaseExpiresAt, RefreshTokenDead, LoginCause",
                condition,
                values,
            )
        except ConditionFailedError:
            return False
        return True

    def release(self, *, owner: str, login_cause: str | None) -> None:
        """Give the lease back; with ``login_cause``, the stored refresh token is dead (never presented again) and
        the next renewal logs in for that cause. Conditioned on our lease: a lost one is not ours to change."""
        values: dict[str, Any] = {":me": owner}
        expression = "REMOVE LeaseOwner, LeaseExpiresAt"
        if login_cause is not None:
            values[":dead"] = True
            values[":cause"] = login_cause
            expression = "SET RefreshTokenDead = :dead, LoginCause = :cause " + expression
        with contextlib.suppress(ConditionFailedError):
            self._store._update(ADMIN_PK, expression, "LeaseOwner = :me", values)

    def mark_dead(self, *, version: int, login_cause: str) -> bool:
        """The refresh token of ``version`` was spent by a worker that could not store the result: never present it.
        True of version ``version`` whoever holds the lease; a later commit clears it."""
        values: dict[str, Any] = {":dead": True, ":cause": login_cause, ":v": version}
        try:
            self._store._update(ADMIN_PK, "SET RefreshTokenDead = :dead, LoginCause = :cause", "Version = :v", values)
        except ConditionFailedError:
            return False
        return True

    def expire(self, *, version: int) -> None:
        """The JWT of ``version`` was refused (401): mark it expired so the next reader renews it."""
        with contextlib.suppress(ConditionFailedError):
            self._store._update(ADMIN_PK, "SET AccessExpiresAt = :zero", "Version = :v", {":zero": 0, ":v": version})


def _stored(values: dict[str, Any]) -> StoredAdminSession:
    return StoredAdminSession(
        version=int(values["Version"]) if "Version" in values else -1,  # -1: never committed
        access_token=values.get("AccessToken"),
        refresh_token=values.get("RefreshToken"),
        expires_at=int(values.get("AccessExpiresAt", 0)),
        renew_at=int(values["RenewAt"]) if "RenewAt" in values else None,
        refresh_token_dead=bool(values.get("RefreshTokenDead", False)),
        login_cause=values.get("LoginCause"),
        lease_owner=values.get("LeaseOwner"),
        lease_expires_at=int(values["LeaseExpiresAt"]) if "LeaseExpiresAt" in values else None,
    )


class AdminCredentialsProvider(Protocol):
    def get(self) -> AdminCredentials: ...


class SecretsManagerAdminCredentials:
    """``{"Email": "...", "Password": "..."}`` from the secret ``secret_id``, cached ``max_age`` seconds."""

    def __init__(self, secret_id: str, *, max_age: int = 300, client: Any = None) -> None:
        if not secret_id:
            raise AdminCredentialsError("ADMIN_CREDENTIALS_SECRET_ARN is not set")
        self._secret_id = secret_id
        self._max_age = max_age
        self._provider = parameters.SecretsProvider(boto3_client=client) if client is not None else None
        self._lock = threading.Lock()

    def get(self) -> AdminCredentials:
        with self._lock:
            if self._provider is None:
                self._provider = parameters.SecretsProvider()
            try:
                raw = self._provider.get(self._secret_id, max_age=self._max_age)
            except parameters.exceptions.GetParameterError as exc:
                raise AdminCredentialsError(f"cannot read the admin credentials secret: {type(exc).__name__}") from None
        text = raw if isinstance(raw, str) else bytes(raw).decode(errors="replace")  # type: ignore[arg-type]
        try:
            return AdminCredentials.model_validate(json.loads(text))
        except (ValueError, ValidationError):
            raise AdminCredentialsError(
                'the admin credentials secret must be {"Email": ..., "Password": ...}'
            ) from None


@dataclass
class _Held:
    """The renewal lease this worker holds: the item as leased, our owner id, and when the lease ends."""

    item: StoredAdminSession
    owner: str
    expires_at: float
    calls: int = 0

    @property
    def version(self) -> int | None:
        return self.item.version if self.item.committed else None


class FleetAdminSession:
    """The admin JWT every lifecycle and reconcile call uses; see the module docstring.

    ``logins``, ``refreshes``, ``answers_lost`` and ``logins_by_cause`` count what this container did.

    Example
    -------
    >>> session = FleetAdminSession(upstream=..., store=..., credentials=..., timing=timing)  # doctest: +SKIP
    >>> session.call(lambda token: upstream.update_user(token, device_token, changes))  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        upstream: UserService,
        store: AdminSessionStore,
        credentials: AdminCredentialsProvider,
        timing: LeaseTiming = DEFAULT_TIMING,
        margin_seconds: int = 300,
        wait_seconds: float = 10.0,
        commit_attempts: int = 10,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._upstream = upstream
        self._store = store
        self._credentials = credentials
        self._timing = timing
        self._margin = margin_seconds
        self._wait = wait_seconds
        self._commit_attempts = commit_attempts
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self._cached: StoredAdminSession | None = None
        self._lock = threading.Lock()
        self.logins = 0
        self.refreshes = 0
        self.answers_lost = 0
        self.logins_by_cause: Counter[str] = Counter()

    @property
    def timing(self) -> LeaseTiming:
        return self._timing

    def call(self, request: Callable[[SecretStr], _T]) -> _T:
        """Run a management call with the fleet's admin JWT; on a 401, renew once and repeat it."""
        session = self._session()
        assert session.access_token is not None
        try:
            return request(SecretStr(session.access_token))
        except UnauthorizedError:
            logger.info("admin JWT refused: renewing it once", extra={"version": session.version})
            if session.committed:
                self._store.expire(version=session.version)
            with self._lock:
                if self._cached is session:
                    self._cached = None
            session = self._session(refused=session.version)
            assert session.access_token is not None
            return request(SecretStr(session.access_token))

    # --------------------------------------------------------------------------------------------- internals

    def _live(self, item: StoredAdminSession | None, refused: int | None) -> bool:
        if item is None or item.access_token is None or not item.committed or item.version == refused:
            return False
        renew_at = item.renew_at if item.renew_at is not None else item.expires_at - self._margin
        return self._clock() < min(renew_at, item.expires_at)

    def _session(self, refused: int | None = None) -> StoredAdminSession:
        with self._lock:
            if self._live(self._cached, refused):
                assert self._cached is not None
                return self._cached
            deadline = self._clock() + self._wait
            delay = 0.2
            while True:
                item = self._store.get()
                if self._live(item, refused):
                    self._cached = item
                    assert item is not None
                    return item
                renewed = self._renew(item)
                if renewed is not None:
                    # A session that could not be stored serves this call only (its version is -1).
                    self._cached = renewed if renewed.committed else None
                    return renewed
                if self._clock() >= deadline:
                    raise AdminSessionUnavailableError("the admin session is being renewed elsewhere")
                self._sleep(delay)
                delay = min(2.0, delay * 2)

    def _renew(self, item: StoredAdminSession | None) -> StoredAdminSession | None:
        """Renew under the lease; ``None`` when another worker holds it (the caller re-reads)."""
        owner = str(uuid.uuid4())
        version = item.version if item is not None and item.committed else None
        now = self._clock()
        leased = self._store.lease(version=version, owner=owner, now=now, ttl=self._timing.lease_seconds)
        if leased is None:
            return None
        lease_end = leased.lease_expires_at if leased.lease_expires_at is not None else now + self._timing.lease_seconds
        held = _Held(leased, owner, float(lease_end))
        cause = self._login_cause(leased)
        session: AdminSession | None = None
        if cause is None:
            session, cause = self._refresh(held)
        if session is not None:
            return self._commit(held, session, via="admin_refresh")
        assert cause is not None
        return self._commit(held, self._login(held, cause), via="admin_login")

    def _login_cause(self, leased: StoredAdminSession) -> AdminLoginCause | None:
        """Why the leased session must be recovered by Login, or ``None`` when its refresh token may be presented."""
        if leased.lease_lapsed:
            # The renewal before ours took the lease and never finished (cut off mid-call, or before its commit):
            # the stored refresh token may be spent. Login rather than present it again.
            self._answer_lost("unknown", "an earlier renewal did not finish (its lease lapsed)")
            return AdminLoginCause.RENEWAL_UNFINISHED
        cause = _cause(leased.login_cause)
        if not leased.committed or not leased.access_token or not leased.refresh_token:
            return cause or AdminLoginCause.NO_SESSION
        if leased.refresh_token_dead:
            return cause or AdminLoginCause.REFRESH_FAILED
        return None

    def _start_call(self, held: _Held, call: str) -> bool:
        """Whether we may make a rotating call (Refresh or Login) now; False when our lease is gone or too short.

        The first call follows the lease's conditional write and needs no other while the lease has room for it; a
        further call (Login after a lost Refresh), or a first one with too little lease left, renews the lease
        first (conditioned on our ownership and the version), so a lease lost meanwhile is never spent::

            holder: lease --- call ====== (its commit) ---|  <= LeaseExpiresAt - skew
            other (clock ahead by <= skew): takes the lease over only after that, and then logs in
        """
        now = self._clock()
        if held.calls == 0 and self._timing.may_start_call(lease_expires_at=held.expires_at, now=now):
            held.calls += 1
            return True
        renewed = self._store.renew_lease(
            version=held.version, owner=held.owner, now=now, ttl=self._timing.lease_seconds
        )
        if renewed is None:
            metrics.add_metric("AdminLeaseLostBeforeCall", MetricUnit.Count, 1)
            logger.warning("admin session lease lost before a call: not calling", extra={"call": call})
            return False
        held.expires_at = float(renewed)
        if not self._timing.may_start_call(lease_expires_at=held.expires_at, now=self._clock()):
            logger.warning("admin session lease too short for a call", extra={"call": call})
            return False
        held.calls += 1
        return True

    def _refresh(self, held: _Held) -> tuple[AdminSession | None, AdminLoginCause | None]:
        """Refresh the leased session: the new pair, or why a Login must recover it instead."""
        item = held.item
        assert item.access_token is not None
        assert item.refresh_token is not None
        if not self._start_call(held, "admin_refresh"):
            self._store.release(owner=held.owner, login_cause=None)  # nothing sent: the token is intact
            raise AdminSessionUnavailableError("the admin session's lease has no room for a Refresh now")
        try:
            session = self._upstream.admin_refresh(item.access_token, item.refresh_token)
        except DeadRefreshTokenError:
            # Presented before (by a worker past every bound) or revoked upstream: only a Login recovers it.
            metrics.add_metric("AdminRefreshTokensRejected", MetricUnit.Count, 1)
            logger.warning("admin refresh token rejected: logging in", extra={"version": item.version})
            return None, AdminLoginCause.REFRESH_TOKEN_REJECTED
        except OutcomeUnknownError:
            # The refresh token may be spent and its successor lost with the answer: never presented again.
            self._answer_lost("admin_refresh", "no answer to a Refresh that may have spent the token")
            return None, AdminLoginCause.REFRESH_ANSWER_LOST
        except UnauthorizedError:
            return None, AdminLoginCause.REFRESH_FAILED
        except RetryableUpstreamError:
            # Not processed (503, 429, never sent): the token is still good; the caller retries later.
            self._store.release(owner=held.owner, login_cause=None)
            raise
        except UpstreamError:
            # An answer no path above expects (403, a 3xx, another 4xx): the token may or may not be spent.
            self._store.release(owner=held.owner, login_cause=AdminLoginCause.REFRESH_FAILED)
            raise
        except BaseException:
            # Cut off (or anything else) with the request possibly sent: as a lost answer.
            self._answer_lost("admin_refresh", "the Refresh was interrupted after it may have been sent")
            self._store.release(owner=held.owner, login_cause=AdminLoginCause.REFRESH_ANSWER_LOST)
            raise
        self.refreshes += 1
        metrics.add_metric("AdminRefreshes", MetricUnit.Count, 1)
        return session, None

    def _login(self, held: _Held, cause: AdminLoginCause) -> AdminSession:
        """Log in under the lease (the client takes the fleet's Login budget first); ``cause`` says why."""
        try:
            credentials = self._credentials.get()
        except BaseException:
            # Nothing sent: give the lease back (a lapsed one would read as a renewal cut off mid-call).
            self._store.release(owner=held.owner, login_cause=cause)
            raise
        if not self._start_call(held, "admin_login"):
            self._store.release(owner=held.owner, login_cause=cause)
            raise AdminSessionUnavailableError("the admin session's lease has no room for a Login now")
        try:
            session = self._upstream.admin_login(credentials)
        except LoginDeferredError as exc:
            # Nothing sent. The stored token stays dead, and the cause is kept for the Login that follows.
            self._store.release(owner=held.owner, login_cause=cause)
            logger.info("admin Login deferred", extra={"cause": cause.value, "detail": exc.message})
            raise AdminSessionUnavailableError(f"admin Login deferred: {exc.message}") from None
        except RateLimitedError as exc:
            # A 429: the client opened the fleet's Login block; nothing was issued.
            self._store.release(owner=held.owner, login_cause=cause)
            self._login_logged(cause, "rate_limited", status=exc.status)
            raise AdminSessionUnavailableError("admin Login refused by the upstream's limit") from None
        except (TransientUpstreamError, OutcomeUnknownError) as exc:
            if exc.status is not None:  # an error answer (5xx): nothing issued
                self._store.release(owner=held.owner, login_cause=cause)
                self._login_logged(cause, "failed", status=exc.status)
                raise
            # No answer: the upstream may have issued a session we will never see. Only another Login recovers.
            self._lost_login(held, cause)
            raise AdminSessionUnavailableError("admin Login answer lost") from None
        except UpstreamError as exc:
            self._store.release(owner=held.owner, login_cause=cause)
            self._login_logged(cause, "failed", status=exc.status)
            raise
        except BaseException:
            self._lost_login(held, cause)
            raise
        self.logins += 1
        self.logins_by_cause[cause.value] += 1
        metrics.add_metric("AdminLogins", MetricUnit.Count, 1)
        self._login_logged(cause, "ok")
        return session

    def _lost_login(self, held: _Held, cause: AdminLoginCause) -> None:
        self._answer_lost("admin_login", "no answer to a Login")
        self._store.release(owner=held.owner, login_cause=AdminLoginCause.LOGIN_ANSWER_LOST)
        self._login_logged(cause, "answer_lost")

    def _commit(self, held: _Held, session: AdminSession, *, via: str) -> StoredAdminSession:
        """Store the pair a call just returned (retried hard: the stored refresh token is spent from the call on)."""
        now = self._clock()
        expires_at = int(session.expires_at(datetime.fromtimestamp(now, UTC)).timestamp())
        lifetime = max(0.0, expires_at - now)
        # Renewed ``margin`` before expiry, but never before half its life: a token that lives less than the margin
        # (short lifetimes in tests and runs) would otherwise be renewed on every call.
        renew_at = int(now + max(lifetime - self._margin, lifetime / 2))
        delay = 0.1
        for attempt in range(self._commit_attempts):
            try:
                stored = self._store.commit(
                    version=held.version,
                    owner=held.owner,
                    session=session,
                    expires_at=expires_at,
                    renew_at=renew_at,
                    now=self._clock(),
                )
                break
            except StoreError:
                metrics.add_metric("AdminCommitRetries", MetricUnit.Count, 1)
                if attempt == self._commit_attempts - 1:
                    logger.error("rotated admin session could not be stored", extra={"via": via})
                    self._commit_failed(held, via)
                    raise
                self._sleep(self._rng.uniform(0, delay))
                delay = min(5.0, delay * 2)
        local = StoredAdminSession(
            version=(held.version or 0) + 1,
            access_token=session.access_token.token.get_secret_value(),
            refresh_token=session.refresh_token.get_secret_value(),
            expires_at=expires_at,
            renew_at=renew_at,
        )
        if stored:
            logger.info("admin session stored", extra={"version": local.version, "via": via})
            return local
        # Our lease was taken over first (we ran past every bound): its new holder logs in. The token stored at our
        # version is the one we spent: never present it again. Our pair serves this call only.
        metrics.add_metric("AdminCommitLeaseLost", MetricUnit.Count, 1)
        logger.error("admin session not stored: the lease was taken over before the commit", extra={"via": via})
        if held.version is not None:
            with contextlib.suppress(StoreError):
                self._store.mark_dead(version=held.version, login_cause=AdminLoginCause.COMMIT_LOST)
        return StoredAdminSession(**{**local.__dict__, "version": -1})

    def _commit_failed(self, held: _Held, via: str) -> None:
        """The rotated pair is lost: mark the spent token dead, or (the store failing on) let the lease lapse, and
        the next renewal logs in either way. Counted once: here if the mark lands, else by the lapse's finder."""
        try:
            self._store.release(owner=held.owner, login_cause=AdminLoginCause.COMMIT_LOST)
        except StoreError:
            return
        self._answer_lost(via, "the rotated session could not be stored")

    def _answer_lost(self, call: str, why: str) -> None:
        self.answers_lost += 1
        metrics.add_metric("AdminAnswersLost", MetricUnit.Count, 1)
        logger.warning("admin answer lost", extra={"call": call, "why": why, "answers_lost": self.answers_lost})

    def _login_logged(self, cause: AdminLoginCause, outcome: str, *, status: int | None = None) -> None:
        # WARNING: a Login is never the normal path, and a run at log level WARNING must still count them.
        logger.warning(
            "admin Login",
            extra={
                "cause": cause.value,
                "outcome": outcome,
                "status": status,
                "lost_answer": cause in LOST_ANSWER_CAUSES,
                "admin_logins": self.logins,
            },
        )


def _cause(value: str | None) -> AdminLoginCause | None:
    try:
        return AdminLoginCause(value) if value else None
    except ValueError:
        return AdminLoginCause.REFRESH_FAILED
