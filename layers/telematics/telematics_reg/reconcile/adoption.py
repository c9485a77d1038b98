"""Adoption of a lost CreateMany chunk: the users its lost answer left upstream, found and stored, never guessed.

A chunk ends ``UNKNOWN`` when its CreateMany answer was lost, when its caller died mid-call or while storing the
answer (a redelivery judges the claim abandoned; adoption judges it too), or when the table kept refusing the answer.
Up to 100 users may then exist upstream with no token stored, or only some of them stored. The token store keeps the
call's window (``Since<n>`` .. ``Ended<n>``), records every chunk call of the instance (``CHUNKCALLS#``), and tags
every user a chunk's own call stored with ``BulkChunk`` (``<RequestId>#<n>``), so adoption can ask the upstream who
they are:

1. Wait until every call that could overlap the window has ended and stored its users: the window's end plus a
   claim (a call never outlives its claim) plus the clock skew.
2. Refuse when another chunk's call of the same instance overlapped the window and is not settled (not ``DONE``):
   its users and ours cannot be told apart.
3. List the instance's users created in the window (GetFilteredPage, ``DateCreatedFrom``/``To`` widened by a
   margin for the upstream's clock) that carry no ClientId. Count those stored under this chunk (``BulkChunk``, or
   ``AdoptedFrom`` by an earlier run cut off part-way) and those not in our table (the candidates); a user stored
   under any other chunk or request is never counted.
4. Stored under the chunk plus candidates is exactly the chunk's size: store the candidates ``TOKENLESS`` under the
   bulk request, in the refresh index with their due times spread at the fleet's Login pace (the refresh worker logs
   each in within the Login budget), publish ``TelematicsUserRegistered`` for every user of the chunk (those its own
   call stored were never announced), and move the chunk to ``DONE``. Anything else is reported to an operator with
   the candidates (log, metric ``AdoptionNeedsOperator``, note ``Adoption<n>`` on the bulk item).

Each step is safe to repeat: users are put with ``attribute_not_exists`` and tagged ``AdoptedFrom``, events go out
before ``DONE`` (at least once), and the chunk moves to ``DONE`` only from ``UNKNOWN``. A run killed between two
writes leaves stored users that the next run counts as the chunk's::

    call:  CreateMany -> 50 | put 25 (BulkChunk R#0) --x killed          chunk CALLING, then UNKNOWN
    run 1: list: 25 stored under R#0 + 25 unstored = 50 | put 10 --x     chunk UNKNOWN
    run 2: list: 35 stored under R#0 + 15 unstored = 50 | put 15 | announce 50 | UNKNOWN -> DONE

:meth:`ChunkAdopter.retry_unmade` is the operator's way back for a chunk that provably made nobody (its call never
reached the upstream): it is given back to the bulk (``TODO``) for the bulk's next delivery to call.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal
from uuid import UUID

from aws_lambda_powertools.metrics import MetricUnit

from telematics_reg.observability import logger, metrics
from telematics_reg.outcomes import EventPublisher, UserRegistered
from telematics_reg.reconcile.records import AdoptedUser
from telematics_reg.store import (
    BulkProgress,
    ChunkClaim,
    ChunkState,
    ConditionFailedError,
    UserStatus,
    chunk_key,
    iso,
    pending_key,
)

if TYPE_CHECKING:
    from pydantic import SecretStr

    from telematics_reg.credentials import CredentialsProvider
    from telematics_reg.management_models import ManagedUser, UserPage, UserPageQuery
    from telematics_reg.reconcile.admin import AdminTokenSource
    from telematics_reg.reconcile.records import AdoptionRecords, StoredUser
    from telematics_reg.upstream import UserService

Outcome = Literal["adopted", "would_adopt", "waiting", "needs_operator", "settled", "reopened", "would_reopen"]
#: Candidates named in a note on the bulk item (the log line names them all).
_NOTE_CANDIDATES = 120
#: Statuses of a stored user that is announced when its chunk is adopted.
_LIVE = frozenset({UserStatus.ACTIVE, UserStatus.TOKENLESS, UserStatus.NEEDS_RELOGIN})


@dataclass(frozen=True)
class ChunkAdoption:
    """What adoption did (or would do) with one chunk."""

    instance: str
    request_id: str
    index: int
    outcome: Outcome
    reason: str
    expected: int = 0
    candidates: list[str] = field(default_factory=list)
    window: tuple[str, str] | None = None
    adopted: int = 0
    #: Users found stored under the chunk (by its own call before it died, or adopted by an earlier run).
    stored: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "Instance": self.instance,
            "RequestId": self.request_id,
            "Chunk": self.index,
            "Outcome": self.outcome,
            "Reason": self.reason,
            "Expected": self.expected,
            "Candidates": self.candidates,
            "Window": list(self.window) if self.window else None,
            "Adopted": self.adopted,
            "StoredUnderChunk": self.stored,
        }


class ChunkAdopter:
    """Adopts the users of lost CreateMany chunks (see the module docstring).

    Parameters
    ----------
    claim_seconds
        The registration claim (``CLAIM_SECONDS``): no chunk call outlives it.
    clock_skew_seconds
        The most two of our workers' clocks differ.
    window_margin_seconds
        Widens the listed window on both sides: the upstream's clock against ours.
    refresh_margin_seconds
        The sweeper's margin: an adopted user is due (queued) once its ``AccessExpiresAt`` is this close.
    login_interval_seconds
        Seconds between the due times of two adopted users: the fleet's Login pace.
    """

    def __init__(
        self,
        *,
        upstream: UserService,
        admin: AdminTokenSource,
        records: AdoptionRecords,
        credentials: CredentialsProvider,
        publisher: EventPublisher,
        claim_seconds: int,
        clock_skew_seconds: int,
        window_margin_seconds: int = 60,
        refresh_margin_seconds: int = 900,
        login_interval_seconds: float = 20.0,
        page_size: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._upstream = upstream
        self._admin = admin
        self._records = records
        self._credentials = credentials
        self._publisher = publisher
        self._claim = claim_seconds
        self._skew = clock_skew_seconds
        self._margin = window_margin_seconds
        self._refresh_margin = refresh_margin_seconds
        self._pace = login_interval_seconds
        self._page_size = page_size
        self._clock = clock
        self.upstream_calls = 0

    # --------------------------------------------------------------------------------------------- entry points

    def adopt_pending(
        self, *, time_left: Callable[[], float] | None = None, reserve: float = 30.0
    ) -> list[ChunkAdoption]:
        """Every chunk the token store recorded as UNKNOWN (``ADOPTIONS#PENDING``), while time allows.

        A chunk still waiting stays pending for the next run; one adopted, settled or reported is dropped (a report
        stays on the bulk item; ``telematics-reg bulk adopt`` runs it again on demand).
        """
        results: list[ChunkAdoption] = []
        for key in sorted(self._records.pending_adoptions()):
            if time_left is not None and time_left() < reserve:
                break
            try:
                instance, request_id, index = json.loads(key)
            except (ValueError, TypeError):
                logger.error("malformed pending adoption dropped", extra={"key": key[:200]})
                self._records.drop_pending(key)
                continue
            progress = self._records.get_bulk(instance, request_id)
            if progress is None or index not in progress.chunks:
                self._records.drop_pending(key)
                continue
            result = self._adopt_chunk(progress, index, dry_run=False)
            results.append(result)
            if result.outcome != "waiting":
                self._records.drop_pending(key)
        return results

    def adopt_request(self, instance: str, request_id: str, *, dry_run: bool = False) -> list[ChunkAdoption]:
        """Adopt (or, with ``dry_run``, only judge) every lost chunk of one bulk request.

        Example
        -------
        >>> adopter.adopt_request("default", "load-2026-11-21", dry_run=True)  # doctest: +SKIP
        [ChunkAdoption(instance='default', request_id='load-2026-11-21', index=3, outcome='would_adopt', ...)]
        """
        progress = self._records.get_bulk(instance, request_id)
        if progress is None:
            raise LookupError(f"no bulk {request_id!r} for instance {instance!r}")
        results = []
        for index, state in sorted(progress.chunks.items()):
            if state in (ChunkState.UNKNOWN, ChunkState.CALLING) and index not in progress.made:
                result = self._adopt_chunk(progress, index, dry_run=dry_run)
                results.append(result)
                if not dry_run and result.outcome in ("adopted", "settled"):
                    self._records.drop_pending(pending_key(instance, request_id, index))
        return results

    def retry_unmade(self, instance: str, request_id: str, *, dry_run: bool = False) -> list[ChunkAdoption]:
        """Give back to the bulk (``TODO``) each lost chunk of one bulk that provably made nobody upstream; with
        ``dry_run``, only judge. The bulk's next delivery (its dead letter redriven) then calls those chunks again.

        Proof, for a chunk UNKNOWN (or CALLING past its claim): its call window is closed beyond any claim (as
        adoption waits), and the instance's users created from the call's start (less the margin) until now hold
        none of the chunk's: no user stored under it, and no user without ClientId that we do not store (any such
        user might be the chunk's, so it blocks the retry until adopted or decided). Never for a chunk made one Create
        per user: its redelivery resumes it by itself.

        Example
        -------
        >>> adopter.retry_unmade("default", "load-2026-11-21", dry_run=True)  # doctest: +SKIP
        [ChunkAdoption(instance='default', request_id='load-2026-11-21', index=3, outcome='would_reopen', ...)]
        """
        progress = self._records.get_bulk(instance, request_id)
        if progress is None:
            raise LookupError(f"no bulk {request_id!r} for instance {instance!r}")
        return [
            self._reopen_chunk(progress, index, dry_run=dry_run)
            for index, state in sorted(progress.chunks.items())
            if state in (ChunkState.UNKNOWN, ChunkState.CALLING) and index not in progress.made
        ]

    # ------------------------------------------------------------------------------------------------ one chunk

    def _closed_window(
        self, progress: BulkProgress, index: int, result: Callable[..., ChunkAdoption], *, dry_run: bool
    ) -> ChunkAdoption | tuple[ChunkClaim, int, int, float]:
        """The lost call's claim and listed window ``(claim, low, high, now)`` once every call that could overlap it
        has ended; else the result to return (waiting, settled, or no window to judge)."""
        instance, request_id = progress.instance, progress.request_id
        now = self._clock()
        state = progress.chunks[index]
        claim = progress.claims.get(index)
        if index in progress.made:
            return result("settled", "made one Create per user: its redelivery resumes it, nothing to adopt")
        if state is ChunkState.CALLING:
            if claim is not None and claim.since + self._claim + self._skew >= now:
                return result("waiting", "a delivery may still be calling it (its claim holds)")
            if claim is None:
                return result("needs_operator", "CALLING without a recorded claim: no call window")
            if not dry_run:
                try:
                    self._records.abandon_chunk(instance, request_id, index, claim, now=now)
                except ConditionFailedError:
                    return result("waiting", "the chunk moved on while being judged")
            ended = int(now)
        elif state is ChunkState.UNKNOWN:
            if claim is None:
                return result("needs_operator", "no call window recorded (lost before windows were kept)")
            ended = progress.ended.get(index, claim.since + self._claim)
        else:
            return result("settled", f"chunk is {state.value}")

        # No call outlives its claim: an abandoned call ended by since + claim, whenever it was judged.
        call_end = min(ended, claim.since + self._claim)
        low, high = claim.since - self._margin, call_end + self._margin
        ready_at = high + self._claim + self._skew
        if now < ready_at:
            return result(
                "waiting",
                f"overlapping calls may still be storing their users until {iso(ready_at)}",
                window=(iso(low), iso(high)),
            )
        return claim, low, high, now

    def _attributed(self, listed: list[ManagedUser], tag: str) -> tuple[list[StoredUser], list[str]]:
        """Of the listed users without ClientId: those stored as chunk ``tag``'s (by its own call, or adopted from it
        by an earlier run), and those not stored at all. A user stored under any other chunk or request is neither:
        it is never counted for this chunk."""
        anonymous = [str(u.device_token) for u in listed if not u.client_id]
        stored = self._records.users(anonymous)
        ours = [stored[token] for token in anonymous if token in stored and stored[token].of_chunk(tag)]
        unstored = [token for token in anonymous if token not in stored]
        return ours, unstored

    def _adopt_chunk(self, progress: BulkProgress, index: int, *, dry_run: bool) -> ChunkAdoption:
        instance, request_id = progress.instance, progress.request_id
        expected = progress.chunk_quantity(index)

        def result(outcome: Outcome, reason: str, **extra: object) -> ChunkAdoption:
            found = ChunkAdoption(instance, request_id, index, outcome, reason, expected, **extra)  # type: ignore[arg-type]
            self._report(found, dry_run=dry_run)
            return found

        judged = self._closed_window(progress, index, result, dry_run=dry_run)
        if isinstance(judged, ChunkAdoption):
            return judged
        _, low, high, now = judged
        window = (iso(low), iso(high))

        overlapping = self._unsettled_overlaps(progress, index, low, high)
        if overlapping:
            return result(
                "needs_operator",
                "calls of other chunks of the instance overlap this window and are not settled: "
                + ", ".join(overlapping),
                window=window,
            )

        creds = self._credentials.get(instance)
        listed = self._listed(str(creds.instance_id), low, high)
        ours, candidates = self._attributed(listed, chunk_key(request_id, index))
        found = len(ours) + len(candidates)
        counted = f"{len(candidates)} users without ClientId and not stored were created in the window" + (
            f", and {len(ours)} stored under this chunk: {found}" if ours else ""
        )
        if found != expected:
            word = "fewer" if found < expected else "more"
            return result(
                "needs_operator",
                f"{counted}, {word} than the chunk's {expected}",
                candidates=candidates,
                stored=len(ours),
                window=window,
            )
        if dry_run:
            return result(
                "would_adopt", f"{counted}: exactly the chunk's {expected}", candidates=candidates, stored=len(ours),
                window=window,
            )  # fmt: skip
        adopted = self._store(progress, index, candidates, creds_instance_id=str(creds.instance_id), now=now)
        # Announced before the chunk is DONE, so that a run cut off in between announces them again rather than never.
        # The users the chunk's own call stored were never announced: it died (or gave up) before the chunk was DONE.
        # (A user erased meanwhile is not announced again: a registration event never follows its deletion.)
        live = [(u.device_token, u.status is UserStatus.ACTIVE) for u in ours if u.status in _LIVE]
        self._announce(progress, live, candidates)
        if not self._records.finish_chunk(instance, request_id, index, expected, now=self._clock()):
            current = self._records.get_bulk(instance, request_id)
            settled = current.chunks.get(index) if current is not None else None
            if settled is not ChunkState.DONE:
                return result(
                    "waiting", f"chunk moved to {settled} meanwhile", candidates=candidates, stored=len(ours),
                    window=window,
                )  # fmt: skip
        return result(
            "adopted",
            f"{expected} users stored ({adopted} adopted now)",
            candidates=candidates,
            stored=len(ours),
            window=window,
            adopted=adopted,
        )

    def _reopen_chunk(self, progress: BulkProgress, index: int, *, dry_run: bool) -> ChunkAdoption:
        instance, request_id = progress.instance, progress.request_id
        expected = progress.chunk_quantity(index)

        def result(outcome: Outcome, reason: str, **extra: object) -> ChunkAdoption:
            found = ChunkAdoption(instance, request_id, index, outcome, reason, expected, **extra)  # type: ignore[arg-type]
            self._report(found, dry_run=dry_run)
            return found

        judged = self._closed_window(progress, index, result, dry_run=dry_run)
        if isinstance(judged, ChunkAdoption):
            return judged
        claim, low, _, now = judged
        # From the call's start until now, not only its window: a user of the chunk is seen whenever it was dated.
        window = (iso(low), iso(now + self._margin))
        creds = self._credentials.get(instance)
        listed = self._listed(str(creds.instance_id), low, int(now) + self._margin)
        ours, candidates = self._attributed(listed, chunk_key(request_id, index))
        if ours:
            return result(
                "needs_operator",
                f"not retried: {len(ours)} users are stored under this chunk, so its call made users "
                "(bulk adopt, without --retry-unmade, adopts the rest when the listing is unambiguous)",
                candidates=candidates,
                stored=len(ours),
                window=window,
            )
        if candidates:
            return result(
                "needs_operator",
                f"not retried: {len(candidates)} users without ClientId and not stored were created since the call "
                "began; any of them may be this chunk's (adopt the chunk, or settle the other lost chunks first)",
                candidates=candidates,
                window=window,
            )
        if dry_run:
            return result(
                "would_reopen",
                "none of its users upstream (none listed from the call's start until now): it can be called again",
                window=window,
            )
        if not self._records.reopen_chunk(instance, request_id, index, claim, now=self._clock()):
            return result("waiting", "the chunk moved on while being judged", window=window)
        self._records.drop_pending(pending_key(instance, request_id, index))
        return result(
            "reopened",
            "back to TODO: none of its users upstream; the bulk's next delivery calls it again (redrive its letter)",
            window=window,
        )

    def _unsettled_overlaps(self, progress: BulkProgress, index: int, low: int, high: int) -> list[str]:
        """Other chunk calls of the instance whose possible lifetime overlaps [low, high] and that are not DONE."""
        first = (low - self._claim - self._skew) // 60
        calls = self._records.chunk_calls(progress.instance, first, high // 60)
        bulks: dict[str, BulkProgress | None] = {progress.request_id: progress}
        found: list[str] = []
        for call in calls:
            if (call.request_id, call.index) == (progress.request_id, index):
                continue
            if call.since > high or call.since + self._claim + self._skew < low:
                continue
            if call.request_id not in bulks:
                bulks[call.request_id] = self._records.get_bulk(progress.instance, call.request_id)
            other = bulks[call.request_id]
            state = other.chunks.get(call.index) if other is not None else None
            per_user = other is not None and call.index in other.made
            # DONE: its users are stored. FAILED, or TODO of a CreateMany chunk: its call provably made nobody.
            if state is ChunkState.DONE or (not per_user and state in (ChunkState.FAILED, ChunkState.TODO)):
                continue
            found.append(f"{call.request_id} Chunk{call.index} ({state.value if state else 'unknown bulk'})")
        return found

    def _page(self, query: UserPageQuery, token: SecretStr) -> UserPage:
        return self._upstream.users_page(token, query)

    def _listed(self, instance_id: str, low: int, high: int) -> list[ManagedUser]:
        from telematics_reg.management_models import UserPageQuery, UserSort  # noqa: PLC0415 - see management_models

        query = UserPageQuery(
            instance_ids=[UUID(instance_id)],
            page_size=self._page_size,
            sort=UserSort.DATE_CREATED,
            show_inactive_users=True,
            include_account_info=False,
            date_created_from=datetime.fromtimestamp(low, UTC),
            date_created_to=datetime.fromtimestamp(high, UTC),
        )
        users: list[ManagedUser] = []
        while True:
            page = self._admin.call(functools.partial(self._page, query))
            self.upstream_calls += 1
            users.extend(page.users)
            if not page.has_next_page or not page.users:
                return users
            query = query.next_page()

    def _store(
        self, progress: BulkProgress, index: int, candidates: list[str], *, creds_instance_id: str, now: float
    ) -> int:
        """Put the adopted users (each once), due for Login one per ``login_interval_seconds``; returns how many this
        run put."""
        tag = chunk_key(progress.request_id, index)
        put = 0
        for position, device_token in enumerate(candidates):
            due_at = int(now + self._refresh_margin + position * self._pace)
            user = AdoptedUser(device_token, progress.instance, creds_instance_id, progress.request_id, tag, due_at)
            if self._records.put_adopted(user, now=now):
                put += 1
        metrics.add_metric("UsersAdopted", MetricUnit.Count, put)
        return put

    def _announce(self, progress: BulkProgress, stored: list[tuple[str, bool]], adopted: list[str]) -> None:
        """``TelematicsUserRegistered`` for every user of the chunk: ``stored`` (DeviceToken, has tokens) by its own
        call, and ``adopted``. At least once: a run cut off before the chunk is DONE announces them again."""
        users = [*stored, *((token, False) for token in adopted)]
        if not users:
            return
        try:
            self._publisher.publish_many(
                [
                    UserRegistered(
                        device_token=token,
                        instance=progress.instance,
                        bulk_request_id=progress.request_id,
                        has_tokens=has_tokens,
                        source="bulk",
                    )
                    for token, has_tokens in users
                ]
            )
        except Exception:  # noqa: BLE001 - the users are stored (the record); the events are notifications
            logger.exception("could not publish the adopted chunk's events")

    def _report(self, found: ChunkAdoption, *, dry_run: bool) -> None:
        extra = {"adoption": found.as_dict(), "dry_run": dry_run}
        if found.outcome == "needs_operator":
            logger.error("lost bulk chunk needs an operator: not adopted", extra=extra)
            if not dry_run:
                metrics.add_metric("AdoptionNeedsOperator", MetricUnit.Count, 1)
        else:
            logger.info(f"lost bulk chunk: {found.outcome}", extra=extra)
        if not dry_run and found.outcome in ("adopted", "needs_operator", "reopened"):
            note = {k: v for k, v in found.as_dict().items() if k not in {"Instance", "RequestId", "Chunk"}}
            note["Candidates"] = found.candidates[:_NOTE_CANDIDATES]
            note["At"] = iso(self._clock())
            self._records.note_chunk(found.instance, found.request_id, found.index, json.dumps(note), now=self._clock())
