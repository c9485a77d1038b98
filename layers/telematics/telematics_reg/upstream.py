"""The telematics User Service: the interface the library uses (:class:`UserService`) and its HTTP client.

Every answer is turned into a :class:`CreateResult`/``bool`` or one of the typed errors of
:mod:`telematics_reg.errors`. What a failure means depends on the call:

============  =====================================  ============================================
call          retried here (full-jitter backoff)     an answer lost after the request went out
============  =====================================  ============================================
Create        never-sent, 429, 503                   OutcomeUnknownError (recovered by Login when
CreateMany    never-sent, 429, 503                   the body has a CustomToken)
Refresh       never-sent, 429, 503                   OutcomeUnknownError: the token may be spent
Login         never-sent, 429, 503                   TransientUpstreamError (rate-limited upstream)
UserExists    every transient failure                TransientUpstreamError
============  =====================================  ============================================

Tokens, refresh tokens and InstanceKeys never appear in logs or exception messages.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any, Final, Protocol, TypeVar
from uuid import UUID

import requests
from aws_lambda_powertools.metrics import MetricUnit
from pydantic import SecretStr, ValidationError
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError
from urllib3.util.retry import Retry

from telematics_reg import __version__
from telematics_reg.errors import (
    CreateManyIncompleteError,
    DeadRefreshTokenError,
    FieldError,
    ForbiddenError,
    NotFoundError,
    OutcomeUnknownError,
    RateLimitedError,
    RetryableUpstreamError,
    TransientUpstreamError,
    UnauthorizedError,
    UpstreamError,
    UpstreamValidationError,
    UserAlreadyExistsError,
)
from telematics_reg.models import (
    MAX_CREATE_MANY_PER_CALL,
    CreateManyRequest,
    CreateManyResult,
    CreateResult,
    CreateUserRequest,
    Envelope,
    InstanceCredentials,
    LoginRequest,
    RefreshRequest,
    UserExistsResult,
    UserFields,
    read_jwt_claims,
)
from telematics_reg.observability import logger, metrics

__all__ = ["REFRESH_PATH_OBSERVED", "REFRESH_PATH_SPEC", "UserService", "UserServiceClient", "parse_retry_after"]

REFRESH_PATH_OBSERVED: Final = "/v1/Auth/RefreshToken"
"""Refresh path every official client uses."""
REFRESH_PATH_SPEC: Final = "/v1/RefreshToken"
"""Refresh path the product spec writes; tried once when the observed one answers 404."""

_ModelT = TypeVar("_ModelT", CreateResult, CreateManyResult, UserExistsResult)


class UserService(Protocol):
    """What the library needs from the User Service. :class:`UserServiceClient` is the real one;
    :class:`telematics_reg.fakes.FakeUserService` is an in-memory one for tests."""

    def create(self, creds: InstanceCredentials, body: CreateUserRequest) -> CreateResult:
        """Register one user. With ``body.custom_token`` a lost answer is recovered, never doubled."""
        ...

    def create_many(
        self, creds: InstanceCredentials, body: CreateManyRequest, custom_tokens: Sequence[UUID] | None = None
    ) -> list[CreateResult]:
        """Register ``body.quantity`` (at most 100) anonymous users; ``custom_tokens`` serve the Create fallback."""
        ...

    def refresh(self, access_token: str, refresh_token: str) -> CreateResult:
        """Exchange a (possibly expired) access token and its single-use refresh token for a new pair."""
        ...

    def login(self, creds: InstanceCredentials, device_token: UUID) -> CreateResult:
        """Issue a new token pair for an existing user (rate-limited upstream: not the normal path)."""
        ...

    def user_exists(self, creds: InstanceCredentials, client_id: str) -> bool:
        """Whether the instance has a user with this ``UserFields.ClientId``."""
        ...


@dataclass(frozen=True)
class _Call:
    name: str
    # Safe to repeat whatever happened (reads only): every transient failure is retried.
    repeatable: bool
    # Changes state upstream: an answer lost after sending means "maybe done", never "not done".
    commits: bool


_CREATE: Final = _Call("create", repeatable=False, commits=True)
_CREATE_MANY: Final = _Call("create_many", repeatable=False, commits=True)
_REFRESH: Final = _Call("refresh", repeatable=False, commits=True)
_LOGIN: Final = _Call("login", repeatable=False, commits=False)
_USER_EXISTS: Final = _Call("user_exists", repeatable=True, commits=False)
_LATENCY_METRIC: Final = {
    "create": "UpstreamCreateLatency",
    "create_many": "UpstreamCreateManyLatency",
    "refresh": "UpstreamRefreshLatency",
    "login": "UpstreamLoginLatency",
    "user_exists": "UpstreamUserExistsLatency",
}


class _Failed(Exception):
    """One attempt's failure, and whether the upstream provably did not process the request."""

    def __init__(self, error: UpstreamError, *, not_processed: bool, cause: BaseException | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.not_processed = not_processed
        self.cause = cause


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header (delay-seconds or HTTP-date).

    Parameters
    ----------
    value
        The header's value, or None when absent.
    now
        The current time, for an HTTP-date (default: now, UTC).

    Returns
    -------
    float | None
        Seconds (never negative), or None when absent or unreadable.

    Example
    -------
    >>> parse_retry_after("3")
    3.0
    >>> parse_retry_after("Wed, 21 Oct 2015 07:28:05 GMT", now=datetime(2015, 10, 21, 7, 28, tzinfo=UTC))
    5.0
    >>> parse_retry_after("soon") is None
    True
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the request provably never reached the server (no connection was made)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(exc, requests.exceptions.ReadTimeout) or not isinstance(exc, requests.exceptions.ConnectionError):
        return False
    # With urllib3 retries off, a failure to connect comes wrapped in MaxRetryError; a connection dropped after
    # the request was written comes as a bare ProtocolError: that one may have been processed.
    wrapped = exc.args[0] if exc.args else None
    if not isinstance(wrapped, MaxRetryError):
        return False
    # A TLS handshake failure also happens before any byte of the request is sent.
    return isinstance(wrapped.reason, NewConnectionError | ConnectTimeoutError) or isinstance(
        exc, requests.exceptions.SSLError
    )


def _get_ci(mapping: Mapping[Any, Any], key: str) -> Any:
    return next((v for k, v in mapping.items() if isinstance(k, str) and k.lower() == key.lower()), None)


def _scrub(text: str, secrets: Iterable[str]) -> str:
    # The upstream may echo input in its error texts; never let a secret through into our exceptions.
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _secret(value: str | SecretStr) -> SecretStr:
    return value if isinstance(value, SecretStr) else SecretStr(value)


class UserServiceClient:
    """The User Service over HTTP: one pooled ``requests`` session, bounded retries, typed errors.

    Parameters
    ----------
    base_url
        E.g. ``https://user.telematicssdk.com`` (or the emulator's ``http://127.0.0.1:8081``).
    connect_timeout, read_timeout
        Seconds; the read timeout bounds each wait for bytes, not the whole call.
    max_connections
        Size of the connection pool; callers beyond it wait for a free connection (bounded concurrency).
    max_attempts
        Attempts per call, first included, for the failures that are safe to retry.
    backoff_base, backoff_cap
        Full-jitter backoff: before retry ``n`` (0-based) sleep ``random(0, min(cap, base * 2**n))``.
    max_retry_after
        Longest ``Retry-After`` honoured by sleeping; a longer one raises :class:`RateLimitedError` at once so
        the caller can reschedule instead of holding a Lambda.
    max_create_recoveries
        Login/Create rounds spent recovering a Create with a CustomToken whose outcome is unknown.
    sleep, random_uniform
        Injected for tests.

    Example
    -------
    >>> client = UserServiceClient("http://127.0.0.1:8081", read_timeout=5)
    >>> client.close()
    """

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 3.05,
        read_timeout: float = 10.0,
        max_connections: int = 32,
        max_attempts: int = 4,
        backoff_base: float = 0.2,
        backoff_cap: float = 5.0,
        max_retry_after: float = 30.0,
        max_create_recoveries: int = 2,
        user_agent: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        random_uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        if max_attempts < 1 or max_connections < 1 or max_create_recoveries < 0:
            raise ValueError("max_attempts and max_connections must be >= 1, max_create_recoveries >= 0")
        self._base_url = base_url.rstrip("/")
        self._timeout = (connect_timeout, read_timeout)
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._max_retry_after = max_retry_after
        self._max_create_recoveries = max_create_recoveries
        self._sleep = sleep
        self._random = random_uniform
        self._lock = threading.Lock()
        self._refresh_path = REFRESH_PATH_OBSERVED
        self._create_many_offered = True

        self._session = requests.Session()
        # Proxy settings from the environment are read once here, not on every request (requests would walk
        # os.environ per call, a fifth of the CPU of a registration).
        self._session.proxies.update(requests.utils.get_environ_proxies(self._base_url))
        self._session.trust_env = False
        # Retries are ours (they depend on the call); urllib3's would repeat a Create blindly.
        adapter = HTTPAdapter(
            pool_connections=2,
            pool_maxsize=max_connections,
            max_retries=Retry(total=0, read=False, redirect=False),
            pool_block=True,
        )
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        self._session.headers.update(
            {
                "User-Agent": user_agent or f"telematics-registration/{__version__} requests/{requests.__version__}",
                "Accept": "application/json",
            }
        )

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()

    def __enter__(self) -> UserServiceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- calls ----------------------------------------------------------------------------------------

    def create(self, creds: InstanceCredentials, body: CreateUserRequest) -> CreateResult:
        """Register one user (``POST /v1/Registration/Create``).

        A body with a ``CustomToken`` (a DeviceToken we chose) is exactly-once: when the answer is lost, the
        outcome is found out by Login instead of guessed. Without one, a lost answer raises
        :class:`OutcomeUnknownError` and is never repeated (a second Create would make a second user)::

            Create(T) --> upstream commits user T --x answer lost (timeout, dropped connection, 5xx)
            Login(T)  --> 200: user T exists, Login issued its tokens ............ return them
                      --> 404: nothing was committed ............................. Create(T) again (bounded)
            Create(T) --> 422 "CustomToken exists" (an earlier attempt committed) .. Login(T)

        Parameters
        ----------
        creds
            The instance to register the user in.
        body
            The Create body; ``to_upstream()`` is sent.

        Returns
        -------
        CreateResult
            The DeviceToken and, unless ``CreateAccessToken`` was false, the tokens (when recovered by Login,
            always the tokens Login issued).

        Raises
        ------
        UpstreamValidationError
            Rejected (422/400); ``errors`` holds the upstream's ``Errors[]``.
        UnauthorizedError
            Bad instance credentials.
        RetryableUpstreamError
            Not processed (or, with a CustomToken, safe to try again later).
        OutcomeUnknownError
            The user may exist and could not be recovered.

        Example
        -------
        >>> from uuid import uuid4
        >>> client = UserServiceClient("http://127.0.0.1:8081")
        >>> creds = InstanceCredentials(instance_id=uuid4(), instance_key="key")
        >>> body = CreateUserRequest(custom_token=uuid4(), user_fields=UserFields(client_id="c-1"))
        >>> result = client.create(creds, body)  # doctest: +SKIP
        """
        try:
            return self._create_once(creds, body)
        except (OutcomeUnknownError, UserAlreadyExistsError) as exc:
            if body.custom_token is None:
                raise
            return self._recover_create(creds, body, body.custom_token, exc)

    def _create_once(self, creds: InstanceCredentials, body: CreateUserRequest) -> CreateResult:
        envelope = self._send(
            _CREATE,
            "POST",
            "/v1/Registration/Create",
            headers=creds.headers(),
            body=body.to_upstream(),
            secrets=[creds.instance_key.get_secret_value()],
        )
        return self._result(_CREATE, envelope, CreateResult)

    def _recover_create(
        self, creds: InstanceCredentials, body: CreateUserRequest, device_token: UUID, first: UpstreamError
    ) -> CreateResult:
        last = first
        for _ in range(self._max_create_recoveries):
            try:
                result = self.login(creds, device_token)
            except NotFoundError:
                pass  # the lost Create did not commit: creating again cannot make a second user
            except RetryableUpstreamError:
                raise  # with the CustomToken, trying the whole Create again later is safe
            except UpstreamError as exc:
                raise OutcomeUnknownError(
                    f"User Service create: outcome unknown and Login could not tell ({type(exc).__name__})",
                    status=exc.status,
                    call=_CREATE.name,
                ) from exc
            else:
                logger.info("user service create recovered by login", extra={"call": _CREATE.name})
                return result
            try:
                return self._create_once(creds, body)
            except (OutcomeUnknownError, UserAlreadyExistsError) as exc:
                last = exc
        raise OutcomeUnknownError(
            f"User Service create: outcome still unknown after {self._max_create_recoveries} recovery rounds",
            status=last.status,
            call=_CREATE.name,
        ) from last

    def create_many(
        self, creds: InstanceCredentials, body: CreateManyRequest, custom_tokens: Sequence[UUID] | None = None
    ) -> list[CreateResult]:
        """Register ``body.quantity`` anonymous users (``POST /v1/Registration/CreateMany``).

        When the upstream does not offer CreateMany (404, remembered for this client's life) it is done as one
        Create per user, each with ``CustomToken = custom_tokens[i]`` when given: then every step is
        exactly-once. A real CreateMany whose answer is lost raises :class:`OutcomeUnknownError`.

        Parameters
        ----------
        creds
            The instance.
        body
            At most ``MAX_CREATE_MANY_PER_CALL`` (100) users: chunking is the caller's job.
        custom_tokens
            ``body.quantity`` DeviceTokens for the fallback, or None.

        Returns
        -------
        list[CreateResult]
            One per user created (as many as the upstream returned).

        Raises
        ------
        ValueError
            Quantity above 100, or ``custom_tokens`` of the wrong length.
        CreateManyIncompleteError
            The fallback stopped part-way; ``completed`` holds the users made so far.

        Example
        -------
        >>> from uuid import uuid4
        >>> client = UserServiceClient("http://127.0.0.1:8081")
        >>> creds = InstanceCredentials(instance_id=uuid4(), instance_key="key")
        >>> users = client.create_many(creds, CreateManyRequest(quantity=3))  # doctest: +SKIP
        """
        if body.quantity > MAX_CREATE_MANY_PER_CALL:
            raise ValueError(f"CreateMany takes at most {MAX_CREATE_MANY_PER_CALL} users per call")
        if custom_tokens is not None and len(custom_tokens) != body.quantity:
            raise ValueError(f"custom_tokens has {len(custom_tokens)} items for Quantity {body.quantity}")
        with self._lock:
            offered = self._create_many_offered
        if offered:
            try:
                envelope = self._send(
                    _CREATE_MANY,
                    "POST",
                    "/v1/Registration/CreateMany",
                    headers=creds.headers(),
                    body=body.to_upstream(),
                    secrets=[creds.instance_key.get_secret_value()],
                )
            except NotFoundError:
                with self._lock:
                    self._create_many_offered = False
                logger.info("user service create_many not offered: one create per user", extra={"call": "create_many"})
            else:
                return self._result(_CREATE_MANY, envelope, CreateManyResult).results
        return self._create_each(creds, body, custom_tokens)

    def _create_each(
        self, creds: InstanceCredentials, body: CreateManyRequest, custom_tokens: Sequence[UUID] | None
    ) -> list[CreateResult]:
        flags = body.custom_fields
        user_fields = (
            UserFields(
                enable_tracking=flags.enable_tracking, enable_logging=flags.enable_logging, enabled=flags.enabled
            )
            if flags is not None
            else None
        )
        results: list[CreateResult] = []
        for index in range(body.quantity):
            single = CreateUserRequest(
                create_access_token=body.create_access_token,
                user_fields=user_fields,
                custom_token=custom_tokens[index] if custom_tokens is not None else None,
            )
            try:
                results.append(self.create(creds, single))
            except UpstreamError as exc:
                if not results:
                    raise
                raise CreateManyIncompleteError(
                    f"User Service create_many: the one-create-per-user fallback stopped after {len(results)} of "
                    f"{body.quantity} users ({type(exc).__name__})",
                    status=exc.status,
                    errors=exc.errors,
                    call=_CREATE_MANY.name,
                    completed=results,
                    cause=exc,
                ) from exc
        return results

    def refresh(self, access_token: str | SecretStr, refresh_token: str | SecretStr) -> CreateResult:
        """Exchange a (possibly expired) access token and its refresh token for a new pair.

        Uses ``/v1/Auth/RefreshToken``; on a 404 it tries ``/v1/RefreshToken`` once and remembers which path
        answers. Refresh tokens are single-use: once the request went out, it is never repeated here.

        Parameters
        ----------
        access_token, refresh_token
            The user's current pair.

        Returns
        -------
        CreateResult
            The new pair; ``DeviceToken`` from the answer or, when absent, from the JWT's claims.

        Raises
        ------
        DeadRefreshTokenError
            HTTP 400: used, revoked or unknown refresh token (only Login can recover the user).
        OutcomeUnknownError
            The answer was lost: the refresh token may be spent. Re-read state, or fall back to Login.
        RetryableUpstreamError
            Not processed; the refresh token is still good.

        Example
        -------
        >>> client = UserServiceClient("http://127.0.0.1:8081")
        >>> new_pair = client.refresh("<jwt>", "<refresh token>")  # doctest: +SKIP
        """
        body = RefreshRequest(access_token=_secret(access_token), refresh_token=_secret(refresh_token))
        secrets = [body.access_token.get_secret_value(), body.refresh_token.get_secret_value()]
        with self._lock:
            first = self._refresh_path
        paths = [first, REFRESH_PATH_SPEC if first == REFRESH_PATH_OBSERVED else REFRESH_PATH_OBSERVED]
        for index, path in enumerate(paths):
            try:
                envelope = self._send(_REFRESH, "POST", path, body=body.to_upstream(), secrets=secrets)
            except NotFoundError:
                # A 404 means no such route: the token was not looked at, so the other path may use it.
                if index + 1 < len(paths):
                    continue
                raise
            except UpstreamError as exc:
                if exc.status is not None:
                    self._remember_refresh_path(path)
                raise
            self._remember_refresh_path(path)
            return self._refresh_result(envelope, secrets[0])
        raise AssertionError("unreachable")  # pragma: no cover

    def _remember_refresh_path(self, path: str) -> None:
        with self._lock:
            changed = self._refresh_path != path
            self._refresh_path = path
        if changed:
            logger.info("user service refresh path switched", extra={"call": "refresh", "path": path})

    def _refresh_result(self, envelope: Envelope, old_access_token: str) -> CreateResult:
        result = envelope.result
        if isinstance(result, Mapping) and _get_ci(result, "DeviceToken") is None:
            # The spec says Refresh "may include" DeviceToken; the JWTs carry it as a claim.
            token = _get_ci(result, "AccessToken")
            new_jwt = _get_ci(token, "Token") if isinstance(token, Mapping) else None
            for jwt in (new_jwt, old_access_token):
                claims = (read_jwt_claims(jwt) if isinstance(jwt, str) else None) or {}
                device_token = claims.get("DeviceToken") or claims.get("sub")
                if device_token:
                    envelope = envelope.model_copy(update={"result": {**result, "DeviceToken": device_token}})
                    break
        return self._result(_REFRESH, envelope, CreateResult)

    def login(self, creds: InstanceCredentials, device_token: UUID) -> CreateResult:
        """Issue a new token pair for an existing user (``POST /v1/Auth/Login``, DeviceToken + InstanceKey).

        The previous refresh token of the user stops working. The upstream rate-limits Login per IP: use it to
        recover, never as the normal path.

        Parameters
        ----------
        creds
            The user's instance (its InstanceKey is the password).
        device_token
            The user.

        Returns
        -------
        CreateResult
            The user's DeviceToken and new tokens.

        Raises
        ------
        NotFoundError
            No such user in the instance.
        UnauthorizedError
            Wrong instance credentials, or Login disabled for the user.

        Example
        -------
        >>> from uuid import uuid4
        >>> client = UserServiceClient("http://127.0.0.1:8081")
        >>> creds = InstanceCredentials(instance_id=uuid4(), instance_key="key")
        >>> pair = client.login(creds, uuid4())  # doctest: +SKIP
        """
        envelope = self._send(
            _LOGIN,
            "POST",
            "/v1/Auth/Login",
            headers={"InstanceId": str(creds.instance_id)},
            body=LoginRequest.for_device(creds, device_token).to_upstream(),
            secrets=[creds.instance_key.get_secret_value()],
        )
        return self._result(_LOGIN, envelope, CreateResult)

    def user_exists(self, creds: InstanceCredentials, client_id: str) -> bool:
        """Whether the instance has a user whose ``UserFields.ClientId`` is ``client_id``.

        Parameters
        ----------
        creds
            The instance.
        client_id
            1 to 128 characters.

        Returns
        -------
        bool
            The upstream's ``UserExists``.

        Example
        -------
        >>> from uuid import uuid4
        >>> client = UserServiceClient("http://127.0.0.1:8081")
        >>> creds = InstanceCredentials(instance_id=uuid4(), instance_key="key")
        >>> client.user_exists(creds, "customer-42")  # doctest: +SKIP
        False
        """
        if not 1 <= len(client_id) <= 128:
            raise ValueError("client_id must have 1 to 128 characters")
        envelope = self._send(
            _USER_EXISTS,
            "GET",
            "/v1/Check/UserExists",
            headers=creds.headers(),
            params={"ClientId": client_id},
            secrets=[creds.instance_key.get_secret_value()],
        )
        return self._result(_USER_EXISTS, envelope, UserExistsResult).user_exists

    # --- transport ------------------------------------------------------------------------------------

    def _send(
        self,
        call: _Call,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        secrets: Sequence[str] = (),
    ) -> Envelope:
        for attempt in range(self._max_attempts):
            try:
                return self._attempt(
                    call, method, path, attempt=attempt, headers=headers, body=body, params=params, secrets=secrets
                )
            except _Failed as failed:
                delay = self._retry_delay(call, failed, attempt)
                if delay is None:
                    raise failed.error from failed.cause
                logger.warning(
                    "user service call retried",
                    extra={
                        "call": call.name,
                        "status": failed.error.status,
                        "error": type(failed.error).__name__,
                        "attempt": attempt + 1,
                        "delay_s": round(delay, 3),
                    },
                )
                self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _retry_delay(self, call: _Call, failed: _Failed, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None when this failure must not be retried."""
        error = failed.error
        retryable = isinstance(error, RateLimitedError) or (
            isinstance(error, TransientUpstreamError) and (failed.not_processed or call.repeatable)
        )
        if not retryable or attempt + 1 >= self._max_attempts:
            return None
        backoff = self._random(0.0, min(self._backoff_cap, self._backoff_base * 2**attempt))
        if isinstance(error, RateLimitedError) and error.retry_after is not None:
            if error.retry_after > self._max_retry_after:
                return None  # the caller reschedules rather than holding a Lambda for that long
            return max(error.retry_after, backoff)
        return backoff

    def _attempt(
        self,
        call: _Call,
        method: str,
        path: str,
        *,
        attempt: int,
        headers: Mapping[str, str] | None,
        body: Mapping[str, Any] | None,
        params: Mapping[str, str] | None,
        secrets: Sequence[str],
    ) -> Envelope:
        started = time.monotonic()
        try:
            response = self._session.request(
                method,
                self._base_url + path,
                headers=dict(headers or {}),
                json=body,
                params=params,
                timeout=self._timeout,
                allow_redirects=False,
            )
        except (
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError,
        ) as exc:
            never_sent = _never_sent(exc)
            logger.debug(
                "user service call failed",
                extra={
                    "call": call.name,
                    "error": type(exc).__name__,
                    "never_sent": never_sent,
                    "latency_ms": round((time.monotonic() - started) * 1000),
                    "attempt": attempt + 1,
                },
            )
            raise _Failed(self._transport_error(call, exc, never_sent), not_processed=never_sent, cause=exc) from exc

        latency_ms = (time.monotonic() - started) * 1000
        # One metric per call (e.g. UpstreamCreateLatency): the dashboard shows p50/p99 of each.
        metrics.add_metric(name=_LATENCY_METRIC[call.name], unit=MetricUnit.Milliseconds, value=latency_ms)
        envelope, problem = _parse_envelope(response.content)
        status = response.status_code
        effective = status
        if 200 <= status < 300 and envelope is not None and envelope.status is not None:
            effective = envelope.status  # official clients treat a body Status other than 2xx as an error
        logger.debug(
            "user service call",
            extra={
                "call": call.name,
                "status": status,
                "body_status": effective if effective != status else None,
                "latency_ms": round(latency_ms),
                "attempt": attempt + 1,
            },
        )
        if 200 <= effective < 300:
            if envelope is None:
                message = f"User Service {call.name}: HTTP {status} answer is {problem}"
                # The call did its work but we cannot read what it made: for a Create that is a lost answer.
                error_type = OutcomeUnknownError if call.commits else UpstreamError
                raise _Failed(error_type(message, status=status, call=call.name), not_processed=False)
            return envelope
        error = _error_for_status(call, effective, envelope, response.headers.get("Retry-After"), secrets)
        raise _Failed(error, not_processed=effective in (429, 503))

    @staticmethod
    def _transport_error(call: _Call, exc: requests.RequestException, never_sent: bool) -> UpstreamError:
        kind = type(exc).__name__
        if never_sent:
            return TransientUpstreamError(f"User Service {call.name}: could not connect ({kind})", call=call.name)
        if call.commits:
            return OutcomeUnknownError(
                f"User Service {call.name}: no answer after the request was sent ({kind}); it may have been processed",
                call=call.name,
            )
        return TransientUpstreamError(f"User Service {call.name}: no answer ({kind})", call=call.name)

    @staticmethod
    def _result(call: _Call, envelope: Envelope, model: type[_ModelT]) -> _ModelT:
        try:
            return model.model_validate(envelope.result)
        except ValidationError as exc:
            message = f"User Service {call.name}: answer has an unexpected shape ({_shape_problems(exc)})"
            error_type = OutcomeUnknownError if call.commits else UpstreamError
            raise error_type(message, status=envelope.status, call=call.name) from None


def _shape_problems(exc: ValidationError) -> str:
    problems = []
    for problem in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(part) for part in ("Result", *problem["loc"]))
        problems.append(f"{where}: {problem['msg']}")
    return "; ".join(problems)


def _parse_envelope(content: bytes) -> tuple[Envelope | None, str]:
    if not content.strip():
        return None, "empty"
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser recurses
        return None, "not JSON"
    if not isinstance(data, dict):
        return None, f"JSON but not an object ({type(data).__name__})"
    try:
        return Envelope.model_validate(data), ""
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors(include_url=False))
        return None, f"not the {{Result, Status, Title, Errors}} envelope ({fields})"


_BY_STATUS: Final[dict[int, type[UpstreamError]]] = {
    401: UnauthorizedError,
    403: ForbiddenError,
    404: NotFoundError,
}


def _error_for_status(
    call: _Call, status: int, envelope: Envelope | None, retry_after: str | None, secrets: Sequence[str]
) -> UpstreamError:
    errors = [
        FieldError(_scrub(e.key, secrets), _scrub(e.message, secrets))
        for e in (envelope.field_errors() if envelope else [])
    ]
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "unexpected status"
    title = _scrub(envelope.title, secrets) if envelope and envelope.title else phrase
    message = f"User Service {call.name} failed: {title}"
    common: dict[str, Any] = {"status": status, "errors": errors, "call": call.name}
    if status == 429:
        return RateLimitedError(message, **common, retry_after=parse_retry_after(retry_after))
    error_type: type[UpstreamError]
    if status in _BY_STATUS:
        error_type = _BY_STATUS[status]
    elif status == 400 and call is _REFRESH:
        error_type = DeadRefreshTokenError
    elif status == 422 and any(e.key.lower() == "customtoken" for e in errors):
        error_type = UserAlreadyExistsError
    elif 400 <= status < 500:
        error_type = UpstreamValidationError
    elif status == 503:
        error_type = TransientUpstreamError  # "unavailable": the request was not processed
    elif 500 <= status < 600:
        error_type = OutcomeUnknownError if call.commits else TransientUpstreamError
    else:
        error_type = UpstreamError
    return error_type(message, **common)
