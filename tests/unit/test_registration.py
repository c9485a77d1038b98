"""Registration flows against in-memory fakes: the decisions, without I/O."""

from __future__ import annotations

import uuid

import pytest

from telematics_reg.errors import FieldError, OutcomeUnknownError, TransientUpstreamError, UpstreamValidationError
from telematics_reg.outcomes import RegistrationFailed, UserRegistered
from telematics_reg.registration import RegistrationInProgressError, device_token_for
from telematics_reg.store import ChunkState, UserStatus

from .conftest import DEVICE_TOKEN_KEY, World


def test_given_a_new_client_id_when_registered_then_one_user_is_stored_with_tokens(world: World) -> None:
    result = world.intake.handle({"ClientId": "c-1", "FirstName": "Ada"}, message_id="m-1", source="queue")

    assert result.status == "registered"
    expected = device_token_for(str(world.creds.instance_id), "c-1", key=DEVICE_TOKEN_KEY.get())
    assert result.device_token == expected
    record = world.store.get_user(expected)
    assert record is not None
    assert record.status is UserStatus.ACTIVE
    assert record.tokens is not None
    assert record.due_shard is not None
    assert len(world.upstream.users_of(world.creds.instance_id, "c-1")) == 1
    (event,) = world.publisher.of_type(UserRegistered)
    assert event.detail() == {
        "DeviceToken": expected,
        "Instance": "default",
        "ClientId": "c-1",
        "Duplicate": False,
        "HasTokens": True,
        "Source": "queue",
    }


def test_given_a_registered_client_id_when_sent_again_then_no_create_and_the_stored_token_is_reported(
    world: World,
) -> None:
    first = world.intake.handle({"ClientId": "c-2"}, message_id="m-1", source="signup")
    second = world.intake.handle({"clientId": "c-2"}, message_id="m-2", source="queue")

    assert second.status == "duplicate"
    assert second.device_token == first.device_token
    assert world.upstream.calls["create"] == 1


def test_given_a_create_without_tokens_then_the_user_is_stored_tokenless_and_out_of_the_refresh_index(
    world: World,
) -> None:
    result = world.intake.handle({"ClientId": "c-3", "CreateAccessToken": False}, message_id="m", source="queue")

    record = world.store.get_user(str(result.device_token))
    assert record is not None
    assert record.status is UserStatus.TOKENLESS
    assert record.due_shard is None


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        {"FirstName": "no client id"},
        {"ClientId": "c", "Gender": "Robot"},
        {"ClientId": "c", "ChildrenCount": -1},
        {"ClientId": "x" * 500},
        {"ClientId": "c", "Instance": "nowhere"},
        {"Quantity": "ten"},
    ],
)
def test_given_bad_input_then_dead_lettered_with_reason_and_nothing_sent_upstream(world: World, body: object) -> None:
    result = world.intake.handle(body, message_id="m-bad", source="queue")  # type: ignore[arg-type]

    assert result.status == "dead_lettered"
    (letter,) = world.dead_letters.letters
    assert letter.reason in {"not_json", "invalid_fields", "too_large", "unknown_instance", "not_an_object"}
    assert letter.original_message_id == "m-bad"
    assert sum(world.upstream.calls.values()) == 0
    assert world.publisher.of_type(RegistrationFailed)


def test_given_a_permanent_upstream_rejection_then_dead_lettered_with_its_errors_and_the_claim_released(
    world: World,
) -> None:
    rejection = UpstreamValidationError("rejected", status=422, errors=[FieldError("Email", "invalid")])
    world.upstream.fail_next(rejection, calls=["create"])

    result = world.intake.handle({"ClientId": "c-4"}, message_id="m", source="queue")

    assert result.status == "dead_lettered"
    assert world.dead_letters.letters[0].reason == "upstream_rejected"
    assert world.dead_letters.letters[0].errors == [FieldError("Email", "invalid")]
    assert (
        world.store.get_user(device_token_for(str(world.creds.instance_id), "c-4", key=DEVICE_TOKEN_KEY.get())) is None
    )


def test_given_a_transient_failure_then_it_raises_for_a_retry_and_the_retry_registers_once(world: World) -> None:
    world.upstream.fail_next(TransientUpstreamError("busy", status=503), calls=["create"])

    with pytest.raises(TransientUpstreamError):
        world.intake.handle({"ClientId": "c-5"}, message_id="m", source="queue")
    result = world.intake.handle({"ClientId": "c-5"}, message_id="m", source="queue")

    assert result.status == "registered"
    assert len(world.upstream.users_of(world.creds.instance_id, "c-5")) == 1


def test_given_a_lost_answer_then_the_retry_recovers_the_same_user_instead_of_a_second(world: World) -> None:
    world.upstream.fail_next(OutcomeUnknownError("dropped", call="create"), calls=["create"], after_commit=True)

    with pytest.raises(OutcomeUnknownError):
        world.intake.handle({"ClientId": "c-6"}, message_id="m", source="queue")
    result = world.intake.handle({"ClientId": "c-6"}, message_id="m", source="queue")

    assert result.status == "registered"
    assert len(world.upstream.users_of(world.creds.instance_id, "c-6")) == 1
    record = world.store.get_user(str(result.device_token))
    assert record is not None
    assert record.tokens is not None


def test_given_a_live_claim_elsewhere_then_it_waits_and_reports_in_progress(world: World) -> None:
    device_token = device_token_for(str(world.creds.instance_id), "c-7", key=DEVICE_TOKEN_KEY.get())
    world.store.claim_registration(
        device_token=device_token,
        instance="default",
        instance_id=str(world.creds.instance_id),
        client_id="c-7",
        owner="other",
        now=world.clock(),
        ttl=120,
    )

    with pytest.raises(RegistrationInProgressError):
        world.intake.handle({"ClientId": "c-7"}, message_id="m", source="queue")
    assert world.upstream.calls["create"] == 0


def test_given_an_expired_claim_then_it_is_taken_over(world: World) -> None:
    device_token = device_token_for(str(world.creds.instance_id), "c-8", key=DEVICE_TOKEN_KEY.get())
    world.store.claim_registration(
        device_token=device_token,
        instance="default",
        instance_id=str(world.creds.instance_id),
        client_id="c-8",
        owner="crashed",
        now=world.clock() - 500,
        ttl=120,
    )

    result = world.intake.handle({"ClientId": "c-8"}, message_id="m", source="queue")

    assert result.status == "registered"


def test_given_a_bulk_request_then_chunked_every_user_stored_and_a_redelivery_adds_none(world: World) -> None:
    body = {"Quantity": 250, "RequestId": "load-1"}

    first = world.intake.handle(body, message_id="m-1", source="queue")
    again = world.intake.handle(body, message_id="m-2", source="queue")

    assert first.status == "bulk"
    assert first.stored == 250
    assert again.stored == 250
    assert world.upstream.calls["create_many"] == 3
    assert len(world.upstream.users) == 250
    assert sum(1 for u in world.store.users.values() if u.bulk_request_id == "load-1") == 250


def test_given_a_bulk_chunk_whose_answer_is_lost_then_it_is_never_called_again_and_dead_lettered(
    world: World,
) -> None:
    world.upstream.fail_next(
        OutcomeUnknownError("dropped", call="create_many"), calls=["create_many"], after_commit=True
    )

    result = world.intake.handle({"Quantity": 150, "RequestId": "load-2"}, message_id="m", source="queue")
    again = world.intake.handle({"Quantity": 150, "RequestId": "load-2"}, message_id="m", source="queue")

    assert result.status == again.status == "dead_lettered"
    assert world.dead_letters.letters[0].reason == "bulk_incomplete"
    assert world.upstream.calls["create_many"] == 2  # chunk 0 once (lost), chunk 1 once
    assert world.store.bulks[("default", "load-2")].chunks == {0: ChunkState.UNKNOWN, 1: ChunkState.DONE}


def test_given_a_bulk_without_create_many_then_creates_with_deterministic_tokens_are_exactly_once(
    world: World,
) -> None:
    world.upstream.create_many_offered = False

    world.intake.handle({"Quantity": 30, "RequestId": "load-3"}, message_id="m", source="queue")
    world.intake.handle({"Quantity": 30, "RequestId": "load-3"}, message_id="m", source="queue")

    assert len(world.upstream.users) == 30
    assert all(isinstance(token, uuid.UUID) for token in world.upstream.users)


def test_given_a_bulk_request_in_a_signup_event_then_it_is_dead_lettered_not_registered(world: World) -> None:
    result = world.intake.handle({"Quantity": 5}, message_id="evt-1", source="signup")

    assert result.status == "dead_lettered"
    (letter,) = world.dead_letters.letters
    assert letter.errors[0].key == "Quantity"
    assert world.upstream.calls["create_many"] == 0
