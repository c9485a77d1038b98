"""In-memory stand-in for what adoption reads and writes (:class:`~telematics_reg.reconcile.records.AdoptionRecords`),
over :class:`~local.fake_store.InMemoryTokenStore`, with the conditions of the DynamoDB records (unit tests; it does
not ship in the layer)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace

from local.fake_store import InMemoryTokenStore
from telematics_reg.reconcile.records import AdoptedUser, ChunkCall, StoredUser
from telematics_reg.store import (
    BulkProgress,
    ChunkClaim,
    ChunkState,
    ConditionFailedError,
    UserRecord,
    UserStatus,
    iso,
    shard_of,
)

__all__ = ["InMemoryAdoptionRecords"]


class InMemoryAdoptionRecords:
    """Adoption's records over the in-memory token store: its bulks, users, pending chunks and chunk calls."""

    def __init__(self, store: InMemoryTokenStore) -> None:
        self._store = store
        self._lock: threading.RLock = store._lock
        #: ``AdoptedFrom`` of the users put by adoption (the token store's records do not hold it).
        self.adopted_from: dict[str, str] = {}
        #: ``Adoption<n>`` notes: (instance, request id, n) -> the note.
        self.notes: dict[tuple[str, str, int], str] = {}

    def get_bulk(self, instance: str, request_id: str) -> BulkProgress | None:
        with self._lock:
            progress = self._store.bulks.get((instance, request_id))
            if progress is None:
                return None
            return replace(
                progress,
                chunks=dict(progress.chunks),
                stored=dict(progress.stored),
                claims=dict(progress.claims),
                made=dict(progress.made),
                ended=dict(progress.ended),
            )

    def pending_adoptions(self) -> dict[str, int]:
        with self._lock:
            return dict(self._store.pending_adoptions)

    def drop_pending(self, key: str) -> None:
        with self._lock:
            self._store.pending_adoptions.pop(key, None)

    def add_pending(self, key: str, now: float) -> None:
        with self._lock:
            self._store.pending_adoptions.setdefault(key, int(now))

    def chunk_calls(self, instance: str, first_minute: int, last_minute: int) -> list[ChunkCall]:
        calls: list[ChunkCall] = []
        with self._lock:
            for minute in range(first_minute, last_minute + 1):
                for name, since in self._store.chunk_calls.get((instance, minute), {}).items():
                    request_id, _, index = name.rpartition("#")
                    calls.append(ChunkCall(request_id, int(index), since))
        return calls

    def users(self, device_tokens: Sequence[str]) -> dict[str, StoredUser]:
        with self._lock:
            return {
                token: self._stored(record)
                for token in dict.fromkeys(device_tokens)
                if (record := self._store.users.get(token)) is not None
            }

    def _stored(self, record: UserRecord) -> StoredUser:
        return StoredUser(
            device_token=record.device_token,
            instance=record.instance,
            instance_id=record.instance_id,
            status=record.status,
            version=record.version,
            client_id=record.client_id,
            deactivated=record.deactivated,
            bulk_request_id=record.bulk_request_id,
            adopted_from=self.adopted_from.get(record.device_token),
            created_at=record.created_at,
            bulk_chunk=record.bulk_chunk,
        )

    def put_adopted(self, user: AdoptedUser, *, now: float) -> bool:
        with self._lock:
            if user.device_token in self._store.users:
                return False
            self._store.users[user.device_token] = UserRecord(
                device_token=user.device_token,
                instance=user.instance,
                instance_id=user.instance_id,
                status=UserStatus.TOKENLESS,
                version=1,
                bulk_request_id=user.bulk_request_id,
                access_expires_at=user.due_at,
                due_shard=shard_of(user.device_token, self._store.shards),
                created_at=iso(now),
                updated_at=iso(now),
            )
            self.adopted_from[user.device_token] = user.adopted_from
            return True

    def abandon_chunk(self, instance: str, request_id: str, index: int, claim: ChunkClaim, *, now: float) -> None:
        self._store.set_chunk_state(
            instance=instance,
            request_id=request_id,
            index=index,
            expected=[ChunkState.CALLING],
            new=ChunkState.UNKNOWN,
            now=now,
            owner=claim.owner,
        )

    def finish_chunk(self, instance: str, request_id: str, index: int, stored: int, *, now: float) -> bool:
        try:
            self._store.set_chunk_state(
                instance=instance,
                request_id=request_id,
                index=index,
                expected=[ChunkState.UNKNOWN],
                new=ChunkState.DONE,
                stored=stored,
                now=now,
            )
        except ConditionFailedError:
            return False
        return True

    def reopen_chunk(self, instance: str, request_id: str, index: int, claim: ChunkClaim, *, now: float) -> bool:
        with self._lock:
            progress = self._store.bulks.get((instance, request_id))
            if (
                progress is None
                or progress.chunks.get(index) is not ChunkState.UNKNOWN
                or progress.claims.get(index) != claim
                or index in progress.made
            ):
                return False
            progress.chunks[index] = ChunkState.TODO
            progress.claims.pop(index, None)
            progress.ended.pop(index, None)
            return True

    def note_chunk(self, instance: str, request_id: str, index: int, note: str, *, now: float) -> None:
        with self._lock:
            if (instance, request_id) in self._store.bulks:
                self.notes[(instance, request_id, index)] = note
