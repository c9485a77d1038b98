"""Applies one lifecycle change upstream (User Management API, the fleet's admin session) and here, in order.

* **Order per user.** A change is applied under the user's lease, taken only while the user's ``LastChangeAt`` is
  older than the change (see :meth:`LifecycleRecords.lease`); an older change is dropped with reason ``stale``.
* **Not yet registered.** No stored user (or a registration in flight): :class:`UserNotRegisteredError`, retried
  by the queue; the intake dead-letters it ``unknown_user`` after a bound.
* **Deletion is final.** The item becomes DELETING (tokens removed in that same write), the upstream user is
  deleted (or already gone), the item becomes the DELETED tombstone (TTL ``ExpiresAt``), the user's dead letters are
  removed, ``TelematicsUserDeleted`` is published. Every step is idempotent, so a retry at any point finishes it.
  A change (or a deletion) that occurred before a deletion already done is dropped (``user_deleted``), whether or
  not the ClientId was registered again since. A deletion is never dropped as ``stale``: erasure wins over order.
* **Moves** keep the DeviceToken: the stored ``Instance``/``InstanceId`` follow, with a new ``Version``, so later
  refreshes and Logins use the new instance's credentials. A move to the instance the user is in (its alias, or
  another alias of the same InstanceId) does not call the upstream.
* **Changes addressed to an alias the user was moved from** (a redelivery of the move itself, a late update, a
  deletion sent to the old alias) find the user through its ``MovedFrom``, looked up under the credentials
  secret's other aliases only when the change's own alias holds no live user; then the user's order decides, as
  for any change: older or equal is dropped (``stale`` / ``duplicate``), newer is applied to the user where it is
  now. Without it such a change would wait for a registration that never comes and dead-letter ``unknown_user``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

from telematics_reg.credentials import CredentialsProvider, DeviceTokenKeyProvider
from telematics_reg.errors import FieldError, NotFoundError, TelematicsError, UpstreamValidationError
from telematics_reg.lifecycle.admin import FleetAdminSession
from telematics_reg.lifecycle.changes import Action, LifecycleChange
from telematics_reg.lifecycle.erasure import DeadLetterEraser
from telematics_reg.lifecycle.events import (
    UserDeactivated,
    UserDeleted,
    UserMoved,
    UserReactivated,
    UserUpdated,
)
from telematics_reg.lifecycle.records import (
    LEASE_PREFIX,
    ChangeRefusedError,
    LifecycleRecords,
    Moved,
    Tombstone,
)
from telematics_reg.models import InstanceCredentials
from telematics_reg.observability import logger
from telematics_reg.outcomes import EventPublisher, OutcomeEvent
from telematics_reg.registration import device_token_for, successor_device_token
from telematics_reg.store import UserRecord, UserStatus
from telematics_reg.upstream import UserService


class InstanceCatalog(CredentialsProvider, Protocol):
    """The instance credentials, and which aliases exist (to find a user moved away from a change's alias)."""

    def aliases(self) -> list[str]: ...


class UserNotRegisteredError(TelematicsError):
    """No registered user for the change yet (its registration may be in flight): retry, within a bound."""


class UserBusyError(TelematicsError):
    """A refresh or another change holds the user right now: retry."""


class LifecycleRejectedError(TelematicsError):
    """The upstream refused the change for good (``reason``, ``errors``): dead-letter it."""

    def __init__(self, reason: str, errors: list[FieldError]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errors = errors


@dataclass(frozen=True)
class ChangeOutcome:
    """``applied``, or ``dropped`` with ``reason`` (``stale``, ``duplicate``, ``user_deleted``)."""

    status: str
    reason: str | None = None
    device_token: str | None = None
    applied_at: int | None = None


class LifecycleService:
    """See the module docstring. One instance serves many threads."""

    def __init__(
        self,
        *,
        upstream: UserService,
        records: LifecycleRecords,
        credentials: InstanceCatalog,
        device_token_key: DeviceTokenKeyProvider,
        admin: FleetAdminSession,
        publisher: EventPublisher,
        eraser: DeadLetterEraser,
        lease_seconds: int = 120,
        tombstone_retention_seconds: int = 90 * 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._upstream = upstream
        self._records = records
        self._credentials = credentials
        self._device_token_key = device_token_key
        self._admin = admin
        self._publisher = publisher
        self._eraser = eraser
        self._lease = lease_seconds
        self._retention = tombstone_retention_seconds
        self._clock = clock

    def apply(self, change: LifecycleChange, *, message_id: str = "") -> ChangeOutcome:
        """Apply ``change``.

        Raises
        ------
        UnknownInstanceError
            ``Instance`` or ``ToInstance`` names no credentials: bad input (checked before anything else).
        LifecycleRejectedError
            The upstream refused it for good.
        UserNotRegisteredError, UserBusyError, UpstreamError, StoreError, ErasureIncompleteError
            Transient: retry.
        """
        creds = self._credentials.get(change.instance)
        to_creds = self._credentials.get(change.to_instance) if change.to_instance else None
        records = self._user_records(change)
        erased_after = [
            r for r in records if r.status.erased and r.deleted_at is not None and r.deleted_at >= change.occurred_at
        ]
        if change.action is Action.DELETE:
            return self._delete(change, records, str(creds.instance_id))
        if erased_after:
            # It occurred before a deletion already done: never applied, never sent upstream.
            return ChangeOutcome("dropped", "user_deleted", erased_after[0].device_token, erased_after[0].deleted_at)
        live = next((r for r in records if not r.status.erased), None)
        if live is None or live.status is UserStatus.PENDING:
            raise UserNotRegisteredError(f"no registered user for {change.key} yet")
        owner = f"{LEASE_PREFIX}{message_id or uuid.uuid4()}/{uuid.uuid4()}"
        try:
            leased = self._records.lease(
                device_token=live.device_token,
                occurred_at=change.occurred_at,
                owner=owner,
                now=self._clock(),
                ttl=self._lease,
            )
        except ChangeRefusedError as refused:
            return self._refused(change, refused, live)
        # Where a move takes the user, read from the leased item (another move may have committed since the find).
        moved = (
            Moved(change.to_instance, str(to_creds.instance_id))
            if to_creds is not None and change.to_instance is not None and change.to_instance != leased.instance
            else None
        )
        if to_creds is not None and str(to_creds.instance_id).lower() == leased.instance_id.lower():
            to_creds = None  # already in that instance: the marker and the alias move, the upstream is not called
        try:
            self._call_upstream(change, leased, to_creds)
        except BaseException as exc:
            self._records.release(device_token=leased.device_token, owner=owner, refresh_token_dead=leased.lease_lapsed)
            if isinstance(exc, LifecycleRejectedError) and exc.reason == "not_found_upstream":
                # A deletion is final whatever lease a change holds, so it may run while this change waits on the
                # upstream, which then no longer knows the user:
                #   change: lease | update(user) ....................... 404
                #   delete:         begin | delete upstream | erase DLQs | tombstone
                # Dead-lettering the change would put its profile back into a DLQ the deletion has just erased.
                erased = next(
                    (
                        r
                        for r in self._user_records(change)
                        if r.device_token == leased.device_token and r.status.erased
                    ),
                    None,
                )
                if erased is not None:
                    return ChangeOutcome("dropped", "user_deleted", erased.device_token, erased.deleted_at)
            raise
        deactivated = {Action.DEACTIVATE: True, Action.REACTIVATE: False}.get(change.action)
        flags = change.update.to_upstream().get("UserFields") if change.update is not None else None
        self._records.commit(
            device_token=leased.device_token,
            owner=owner,
            occurred_at=change.occurred_at,
            now=self._clock(),
            deactivated=deactivated,
            moved=moved,
            refresh_token_dead=leased.lease_lapsed,
            flags=flags if isinstance(flags, dict) else None,
        )
        self._announce(change, leased)
        return ChangeOutcome("applied", device_token=leased.device_token)

    # ------------------------------------------------------------------------------------------ helpers

    def _user_records(self, change: LifecycleChange) -> list[UserRecord]:
        """The items of the change's user: those of its (Instance, ClientId) and, when none of them is a live user,
        the items moves took away from that alias (their ``MovedFrom`` holds it), wherever they are now::

            M (default -> eu, t1): commit: Instance = eu, ClientKey = eu#c, MovedFrom += default
            M redelivered (default#c): ByClient finds nothing ... MovedFrom lookup: the user in eu
                                       -> lease: LastChangeAt = t1 = t1: duplicate, dropped (never waits)

        The lookup queries the secret's other aliases (few), only on this miss path: a user that was never moved,
        or a change addressed to its current alias, costs nothing more.
        """
        records = self._records.find_all(change.instance, change.client_id)
        if any(not record.status.erased for record in records):
            return records
        seen = {record.device_token for record in records}
        moved: list[UserRecord] = []
        for alias in self._credentials.aliases():
            if alias == change.instance:
                continue
            for record in self._records.find_all(alias, change.client_id):
                if change.instance in record.moved_from and record.device_token not in seen:
                    seen.add(record.device_token)
                    moved.append(record)
        # A live user first (a move never leaves two), then the latest change.
        moved.sort(key=lambda r: (r.status.erased, -(r.last_change_at or 0)))
        return records + moved

    def _refused(self, change: LifecycleChange, refused: ChangeRefusedError, live: UserRecord) -> ChangeOutcome:
        record = refused.record or live
        if refused.reason == "not_registered":
            raise UserNotRegisteredError(f"no registered user for {change.key} yet")
        if refused.reason == "busy":
            raise UserBusyError(f"user {record.device_token} is held by a refresh or another change")
        reason = "user_deleted" if refused.reason == "deleted" else refused.reason
        applied = record.deleted_at if reason == "user_deleted" else record.last_change_at
        return ChangeOutcome("dropped", reason, record.device_token, applied)

    def _call_upstream(self, change: LifecycleChange, leased: UserRecord, to_creds: InstanceCredentials | None) -> None:
        token = UUID(leased.device_token)
        try:
            if change.action is Action.MOVE:
                if to_creds is not None:
                    target = to_creds
                    self._admin.call(lambda admin: self._upstream.change_instance(admin, token, target))
            else:
                assert change.update is not None
                update = change.update
                self._admin.call(lambda admin: self._upstream.update_user(admin, token, update))
        except NotFoundError as exc:
            raise LifecycleRejectedError(
                "not_found_upstream", [FieldError("DeviceToken", "the upstream has no such user")]
            ) from exc
        except UpstreamValidationError as exc:
            raise LifecycleRejectedError("upstream_rejected", exc.errors or [FieldError("Upstream", str(exc))]) from exc

    def _announce(self, change: LifecycleChange, leased: UserRecord) -> None:
        common = {
            "device_token": leased.device_token,
            "client_id": change.client_id,
            "occurred_at": change.occurred_at,
        }
        event: OutcomeEvent
        if change.action is Action.MOVE:
            event = UserMoved(instance=str(change.to_instance), from_instance=leased.instance, **common)
        elif change.action is Action.DEACTIVATE:
            event = UserDeactivated(instance=leased.instance, **common)
        elif change.action is Action.REACTIVATE:
            event = UserReactivated(instance=leased.instance, **common)
        else:
            assert change.update is not None
            fields = sorted(change.update.to_upstream())
            event = UserUpdated(instance=leased.instance, fields=fields, **common)
        self._publish(event)

    def _publish(self, event: OutcomeEvent) -> None:
        try:
            self._publisher.publish(event)
        except Exception:  # noqa: BLE001 - applied and stored; the event is a notification
            logger.exception("could not publish %s", event.detail_type)

    # ----------------------------------------------------------------------------------------- deletion

    def _delete(self, change: LifecycleChange, records: Sequence[UserRecord], instance_id: str) -> ChangeOutcome:
        # A deletion begun (DELETING) by an earlier delivery is finished first, whatever its time.
        for record in records:
            if record.status is UserStatus.DELETING:
                self._finish(change, record)
        done = [r for r in records if r.status.erased and (r.deleted_at or 0) >= change.occurred_at]
        live = next((r for r in records if not r.status.erased), None)
        if done and (live is None or live.status is UserStatus.PENDING):
            # This deletion, or an older one (a duplicate, a redelivery): already final. Its erasure of dead
            # letters is repeated, so a retry after an incomplete erasure completes it.
            tombstone = done[0]
            self._erase(change.client_id, {change.instance, tombstone.instance, *tombstone.moved_from})
            # Announced again: the delivery that deleted it may have ended before its announcement (an incomplete
            # erasure retried, a cut-off), and the deletion must be announced at least once.
            self._publish(
                UserDeleted(
                    device_token=tombstone.device_token,
                    instance=tombstone.instance,
                    client_id=tombstone.client_id or change.client_id,
                    occurred_at=tombstone.deleted_at or change.occurred_at,
                    was_registered=None,
                    duplicate=True,
                )
            )
            return ChangeOutcome("dropped", "duplicate", tombstone.device_token, tombstone.deleted_at)
        if done:
            # A live user next to a newer tombstone registered after that deletion (the registration gate admits
            # no other): a new user, which this older deletion does not name.
            # The ClientId registered again after a deletion newer than this change: not this change's user.
            return ChangeOutcome("dropped", "user_deleted", done[0].device_token, done[0].deleted_at)
        target, placeholder = self._deletion_target(change, live, instance_id)
        try:
            begun = self._records.begin_deletion(
                device_token=target, occurred_at=change.occurred_at, now=self._clock(), placeholder=placeholder
            )
        except ChangeRefusedError as refused:
            if refused.reason == "deleted" and refused.record is not None:
                begun = refused.record  # another delivery began it a moment ago: finish it too
            elif refused.reason == "not_registered":
                raise UserBusyError(f"the registration of {change.key} is in flight: the deletion waits") from None
            else:
                raise UserBusyError(f"deletion of {change.key} could not begin ({refused.reason})") from None
        self._finish(change, begun, was_registered=placeholder is None)
        return ChangeOutcome("applied", device_token=begun.device_token)

    def _deletion_target(
        self, change: LifecycleChange, live: UserRecord | None, instance_id: str
    ) -> tuple[str, Tombstone | None]:
        """The item to turn into the tombstone: the stored user, else where its registration would claim."""
        if live is not None:
            return live.device_token, None
        # Never registered here (or not visible in the index yet): the slot a registration of this ClientId would
        # claim, after the tombstones of earlier deletions. begin_deletion's condition settles a race with it.
        key = self._device_token_key.get()
        slot = device_token_for(instance_id, change.client_id, key=key)
        current = self._records.get(slot)
        while current is not None and current.status.erased:
            slot = successor_device_token(slot, key=key)
            current = self._records.get(slot)
        if current is not None:
            return slot, None
        return slot, Tombstone(slot, change.instance, instance_id, change.client_id)

    def _finish(self, change: LifecycleChange, begun: UserRecord, *, was_registered: bool = True) -> None:
        token = UUID(begun.device_token)
        # Delete upstream; "already gone" (404, or 403 that find confirms) is success in the client.
        self._admin.call(lambda admin: self._upstream.delete_user(admin, token))
        expires_at = int(self._clock()) + self._retention
        self._records.finish_deletion(device_token=begun.device_token, now=self._clock(), expires_at=expires_at)
        logger.info("user deleted", extra={"device_token": begun.device_token})
        # Its letters may name any alias it was known by: the one it was deleted in and those moves took it from.
        self._erase(begun.client_id or change.client_id, {change.instance, begun.instance, *begun.moved_from})
        self._publish(
            UserDeleted(
                device_token=begun.device_token,
                instance=begun.instance,
                client_id=begun.client_id or change.client_id,
                occurred_at=begun.deleted_at or change.occurred_at,
                was_registered=was_registered,
            )
        )

    def _erase(self, client_id: str, instances: set[str]) -> None:
        for instance in sorted(instances):
            self._eraser.erase(instance, client_id)
