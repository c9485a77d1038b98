"""The telematics User Service: the interface the library uses (:class:`UserService`) and its HTTP client.

Every answer is turned into a :class:`CreateResult`/``bool`` or one of the typed errors of
:mod:`telematics_reg.errors`. What a failure means depends on the call:

==============  =====================================  ============================================
call            retried here (full-jitter backoff)     an answer lost after the request went out
==============  =====================================  ============================================
Create          never-sent, 429, 503                   OutcomeUnknownError (recovered by Login when
CreateMany      never-sent, 429, 503                   the body has a CustomToken)
Refresh         never-sent, 429, 503                   OutcomeUnknownError: the token may be spent
Login (user,    never-sent only: every Login that      TransientUpstreamError; a 429 is raised at
admin)          reaches the upstream counts against    once as RateLimitedError (never retried: the
                its limit (5 a minute per IP)          next Login would only extend the block)
UserExists      every transient failure                TransientUpstreamError
find, page      every transient failure                TransientUpstreamError
update, delete  every transient failure, 429 (PUT      TransientUpstreamError after the last attempt
                and DELETE are safe to repeat)
change          never-sent, 429, 503                   verified with find, then repeated if not done
instance
==============  =====================================  ============================================

Tokens, refresh tokens and InstanceKeys never appear in logs or exception messages.
"""

from __future__ import annotations

import http.client
import json
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar
from uuid import UUID

import requests
import urllib3
from aws_lambda_powertools.metrics import MetricUnit
from pydantic import BaseModel, SecretStr, ValidationError
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
    RequestNotSentError,
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

if TYPE_CHECKING:
    from collections.abc import Iterator

    from telematics_reg.budget import LoginBudget
    from telematics_reg.management_models import (
        AdminCredentials,
        AdminSession,
        ManagedUser,
        UserPage,
        UserPageQuery,
        UserUpdate,
    )

__all__ = [
    "REFRESH_PATH_OBSERVED",
    "REFRESH_PATH_SPEC",
    "UserService",
    "UserServiceClient",
    "iter_user_pages",
    "parse_retry_after",
]

REFRESH_PATH_OBSERVED: Final = "/v1/Auth/RefreshToken"
"""Refresh path every official client uses."""
REFRESH_PATH_SPEC: Final = "/v1/RefreshToken"
"""Refresh path the product spec writes; tried once when the observed one answers 404."""

_ModelT = TypeVar("_ModelT", bound=BaseModel)


class UserService(Protocol):
    """What the library needs from the User Service. :class:`UserServiceClient` is the real one;
    :class:`local.fakes.FakeUserService` is an in-memory one for tests."""

    def create(self, creds: InstanceCredentials, body: CreateUserRequest, *, recover: bool = True) -> CreateResult:
        """Register one user. With ``body.custom_token`` a lost answer is recovered, never doubled (with
        ``recover=False`` it is raised instead, and "exists" raises :class:`UserAlreadyExistsError`: no Login)."""
        ...

    def create_many(
        self,
        creds: InstanceCredentials,
        body: CreateManyRequest,
        custom_tokens: Sequence[UUID] | None = None,
        *,
        fallback: bool = True,
    ) -> list[CreateResult]:
        """Register ``body.quantity`` (at most 100) anonymous users; ``custom_tokens`` serve the Create fallback.

        With ``fallback=False`` a CreateMany that is not offered raises :class:`NotFoundError` instead."""
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

    # --- the admin session and the User Management API (admin JWT only) ---

    def admin_login(self, admin: AdminCredentials) -> AdminSession:
        """Start an admin session (rate-limited with every other Login: not the normal path)."""
        ...

    def admin_refresh(self, access_token: str | SecretStr, refresh_token: str | SecretStr) -> AdminSession:
        """Exchange the admin JWT and its single-use refresh token for a new pair."""
        ...

    def find_users(
        self,
        admin_token: str | SecretStr,
        *,
        device_token: UUID | None = None,
        email: str | None = None,
        phone: str | None = None,
        client_id: str | None = None,
        first_name: str | None = None,
        last_name: str | None = None,
    ) -> list[ManagedUser]:
        """Users matching every criterion given (at least one), across every instance of the company."""
        ...

    def users_page(self, admin_token: str | SecretStr, query: UserPageQuery) -> UserPage:
        """One page of GetFilteredPage (see :func:`iter_user_pages` for all of them)."""
        ...

    def update_user(self, admin_token: str | SecretStr, device_token: UUID, changes: UserUpdate) -> None:
        """Change only the fields ``changes`` sets."""
        ...

    def delete_user(self, admin_token: str | SecretStr, device_token: UUID) -> None:
        """Delete the user for good; a user already gone is success."""
        ...

    def change_instance(self, admin_token: str | SecretStr, device_token: UUID, to: InstanceCredentials) -> None:
        """Move the user to instance ``to`` (whose key the upstream checks)."""
        ...


def iter_user_pages(service: UserService, admin_token: str | SecretStr, query: UserPageQuery) -> Iterator[UserPage]:
    """Every page of GetFilteredPage from ``query.page_number`` on, while the upstream says there is a next one.

    Parameters
    ----------
    service
        The User Service (any implementation).
    admin_token
        An admin JWT.
    query
        Filters and page size; ``page_number`` is where to start (to resume a walk).

    Returns
    -------
    Iterator[UserPage]
        Pages in order; stops after the page whose ``HasNextPage`` is false (or that has no users).

    Example
    -------
    >>> from telematics_reg.management_models import UserPageQuery
    >>> client = UserServiceClient("http://127.0.0.1:8081")
    >>> for page in iter_user_pages(client, "<admin jwt>", UserPageQuery(page_size=500)):  # doctest: +SKIP
    ...     print(page.current_page, len(page.users))
    """
    while True:
        page = service.users_page(admin_token, query)
        yield page
        if not page.has_next_page or not page.users:
            return
        query = query.next_page()


@dataclass(frozen=True)
class _Call:
    name: str
    # Safe to repeat whatever happened (reads only): every transient failure is retried.
    repeatable: bool
    # Changes state upstream: an answer lost after sending means "maybe done", never "not done".
    commits: bool
    # Every attempt that reaches the upstream counts against its Login limit (5 a minute per IP, then an hour's
    # block): retried only when it provably never left, and a 429 is never retried.
    login: bool = False


_CREATE: Final = _Call("create", repeatable=False, commits=True)
_CREATE_MANY: Final = _Call("create_many", repeatable=False, commits=True)
_REFRESH: Final = _Call("refresh", repeatable=False, commits=True)
_LOGIN: Final = _Call("login", repeatable=False, commits=False, login=True)
_USER_EXISTS: Final = _Call("user_exists", repeatable=True, commits=False)
_ADMIN_LOGIN: Final = _Call("admin_login", repeatable=False, commits=False, login=True)
_ADMIN_REFRESH: Final = _Call("admin_refresh", repeatable=False, commits=True)
_FIND_USERS: Final = _Call("find_users", repeatable=True, commits=False)
_USERS_PAGE: Final = _Call("users_page", repeatable=True, commits=False)
# PUT and DELETE are idempotent (the vendor: "safe to repeat"): a lost answer is simply asked again.
_UPDATE_USER: Final = _Call("update_user", repeatable=True, commits=False)
_DELETE_USER: Final = _Call("delete_user", repeatable=True, commits=False)
_CHANGE_INSTANCE: Final = _Call("change_instance", repeatable=False, commits=True)
_LATENCY_METRIC: Final = {
    "create": "UpstreamCreateLatency",
    "create_many": "UpstreamCreateManyLatency",
    "refresh": "UpstreamRefreshLatency",
    "login": "UpstreamLoginLatency",
    "user_exists": "UpstreamUserExistsLatency",
    "admin_login": "UpstreamAdminLoginLatency",
    "admin_refresh": "UpstreamAdminRefreshLatency",
    "find_users": "UpstreamFindUsersLatency",
    "users_page": "UpstreamUsersPageLatency",
    "update_user": "UpstreamUpdateUserLatency",
    "delete_user": "UpstreamDeleteUserLatency",
    "change_instance": "UpstreamChangeInstanceLatency",
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


# Raised by requests/urllib3/http.client while a request is prepared, before anything is written to the socket
# (http.client encodes the request line and headers, and raises UnicodeEncodeError, before it sends them).
_REFUSED_BEFORE_SENDING: Final = (
    requests.exceptions.InvalidHeader,
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.URLRequired,
    requests.exceptions.InvalidJSONError,
    requests.exceptions.UnrewindableBodyError,
    urllib3.exceptions.LocationValueError,
    UnicodeEncodeError,
)
# Anything else these libraries may raise mid-call (ValueError included: http.client raises it for a header it
# will not write). Whether the request went out is not known.
_FAILED_MID_CALL: Final = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ValueError,
)
# A header name is a token; a value is visible ASCII, inner spaces allowed, nothing around it. Stricter than
# RFC 9110 on purpose: every header we send carries a UUID, a number or a token.
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE: Final = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")


def _unsendable_header(headers: Mapping[str, str]) -> str | None:
    """The name of the first header that cannot go on the wire as it is (``None`` when all can).

    Example
    -------
    >>> _unsendable_header({"InstanceKey": "1b7cc25f-329e-4482-9dd1-0bb07c0c794b"}) is None
    True
    >>> _unsendable_header({"InstanceId": "ok", "InstanceKey": "1b7cc25f-329e-4482-9dd1-0bb07c0c794b\\n"})
    'InstanceKey'
    """
    for name, value in headers.items():
        if not isinstance(name, str) or _HEADER_NAME.fullmatch(name) is None:
            return "(a header name)"
        if not isinstance(value, str) or _HEADER_VALUE.fullmatch(value) is None:
            return name
    return None


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


def _bearer(token: SecretStr) -> dict[str, str]:
    return {"Authorization": f"Bearer {token.get_secret_value()}"}


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
    login_budget
        The fleet's Login budget (:mod:`telematics_reg.budget`): taken before every Login, Create recovery
        included (``LoginDeferredError`` when spent or blocked, with nothing sent); a 429 on a Login blocks the fleet.

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
        login_budget: LoginBudget | None = None,
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
        # Every Login this client makes (Create recovery included) spends the fleet's budget; a 429 blocks them all.
        self._login_budget = login_budget

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

    def create(self, creds: InstanceCredentials, body: CreateUserRequest, *, recover: bool = True) -> CreateResult:
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
        recover
            False: never Login. A lost answer raises :class:`OutcomeUnknownError` and an existing ``CustomToken``
            :class:`UserAlreadyExistsError`; the caller settles them (the bulk fallback stores such a user
            without tokens rather than spend the Login budget).

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
        >>> creds = InstanceCredentials(instance_id=uuid4(), instance_key=str(uuid4()))
        >>> body = CreateUserRequest(custom_token=uuid4(), user_fields=UserFields(client_id="c-1"))
        >>> result = client.create(creds, body)  # doctest: +SKIP
        """
        try:
            return self._create_once(creds, body)
        except (OutcomeUnknownError, UserAlreadyExistsError) as exc:
            if body.custom_token is None or not recover:
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
        self,
        creds: InstanceCredentials,
        body: CreateManyRequest,
        custom_tokens: Sequence[UUID] | None = None,
        *,
        fallback: bool = True,
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
        fallback
            False: when CreateMany is not offered, raise :class:`NotFoundError` instead of creating one by one
            (a caller that stores each user as it is made runs the Creates itself).

        Returns
        -------
        list[CreateResult]
            One per user created (as many as the upstream returned).

        Raises
        ------
        ValueError
            Quantity above 100, or ``custom_tokens`` of the wrong length.
        NotFoundError
            CreateMany is not offered and ``fallback`` is False.
        CreateManyIncompleteError
            The fallback stopped part-way; ``completed`` holds the users made so far.

        Example
        -------
        >>> from uuid import uuid4
        >>> client = UserServiceClient("http://127.0.0.1:8081")
        >>> creds = InstanceCredentials(instance_id=uuid4(), instance_key=str(uuid4()))
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
                if not fallback:
                    raise
            else:
                return self._result(_CREATE_MANY, envelope, CreateManyResult).results
        elif not fallback:
            raise NotFoundError("User Service create_many: not offered", status=404, call=_CREATE_MANY.name)
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
        envelope = self._post_refresh(_REFRESH, body)
        return self._refresh_result(envelope, body.access_token.get_secret_value())

    def _post_refresh(self, call: _Call, body: RefreshRequest) -> Envelope:
        """POST a Refresh body on the path that answers (user and admin sessions share both paths)."""
        secrets = [body.access_token.get_secret_value(), body.refresh_token.get_secret_value()]
        with self._lock:
            first = self._refresh_path
        paths = [first, REFRESH_PATH_SPEC if first == REFRESH_PATH_OBSERVED else REFRESH_PATH_OBSERVED]
        for index, path in enumerate(paths):
            try:
                envelope = self._send(call, "POST", path, body=body.to_upstream(), secrets=secrets)
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
            return envelope
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
        >>> creds = InstanceCredentials(instance_id=uuid4(), instance_key=str(uuid4()))
        >>> pair = client.login(creds, uuid4())  # doctest: +SKIP
        """
        envelope = self._send_login(
            _LOGIN,
            headers={"InstanceId": str(creds.instance_id)},
            body=LoginRequest.for_device(creds, device_token).to_upstream(),
            secrets=[creds.instance_key.get_secret_value()],
        )
        return self._result(_LOGIN, envelope, CreateResult)

    def _send_login(
        self, call: _Call, *, body: dict[str, Any], secrets: list[str], headers: dict[str, str] | None = None
    ) -> Envelope:
        """Send one Login, user or admin, within the fleet's budget: the budget is taken first (raising
        ``LoginDeferredError`` with nothing sent when it is spent or a block is open), and a 429 opens the
        fleet-wide block before it is raised."""
        if self._login_budget is not None:
            self._login_budget.acquire()
        try:
            return self._send(call, "POST", "/v1/Auth/Login", headers=headers, body=body, secrets=secrets)
        except RateLimitedError as exc:
            if self._login_budget is not None:
                self._login_budget.block(exc.retry_after)
            raise

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
        >>> creds = InstanceCredentials(instance_id=uuid4(), instance_key=str(uuid4()))
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

    # --- the admin session ----------------------------------------------------------------------------

    def admin_login(self, admin: AdminCredentials) -> AdminSession:
        """Start an admin session (``POST /v1/Auth/Login`` with the admin's e-mail and password).

        Login, user and admin together, is limited upstream to 5 calls a minute per IP, then an hour's block:
        a 429 is raised at once (:class:`RateLimitedError`, with the block's ``retry_after``), never retried;
        keep the session and refresh it instead of logging in again.

        Parameters
        ----------
        admin
            The company's admin API credentials.

        Returns
        -------
        AdminSession
            The admin JWT (``ExpiresIn`` 86400 s at the vendor) and its refresh token.

        Raises
        ------
        UnauthorizedError
            Wrong e-mail or password.
        RateLimitedError
            The Login limit: do not log in again before ``retry_after`` (an hour without one).

        Example
        -------
        >>> from telematics_reg.management_models import AdminCredentials
        >>> client = UserServiceClient("http://127.0.0.1:8081")
        >>> session = client.admin_login(AdminCredentials(email="ops@example.com", password="pw"))  # doctest: +SKIP
        """
        from telematics_reg.management_models import AdminSession  # noqa: PLC0415 - see management_models

        envelope = self._send_login(_ADMIN_LOGIN, body=admin.login_body(), secrets=[admin.password.get_secret_value()])
        return self._result(_ADMIN_LOGIN, envelope, AdminSession)

    def admin_refresh(self, access_token: str | SecretStr, refresh_token: str | SecretStr) -> AdminSession:
        """Exchange the admin JWT (possibly expired) and its single-use refresh token for a new pair.

        The same paths as a user's Refresh; once the request went out it is never repeated here.

        Raises
        ------
        DeadRefreshTokenError
            HTTP 400: the refresh token is used or expired (only an admin Login starts a new session).
        OutcomeUnknownError
            The answer was lost: the refresh token may be spent.

        Example
        -------
        >>> client = UserServiceClient("http://127.0.0.1:8081")
        >>> session = client.admin_refresh("<admin jwt>", "<refresh token>")  # doctest: +SKIP
        """
        from telematics_reg.management_models import AdminSession  # noqa: PLC0415 - see management_models

        body = RefreshRequest(access_token=_secret(access_token), refresh_token=_secret(refresh_token))
        return self._result(_ADMIN_REFRESH, self._post_refresh(_ADMIN_REFRESH, body), AdminSession)

    # --- the User Management API ----------------------------------------------------------------------

    def find_users(
        self,
        admin_token: str | SecretStr,
        *,
        device_token: UUID | None = None,
        email: str | None = None,
        phone: str | None = None,
        client_id: str | None = None,
        first_name: str | None = None,
        last_name: str | None = None,
    ) -> list[ManagedUser]:
        """Users matching every criterion given (``GET /v1/Management/users/find``), in every instance.

        Parameters
        ----------
        admin_token
            An admin JWT.
        device_token, email, phone, client_id, first_name, last_name
            Criteria, ANDed; at least one.

        Returns
        -------
        list[ManagedUser]
            Possibly empty (the upstream's ``Result`` is always an array).

        Raises
        ------
        ValueError
            No criterion given.
        UnauthorizedError
            The admin JWT is missing, bad or expired (refresh the admin session).
        ForbiddenError
            Not an admin JWT.

        Example
        -------
        >>> client = UserServiceClient("http://127.0.0.1:8081")
        >>> client.find_users("<admin jwt>", client_id="customer-42")  # doctest: +SKIP
        []
        """
        from telematics_reg.management_models import ManagedUser  # noqa: PLC0415 - see management_models

        criteria = {
            "DeviceToken": str(device_token) if device_token is not None else None,
            "Email": email,
            "Phone": phone,
            "ClientId": client_id,
            "FirstName": first_name,
            "LastName": last_name,
        }
        params = {name: value for name, value in criteria.items() if value}
        if not params:
            raise ValueError("find_users needs at least one criterion")
        token = _secret(admin_token)
        envelope = self._send(
            _FIND_USERS,
            "GET",
            "/v1/Management/users/find",
            headers=_bearer(token),
            params=params,
            secrets=[token.get_secret_value()],
        )
        if not isinstance(envelope.result, list):
            raise UpstreamError(
                "User Service find_users: answer has an unexpected shape (Result: not an array)",
                status=envelope.status,
                call=_FIND_USERS.name,
            )
        return [self._parse(_FIND_USERS, item, ManagedUser, envelope.status) for item in envelope.result]

    def users_page(self, admin_token: str | SecretStr, query: UserPageQuery) -> UserPage:
        """One page of users (``POST /v1/Management/users/GetFilteredPage``); :func:`iter_user_pages` walks them.

        Example
        -------
        >>> from telematics_reg.management_models import UserPageQuery
        >>> client = UserServiceClient("http://127.0.0.1:8081")
        >>> page = client.users_page("<admin jwt>", UserPageQuery(page_size=500))  # doctest: +SKIP
        """
        from telematics_reg.management_models import UserPage  # noqa: PLC0415 - see management_models

        token = _secret(admin_token)
        envelope = self._send(
            _USERS_PAGE,
            "POST",
            "/v1/Management/users/GetFilteredPage",
            headers=_bearer(token),
            body=query.to_upstream(),
            secrets=[token.get_secret_value()],
        )
        return self._result(_USERS_PAGE, envelope, UserPage)

    def update_user(self, admin_token: str | SecretStr, device_token: UUID, changes: UserUpdate) -> None:
        """Change the fields ``changes`` sets, and only those (``PUT /v1/Management/users``).

        PUT is idempotent: a 5xx, a 429 or a lost answer is asked again (bounded, full-jitter backoff).

        Raises
        ------
        ValueError
            ``changes`` sets nothing.
        NotFoundError
            No such user.
        UpstreamValidationError
            Rejected (422); ``errors`` names the fields.
        TransientUpstreamError, RateLimitedError
            Still failing after the last attempt: try again later (it is safe).

        Example
        -------
        >>> from uuid import uuid4
        >>> from telematics_reg.management_models import UserUpdate
        >>> client = UserServiceClient("http://127.0.0.1:8081")
        >>> client.update_user("<admin jwt>", uuid4(), UserUpdate(status="Deactivated"))  # doctest: +SKIP
        """
        body = changes.to_upstream()
        if not body:
            raise ValueError("update_user: the update sets no field")
        token = _secret(admin_token)
        self._send(
            _UPDATE_USER,
            "PUT",
            "/v1/Management/users",
            headers={**_bearer(token), "UserDeviceToken": str(device_token)},
            body=body,
            secrets=[token.get_secret_value()],
        )

    def delete_user(self, admin_token: str | SecretStr, device_token: UUID) -> None:
        """Delete the user and all its data, for good (``DELETE /v1/Management/users/{DeviceToken}``).

        Idempotent: a lost answer is asked again, and a user already gone is success. The vendor answers 404
        *or 403* for a deleted user; a 403 is also "not an admin token", so a 403 counts as done only when find,
        with the same token, confirms that the user is gone (else :class:`ForbiddenError`).

        Raises
        ------
        ForbiddenError
            The token may not delete (find answered 403 too, or still finds the user).
        TransientUpstreamError, RateLimitedError
            Still failing after the last attempt: try again later (it is safe).

        Example
        -------
        >>> from uuid import uuid4
        >>> client = UserServiceClient("http://127.0.0.1:8081")
        >>> client.delete_user("<admin jwt>", uuid4())  # doctest: +SKIP
        """
        token = _secret(admin_token)
        try:
            self._send(
                _DELETE_USER,
                "DELETE",
                f"/v1/Management/users/{device_token}",
                headers=_bearer(token),
                secrets=[token.get_secret_value()],
            )
        except NotFoundError:
            logger.info("user service delete: already gone", extra={"call": _DELETE_USER.name, "status": 404})
        except ForbiddenError as forbidden:
            if self.find_users(token, device_token=device_token):
                raise
            logger.info(
                "user service delete: already gone", extra={"call": _DELETE_USER.name, "status": forbidden.status}
            )

    def change_instance(self, admin_token: str | SecretStr, device_token: UUID, to: InstanceCredentials) -> None:
        """Move the user to instance ``to`` (``POST /v1/Management/users/instances/change``).

        The user keeps its DeviceToken; from then on its Login takes ``to``'s id and key. The vendor does not
        say the call is safe to repeat, so an answer lost after sending is first verified with find::

            change(T -> B) --x answer lost (timeout, dropped connection, 5xx)
            find(T) --> instance B ........... done
                    --> instance A ........... change(T -> B) again (bounded)
                    --> no user .............. NotFoundError

        Raises
        ------
        NotFoundError
            No such user.
        UpstreamValidationError
            Rejected (422), e.g. a wrong ``ToInstanceKey``.
        OutcomeUnknownError
            Still unknown after the bounded rounds, or find could not tell.

        Example
        -------
        >>> from uuid import uuid4
        >>> client = UserServiceClient("http://127.0.0.1:8081")
        >>> target = InstanceCredentials(instance_id=uuid4(), instance_key="key")
        >>> client.change_instance("<admin jwt>", uuid4(), target)  # doctest: +SKIP
        """
        token = _secret(admin_token)
        body = {
            "DeviceToken": str(device_token),
            "ToInstanceId": str(to.instance_id),
            "ToInstanceKey": to.instance_key.get_secret_value(),
        }
        secrets = [token.get_secret_value(), to.instance_key.get_secret_value()]
        rounds = 1 + self._max_create_recoveries
        for round_number in range(rounds):
            try:
                self._send(
                    _CHANGE_INSTANCE,
                    "POST",
                    "/v1/Management/users/instances/change",
                    headers=_bearer(token),
                    body=body,
                    secrets=secrets,
                )
            except OutcomeUnknownError as lost:
                try:
                    users = self.find_users(token, device_token=device_token)
                except UpstreamError as exc:
                    raise OutcomeUnknownError(
                        f"User Service change_instance: outcome unknown and find could not tell ({type(exc).__name__})",
                        status=exc.status,
                        call=_CHANGE_INSTANCE.name,
                    ) from exc
                if not users:
                    raise NotFoundError(
                        "User Service change_instance failed: the user is not found",
                        status=404,
                        call=_CHANGE_INSTANCE.name,
                    ) from lost
                if any(user.instance_id == to.instance_id for user in users):
                    logger.info("user service change_instance verified by find", extra={"call": _CHANGE_INSTANCE.name})
                    return
                if round_number + 1 >= rounds:
                    raise
                logger.warning(
                    "user service change_instance not applied after a lost answer: sent again",
                    extra={"call": _CHANGE_INSTANCE.name, "attempt": round_number + 2},
                )
            else:
                return

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
        if call.login and not (failed.not_processed and error.status is None):
            return None  # only a Login that never reached the upstream is tried again (see _Call.login)
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
        # Checked before requests sees them: requests and http.client refuse a bad header value with the value in
        # the exception text, and the X-Ray requests patcher records that text even when we catch it.
        unsendable = _unsendable_header(headers or {})
        if unsendable is not None:
            problem = f"header {unsendable} has a value HTTP cannot carry"
            raise _Failed(self._not_sent(call, problem), not_processed=True)
        started = time.monotonic()
        # Set by the last two handlers below, and raised after the try: no exception chain carries the original.
        refused: str | None = None
        lost: str | None = None
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
        except _REFUSED_BEFORE_SENDING as exc:
            # Raised while the request was being built (InvalidHeader, InvalidURL, a body that is not JSON): no byte
            # went out. Its text may quote a header value (an InstanceKey): keep the type only.
            refused = type(exc).__name__
        except _FAILED_MID_CALL as exc:
            # Anything else the stack may raise mid-call: whether the request went out is unknown, as for a lost
            # answer. The type only, for the same reason.
            lost = type(exc).__name__
        if refused is not None or lost is not None:
            logger.warning(
                "user service call failed", extra={"call": call.name, "error": refused or lost, "attempt": attempt + 1}
            )
            if refused is not None:
                raise _Failed(self._not_sent(call, f"the request could not be built ({refused})"), not_processed=True)
            raise _Failed(self._transport_error_of(call, str(lost), never_sent=False), not_processed=False)

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
    def _not_sent(call: _Call, problem: str) -> RequestNotSentError:
        return RequestNotSentError(f"User Service {call.name}: not sent: {problem}", call=call.name)

    @classmethod
    def _transport_error(cls, call: _Call, exc: requests.RequestException, never_sent: bool) -> UpstreamError:
        return cls._transport_error_of(call, type(exc).__name__, never_sent=never_sent)

    @staticmethod
    def _transport_error_of(call: _Call, kind: str, *, never_sent: bool) -> UpstreamError:
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
        return UserServiceClient._parse(call, envelope.result, model, envelope.status)

    @staticmethod
    def _parse(call: _Call, value: Any, model: type[_ModelT], status: int | None) -> _ModelT:
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            message = f"User Service {call.name}: answer has an unexpected shape ({_shape_problems(exc)})"
            error_type = OutcomeUnknownError if call.commits else UpstreamError
            raise error_type(message, status=status, call=call.name) from None


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


#: How many of an error answer's ``Errors[]`` an error keeps (each text bounded too).
_MAX_FIELD_ERRORS: Final = 20


def _bounded(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying so."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def _error_for_status(
    call: _Call, status: int, envelope: Envelope | None, retry_after: str | None, secrets: Sequence[str]
) -> UpstreamError:
    # Bounded: an answer's texts end in exceptions, log lines and a stored LastError, whatever size it came in.
    errors = [
        FieldError(_bounded(_scrub(e.key, secrets), 200), _bounded(_scrub(e.message, secrets), 500))
        for e in (envelope.field_errors() if envelope else [])[:_MAX_FIELD_ERRORS]
    ]
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "unexpected status"
    title = _bounded(_scrub(envelope.title, secrets), 500) if envelope and envelope.title else phrase
    message = f"User Service {call.name} failed: {title}"
    common: dict[str, Any] = {"status": status, "errors": errors, "call": call.name}
    if status == 429:
        return RateLimitedError(message, **common, retry_after=parse_retry_after(retry_after))
    error_type: type[UpstreamError]
    if status in _BY_STATUS:
        error_type = _BY_STATUS[status]
    elif status == 400 and call in (_REFRESH, _ADMIN_REFRESH):
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
