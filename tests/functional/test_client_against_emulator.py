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
    ForbiddenError,
    InvalidMessageError,
    NotFoundError,
    OutcomeUnknownError,
    RateLimitedError,
    TransientUpstreamError,
    UnauthorizedError,
    UpstreamValidationError,
)
from telematics_reg.management_models import (
    AdminCredentials,
    AdminSession,
    UserPageQuery,
    UserSort,
    UserUpdate,
    UserUpdateFields,
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
from telematics_reg.upstream import UserServiceClient, iter_user_pages

INSTANCES = {
    "default": {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())},
    "other": {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())},
}
CREDS = InstanceCredentials.model_validate(INSTANCES["default"])
INSTANCE_ID = INSTANCES["default"]["InstanceId"]
OTHER = InstanceCredentials.model_validate(INSTANCES["other"])
ADMIN = {"Email": "ops@example.com", "Password": "admin-PASSWORD-" + uuid.uuid4().hex}
ADMIN_CREDS = AdminCredentials(email=ADMIN["Email"], password=ADMIN["Password"])


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorHandle]:
    # The vendor's Login limit (on by default): each test starts after a reset, so its own Logins are what count.
    with running_emulator(instances=INSTANCES, admin=ADMIN) as handle:
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

    values: set[str] = field(
        default_factory=lambda: {i["InstanceKey"] for i in INSTANCES.values()} | {ADMIN["Password"]}
    )

    def admin(self, session: AdminSession) -> AdminSession:
        self.values.add(session.access_token.token.get_secret_value())
        self.values.add(session.refresh_token.get_secret_value())
        return session

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
    assert 431_900 < expires_at.timestamp() - time.time() <= 432_000  # Create: 5 days, as documented

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


# --- the admin session and the User Management API ----------------------------------------------------------------


def admin_token(client: UserServiceClient, secrets: Secrets) -> str:
    return secrets.admin(client.admin_login(ADMIN_CREDS)).access_token.token.get_secret_value()


def test_every_management_call_against_the_emulator(
    emulator: EmulatorHandle, client: UserServiceClient, secrets: Secrets
) -> None:
    session = secrets.admin(client.admin_login(ADMIN_CREDS))
    assert session.access_token.expires_in == 86_400
    token = session.access_token.token
    users = [secrets.add(client.create(CREDS, body_for(f"c-{n}", uuid.uuid4()))) for n in range(5)]
    moved = users[0].device_token

    (found,) = client.find_users(token, client_id="c-0")
    assert (found.device_token, found.instance_id, found.active) == (moved, CREDS.instance_id, True)
    assert found.flags.enable_tracking is True

    client.update_user(
        token,
        moved,
        UserUpdate(first_name="Ada", status="Deactivated", user_fields=UserUpdateFields(enable_tracking=False)),
    )
    (updated,) = client.find_users(token, device_token=moved)
    assert updated.user_profile is not None
    assert (updated.user_profile.first_name, updated.active, updated.flags.enable_tracking) == ("Ada", False, False)
    assert updated.client_id == "c-0"  # only the given fields changed

    client.change_instance(token, moved, OTHER)
    (after_move,) = client.find_users(token, device_token=moved)
    assert after_move.instance_id == OTHER.instance_id
    with pytest.raises(NotFoundError):
        client.login(CREDS, moved)  # afterwards it logs in with the new instance only
    secrets.add(client.login(OTHER, moved))

    query = UserPageQuery(instance_ids=[CREDS.instance_id], page_size=2, sort=UserSort.DATE_CREATED)
    pages = list(iter_user_pages(client, token, query))
    assert [page.current_page for page in pages] == [1, 2]
    assert [user.device_token for page in pages for user in page.users] == [u.device_token for u in users[1:]]

    refreshed = secrets.admin(client.admin_refresh(token, session.refresh_token))
    with pytest.raises(DeadRefreshTokenError):
        client.admin_refresh(token, session.refresh_token)  # single-use

    client.delete_user(refreshed.access_token.token, moved)
    client.delete_user(refreshed.access_token.token, moved)  # already gone: done
    assert client.find_users(refreshed.access_token.token, device_token=moved) == []
    counters = emulator.counters()
    assert (counters["updates"], counters["instance_changes"], counters["deletes"]) == (1, 1, 1)
    assert counters["management_calls"]["delete"] == 2


def test_a_user_jwt_is_forbidden_and_an_expired_admin_jwt_unauthorized(
    emulator: EmulatorHandle, client: UserServiceClient, secrets: Secrets
) -> None:
    user = secrets.add(client.create(CREDS, CreateUserRequest()))
    assert user.access_token is not None
    with pytest.raises(ForbiddenError):
        client.find_users(user.access_token.token, device_token=user.device_token)
    emulator.set_config(token_lifetime_s=1)
    session = secrets.admin(client.admin_login(ADMIN_CREDS))
    time.sleep(2.1)

    with pytest.raises(UnauthorizedError):
        client.update_user(session.access_token.token, user.device_token, UserUpdate(first_name="x"))

    emulator.set_config(token_lifetime_s=60)
    fresh = secrets.admin(client.admin_refresh(session.access_token.token, session.refresh_token))
    client.update_user(fresh.access_token.token, user.device_token, UserUpdate(first_name="x"))


def test_wrong_target_key_is_refused_and_nothing_moves(
    emulator: EmulatorHandle, client: UserServiceClient, secrets: Secrets
) -> None:
    user = client.create(CREDS, CreateUserRequest())
    token = admin_token(client, secrets)
    wrong = InstanceCredentials(instance_id=OTHER.instance_id, instance_key=str(uuid.uuid4()))

    with pytest.raises(UpstreamValidationError) as caught:
        client.change_instance(token, user.device_token, wrong)

    assert [error.key for error in caught.value.errors] == ["ToInstanceKey"]
    assert emulator.counters()["management_calls"]["find"] == 0  # a refusal is an answer: nothing to verify


@pytest.mark.parametrize(
    "fault",
    [
        {"fault": "error", "status": 500},
        {"fault": "error", "status": 503},
        {"fault": "rate_limit", "retry_after_s": 1},
        {"fault": "drop_after_commit"},
    ],
)
def test_update_is_repeated_after_5xx_429_and_lost_answers(
    emulator: EmulatorHandle, client: UserServiceClient, secrets: Secrets, fault: dict[str, Any]
) -> None:
    user = client.create(CREDS, CreateUserRequest())
    token = admin_token(client, secrets)
    emulator.set_faults(script=[{"call": "update", **fault}])

    client.update_user(token, user.device_token, UserUpdate(nickname="twice is fine"))

    counters = emulator.counters()
    assert counters["management_calls"]["update"] == 2
    # A lost answer was applied, then applied again: PUT is idempotent, so that is harmless.
    assert counters["updates"] == (2 if fault["fault"] == "drop_after_commit" else 1)
    profile = emulator.user(str(user.device_token))
    assert profile is not None
    assert profile["Profile"]["Nickname"] == "twice is fine"


def test_delete_whose_answer_was_lost_is_repeated_and_the_404_is_done(
    emulator: EmulatorHandle, client: UserServiceClient, secrets: Secrets
) -> None:
    user = client.create(CREDS, CreateUserRequest())
    token = admin_token(client, secrets)
    emulator.set_faults(script=[{"call": "delete", "fault": "drop_after_commit"}])

    client.delete_user(token, user.device_token)

    counters = emulator.counters()
    assert counters["management_calls"]["delete"] == 2
    assert counters["deletes"] == 1
    assert emulator.user(str(user.device_token)) is None


def test_change_instance_whose_answer_was_lost_is_verified_by_find(
    emulator: EmulatorHandle, client: UserServiceClient, secrets: Secrets
) -> None:
    user = client.create(CREDS, CreateUserRequest())
    token = admin_token(client, secrets)
    emulator.set_faults(script=[{"call": "change_instance", "fault": "drop_after_commit"}])

    client.change_instance(token, user.device_token, OTHER)

    counters = emulator.counters()
    assert counters["management_calls"]["change_instance"] == 1  # not sent again: find saw it done
    assert counters["management_calls"]["find"] == 1
    assert counters["instance_changes"] == 1


def test_change_instance_that_failed_after_sending_is_sent_again(
    emulator: EmulatorHandle, client: UserServiceClient, secrets: Secrets
) -> None:
    user = client.create(CREDS, CreateUserRequest())
    token = admin_token(client, secrets)
    emulator.set_faults(script=[{"call": "change_instance", "fault": "error", "status": 500}])

    client.change_instance(token, user.device_token, OTHER)

    counters = emulator.counters()
    assert counters["management_calls"]["change_instance"] == 2
    assert counters["management_calls"]["find"] == 1
    moved = emulator.user(str(user.device_token))
    assert moved is not None
    assert moved["InstanceId"] == str(OTHER.instance_id)


# --- the vendor's Login limit -------------------------------------------------------------------------------------


def test_the_sixth_login_is_refused_once_and_never_retried(
    emulator: EmulatorHandle, client: UserServiceClient, recorder: Recorder, secrets: Secrets
) -> None:
    user = secrets.add(client.create(CREDS, CreateUserRequest()))
    for _ in range(3):
        latest = secrets.add(client.login(CREDS, user.device_token))
    for _ in range(2):
        secrets.admin(client.admin_login(ADMIN_CREDS))

    with pytest.raises(RateLimitedError) as caught:
        client.admin_login(ADMIN_CREDS)
    assert caught.value.retry_after == 3600
    # A lost Create's recovery Logins are Logins too: refused at once, not retried.
    emulator.set_faults(script=[{"call": "create", "fault": "drop_after_commit"}])
    with pytest.raises(RateLimitedError):
        client.create(CREDS, body_for("c-lost", uuid.uuid4()))

    counters = emulator.counters()
    assert counters["logins_refused_by_limit"] == 2  # one request each: nothing was retried
    assert counters["login_blocks_begun"] == 1
    assert recorder.sleeps == []
    # Everything but Login goes on.
    assert latest.access_token is not None
    assert latest.refresh_token is not None
    secrets.add(client.refresh(latest.access_token.token, latest.refresh_token))
    client.create(CREDS, CreateUserRequest())
