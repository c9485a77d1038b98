"""An in-memory :class:`~telematics_reg.store.TokenStore` with the same conditions as the DynamoDB one.

For unit tests of the services: no I/O, thread-safe, and able to fail the next N writes on demand.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from telematics_reg.store import (
    BulkProgress,
    ChunkClaim,
    ChunkState,
    ConditionFailedError,
    DuePage,
    NewUser,
    StoreError,
    Tokens,
    UserRecord,
    UserStatus,
    chunk_key,
    iso,
    pending_key,
    prefer_live,
    shard_of,
)


class InMemoryTokenStore:
    def __init__(self, *, shards: int = 8) -> None:
        self.shards = shards
        self.users: dict[str, UserRecord] = {}
        self.bulks: dict[tuple[str, str], BulkProgress] = {}
        self._lock = threading.RLock()
        self.fail_next_commits = 0
        self.queued: dict[str, tuple[int, int]] = {}
        #: As ``ADOPTIONS#PENDING``: chunks moved to UNKNOWN (``pending_key``) -> epoch s.
        self.pending_adoptions: dict[str, int] = {}
        #: As ``CHUNKCALLS#``: (instance, epoch minute) -> {``<RequestId>#<n>``: the claim's epoch s}.
        self.chunk_calls: dict[tuple[str, int], dict[str, int]] = {}

    def get_user(self, device_token: str) -> UserRecord | None:
        with self._lock:
            return self.users.get(device_token)

    def find_by_client(self, instance: str, client_id: str) -> UserRecord | None:
        return prefer_live(self.find_all_by_client(instance, client_id))

    def find_all_by_client(self, instance: str, client_id: str) -> list[UserRecord]:
        with self._lock:
            return [u for u in self.users.values() if u.instance == instance and u.client_id == client_id]

    def claim_registration(
        self,
        *,
        device_token: str,
        instance: str,
        instance_id: str,
        client_id: str,
        owner: str,
        now: float,
        ttl: int,
    ) -> UserRecord | None:
        with self._lock:
            current = self.users.get(device_token)
            expired_claim = (
                current is not None
                and current.status is UserStatus.PENDING
                and (current.claim_expires_at or 0) < int(now)
            )
            if current is not None and not expired_claim:
                return None
            record = UserRecord(
                device_token=device_token,
                instance=instance,
                instance_id=instance_id,
                status=UserStatus.PENDING,
                version=0,
                client_id=client_id,
                claim_owner=owner,
                claim_expires_at=int(now) + ttl,
                created_at=iso(now),
                updated_at=iso(now),
            )
            self.users[device_token] = record
            return record

    def complete_registration(self, *, device_token: str, owner: str, tokens: Tokens | None, now: float) -> UserRecord:
        with self._lock:
            current = self.users.get(device_token)
            if current is None or current.status is not UserStatus.PENDING or current.claim_owner != owner:
                raise ConditionFailedError("complete_registration: claim lost")
            record = replace(
                current,
                version=1,
                claim_owner=None,
                claim_expires_at=None,
                updated_at=iso(now),
                status=UserStatus.TOKENLESS if tokens is None else UserStatus.ACTIVE,
            )
            if tokens is not None:
                record = replace(
                    record,
                    access_token=tokens.access_token,
                    refresh_token=tokens.refresh_token,
                    access_expires_at=tokens.expires_at,
                    due_shard=shard_of(device_token, self.shards),
                )
            self.users[device_token] = record
            return record

    def release_claim(self, *, device_token: str, owner: str) -> None:
        with self._lock:
            current = self.users.get(device_token)
            if current and current.status is UserStatus.PENDING and current.claim_owner == owner:
                del self.users[device_token]

    def put_new_users(self, users: Sequence[NewUser], *, now: float) -> None:
        with self._lock:
            for user in users:
                tokens = user.tokens
                self.users[user.device_token] = UserRecord(
                    device_token=user.device_token,
                    instance=user.instance,
                    instance_id=user.instance_id,
                    status=UserStatus.ACTIVE if tokens else UserStatus.TOKENLESS,
                    version=1,
                    client_id=user.client_id,
                    bulk_request_id=user.bulk_request_id,
                    bulk_chunk=user.bulk_chunk,
                    access_token=tokens.access_token if tokens else None,
                    refresh_token=tokens.refresh_token if tokens else None,
                    access_expires_at=tokens.expires_at if tokens else None,
                    due_shard=shard_of(user.device_token, self.shards) if tokens else None,
                    created_at=iso(now),
                    updated_at=iso(now),
                )

    def start_bulk(self, *, instance: str, request_id: str, quantity: int, chunk_size: int, now: float) -> BulkProgress:
        with self._lock:
            key = (instance, request_id)
            if key not in self.bulks:
                count = -(-quantity // chunk_size)
                self.bulks[key] = BulkProgress(
                    instance,
                    request_id,
                    quantity,
                    chunk_size,
                    dict.fromkeys(range(count), ChunkState.TODO),
                    {},
                )
            progress = self.bulks[key]
            return replace(
                progress,
                chunks=dict(progress.chunks),
                stored=dict(progress.stored),
                claims=dict(progress.claims),
                made=dict(progress.made),
                ended=dict(progress.ended),
            )

    def set_chunk_state(
        self,
        *,
        instance: str,
        request_id: str,
        index: int,
        expected: Iterable[ChunkState],
        new: ChunkState,
        stored: int | None = None,
        now: float,
        owner: str | None = None,
    ) -> None:
        with self._lock:
            progress = self.bulks[(instance, request_id)]
            state = progress.chunks[index]
            if state not in set(expected):
                raise ConditionFailedError("set_chunk_state: chunk moved on")
            claim = progress.claims.get(index)
            if owner is not None and state is ChunkState.CALLING and (claim is None or claim.owner != owner):
                raise ConditionFailedError("set_chunk_state: chunk called by another delivery")
            progress.chunks[index] = new
            if stored is not None:
                progress.stored[index] = stored
            if new is ChunkState.UNKNOWN:
                # As in DynamoDB: the claim stays and the end of the call is noted (its window, for adoption).
                progress.ended[index] = int(now)
                self.pending_adoptions.setdefault(pending_key(instance, request_id, index), int(now))
            elif new is not ChunkState.CALLING:
                progress.claims.pop(index, None)

    def claim_chunk(
        self,
        *,
        instance: str,
        request_id: str,
        index: int,
        owner: str,
        now: float,
        abandoned: ChunkClaim | None = None,
    ) -> None:
        with self._lock:
            # As in DynamoDB: every call is on record before its claim.
            self.chunk_calls.setdefault((instance, int(now) // 60), {})[chunk_key(request_id, index)] = int(now)
            progress = self.bulks[(instance, request_id)]
            state = progress.chunks[index]
            if abandoned is None:
                if state is not ChunkState.TODO:
                    raise ConditionFailedError("claim_chunk: chunk is not TODO")
            elif state is not ChunkState.CALLING or progress.claims.get(index) != abandoned:
                raise ConditionFailedError("claim_chunk: the abandoned claim moved on")
            progress.chunks[index] = ChunkState.CALLING
            progress.claims[index] = ChunkClaim(owner, int(now))

    def make_chunk_per_user(self, *, instance: str, request_id: str, index: int, owner: str) -> int:
        with self._lock:
            progress = self.bulks[(instance, request_id)]
            claim = progress.claims.get(index)
            if progress.chunks[index] is not ChunkState.CALLING or claim is None or claim.owner != owner:
                raise ConditionFailedError("make_chunk_per_user: chunk not ours")
            return progress.made.setdefault(index, 0)

    def store_chunk_user(
        self, *, instance: str, request_id: str, index: int, owner: str, position: int, user: NewUser, now: float
    ) -> None:
        with self._lock:
            progress = self.bulks[(instance, request_id)]
            claim = progress.claims.get(index)
            if (
                claim is not None
                and claim.owner == owner
                and progress.made.get(index) == position + 1
                and user.device_token in self.users
            ):
                return  # a retry of a write that landed (see DynamoTokenStore._chunk_user_already_stored)
            if (
                progress.chunks[index] is not ChunkState.CALLING
                or claim is None
                or claim.owner != owner
                or progress.made.get(index) != position
                or user.device_token in self.users
            ):
                raise ConditionFailedError("store_chunk_user: chunk taken over or user stored")
            self.put_new_users([user], now=now)
            progress.made[index] = position + 1

    def query_due(self, *, shard: str, horizon: int, limit: int, start_key: dict[str, Any] | None = None) -> DuePage:
        with self._lock:
            due = sorted(
                (
                    u
                    for u in self.users.values()
                    if u.due_shard == shard and u.access_expires_at is not None and u.access_expires_at <= horizon
                ),
                key=lambda u: (u.access_expires_at or 0, u.device_token),
            )
        offset = int(start_key["offset"]) if start_key else 0
        page = due[offset : offset + limit]
        next_key = {"offset": offset + limit} if offset + limit < len(due) else None
        return DuePage(page, next_key, len(page))

    def mark_queued(self, *, device_token: str, version: int, until: int, now: float) -> bool:
        with self._lock:
            current = self.users.get(device_token)
            if current is None or current.version != version:
                return False
            previous = self.queued.get(device_token)
            if previous is not None and previous[1] >= int(now):
                return False
            self.queued[device_token] = (version, until)
            return True

    def acquire_lease(
        self,
        *,
        device_token: str,
        version: int,
        owner: str,
        now: float,
        ttl: int,
        reactivate: bool = False,
        due_by: int | None = None,
    ) -> UserRecord | None:
        allowed = {UserStatus.ACTIVE, UserStatus.TOKENLESS} | ({UserStatus.NEEDS_RELOGIN} if reactivate else set())
        with self._lock:
            current = self.users.get(device_token)
            if (
                current is None
                or current.version != version
                or current.status not in allowed
                or (current.lease_expires_at is not None and current.lease_expires_at >= int(now))
            ):
                return None
            if due_by is not None and current.status is not UserStatus.TOKENLESS:
                expires_at = current.access_expires_at
                if expires_at is None or expires_at > due_by:
                    return None
                if current.retry_after is not None and current.retry_after > int(now):
                    return None
            record = replace(current, lease_owner=owner, lease_expires_at=int(now) + ttl)
            self.users[device_token] = record
            return replace(record, lease_lapsed=current.lease_owner is not None)

    def renew_lease(self, *, device_token: str, version: int, owner: str, now: float, ttl: int) -> int | None:
        with self._lock:
            current = self.users.get(device_token)
            if current is None or current.version != version or current.lease_owner != owner:
                return None
            until = int(now) + ttl
            self.users[device_token] = replace(current, lease_expires_at=until)
            return until

    def commit_tokens(
        self, *, device_token: str, expected_version: int, owner: str, tokens: Tokens, now: float
    ) -> UserRecord:
        with self._lock:
            if self.fail_next_commits > 0:
                self.fail_next_commits -= 1
                raise StoreError("injected commit failure")
            current = self.users.get(device_token)
            if current is None or current.version != expected_version or current.lease_owner != owner:
                raise ConditionFailedError("commit_tokens: version moved on or lease lost")
            record = replace(
                current,
                access_token=tokens.access_token,
                refresh_token=tokens.refresh_token,
                access_expires_at=tokens.expires_at,
                version=expected_version + 1,
                status=UserStatus.ACTIVE,
                due_shard=shard_of(device_token, self.shards),
                lease_owner=None,
                lease_expires_at=None,
                retry_after=None,
                last_error=None,
                refresh_token_dead=False,
                updated_at=iso(now),
            )
            self.users[device_token] = record
            self.queued.pop(device_token, None)
            return record

    def mark_refresh_token_dead(self, *, device_token: str, version: int, reason: str, now: float) -> bool:
        with self._lock:
            current = self.users.get(device_token)
            if current is None or current.version != version:
                return False
            self.users[device_token] = replace(
                current, refresh_token_dead=True, last_error=reason[:500], updated_at=iso(now)
            )
            return True

    def release_lease(
        self,
        *,
        device_token: str,
        owner: str,
        retry_after: int | None,
        error: str | None,
        now: float,
        refresh_token_dead: bool = False,
    ) -> None:
        with self._lock:
            current = self.users.get(device_token)
            if current is None or current.lease_owner != owner:
                return
            self.queued.pop(device_token, None)
            self.users[device_token] = replace(
                current,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=iso(now),
                retry_after=retry_after if retry_after is not None else current.retry_after,
                last_error=error[:500] if error is not None else current.last_error,
                refresh_token_dead=current.refresh_token_dead or refresh_token_dead,
            )

    def mark_needs_relogin(
        self, *, device_token: str, expected_version: int, owner: str, reason: str, now: float
    ) -> None:
        with self._lock:
            current = self.users.get(device_token)
            if current is None or current.version != expected_version or current.lease_owner != owner:
                raise ConditionFailedError("mark_needs_relogin: version moved on or lease lost")
            self.queued.pop(device_token, None)
            self.users[device_token] = replace(
                current,
                status=UserStatus.NEEDS_RELOGIN,
                last_error=reason[:500],
                due_shard=None,
                lease_owner=None,
                lease_expires_at=None,
                retry_after=None,
                version=expected_version + 1,
                updated_at=iso(now),
            )
