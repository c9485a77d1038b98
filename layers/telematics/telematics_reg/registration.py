"""Flows 1 and 2: a registration request becomes exactly one upstream user, stored with its tokens.

Exactly one user per (Instance, ClientId) rests on two things:

* the DeviceToken is chosen by us, deterministically (a keyed hash of InstanceId and ClientId, see
  :func:`device_token_for`), and sent as the upstream's ``CustomToken``: a Create whose answer was lost is
  recovered by Login with that DeviceToken (the client does this), and a second Create with the same
  CustomToken cannot make a second user. A ClientId that already has a stored user keeps that user's
  DeviceToken, however it was derived: exactly-once never depends on recomputing it;
* a claim item written with a condition, so that two deliveries (duplicates, both functions at once) never
  both call Create: the loser waits briefly for the winner, then reports the stored DeviceToken.

A bulk request (``Quantity``) is split into CreateMany calls of at most 100 users. Each chunk's progress is
kept in the store and moves TODO -> CALLING -> DONE with conditional writes, so a redelivered message skips
what is done. CALLING names its caller and since when: a duplicate delivery waits (retries later) while the
caller may be alive, and only a chunk whose CreateMany answer was lost, or whose caller died mid-call or while
storing the answer, is reported (UNKNOWN) instead of doubled; the reconcile flow adopts its users, counting those
its own call stored (each stored bulk user carries its chunk, ``BulkChunk``). When CreateMany is not offered, a
chunk is made one Create per user with deterministic CustomTokens, each user stored as it is made, so such a chunk
is resumed, never lost. The bulk's ``RequestId`` travels in the message body (stamped by the intake, by dead
letters and by a redrive), so a re-sent message continues the same bulk.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeVar

from telematics_reg.errors import (
    FieldError,
    NotFoundError,
    OutcomeUnknownError,
    RateLimitedError,
    RetryableUpstreamError,
    TelematicsError,
    UnauthorizedError,
    UpstreamValidationError,
    UserAlreadyExistsError,
)
from telematics_reg.models import (
    BulkRegistrationRequest,
    CreateManyRequest,
    CreateResult,
    CreateUserRequest,
    InstanceCredentials,
    RegistrationRequest,
    UserFields,
)
from telematics_reg.observability import logger
from telematics_reg.outcomes import EventPublisher, Source, UserRegistered
from telematics_reg.store import (
    ChunkClaim,
    ChunkState,
    ConditionFailedError,
    NewUser,
    StoreError,
    Tokens,
    TokenStore,
    UserRecord,
    UserStatus,
    chunk_key,
)

if TYPE_CHECKING:  # annotations only: importing the client (and requests) is left to the function's set-up
    from telematics_reg.credentials import CredentialsProvider, DeviceTokenKey, DeviceTokenKeyProvider
    from telematics_reg.upstream import UserService

CREATE_MANY_CHUNK = 100
#: Users per write while storing a CreateMany answer (DynamoDB's BatchWriteItem takes 25): a failed write is retried
#: from its own batch, never from the first user.
_STORE_BATCH = 25
#: Attempts at storing one batch of an answer we hold, and the time kept back for reporting the chunk when they fail.
_STORE_ATTEMPTS = 8
_STORE_RESERVE_SECONDS = 5.0
_T = TypeVar("_T")
_REQUEST_ID_KEYS = frozenset({"requestid", "request_id"})
# Part of every derivation message: another derivation (a v2) can never produce the same DeviceTokens.
_DERIVATION: Final = "telematics-reg/device-token/v1"


def _keyed_uuid(key: DeviceTokenKey, *parts: str | int) -> uuid.UUID:
    # HMAC-SHA256 of the parts (JSON: unambiguous whatever a ClientId holds), truncated to 128 bits, with the
    # version and variant bits of an RFC 9562 UUIDv8, the layout RFC 9562 gives for SHA-256 name-based UUIDs.
    digest = key.digest(json.dumps([_DERIVATION, *parts], separators=(",", ":")).encode())
    value = int.from_bytes(digest[:16], "big")
    value = (value & ~(0xF << 76)) | (0x8 << 76)  # version 8
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # variant 10 (RFC 9562)
    return uuid.UUID(int=value)


def device_token_for(instance_id: str, client_id: str, *, key: DeviceTokenKey) -> str:
    """The DeviceToken a ClientId of an instance gets when it has none yet (sent upstream as ``CustomToken``).

    Keyed: a DeviceToken is a user's identity in the vendor's SDK, and the InstanceId ships inside apps while
    ClientIds are often guessable, so nobody without the key (a secret of the stack) can compute one.

    Example
    -------
    >>> from telematics_reg.credentials import DeviceTokenKey
    >>> key = DeviceTokenKey("k" * 32)
    >>> token = device_token_for("3c1c8fd7-4133-404a-82e9-93a015d85362", "customer-42", key=key)
    >>> token == device_token_for("3C1C8FD7-4133-404A-82E9-93A015D85362", "customer-42", key=key)
    True
    >>> uuid.UUID(token).version
    8
    >>> token == device_token_for("3c1c8fd7-4133-404a-82e9-93a015d85362", "customer-42", key=DeviceTokenKey("j" * 32))
    False
    """
    return str(_keyed_uuid(key, "client", instance_id.lower(), client_id))


def successor_device_token(deleted_device_token: str, *, key: DeviceTokenKey) -> str:
    """The DeviceToken a ClientId gets when it registers again after the deletion of ``deleted_device_token``.

    Deterministic (so a duplicate of that later registration finds the same claim) and new (a deleted user's
    DeviceToken, which its old SDK install may still hold, never names the new user). A ClientId deleted n times
    walks n tombstones to its current DeviceToken.

    Example
    -------
    >>> from telematics_reg.credentials import DeviceTokenKey
    >>> key = DeviceTokenKey("k" * 32)
    >>> first = device_token_for("3c1c8fd7-4133-404a-82e9-93a015d85362", "customer-42", key=key)
    >>> successor_device_token(first, key=key) != first
    True
    """
    return str(_keyed_uuid(key, "after-deletion", deleted_device_token.lower()))


def bulk_device_tokens(
    instance_id: str, request_id: str, start: int, count: int, *, key: DeviceTokenKey
) -> list[uuid.UUID]:
    """DeviceTokens for the users of a bulk chunk, used if CreateMany is not offered and Creates stand in."""
    return [_keyed_uuid(key, "bulk", instance_id.lower(), request_id, n) for n in range(start, start + count)]


def stamp_request_id(body: str, request_id: str) -> str:
    """``body`` (a bulk request's JSON) with ``RequestId`` set, unless it already names one.

    A bulk without ``RequestId`` is known by the id of the message that first brought it; a re-sent body (a
    redrive, a dead letter sent back) gets a new message id, so the id goes into the body itself.

    Example
    -------
    >>> stamp_request_id('{"Quantity": 5}', "m-1")
    '{"Quantity": 5, "RequestId": "m-1"}'
    >>> stamp_request_id('{"quantity": 5, "requestId": "load-7"}', "m-1")
    '{"quantity": 5, "requestId": "load-7"}'
    """
    try:
        document = json.loads(body)
    except ValueError:
        return body
    if not isinstance(document, dict):
        return body
    keys = [k for k in document if isinstance(k, str) and k.lower() in _REQUEST_ID_KEYS]
    if any(document[k] not in (None, "") for k in keys):
        return body
    for key in keys:
        del document[key]
    document["RequestId"] = request_id
    return json.dumps(document, ensure_ascii=False)


def tokens_of(result: CreateResult, now: float) -> Tokens | None:
    """The stored form of an upstream result's tokens (``None`` when it carried none)."""
    if result.access_token is None or result.refresh_token is None:
        return None
    expires_at = result.expires_at(now)
    assert expires_at is not None
    return Tokens(
        access_token=result.access_token.token.get_secret_value(),
        refresh_token=result.refresh_token.get_secret_value(),
        expires_at=int(expires_at.timestamp()),
    )


@dataclass(frozen=True)
class _Chunk:
    instance: str
    instance_id: str
    request_id: str
    index: int

    @property
    def key(self) -> str:
        return f"Chunk{self.index}"

    @property
    def tag(self) -> str:
        """``BulkChunk`` of the users this chunk's call made."""
        return chunk_key(self.request_id, self.index)


class _ChunkProblem(Exception):  # internal control flow, never escapes register_bulk
    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e.key}: {e.message}" for e in errors))


class UserErasedError(TelematicsError):
    """The registration occurred before the deletion of its user (a redelivery, a late duplicate): it never
    recreates the user nor calls the upstream; it is dropped and announced with reason ``user_deleted``."""

    reason = "user_deleted"

    def __init__(self, device_token: str, deleted_at: int | None) -> None:
        super().__init__(f"user_deleted: {device_token} was deleted at {deleted_at} (epoch ms), after it occurred")
        self.device_token = device_token
        self.deleted_at = deleted_at


class RegistrationInProgressError(TelematicsError):
    """Another delivery of the same user (or bulk chunk) is registering it right now: retry later."""


class BulkDeferredError(TelematicsError):
    """Too little of the invocation's time is left to start another chunk (or Create) safely: the bulk goes on
    in a later delivery, from where this one stopped.

    ``stored`` counts the users this delivery made and stored before it stopped: with some, the queue function
    sends the bulk back onto its queue itself (progress costs no receive); with none, the message is retried.
    """

    def __init__(self, message: str, *, stored: int = 0) -> None:
        super().__init__(message)
        self.stored = stored


class BulkRequestConflictError(TelematicsError):
    """The ``RequestId`` already names a bulk of another size: refused, never reported as the other one."""

    reason = "request_id_conflict"

    def __init__(self, request_id: str, recorded: int, asked: int) -> None:
        self.errors = [
            FieldError(
                "RequestId",
                f"already used by a bulk of {recorded} users, this message asks for {asked}: "
                "send a new bulk with a new RequestId",
            )
        ]
        super().__init__(f"request_id_conflict: bulk {request_id} has Quantity {recorded}, not {asked}")


class BulkIncompleteError(TelematicsError):
    """Some chunks of a bulk request cannot be completed automatically (lost answers or rejections)."""

    def __init__(self, reason: str, errors: list[FieldError]) -> None:
        self.reason = reason
        self.errors = errors
        super().__init__(f"{reason}: " + "; ".join(f"{e.key}: {e.message}" for e in errors))


@dataclass(frozen=True)
class RegistrationOutcome:
    device_token: str
    duplicate: bool
    has_tokens: bool


@dataclass(frozen=True)
class BulkOutcome:
    request_id: str
    quantity: int
    stored: int
    chunks_done_now: int
    device_tokens: list[str] = field(default_factory=list, repr=False)


class RegistrationService:
    """Registers users upstream and stores them. One instance serves many threads."""

    def __init__(
        self,
        *,
        upstream: UserService,
        store: TokenStore,
        credentials: CredentialsProvider,
        device_token_key: DeviceTokenKeyProvider,
        publisher: EventPublisher,
        claim_seconds: int = 120,
        wait_for_other_seconds: float = 5.0,
        bulk_upstream: UserService | None = None,
        bulk_call_seconds: float = 20.0,
        bulk_attempts: int = 4,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """See the module docstring.

        ``claim_seconds`` bounds how long a registration claim or a bulk chunk's call is presumed alive: at
        least the function timeout plus clock skew between workers. ``bulk_upstream`` serves bulk chunks (one
        attempt per call, so that ``bulk_call_seconds``, the longest such call plus storing its users, holds;
        ``bulk_attempts`` bounds the retries made here). Without it, ``upstream`` is used.
        """
        self._upstream = upstream
        self._bulk_upstream = bulk_upstream or upstream
        self._bulk_call_seconds = bulk_call_seconds
        self._bulk_attempts = max(1, bulk_attempts)
        self._store = store
        self._credentials = credentials
        self._device_token_key = device_token_key
        self._publisher = publisher
        self._claim_seconds = claim_seconds
        self._wait_for_other = wait_for_other_seconds
        self._clock = clock
        self._sleep = sleep

    # ------------------------------------------------------------------------------------------ single

    def register(self, request: RegistrationRequest, *, source: Source, message_id: str) -> RegistrationOutcome:
        """Register one user, or report the one already registered for its (Instance, ClientId).

        Raises
        ------
        UnknownInstanceError, UpstreamValidationError
            Permanent: the message goes to the dead-letter queue.
        RegistrationInProgressError, RetryableUpstreamError, UnauthorizedError, OutcomeUnknownError, StoreError
            Transient: the message is retried (the claim makes the retry safe).
        """
        creds = self._credentials.get(request.instance)
        instance_id = str(creds.instance_id)
        device_token = self._device_token_of(request, instance_id)
        owner = f"{message_id}/{uuid.uuid4()}"

        device_token, existing = self._claim_or_find(request, instance_id, device_token, owner)
        if existing is not None:
            logger.info("ClientId already registered", extra={"device_token": device_token, "duplicate": True})
            outcome = RegistrationOutcome(device_token, duplicate=True, has_tokens=existing.tokens is not None)
            self._announce(request, outcome, source)
            return outcome

        try:
            result = self._upstream.create(creds, request.create_body(uuid.UUID(device_token)))
        except UnauthorizedError:
            self._credentials.invalidate()
            self._store.release_claim(device_token=device_token, owner=owner)
            raise
        except (UpstreamValidationError, RetryableUpstreamError, OutcomeUnknownError):
            # None of these left a user we could lose: a rejection or a never-processed call made none, and an
            # unknown outcome of a CustomToken Create is recovered by the next attempt (Create answers "exists",
            # Login fetches the tokens). Give the claim back so that attempt does not wait for it to expire.
            self._store.release_claim(device_token=device_token, owner=owner)
            raise

        if str(result.device_token) != device_token:
            logger.error(
                "upstream did not honour CustomToken",
                extra={"device_token": device_token, "client_id": request.client_id},
            )
        tokens = tokens_of(result, self._clock())
        self._complete(device_token, owner, tokens)
        outcome = RegistrationOutcome(device_token, duplicate=False, has_tokens=tokens is not None)
        self._announce(request, outcome, source)
        return outcome

    def _device_token_of(self, request: RegistrationRequest, instance_id: str) -> str:
        """The stored DeviceToken of this (Instance, ClientId) if it has one, else the one derived with the key.

        Stored first: a user registered before the key existed (UUIDv5 DeviceTokens) or under another key keeps
        its DeviceToken, so a redelivery claims that user's item and is reported as a duplicate, or takes over
        its expired claim and repeats the same CustomToken; it never derives a new token and makes a second
        user. (Only a claim written moments ago, not yet in the eventually consistent ByClient index, can be
        missed here; that window matters only in the minutes around a change of derivation: README, "Secrets".)
        """
        stored = self._store.find_by_client(request.instance, request.client_id)
        if stored is not None and stored.instance_id.lower() == instance_id.lower():
            return stored.device_token
        return device_token_for(instance_id, request.client_id, key=self._device_token_key.get())

    def _claim_or_find(
        self, request: RegistrationRequest, instance_id: str, device_token: str, owner: str
    ) -> tuple[str, UserRecord | None]:
        """Claim the user (returns its DeviceToken and None) or return the registered record; waits a little for a
        live claim. A tombstone (the ClientId was deleted) stops a registration that occurred before the deletion
        (:class:`UserErasedError`); one that occurred after it is a new user, at the tombstone's successor::

            D: delete at T -> tombstone(dt0, DeletedAt T)
            R (occurred t <= T, redelivered): claim dt0 fails, tombstone, t <= T ..... dropped, no upstream call
            R' (occurred t > T): claim dt0 fails, tombstone ..... claim dt1 = successor(dt0) -> Create dt1
        """
        deadline = self._clock() + self._wait_for_other
        delay = 0.1
        while True:
            # Claim first: a new user (the common case) costs one write; only a lost claim needs a read.
            claimed = self._store.claim_registration(
                device_token=device_token,
                instance=request.instance,
                instance_id=instance_id,
                client_id=request.client_id,
                owner=owner,
                now=self._clock(),
                ttl=self._claim_seconds,
            )
            if claimed is not None:
                return device_token, None
            existing = self._store.get_user(device_token)
            if existing is not None and existing.status.erased:
                occurred = request.occurred_at_ms
                if occurred is None or existing.deleted_at is None or occurred <= existing.deleted_at:
                    raise UserErasedError(device_token, existing.deleted_at)
                device_token = successor_device_token(device_token, key=self._device_token_key.get())
                continue
            if existing is not None and existing.status is not UserStatus.PENDING:
                return device_token, existing
            if self._clock() >= deadline:
                raise RegistrationInProgressError(f"registration of {device_token} is in progress elsewhere")
            self._sleep(delay)
            delay = min(1.0, delay * 2)

    def _complete(self, device_token: str, owner: str, tokens: Tokens | None) -> None:
        # The upstream user exists now; storing it is retried hard. If it still fails, the claim expires and the
        # next delivery's Create answers "exists" and Login recovers the tokens: the user is not lost.
        for attempt in range(6):
            try:
                self._store.complete_registration(
                    device_token=device_token, owner=owner, tokens=tokens, now=self._clock()
                )
                return
            except ConditionFailedError:
                # Our claim expired and another delivery took over: it stores the user.
                logger.warning("claim taken over before completion", extra={"device_token": device_token})
                return
            except StoreError:
                if attempt == 5:
                    raise
                self._sleep(min(2.0, 0.1 * 2**attempt))

    def _announce(self, request: RegistrationRequest, outcome: RegistrationOutcome, source: Source) -> None:
        self._publisher.publish(
            UserRegistered(
                device_token=outcome.device_token,
                instance=request.instance,
                client_id=request.client_id,
                duplicate=outcome.duplicate,
                has_tokens=outcome.has_tokens,
                source=source,
            )
        )

    # -------------------------------------------------------------------------------------------- bulk

    def register_bulk(
        self,
        request: BulkRegistrationRequest,
        *,
        source: Source,
        message_id: str,
        time_left: Callable[[], float] | None = None,
    ) -> BulkOutcome:
        """Register ``Quantity`` anonymous users, each stored; never doubled by a redelivery, a twin or a redrive.

        Parameters
        ----------
        request
            The bulk. Its ``RequestId`` (stamped by the intake from the message id when absent) names it across
            deliveries and redrives.
        source, message_id
            Where it came from.
        time_left
            Seconds the invocation has left (Lambda's remaining time). No chunk, and no Create of a per-user
            chunk, starts with less than ``bulk_call_seconds`` left: the rest is left to the next delivery.

        Raises
        ------
        BulkDeferredError, RegistrationInProgressError
            Continue later: time ran short (``stored`` says how many users this delivery stored first), or
            another delivery is calling a chunk right now.
        BulkIncompleteError, BulkRequestConflictError
            Permanent: dead-lettered with the reason.
        """
        creds = self._credentials.get(request.instance)
        instance_id = str(creds.instance_id)
        request_id = request.request_id or message_id
        progress = self._store.start_bulk(
            instance=request.instance,
            request_id=request_id,
            quantity=request.quantity,
            chunk_size=CREATE_MANY_CHUNK,
            now=self._clock(),
        )
        if progress.quantity != request.quantity or progress.chunk_size != CREATE_MANY_CHUNK:
            raise BulkRequestConflictError(request_id, progress.quantity, request.quantity)
        owner = f"{message_id}/{uuid.uuid4()}"
        bodies = request.create_many_bodies(CREATE_MANY_CHUNK)
        problems: list[FieldError] = []
        stored_now: list[str] = []
        done_now = 0
        for index, seen in sorted(progress.chunks.items()):
            if seen is ChunkState.DONE:
                continue
            chunk = _Chunk(progress.instance, instance_id, request_id, index)
            if seen in (ChunkState.UNKNOWN, ChunkState.FAILED):
                problems.append(FieldError(chunk.key, f"{seen.value}: not retried automatically"))
                continue
            abandoned = None
            if seen is ChunkState.CALLING:
                abandoned = self._abandoned_claim(chunk, progress.claims.get(index), per_user=index in progress.made)
                if abandoned is None:
                    problems.append(FieldError(chunk.key, "UNKNOWN: not retried automatically"))
                    continue
            if time_left is not None and time_left() < self._bulk_call_seconds:
                raise BulkDeferredError(
                    f"bulk {request_id}: too little time left for {chunk.key}; continued later", stored=len(stored_now)
                )
            try:
                users = self._register_chunk(
                    chunk, creds, bodies[index], owner, abandoned, progress.made.get(index), time_left
                )
            except _ChunkProblem as problem:
                problems.extend(problem.errors)
                continue
            except BulkDeferredError as exc:  # a per-user chunk stopped part-way: count the chunks before it too
                raise BulkDeferredError(str(exc), stored=len(stored_now) + exc.stored) from None
            except (RetryableUpstreamError, UnauthorizedError, OutcomeUnknownError) as exc:
                # Nothing of this chunk is lost (put back, or resumable). Having stored users, this delivery hands the
                # rest on like a stop for time, so that transient failures of a long bulk never spend its receives.
                if stored_now:
                    raise BulkDeferredError(
                        f"bulk {request_id}: {chunk.key} not finished ({type(exc).__name__}); continued later",
                        stored=len(stored_now),
                    ) from None
                raise
            done_now += 1
            stored_now.extend(u.device_token for u in users)
            self._announce_bulk(users)

        if problems:
            raise BulkIncompleteError("bulk_incomplete", problems)
        final = self._store.start_bulk(
            instance=request.instance,
            request_id=request_id,
            quantity=request.quantity,
            chunk_size=CREATE_MANY_CHUNK,
            now=self._clock(),
        )
        return BulkOutcome(request_id, request.quantity, sum(final.stored.values()), done_now, stored_now)

    def _abandoned_claim(self, chunk: _Chunk, claim: ChunkClaim | None, *, per_user: bool) -> ChunkClaim | None:
        """The claim of a CALLING chunk once it is abandoned; raises while its holder may still be calling.

        A holder is alive until its start plus ``claim_seconds`` (the function timeout plus clock skew between
        workers): a duplicate delivery arriving meanwhile retries later, it never judges the chunk lost. Returns
        None when the chunk must be reported instead (its CreateMany call died mid-way: UNKNOWN).
        """
        if claim is not None and claim.since + self._claim_seconds >= self._clock():
            raise RegistrationInProgressError(f"bulk {chunk.request_id} {chunk.key} is being registered elsewhere")
        if claim is not None and per_user:
            return claim  # one Create per user, each stored as it is made: safe to take over and resume
        # A CreateMany died mid-call: its users may exist upstream. Never called again; reported.
        with contextlib.suppress(ConditionFailedError):
            self._move_chunk(
                chunk, [ChunkState.CALLING], ChunkState.UNKNOWN, owner=claim.owner if claim is not None else None
            )
        return None

    def _register_chunk(
        self,
        chunk: _Chunk,
        creds: InstanceCredentials,
        body: CreateManyRequest,
        owner: str,
        abandoned: ChunkClaim | None,
        made: int | None,
        time_left: Callable[[], float] | None,
    ) -> list[NewUser]:
        """Call one chunk and store its users; raises _ChunkProblem when it must be reported."""
        try:
            self._store.claim_chunk(
                instance=chunk.instance,
                request_id=chunk.request_id,
                index=chunk.index,
                owner=owner,
                now=self._clock(),
                abandoned=abandoned,
            )
        except ConditionFailedError:
            raise RegistrationInProgressError(f"bulk {chunk.request_id} {chunk.key} is being registered") from None
        if made is not None:
            return self._register_per_user(chunk, creds, body, owner, made, time_left)
        try:
            results = self._with_retries(
                lambda: self._bulk_upstream.create_many(creds, body, fallback=False), time_left
            )
        except NotFoundError:
            # CreateMany is not offered. Recorded before the first Create, so that no delivery ever calls
            # CreateMany for this chunk again: its users are made one by one, each stored as it is made.
            made = self._store.make_chunk_per_user(
                instance=chunk.instance, request_id=chunk.request_id, index=chunk.index, owner=owner
            )
            return self._register_per_user(chunk, creds, body, owner, made, time_left)
        except (RetryableUpstreamError, UnauthorizedError) as exc:
            # Provably not processed: put the chunk back and let the message be retried.
            self._move_chunk(chunk, [ChunkState.CALLING], ChunkState.TODO, owner=owner)
            if isinstance(exc, UnauthorizedError):
                self._credentials.invalidate()
            raise
        except OutcomeUnknownError as exc:
            self._move_chunk(chunk, [ChunkState.CALLING], ChunkState.UNKNOWN, owner=owner)
            raise _ChunkProblem([FieldError(chunk.key, f"outcome unknown ({exc.message}); not retried")]) from None
        except UpstreamValidationError as exc:
            self._move_chunk(chunk, [ChunkState.CALLING], ChunkState.FAILED, owner=owner)
            errors = [FieldError(f"{chunk.key}.{e.key}", e.message) for e in exc.errors]
            raise _ChunkProblem([*errors, FieldError(chunk.key, f"rejected: {exc}")]) from None
        users = self._new_users(chunk, results)
        self._store_answer(chunk, users, owner, time_left)
        return users

    def _store_answer(
        self, chunk: _Chunk, users: list[NewUser], owner: str, time_left: Callable[[], float] | None
    ) -> None:
        """Store a CreateMany answer we hold, then move its chunk to DONE; nothing else happens in between.

        CreateMany takes no CustomToken: an answer that is not stored cannot be fetched again, and its users would
        wait for adoption and then a Login each. So a failed write is retried while the invocation has time, from
        the batch that failed. Every user carries ``BulkChunk``, so users stored before the runner died (or before
        time ran out) are counted by adoption as this chunk's. When time runs out the chunk is reported at once
        (UNKNOWN) instead of being left CALLING until its claim lapses::

            D1:  CreateMany -> 50 | put 0-24 ok | put 25-49 throttled, retried, ok | DONE | announce 50
            D1': CreateMany -> 50 | put 0-24 ok | put 25-49 keeps failing, time short | UNKNOWN | retried
            D1": CreateMany -> 50 | put 0-24 ok | --x killed: CALLING; the redelivery reports it once the claim lapsed
            reconcile (D1' and D1"): 25 stored under this chunk + 25 unstored in the window = 50: adopt 25, DONE
        """
        done = 0
        attempt = 0
        while True:
            try:
                while done < len(users):
                    batch = users[done : done + _STORE_BATCH]
                    self._store.put_new_users(batch, now=self._clock())
                    done += len(batch)
                    attempt = 0
                # UNKNOWN too: had this call outlived its claim, a later delivery reported the chunk; it is done.
                self._move_chunk(
                    chunk, [ChunkState.CALLING, ChunkState.UNKNOWN], ChunkState.DONE, stored=len(users), owner=owner
                )
                return
            except StoreError as exc:
                attempt += 1
                delay = random.uniform(0.0, min(2.0, 0.1 * 2**attempt))  # noqa: S311 - backoff jitter, not a secret
                left = time_left() if time_left is not None else float("inf")
                if attempt >= _STORE_ATTEMPTS or left - delay < _STORE_RESERVE_SECONDS:
                    self._report_unstored(chunk, owner, done, len(users), exc)
                logger.warning(
                    "storing a bulk chunk's users failed; retried",
                    extra={"request_id": chunk.request_id, "chunk": chunk.index, "stored": done, "error": str(exc)},
                )
                self._sleep(delay)

    def _report_unstored(self, chunk: _Chunk, owner: str, done: int, total: int, exc: StoreError) -> None:
        """Report a chunk whose answer could not all be stored, and raise ``exc``.

        UNKNOWN at once (its window closes now, and adoption stores the rest from the upstream's listing); the
        message is retried like any store failure, and its next delivery, with the table back, finishes the other
        chunks and reports this one (``bulk_incomplete``). If even this write fails, the chunk stays CALLING and
        the redelivery reports it once our claim lapsed.
        """
        logger.error(
            "a bulk chunk's answer could not all be stored: reported for adoption",
            extra={"request_id": chunk.request_id, "chunk": chunk.index, "stored": done, "made": total},
        )
        with contextlib.suppress(StoreError, ConditionFailedError):  # Condition: already reported by a redelivery
            self._move_chunk(chunk, [ChunkState.CALLING], ChunkState.UNKNOWN, owner=owner)
        raise exc

    def _register_per_user(
        self,
        chunk: _Chunk,
        creds: InstanceCredentials,
        body: CreateManyRequest,
        owner: str,
        made: int,
        time_left: Callable[[], float] | None,
    ) -> list[NewUser]:
        """Make a chunk one Create per user (CreateMany not offered), resuming after the ``made`` stored ones.

        Every user has a deterministic CustomToken, and each is stored (and counted) as it is made, so a
        delivery cut off anywhere leaves at most one user made and not stored: the one whose Create was in
        flight. The next delivery repeats that Create; "exists" means the cut-off one made it, and it is stored
        without tokens (TOKENLESS: they come by Login when first needed, within the Login budget) rather than
        spend a Login per resumed chunk now::

            D1: Create(T0) store T0 (Made=1) | Create(T1) --> upstream makes T1 --x cut off
            D2: (after D1's claim lapsed) takes over, resumes at Made=1: Create(T1) --> 422 exists
                store T1 TOKENLESS (Made=2) | Create(T2) ...
        """
        tokens = bulk_device_tokens(
            chunk.instance_id,
            chunk.request_id,
            chunk.index * CREATE_MANY_CHUNK,
            body.quantity,
            key=self._device_token_key.get(),
        )
        flags = body.custom_fields
        user_fields = (
            UserFields(
                enable_tracking=flags.enable_tracking, enable_logging=flags.enable_logging, enabled=flags.enabled
            )
            if flags is not None
            else None
        )
        made_now: list[NewUser] = []
        for position in range(made, body.quantity):
            if time_left is not None and time_left() < self._bulk_call_seconds:
                self._move_chunk(chunk, [ChunkState.CALLING], ChunkState.TODO, owner=owner)
                self._announce_bulk(made_now)
                raise BulkDeferredError(
                    f"bulk {chunk.request_id} {chunk.key}: {position} of {body.quantity} users made; "
                    "too little time left, continued later",
                    stored=len(made_now),
                )
            single = CreateUserRequest(
                create_access_token=body.create_access_token, user_fields=user_fields, custom_token=tokens[position]
            )
            try:
                # A lost answer is repeated at once: the CustomToken makes a second Create of this user "exists".
                result = self._with_retries(
                    functools.partial(self._bulk_upstream.create, creds, single, recover=False),
                    time_left,
                    repeat_unknown=True,
                )
                user = self._new_users(chunk, [result])[0]
            except UserAlreadyExistsError:
                # Made by a delivery cut off (or whose answer was lost) before it could store it.
                user = NewUser(
                    str(tokens[position]),
                    chunk.instance,
                    chunk.instance_id,
                    None,
                    chunk.request_id,
                    bulk_chunk=chunk.tag,
                )
            except (RetryableUpstreamError, UnauthorizedError, OutcomeUnknownError) as exc:
                # Nothing is lost: the users before this one are stored, and this one's Create is repeated with
                # the same CustomToken by the next delivery. Put the chunk back so it need not wait for the claim.
                self._move_chunk(chunk, [ChunkState.CALLING], ChunkState.TODO, owner=owner)
                self._announce_bulk(made_now)
                if isinstance(exc, UnauthorizedError):
                    self._credentials.invalidate()
                if made_now:
                    # Progress was made: hand the rest on (a continuation, no receive spent), as a stop for time.
                    raise BulkDeferredError(
                        f"bulk {chunk.request_id} {chunk.key}: {position} of {body.quantity} users made, then "
                        f"{type(exc).__name__}; continued later",
                        stored=len(made_now),
                    ) from None
                raise
            except UpstreamValidationError as exc:
                self._move_chunk(chunk, [ChunkState.CALLING], ChunkState.FAILED, owner=owner)
                self._announce_bulk(made_now)
                message = f"{position} of {body.quantity} users made and stored, then rejected: {exc}"
                raise _ChunkProblem([FieldError(chunk.key, message)]) from None
            if user.device_token != str(tokens[position]):
                logger.error("upstream did not honour CustomToken", extra={"device_token": str(tokens[position])})
            try:
                self._store.store_chunk_user(
                    instance=chunk.instance,
                    request_id=chunk.request_id,
                    index=chunk.index,
                    owner=owner,
                    position=position,
                    user=user,
                    now=self._clock(),
                )
            except ConditionFailedError:
                # Our claim was judged abandoned and taken over: the taker repeats this Create and stores it.
                self._announce_bulk(made_now)
                raise RegistrationInProgressError(f"bulk {chunk.request_id} {chunk.key} was taken over") from None
            except StoreError:
                with contextlib.suppress(StoreError, ConditionFailedError):
                    self._move_chunk(chunk, [ChunkState.CALLING], ChunkState.TODO, owner=owner)
                self._announce_bulk(made_now)
                raise
            made_now.append(user)
        self._move_chunk(chunk, [ChunkState.CALLING], ChunkState.DONE, stored=body.quantity, owner=owner)
        return made_now

    def _with_retries(
        self, call: Callable[[], _T], time_left: Callable[[], float] | None, *, repeat_unknown: bool = False
    ) -> _T:
        """``call`` (one attempt on the bulk client), retried after not-processed failures while time allows, and
        after a lost answer too when ``repeat_unknown`` (a call that cannot make a duplicate: a Create with its
        CustomToken).

        The bulk client makes a single attempt per call, so one call lasts at most its connect and read timeouts:
        that is what ``bulk_call_seconds`` reserves. Retries happen here, each only if a whole call still fits.
        """
        retried: tuple[type[Exception], ...] = (
            (RetryableUpstreamError, OutcomeUnknownError) if repeat_unknown else (RetryableUpstreamError,)
        )
        for attempt in range(self._bulk_attempts):
            try:
                return call()
            except retried as exc:
                delay = random.uniform(0.0, min(5.0, 0.2 * 2**attempt))  # noqa: S311 - backoff jitter, not a secret
                if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
                left = time_left() if time_left is not None else float("inf")
                if attempt + 1 >= self._bulk_attempts or left - delay < self._bulk_call_seconds or delay > 30:
                    raise
                self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _new_users(self, chunk: _Chunk, results: Sequence[CreateResult]) -> list[NewUser]:
        now = self._clock()
        return [
            NewUser(
                device_token=str(r.device_token),
                instance=chunk.instance,
                instance_id=chunk.instance_id,
                tokens=tokens_of(r, now),
                bulk_request_id=chunk.request_id,
                bulk_chunk=chunk.tag,
            )
            for r in results
        ]

    def _move_chunk(
        self,
        chunk: _Chunk,
        expected: list[ChunkState],
        new: ChunkState,
        stored: int | None = None,
        owner: str | None = None,
    ) -> None:
        self._store.set_chunk_state(
            instance=chunk.instance,
            request_id=chunk.request_id,
            index=chunk.index,
            expected=expected,
            new=new,
            stored=stored,
            now=self._clock(),
            owner=owner,
        )

    def _announce_bulk(self, users: Sequence[NewUser]) -> None:
        # Best effort: the users are stored (and listed by the CLI) whether or not their events went out.
        if not users:
            return
        try:
            self._publisher.publish_many(
                [
                    UserRegistered(
                        device_token=user.device_token,
                        instance=user.instance,
                        bulk_request_id=user.bulk_request_id,
                        has_tokens=user.tokens is not None,
                        source="bulk",
                    )
                    for user in users
                ]
            )
        except Exception:  # noqa: BLE001 - an event is a notification; the stored users are the record
            logger.exception("could not publish bulk registration events")
