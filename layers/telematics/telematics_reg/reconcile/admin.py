"""The admin JWT the reconcile flow lists users with, behind one small interface.

:class:`AdminTokenSource` is all the reconcile flow asks of an admin session: run a management call with a live
admin JWT, and renew it once when the upstream refuses it (401). Its shape is the one of the fleet's shared admin
session (``FleetAdminSession.call`` of the lifecycle flow: stored encrypted in the tokens table, renewed under a
lease), so that session can be passed here as it is.

:class:`LoggedInAdminSession` is the simple implementation used until then: one session per container, started by
an admin Login through the client (which takes the fleet's Login budget first: ``LoginDeferredError`` with nothing
sent when it is spent or blocked), refreshed before it expires, and logged in again only when its refresh token is
refused. An audit makes one Login per cold start at most; refreshes cost no Login.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from aws_lambda_powertools.utilities import parameters
from pydantic import SecretStr, ValidationError

from telematics_reg.errors import DeadRefreshTokenError, OutcomeUnknownError, TelematicsError, UnauthorizedError
from telematics_reg.observability import logger

if TYPE_CHECKING:
    from telematics_reg.management_models import AdminCredentials, AdminSession
    from telematics_reg.upstream import UserService

_T = TypeVar("_T")


class AdminCredentialsError(TelematicsError):
    """The admin credentials secret is not configured, unreadable, or not ``{"Email": ..., "Password": ...}``."""


class AdminTokenSource(Protocol):
    """A live admin JWT for management calls.

    Example
    -------
    >>> page = admin.call(lambda token: upstream.users_page(token, query))  # doctest: +SKIP
    """

    def call(self, request: Callable[[SecretStr], _T]) -> _T:
        """Run ``request`` with the admin JWT; on a 401, renew the session once and run it again."""
        ...


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
        from telematics_reg.management_models import AdminCredentials  # noqa: PLC0415 - see management_models

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


class StaticAdminCredentials:
    """Fixed admin credentials (tests, the CLI given them)."""

    def __init__(self, credentials: AdminCredentials) -> None:
        self._credentials = credentials

    def get(self) -> AdminCredentials:
        return self._credentials


class LoggedInAdminSession:
    """:class:`AdminTokenSource` kept in this process: Login (within the fleet's budget), then refresh.

    Parameters
    ----------
    upstream
        The User Service client; its admin Login takes the fleet's Login budget.
    credentials
        The admin account.
    margin_seconds
        Refresh the JWT when it expires within this.
    """

    def __init__(
        self,
        *,
        upstream: UserService,
        credentials: AdminCredentialsProvider,
        margin_seconds: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._upstream = upstream
        self._credentials = credentials
        self._margin = margin_seconds
        self._clock = clock
        self._session: AdminSession | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()
        self.logins = 0
        self.refreshes = 0

    def call(self, request: Callable[[SecretStr], _T]) -> _T:
        token = self._token(renew=False)
        try:
            return request(token)
        except UnauthorizedError:
            logger.info("admin JWT refused: renewing it once")
            return request(self._token(renew=True, refused=token))

    def _token(self, *, renew: bool, refused: SecretStr | None = None) -> SecretStr:
        with self._lock:
            session = self._session
            current = session.access_token.token if session is not None else None
            if session is not None and renew and refused is not None and current != refused:
                return session.access_token.token  # another thread renewed it meanwhile
            if session is not None and not renew and self._expires_at - self._margin > self._clock():
                return session.access_token.token
            self._session = self._renew(session)
            now = datetime.fromtimestamp(self._clock(), UTC)
            self._expires_at = self._session.expires_at(now).timestamp()
            return self._session.access_token.token

    def _renew(self, session: AdminSession | None) -> AdminSession:
        if session is not None:
            try:
                renewed = self._upstream.admin_refresh(session.access_token.token, session.refresh_token)
            except (DeadRefreshTokenError, OutcomeUnknownError):
                # Spent, expired or maybe spent (answer lost): never presented again; Login instead.
                logger.warning("admin refresh token unusable: logging in")
            else:
                self.refreshes += 1
                return renewed
        # The client takes a slot of the fleet's Login budget first (LoginDeferredError when none is free).
        renewed = self._upstream.admin_login(self._credentials.get())
        self.logins += 1
        logger.info("admin session started by Login")
        return renewed
