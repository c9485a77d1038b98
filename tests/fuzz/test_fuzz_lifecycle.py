"""Property-based tests of the lifecycle's way in: queue messages with an ``Action`` and the events the rule
delivers, against the in-memory fakes (issue 14's bad input, fuzzed).

Properties:

* every message ends applied, dropped with its reason, dead-lettered with its reason, or retried: nothing is lost,
  and nothing but a retryable error of the service escapes the intake;
* an invalid message (the parser is the contract; an ``Instance``/``ToInstance`` the secret does not hold; an
  ``OccurredAt`` in the future) is dead-lettered at once, never retried, and never reaches the upstream;
* no reason, error, outcome event or log line holds a token, a refresh token, an InstanceKey, the admin session or
  a profile value of the message;
* through the handler, a batch fails only records worth retrying.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from handle_lifecycle import handle_lifecycle_batch
from hypothesis import example, given, note
from hypothesis import strategies as st

from telematics_reg.batching import BatchFailedError
from telematics_reg.errors import InvalidMessageError, TelematicsError
from telematics_reg.intake import event_time_ms
from telematics_reg.lifecycle.changes import FUTURE_TOLERANCE_MS, LifecycleChange, parse_change
from telematics_reg.lifecycle.events import LifecycleFailed, UserDeleted
from telematics_reg.occurred import has_occurred_at

from .conftest import INPUTS
from .strategies import PROFILE_MARK, lifecycle_bodies
from .worlds import Lifecycle, captured_logs, leaks, new_lifecycle, new_world, world_secrets

#: The management calls a change makes upstream.
MANAGEMENT_CALLS = ("update_user", "delete_user", "change_instance", "admin_login", "admin_refresh")
#: Reasons a valid change may still be dead-lettered for (its user never came, or the upstream refused it).
VALID_BUT_DEAD = {"unknown_user", "not_found_upstream", "upstream_rejected"}
KNOWN_INSTANCES = {"default", "eu", "fleet-eu"}


def _world() -> Lifecycle:
    lc = new_lifecycle(new_world())
    for client_id in ("known-1", "known-2"):
        assert lc.register(client_id, occurred_ms=lc.ms(-600)) == "registered"
    return lc


def _contract(body: str, sent_ms: int) -> LifecycleChange | None:
    """The change ``body`` holds by the contract (ordered by its ``OccurredAt``, else its event's ``time``, else
    ``sent_ms``), or ``None`` when the service must refuse it as bad input."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    detail_type, fallback = None, sent_ms
    if isinstance(document, dict) and "detail-type" in document and "detail" in document:
        fallback = event_time_ms(document.get("time")) or sent_ms
        detail_type, document = str(document["detail-type"]), document["detail"]
        if not isinstance(document, dict):
            return None
    try:
        change = parse_change(document, detail_type=detail_type, fallback_ms=fallback)
    except InvalidMessageError:
        return None
    if change.instance not in KNOWN_INSTANCES or (change.to_instance or "default") not in KNOWN_INSTANCES:
        return None
    return change


def _future(change: LifecycleChange, now_ms: int) -> bool:
    return change.occurred_at > now_ms + FUTURE_TOLERANCE_MS


def _profile_values(body: str) -> list[str]:
    """The profile values the generator marked, wherever they stand in the body."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str) and value.startswith(PROFILE_MARK) and len(value) > len(PROFILE_MARK) + 3:
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    with contextlib.suppress(ValueError, RecursionError):
        walk(json.loads(body))
    return found


def _produced(lc: Lifecycle, log_lines: list[str]) -> list[str]:
    """Every text the service produced that is not a dead letter's body: reasons, errors, events, logs."""
    texts = list(log_lines)
    for letter in lc.dead_letters.letters:
        texts += [letter.reason, letter.detail()]
    texts += [json.dumps(event.detail()) for event in lc.world.publisher.events]
    texts += [r.last_error or "" for r in lc.world.store.users.values()]
    return texts


def _secrets(lc: Lifecycle) -> list[str]:
    found = [*world_secrets(lc.world), lc.eu.instance_key.get_secret_value()]
    session = lc.sessions.item
    if session is not None:
        found += [t for t in (session.access_token, session.refresh_token) if t]
    return found


def _management_calls(lc: Lifecycle) -> int:
    return sum(lc.world.upstream.calls[name] for name in MANAGEMENT_CALLS)


@given(
    bodies=st.lists(lifecycle_bodies, min_size=1, max_size=6),
    waited=st.lists(st.sampled_from([0, 1, 899, 900, 10_000]), min_size=6, max_size=6),
)
@example(
    bodies=['{"Action": "delete", "ClientId": "known-1"}', '{"Action": "delete", "ClientId": "known-1"}'],
    waited=[0] * 6,
)  # a redelivered deletion: announced again (Duplicate), then dropped
@example(
    bodies=['{"Action": "Delete", "ClientId": "known-1", "OccurredAt": "0001-01-01T00:00:00+02:00"}'], waited=[0] * 6
)
@example(
    bodies=['{"Action": "Update", "ClientId": "known-1", "City": "x", "OccurredAt": "9999-12-31T23:59:59-02:00"}'],
    waited=[0] * 6,
)
@example(
    bodies=['{"Action": "Delete", "ClientId": "known-1", "OccurredAt": "9999-12-31T23:59:59.999Z"}'], waited=[0] * 6
)
@example(
    bodies=[
        '{"detail-type": "UserUpdated", "time": "9999-12-31T23:59:59Z", '
        '"detail": {"ClientId": "known-2", "City": "pii-Rome"}}'
    ],
    waited=[0] * 6,
)
def test_every_lifecycle_message_ends_applied_dropped_dead_lettered_with_its_reason_or_retried(
    bodies: list[str], waited: list[int]
) -> None:
    INPUTS("lifecycle message", len(bodies))
    note(f"bodies={bodies!r}")
    lc = _world()
    profile = [value for body in bodies for value in _profile_values(body)]

    with captured_logs() as logs:
        for n, body in enumerate(bodies):
            now_ms = lc.ms()
            sent_ms = now_ms - waited[n] * 1000
            expected = _contract(body, sent_ms)
            invalid = expected is None or _future(expected, now_ms)
            calls, letters = _management_calls(lc), len(lc.dead_letters.letters)
            events = len(lc.world.publisher.events)
            try:
                result = lc.intake.handle(body, message_id=f"m-{n}", first_sent_ms=sent_ms)
            except TelematicsError as exc:
                # Retried (a batch item failure): only a valid change waits for its user, a lease or the upstream.
                retried: TelematicsError | None = exc
            else:
                retried = None
            if retried is not None:
                assert not invalid, f"bad input retried instead of dead-lettered: {retried!r}"
                assert len(lc.dead_letters.letters) == letters
                continue
            if invalid:
                assert result.status == "dead_lettered", result
                assert _management_calls(lc) == calls  # never reached the upstream
            if result.status == "dead_lettered":
                (letter,) = lc.dead_letters.letters[letters:]
                assert letter.reason == result.reason
                assert letter.reason
                assert letter.original_message_id == f"m-{n}"
                assert invalid or letter.reason in VALID_BUT_DEAD, letter.reason
                # The body as it came, or with the time it was ordered by added (nothing else changes).
                if letter.body != body:
                    kept, original = json.loads(letter.body), json.loads(body)
                    assert has_occurred_at(kept)
                    assert {k: v for k, v in kept.items() if k != "OccurredAt"} == original
                (announced,) = lc.world.publisher.events[events:]
                assert isinstance(announced, LifecycleFailed)
                assert (announced.reason, announced.dead_lettered) == (letter.reason, True)
            elif result.status == "dropped":
                assert result.reason in {"stale", "duplicate", "user_deleted"}
                *repeated, announced = lc.world.publisher.events[events:]
                # A redelivered deletion announces the deletion again (at least once), then its drop.
                assert all(isinstance(e, UserDeleted) and e.duplicate for e in repeated)
                assert len(repeated) <= 1
                assert isinstance(announced, LifecycleFailed)
                assert (announced.reason, announced.dead_lettered) == (result.reason, False)
            else:
                assert result.status == "applied", result

    produced = _produced(lc, logs.lines)
    assert leaks(produced, _secrets(lc)) == []
    assert leaks(produced, profile) == []


def _sqs_event(bodies: list[str], sent_ms: int) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": f"m-{n}",
                "receiptHandle": f"r-{n}",
                "body": body,
                "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": str(sent_ms)},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:lifecycle",
                "awsRegion": "us-east-1",
            }
            for n, body in enumerate(bodies)
        ]
    }


@given(bodies=st.lists(lifecycle_bodies, min_size=1, max_size=8))
def test_a_lifecycle_batch_fails_only_the_records_worth_retrying(bodies: list[str]) -> None:
    bodies = [b for b in bodies if b]  # SQS never delivers an empty body
    if not bodies:
        return
    INPUTS("lifecycle batch record", len(bodies))
    note(f"bodies={bodies!r}")
    lc = _world()
    now_ms = lc.ms()
    bad = {f"m-{n}" for n, body in enumerate(bodies) if (c := _contract(body, now_ms)) is None or _future(c, now_ms)}

    with captured_logs() as logs:
        try:
            response = handle_lifecycle_batch(_sqs_event(bodies, now_ms), lc.intake, concurrency=4)
            failed = {item["itemIdentifier"] for item in response["batchItemFailures"]}
        except BatchFailedError:
            failed = {f"m-{n}" for n in range(len(bodies))}

    assert not failed & bad, "bad input is dead-lettered at once, never retried"
    lettered = {letter.original_message_id for letter in lc.dead_letters.letters}
    assert bad <= lettered
    assert leaks(_produced(lc, logs.lines), _secrets(lc)) == []
