"""Flows 1 and 2: a registration request becomes exactly one upstream user, stored with its tokens.

Exactly one user per (Instance, ClientId) rests on two things:

* the DeviceToken is chosen by us, deterministically (UUIDv5 of InstanceId and ClientId), and sent as the
  upstream's ``CustomToken``: a Create whose answer was lost is recovered by Login with that DeviceToken
  (the client does this), and a second Create with the same CustomToken cannot make a second user;
* a claim item written with a condition, so that two deliveries (duplicates, both functions at once) never
  both call Create: the loser waits briefly for the winner, then reports the stored DeviceToken.

A bulk request (``Quantity``) is split into CreateMany calls of at most 100 users. Each chunk's progress is
kept in the store and moves TODO -> CALLING -> DONE with conditional writes, so a redelivered message skips
what is done and a chunk whose answer was lost (CALLING left behind, or an unknown outcome) is never called
again: it is reported instead of doubled.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from telematics_reg.errors import (
    CreateManyIncompleteError,
    FieldError,
    OutcomeUnknownError,
    RetryableUpstreamError,
    TelematicsError,
    UnauthorizedError,
    UpstreamValidationError,
)
from telematics_reg.models import (
    BulkRegistrationRequest,
    CreateManyRequest,
    CreateResult,
    InstanceCredentials,
    RegistrationRequest,
)
from telematics_reg.observability import logger
from telematics_reg.outcomes import EventPublisher, Source, UserRegistered
from telematics_reg.store import (
    ChunkState,
    ConditionFailedError,
    NewUser,
    StoreError,
    Tokens,
    TokenStore,
    UserRecord,
    UserStatus,
)

if TYPE_CHECKING:  # annotations only: importing the client (and requests) is left to the function's set-up
    from telematics_reg.credentials import CredentialsProvider
    from telematics_reg.upstream import UserService

# Namespace of our deterministic DeviceTokens. Changing it would re-register every ClientId: never change it.
DEVICE_TOKEN_NAMESPACE = uuid.UUID("6f6b1c1e-5d0a-4c3e-9a57-2f1d8e4b7a10")
CREATE_MANY_CHUNK = 100


def device_token_for(instance_id: str, client_id: str) -> str:
    """The DeviceToken a ClientId of an instance always gets (sent upstream as ``CustomToken``).

    Example
    -------
    >>> device_token_for("3c1c8fd7-4133-404a-82e9-93a015d85362", "customer-42") == device_token_for(
    ...     "3c1c8fd7-4133-404a-82e9-93a015d85362", "customer-42")
    True
    """
    return str(uuid.uuid5(DEVICE_TOKEN_NAMESPACE, f"{instance_id.lower()}/client/{client_id}"))


def bulk_device_tokens(instance_id: str, request_id: str, start: int, count: int) -> list[uuid.UUID]:
    """DeviceTokens for the users of a bulk chunk, used if CreateMany is not offered and Creates stand in."""
    return [
        uuid.uuid5(DEVICE_TOKEN_NAMESPACE, f"{instance_id.lower()}/bulk/{request_id}/{n}")
        for n in range(start, start + count)
    ]


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


class _ChunkProblem(Exception):  # internal control flow, never escapes register_bulk
    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e.key}: {e.message}" for e in errors))


class RegistrationInProgressError(TelematicsError):
    """Another delivery of the same user (or bulk chunk) is registering it right now: retry later."""


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
        publisher: EventPublisher,
        claim_seconds: int = 120,
        wait_for_other_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._upstream = upstream
        self._store = store
        self._credentials = credentials
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
        device_token = device_token_for(instance_id, request.client_id)
        owner = f"{message_id}/{uuid.uuid4()}"

        existing = self._claim_or_find(request, instance_id, device_token, owner)
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

    def _claim_or_find(
        self, request: RegistrationRequest, instance_id: str, device_token: str, owner: str
    ) -> UserRecord | None:
        """Claim the user (returns None) or return the registered record; waits a little for a live claim."""
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
                return None
            existing = self._store.get_user(device_token)
            if existing is not None and existing.status is not UserStatus.PENDING:
                return existing
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

    def register_bulk(self, request: BulkRegistrationRequest, *, source: Source, message_id: str) -> BulkOutcome:
        """Register ``Quantity`` anonymous users, each stored; never doubled by a redelivery or a lost answer.

        ``RequestId`` (or, without it, the message id) identifies the bulk request across deliveries.
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
        bodies = request.create_many_bodies(CREATE_MANY_CHUNK)
        problems: list[FieldError] = []
        stored_now: list[str] = []
        done_now = 0
        for index, seen in sorted(progress.chunks.items()):
            if seen is ChunkState.DONE:
                continue
            chunk = _Chunk(progress.instance, instance_id, request_id, index)
            try:
                users = self._register_chunk(chunk, seen, creds, bodies[index])
            except _ChunkProblem as problem:
                problems.extend(problem.errors)
                continue
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

    def _register_chunk(
        self, chunk: _Chunk, seen: ChunkState, creds: InstanceCredentials, body: CreateManyRequest
    ) -> list[NewUser]:
        """Call CreateMany for one chunk and store its users; raises _ChunkProblem when it must be reported."""
        if seen is ChunkState.CALLING:
            # A previous delivery died or lost the answer mid-call: its users may exist. Never call again.
            self._move_chunk(chunk, [ChunkState.CALLING], ChunkState.UNKNOWN)
            seen = ChunkState.UNKNOWN
        if seen in (ChunkState.UNKNOWN, ChunkState.FAILED):
            raise _ChunkProblem([FieldError(chunk.key, f"{seen.value}: not retried automatically")])
        try:
            self._move_chunk(chunk, [ChunkState.TODO], ChunkState.CALLING)
        except ConditionFailedError:
            raise RegistrationInProgressError(f"bulk {chunk.request_id} {chunk.key} is being registered") from None
        fallback_tokens = bulk_device_tokens(
            chunk.instance_id, chunk.request_id, chunk.index * CREATE_MANY_CHUNK, body.quantity
        )
        try:
            results = self._upstream.create_many(creds, body, fallback_tokens)
        except (RetryableUpstreamError, UnauthorizedError) as exc:
            # Provably not processed: put the chunk back and let the message be retried.
            self._move_chunk(chunk, [ChunkState.CALLING], ChunkState.TODO)
            if isinstance(exc, UnauthorizedError):
                self._credentials.invalidate()
            raise
        except CreateManyIncompleteError as exc:
            # The one-Create-per-user fallback stopped part way: keep the users it did make, report the rest.
            self._store.put_new_users(self._new_users(chunk, exc.completed), now=self._clock())
            self._move_chunk(chunk, [ChunkState.CALLING], ChunkState.UNKNOWN)
            message = f"{len(exc.completed)} of {body.quantity} users made and stored, then: {exc.message}; not retried"
            raise _ChunkProblem([FieldError(chunk.key, message)]) from None
        except OutcomeUnknownError as exc:
            self._move_chunk(chunk, [ChunkState.CALLING], ChunkState.UNKNOWN)
            raise _ChunkProblem([FieldError(chunk.key, f"outcome unknown ({exc.message}); not retried")]) from None
        except UpstreamValidationError as exc:
            self._move_chunk(chunk, [ChunkState.CALLING], ChunkState.FAILED)
            errors = [FieldError(f"{chunk.key}.{e.key}", e.message) for e in exc.errors]
            raise _ChunkProblem([*errors, FieldError(chunk.key, f"rejected: {exc}")]) from None
        users = self._new_users(chunk, results)
        # Stored before DONE: if this fails the chunk stays CALLING and is reported, never called again.
        self._store.put_new_users(users, now=self._clock())
        # UNKNOWN too: a concurrent duplicate delivery may have given up on this chunk while we were calling.
        self._move_chunk(chunk, [ChunkState.CALLING, ChunkState.UNKNOWN], ChunkState.DONE, stored=len(users))
        return users

    def _new_users(self, chunk: _Chunk, results: Sequence[CreateResult]) -> list[NewUser]:
        now = self._clock()
        return [
            NewUser(
                device_token=str(r.device_token),
                instance=chunk.instance,
                instance_id=chunk.instance_id,
                tokens=tokens_of(r, now),
                bulk_request_id=chunk.request_id,
            )
            for r in results
        ]

    def _move_chunk(
        self, chunk: _Chunk, expected: list[ChunkState], new: ChunkState, stored: int | None = None
    ) -> None:
        self._store.set_chunk_state(
            instance=chunk.instance,
            request_id=chunk.request_id,
            index=chunk.index,
            expected=expected,
            new=new,
            stored=stored,
            now=self._clock(),
        )

    def _announce_bulk(self, users: Sequence[NewUser]) -> None:
        # Best effort: the users are stored (and listed by the CLI) whether or not their events went out.
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
