"""The token store: one DynamoDB item per upstream user, and the claim, lease and version that keep it safe.

Item shape (see README "Token store") -- partition key ``pk``:

``USER#<DeviceToken>``
    ``DeviceToken``, ``Instance`` (alias), ``InstanceId``, ``ClientId``, ``ClientKey`` (``<Instance>#<ClientId>``,
    key of the ``ByClient`` index), ``Status``, ``Version``, ``AccessToken``, ``AccessExpiresAt`` (epoch s),
    ``RefreshToken``, ``DueShard`` (only while the token must be kept fresh: key of the sparse ``RefreshDue``
    index, sorted by ``AccessExpiresAt``), ``ClaimOwner``/``ClaimExpiresAt`` (registration in flight),
    ``LeaseOwner``/``LeaseExpiresAt`` (refresh in flight), ``RetryAfter``, ``LastError``, ``RefreshTokenDead`` (the
    stored refresh token was rejected or may be spent: the next attempt logs in instead), ``BulkRequestId``,
    ``BulkChunk`` (``<RequestId>#<n>``: the chunk of the bulk whose call made the user; adoption counts a lost
    chunk's users already stored by it), ``MovedFrom`` (string set: the aliases lifecycle moves took the user from,
    so a change still addressed to one of them finds it), ``CreatedAt``, ``UpdatedAt``.
``BULK#<Instance>#<RequestId>``
    progress of one bulk request: ``Quantity``, ``ChunkSize``, ``ChunkCount`` and per chunk ``Chunk<n>`` state,
    ``Stored<n>`` (users stored once DONE), ``Owner<n>``/``Since<n>`` (who is calling it, since when: epoch s) and,
    for a chunk made one Create per user, ``Made<n>`` (how many of its users are made and stored, in order). An
    UNKNOWN chunk keeps ``Owner<n>``/``Since<n>`` and gets ``Ended<n>``: the window of the call whose outcome is
    unknown, which adoption (:mod:`telematics_reg.reconcile`) lists the upstream's users in.
``CHUNKCALLS#<Instance>#<minute>``
    one attribute ``<RequestId>#<n>`` (the claim's epoch s) per chunk claimed in that minute, and ``ExpiresAt``
    (TTL): every CreateMany call of the instance, so that adoption can tell when another chunk's call overlapped.
``ADOPTIONS#PENDING``
    one attribute ``<Instance>#<RequestId>#<n>`` (epoch s) per chunk moved to UNKNOWN: what the reconcile function
    tries to adopt.

Every write that can race is conditional; the conditions are spelled out above each write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from telematics_reg.errors import TelematicsError


class UserStatus(StrEnum):
    PENDING = "PENDING"  # claimed: a Create is in flight
    ACTIVE = "ACTIVE"  # tokens stored and kept fresh
    TOKENLESS = "TOKENLESS"  # registered with CreateAccessToken=false: tokens come by Login when first needed
    NEEDS_RELOGIN = "NEEDS_RELOGIN"  # refresh and Login both failed; announced, out of the refresh index
    GONE = "GONE"  # the drift audit found it no longer upstream (telematics_reg.reconcile): announced, out of the index

    # Lifecycle (telematics_reg.lifecycle): a deletion in progress, then its tombstone. Neither holds a token or a
    # profile field; neither is in the refresh index; a registration that occurred before it never replaces it.
    DELETING = "DELETING"  # tokens gone here; the upstream delete may still be due
    DELETED = "DELETED"  # the tombstone: ids and the deletion time, expired by TTL (``ExpiresAt``)

    @property
    def erased(self) -> bool:
        return self in (UserStatus.DELETING, UserStatus.DELETED)


class ChunkState(StrEnum):
    TODO = "TODO"  # nothing in flight (with ``Made<n>``: that many of its users made and stored, the rest to do)
    CALLING = "CALLING"  # ``Owner<n>`` is calling it (since ``Since<n>``): its outcome is unknown until DONE
    DONE = "DONE"
    UNKNOWN = "UNKNOWN"  # the answer was lost: never called again, reported; its call window kept for adoption
    FAILED = "FAILED"  # the upstream rejected it permanently


class StoreError(TelematicsError):
    """DynamoDB failed (throttled, unavailable); the operation may be retried."""


class ConditionFailedError(TelematicsError):
    """A conditional write lost a race: the item is not in the state the writer expected."""


@dataclass(frozen=True)
class Tokens:
    """A token pair and the access token's absolute expiry (epoch seconds)."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at: int


@dataclass(frozen=True)
class UserRecord:
    device_token: str
    instance: str
    instance_id: str
    status: UserStatus
    version: int
    client_id: str | None = None
    access_token: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    access_expires_at: int | None = None
    due_shard: str | None = None
    claim_owner: str | None = None
    claim_expires_at: int | None = None
    lease_owner: str | None = None
    lease_expires_at: int | None = None
    retry_after: int | None = None
    last_error: str | None = None
    #: The stored refresh token was rejected, or may have been spent by a call whose answer was lost: never present
    #: it again (a second rejection, or a reuse the upstream may treat as theft); the next attempt goes to Login.
    refresh_token_dead: bool = False
    #: Set (not stored) by ``acquire_lease`` when it took over a lease that had lapsed: its holder died or stalled
    #: mid-refresh, perhaps after the upstream rotated the pair and before the commit, so the stored refresh token
    #: may be spent. Treated like ``refresh_token_dead``: the refresh goes to Login instead of replaying it.
    lease_lapsed: bool = False
    bulk_request_id: str | None = None
    #: ``<RequestId>#<n>`` (:func:`chunk_key`): the bulk chunk whose call made this user.
    bulk_chunk: str | None = None
    created_at: str = ""
    updated_at: str = ""
    #: Lifecycle: when the last change applied to this user occurred (epoch ms), the per-user order marker.
    last_change_at: int | None = None
    #: Lifecycle: the user is deactivated upstream (its tokens are still kept fresh: see README "User lifecycle").
    deactivated: bool = False
    #: Lifecycle: when the deletion occurred (epoch ms), on DELETING / DELETED items.
    deleted_at: int | None = None
    #: Lifecycle: the instance aliases moves took the user from (``ClientKey`` names only the current one).
    moved_from: frozenset[str] = frozenset()

    @property
    def tokens(self) -> Tokens | None:
        if self.access_token and self.refresh_token and self.access_expires_at is not None:
            return Tokens(self.access_token, self.refresh_token, self.access_expires_at)
        return None


@dataclass(frozen=True)
class NewUser:
    """A user to store as registered (CreateMany results, whose DeviceTokens are new)."""

    device_token: str
    instance: str
    instance_id: str
    tokens: Tokens | None
    bulk_request_id: str | None = None
    client_id: str | None = None
    #: ``<RequestId>#<n>`` of the chunk that made it: how adoption tells a lost chunk's stored users from others'.
    bulk_chunk: str | None = None


@dataclass(frozen=True)
class ChunkClaim:
    """Who is calling a bulk chunk, and since when (epoch seconds, by the caller's clock)."""

    owner: str
    since: int


@dataclass(frozen=True)
class BulkProgress:
    instance: str
    request_id: str
    quantity: int
    chunk_size: int
    chunks: dict[int, ChunkState]
    stored: dict[int, int]
    #: The claim of each CALLING chunk.
    claims: dict[int, ChunkClaim] = field(default_factory=dict)
    #: Chunks made one Create per user (CreateMany not offered): how many of their users are made and stored.
    made: dict[int, int] = field(default_factory=dict)
    #: UNKNOWN chunks: when they were judged so (epoch s); with their claim's ``since``, the call's window.
    ended: dict[int, int] = field(default_factory=dict)

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    def chunk_quantity(self, index: int) -> int:
        return min(self.chunk_size, self.quantity - index * self.chunk_size)


@dataclass
class DuePage:
    users: list[UserRecord]
    next_key: dict[str, Any] | None
    items_read: int


def user_pk(device_token: str) -> str:
    return f"USER#{device_token}"


def bulk_pk(instance: str, request_id: str) -> str:
    return f"BULK#{instance}#{request_id}"


#: Chunks moved to UNKNOWN, waiting for adoption (one attribute per chunk).
ADOPTIONS_PK = "ADOPTIONS#PENDING"
#: How long the record of a chunk's call is kept (the table's TTL removes it).
CHUNK_CALL_RETENTION_SECONDS = 14 * 86400


def chunk_calls_pk(instance: str, minute: int) -> str:
    """The item recording the chunk calls of ``instance`` claimed in epoch minute ``minute``."""
    return f"CHUNKCALLS#{instance}#{minute}"


def chunk_key(request_id: str, index: int) -> str:
    """``<RequestId>#<n>``: names chunk ``n`` of a bulk (in ``CHUNKCALLS#``, ``BulkChunk`` and ``AdoptedFrom``)."""
    return f"{request_id}#{index}"


def pending_key(instance: str, request_id: str, index: int) -> str:
    """The attribute of :data:`ADOPTIONS_PK` naming one chunk waiting for adoption (JSON: aliases and request ids
    may hold any character)."""
    return json.dumps([instance, request_id, index], separators=(",", ":"))


def client_key(instance: str, client_id: str) -> str:
    return f"{instance}#{client_id}"


def shard_of(device_token: str, shards: int) -> str:
    """Stable shard of the refresh index for a user (spreads the hot 'due soon' range over partitions)."""
    digest = hashlib.sha256(device_token.encode()).digest()
    return f"{int.from_bytes(digest[:4], 'big') % shards:03d}"


def prefer_live(records: Sequence[UserRecord]) -> UserRecord | None:
    """The live record among ``records``, else the most recent tombstone (``None`` for none)."""
    live = [r for r in records if not r.status.erased]
    if live:
        return live[0]
    return max(records, key=lambda r: r.deleted_at or 0, default=None)


def iso(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")


class TokenStore(Protocol):
    """Storage of registered users and their tokens. Implementations: DynamoDB, and in memory for tests."""

    shards: int

    def get_user(self, device_token: str) -> UserRecord | None: ...
    def find_by_client(self, instance: str, client_id: str) -> UserRecord | None: ...
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
    ) -> UserRecord | None: ...
    def complete_registration(
        self, *, device_token: str, owner: str, tokens: Tokens | None, now: float
    ) -> UserRecord: ...
    def release_claim(self, *, device_token: str, owner: str) -> None: ...
    def put_new_users(self, users: Sequence[NewUser], *, now: float) -> None: ...
    def start_bulk(
        self, *, instance: str, request_id: str, quantity: int, chunk_size: int, now: float
    ) -> BulkProgress: ...
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
    ) -> None: ...
    def claim_chunk(
        self,
        *,
        instance: str,
        request_id: str,
        index: int,
        owner: str,
        now: float,
        abandoned: ChunkClaim | None = None,
    ) -> None: ...
    def make_chunk_per_user(self, *, instance: str, request_id: str, index: int, owner: str) -> int: ...
    def store_chunk_user(
        self, *, instance: str, request_id: str, index: int, owner: str, position: int, user: NewUser, now: float
    ) -> None: ...
    def query_due(
        self, *, shard: str, horizon: int, limit: int, start_key: dict[str, Any] | None = None
    ) -> DuePage: ...
    def mark_queued(self, *, device_token: str, version: int, until: int, now: float) -> bool: ...
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
    ) -> UserRecord | None: ...
    def renew_lease(self, *, device_token: str, version: int, owner: str, now: float, ttl: int) -> int | None: ...
    def commit_tokens(
        self, *, device_token: str, expected_version: int, owner: str, tokens: Tokens, now: float
    ) -> UserRecord: ...
    def mark_refresh_token_dead(self, *, device_token: str, version: int, reason: str, now: float) -> bool: ...
    def release_lease(
        self,
        *,
        device_token: str,
        owner: str,
        retry_after: int | None,
        error: str | None,
        now: float,
        refresh_token_dead: bool = False,
    ) -> None: ...
    def mark_needs_relogin(
        self, *, device_token: str, expected_version: int, owner: str, reason: str, now: float
    ) -> None: ...


# ------------------------------------------------------------------------------------------------- DynamoDB


_serializer = TypeSerializer()
_deserializer = TypeDeserializer()

_USER_ATTRS = {
    "DeviceToken": "device_token",
    "Instance": "instance",
    "InstanceId": "instance_id",
    "Status": "status",
    "Version": "version",
    "ClientId": "client_id",
    "AccessToken": "access_token",
    "RefreshToken": "refresh_token",
    "AccessExpiresAt": "access_expires_at",
    "DueShard": "due_shard",
    "ClaimOwner": "claim_owner",
    "ClaimExpiresAt": "claim_expires_at",
    "LeaseOwner": "lease_owner",
    "LeaseExpiresAt": "lease_expires_at",
    "RetryAfter": "retry_after",
    "LastError": "last_error",
    "RefreshTokenDead": "refresh_token_dead",
    "BulkRequestId": "bulk_request_id",
    "BulkChunk": "bulk_chunk",
    "CreatedAt": "created_at",
    "UpdatedAt": "updated_at",
    "LastChangeAt": "last_change_at",
    "Deactivated": "deactivated",
    "DeletedAt": "deleted_at",
    "MovedFrom": "moved_from",
}
_INT_FIELDS = {
    "version",
    "access_expires_at",
    "claim_expires_at",
    "lease_expires_at",
    "retry_after",
    "last_change_at",
    "deleted_at",
}


def _to_item(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _serializer.serialize(v) for k, v in values.items() if v is not None}


def _from_item(item: dict[str, Any]) -> dict[str, Any]:
    return {k: _deserializer.deserialize(v) for k, v in item.items()}


def _record(values: dict[str, Any]) -> UserRecord:
    kwargs: dict[str, Any] = {}
    for attr, name in _USER_ATTRS.items():
        if attr in values:
            value = values[attr]
            kwargs[name] = int(value) if name in _INT_FIELDS else value
    if "moved_from" in kwargs:
        kwargs["moved_from"] = frozenset(str(alias) for alias in kwargs["moved_from"])
    kwargs["status"] = UserStatus(kwargs["status"])
    return UserRecord(**kwargs)


def _is_condition_failure(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in {
        "ConditionalCheckFailedException",
        "TransactionCanceledException",
    }


class DynamoTokenStore:
    """:class:`TokenStore` on one DynamoDB table (see the module docstring for the item shape).

    ``client`` is a low-level boto3 DynamoDB client: unlike resources, clients are thread-safe, and the queue
    function registers a batch's records on several threads.
    """

    def __init__(self, client: Any, *, table_name: str, shards: int = 8) -> None:
        self._client = client
        self._table = table_name
        self.shards = shards

    # -- helpers

    def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        try:
            result: dict[str, Any] = getattr(self._client, operation)(TableName=self._table, **kwargs)
        except ClientError as exc:
            if _is_condition_failure(exc):
                raise ConditionFailedError(f"{operation}: condition not met") from None
            code = exc.response.get("Error", {}).get("Code", "Unknown")
            raise StoreError(f"DynamoDB {operation} failed: {code}") from exc
        return result

    def _update(
        self,
        pk: str,
        expression: str,
        condition: str,
        values: dict[str, Any],
        names: dict[str, str] | None = None,
        *,
        return_new: bool = False,
        return_old: bool = False,
    ) -> dict[str, Any] | None:
        kwargs: dict[str, Any] = {
            "Key": {"pk": {"S": pk}},
            "UpdateExpression": expression,
            "ConditionExpression": condition,
            "ExpressionAttributeValues": _to_item(values),
        }
        if names:
            kwargs["ExpressionAttributeNames"] = names
        if return_new or return_old:
            kwargs["ReturnValues"] = "ALL_NEW" if return_new else "ALL_OLD"
        response = self._call("update_item", **kwargs)
        # ALL_OLD of an item the update creates is no item at all: {}.
        return _from_item(response.get("Attributes", {})) if return_new or return_old else None

    @staticmethod
    def _record_of(values: dict[str, Any]) -> UserRecord:
        """A user item (deserialized) as a :class:`UserRecord` (for the lifecycle's writes on the same items)."""
        return _record(values)

    def _note(self, pk: str, expression: str, values: dict[str, Any], names: dict[str, str]) -> None:
        """An unconditional update of a bookkeeping item (created if missing)."""
        self._call(
            "update_item",
            Key={"pk": {"S": pk}},
            UpdateExpression=expression,
            ExpressionAttributeValues=_to_item(values),
            ExpressionAttributeNames=names,
        )

    # -- reads

    def get_user(self, device_token: str) -> UserRecord | None:
        response = self._call("get_item", Key={"pk": {"S": user_pk(device_token)}}, ConsistentRead=True)
        item = response.get("Item")
        return _record(_from_item(item)) if item else None

    def find_by_client(self, instance: str, client_id: str) -> UserRecord | None:
        """The user of (Instance, ClientId): the live one if any, else its latest tombstone (a ClientId deleted
        and registered again has both)."""
        return prefer_live(self.find_all_by_client(instance, client_id))

    def find_all_by_client(self, instance: str, client_id: str) -> list[UserRecord]:
        """Every item of (Instance, ClientId): at most one live user, and the tombstones of deleted ones."""
        response = self._call(
            "query",
            IndexName="ByClient",
            KeyConditionExpression="ClientKey = :k",
            ExpressionAttributeValues={":k": {"S": client_key(instance, client_id)}},
            Limit=50,
        )
        # The index is eventually consistent: re-read each item itself.
        found = (self.get_user(str(_from_item(item)["DeviceToken"])) for item in response.get("Items", []))
        return [record for record in found if record is not None]

    # -- registration

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
        """Claim the right to call Create for this user; ``None`` if someone else holds the user.

        Condition: the item does not exist, or it is a claim (PENDING) whose holder's time ran out (its
        Lambda crashed or timed out). A registered user is never claimed again.
        """
        stamp = iso(now)
        values = {
            "pk": user_pk(device_token),
            "Kind": "user",
            "DeviceToken": device_token,
            "Instance": instance,
            "InstanceId": instance_id,
            "ClientId": client_id,
            "ClientKey": client_key(instance, client_id),
            "Status": UserStatus.PENDING.value,
            "Version": 0,
            "ClaimOwner": owner,
            "ClaimExpiresAt": int(now) + ttl,
            "CreatedAt": stamp,
            "UpdatedAt": stamp,
        }
        try:
            self._call(
                "put_item",
                Item=_to_item(values),
                ConditionExpression="attribute_not_exists(pk) OR (#s = :pending AND ClaimExpiresAt < :now)",
                ExpressionAttributeNames={"#s": "Status"},
                ExpressionAttributeValues={":pending": {"S": "PENDING"}, ":now": {"N": str(int(now))}},
            )
        except ConditionFailedError:
            return None
        return _record(values)

    def complete_registration(self, *, device_token: str, owner: str, tokens: Tokens | None, now: float) -> UserRecord:
        """Store the Create result. Condition: we still hold the claim (it was not taken over after expiry)."""
        values: dict[str, Any] = {":owner": owner, ":pending": "PENDING", ":now": iso(now), ":one": 1}
        sets = ["UpdatedAt = :now", "Version = :one"]
        if tokens is None:
            values[":s"] = UserStatus.TOKENLESS.value
            sets.append("#s = :s")
        else:
            values |= {
                ":s": UserStatus.ACTIVE.value,
                ":at": tokens.access_token,
                ":rt": tokens.refresh_token,
                ":exp": tokens.expires_at,
                ":shard": shard_of(device_token, self.shards),
            }
            sets += [
                "#s = :s",
                "AccessToken = :at",
                "RefreshToken = :rt",
                "AccessExpiresAt = :exp",
                "DueShard = :shard",
            ]
        attrs = self._update(
            user_pk(device_token),
            "SET " + ", ".join(sets) + " REMOVE ClaimOwner, ClaimExpiresAt",
            "#s = :pending AND ClaimOwner = :owner",
            values,
            {"#s": "Status"},
            return_new=True,
        )
        assert attrs is not None
        return _record(attrs)

    def release_claim(self, *, device_token: str, owner: str) -> None:
        """Give the user back (the Create was rejected, so no upstream user exists). Only our own claim."""
        with contextlib.suppress(ConditionFailedError):
            self._call(
                "delete_item",
                Key={"pk": {"S": user_pk(device_token)}},
                ConditionExpression="#s = :pending AND ClaimOwner = :owner",
                ExpressionAttributeNames={"#s": "Status"},
                ExpressionAttributeValues={":pending": {"S": "PENDING"}, ":owner": {"S": owner}},
            )

    def put_new_users(self, users: Sequence[NewUser], *, now: float) -> None:
        """Store users CreateMany returned. Their DeviceTokens are new, so a plain batch write cannot clobber."""
        requests = [{"PutRequest": {"Item": _to_item(self._new_user_values(u, now))}} for u in users]
        for start in range(0, len(requests), 25):
            pending: list[dict[str, Any]] = requests[start : start + 25]
            for attempt in range(8):
                response = self._batch_write(pending)
                pending = response.get("UnprocessedItems", {}).get(self._table, [])
                if not pending:
                    break
                time.sleep(min(2.0, 0.05 * 2**attempt))
            if pending:
                raise StoreError(f"{len(pending)} users could not be written after retries")

    def _batch_write(self, requests: list[dict[str, Any]]) -> dict[str, Any]:
        try:
            result: dict[str, Any] = self._client.batch_write_item(RequestItems={self._table: requests})
        except ClientError as exc:
            raise StoreError(f"DynamoDB batch_write_item failed: {exc.response.get('Error', {}).get('Code')}") from exc
        return result

    def _new_user_values(self, user: NewUser, now: float) -> dict[str, Any]:
        stamp = iso(now)
        values: dict[str, Any] = {
            "pk": user_pk(user.device_token),
            "Kind": "user",
            "DeviceToken": user.device_token,
            "Instance": user.instance,
            "InstanceId": user.instance_id,
            "ClientId": user.client_id,
            "ClientKey": client_key(user.instance, user.client_id) if user.client_id else None,
            "BulkRequestId": user.bulk_request_id,
            "BulkChunk": user.bulk_chunk,
            "Version": 1,
            "CreatedAt": stamp,
            "UpdatedAt": stamp,
        }
        if user.tokens is None:
            values["Status"] = UserStatus.TOKENLESS.value
        else:
            values |= {
                "Status": UserStatus.ACTIVE.value,
                "AccessToken": user.tokens.access_token,
                "RefreshToken": user.tokens.refresh_token,
                "AccessExpiresAt": user.tokens.expires_at,
                "DueShard": shard_of(user.device_token, self.shards),
            }
        return values

    # -- bulk progress

    def start_bulk(self, *, instance: str, request_id: str, quantity: int, chunk_size: int, now: float) -> BulkProgress:
        """Create the progress record of a bulk request, or read the existing one (a redelivery)."""
        chunk_count = -(-quantity // chunk_size)
        values: dict[str, Any] = {
            "pk": bulk_pk(instance, request_id),
            "Kind": "bulk",
            "Instance": instance,
            "RequestId": request_id,
            "Quantity": quantity,
            "ChunkSize": chunk_size,
            "ChunkCount": chunk_count,
            "CreatedAt": iso(now),
        }
        values |= {f"Chunk{i}": ChunkState.TODO.value for i in range(chunk_count)}
        try:
            self._call("put_item", Item=_to_item(values), ConditionExpression="attribute_not_exists(pk)")
        except ConditionFailedError:
            response = self._call("get_item", Key={"pk": {"S": bulk_pk(instance, request_id)}}, ConsistentRead=True)
            values = _from_item(response["Item"])
        return _bulk(values)

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
        """Move one chunk between states; the condition on its current state makes each move happen once.

        With ``owner``, a chunk that is CALLING moves only if ``owner`` is the one calling it: a delivery whose
        chunk was taken over after it was judged abandoned never moves it. Leaving CALLING removes the claim.
        """
        expected_states = list(expected)
        placeholders = {f":e{i}": s.value for i, s in enumerate(expected_states)}
        values: dict[str, Any] = {":new": new.value, ":now": iso(now), **placeholders}
        names = {"#c": f"Chunk{index}"}
        expression = "SET #c = :new, UpdatedAt = :now"
        condition = f"#c IN ({', '.join(placeholders)})"
        if stored is not None:
            values[":stored"] = stored
            names["#n"] = f"Stored{index}"
            expression += ", #n = :stored"
        if owner is not None:
            values |= {":calling": ChunkState.CALLING.value, ":owner": owner}
            names["#o"] = f"Owner{index}"
            condition += " AND (#c <> :calling OR #o = :owner)"
        if new is ChunkState.UNKNOWN:
            # The claim stays: Since<n> and Ended<n> bound the call whose users adoption looks for. Pending adoption
            # is recorded first, so that no UNKNOWN chunk is ever missing from it (an entry for a chunk that did not
            # move is dropped by the reconcile function when it reads the chunk).
            names["#e"] = f"Ended{index}"
            values[":end"] = int(now)
            expression += ", #e = :end"
            self._note(
                ADOPTIONS_PK,
                "SET #a = if_not_exists(#a, :end)",
                {":end": int(now)},
                {"#a": pending_key(instance, request_id, index)},
            )
        elif new is not ChunkState.CALLING:
            names |= {"#o": f"Owner{index}", "#t": f"Since{index}"}
            expression += " REMOVE #o, #t"
        self._update(bulk_pk(instance, request_id), expression, condition, values, names)

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
        """Become the one calling a chunk: from TODO, or (``abandoned``) from a claim whose holder's time ran out.

        Condition: the chunk is TODO, or still CALLING under exactly the claim that was judged abandoned (same
        owner, same start), so of two deliveries taking over the same dead claim only one succeeds::

            D1: claim (owner D1, since t0) ... cut off at its timeout
            D2: reads CALLING (D1, t0); t0 + claim_seconds < now   -> take over if still (D1, t0)   ok
            D3: reads CALLING (D1, t0) as well                      -> take over if still (D1, t0)   fails
        """
        values: dict[str, Any] = {
            ":calling": ChunkState.CALLING.value,
            ":me": owner,
            ":since": int(now),
            ":now": iso(now),
        }
        if abandoned is None:
            condition = "#c = :todo"
            values[":todo"] = ChunkState.TODO.value
        else:
            condition = "#c = :calling AND #o = :old AND #t = :oldsince"
            values |= {":old": abandoned.owner, ":oldsince": abandoned.since}
        # Recorded before the claim, so every call is on record (a record whose claim then failed is harmless: the
        # reader checks the chunk's state). Adoption reads it to tell when another chunk's call overlapped a lost one.
        minute = int(now) // 60
        self._note(
            chunk_calls_pk(instance, minute),
            "SET #k = :since, ExpiresAt = if_not_exists(ExpiresAt, :expires)",
            {":since": int(now), ":expires": minute * 60 + CHUNK_CALL_RETENTION_SECONDS},
            {"#k": chunk_key(request_id, index)},
        )
        self._update(
            bulk_pk(instance, request_id),
            "SET #c = :calling, #o = :me, #t = :since, UpdatedAt = :now",
            condition,
            values,
            {"#c": f"Chunk{index}", "#o": f"Owner{index}", "#t": f"Since{index}"},
        )

    def make_chunk_per_user(self, *, instance: str, request_id: str, index: int, owner: str) -> int:
        """Record, before its first Create, that a chunk is made one Create per user; returns how many are made.

        Condition: we are calling it. From now on no delivery calls CreateMany for it: each resumes the Creates.
        """
        attrs = self._update(
            bulk_pk(instance, request_id),
            "SET #m = if_not_exists(#m, :zero)",
            "#c = :calling AND #o = :me",
            {":zero": 0, ":calling": ChunkState.CALLING.value, ":me": owner},
            {"#c": f"Chunk{index}", "#o": f"Owner{index}", "#m": f"Made{index}"},
            return_new=True,
        )
        assert attrs is not None
        return int(attrs[f"Made{index}"])

    def store_chunk_user(
        self, *, instance: str, request_id: str, index: int, owner: str, position: int, user: NewUser, now: float
    ) -> None:
        """Store the user made at ``position`` of a per-user chunk and count it, in one transaction.

        Conditions: we still call the chunk and exactly ``position`` users are counted (so a delivery that lost
        the chunk to a takeover stores nothing), and the user is new. A delivery cut off after its Create and
        before this write leaves ``Made<n> = position``: the next one repeats the Create with the same
        CustomToken, which cannot make a second user (it answers "exists").
        """
        try:
            self._client.transact_write_items(
                TransactItems=[
                    {
                        "Put": {
                            "TableName": self._table,
                            "Item": _to_item(self._new_user_values(user, now)),
                            "ConditionExpression": "attribute_not_exists(pk)",
                        }
                    },
                    {
                        "Update": {
                            "TableName": self._table,
                            "Key": {"pk": {"S": bulk_pk(instance, request_id)}},
                            "UpdateExpression": "SET #m = :next, UpdatedAt = :now",
                            "ConditionExpression": "#c = :calling AND #o = :me AND #m = :position",
                            "ExpressionAttributeNames": {
                                "#c": f"Chunk{index}",
                                "#o": f"Owner{index}",
                                "#m": f"Made{index}",
                            },
                            "ExpressionAttributeValues": _to_item(
                                {
                                    ":next": position + 1,
                                    ":now": iso(now),
                                    ":calling": ChunkState.CALLING.value,
                                    ":me": owner,
                                    ":position": position,
                                }
                            ),
                        }
                    },
                ]
            )
        except ClientError as exc:
            reasons = exc.response.get("CancellationReasons") or []
            if any(r.get("Code") == "ConditionalCheckFailed" for r in reasons) or (
                exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"
            ):
                if self._chunk_user_already_stored(owner, instance, request_id, index, position, user):
                    return
                raise ConditionFailedError("store_chunk_user: chunk taken over or user stored") from None
            code = exc.response.get("Error", {}).get("Code", "Unknown")
            raise StoreError(f"DynamoDB transact_write_items failed: {code}") from exc

    def _chunk_user_already_stored(
        self, owner: str, instance: str, request_id: str, index: int, position: int, user: NewUser
    ) -> bool:
        """Whether what the failed write was to do is done: we still hold the claim, ``Made<n>`` is one past
        ``position``, and the user is stored.

        The client retries a transaction whose answer it did not get (a read timeout). If the first attempt
        committed, the retry fails its condition; without this it would be read as a takeover, and the chunk
        left CALLING until its claim lapsed::

            attempt 1: Made=p -> p+1, put user p ... answer lost (read timeout)
            attempt 2 (botocore's retry): Made = p? no -> ConditionalCheckFailed
            read: Owner = us, Made = p+1, user p stored -> done by attempt 1: success

        A delivery that lost its claim, or one at a position already counted with another user, still fails.
        """
        response = self._call("get_item", Key={"pk": {"S": bulk_pk(instance, request_id)}}, ConsistentRead=True)
        values = _from_item(response.get("Item") or {})
        if values.get(f"Owner{index}") != owner or values.get(f"Made{index}") != position + 1:
            return False
        return self.get_user(user.device_token) is not None

    # -- token maintenance

    def query_due(self, *, shard: str, horizon: int, limit: int, start_key: dict[str, Any] | None = None) -> DuePage:
        """Users of one shard whose access token expires at or before ``horizon`` (oldest first)."""
        kwargs: dict[str, Any] = {
            "IndexName": "RefreshDue",
            "KeyConditionExpression": "DueShard = :s AND AccessExpiresAt <= :h",
            "ExpressionAttributeValues": {":s": {"S": shard}, ":h": {"N": str(horizon)}},
            "Limit": limit,
        }
        if start_key:
            kwargs["ExclusiveStartKey"] = start_key
        response = self._call("query", **kwargs)
        items = response.get("Items", [])
        return DuePage([_record(_from_item(i)) for i in items], response.get("LastEvaluatedKey"), len(items))

    def mark_queued(self, *, device_token: str, version: int, until: int, now: float) -> bool:
        """Note that a refresh job for this version is queued until ``until``; False if one already is.

        Condition: same version, and no earlier sweep queued it (or that job's time ran out). Overlapping
        sweeps therefore queue each due user once.
        """
        try:
            self._update(
                user_pk(device_token),
                "SET QueuedUntil = :until",
                "Version = :v AND (attribute_not_exists(QueuedUntil) OR QueuedUntil < :now)",
                {":until": until, ":v": version, ":now": int(now)},
            )
        except ConditionFailedError:
            return False
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
        """Take the refresh lease; ``None`` if another worker holds it or the tokens moved on.

        Condition: the version we read is still current, the user is ACTIVE (or TOKENLESS, about to log in;
        or NEEDS_RELOGIN when an operator ``reactivate``s it), and no live lease exists. With ``due_by``, also
        that an ACTIVE user is due (its access token expires by then, and no ``RetryAfter`` is pending), so a
        queued job can lease without reading the user first.

        "No live lease" is judged by the taker's clock, which may run ahead of the holder's: the holder keeps its
        calls and commit inside ``LeaseExpiresAt - skew`` (see :class:`telematics_reg.timing.LeaseTiming`), so a
        takeover never overlaps a call still in flight::

            W1 (holder)  lease -> expires at t+L; calls only while now + call + commit + skew <= t+L
            W2 (ahead S) sees it lapsed from real time t+L-S on, S <= skew: W1's call and commit are over
        """
        condition = (
            "Version = :v AND #s IN (:active, :tokenless, :third) "
            "AND (attribute_not_exists(LeaseExpiresAt) OR LeaseExpiresAt < :now)"
        )
        values: dict[str, Any] = {
            ":me": owner,
            ":until": int(now) + ttl,
            ":v": version,
            ":active": UserStatus.ACTIVE.value,
            ":tokenless": UserStatus.TOKENLESS.value,
            # Without reactivate the third value repeats ACTIVE, so NEEDS_RELOGIN is never leased.
            ":third": (UserStatus.NEEDS_RELOGIN if reactivate else UserStatus.ACTIVE).value,
            ":now": int(now),
        }
        if due_by is not None:
            condition += (
                " AND (#s = :tokenless OR (AccessExpiresAt <= :due "
                "AND (attribute_not_exists(RetryAfter) OR RetryAfter <= :now)))"
            )
            values[":due"] = due_by
        try:
            # The item as it was: whether a (lapsed) lease was there tells how its last refresh ended.
            old = self._update(
                user_pk(device_token),
                "SET LeaseOwner = :me, LeaseExpiresAt = :until",
                condition,
                values,
                {"#s": "Status"},
                return_old=True,
            )
        except ConditionFailedError:
            return None
        assert old is not None
        leased = _record({**old, "LeaseOwner": owner, "LeaseExpiresAt": int(now) + ttl})
        return replace(leased, lease_lapsed="LeaseOwner" in old)

    def renew_lease(self, *, device_token: str, version: int, owner: str, now: float, ttl: int) -> int | None:
        """Extend our lease to ``now + ttl`` before a further rotating call; the new expiry, or ``None`` if we lost it.

        Condition: we still hold the lease (``LeaseOwner``) and the version is the one we leased. A worker whose
        lease was taken over after it lapsed (another worker's clock saw it expire) therefore never starts a call
        that would spend the token pair the new holder is about to rotate::

            W1 lease(v) ... slow ... lapsed          renew(W1, v) -> refused: no call
            W2                       lease(v) (takes over, logs in) -> commit(W2, v)
        """
        until = int(now) + ttl
        try:
            self._update(
                user_pk(device_token),
                "SET LeaseExpiresAt = :until",
                "LeaseOwner = :me AND Version = :v",
                {":until": until, ":me": owner, ":v": version},
            )
        except ConditionFailedError:
            return None
        return until

    def commit_tokens(
        self, *, device_token: str, expected_version: int, owner: str, tokens: Tokens, now: float
    ) -> UserRecord:
        """Store a rotated pair. Condition: the version we leased AND that we still hold the lease.

        The owner is what makes a late commit safe. A worker can only lose its lease by letting it lapse, and the
        worker that took it over goes to Login (a lapsed lease means the stored refresh token may be spent), which
        kills every pair issued before. So a pair from a worker that lost its lease is dead or about to be:
        storing it (as a version-only condition did) would replace the new holder's live pair or be overwritten by
        a pair that never gets stored::

            W1 lease(v) -- Refresh ....slow.... -> P1              commit(W1, v): refused (owner), P1 not stored
            W2 (clock ahead)     lease(v) lapsed -- Login -> P2 (P1 dies) -- commit(W2, v) -> v+1 holds P2
        """
        attrs = self._update(
            user_pk(device_token),
            "SET AccessToken = :at, RefreshToken = :rt, AccessExpiresAt = :exp, Version = :next, #s = :active, "
            "DueShard = :shard, UpdatedAt = :now "
            "REMOVE LeaseOwner, LeaseExpiresAt, RetryAfter, LastError, QueuedUntil, RefreshTokenDead",
            "Version = :v AND LeaseOwner = :me",
            {
                ":at": tokens.access_token,
                ":rt": tokens.refresh_token,
                ":exp": tokens.expires_at,
                ":next": expected_version + 1,
                ":v": expected_version,
                ":me": owner,
                ":active": UserStatus.ACTIVE.value,
                ":shard": shard_of(device_token, self.shards),
                ":now": iso(now),
            },
            {"#s": "Status"},
            return_new=True,
        )
        assert attrs is not None
        return _record(attrs)

    def mark_refresh_token_dead(self, *, device_token: str, version: int, reason: str, now: float) -> bool:
        """Note that the refresh token stored at ``version`` is spent (a worker rotated it and could not store the
        result). False when the version moved on (a newer pair is stored: nothing to note).

        Condition: the version only, not the lease: whoever holds the lease, the fact is true of that version's
        token, and it only ever sends the next attempt to Login instead of presenting a spent token.
        """
        try:
            self._update(
                user_pk(device_token),
                "SET RefreshTokenDead = :dead, LastError = :err, UpdatedAt = :now",
                "Version = :v",
                {":dead": True, ":err": reason[:500], ":now": iso(now), ":v": version},
            )
        except ConditionFailedError:
            return False
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
        """Drop our lease after a failed attempt, leaving a note of when to try again (and, with
        ``refresh_token_dead``, that the stored refresh token must not be presented again: the commit clears it)."""
        values: dict[str, Any] = {":me": owner, ":now": iso(now)}
        sets = ["UpdatedAt = :now"]
        if refresh_token_dead:
            values[":dead"] = True
            sets.append("RefreshTokenDead = :dead")
        if retry_after is not None:
            values[":ra"] = retry_after
            sets.append("RetryAfter = :ra")
        if error is not None:
            values[":err"] = error[:500]
            sets.append("LastError = :err")
        with contextlib.suppress(ConditionFailedError):
            self._update(
                user_pk(device_token),
                "SET " + ", ".join(sets) + " REMOVE LeaseOwner, LeaseExpiresAt, QueuedUntil",
                "LeaseOwner = :me",
                values,
            )

    def mark_needs_relogin(
        self, *, device_token: str, expected_version: int, owner: str, reason: str, now: float
    ) -> None:
        """Take the user out of the refresh index for good (removing ``DueShard``) and record why.

        Condition: the version AND our lease. A worker whose lease lapsed and was taken over must not mark the
        user: that would bump the version under the new holder, whose commit of a live pair would then fail::

            W1 lease(v) -- Login ....slow.... -> 401       mark(W1, v): refused (owner), the user stays ACTIVE
            W2                lease(v) lapsed -- Login -> P2 -- commit(W2, v) -> v+1 holds P2
        """
        self._update(
            user_pk(device_token),
            "SET #s = :s, LastError = :err, UpdatedAt = :now, Version = :next "
            "REMOVE DueShard, LeaseOwner, LeaseExpiresAt, RetryAfter, QueuedUntil",
            "Version = :v AND LeaseOwner = :me",
            {
                ":s": UserStatus.NEEDS_RELOGIN.value,
                ":err": reason[:500],
                ":now": iso(now),
                ":v": expected_version,
                ":me": owner,
                ":next": expected_version + 1,
            },
            {"#s": "Status"},
        )


def _bulk(values: dict[str, Any]) -> BulkProgress:
    count = int(values["ChunkCount"])
    return BulkProgress(
        instance=str(values["Instance"]),
        request_id=str(values["RequestId"]),
        quantity=int(values["Quantity"]),
        chunk_size=int(values["ChunkSize"]),
        chunks={i: ChunkState(values[f"Chunk{i}"]) for i in range(count)},
        stored={i: int(values[f"Stored{i}"]) for i in range(count) if f"Stored{i}" in values},
        claims={
            i: ChunkClaim(str(values[f"Owner{i}"]), int(values[f"Since{i}"]))
            for i in range(count)
            if f"Owner{i}" in values and f"Since{i}" in values
        },
        made={i: int(values[f"Made{i}"]) for i in range(count) if f"Made{i}" in values},
        ended={i: int(values[f"Ended{i}"]) for i in range(count) if f"Ended{i}" in values},
    )
