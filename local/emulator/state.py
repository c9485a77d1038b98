"""The emulator's in-memory world: instances, users, refresh tokens, counters and run-time config.

Every read and write of the mutable state happens under one lock, so any number of handler threads
may call in. Operations raise :class:`ApiError` with the upstream's status codes.
"""

from __future__ import annotations

import math
import random
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from local.emulator.faults import FAULT_KINDS
from local.emulator.login_limit import VENDOR_BLOCK_S, VENDOR_LIMIT_PER_MINUTE, LoginLimiter, Refusal
from local.emulator.messages import ApiError
from local.emulator.tokens import TokenIssuer, new_refresh_token

USER_FIELD_DEFAULTS: Mapping[str, Any] = {
    "EnableTracking": True,
    "EnableLogging": False,
    "Enabled": True,
    "EnableRealtimeLocation": False,
    "ClientId": None,
}
REFRESH_PATHS = ("observed", "spec")
#: Why a refresh token was rejected: it was revoked (``POST /_emulator/revoke``), it was already spent (rotated by a
#: Refresh or a Login: presenting it again means a client lost track of its newest pair, or two clients raced), its
#: user was deleted (``DELETE /v1/Management/users/{DeviceToken}``), or the emulator never issued it.
REJECTION_CAUSES = ("revoked", "spent", "deleted", "unknown")
#: Access-token lifetimes the vendor documents (registration-api.md, admin-auth.md), seconds; ``token_lifetime_s``
#: in the run-time config overrides them all.
DOCUMENTED_LIFETIMES_S: Mapping[str, int] = {"create": 432_000, "login": 86_400, "refresh": 86_400, "admin": 86_400}
#: The management calls, as counted in ``management_calls`` and named in the faults' ``calls``.
MANAGEMENT_CALLS = ("find", "get_filtered_page", "update", "delete", "change_instance")


@dataclass(frozen=True)
class Instance:
    """A user group: ``alias`` is the name in the credentials JSON."""

    alias: str
    instance_id: str
    instance_key: str

    def key_matches(self, key: str | None) -> bool:
        # ``key`` is the header as parsed (surrounding whitespace is not part of a header value on the wire); the
        # configured key is compared as given, so a malformed one never authenticates anyone.
        return key is not None and key.lower() == self.instance_key.lower()


@dataclass(frozen=True)
class AdminAccount:
    """The company's admin API credentials (the vendor's console: Admin Credentials); it manages every instance."""

    email: str
    password: str

    def matches(self, email: str | None, password: str | None) -> bool:
        # E-mail addresses compare case-insensitively; the password exactly (and in constant time).
        return (
            email is not None
            and password is not None
            and email.strip().lower() == self.email.lower()
            and secrets.compare_digest(password.encode(), self.password.encode())
        )


@dataclass(frozen=True)
class RuntimeConfig:
    token_lifetime_s: int | None = None
    """None: the documented lifetimes (:data:`DOCUMENTED_LIFETIMES_S`); a number overrides them all."""
    create_many_enabled: bool = True
    refresh_paths: frozenset[str] = frozenset(REFRESH_PATHS)
    login_limit_per_minute: int = VENDOR_LIMIT_PER_MINUTE
    """Login calls a minute per source address before the block (0: no limit)."""
    login_block_s: int = VENDOR_BLOCK_S

    def lifetime(self, kind: str) -> int:
        return self.token_lifetime_s if self.token_lifetime_s is not None else DOCUMENTED_LIFETIMES_S[kind]

    def as_json(self) -> dict[str, Any]:
        return {
            "token_lifetime_s": self.token_lifetime_s,
            "token_lifetimes_s": {kind: self.lifetime(kind) for kind in DOCUMENTED_LIFETIMES_S},
            "create_many_enabled": self.create_many_enabled,
            "refresh_paths": [path for path in REFRESH_PATHS if path in self.refresh_paths],
            "login_limit_per_minute": self.login_limit_per_minute,
            "login_block_s": self.login_block_s,
        }


@dataclass
class User:
    device_token: str
    instance_id: str
    profile: dict[str, Any]
    user_fields: dict[str, Any]
    status: str
    created_at: float
    source: str
    refresh_token: str | None = None
    login_disabled: bool = False
    tokens_issued: int = 0
    refreshes: int = 0
    logins: int = 0
    rejected_refresh_tokens: Counter[str] = field(default_factory=Counter)

    @property
    def client_id(self) -> str | None:
        value = self.user_fields.get("ClientId")
        return value if isinstance(value, str) and value else None

    def describe(self) -> dict[str, Any]:
        return {
            "DeviceToken": self.device_token,
            "InstanceId": self.instance_id,
            "ClientId": self.client_id,
            "CreatedAt": datetime.fromtimestamp(self.created_at, UTC).isoformat(),
            "CreatedBy": self.source,
            "Status": self.status,
            "Profile": dict(self.profile),
            "UserFields": dict(self.user_fields),
            "LoginDisabled": self.login_disabled,
            "HasRefreshToken": self.refresh_token is not None,
            "TokensIssued": self.tokens_issued,
            "Refreshes": self.refreshes,
            "Logins": self.logins,
            "RejectedRefreshTokens": dict(self.rejected_refresh_tokens),
        }


@dataclass
class Counters:
    creates: int = 0
    create_many_calls: int = 0
    create_many_users: int = 0
    refreshes: int = 0
    logins: int = 0
    failed_logins: int = 0
    admin_logins: int = 0
    failed_admin_logins: int = 0
    admin_refreshes: int = 0
    rejected_refresh_tokens: int = 0
    rejected_by_cause: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECTION_CAUSES, 0))
    management_calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MANAGEMENT_CALLS, 0))
    updates: int = 0
    deletes: int = 0
    instance_changes: int = 0
    requests_total: int = 0
    faults_served: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULT_KINDS, 0))
    # The same by call, the admin's Login and Refresh apart from the users': a run can tell how many admin answers
    # were dropped after commit (each costs the service's admin session one Login).
    faults_by_call: dict[str, Counter[str]] = field(default_factory=dict)
    admin_rejected_refresh_tokens: int = 0


@dataclass(frozen=True)
class NewUser:
    """A validated Create body, ready to commit."""

    profile: dict[str, Any]
    user_fields: dict[str, Any]
    status: str = "Active"
    custom_token: str | None = None
    create_access_token: bool = True


@dataclass(frozen=True)
class UserView:
    """A copy of one user, read outside the lock (the management API renders these)."""

    device_token: str
    instance_id: str
    profile: Mapping[str, Any]
    user_fields: Mapping[str, Any]
    status: str
    created_at: float


def _user_not_found() -> ApiError:
    return ApiError.single(404, "DeviceToken", "User not found")


class EmulatorState:
    """Users, tokens and counters of all instances, behind one lock."""

    def __init__(
        self, instances: Sequence[Instance], issuer: TokenIssuer, config: RuntimeConfig, admin: AdminAccount
    ) -> None:
        self._lock = threading.Lock()
        self._issuer = issuer
        self.admin_account = admin
        self._instances = {instance.instance_id.lower(): instance for instance in instances}
        # The admin's live refresh tokens (each Login starts a session; each Refresh rotates that session's token).
        self._admin_refresh_tokens: set[str] = set()
        self.login_limiter = LoginLimiter()
        self._initial_config = config
        self._config = config
        self._users: dict[str, User] = {}
        self._refresh_tokens: dict[str, str] = {}
        # Refresh tokens no longer valid -> (cause, DeviceToken), so that a rejection says why (see REJECTION_CAUSES).
        self._retired_tokens: dict[str, tuple[str, str]] = {}
        self._in_flight = 0
        self._in_flight_peak = 0
        self._users_by_instance: Counter[str] = Counter()
        self._users_by_client: Counter[tuple[str, str]] = Counter()
        self._counters = Counters()
        self._random = random.Random()

    # ----------------------------------------------------------------- credentials

    @property
    def instances(self) -> tuple[Instance, ...]:
        return tuple(self._instances.values())

    def instance(self, instance_id: str | None) -> Instance | None:
        return self._instances.get(instance_id.strip().lower()) if instance_id else None

    def authenticate(self, instance_id: str | None, instance_key: str | None) -> Instance:
        """The instance whose id and key the headers carry; 401 otherwise."""
        found = self.instance(instance_id)
        if found is None or not found.key_matches(instance_key):
            raise ApiError.single(401, "InstanceKey", "Invalid InstanceId or InstanceKey")
        return found

    # ----------------------------------------------------------------- counters and config

    def count_request(self) -> None:
        with self._lock:
            self._counters.requests_total += 1

    def enter_call(self) -> None:
        """A public call starts: counts towards the in-flight gauge and its peak (upstream concurrency)."""
        with self._lock:
            self._in_flight += 1
            self._in_flight_peak = max(self._in_flight_peak, self._in_flight)

    def leave_call(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def count_fault(self, kind: str, call: str | None = None) -> None:
        """One fault served; ``call`` names the call (``admin_login``/``admin_refresh`` for the admin's)."""
        with self._lock:
            self._counters.faults_served[kind] = self._counters.faults_served.get(kind, 0) + 1
            if call is not None:
                self._counters.faults_by_call.setdefault(call, Counter())[kind] += 1

    def counters(self) -> dict[str, Any]:
        with self._lock:
            counters = self._counters
            return {
                "users_total": len(self._users),
                "users_by_instance": {
                    instance.instance_id: self._users_by_instance[instance.instance_id]
                    for instance in self._instances.values()
                },
                "users_by_client_id": {
                    f"{instance_id}/{client_id}": count
                    for (instance_id, client_id), count in sorted(self._users_by_client.items())
                    if count
                },
                "creates": counters.creates,
                "create_many_calls": counters.create_many_calls,
                "create_many_users": counters.create_many_users,
                "refreshes": counters.refreshes,
                "logins": counters.logins,
                "failed_logins": counters.failed_logins,
                "admin_logins": counters.admin_logins,
                "failed_admin_logins": counters.failed_admin_logins,
                "admin_refreshes": counters.admin_refreshes,
                "admin_rejected_refresh_tokens": counters.admin_rejected_refresh_tokens,
                "logins_refused_by_limit": self.login_limiter.refused,
                "login_blocks_begun": self.login_limiter.blocks_begun,
                "login_blocked_addresses": self.login_limiter.blocked_addresses(),
                "rejected_refresh_tokens": counters.rejected_refresh_tokens,
                "rejected_refresh_tokens_by_cause": dict(counters.rejected_by_cause),
                "in_flight_peak": self._in_flight_peak,
                "management_calls": dict(counters.management_calls),
                "updates": counters.updates,
                "deletes": counters.deletes,
                "instance_changes": counters.instance_changes,
                "faults_served": dict(counters.faults_served),
                "faults_by_call": {call: dict(kinds) for call, kinds in sorted(counters.faults_by_call.items())},
                "requests_total": counters.requests_total,
            }

    @property
    def config(self) -> RuntimeConfig:
        with self._lock:
            return self._config

    def update_config(self, **changes: Any) -> RuntimeConfig:
        with self._lock:
            self._config = replace(self._config, **changes)
            return self._config

    def reset(self) -> None:
        """Forget users, tokens and counters, lift Login blocks; the run-time config returns to its start values."""
        self.login_limiter.reset()
        with self._lock:
            self._users.clear()
            self._refresh_tokens.clear()
            self._admin_refresh_tokens.clear()
            self._retired_tokens.clear()
            self._in_flight_peak = self._in_flight
            self._users_by_instance.clear()
            self._users_by_client.clear()
            self._counters = Counters()
            self._config = self._initial_config

    # ----------------------------------------------------------------- internals (lock held)

    def _issue(self, user: User, kind: str) -> dict[str, Any]:
        """A new token pair for ``user`` (``kind``: which call, for the lifetime); the previous refresh token dies."""
        if user.refresh_token is not None:
            self._refresh_tokens.pop(user.refresh_token, None)
            self._retired_tokens[user.refresh_token] = ("spent", user.device_token)
        token, expires_in = self._issuer.access_token(user.device_token, user.instance_id, self._config.lifetime(kind))
        refresh_token = new_refresh_token()
        user.refresh_token = refresh_token
        user.tokens_issued += 1
        self._refresh_tokens[refresh_token] = user.device_token
        return {
            "DeviceToken": user.device_token,
            "AccessToken": {"Token": token, "ExpiresIn": expires_in},
            "RefreshToken": refresh_token,
        }

    def _insert(self, user: User) -> None:
        self._users[user.device_token] = user
        self._users_by_instance[user.instance_id] += 1
        if user.client_id is not None:
            self._users_by_client[(user.instance_id, user.client_id)] += 1

    def _remove(self, user: User) -> None:
        del self._users[user.device_token]
        if user.refresh_token is not None:
            self._refresh_tokens.pop(user.refresh_token, None)
            self._retired_tokens[user.refresh_token] = ("deleted", user.device_token)
        self._users_by_instance[user.instance_id] -= 1
        if user.client_id is not None:
            self._users_by_client[(user.instance_id, user.client_id)] -= 1

    @staticmethod
    def _without_tokens(device_token: str) -> dict[str, Any]:
        return {"DeviceToken": device_token, "AccessToken": None, "RefreshToken": None}

    # ----------------------------------------------------------------- public calls

    def create(self, instance: Instance, new: NewUser) -> dict[str, Any]:
        device_token = new.custom_token or str(uuid.uuid4())
        user = User(
            device_token=device_token,
            instance_id=instance.instance_id,
            profile=dict(new.profile),
            user_fields={**USER_FIELD_DEFAULTS, **new.user_fields},
            status=new.status,
            created_at=time.time(),
            source="create",
        )
        with self._lock:
            if device_token in self._users:
                raise ApiError.single(422, "CustomToken", "A user with this DeviceToken already exists")
            self._insert(user)
            self._counters.creates += 1
            return self._issue(user, "create") if new.create_access_token else self._without_tokens(device_token)

    def create_many(
        self, instance: Instance, quantity: int, create_access_token: bool, custom_fields: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        now = time.time()
        results = []
        with self._lock:
            for _ in range(quantity):
                user = User(
                    device_token=str(uuid.uuid4()),
                    instance_id=instance.instance_id,
                    profile={},
                    user_fields={**USER_FIELD_DEFAULTS, **custom_fields},
                    status="Active",
                    created_at=now,
                    source="create_many",
                )
                self._insert(user)
                results.append(
                    self._issue(user, "create") if create_access_token else self._without_tokens(user.device_token)
                )
            self._counters.create_many_calls += 1
            self._counters.create_many_users += quantity
        return results

    def refresh(self, claims: Mapping[str, Any], refresh_token: str) -> dict[str, Any]:
        """Rotate the pair of the refresh token's user; ``claims`` are the (possibly expired) JWT's."""
        with self._lock:
            device_token = self._refresh_tokens.get(refresh_token)
            if device_token is None:
                cause, holder = self._retired_tokens.get(refresh_token, ("unknown", ""))
                self._counters.rejected_refresh_tokens += 1
                self._counters.rejected_by_cause[cause] += 1
                if holder in self._users:
                    self._users[holder].rejected_refresh_tokens[cause] += 1
                raise ApiError.single(400, "RefreshToken", "The refresh token is invalid, used or revoked")
            if claims.get("DeviceToken") != device_token:
                raise ApiError.single(400, "AccessToken", "The access token was not issued to this user")
            user = self._users[device_token]
            user.refreshes += 1
            self._counters.refreshes += 1
            return self._issue(user, "refresh")

    def login(self, instance_id: str | None, password: str | None, device_token: str) -> dict[str, Any]:
        instance = self.instance(instance_id)
        with self._lock:
            if instance is None or not instance.key_matches(password):
                self._counters.failed_logins += 1
                raise ApiError.single(401, "Password", "Invalid InstanceId or password")
            user = self._users.get(device_token)
            if user is None or user.instance_id != instance.instance_id:
                self._counters.failed_logins += 1
                raise _user_not_found()
            if user.login_disabled:
                self._counters.failed_logins += 1
                raise ApiError.single(401, "DeviceToken", "Login is disabled for this user")
            user.logins += 1
            self._counters.logins += 1
            return self._issue(user, "login")

    def count_failed_login(self) -> None:
        with self._lock:
            self._counters.failed_logins += 1

    def user_exists(self, instance: Instance, *, client_id: str | None, email: str | None, phone: str | None) -> bool:
        with self._lock:
            if client_id is not None and self._users_by_client[(instance.instance_id, client_id)] > 0:
                return True
            if email is None and phone is None:
                return False
            for user in self._users.values():
                if user.instance_id != instance.instance_id:
                    continue
                user_email = user.profile.get("Email")
                if email is not None and isinstance(user_email, str) and user_email.lower() == email.lower():
                    return True
                if phone is not None and user.profile.get("Phone") == phone:
                    return True
            return False

    # ----------------------------------------------------------------- the admin account

    def admit_login(self, address: str) -> Refusal | None:
        """The Login limit for one Login call from ``address`` (see :mod:`local.emulator.login_limit`)."""
        config = self.config
        return self.login_limiter.admit(address, config.login_limit_per_minute, config.login_block_s)

    def _issue_admin(self, kind: str) -> dict[str, Any]:
        token, expires_in = self._issuer.admin_access_token(self.admin_account.email, self._config.lifetime(kind))
        refresh_token = new_refresh_token()
        self._admin_refresh_tokens.add(refresh_token)
        # As the vendor's admin Login answers (admin-auth.md): no DeviceToken.
        return {"AccessToken": {"Token": token, "ExpiresIn": expires_in}, "RefreshToken": refresh_token}

    def admin_login(self, email: str | None, password: str | None) -> dict[str, Any]:
        with self._lock:
            if not self.admin_account.matches(email, password):
                self._counters.failed_admin_logins += 1
                raise ApiError.single(401, "Password", "Invalid e-mail or password")
            self._counters.admin_logins += 1
            return self._issue_admin("admin")

    def admin_refresh(self, refresh_token: str) -> dict[str, Any]:
        """Rotate an admin session's refresh token (single-use, like a user's); 400 when not live."""
        with self._lock:
            if refresh_token not in self._admin_refresh_tokens:
                cause, _ = self._retired_tokens.get(refresh_token, ("unknown", ""))
                self._counters.rejected_refresh_tokens += 1
                self._counters.rejected_by_cause[cause] += 1
                self._counters.admin_rejected_refresh_tokens += 1
                raise ApiError.single(400, "RefreshToken", "The refresh token is invalid, used or revoked")
            self._admin_refresh_tokens.discard(refresh_token)
            self._retired_tokens[refresh_token] = ("spent", "")
            self._counters.admin_refreshes += 1
            return self._issue_admin("admin")

    # ----------------------------------------------------------------- the User Management API

    def count_management(self, kind: str) -> None:
        with self._lock:
            self._counters.management_calls[kind] += 1

    def users_view(self) -> list[UserView]:
        """A consistent copy of every user (filtering, sorting and paging happen outside the lock)."""
        with self._lock:
            return [
                UserView(
                    device_token=user.device_token,
                    instance_id=user.instance_id,
                    profile=dict(user.profile),
                    user_fields=dict(user.user_fields),
                    status=user.status,
                    created_at=user.created_at,
                )
                for user in self._users.values()
            ]

    def update(self, device_token: str, changes: Mapping[str, Any]) -> None:
        """Apply a validated update body: only the given fields change (``UserFields`` merged by key)."""
        with self._lock:
            user = self._users.get(device_token)
            if user is None:
                raise _user_not_found()
            if user.client_id is not None:
                self._users_by_client[(user.instance_id, user.client_id)] -= 1
            for name, value in changes.items():
                if name == "UserFields":
                    user.user_fields.update(value)
                elif name == "Status":
                    user.status = value
                elif name not in {"OldPassword", "NewPassword"}:
                    user.profile[name] = value
            if user.client_id is not None:
                self._users_by_client[(user.instance_id, user.client_id)] += 1
            self._counters.updates += 1

    def delete(self, device_token: str) -> None:
        """Hard delete: the user, its refresh token (then rejected as ``deleted``) and its Login are gone."""
        with self._lock:
            user = self._users.get(device_token)
            if user is None:
                raise _user_not_found()
            self._remove(user)
            self._counters.deletes += 1

    def change_instance(self, device_token: str, to_instance_id: str, to_instance_key: str) -> None:
        """Move a user to another instance of the company, whose key the caller must know.

        The user keeps its DeviceToken and its refresh token (the vendor is silent; its tokens are the user's, not
        the instance's); from now on Login takes the new instance's id and key, and new tokens carry its id.
        Moving a user to the instance it is in changes nothing and succeeds.
        """
        target = self.instance(to_instance_id)
        if target is None:
            raise ApiError.single(422, "ToInstanceId", "No such instance in this company")
        if not target.key_matches(to_instance_key):
            raise ApiError.single(422, "ToInstanceKey", "The key does not match the target instance")
        with self._lock:
            user = self._users.get(device_token)
            if user is None:
                raise _user_not_found()
            if user.instance_id != target.instance_id:
                self._users_by_instance[user.instance_id] -= 1
                self._users_by_instance[target.instance_id] += 1
                if user.client_id is not None:
                    self._users_by_client[(user.instance_id, user.client_id)] -= 1
                    self._users_by_client[(target.instance_id, user.client_id)] += 1
                user.instance_id = target.instance_id
            self._counters.instance_changes += 1

    # ----------------------------------------------------------------- admin

    def revoke(self, device_tokens: Iterable[str] | None = None, fraction: float | None = None) -> list[str]:
        """Invalidate the current refresh token of the given users, or of ``ceil(fraction * n)`` users."""
        with self._lock:
            if fraction is not None:
                holders = sorted(dt for dt, user in self._users.items() if user.refresh_token is not None)
                count = min(len(holders), math.ceil(fraction * len(holders)))
                chosen = self._random.sample(holders, count)
            else:
                chosen = list(device_tokens or [])
            revoked = []
            for device_token in chosen:
                user = self._users.get(device_token)
                if user is None or user.refresh_token is None:
                    continue
                self._refresh_tokens.pop(user.refresh_token, None)
                self._retired_tokens[user.refresh_token] = ("revoked", device_token)
                user.refresh_token = None
                revoked.append(device_token)
            return revoked

    def set_login_disabled(self, device_tokens: Iterable[str], disabled: bool) -> list[str]:
        with self._lock:
            changed = []
            for device_token in device_tokens:
                user = self._users.get(device_token)
                if user is not None:
                    user.login_disabled = disabled
                    changed.append(device_token)
            return changed

    def describe(self, device_token: str) -> dict[str, Any] | None:
        with self._lock:
            user = self._users.get(device_token)
            return user.describe() if user is not None else None

    def find(self, *, instance_id: str | None = None, client_id: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                user.describe()
                for user in self._users.values()
                if (instance_id is None or user.instance_id.lower() == instance_id.lower())
                and (client_id is None or user.client_id == client_id)
            ]


def normalize_device_token(value: str) -> str:
    """The canonical (lower-case) form of a DeviceToken when it is a UUID; the value itself otherwise."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return value
