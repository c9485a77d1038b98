"""In-memory stand-ins for the outside systems, for unit tests and benchmarks (they do not ship in the layer):
the User Service, the outcome-event publisher, the dead-letter sink, the Login budget, the DeviceToken key and the
refresh-job queue.

The User Service is for the modules that use :class:`~telematics_reg.upstream.UserService`.

It behaves as the real client does from the outside: a Create with a ``CustomToken`` that already exists returns
the user with fresh tokens (as the client's Login recovery does), refresh tokens are single-use, CreateMany can
be switched off (one Create per user then), and any call can be told to fail. The admin session and the User
Management API answer as the client does too: an admin JWT only, deleting a user already gone succeeds.
"""

from __future__ import annotations

import base64
import copy
import json
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from pydantic import SecretStr

from telematics_reg.budget import DEFAULT_BLOCK_SECONDS, WINDOW_SECONDS, LoginBudget, login_deferred
from telematics_reg.credentials import DeviceTokenKey
from telematics_reg.dead_letters import DeadLetter
from telematics_reg.errors import (
    DeadRefreshTokenError,
    FieldError,
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
    UnauthorizedError,
    UpstreamError,
    UpstreamValidationError,
    UserAlreadyExistsError,
)
from telematics_reg.management_models import (
    AdminCredentials,
    AdminSession,
    ManagedUser,
    UserPage,
    UserPageQuery,
    UserSort,
    UserUpdate,
)
from telematics_reg.models import (
    MAX_CREATE_MANY_PER_CALL,
    CreateManyRequest,
    CreateResult,
    CreateUserRequest,
    InstanceCredentials,
    read_jwt_claims,
)
from telematics_reg.outcomes import OutcomeEvent
from telematics_reg.refresh import RefreshJob
from telematics_reg.store import iso

__all__ = [
    "FakeUser",
    "FakeUserService",
    "InMemoryLoginBudget",
    "InMemoryRefreshJobQueue",
    "RecordingDeadLetters",
    "RecordingPublisher",
    "StaticDeviceTokenKey",
]


@dataclass
class FakeUser:
    """One user held by :class:`FakeUserService`."""

    instance_id: UUID
    device_token: UUID
    client_id: str | None
    profile: dict[str, Any]
    refresh_token: str | None = field(default=None, repr=False)
    login_disabled: bool = False
    status: str = "Active"
    """As written: ``Active``, ``Deactivated`` or ``Deleted`` (read back ``Active`` or ``Inactive``)."""
    created_at: float = 0.0

    def as_managed(self) -> ManagedUser:
        """The user as find and GetFilteredPage read it."""
        flags = self.profile.get("UserFields") or {}
        return ManagedUser.model_validate(
            {
                "DeviceToken": str(self.device_token),
                "DateCreated": datetime.fromtimestamp(self.created_at, UTC).isoformat(),
                "Status": "Active" if self.status == "Active" else "Inactive",
                "UserProfile": {
                    key: value for key, value in self.profile.items() if key not in _NOT_PROFILE and value is not None
                },
                "AccountInfo": {"InstanceId": str(self.instance_id)},
                "UserFields": [
                    {
                        "ClientId": self.client_id,
                        "Enabled": flags.get("Enabled", True),
                        "EnableTracking": flags.get("EnableTracking", True),
                        "EnableLogging": flags.get("EnableLogging", False),
                        "EnableRealTimeLocation": flags.get("EnableRealtimeLocation", False),
                    }
                ],
            }
        )


_NOT_PROFILE = frozenset(
    {"UserFields", "Status", "CustomToken", "CreateAccessToken", "InstanceInviteCode", "IdentityId", "IdentityProvider"}
)


@dataclass
class _Failure:
    error: UpstreamError
    remaining: int
    calls: frozenset[str] | None
    after_commit: bool


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class FakeUserService:
    """In-memory :class:`~telematics_reg.upstream.UserService` that counts calls and fails on demand.

    Parameters
    ----------
    instances
        When given, calls with other credentials raise :class:`UnauthorizedError`; otherwise any are accepted.
    token_lifetime
        ``ExpiresIn`` of issued access tokens (their unsigned JWT carries the matching ``exp``).
    clock
        Unix time, for ``iat``/``exp``.
    create_many_offered
        False makes ``create_many`` work as one Create per user (as the client's fallback does).
    admin
        The admin account whose Login succeeds (any, when ``None``).

    Example
    -------
    >>> from telematics_reg.errors import TransientUpstreamError
    >>> from telematics_reg.models import CreateUserRequest, InstanceCredentials
    >>> fake = FakeUserService()
    >>> creds = InstanceCredentials(instance_id=uuid.uuid4(), instance_key="key")
    >>> fake.fail_next(TransientUpstreamError("down", status=503), times=1, calls=["create"])
    >>> try:
    ...     fake.create(creds, CreateUserRequest())
    ... except TransientUpstreamError:
    ...     pass
    >>> user = fake.create(creds, CreateUserRequest())
    >>> fake.calls["create"], len(fake.users)
    (2, 1)
    """

    def __init__(
        self,
        *,
        instances: Iterable[InstanceCredentials] | None = None,
        token_lifetime: int = 7200,
        clock: Callable[[], float] = time.time,
        create_many_offered: bool = True,
        admin: AdminCredentials | None = None,
        login_budget: LoginBudget | None = None,
    ) -> None:
        self._instances = (
            {c.instance_id: c.instance_key.get_secret_value() for c in instances} if instances is not None else None
        )
        self.token_lifetime = token_lifetime
        self.create_many_offered = create_many_offered
        self._clock = clock
        self._lock = threading.RLock()
        self._failures: list[_Failure] = []
        self.calls: Counter[str] = Counter()
        """Calls received, by name (``create``, ``create_many``, ``refresh``, ``login``, ``user_exists``)."""
        self.users: dict[UUID, FakeUser] = {}
        """Users by DeviceToken."""
        self.rejected_refresh_tokens = 0
        self.admin = admin
        """When given, admin Logins must match it; otherwise any admin credentials are accepted."""
        self._admin_refresh_tokens: set[str] = set()
        self.admin_token_lifetime = 86_400
        """``ExpiresIn`` of issued admin JWTs (the vendor's: a day)."""
        self.rejected_admin_refresh_tokens = 0
        """Admin refresh tokens refused as used or unknown (a token presented twice shows here)."""
        self.login_budget = login_budget
        """Spent by every Login (Create recovery included) and blocked by a 429 on one, as the real client does."""

    # --- test controls --------------------------------------------------------------------------------

    def fail_next(
        self,
        error: UpstreamError,
        times: int = 1,
        *,
        calls: Iterable[str] | None = None,
        after_commit: bool = False,
    ) -> None:
        """Make the next ``times`` calls (of the names in ``calls``, or any) raise a copy of ``error``.

        With ``after_commit`` the call does its work first and then raises: a lost answer (use an
        :class:`~telematics_reg.errors.OutcomeUnknownError`).
        """
        with self._lock:
            names = frozenset(calls) if calls is not None else None
            self._failures.append(_Failure(error, times, names, after_commit))

    def revoke(self, device_token: UUID) -> None:
        """Invalidate the user's current refresh token (the next Refresh with it is rejected)."""
        with self._lock:
            self.users[device_token].refresh_token = None

    def disable_login(self, device_token: UUID) -> None:
        """Make Login answer 401 for this user."""
        with self._lock:
            self.users[device_token].login_disabled = True

    def users_of(self, instance_id: UUID, client_id: str | None = None) -> list[FakeUser]:
        """Users of an instance, optionally only those with this ClientId."""
        with self._lock:
            return [
                u
                for u in self.users.values()
                if u.instance_id == instance_id and (client_id is None or u.client_id == client_id)
            ]

    # --- UserService --------------------------------------------------------------------------------

    def create(self, creds: InstanceCredentials, body: CreateUserRequest, *, recover: bool = True) -> CreateResult:
        with self._lock:
            after = self._enter("create")
            self._authorize(creds)
            existing = self.users.get(body.custom_token) if body.custom_token is not None else None
            if existing is not None and not recover:
                raise UserAlreadyExistsError(
                    "User Service create failed: Unprocessable Entity",
                    status=422,
                    errors=[FieldError("CustomToken", "A user with this CustomToken already exists")],
                    call="create",
                )
            if existing is not None and existing.instance_id == creds.instance_id:
                # What the real client does on "CustomToken exists": Login and return that user's tokens.
                if self.login_budget is not None:
                    self.login_budget.acquire()
                self.calls["login"] += 1
                result = self._issue(existing)
            else:
                user = self._new_user(creds.instance_id, body)
                result = self._issue(user) if body.create_access_token else CreateResult(device_token=user.device_token)
            self._leave(after)
            return result

    def create_many(
        self,
        creds: InstanceCredentials,
        body: CreateManyRequest,
        custom_tokens: Sequence[UUID] | None = None,
        *,
        fallback: bool = True,
    ) -> list[CreateResult]:
        if body.quantity > MAX_CREATE_MANY_PER_CALL:
            raise ValueError(f"CreateMany takes at most {MAX_CREATE_MANY_PER_CALL} users per call")
        if custom_tokens is not None and len(custom_tokens) != body.quantity:
            raise ValueError(f"custom_tokens has {len(custom_tokens)} items for Quantity {body.quantity}")
        with self._lock:
            if not self.create_many_offered and not fallback:
                # The real client learns the 404 once and then answers this without a call: not counted.
                raise NotFoundError("User Service create_many failed: Not Found", status=404, call="create_many")
            after = self._enter("create_many")
            self._authorize(creds)
            flags = body.custom_fields.model_dump() if body.custom_fields else {}
            if not self.create_many_offered:
                results = [
                    self.create(
                        creds,
                        CreateUserRequest.model_validate(
                            {
                                "create_access_token": body.create_access_token,
                                "user_fields": flags or None,
                                "custom_token": custom_tokens[i] if custom_tokens is not None else None,
                            }
                        ),
                    )
                    for i in range(body.quantity)
                ]
            else:
                results = []
                for _ in range(body.quantity):
                    user = self._new_user(
                        creds.instance_id, CreateUserRequest.model_validate({"user_fields": flags or None})
                    )
                    issued = (
                        self._issue(user) if body.create_access_token else CreateResult(device_token=user.device_token)
                    )
                    results.append(issued)
            self._leave(after)
            return results

    def refresh(self, access_token: str, refresh_token: str) -> CreateResult:
        with self._lock:
            after = self._enter("refresh")
            user = next((u for u in self.users.values() if u.refresh_token == refresh_token), None)
            claims = read_jwt_claims(access_token) or {}
            if user is None or claims.get("DeviceToken") != str(user.device_token):
                self.rejected_refresh_tokens += 1
                raise DeadRefreshTokenError(
                    "User Service refresh failed: Bad Request",
                    status=400,
                    errors=[FieldError("RefreshToken", "Refresh token is invalid, used or revoked")],
                    call="refresh",
                )
            result = self._issue(user)
            self._leave(after)
            return result

    def login(self, creds: InstanceCredentials, device_token: UUID) -> CreateResult:
        if self.login_budget is not None:
            self.login_budget.acquire()
        try:
            return self._login(creds, device_token)
        except RateLimitedError as exc:
            if self.login_budget is not None:
                self.login_budget.block(exc.retry_after)
            raise

    def _login(self, creds: InstanceCredentials, device_token: UUID) -> CreateResult:
        with self._lock:
            after = self._enter("login")
            self._authorize(creds)
            user = self.users.get(device_token)
            if user is None or user.instance_id != creds.instance_id:
                raise NotFoundError(
                    "User Service login failed: Not Found",
                    status=404,
                    errors=[FieldError("DeviceToken", "User not found")],
                    call="login",
                )
            if user.login_disabled:
                raise UnauthorizedError("User Service login failed: Unauthorized", status=401, call="login")
            result = self._issue(user)
            self._leave(after)
            return result

    def user_exists(self, creds: InstanceCredentials, client_id: str) -> bool:
        with self._lock:
            after = self._enter("user_exists")
            self._authorize(creds)
            found = bool(self.users_of(creds.instance_id, client_id))
            self._leave(after)
            return found

    # --- the admin session and the User Management API --------------------------------------------------

    def admin_login(self, admin: AdminCredentials) -> AdminSession:
        # As the real client: an admin Login takes the fleet's Login budget too.
        with self._lock:
            if self.login_budget is not None:
                self.login_budget.acquire()  # as the real client: every Login, user or admin, spends the budget
            after = self._enter("admin_login")
            if self.admin is not None and (
                admin.email.lower() != self.admin.email.lower()
                or admin.password.get_secret_value() != self.admin.password.get_secret_value()
            ):
                raise UnauthorizedError("User Service admin_login failed: Unauthorized", status=401, call="admin_login")
            session = self._issue_admin()
            self._leave(after)
            return session

    def admin_refresh(self, access_token: str | SecretStr, refresh_token: str | SecretStr) -> AdminSession:
        with self._lock:
            after = self._enter("admin_refresh")
            token = refresh_token.get_secret_value() if isinstance(refresh_token, SecretStr) else refresh_token
            if token not in self._admin_refresh_tokens:
                self.rejected_refresh_tokens += 1
                self.rejected_admin_refresh_tokens += 1
                raise DeadRefreshTokenError(
                    "User Service admin_refresh failed: Bad Request", status=400, call="admin_refresh"
                )
            self._admin_refresh_tokens.discard(token)
            session = self._issue_admin()
            self._leave(after)
            return session

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
        criteria = {"Email": email, "Phone": phone, "FirstName": first_name, "LastName": last_name}
        if device_token is None and client_id is None and not any(criteria.values()):
            raise ValueError("find_users needs at least one criterion")
        with self._lock:
            after = self._enter("find_users")
            self._authorize_admin(admin_token, "find_users")
            found = [
                user.as_managed()
                for user in sorted(self.users.values(), key=lambda u: (u.created_at, str(u.device_token)))
                if (device_token is None or user.device_token == device_token)
                and (client_id is None or user.client_id == client_id)
                and all(
                    wanted is None or str(user.profile.get(name, "")).lower() == wanted.lower()
                    for name, wanted in criteria.items()
                )
            ]
            self._leave(after)
            return found

    def users_page(self, admin_token: str | SecretStr, query: UserPageQuery) -> UserPage:
        with self._lock:
            after = self._enter("users_page")
            self._authorize_admin(admin_token, "users_page")
            instances = set(query.instance_ids) if query.instance_ids else None
            chosen = [
                user
                for user in self.users.values()
                if (instances is None or user.instance_id in instances)
                and (query.show_inactive_users or user.status == "Active")
                and (query.date_created_from is None or user.created_at >= query.date_created_from.timestamp())
                and (query.date_created_to is None or user.created_at <= query.date_created_to.timestamp())
            ]
            by_token = query.sort in (UserSort.DEVICE_TOKEN, UserSort.DEVICE_TOKEN_DESC)
            chosen.sort(
                key=lambda u: (str(u.device_token),) if by_token else (u.created_at, str(u.device_token)),
                reverse=query.sort in (UserSort.DATE_CREATED_DESC, UserSort.DEVICE_TOKEN_DESC),
            )
            size, number = query.page_size, query.page_number
            pages = -(-len(chosen) // size)
            page = UserPage(
                users=[user.as_managed() for user in chosen[(number - 1) * size : number * size]],
                has_previous_page=number > 1,
                has_next_page=number < pages,
                total_users=len(chosen),
                total_pages=pages,
                current_page=number,
            )
            self._leave(after)
            return page

    def update_user(self, admin_token: str | SecretStr, device_token: UUID, changes: UserUpdate) -> None:
        body = changes.to_upstream()
        if not body:
            raise ValueError("update_user: the update sets no field")
        with self._lock:
            after = self._enter("update_user")
            self._authorize_admin(admin_token, "update_user")
            user = self._managed_user(device_token, "update_user")
            for name, value in body.items():
                if name == "Status":
                    user.status = value
                elif name == "UserFields":
                    flags = dict(user.profile.get("UserFields") or {})
                    for key, flag in value.items():
                        flags["EnableRealtimeLocation" if key == "EnableRealTimeLocation" else key] = flag
                    user.profile["UserFields"] = flags
                    user.client_id = flags.get("ClientId", user.client_id)
                else:
                    user.profile[name] = value
            self._leave(after)

    def delete_user(self, admin_token: str | SecretStr, device_token: UUID) -> None:
        with self._lock:
            after = self._enter("delete_user")
            self._authorize_admin(admin_token, "delete_user")
            self.users.pop(device_token, None)  # already gone: success, as the client treats 403/404
            self._leave(after)

    def change_instance(self, admin_token: str | SecretStr, device_token: UUID, to: InstanceCredentials) -> None:
        with self._lock:
            after = self._enter("change_instance")
            self._authorize_admin(admin_token, "change_instance")
            if (
                self._instances is not None
                and self._instances.get(to.instance_id) != to.instance_key.get_secret_value()
            ):
                raise UpstreamValidationError(
                    "User Service change_instance failed: Unprocessable Entity",
                    status=422,
                    errors=[FieldError("ToInstanceKey", "The key does not match the target instance")],
                    call="change_instance",
                )
            self._managed_user(device_token, "change_instance").instance_id = to.instance_id
            self._leave(after)

    def _issue_admin(self) -> AdminSession:
        now = int(self._clock())
        lifetime = self.admin_token_lifetime
        claims = {"sub": "admin", "Role": "Admin", "jti": str(uuid.uuid4()), "iat": now, "exp": now + lifetime}
        refresh_token = base64.b64encode(secrets.token_bytes(32)).decode()
        self._admin_refresh_tokens.add(refresh_token)
        return AdminSession.model_validate(
            {
                "AccessToken": {"Token": f"{_b64({'alg': 'none'})}.{_b64(claims)}.fake", "ExpiresIn": lifetime},
                "RefreshToken": refresh_token,
            }
        )

    def _authorize_admin(self, admin_token: str | SecretStr, call: str) -> None:
        token = admin_token.get_secret_value() if isinstance(admin_token, SecretStr) else admin_token
        claims = read_jwt_claims(token) or {}
        if claims.get("Role") != "Admin" and "DeviceToken" in claims:
            raise ForbiddenError(f"User Service {call} failed: Forbidden", status=403, call=call)
        if claims.get("Role") != "Admin" or not isinstance(claims.get("exp"), int) or claims["exp"] <= self._clock():
            raise UnauthorizedError(f"User Service {call} failed: Unauthorized", status=401, call=call)

    def _managed_user(self, device_token: UUID, call: str) -> FakeUser:
        user = self.users.get(device_token)
        if user is None:
            raise NotFoundError(
                f"User Service {call} failed: Not Found",
                status=404,
                errors=[FieldError("DeviceToken", "User not found")],
                call=call,
            )
        return user

    # --- internals ------------------------------------------------------------------------------------

    def _enter(self, call: str) -> UpstreamError | None:
        """Count the call; raise a scheduled failure now, or return it to raise after the work is done."""
        self.calls[call] += 1
        for failure in self._failures:
            if failure.remaining > 0 and (failure.calls is None or call in failure.calls):
                failure.remaining -= 1
                error = copy.copy(failure.error)
                if failure.after_commit:
                    return error
                raise error
        return None

    @staticmethod
    def _leave(after: UpstreamError | None) -> None:
        if after is not None:
            raise after

    def _authorize(self, creds: InstanceCredentials) -> None:
        if self._instances is None:
            return
        if self._instances.get(creds.instance_id) != creds.instance_key.get_secret_value():
            raise UnauthorizedError("User Service call failed: Unauthorized", status=401)

    def _new_user(self, instance_id: UUID, body: CreateUserRequest) -> FakeUser:
        device_token = body.custom_token or uuid.uuid4()
        client_id = body.user_fields.client_id if body.user_fields else None
        user = FakeUser(instance_id, device_token, client_id, body.to_upstream(), created_at=self._clock())
        self.users[device_token] = user
        return user

    def _issue(self, user: FakeUser) -> CreateResult:
        now = int(self._clock())
        claims = {
            "sub": str(user.device_token),
            "DeviceToken": str(user.device_token),
            "InstanceId": str(user.instance_id),
            "jti": str(uuid.uuid4()),
            "iat": now,
            "exp": now + self.token_lifetime,
        }
        token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.fake"
        user.refresh_token = base64.b64encode(secrets.token_bytes(32)).decode()
        return CreateResult.model_validate(
            {
                "DeviceToken": str(user.device_token),
                "AccessToken": {"Token": token, "ExpiresIn": self.token_lifetime},
                "RefreshToken": user.refresh_token,
            }
        )


class RecordingPublisher:
    """In-memory publisher for tests: keeps every event in ``events``."""

    def __init__(self) -> None:
        self.events: list[OutcomeEvent] = []

    def publish(self, event: OutcomeEvent) -> None:
        self.events.append(event)

    def publish_many(self, events: Sequence[OutcomeEvent]) -> None:
        self.events.extend(events)

    def of_type(self, event_type: type[OutcomeEvent]) -> list[OutcomeEvent]:
        return [e for e in self.events if isinstance(e, event_type)]


class RecordingDeadLetters:
    """In-memory dead letters for tests."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    def send(self, letter: DeadLetter) -> None:
        self.letters.append(letter)


class InMemoryLoginBudget:
    """The same budget and block in memory (tests and benchmarks; it does not ship in the layer)."""

    def __init__(
        self,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.time,
        default_block_seconds: float = DEFAULT_BLOCK_SECONDS,
    ) -> None:
        self._per_minute = per_minute
        self._clock = clock
        self._default_block = default_block_seconds
        self._granted: list[float] = []
        self._lock = threading.Lock()
        self.spent = 0
        self.blocked_until = 0.0

    def acquire(self) -> None:
        with self._lock:
            now = self._clock()
            if self.blocked_until > now:
                raise login_deferred(
                    f"Login blocked fleet-wide until {iso(self.blocked_until)} (429)", self.blocked_until, blocked=True
                )
            self._granted = [t for t in self._granted if t > now - WINDOW_SECONDS]
            if len(self._granted) >= self._per_minute:
                retry_at = (self._granted[0] if self._granted else now) + WINDOW_SECONDS
                raise login_deferred(f"Login budget spent ({self._per_minute} a minute)", retry_at, blocked=False)
            self._granted.append(now)
            self.spent += 1

    def block(self, retry_after: float | None) -> None:
        with self._lock:
            until = self._clock() + (retry_after if retry_after else self._default_block)
            self.blocked_until = max(self.blocked_until, until)


class StaticDeviceTokenKey:
    """A fixed DeviceToken key (tests and benchmarks)."""

    def __init__(self, material: str) -> None:
        self._key = DeviceTokenKey(material)

    def get(self) -> DeviceTokenKey:
        return self._key


class InMemoryRefreshJobQueue:
    """Refresh jobs kept in memory with their delays (tests and benchmarks)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[RefreshJob, int]] = []

    def enqueue(self, jobs: Sequence[tuple[RefreshJob, int]]) -> None:
        self.jobs.extend(jobs)


if TYPE_CHECKING:
    from telematics_reg.upstream import UserService

    def _conforms(fake: FakeUserService) -> UserService:
        return fake  # mypy proves the fake is a whole UserService
