"""In-memory stand-ins for the lifecycle flow's outside systems, for unit tests (they do not ship in the layer):
the per-user lifecycle records over :class:`~local.fake_store.InMemoryTokenStore`, the fleet's admin session item,
fixed admin credentials and a dead-letter eraser over a list of bodies."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from local.fake_store import InMemoryTokenStore
from telematics_reg.lifecycle.admin import StoredAdminSession
from telematics_reg.lifecycle.erasure import names_user
from telematics_reg.lifecycle.records import (
    LEASE_PREFIX,
    REGISTERED,
    ChangeRefusedError,
    Moved,
    Tombstone,
    classify_refusal,
)
from telematics_reg.management_models import AdminCredentials, AdminSession
from telematics_reg.store import ConditionFailedError, UserRecord, UserStatus, iso

__all__ = [
    "InMemoryAdminSessionStore",
    "InMemoryLifecycleRecords",
    "RecordingDeadLetterEraser",
    "StaticAdminCredentials",
]


class InMemoryLifecycleRecords:
    """The same conditions over :class:`~local.fake_store.InMemoryTokenStore` (tests)."""

    def __init__(self, store: InMemoryTokenStore) -> None:
        self._store = store
        self._lock: threading.RLock = store._lock
        self.expires_at: dict[str, int] = {}

    def find_all(self, instance: str, client_id: str) -> list[UserRecord]:
        return self._store.find_all_by_client(instance, client_id)

    def get(self, device_token: str) -> UserRecord | None:
        return self._store.get_user(device_token)

    def lease(self, *, device_token: str, occurred_at: int, owner: str, now: float, ttl: int) -> UserRecord:
        with self._lock:
            record = self._store.users.get(device_token)
            ok = (
                record is not None
                and record.status in REGISTERED
                and (record.last_change_at is None or record.last_change_at < occurred_at)
                and (record.lease_expires_at is None or record.lease_expires_at < int(now))
            )
            if not ok:
                raise classify_refusal(record, occurred_at, now)
            assert record is not None
            lapsed = record.lease_owner is not None and not record.lease_owner.startswith(LEASE_PREFIX)
            leased = replace(record, lease_owner=owner, lease_expires_at=int(now) + ttl)
            self._store.users[device_token] = leased
            return replace(leased, lease_lapsed=lapsed)

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
        with self._lock:
            record = self._store.users.get(device_token)
            if record is None or record.lease_owner != owner:
                raise ConditionFailedError("lifecycle commit: lease lost")
            changes: dict[str, Any] = {
                "last_change_at": occurred_at,
                "lease_owner": None,
                "lease_expires_at": None,
                "updated_at": iso(now),
            }
            # The end of a change's lease lets the next sweep queue the user again (records.py, _LEASE_ENDS).
            self._store.queued.pop(device_token, None)
            if deactivated is not None:
                changes["deactivated"] = deactivated
            if refresh_token_dead:
                changes["refresh_token_dead"] = True
            if moved is not None:
                changes |= {"instance": moved.instance, "instance_id": moved.instance_id, "version": record.version + 1}
                if moved.instance != record.instance:
                    changes["moved_from"] = record.moved_from | {record.instance}  # ADD MovedFrom
            self._store.users[device_token] = replace(record, **changes)

    def release(self, *, device_token: str, owner: str, refresh_token_dead: bool = False) -> None:
        with self._lock:
            record = self._store.users.get(device_token)
            if record is not None and record.lease_owner == owner:
                self._store.queued.pop(device_token, None)  # see commit
                self._store.users[device_token] = replace(
                    record,
                    lease_owner=None,
                    lease_expires_at=None,
                    refresh_token_dead=record.refresh_token_dead or refresh_token_dead,
                )

    def begin_deletion(
        self, *, device_token: str, occurred_at: int, now: float, placeholder: Tombstone | None = None
    ) -> UserRecord:
        with self._lock:
            record = self._store.users.get(device_token)
            lapsed_claim = (
                record is not None and record.status is UserStatus.PENDING and (record.claim_expires_at or 0) < int(now)
            )
            if record is None and placeholder is not None:
                record = UserRecord(
                    device_token=placeholder.device_token,
                    instance=placeholder.instance,
                    instance_id=placeholder.instance_id,
                    status=UserStatus.PENDING,
                    version=0,
                    client_id=placeholder.client_id,
                    created_at=iso(now),
                )
            elif record is None or not (record.status in REGISTERED or lapsed_claim):
                raise classify_refusal(record, occurred_at, now)
            tombstone = UserRecord(
                device_token=record.device_token,
                instance=record.instance,
                instance_id=record.instance_id,
                status=UserStatus.DELETING,
                version=record.version + 1,
                client_id=record.client_id,
                created_at=record.created_at,
                updated_at=iso(now),
                last_change_at=occurred_at,
                deleted_at=occurred_at,
                moved_from=record.moved_from,  # kept, as the update that begins the deletion keeps it
            )
            self._store.users[device_token] = tombstone
            return tombstone

    def finish_deletion(self, *, device_token: str, now: float, expires_at: int) -> None:
        with self._lock:
            record = self._store.users.get(device_token)
            if record is None or not record.status.erased:
                raise ChangeRefusedError("not_deleting", record)
            self._store.users[device_token] = replace(record, status=UserStatus.DELETED, updated_at=iso(now))
            self.expires_at[device_token] = expires_at


class InMemoryAdminSessionStore:
    """The same item and conditions in memory (tests)."""

    def __init__(self) -> None:
        self.item: StoredAdminSession | None = None
        self._lock = threading.Lock()

    def get(self) -> StoredAdminSession | None:
        return self.item

    def _version_is(self, version: int | None) -> bool:
        current = self.item.version if self.item is not None and self.item.committed else None
        return current == version

    def lease(self, *, version: int | None, owner: str, now: float, ttl: int) -> StoredAdminSession | None:
        with self._lock:
            item = self.item or StoredAdminSession(version=-1)  # -1: never committed, as in DynamoDB
            if not self._version_is(version):
                return None
            if item.lease_expires_at is not None and item.lease_expires_at >= int(now):
                return None
            lapsed = item.lease_owner is not None
            self.item = replace(item, lease_owner=owner, lease_expires_at=int(now) + ttl, lease_lapsed=False)
            return replace(self.item, lease_lapsed=lapsed)

    def renew_lease(self, *, version: int | None, owner: str, now: float, ttl: int) -> int | None:
        with self._lock:
            if self.item is None or self.item.lease_owner != owner or not self._version_is(version):
                return None
            self.item = replace(self.item, lease_expires_at=int(now) + ttl)
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
        with self._lock:
            if self.item is None or self.item.lease_owner != owner or not self._version_is(version):
                return False
            self.item = StoredAdminSession(
                version=(version or 0) + 1,
                access_token=session.access_token.token.get_secret_value(),
                refresh_token=session.refresh_token.get_secret_value(),
                expires_at=expires_at,
                renew_at=renew_at,
            )
            return True

    def release(self, *, owner: str, login_cause: str | None) -> None:
        with self._lock:
            if self.item is not None and self.item.lease_owner == owner:
                self.item = replace(self.item, lease_owner=None, lease_expires_at=None)
                if login_cause is not None:
                    self.item = replace(self.item, refresh_token_dead=True, login_cause=login_cause)

    def mark_dead(self, *, version: int, login_cause: str) -> bool:
        with self._lock:
            if self.item is None or self.item.version != version:
                return False
            self.item = replace(self.item, refresh_token_dead=True, login_cause=login_cause)
            return True

    def expire(self, *, version: int) -> None:
        with self._lock:
            if self.item is not None and self.item.version == version:
                self.item = replace(self.item, expires_at=0)


class StaticAdminCredentials:
    """Fixed admin credentials (tests and benchmarks)."""

    def __init__(self, credentials: AdminCredentials) -> None:
        self._credentials = credentials

    def get(self) -> AdminCredentials:
        return self._credentials


class RecordingDeadLetterEraser:
    """In memory (tests): erases from a list of bodies."""

    def __init__(self, bodies: list[str] | None = None) -> None:
        self.bodies = bodies if bodies is not None else []
        self.erased: list[tuple[str, str]] = []

    def erase(self, instance: str, client_id: str) -> int:
        before = len(self.bodies)
        self.bodies[:] = [b for b in self.bodies if not names_user(b, instance, client_id)]
        self.erased.append((instance, client_id))
        return before - len(self.bodies)
