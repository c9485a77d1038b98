"""What the reconcile flow reads and writes in the tokens table, beside the token store's own items.

Items and attributes (see README "Token store"):

``USER#<DeviceToken>`` (the user item), attributes the reconcile flow adds:
    ``AuditRun`` (the last audit that saw the user upstream), ``AuditFlags`` (the upstream's ``UserFields`` as that
    audit read them: what a later change is judged against), ``Drift`` (the classes the last audit found, e.g.
    ``deactivated,moved``), ``DriftAt``, ``UpstreamInstanceId`` (where a moved user is now), ``GoneAt`` (status
    ``GONE``), and ``AdoptedFrom`` (``<RequestId>#<n>``: the lost chunk an adopted user came from). The token store
    writes ``BulkChunk`` (the same form) on the users a chunk's own call stored.
``AUDIT#DRIFT``
    the drift audit: its lease (``LeaseOwner``, ``LeaseExpiresAt``), the run in progress and its cursor, and the
    last report (``LastReport``, JSON).
``ADOPTIONS#PENDING`` / ``CHUNKCALLS#<Instance>#<minute>``
    written by the token store (see :mod:`telematics_reg.store`); the reconcile flow reads them, and drops the
    pending entries it settled.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from botocore.exceptions import ClientError

from telematics_reg.store import (
    ADOPTIONS_PK,
    BulkProgress,
    ChunkClaim,
    ChunkState,
    ConditionFailedError,
    DynamoTokenStore,
    StoreError,
    UserRecord,
    UserStatus,
    _bulk,
    _from_item,
    _to_item,
    bulk_pk,
    chunk_calls_pk,
    chunk_key,
    iso,
    shard_of,
    user_pk,
)

AUDIT_PK = "AUDIT#DRIFT"
#: Statuses of a registered user the audit judges (PENDING is a registration in flight; GONE is judged already).
AUDITED_STATUSES = (UserStatus.ACTIVE, UserStatus.TOKENLESS, UserStatus.NEEDS_RELOGIN)
_PROJECTION = (
    "pk, DeviceToken, Instance, InstanceId, ClientId, #s, Version, Deactivated, AuditFlags, AuditRun, "
    "BulkRequestId, BulkChunk, AdoptedFrom, CreatedAt, LeaseExpiresAt"
)


@dataclass(frozen=True)
class StoredUser:
    """The ids and audit notes of a stored user (never its tokens)."""

    device_token: str
    instance: str
    instance_id: str
    status: UserStatus
    version: int
    client_id: str | None = None
    deactivated: bool = False
    audit_flags: str | None = None
    audit_run: str | None = None
    bulk_request_id: str | None = None
    adopted_from: str | None = None
    created_at: str = ""
    #: ``<RequestId>#<n>``: the chunk whose own call stored the user.
    bulk_chunk: str | None = None
    #: The refresh or lifecycle lease on the user, if any (epoch s, by its holder's clock).
    lease_expires_at: int | None = None

    def of_chunk(self, tag: str) -> bool:
        """Whether the user was made by chunk ``tag`` (``<RequestId>#<n>``): stored by its call, or adopted from it."""
        return tag in (self.bulk_chunk, self.adopted_from)


@dataclass(frozen=True)
class AdoptedUser:
    """A user of a lost chunk found upstream, stored without tokens and put in the refresh index at ``due_at``: the
    refresh worker logs it in then, within the fleet's Login budget."""

    device_token: str
    instance: str
    instance_id: str
    bulk_request_id: str
    adopted_from: str
    due_at: int


@dataclass(frozen=True)
class ChunkCall:
    request_id: str
    index: int
    since: int


def _stored(values: Mapping[str, Any]) -> StoredUser:
    return StoredUser(
        device_token=str(values["DeviceToken"]),
        instance=str(values.get("Instance", "")),
        instance_id=str(values.get("InstanceId", "")),
        status=UserStatus(str(values["Status"])),
        version=int(values.get("Version", 0)),
        client_id=values.get("ClientId"),
        deactivated=bool(values.get("Deactivated", False)),
        audit_flags=values.get("AuditFlags"),
        audit_run=values.get("AuditRun"),
        bulk_request_id=values.get("BulkRequestId"),
        adopted_from=values.get("AdoptedFrom"),
        created_at=str(values.get("CreatedAt", "")),
        bulk_chunk=values.get("BulkChunk"),
        lease_expires_at=int(values["LeaseExpiresAt"]) if values.get("LeaseExpiresAt") is not None else None,
    )


class AdoptionRecords(Protocol):
    """What adoption reads and writes in the tokens table."""

    def get_bulk(self, instance: str, request_id: str) -> BulkProgress | None: ...
    def pending_adoptions(self) -> dict[str, int]: ...
    def drop_pending(self, key: str) -> None: ...
    def add_pending(self, key: str, now: float) -> None: ...
    def chunk_calls(self, instance: str, first_minute: int, last_minute: int) -> list[ChunkCall]: ...
    def users(self, device_tokens: Sequence[str]) -> dict[str, StoredUser]: ...
    def put_adopted(self, user: AdoptedUser, *, now: float) -> bool: ...
    def abandon_chunk(self, instance: str, request_id: str, index: int, claim: ChunkClaim, *, now: float) -> None: ...
    def finish_chunk(self, instance: str, request_id: str, index: int, stored: int, *, now: float) -> bool: ...
    def reopen_chunk(self, instance: str, request_id: str, index: int, claim: ChunkClaim, *, now: float) -> bool: ...
    def note_chunk(self, instance: str, request_id: str, index: int, note: str, *, now: float) -> None: ...


class ReconcileRecords(AdoptionRecords, Protocol):
    """The reconcile flow's reads and writes of the tokens table: adoption's and the audit's."""

    def find_by_client(self, instance: str, client_id: str) -> UserRecord | None: ...
    def audit_state(self) -> dict[str, Any]: ...
    def take_audit_lease(self, owner: str, *, now: float, ttl: int) -> dict[str, Any] | None: ...
    def save_audit(self, owner: str, values: Mapping[str, Any], *, now: float, ttl: int) -> None: ...
    def release_audit_lease(self, owner: str) -> None: ...
    def mark_seen(
        self,
        device_token: str,
        *,
        run_id: str,
        flags: str,
        drift: Sequence[str],
        instance_id: str | None,
        now: float,
        keep_notes: bool = False,
    ) -> None: ...
    def scan_unseen(
        self, *, run_id: str, created_before: str, start_key: str | None, limit: int
    ) -> tuple[list[StoredUser], str | None]: ...
    def mark_gone(self, user: StoredUser, *, run_id: str, now: float) -> bool: ...


class DynamoReconcileRecords:
    """:class:`ReconcileRecords` on the tokens table, through the token store's client."""

    def __init__(self, store: DynamoTokenStore) -> None:
        self._store = store

    def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        return self._store._call(operation, **kwargs)

    # ------------------------------------------------------------------------------------------ adoption

    def get_bulk(self, instance: str, request_id: str) -> BulkProgress | None:
        item = self._call("get_item", Key={"pk": {"S": bulk_pk(instance, request_id)}}, ConsistentRead=True).get("Item")
        return _bulk(_from_item(item)) if item else None

    def pending_adoptions(self) -> dict[str, int]:
        item = self._call("get_item", Key={"pk": {"S": ADOPTIONS_PK}}, ConsistentRead=True).get("Item") or {}
        values = _from_item(item)
        return {name: int(value) for name, value in values.items() if name != "pk"}

    def drop_pending(self, key: str) -> None:
        self._call(
            "update_item",
            Key={"pk": {"S": ADOPTIONS_PK}},
            UpdateExpression="REMOVE #k",
            ExpressionAttributeNames={"#k": key},
        )

    def add_pending(self, key: str, now: float) -> None:
        self._store._note(ADOPTIONS_PK, "SET #k = if_not_exists(#k, :now)", {":now": int(now)}, {"#k": key})

    def chunk_calls(self, instance: str, first_minute: int, last_minute: int) -> list[ChunkCall]:
        calls: list[ChunkCall] = []
        minutes = [chunk_calls_pk(instance, m) for m in range(first_minute, last_minute + 1)]
        for start in range(0, len(minutes), 100):
            keys = [{"pk": {"S": pk}} for pk in minutes[start : start + 100]]
            for item in self._batch_get(keys, projection=None):
                for name, value in item.items():
                    if name in {"pk", "ExpiresAt"}:
                        continue
                    request_id, _, index = name.rpartition("#")
                    with contextlib.suppress(ValueError):
                        calls.append(ChunkCall(request_id, int(index), int(value)))
        return calls

    def _batch_get(self, keys: list[dict[str, Any]], projection: str | None) -> list[dict[str, Any]]:
        request: dict[str, Any] = {"Keys": keys, "ConsistentRead": True}
        if projection is not None:
            request |= {"ProjectionExpression": projection, "ExpressionAttributeNames": {"#s": "Status"}}
        found: list[dict[str, Any]] = []
        table = self._store._table
        pending: dict[str, Any] = {table: request}
        for _ in range(8):
            try:
                response = self._store._client.batch_get_item(RequestItems=pending)
            except ClientError as exc:
                raise StoreError(f"DynamoDB batch_get_item failed: {type(exc).__name__}") from exc
            found.extend(_from_item(item) for item in response.get("Responses", {}).get(table, []))
            pending = response.get("UnprocessedKeys") or {}
            if not pending:
                return found
        raise StoreError("DynamoDB batch_get_item: keys left unprocessed after retries")

    def users(self, device_tokens: Sequence[str]) -> dict[str, StoredUser]:
        unique = list(dict.fromkeys(device_tokens))
        found: dict[str, StoredUser] = {}
        for start in range(0, len(unique), 100):
            keys = [{"pk": {"S": user_pk(token)}} for token in unique[start : start + 100]]
            for values in self._batch_get(keys, projection=_PROJECTION):
                if "Status" in values and "DeviceToken" in values:
                    user = _stored(values)
                    found[user.device_token] = user
        return found

    def put_adopted(self, user: AdoptedUser, *, now: float) -> bool:
        """Store an adopted user; False if its item exists already (adopted by a concurrent run, or stored by the
        chunk's own caller after all: either way it is stored once).

        TOKENLESS with ``AccessExpiresAt`` and ``DueShard``: the sweeper queues it once ``due_at`` nears, and the
        refresh worker logs it in (a TOKENLESS user is leased whenever it is queued, and goes to Login).
        """
        stamp = iso(now)
        values = {
            "pk": user_pk(user.device_token),
            "Kind": "user",
            "DeviceToken": user.device_token,
            "Instance": user.instance,
            "InstanceId": user.instance_id,
            "BulkRequestId": user.bulk_request_id,
            "AdoptedFrom": user.adopted_from,
            "Status": UserStatus.TOKENLESS.value,
            "Version": 1,
            "AccessExpiresAt": user.due_at,
            "DueShard": shard_of(user.device_token, self._store.shards),
            "CreatedAt": stamp,
            "UpdatedAt": stamp,
        }
        try:
            self._call("put_item", Item=_to_item(values), ConditionExpression="attribute_not_exists(pk)")
        except ConditionFailedError:
            return False
        return True

    def abandon_chunk(self, instance: str, request_id: str, index: int, claim: ChunkClaim, *, now: float) -> None:
        """CALLING -> UNKNOWN for a chunk whose caller's claim ran out (as a redelivery would judge it)."""
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
        """UNKNOWN -> DONE with its users stored; False if it is not UNKNOWN any more (settled elsewhere)."""
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
        """UNKNOWN -> TODO for a lost chunk proven to have made nobody, so that the bulk's next delivery calls it again
        (``telematics-reg bulk adopt --retry-unmade``); False if it moved on meanwhile.

        Condition: still UNKNOWN under exactly the call that was judged (same ``Owner<n>`` and ``Since<n>``), and
        never made one Create per user. A chunk called again and lost again has another claim, so a proof about the
        first call never reopens the second::

            lost call (owner O, since t0) -> UNKNOWN ... listing [t0 - margin, now]: none of its users
            operator: reopen if still (UNKNOWN, O, t0)   ok -> TODO; the redriven letter claims it anew (O', t1)
            a second operator with the same proof: reopen if still (UNKNOWN, O, t0)   fails: nothing happens twice
        """
        try:
            self._store._update(
                bulk_pk(instance, request_id),
                "SET #c = :todo, UpdatedAt = :now REMOVE #o, #t, #e",
                "#c = :unknown AND #o = :owner AND #t = :since AND attribute_not_exists(#m)",
                {
                    ":todo": ChunkState.TODO.value,
                    ":now": iso(now),
                    ":unknown": ChunkState.UNKNOWN.value,
                    ":owner": claim.owner,
                    ":since": claim.since,
                },
                {
                    "#c": f"Chunk{index}",
                    "#o": f"Owner{index}",
                    "#t": f"Since{index}",
                    "#e": f"Ended{index}",
                    "#m": f"Made{index}",
                },
            )
        except ConditionFailedError:
            return False
        return True

    def note_chunk(self, instance: str, request_id: str, index: int, note: str, *, now: float) -> None:
        with contextlib.suppress(ConditionFailedError):
            self._store._update(
                bulk_pk(instance, request_id),
                "SET #a = :note, UpdatedAt = :now",
                "attribute_exists(pk)",
                {":note": note[:8000], ":now": iso(now)},
                {"#a": f"Adoption{index}"},
            )

    # --------------------------------------------------------------------------------------------- audit

    def find_by_client(self, instance: str, client_id: str) -> UserRecord | None:
        return self._store.find_by_client(instance, client_id)

    def audit_state(self) -> dict[str, Any]:
        item = self._call("get_item", Key={"pk": {"S": AUDIT_PK}}, ConsistentRead=True).get("Item")
        return _from_item(item) if item else {}

    def take_audit_lease(self, owner: str, *, now: float, ttl: int) -> dict[str, Any] | None:
        """The audit's lease, or None while another audit holds it.

        Condition: no lease, or one whose time ran out by our clock. The holder keeps its work inside its lease
        less the clock skew (``ttl`` covers the function's timeout plus the skew), so two audits never overlap::

            A1 lease until t+L -- pages -- checkpoint(owner A1) ... cut off at its timeout (< t+L-skew)
            A2 take: refused while LeaseExpiresAt >= now;  after t+L: granted, resumes at A1's last checkpoint
        """
        try:
            attrs = self._store._update(
                AUDIT_PK,
                "SET LeaseOwner = :me, LeaseExpiresAt = :until",
                "attribute_not_exists(LeaseExpiresAt) OR LeaseExpiresAt < :now",
                {":me": owner, ":until": int(now) + ttl, ":now": int(now)},
                return_new=True,
            )
        except ConditionFailedError:
            return None
        return attrs

    def save_audit(self, owner: str, values: Mapping[str, Any], *, now: float, ttl: int) -> None:
        """Store the run's progress and extend the lease; ConditionFailedError if the lease is not ours any more
        (then nothing is stored: the audit that took it over resumes from the last checkpoint)."""
        sets = ["LeaseExpiresAt = :until"]
        removes: list[str] = []
        names: dict[str, str] = {}
        attr_values: dict[str, Any] = {":me": owner, ":until": int(now) + ttl}
        for n, (name, value) in enumerate(values.items()):
            names[f"#a{n}"] = name
            if value is None:
                removes.append(f"#a{n}")
            else:
                sets.append(f"#a{n} = :v{n}")
                attr_values[f":v{n}"] = value
        expression = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        self._store._update(AUDIT_PK, expression, "LeaseOwner = :me", attr_values, names)

    def release_audit_lease(self, owner: str) -> None:
        with contextlib.suppress(ConditionFailedError):
            self._store._update(AUDIT_PK, "REMOVE LeaseOwner, LeaseExpiresAt", "LeaseOwner = :me", {":me": owner})

    def mark_seen(
        self,
        device_token: str,
        *,
        run_id: str,
        flags: str,
        drift: Sequence[str],
        instance_id: str | None,
        now: float,
        keep_notes: bool = False,
    ) -> None:
        """Note that this audit saw the user upstream (and, unless ``keep_notes``, the flags read and its drift).

        Condition: the item exists (a user deleted here meanwhile is not recreated by the note).
        """
        sets = ["AuditRun = :run"]
        values: dict[str, Any] = {":run": run_id}
        removes: list[str] = []
        if keep_notes:
            with contextlib.suppress(ConditionFailedError):
                self._store._update(user_pk(device_token), "SET AuditRun = :run", "attribute_exists(pk)", values)
            return
        sets.append("AuditFlags = :flags")
        values[":flags"] = flags
        if drift:
            sets += ["Drift = :drift", "DriftAt = :now"]
            values |= {":drift": ",".join(drift), ":now": iso(now)}
        else:
            removes += ["Drift", "DriftAt"]
        if instance_id is not None:
            sets.append("UpstreamInstanceId = :iid")
            values[":iid"] = instance_id
        else:
            removes.append("UpstreamInstanceId")
        expression = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        with contextlib.suppress(ConditionFailedError):
            self._store._update(user_pk(device_token), expression, "attribute_exists(pk)", values)

    def scan_unseen(
        self, *, run_id: str, created_before: str, start_key: str | None, limit: int
    ) -> tuple[list[StoredUser], str | None]:
        """One page of the table's registered users that the audit ``run_id`` did not see upstream.

        ``limit`` bounds the items read (not the matches), so a page is bounded in time whatever it finds.
        """
        kwargs: dict[str, Any] = {
            "Limit": limit,
            "ProjectionExpression": _PROJECTION,
            "FilterExpression": (
                "begins_with(pk, :user) AND #s IN (:a, :t, :n) AND CreatedAt < :before "
                "AND (attribute_not_exists(AuditRun) OR AuditRun <> :run)"
            ),
            "ExpressionAttributeNames": {"#s": "Status"},
            "ExpressionAttributeValues": _to_item(
                {
                    ":user": "USER#",
                    ":a": UserStatus.ACTIVE.value,
                    ":t": UserStatus.TOKENLESS.value,
                    ":n": UserStatus.NEEDS_RELOGIN.value,
                    ":before": created_before,
                    ":run": run_id,
                }
            ),
        }
        if start_key:
            kwargs["ExclusiveStartKey"] = json.loads(start_key)
        response = self._call("scan", **kwargs)
        users = [_stored(_from_item(item)) for item in response.get("Items", [])]
        next_key = response.get("LastEvaluatedKey")
        return users, json.dumps(next_key) if next_key else None

    def mark_gone(self, user: StoredUser, *, run_id: str, now: float) -> bool:
        """Stop keeping a user the upstream no longer has: ``GONE``, out of the refresh index, its tokens dropped.

        Condition: the version read, still unseen by this audit, and no live refresh or lifecycle lease. A lease
        holder is never stepped on (its commit would then fail); a refused mark is settled by the same run once the
        lease has ended, with the version read again (see :class:`telematics_reg.reconcile.audit.DriftAudit`)::

            audit  scan(v) ........ mark_gone(v): refused (leased) ...... settle: read v' -> mark_gone(v'): GONE
            worker         lease(v) -- Refresh -> 400, Login -> 404 -- release (or commit -> v' = v+1)
        """
        try:
            self._store._update(
                user_pk(user.device_token),
                "SET #s = :gone, Version = :next, GoneAt = :now, UpdatedAt = :now, Drift = :drift, DriftAt = :now, "
                "LastError = :err REMOVE DueShard, QueuedUntil, RetryAfter, AccessToken, RefreshToken, "
                "AccessExpiresAt, RefreshTokenDead",
                "Version = :v AND #s IN (:a, :t, :n) AND (attribute_not_exists(AuditRun) OR AuditRun <> :run) "
                "AND (attribute_not_exists(LeaseExpiresAt) OR LeaseExpiresAt < :epoch)",
                {
                    ":gone": UserStatus.GONE.value,
                    ":next": user.version + 1,
                    ":now": iso(now),
                    ":drift": "gone",
                    ":err": "not found upstream by the drift audit",
                    ":v": user.version,
                    ":a": UserStatus.ACTIVE.value,
                    ":t": UserStatus.TOKENLESS.value,
                    ":n": UserStatus.NEEDS_RELOGIN.value,
                    ":run": run_id,
                    ":epoch": int(now),
                },
                {"#s": "Status"},
            )
        except ConditionFailedError:
            return False
        return True


def chunk_tag(request_id: str, index: int) -> str:
    """``AdoptedFrom`` of a user adopted from chunk ``index`` of bulk ``request_id`` (its ``BulkChunk`` had the chunk's
    own call stored it)."""
    return chunk_key(request_id, index)


def group(values: Iterable[str], size: int) -> list[list[str]]:
    items = list(values)
    return [items[i : i + size] for i in range(0, len(items), size)]
