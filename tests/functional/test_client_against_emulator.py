"""UserServiceClient against the User Service emulator: every fault becomes the right typed error, retries stay
bounded, lost answers never make a second user, and no secret reaches the logs.

The emulator's counters are the witness: they show what the upstream really did, not what the client believes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from local.emulator.testing import EmulatorHandle, running_emulator
from telematics_reg.errors import (
    DeadRefreshTokenError,
    InvalidMessageError,
    NotFoundError,
    OutcomeUnknownError,
    RateLimitedError,
    TransientUpstreamError,
    UnauthorizedError,
    UpstreamValidationError,
)
from telematics_reg.models import (
    CreateManyRequest,
    CreateResult,
    CreateUserRequest,
    InstanceCredentials,
    RegistrationRequest,
    UserFields,
    parse_registration_message,
)
from telematics_reg.upstream import UserServiceClient

INSTANCES = {
    "default": {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())},
    "other": {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())},
}
CREDS = InstanceCredentials.model_validate(INSTANCES["default"])
INSTANCE_ID = INSTANCES["default"]["InstanceId"]


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorHandle]:
    with running_emulator(instances=INSTANCES) as handle:
        yield handle


@dataclass
class Recorder:
    """Fake clock for the client's backoff: records the sleeps instead of sleeping."""

    sleeps: list[float] = field(default_factory=list)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


@dataclass
class Secrets:
    """Every secret a test saw; checked against the captured logs when the test ends."""

    values: set[str] = field(default_factory=lambda: {i["InstanceKey"] for i in INSTANCES.values()})

    def add(self, result: CreateResult) -> CreateResult:
        if result.access_token is not None:
            self.values.add(result.access_token.token.get_secret_value())
        if result.refresh_token is not None:
            self.values.add(result.refresh_token.get_secret_value())
        return result


@pytest.fixture
def secrets(caplog: pytest.LogCaptureFixture) -> Iterator[Secrets]:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="telematics-registration")
    seen = Secrets()
    yield seen
    # In teardown, caplog.records holds only teardown's records: look at the test's own.
    records = caplog.get_records("setup") + caplog.get_records("call")
    texts = [text for record in records for text in (record.getMessage(), repr(record.__dict__))]
    assert any(record.getMessage().startswith("user service call") for record in records)
    for secret in seen.values:
        assert all(secret not in text for text in texts), "a token, refresh token or InstanceKey was logged"


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def client(emulator: EmulatorHandle, recorder: Recorder, secrets: Secrets) -> Iterator[UserServiceClient]:
    emulator.reset()
    with UserServiceClient(emulator.url, read_timeout=2.0, sleep=recorder.sleep) as fresh:
        yield fresh


def body_for(client_id: str, custom_token: uuid.UUID | None = None) -> CreateUserRequest:
    return CreateUserRequest(user_fields=UserFields(client_id=client_id), custom_token=custom_token)


def users_of(emulator: EmulatorHandle, client_id: str) -> int:
    counted: int = emulator.counters()["users_by_client_id"].get(f"{INSTANCE_ID}/{client_id}", 0)
    return counted


# --- the normal path ------------------------------------------------------------------------------------


def test_create_refresh_login_user_exists(
    emulator: EmulatorHandle, client: UserServiceClient, secrets: Secrets
) -> None:
    request = parse_registration_message({"clientId": "c-1", "firstName": "Ada", "birthday": "1990-05-01"})
    assert isinstance(request, RegistrationRequest)
    token = uuid.uuid4()
    created = secrets.add(client.create(CREDS, request.create_body(token)))
    assert created.device_token == token
    assert created.access_token is not None
    assert created.refresh_token is not None
    expires_at = created.expires_at(time.time())
    assert expires_at is not None
    assert 7100 < expires_at.timestamp() - time.time() <= 7200

    refreshed = secrets.add(client.refresh(created.access_token.token, created.refresh_token))
    assert refreshed.device_token == token
    assert refreshed.refresh_token != created.refresh_token

    logged_in = secrets.add(client.login(CREDS, token))
    assert logged_in.device_token == token
    assert client.user_exists(CREDS, "c-1") is True
    assert client.user_exists(CREDS, "c-2") is False
    profile = emulator.user(str(token))
    assert profile is not None
    counters = emulator.counters()
    assert (counters["creates"], counters["refreshes"], counters["logins"]) == (1, 1, 1)


def test_create_without_tokens(client: UserServiceClient) -> None:
    result = client.create(CREDS, CreateUserRequest(create_access_token=False))
    assert result.access_token is None
    assert result.refresh_token is None


# --- error classes ----------------------------------------------------------------------------------------


def test_bad_instance_credentials_are_unauthorized(emulator: EmulatorHandle, client: UserServiceClient) -> None:
    wrong = InstanceCredentials.model_validate({"InstanceId": INSTANCE_ID, "InstanceKey": str(uuid.uuid4())})
    with pytest.raises(UnauthorizedError) as caught:
        client.create(wrong, CreateUserRequest())
    assert caught.value.status == 401
    with pytest.raises(UnauthorizedError):
        client.user_exists(wrong, "c-1")
    with pytest.raises(UnauthorizedError):
        client.login(wrong, uuid.uuid4())
    assert emulator.counters()["users_total"] == 0


def test_validation_errors_carry_the_upstream_errors(emulator: EmulatorHandle, client: UserServiceClient) -> None:
    # Our models would refuse this body; model_construct skips them to show what the upstream says.
    with pytest.raises(UpstreamValidationError) as caught:
        client.create(CREDS, CreateUserRequest.model_construct(children_count=-1))
    assert caught.value.status == 422
    assert [e.key for e in caught.value.errors] == ["ChildrenCount"]
    assert emulator.counters()["users_total"] == 0


def test_unknown_user_login_is_not_found(client: UserServiceClient) -> None:
    with pytest.raises(NotFoundError) as caught:
        client.login(CREDS, uuid.uuid4())
    assert [e.key for e in caught.value.errors] == ["DeviceToken"]


def test_login_disabled_is_unauthorized(emulator: EmulatorHandle, client: UserServiceClient) -> None:
    user = client.create(CREDS, CreateUserRequest())
    emulator.disable_login([str(user.device_token)])
    with pytest.raises(UnauthorizedError):
        client.login(CREDS, user.device_token)


def test_dead_refresh_token(emulator: EmulatorHandle, client: UserServiceClient, secrets: Secrets) -> None:
    created = secrets.add(client.create(CREDS, CreateUserRequest()))
    assert created.access_token is not None
    assert created.refresh_token is not None
    secrets.add(client.refresh(created.access_token.token, created.refresh_token))
    with pytest.raises(DeadRefreshTokenError) as caught:
        client.refresh(created.access_token.token, created.refresh_token)  # already spent
    assert caught.value.status == 400
    assert [e.key for e in caught.value.errors] == ["RefreshToken"]
    assert emulator.counters()["rejected_refresh_tokens"] == 1
    assert emulator.counters()["requests_total"] == 3  # a dead token is not retried


def test_revoked_refresh_token_is_dead_and_login_recovers(
    emulator: EmulatorHandle, client: UserServiceClient, secrets: Secrets
) -> None:
    created = secrets.add(client.create(CREDS, CreateUserRequest()))
    assert created.access_token is not None
    assert created.refresh_token is not None
    emulator.revoke([str(created.device_token)])
    with pytest.raises(DeadRefreshTokenError):
        client.refresh(created.access_token.token, created.refresh_token)
    recovered = secrets.add(client.login(CREDS, created.device_token))
    assert recovered.refresh_token is not None
    assert recovered.access_token is not None
    secrets.add(client.refresh(recovered.access_token.token, recovered.refresh_token))


# --- 429 and 5xx: bounded retries -------------------------------------------------------------------------------


def test_429_is_retried_after_retry_after(
    emulator: EmulatorHandle, client: UserServiceClient, recorder: Recorder
) -> None:
    emulator.set_faults(script=[{"call": "create", "fault": "rate_limit", "retry_after_s": 2}])
    client.create(CREDS, body_for("c-429"))
    assert recorder.sleeps == [2.0]
    counters = emulator.counters()
    assert counters["faults_served"]["rate_limit"] == 1
    assert counters["requests_total"] == 2
    assert users_of(emulator, "c-429") == 1


def test_long_retry_after_is_handed_to_the_caller(
    emulator: EmulatorHandle, client: UserServiceClient, recorder: Recorder
) -> None:
    emulator.set_faults(script=[{"call": "create", "fault": "rate_limit", "retry_after_s": 120}])
    with pytest.raises(RateLimitedError) as caught:
        client.create(CREDS, CreateUserRequest())
    assert caught.value.retry_after == 120.0
    assert recorder.sleeps == []
    assert emulator.counters()["requests_total"] == 1


def test_503_is_retried_and_bounded(emulator: EmulatorHandle, client: UserServiceClient, recorder: Recorder) -> None:
    emulator.set_faults(error_rate=1.0, error_status=503)
    with pytest.raises(TransientUpstreamError) as caught:
        client.create(CREDS, body_for("c-503"))
    assert caught.value.status == 503
    counters = emulator.counters()
    assert counters["requests_total"] == 4  # max_attempts, then the caller decides
    assert counters["faults_served"]["error"] == 4
    assert counters["users_total"] == 0
    assert len(recorder.sleeps) == 3
    assert all(0 <= s <= 0.2 * 2**n for n, s in enumerate(recorder.sleeps))


def test_503_then_success(emulator: EmulatorHandle, client: UserServiceClient) -> None:
    emulator.set_faults(script=[{"call": "refresh", "fault": "error", "status": 503}] * 2)
    created = client.create(CREDS, CreateUserRequest())
    assert created.access_token is not None
    assert created.refresh_token is not None
    client.refresh(created.access_token.token, created.refresh_token)
    assert emulator.counters()["refreshes"] == 1
    assert emulator.counters()["requests_total"] == 4


def test_500_on_create_is_an_unknown_outcome_and_not_repeated(
    emulator: EmulatorHandle, client: UserServiceClient
) -> None:
    emulator.set_faults(script=[{"call": "create", "fault": "error", "status": 500}])
    with pytest.raises(OutcomeUnknownError):
        client.create(CREDS, CreateUserRequest())
    assert emulator.counters()["requests_total"] == 1


# --- lost answers -----------------------------------------------------------------------------------------


def test_lost_create_with_custom_token_is_recovered_by_login(
    emulator: EmulatorHandle, client: UserServiceClient, secrets: Secrets
) -> None:
    emulator.set_faults(script=[{"call": "create", "fault": "drop_after_commit"}])
    token = uuid.uuid4()
    result = secrets.add(client.create(CREDS, body_for("c-drop", token)))
    assert result.device_token == token
    assert result.refresh_token is not None
    counters = emulator.counters()
    assert users_of(emulator, "c-drop") == 1
    assert (counters["creates"], counters["logins"]) == (1, 1)
    assert counters["faults_served"]["drop_after_commit"] == 1
    # The recovered tokens are the live ones.
    assert result.access_token is not None
    secrets.add(client.refresh(result.access_token.token, result.refresh_token))


def test_lost_create_without_custom_token_is_not_repeated(emulator: EmulatorHandle, client: UserServiceClient) -> None:
    emulator.set_faults(script=[{"call": "create", "fault": "drop_after_commit"}])
    with pytest.raises(OutcomeUnknownError):
        client.create(CREDS, body_for("c-lost"))
    counters = emulator.counters()
    assert counters["creates"] == 1
    assert counters["requests_total"] == 1
    assert users_of(emulator, "c-lost") == 1  # the user exists: that is why it must not be created again


def test_repeated_create_with_same_custom_token_makes_one_user(
    emulator: EmulatorHandle, client: UserServiceClient
) -> None:
    token = uuid.uuid4()
    first = client.create(CREDS, body_for("c-twice", token))
    second = client.create(CREDS, body_for("c-twice", token))  # 422 CustomToken exists -> Login
    assert first.device_token == second.device_token == token
    assert users_of(emulator, "c-twice") == 1
    assert emulator.counters()["logins"] == 1


def test_hang_on_create_times_out_as_unknown_outcome(emulator: EmulatorHandle, recorder: Recorder) -> None:
    emulator.reset()
    emulator.set_faults(script=[{"call": "create", "fault": "hang", "hang_s": 1.0}])
    with UserServiceClient(emulator.url, read_timeout=0.3, sleep=recorder.sleep) as client:
        with pytest.raises(OutcomeUnknownError):
            client.create(CREDS, body_for("c-hang"))
        assert recorder.sleeps == []
        assert emulator.counters()["requests_total"] == 1
        # The upstream finishes the call after we gave up: exactly the case a retry would have doubled.
        deadline = time.monotonic() + 5
        while users_of(emulator, "c-hang") == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert users_of(emulator, "c-hang") == 1


def test_hang_on_create_with_custom_token_still_makes_one_user(emulator: EmulatorHandle, recorder: Recorder) -> None:
    emulator.reset()
    emulator.set_faults(script=[{"call": "create", "fault": "hang", "hang_s": 1.0}])
    token = uuid.uuid4()
    with UserServiceClient(emulator.url, read_timeout=0.3, sleep=recorder.sleep) as client:
        # Login answers 404 (the hung Create has not committed yet), so a second Create makes the user;
        # the hung one then finds the CustomToken taken.
        assert client.create(CREDS, body_for("c-hang2", token)).device_token == token
    time.sleep(1.2)
    assert users_of(emulator, "c-hang2") == 1


def test_lost_refresh_answer_is_an_unknown_outcome(
    emulator: EmulatorHandle, client: UserServiceClient, secrets: Secrets
) -> None:
    created = secrets.add(client.create(CREDS, CreateUserRequest()))
    assert created.access_token is not None
    assert created.refresh_token is not None
    emulator.set_faults(script=[{"call": "refresh", "fault": "drop_after_commit"}])
    with pytest.raises(OutcomeUnknownError):
        client.refresh(created.access_token.token, created.refresh_token)
    assert emulator.counters()["refreshes"] == 1  # sent once: the token is spent, as the error warns
    with pytest.raises(DeadRefreshTokenError):
        client.refresh(created.access_token.token, created.refresh_token)
    secrets.add(client.login(CREDS, created.device_token))


def test_lost_create_many_answer_is_not_repeated(emulator: EmulatorHandle, client: UserServiceClient) -> None:
    emulator.set_faults(script=[{"call": "create_many", "fault": "drop_after_commit"}])
    with pytest.raises(OutcomeUnknownError):
        client.create_many(CREDS, CreateManyRequest(quantity=3), [uuid.uuid4() for _ in range(3)])
    counters = emulator.counters()
    assert counters["create_many_calls"] == 1
    assert counters["users_total"] == 3
    assert counters["requests_total"] == 1


# --- fallbacks -----------------------------------------------------------------------------------------------


def test_create_many(emulator: EmulatorHandle, client: UserServiceClient, secrets: Secrets) -> None:
    results = [secrets.add(r) for r in client.create_many(CREDS, CreateManyRequest(quantity=7))]
    assert len({r.device_token for r in results}) == 7
    counters = emulator.counters()
    assert (counters["create_many_calls"], counters["create_many_users"], counters["users_total"]) == (1, 7, 7)


def test_create_many_not_offered_falls_back_to_creates_with_custom_tokens(
    emulator: EmulatorHandle, client: UserServiceClient, secrets: Secrets
) -> None:
    emulator.set_config(create_many_enabled=False)
    tokens = [uuid.uuid4() for _ in range(5)]
    results = [secrets.add(r) for r in client.create_many(CREDS, CreateManyRequest(quantity=5), tokens)]
    assert [r.device_token for r in results] == tokens
    assert all(emulator.user(str(t)) is not None for t in tokens)
    counters = emulator.counters()
    assert (counters["users_total"], counters["creates"]) == (5, 5)
    # "Not offered" is remembered: the next call goes straight to Create.
    before = counters["requests_total"]
    client.create_many(CREDS, CreateManyRequest(quantity=2))
    assert emulator.counters()["requests_total"] == before + 2
    assert emulator.counters()["users_total"] == 7


def test_create_many_fallback_survives_a_lost_answer(emulator: EmulatorHandle, client: UserServiceClient) -> None:
    emulator.set_config(create_many_enabled=False)
    emulator.set_faults(script=[{"call": "create", "fault": "drop_after_commit"}])
    tokens = [uuid.uuid4() for _ in range(3)]
    results = client.create_many(CREDS, CreateManyRequest(quantity=3), tokens)
    assert [r.device_token for r in results] == tokens
    assert emulator.counters()["users_total"] == 3  # exactly three, the lost one recovered by Login


def test_refresh_falls_back_to_the_spec_path(
    emulator: EmulatorHandle, client: UserServiceClient, secrets: Secrets
) -> None:
    emulator.set_config(refresh_paths=["spec"])
    created = secrets.add(client.create(CREDS, CreateUserRequest()))
    assert created.access_token is not None
    assert created.refresh_token is not None
    first = secrets.add(client.refresh(created.access_token.token, created.refresh_token))
    assert emulator.counters()["requests_total"] == 3  # Create, 404 on the observed path, the spec path
    assert first.access_token is not None
    assert first.refresh_token is not None
    secrets.add(client.refresh(first.access_token.token, first.refresh_token))
    assert emulator.counters()["requests_total"] == 4  # remembered: straight to the spec path
    assert emulator.counters()["refreshes"] == 2


def test_refresh_with_no_path_offered_is_not_found(emulator: EmulatorHandle, client: UserServiceClient) -> None:
    emulator.set_config(refresh_paths=[])
    created = client.create(CREDS, CreateUserRequest())
    assert created.access_token is not None
    assert created.refresh_token is not None
    with pytest.raises(NotFoundError):
        client.refresh(created.access_token.token, created.refresh_token)
    assert emulator.counters()["requests_total"] == 3


# --- bad input never reaches the upstream ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[1]",
        '{"ClientId": "c-1", "Gender": "Robot"}',
        '{"ClientId": "c-1", "ChildrenCount": "2"}',
        '{"FirstName": "no client id"}',
        '{"Quantity": 0}',
        '{"ClientId": "c-1", "Unknown": true}',
    ],
)
def test_bad_input_never_reaches_the_upstream(emulator: EmulatorHandle, client: UserServiceClient, raw: str) -> None:
    before = emulator.counters()["requests_total"]

    def register(raw: str) -> CreateResult:
        request = parse_registration_message(raw)
        assert isinstance(request, RegistrationRequest)
        return client.create(CREDS, request.create_body(uuid.uuid4()))

    with pytest.raises(InvalidMessageError):
        register(raw)
    with pytest.raises(ValueError, match="client_id"):
        client.user_exists(CREDS, "")
    with pytest.raises(ValueError, match="at most 100"):
        client.create_many(CREDS, CreateManyRequest.model_construct(quantity=500))
    assert emulator.counters()["requests_total"] == before
    # The log check of the secrets fixture needs one logged call.
    client.user_exists(CREDS, "c-1")


def test_case_insensitive_keys_reach_the_upstream_as_pascal_case(
    emulator: EmulatorHandle, client: UserServiceClient
) -> None:
    raw: dict[str, Any] = {"CLIENTID": "c-case", "firstname": "Ada", "userFields": {"enableLogging": True}}
    request = parse_registration_message(raw)
    assert isinstance(request, RegistrationRequest)
    token = uuid.uuid4()
    client.create(CREDS, request.create_body(token))
    user = emulator.user(str(token))
    assert user is not None
    assert "Ada" in str(user)
    assert users_of(emulator, "c-case") == 1
