"""One admin session for the whole fleet: the admin JWT and its refresh token live in the tokens table (item
``ADMIN#SESSION``, encrypted at rest with the stack's KMS key like every user's tokens), are renewed under a lease
like a user's, and are shared by every container. A cold function reads the stored session instead of logging in.

Renewal is a Refresh; Login only when no live refresh token exists (none stored, or the stored one was rejected or
may be spent), within the fleet's Login budget, which the User Service client spends on every Login, user or
admin (:mod:`telematics_reg.budget`). A 401 on a management call expires the stored JWT, renews once and repeats
the call (:meth:`call`).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from aws_lambda_powertools.utilities import parameters
from pydantic import SecretStr, ValidationError

from telematics_reg.errors import (
    DeadRefreshTokenError,
    LoginDeferredError,
    OutcomeUnknownError,
    TelematicsError,
    UnauthorizedError,
)
from telematics_reg.management_models import AdminCredentials, AdminSession
from telematics_reg.observability import logger
from telematics_reg.store import ConditionFailedError, DynamoTokenStore, iso
from telematics_reg.upstream import UserService

_T = TypeVar("_T")
ADMIN_PK = "ADMIN#SESSION"


class AdminSessionUnavailableError(TelematicsError):
    """No admin JWT now (another worker is renewing it, the Login budget is spent, the upstream refused): retry."""


class AdminCredentialsError(TelematicsError):
    """The admin credentials secret is missing or malformed (never shows its value)."""


@dataclass(frozen=True)
class StoredAdminSession:
    version: int
    access_token: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    expires_at: int = 0
    refresh_token_dead: bool = False
    lease_owner: str | None = None
    lease_expires_at: int | None = None


class AdminSessionStore(Protocol):
    def get(self) -> StoredAdminSession | None: ...
    def lease(self, *, version: int | None, owner: str, now: float, ttl: int) -> bool: ...
    def commit(self, *, version: int | None, session: AdminSession, expires_at: int, now: float) -> bool: ...
    def release(self, *, owner: str, refresh_token_dead: bool) -> None: ...
    def expire(self, *, version: int) -> None: ...


class DynamoAdminSessionStore:
    """The session item in the tokens table (same client, same encryption as the users' tokens)."""

    def __init__(self, store: DynamoTokenStore) -> None:
        self._store = store

    def get(self) -> StoredAdminSession | None:
        response = self._store._call("get_item", Key={"pk": {"S": ADMIN_PK}}, ConsistentRead=True)
        item = response.get("Item")
        if not item:
            return None
        values = {k: next(iter(v.values())) for k, v in item.items()}
        return StoredAdminSession(
            version=int(values["Version"]) if "Version" in values else -1,  # -1: never committed
            access_token=values.get("AccessToken"),
            refresh_token=values.get("RefreshToken"),
            expires_at=int(values.get("AccessExpiresAt", 0)),
            refresh_token_dead=bool(values.get("RefreshTokenDead", False)),
            lease_owner=values.get("LeaseOwner"),
            lease_expires_at=int(values["LeaseExpiresAt"]) if "LeaseExpiresAt" in values else None,
        )

    def lease(self, *, version: int | None, owner: str, now: float, ttl: int) -> bool:
        """Take the renewal lease. Condition: the session is the version read (or still absent), no live lease."""
        condition = "(attribute_not_exists(LeaseExpiresAt) OR LeaseExpiresAt < :now) AND " + (
            "attribute_not_exists(Version)" if version is None else "Version = :v"
        )
        values: dict[str, Any] = {":me": owner, ":until": int(now) + ttl, ":now": int(now)}
        if version is not None:
            values[":v"] = version
        try:
            self._store._update(ADMIN_PK, "SET LeaseOwner = :me, LeaseExpiresAt = :until", condition, values)
        except ConditionFailedError:
            return False
        return True

    def commit(self, *, version: int | None, session: AdminSession, expires_at: int, now: float) -> bool:
        """Store a rotated pair. Condition: the version we leased (a lapsed lease does not matter: only another
        commit changes the version)::

            lease(v) -> upstream rotates the pair (the stored refresh token is now spent) -> commit if Version = v
        """
        values: dict[str, Any] = {
            ":at": session.access_token.token.get_secret_value(),
            ":rt": session.refresh_token.get_secret_value(),
            ":exp": expires_at,
            ":next": (version or 0) + 1,
            ":now": iso(now),
        }
        condition = "attribute_not_exists(Version)"
        if version is not None:
            values[":v"] = version
            condition = "Version = :v"
        try:
            self._store._update(
                ADMIN_PK,
                "SET AccessToken = :at, RefreshToken = :rt, AccessExpiresAt = :exp, Version = :next, UpdatedAt = :now "
                "REMOVE LeaseOwner, LeaseExpiresAt, RefreshTokenDead",
                condition,
                values,
            )
        except ConditionFailedError:
            return False
        return True

    def release(self, *, owner: str, refresh_token_dead: bool) -> None:
        values: dict[str, Any] = {":me": owner}
        expression = "REMOVE LeaseOwner, LeaseExpiresAt"
        if refresh_token_dead:
            values[":dead"] = True
            expression = "SET RefreshTokenDead = :dead " + expression
        with contextlib.suppress(ConditionFailedError):
            self._store._update(ADMIN_PK, expression, "LeaseOwner = :me", values)

    def expire(self, *, version: int) -> None:
        """The JWT of ``version`` was refused (401): mark it expired so the next reader renews it."""
        with contextlib.suppress(ConditionFailedError):
            self._store._update(ADMIN_PK, "SET AccessExpiresAt = :zero", "Version = :v", {":zero": 0, ":v": version})


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


class FleetAdminSession:
    """The admin JWT every lifecycle call uses; see the module docstring.

    Example
    -------
    >>> session = FleetAdminSession(upstream=..., store=..., credentials=...)  # doctest: +SKIP
    >>> session.call(lambda token: upstream.update_user(token, device_token, changes))  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        upstream: UserService,
        store: AdminSessionStore,
        credentials: AdminCredentialsProvider,
        margin_seconds: int = 300,
        lease_seconds: int = 60,
        wait_seconds: float = 10.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._upstream = upstream
        self._store = store
        self._credentials = credentials
        self._margin = margin_seconds
        self._lease = lease_seconds
        self._wait = wait_seconds
        self._clock = clock
        self._sleep = sleep
        self._cached: StoredAdminSession | None = None
        self._lock = threading.Lock()
        self.logins = 0
        self.refreshes = 0

    def call(self, request: Callable[[SecretStr], _T]) -> _T:
        """Run a management call with the fleet's admin JWT; on a 401, renew once and repeat it."""
        session = self._session()
        assert session.access_token is not None
        try:
            return request(SecretStr(session.access_token))
        except UnauthorizedError:
            logger.info("admin JWT refused: renewing it once")
            self._store.expire(version=session.version)
            with self._lock:
                self._cached = None
            session = self._session(refused=session.version)
            assert session.access_token is not None
            return request(SecretStr(session.access_token))

    # --------------------------------------------------------------------------------------------- internals

    def _live(self, item: StoredAdminSession | None, refused: int | None) -> bool:
        return (
            item is not None
            and item.access_token is not None
            and item.version != refused
            and item.expires_at - self._margin > self._clock()
        )

    def _session(self, refused: int | None = None) -> StoredAdminSession:
        with self._lock:
            if self._live(self._cached, refused):
                assert self._cached is not None
                return self._cached
            deadline = self._clock() + self._wait
            delay = 0.2
            while True:
                item = self._store.get()
                if item is not None and item.version < 0:
                    item = None
                if self._live(item, refused):
                    self._cached = item
                    assert item is not None
                    return item
                renewed = self._renew(item)
                if renewed is not None:
                    self._cached = renewed
                    return renewed
                if self._clock() >= deadline:
                    raise AdminSessionUnavailableError("the admin session is being renewed elsewhere")
                self._sleep(delay)
                delay = min(2.0, delay * 2)

    def _renew(self, item: StoredAdminSession | None) -> StoredAdminSession | None:
        """Renew under the lease; ``None`` when another worker holds it (the caller re-reads)."""
        owner = str(uuid.uuid4())
        version = item.version if item is not None else None
        if not self._store.lease(version=version, owner=owner, now=self._clock(), ttl=self._lease):
            return None
        session = self._refresh_or_login(item, owner)
        expires_at = int(session.expires_at(datetime.fromtimestamp(self._clock(), UTC)).timestamp())
        # Rotation committed before anything else: the old refresh token is spent from here on.
        if not self._store.commit(version=version, session=session, expires_at=expires_at, now=self._clock()):
            logger.warning("admin session committed elsewhere first: this one is used here only")
        return StoredAdminSession(
            version=(version or 0) + 1,
            access_token=session.access_token.token.get_secret_value(),
            refresh_token=session.refresh_token.get_secret_value(),
            expires_at=expires_at,
        )

    def _refresh_or_login(self, item: StoredAdminSession | None, owner: str) -> AdminSession:
        if item is not None and item.refresh_token and item.access_token and not item.refresh_token_dead:
            try:
                session = self._upstream.admin_refresh(item.access_token, item.refresh_token)
            except DeadRefreshTokenError:
                logger.warning("admin refresh token rejected: logging in")
            except OutcomeUnknownError:
                # The refresh token may be spent: never presented again; the next renewal logs in.
                self._store.release(owner=owner, refresh_token_dead=True)
                raise
            except BaseException:
                self._store.release(owner=owner, refresh_token_dead=False)
                raise
            else:
                self.refreshes += 1
                return session
        try:
            # The client takes the fleet's Login budget first (nothing is sent when it is spent or a block is open).
            session = self._upstream.admin_login(self._credentials.get())
        except LoginDeferredError as exc:
            self._store.release(owner=owner, refresh_token_dead=item is not None)
            raise AdminSessionUnavailableError(f"admin Login deferred: {exc}") from None
        except BaseException:
            self._store.release(owner=owner, refresh_token_dead=item is not None)
            raise
        self.logins += 1
        logger.info("admin session started by Login")
        return session
