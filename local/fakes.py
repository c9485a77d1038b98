"""In-memory stand-ins for the outside systems, for unit tests and benchmarks (they do not ship in the layer):
the User Service, the outcome-event publisher, the dead-letter sink and the Login budget.

The User Service is for the modules that use :class:`~telematics_reg.upstream.UserService`.

It behaves as the real client does from the outside: a Create with a ``CustomToken`` that already exists returns
the user with fresh tokens (as the client's Login recovery does), refresh tokens are single-use, CreateMany can
be switched off (one Create per user then), and any call can be told to fail.
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
from typing import Any
from uuid import UUID

from telematics_reg.dead_letters import DeadLetter
from telematics_reg.errors import (
    DeadRefreshTokenError,
    FieldError,
    NotFoundError,
    UnauthorizedError,
    UpstreamError,
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

__all__ = ["FakeUser", "FakeUserService", "InMemoryLoginBudget", "RecordingDeadLetters", "RecordingPublisher"]


@dataclass
class FakeUser:
    """One user held by :class:`FakeUserService`."""

    instance_id: UUID
    device_token: UUID
    client_id: str | None
    profile: dict[str, Any]
    refresh_token: str | None = field(default=None, repr=False)
    login_disabled: bool = False


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

    def create(self, creds: InstanceCredentials, body: CreateUserRequest) -> CreateResult:
        with self._lock:
            after = self._enter("create")
            self._authorize(creds)
            existing = self.users.get(body.custom_token) if body.custom_token is not None else None
            if existing is not None and existing.instance_id == creds.instance_id:
                # What the real client does on "CustomToken exists": Login and return that user's tokens.
                self.calls["login"] += 1
                result = self._issue(existing)
            else:
                user = self._new_user(creds.instance_id, body)
                result = self._issue(user) if body.create_access_token else CreateResult(device_token=user.device_token)
            self._leave(after)
            return result

    def create_many(
        self, creds: InstanceCredentials, body: CreateManyRequest, custom_tokens: Sequence[UUID] | None = None
    ) -> list[CreateResult]:
        if body.quantity > MAX_CREATE_MANY_PER_CALL:
            raise ValueError(f"CreateMany takes at most {MAX_CREATE_MANY_PER_CALL} users per call")
        if custom_tokens is not None and len(custom_tokens) != body.quantity:
            raise ValueError(f"custom_tokens has {len(custom_tokens)} items for Quantity {body.quantity}")
        with self._lock:
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
        user = FakeUser(instance_id, device_token, client_id, body.to_upstream())
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
    """The same budget in memory (tests)."""

    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._used: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self.spent = 0

    def try_acquire(self, instance_id: str, now: float) -> bool:
        with self._lock:
            key = (instance_id, int(now // 60))
            if self._used.get(key, 0) >= self._per_minute:
                return False
            self._used[key] = self._used.get(key, 0) + 1
            self.spent += 1
            return True
