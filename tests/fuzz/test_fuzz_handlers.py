"""Property-based tests of the handlers' ways in: the signup event, the registration queue's records and the
refresh jobs, against the in-memory fakes.

Properties (issue 17):

* no unhandled exception escapes a handler;
* an invalid message never reaches the upstream and ends in the dead-letter queue with a Reason, and the rest of
  its batch is unaffected;
* no token, refresh token or InstanceKey appears in any error text, log line, event or dead letter produced.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from handle_refresh_jobs import handle_refresh_batch
from handle_registration_queue import handle_registration_batch
from handle_signup import handle_signup
from hypothesis import assume, example, given, note
from hypothesis import strategies as st

from telematics_reg.batching import BatchFailedError
from telematics_reg.errors import InvalidMessageError
from telematics_reg.models import BulkRegistrationRequest, parse_registration_message
from telematics_reg.refresh import RefreshJob
from telematics_reg.registration import device_token_for
from telematics_reg.store import UserStatus
from tests.unit.worlds import DEVICE_TOKEN_KEY

from .conftest import INPUTS
from .strategies import any_json, client_ids, message_bodies, registration_like, valid_registration
from .worlds import captured_logs, leaks, new_world, world_secrets


def _sqs_event(bodies: list[str]) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": f"m-{n}",
                "receiptHandle": f"r-{n}",
                "body": body,
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:registration",
                "awsRegion": "us-east-1",
            }
            for n, body in enumerate(bodies)
        ]
    }


def _expected_valid(body: str | dict[str, Any], *, source: str) -> bool:
    """The parser is the contract: what it accepts (for the default instance) is a valid message."""
    try:
        request = parse_registration_message(body)
    except InvalidMessageError:
        return False
    if isinstance(request, BulkRegistrationRequest) and source == "signup":
        return False
    return request.instance == "default"


def _small_bulks_only(body: str) -> bool:
    # A valid bulk of thousands of users is legitimate but slow against the fake: keep the inputs quick.
    try:
        request = parse_registration_message(body)
    except InvalidMessageError:
        return True
    return not isinstance(request, BulkRegistrationRequest) or request.quantity <= 250


# ------------------------------------------------------------------------------------------- registration queue


@given(
    hostile=st.lists(message_bodies, min_size=1, max_size=6).map(lambda bodies: [b for b in bodies if b]),
    good=st.lists(client_ids(), min_size=0, max_size=4, unique=True).flatmap(
        lambda ids: st.tuples(*(valid_registration(f"good-{cid}") for cid in ids))
    ),
    order=st.randoms(use_true_random=False),
)
@example(hostile=["[" * 5000 + "]" * 5000], good=({"ClientId": "good-1"},), order=__import__("random").Random(0))
@example(hostile=['{"ClientId": "x\\u001b]0;owned\\u0007"}'], good=(), order=__import__("random").Random(0))
@example(hostile=['{"\\ud800": 1, "ClientId": "c"}'], good=(), order=__import__("random").Random(0))
def test_queue_batch_dead_letters_each_invalid_record_and_registers_the_rest(
    hostile: list[str], good: tuple[dict[str, Any], ...], order: Any
) -> None:
    hostile = [b for b in hostile if _small_bulks_only(b)]
    bodies = hostile + [json.dumps(g) for g in good]
    assume(bodies)  # SQS never delivers an empty batch, nor an empty body
    order.shuffle(bodies)
    note(f"bodies={bodies!r}")
    INPUTS("queue record", len(bodies))
    world = new_world()

    with captured_logs() as logs:
        response = handle_registration_batch(_sqs_event(bodies), world.intake, concurrency=4)

    assert response == {"batchItemFailures": []}  # nothing is retried: bad input is dead-lettered at once
    letters = {letter.original_message_id: letter for letter in world.dead_letters.letters}
    valid_client_ids: set[str] = set()
    for n, body in enumerate(bodies):
        if _expected_valid(body, source="queue"):
            assert f"m-{n}" not in letters, letters[f"m-{n}"]
            request = parse_registration_message(body)
            if not isinstance(request, BulkRegistrationRequest):
                valid_client_ids.add(request.client_id)
                record = world.store.get_user(
                    device_token_for(str(world.creds.instance_id), request.client_id, key=DEVICE_TOKEN_KEY.get())
                )
                assert record is not None
                assert record.status in (UserStatus.ACTIVE, UserStatus.TOKENLESS)
        else:
            letter = letters[f"m-{n}"]
            assert letter.reason
            assert letter.body == body or (body == "" and letter.body == "")
    # Only valid single registrations reached Create (bulk users have no ClientId).
    reached = {user.client_id for user in world.upstream.users.values() if user.client_id is not None}
    assert reached == valid_client_ids
    _assert_no_secret_escaped(world, logs.lines)


# ------------------------------------------------------------------------------------------------------ signup

signup_events = st.one_of(
    st.fixed_dictionaries(
        {"detail": registration_like | any_json},
        optional={"id": any_json, "detail-type": st.just("UserSignedUp"), "source": any_json},
    ),
    st.dictionaries(st.text(max_size=10), any_json, max_size=4),
    any_json,
)


@given(event=signup_events)
@example(event={"detail": {"ClientId": "c-1", "Quantity": 5}})
@example(event={"detail": None})
@example(event={"detail": ["not", "an", "object"], "id": "evt-1"})
@example(event=["not", "an", "event"])
@example(event={"detail": {"ClientId": "\x1b]52;c;Y2xpcGJvYXJk\x07"}, "id": "evt-2"})
def test_signup_event_is_registered_or_dead_lettered_never_raised(event: Any) -> None:
    INPUTS("signup event")
    world = new_world()

    with captured_logs() as logs:
        result = handle_signup(event, world.intake)

    detail = event.get("detail") if isinstance(event, dict) else None
    if isinstance(detail, dict) and _expected_valid(detail, source="signup"):
        assert result["status"] in ("registered", "duplicate")
        assert world.dead_letters.letters == []
    else:
        assert result["status"] == "dead_lettered"
        (letter,) = world.dead_letters.letters
        assert letter.reason
        assert letter.reason == result["reason"]
        assert world.upstream.calls["create"] == 0
        assert world.upstream.calls["create_many"] == 0
    _assert_no_secret_escaped(world, logs.lines)


@given(detail=registration_like)
def test_signup_detail_reaches_create_only_when_valid(detail: dict[str, Any]) -> None:
    INPUTS("signup detail")
    world = new_world()

    result = handle_signup({"detail": detail, "id": "evt"}, world.intake)

    if _expected_valid(detail, source="signup"):
        assert result["status"] in ("registered", "duplicate")
        assert world.upstream.calls["create"] == 1
    else:
        assert result["status"] == "dead_lettered"
        assert sum(world.upstream.calls.values()) == 0
        assert world.dead_letters.letters[0].reason == result["reason"]


# ------------------------------------------------------------------------------------------------ refresh jobs

refresh_bodies = st.one_of(
    message_bodies,
    st.fixed_dictionaries({"DeviceToken": any_json, "Version": any_json}).map(json.dumps),
    st.fixed_dictionaries({"DeviceToken": st.text(max_size=40), "Version": st.integers()}).map(json.dumps),
)


def _parses_as_job(body: str) -> bool:
    try:
        RefreshJob.from_body(body)
    except (ValueError, RecursionError):
        return False
    return True


@given(hostile=st.lists(refresh_bodies, min_size=1, max_size=5), users=st.integers(min_value=0, max_value=3))
@example(hostile=["[" * 5000 + "]" * 5000], users=1)
@example(hostile=['{"DeviceToken": "x", "Version": 1e400}'], users=1)
def test_refresh_batch_fails_only_the_malformed_jobs(hostile: list[str], users: int) -> None:
    INPUTS("refresh job", len(hostile) + users)
    world = new_world()
    good: list[str] = []
    for n in range(users):
        outcome = world.intake.handle({"ClientId": f"u-{n}"}, message_id=f"reg-{n}", source="queue")
        record = world.store.get_user(str(outcome.device_token))
        assert record is not None
        good.append(RefreshJob(record.device_token, record.version).to_body())
    world.clock.now += 3600  # every token is due
    before = {token: (r.access_token, r.refresh_token) for token, r in world.store.users.items()}
    bodies = hostile + good
    malformed = {f"m-{n}" for n, body in enumerate(bodies) if not _parses_as_job(body)}

    with captured_logs() as logs:
        try:
            response = handle_refresh_batch(_sqs_event(bodies), world.refresher, concurrency=4)
        except BatchFailedError:
            # Powertools fails the whole invocation when every record failed: SQS then retries them all.
            assert malformed == {f"m-{n}" for n in range(len(bodies))}
            return

    failed = {item["itemIdentifier"] for item in response["batchItemFailures"]}
    assert failed == malformed  # a malformed job is retried (then redriven to the DLQ), the rest go through
    for token, (access, refresh) in before.items():
        record = world.store.get_user(token)
        assert record is not None
        assert record.status is UserStatus.ACTIVE
        assert (record.access_token, record.refresh_token) != (access, refresh), "a due user was not refreshed"
    _assert_no_secret_escaped(world, logs.lines)


# -------------------------------------------------------------------------------------------------- helpers


def _assert_no_secret_escaped(world: Any, log_lines: list[str]) -> None:
    secrets = world_secrets(world)
    produced = list(log_lines)
    for letter in world.dead_letters.letters:
        produced += [letter.body, letter.reason, letter.detail()]
    produced += [json.dumps(event.detail()) for event in world.publisher.events]
    produced += [r.last_error or "" for r in world.store.users.values()]
    assert leaks(produced, secrets) == []


@pytest.mark.parametrize("body", ["[" * 5000 + "]" * 5000, '{"ClientId": ' + "[" * 3000 + "]" * 3000 + "}"])
def test_regression_deeply_nested_json_is_dead_lettered_as_not_json(body: str) -> None:
    world = new_world()
    result = world.intake.handle(body, message_id="m", source="queue")
    assert result.status == "dead_lettered"
    assert world.dead_letters.letters[0].reason in ("not_json", "invalid_fields")
