"""What the lifecycle keeps per user, on the user's own item of the tokens table (``USER#<DeviceToken>``).

* ``LastChangeAt`` (epoch ms): when the last change applied to the user occurred, the per-user order marker. A
  change is applied under a lease taken only while ``LastChangeAt`` is older than the change, and the marker moves
  forward with the release of that lease, so a change older than one already applied is never applied over it.
* ``LeaseOwner``/``LeaseExpiresAt``: the same lease as a token refresh, so a change and a refresh of one user never
  run at once (a move switches the credentials a refresh's Login uses).
* ``Status`` ``DELETING`` then ``DELETED`` (the tombstone): ``DeviceToken``, ``Instance``, ``InstanceId``,
  ``ClientId``/``ClientKey``, ``DeletedAt`` (epoch ms) and ``ExpiresAt`` (the table's TTL attribute). The write
  that starts a deletion removes every token and the refresh index key in the same update; the sweeper never sees
  a tombstone, and a registration that occurred before ``DeletedAt`` never replaces it.
* ``MovedFrom`` (string set): every alias a move took the user from, kept on the tombstone. ``ClientKey`` follows
  the user, so the ``ByClient`` index no longer finds it under the old alias; the service looks a change addressed
  to one of these aliases up here (:meth:`LifecycleService.apply`), and a deletion erases dead letters under each.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from telematics_reg.errors import TelematicsError
from telematics_reg.store import (
    ConditionFailedError,
    DynamoTokenStore,
    UserRecord,
    UserStatus,
    client_key,
    iso,
    user_pk,
)

#: Statuses of a registered user, to which changes apply (PENDING is a registration in flight: changes wait).
REGISTERED = (UserStatus.ACTIVE, UserStatus.TOKENLESS, UserStatus.NEEDS_RELOGIN)
#: Lease owners of the lifecycle start with this, so a refresh can tell a lifecycle lease from its own.
LEASE_PREFIX = "lifecycle/"


class ChangeRefusedError(TelematicsError):
    """The lease for a change was refused; ``reason`` says why and the caller decides (drop or retry).

    ``stale``: a newer change is applied · ``duplicate``: this very time is applied · ``deleted``: the user is
    erased · ``not_registered``: its registration is in flight · ``busy``: a refresh or another change holds it.
    """

    def __init__(self, reason: str, record: UserRecord | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.record = record


@dataclass(frozen=True)
class Moved:
    """Where a move takes the stored user."""

    instance: str
    instance_id: str


@dataclass(frozen=True)
class Tombstone:
    """A deletion of a user we hold no item for (never registered, or registering): written where it would be."""

    device_token: str
    instance: str
    instance_id: str
    client_id: str


class LifecycleRecords(Protocol):
    """The lifecycle's conditional writes. Implementations: DynamoDB, and in memory over the fake token store."""

    def find_all(self, instance: str, client_id: str) -> list[UserRecord]: ...
    def get(self, device_token: str) -> UserRecord | None: ...
    def lease(self, *, device_token: str, occurred_at: int, owner: str, now: float, ttl: int) -> UserRecord: ...
    def commit(
        self,
        *,
        device_token: str,
        owner: str,
        occurred_at: int,
        now: float,
        deactivated: bool | None = None,
        moved: Moved | None = None,
        refresh_token_dead: bool = False,
        flags: Mapping[str, object] | None = None,
    ) -> None: ...
    def release(self, *, device_token: str, owner: str, refresh_token_dead: bool = False) -> None: ...
    def begin_deletion(
        self, *, device_token: str, occurred_at: int, now: float, placeholder: Tombstone | None = None
    ) -> UserRecord: ...
    def finish_deletion(self, *, device_token: str, now: float, expires_at: int) -> None: ...


def classify_refusal(record: UserRecord | None, occurred_at: int, now: float) -> ChangeRefusedError:
    """Why a lease was refused, read from the item as it is now."""
    if record is None or record.status is UserStatus.PENDING:
        return ChangeRefusedError("not_registered", record)
    if record.status.erased:
        return ChangeRefusedError("deleted", record)
    if record.last_change_at is not None and record.last_change_at > occurred_at:
        return ChangeRefusedError("stale", record)
    if record.last_change_at == occurred_at:
        return ChangeRefusedError("duplicate", record)
    return ChangeRefusedError("busy", record)


#: What the end of a change's lease removes. ``QueuedUntil`` too: a refresh job that arrived while the change held
#: the user was consumed without refreshing (its lease was refused), and the mark would keep every sweep from
#: queueing the user again until it lapsed (two refresh leases and more), long after the access token expired::
#:
#:     sweep: QueuedUntil = q, job J queued ....... J: lease refused (change holds it): consumed, no refresh
#:     change: lease ......... upstream ......... commit/release: REMOVE LeaseOwner, LeaseExpiresAt, QueuedUntil
#:     next sweep: mark_queued ok (no QueuedUntil) -> J' refreshes   (kept until q, nothing would until then)
#:
#: A job still on its way when the mark goes is harmless: the refresh lease lets one of two jobs refresh.
_LEASE_ENDS = "LeaseOwner, LeaseExpiresAt, QueuedUntil"

_DELETION_REMOVES = (
    "AccessToken",
    "RefreshToken",
    "AccessExpiresAt",
    "DueShard",
    "LeaseOwner",
    "LeaseExpiresAt",
    "RetryAfter",
    "LastError",
    "QueuedUntil",
    "RefreshTokenDead",
    "ClaimOwner",
    "ClaimExpiresAt",
    "Deactivated",
)


class DynamoLifecycleRecords:
    """:class:`LifecycleRecords` on the tokens table, through the token store's client."""

    def __init__(self, store: DynamoTokenStore) -> None:
        self._store = store

    def find_all(self, instance: str, client_id: str) -> list[UserRecord]:
        return self._store.find_all_by_client(instance, client_id)

    def get(self, device_token: str) -> UserRecord | None:
        return self._store.get_user(device_token)

    def lease(self, *, device_token: str, occurred_at: int, owner: str, now: float, ttl: int) -> UserRecord:
        """Take the user's lease for a change that occurred at ``occurred_at``.

        Condition: the user is registered, no newer (or equal) change is applied, and no live lease (a refresh's
        or another change's) exists::

            W1 (change at t1): lease if LastChangeAt < t1 ........ ok -> upstream -> commit LastChangeAt = t1
            W2 (change at t0 < t1, delivered late): lease if LastChangeAt < t0 ..... fails: stale, dropped
            W3 (change at t2 > t1) while W1 holds it: ..... fails: busy, retried -> after W1's commit: ok

        A lease outlives the function's Timeout plus clock skew (``ttl``), so a holder cut off mid-call has
        nothing left in flight upstream when the next one takes the user over.
        """
        values = {
            ":me": owner,
            ":until": int(now) + ttl,
            ":t": occurred_at,
            ":now": int(now),
            ":active": UserStatus.ACTIVE.value,
            ":tokenless": UserStatus.TOKENLESS.value,
            ":relogin": UserStatus.NEEDS_RELOGIN.value,
        }
        try:
            old = self._store._update(
                user_pk(device_token),
                "SET LeaseOwner = :me, LeaseExpiresAt = :until",
                "#s IN (:active, :tokenless, :relogin) "
                "AND (attribute_not_exists(LastChangeAt) OR LastChangeAt < :t) "
                "AND (attribute_not_exists(LeaseExpiresAt) OR LeaseExpiresAt < :now)",
                values,
                {"#s": "Status"},
                return_old=True,
            )
        except ConditionFailedError:
            raise classify_refusal(self.get(device_token), occurred_at, now) from None
        assert old is not None
        record = self._store._record_of(old)
        # A refresh's lease that lapsed under us: its refresh token may be spent (see TokenStore.acquire_lease).
        lapsed = "LeaseOwner" in old and not str(old["LeaseOwner"]).startswith(LEASE_PREFIX)
        return replace(record, lease_owner=owner, lease_expires_at=int(now) + ttl, lease_lapsed=lapsed)

    def commit(
        self,
        *,
        device_token: str,
        owner: str,
        occurred_at: int,
        now: float,
        deactivated: bool | None = None,
        moved: Moved | None = None,
        refresh_token_dead: bool = False,
        flags: Mapping[str, object] | None = None,
    ) -> None:
        """Move the marker to ``occurred_at`` and release the lease. Condition: we still hold the lease (else the
        change is retried: the upstream call is idempotent, and a newer change applied meanwhile makes it stale).

        ``flags`` (the ``UserFields`` the change set upstream, PascalCase) go into the drift audit's reference
        (``AuditFlags``, the flags the last audit read), so that the next audit does not report the service's own
        change as ``reflagged``. A user no audit has read yet keeps no reference: the next audit takes one.
        """
        values: dict[str, Any] = {":me": owner, ":t": occurred_at, ":now": iso(now)}
        sets = ["LastChangeAt = :t", "UpdatedAt = :now"]
        adds = ""
        reference = self._audit_flags_after(device_token, flags) if flags else None
        if reference is not None:
            # No condition on the reference read: an audit that marks the user meanwhile read the upstream either
            # after our call (the same flags) or before it (older flags, which this write then corrects).
            values[":af"] = reference
            sets.append("AuditFlags = :af")
        if deactivated is not None:
            values[":d"] = deactivated
            sets.append("Deactivated = :d")
        if refresh_token_dead:
            values[":dead"] = True
            sets.append("RefreshTokenDead = :dead")
        if moved is not None:
            record = self.get(device_token)
            values |= {
                ":inst": moved.instance,
                ":iid": moved.instance_id,
                ":one": 1,
                ":ck": client_key(moved.instance, record.client_id) if record and record.client_id else None,
            }
            # A new Version: a refresh job queued for the old one (and the old instance's Login) is not used.
            sets += ["Instance = :inst", "InstanceId = :iid", "Version = Version + :one"]
            if values[":ck"] is not None:
                sets.append("ClientKey = :ck")
            else:
                del values[":ck"]
            if record is not None and record.instance != moved.instance:
                # Read under our lease: no other change or refresh moved the user since. The old alias is kept so
                # that a change still addressed to it (a redelivery of this very move, a late update) finds the
                # user instead of waiting for a registration that never comes.
                values[":from"] = {record.instance}
                adds = " ADD MovedFrom :from"
        self._store._update(
            user_pk(device_token),
            "SET " + ", ".join(sets) + adds + " REMOVE " + _LEASE_ENDS,
            "LeaseOwner = :me",
            values,
        )

    def _audit_flags_after(self, device_token: str, flags: Mapping[str, object]) -> str | None:
        """The audit's reference flags (JSON, as :func:`telematics_reg.reconcile.audit.flags_of` writes them) with
        ``flags`` applied; ``None`` when no audit has read the user yet."""
        response = self._store._call(
            "get_item",
            Key={"pk": {"S": user_pk(device_token)}},
            ConsistentRead=True,
            ProjectionExpression="AuditFlags",
        )
        current = (response.get("Item") or {}).get("AuditFlags", {}).get("S")
        if current is None:
            return None
        reference = json.loads(current)
        if not isinstance(reference, dict):
            return None
        reference.update(flags)
        return json.dumps(reference, separators=(",", ":"), sort_keys=True)

    def release(self, *, device_token: str, owner: str, refresh_token_dead: bool = False) -> None:
        values: dict[str, Any] = {":me": owner}
        expression = "REMOVE " + _LEASE_ENDS
        if refresh_token_dead:
            values[":dead"] = True
            expression = "SET RefreshTokenDead = :dead " + expression
        with contextlib.suppress(ConditionFailedError):
            self._store._update(user_pk(device_token), expression, "LeaseOwner = :me", values)

    def begin_deletion(
        self, *, device_token: str, occurred_at: int, now: float, placeholder: Tombstone | None = None
    ) -> UserRecord:
        """Turn the user into a deletion in progress: every token and the refresh index key go in this one write.

        Condition: the user is registered (whatever lease it holds: an erasure does not wait for a refresh, whose
        commit then fails on the new Version), or its registration claim lapsed, or (``placeholder``) no item
        exists at all. A live registration claim is waited for::

            R: claim (PENDING, until c) -> Create ...................... complete (ACTIVE)
            D: begin_deletion .. fails (live claim): retried ..................... ok -> upstream delete
            R': claim lapsed at c (holder cut off at its Timeout < claim: its Create has landed by then)
            D: begin_deletion .. ok (PENDING, c < now) -> upstream delete removes whatever R' made
        """
        values: dict[str, Any] = {
            ":deleting": UserStatus.DELETING.value,
            ":t": occurred_at,
            ":now": iso(now),
            ":inow": int(now),
            ":one": 1,
            ":active": UserStatus.ACTIVE.value,
            ":tokenless": UserStatus.TOKENLESS.value,
            ":relogin": UserStatus.NEEDS_RELOGIN.value,
            ":pending": UserStatus.PENDING.value,
        }
        expression = (
            "SET #s = :deleting, DeletedAt = :t, LastChangeAt = :t, UpdatedAt = :now, "
            "Version = if_not_exists(Version, :zero) + :one REMOVE " + ", ".join(_DELETION_REMOVES)
        )
        values[":zero"] = 0
        condition = "#s IN (:active, :tokenless, :relogin) OR (#s = :pending AND ClaimExpiresAt < :inow)"
        if placeholder is not None:
            values |= {
                ":dt": placeholder.device_token,
                ":inst": placeholder.instance,
                ":iid": placeholder.instance_id,
                ":cid": placeholder.client_id,
                ":ck": client_key(placeholder.instance, placeholder.client_id),
                ":kind": "user",
                ":created": iso(now),
            }
            expression = expression.replace(
                "SET ",
                "SET DeviceToken = :dt, Instance = :inst, InstanceId = :iid, ClientId = :cid, ClientKey = :ck, "
                "Kind = :kind, CreatedAt = if_not_exists(CreatedAt, :created), ",
                1,
            )
            condition = "attribute_not_exists(pk) OR " + condition
        try:
            attrs = self._store._update(
                user_pk(device_token), expression, condition, values, {"#s": "Status"}, return_new=True
            )
        except ConditionFailedError:
            raise classify_refusal(self.get(device_token), occurred_at, now) from None
        assert attrs is not None
        return self._store._record_of(attrs)

    def finish_deletion(self, *, device_token: str, now: float, expires_at: int) -> None:
        """The tombstone: DELETED, expiring at ``expires_at`` (epoch s). Condition: the deletion was begun."""
        try:
            self._store._update(
                user_pk(device_token),
                "SET #s = :deleted, ExpiresAt = :exp, UpdatedAt = :now",
                "#s IN (:deleting, :deleted)",
                {
                    ":deleted": UserStatus.DELETED.value,
                    ":deleting": UserStatus.DELETING.value,
                    ":exp": expires_at,
                    ":now": iso(now),
                },
                {"#s": "Status"},
            )
        except ConditionFailedError:
            raise ChangeRefusedError("not_deleting", self.get(device_token)) from None
