"""Models: case-insensitive keys, strict types, size caps, our message contract, wire format, secrets."""

from __future__ import annotations

import base64
import json
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from pydantic import ValidationError

from telematics_reg.errors import FieldError, InvalidMessageError
from telematics_reg.models import (
    MAX_BULK_QUANTITY,
    MAX_CREATE_MANY_PER_CALL,
    MAX_MESSAGE_BYTES,
    AccessToken,
    BulkRegistrationRequest,
    CreateManyRequest,
    CreateManyResult,
    CreateResult,
    CreateUserRequest,
    CustomFields,
    Envelope,
    Gender,
    InstanceCredentials,
    LoginRequest,
    RefreshRequest,
    RegistrationRequest,
    UserFields,
    UserStatus,
    field_errors,
    jwt_expiry,
    parse_registration_message,
    read_jwt_claims,
)

TOKEN = UUID("3fa85f64-5717-4562-b3fc-2c963f66afa6")
INSTANCE_ID = "3c1c8fd7-4133-404a-82e9-93a015d85362"
INSTANCE_KEY = "1b7cc25f-329e-4482-9dd1-0bb07c0c794b"


def _jwt(claims: dict[str, Any]) -> str:
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(claims)}.signature"


def _invalid(raw: Any) -> InvalidMessageError:
    with pytest.raises(InvalidMessageError) as caught:
        parse_registration_message(raw)
    return caught.value


def _keys(error: InvalidMessageError) -> list[str]:
    return [e.key for e in error.errors]


# --- case-insensitive keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["FirstName", "firstName", "firstname", "FIRSTNAME", "fIrStNaMe"])
def test_keys_bind_in_any_case(key: str) -> None:
    # Given a key spelled in any case / When validated / Then it binds to the field
    assert CreateUserRequest.model_validate({key: "Ada"}).first_name == "Ada"


def test_nested_keys_bind_in_any_case() -> None:
    body = CreateUserRequest.model_validate(
        {"userFields": {"enableTracking": False, "ENABLELOGGING": True, "clientid": "c-1"}}
    )
    assert body.user_fields == UserFields(enable_tracking=False, enable_logging=True, client_id="c-1")


def test_same_key_twice_in_different_case_is_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        CreateUserRequest.model_validate({"FirstName": "A", "firstName": "B"})
    assert field_errors(caught.value)[0].key == "FirstName"
    assert "more than once" in field_errors(caught.value)[0].message


def test_unknown_key_is_rejected_by_name() -> None:
    error = _invalid({"ClientId": "c-1", "FirstNmae": "typo"})
    assert error.reason == "invalid_fields"
    assert error.errors == [
        FieldError("FirstNmae", "Unknown field 'FirstNmae' (keys are case-insensitive; see the Create body)")
    ]


def test_unknown_nested_key_has_a_dotted_path() -> None:
    error = _invalid({"ClientId": "c-1", "UserFields": {"EnableTracing": True}})
    assert _keys(error) == ["UserFields.EnableTracing"]


# --- defaults ------------------------------------------------------------------------------------------


def test_defaults_follow_the_upstream() -> None:
    body = CreateUserRequest()
    assert body.create_access_token is True
    assert body.user_fields is None
    flags = UserFields()
    assert (flags.enable_tracking, flags.enable_logging, flags.enabled) == (True, False, True)
    assert flags.enable_realtime_location is None
    assert flags.client_id is None
    assert CreateManyRequest(quantity=1).create_access_token is True
    assert CustomFields() == CustomFields(enable_tracking=True, enable_logging=False, enabled=True)


def test_registration_defaults_to_the_default_instance() -> None:
    request = parse_registration_message({"ClientId": "c-1"})
    assert isinstance(request, RegistrationRequest)
    assert request.instance == "default"
    assert request.create_access_token is True


# --- Birthday, enums, types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2019-12-13", date(2019, 12, 13)),
        ("2019-12-13T06:19:18.837Z", datetime(2019, 12, 13, 6, 19, 18, 837000, tzinfo=UTC)),
        ("2019-12-13T06:19:18+02:00", datetime.fromisoformat("2019-12-13T06:19:18+02:00")),
        ("2019-12-13T06:19:18", datetime(2019, 12, 13, 6, 19, 18)),
    ],
)
def test_birthday_takes_an_iso_date_or_date_time(value: str, expected: date) -> None:
    body = CreateUserRequest.model_validate({"Birthday": value})
    assert body.birthday == expected
    assert type(body.birthday) is type(expected)


@pytest.mark.parametrize("value", ["13/12/2019", "2019-13-45", "yesterday", 1576400357, True, "", None])
def test_birthday_rejects_anything_else(value: Any) -> None:
    if value is None:  # null is "not given"
        assert CreateUserRequest.model_validate({"Birthday": None}).birthday is None
        return
    error = _invalid({"ClientId": "c-1", "Birthday": value})
    assert _keys(error) == ["Birthday"]
    assert "ISO 8601" in error.errors[0].message


def test_enums_take_their_values_in_any_case() -> None:
    body = CreateUserRequest.model_validate({"Gender": "female", "Status": "DEACTIVATED"})
    assert body.gender is Gender.FEMALE
    assert body.status is UserStatus.DEACTIVATED
    assert CreateUserRequest.model_validate({"Gender": "None"}).gender is Gender.NONE


def test_unknown_enum_value_is_a_clear_field_error() -> None:
    error = _invalid({"ClientId": "c-1", "Gender": "Robot", "Status": "Paused"})
    assert error.errors == [
        FieldError("Gender", "Input should be 'None', 'Male', 'Female' or 'Other'"),
        FieldError("Status", "Input should be 'Active' or 'Deactivated'"),
    ]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ChildrenCount", "3"),
        ("ChildrenCount", 3.0),
        ("ChildrenCount", True),
        ("CreateAccessToken", "true"),
        ("CreateAccessToken", 1),
        ("FirstName", 42),
        ("UserFields", "{}"),
        ("UserFields", []),
    ],
)
def test_types_are_strict(key: str, value: Any) -> None:
    error = _invalid({"ClientId": "c-1", key: value})
    assert _keys(error) == [key]


def test_nested_wrong_type_has_a_dotted_path() -> None:
    error = _invalid({"ClientId": "c-1", "UserFields": {"EnableTracking": "yes"}})
    assert error.errors == [FieldError("UserFields.EnableTracking", "Input should be a valid boolean")]


def test_uuids_are_taken_from_strings() -> None:
    assert CreateUserRequest.model_validate({"CustomToken": str(TOKEN)}).custom_token == TOKEN
    with pytest.raises(ValidationError):
        CreateUserRequest.model_validate({"CustomToken": "not-a-uuid"})


@pytest.mark.parametrize(("count", "ok"), [(0, True), (100, True), (-1, False), (101, False)])
def test_children_count_bounds(count: int, ok: bool) -> None:
    raw = {"ClientId": "c-1", "ChildrenCount": count}
    if ok:
        assert isinstance(parse_registration_message(raw), RegistrationRequest)
    else:
        assert _keys(_invalid(raw)) == ["ChildrenCount"]


# --- sizes ---------------------------------------------------------------------------------------------


def test_strings_are_capped_at_256() -> None:
    assert CreateUserRequest.model_validate({"City": "x" * 256}).city == "x" * 256
    error = _invalid({"ClientId": "c-1", "City": "x" * 257})
    assert error.errors == [FieldError("City", "String should have at most 256 characters")]


def test_image_url_may_be_longer() -> None:
    url = "https://example.com/" + "x" * 2000
    assert CreateUserRequest.model_validate({"ImageUrl": url}).image_url == url
    assert _keys(_invalid({"ClientId": "c-1", "ImageUrl": "x" * 2049})) == ["ImageUrl"]


@pytest.mark.parametrize("client_id", ["", "x" * 129])
def test_client_id_is_1_to_128_characters(client_id: str) -> None:
    assert _keys(_invalid({"ClientId": client_id})) == ["ClientId"]
    # Copied to the top-level ClientId, so both places report it.
    assert _keys(_invalid({"UserFields": {"ClientId": client_id}})) == ["UserFields.ClientId", "ClientId"]


@pytest.mark.parametrize("quantity", [0, -1, MAX_BULK_QUANTITY + 1])
def test_bulk_quantity_is_bounded(quantity: int) -> None:
    assert _keys(_invalid({"Quantity": quantity})) == ["Quantity"]


def test_create_many_quantity_is_bounded_per_call() -> None:
    assert CreateManyRequest(quantity=MAX_CREATE_MANY_PER_CALL).quantity == 100
    with pytest.raises(ValidationError):
        CreateManyRequest(quantity=MAX_CREATE_MANY_PER_CALL + 1)
    with pytest.raises(ValidationError):
        CreateManyRequest(quantity=0)


@pytest.mark.parametrize("instance", ["", "has space", "x" * 65, "ünï"])
def test_instance_alias_pattern(instance: str) -> None:
    assert _keys(_invalid({"ClientId": "c-1", "Instance": instance})) == ["Instance"]


def test_instance_alias_accepts_the_documented_characters() -> None:
    request = parse_registration_message({"ClientId": "c-1", "instance": "fleet-eu_2.a"})
    assert request.instance == "fleet-eu_2.a"


# --- ClientId in both places --------------------------------------------------------------------------


def test_client_id_may_come_from_user_fields() -> None:
    request = parse_registration_message({"userFields": {"clientId": "c-7"}})
    assert isinstance(request, RegistrationRequest)
    assert request.client_id == "c-7"


def test_client_id_in_both_places_must_agree() -> None:
    same = parse_registration_message({"ClientId": "c-7", "UserFields": {"ClientId": "c-7"}})
    assert isinstance(same, RegistrationRequest)
    assert same.client_id == "c-7"
    error = _invalid({"ClientId": "c-7", "UserFields": {"ClientId": "c-8"}})
    assert _keys(error) == ["ClientId"]
    assert "differ" in error.errors[0].message


def test_client_id_is_required() -> None:
    error = _invalid({"FirstName": "Ada"})
    assert error.reason == "invalid_fields"
    assert error.errors == [
        FieldError("ClientId", "Field required: the user's id in your system, as ClientId or UserFields.ClientId")
    ]


def test_create_body_forwards_everything_but_the_routing_fields() -> None:
    request = parse_registration_message(
        {
            "clientId": "c-1",
            "instance": "fleet-eu",
            "firstName": "Ada",
            "gender": "female",
            "birthday": "1990-05-01",
            "userFields": {"enableLogging": True},
            "createAccessToken": False,
        }
    )
    assert isinstance(request, RegistrationRequest)
    assert request.create_body(TOKEN).to_upstream() == {
        "CreateAccessToken": False,
        "FirstName": "Ada",
        "Gender": "Female",
        "Birthday": "1990-05-01",
        "UserFields": {"EnableTracking": True, "EnableLogging": True, "Enabled": True, "ClientId": "c-1"},
        "CustomToken": str(TOKEN),
    }


# --- parse_registration_message: every reason ------------------------------------------------------------


@pytest.mark.parametrize("raw", ['{"ClientId": "c-1"', b"\xff\xfe", "", "NaN", '{"ClientId": NaN}', "[" * 5000])
def test_not_json(raw: str | bytes) -> None:
    error = _invalid(raw)
    assert error.reason == "not_json"
    assert "JSON" in error.errors[0].message


@pytest.mark.parametrize(
    ("raw", "kind"), [("[]", "an array"), ('"x"', "a string"), ("42", "a number"), ("null", "null")]
)
def test_not_an_object(raw: str, kind: str) -> None:
    error = _invalid(raw)
    assert error.reason == "not_an_object"
    assert error.errors[0].message == f"Message must be a JSON object, not {kind}"


def test_too_large() -> None:
    raw = json.dumps({"ClientId": "c-1", "FirstName": "x" * MAX_MESSAGE_BYTES})
    error = _invalid(raw)
    assert error.reason == "too_large"
    assert _invalid(raw.encode()).reason == "too_large"
    assert _invalid(json.loads(raw)).reason == "too_large"


def test_invalid_fields_lists_every_problem() -> None:
    error = _invalid('{"ClientId": 5, "ChildrenCount": "2", "Unknown": 1}')
    assert error.reason == "invalid_fields"
    assert sorted(_keys(error)) == ["ChildrenCount", "ClientId", "Unknown"]
    assert str(error).startswith("invalid_fields: ")


def test_error_texts_never_echo_the_input() -> None:
    error = _invalid({"ClientId": "c-1", "Phone": "secret-" + "x" * 300})
    assert "secret-" not in str(error)


def test_quantity_in_any_case_makes_a_bulk_request() -> None:
    request = parse_registration_message(
        b'{"quantity": 250, "requestId": "load-1", "customFields": {"enabled": false}}'
    )
    assert isinstance(request, BulkRegistrationRequest)
    assert request.request_id == "load-1"
    assert [b.quantity for b in request.create_many_bodies()] == [100, 100, 50]
    assert request.create_many_bodies()[0].to_upstream() == {
        "Quantity": 100,
        "CreateAccessToken": True,
        "CustomFields": {"EnableTracking": True, "EnableLogging": False, "Enabled": False},
    }


def test_bulk_rejects_single_registration_fields() -> None:
    error = _invalid({"Quantity": 3, "ClientId": "c-1"})
    assert _keys(error) == ["ClientId"]


@pytest.mark.parametrize("request_id", ["", "x" * 129])
def test_bulk_request_id_is_1_to_128_characters(request_id: str) -> None:
    assert _keys(_invalid({"Quantity": 3, "RequestId": request_id})) == ["RequestId"]


# --- wire format ---------------------------------------------------------------------------------------


def test_empty_body_stays_empty() -> None:
    assert CreateUserRequest().to_upstream() == {}
    assert CreateUserRequest.model_validate({}).to_upstream() == {}


def test_to_upstream_round_trip() -> None:
    wire = {
        "CreateAccessToken": True,
        "FirstName": "Ada",
        "LastName": "Lovelace",
        "Nickname": "ada",
        "Phone": "+441234",
        "Email": "ada@example.com",
        "Gender": "Female",
        "Birthday": "2019-12-13T06:19:18.837000+00:00",
        "MaritalStatus": "Single",
        "ChildrenCount": 0,
        "Country": "UK",
        "District": "d",
        "City": "London",
        "Address": "1 Street",
        "ImageUrl": "https://example.com/a.png",
        "Status": "Deactivated",
        "InstanceInviteCode": "code",
        "UserFields": {
            "EnableTracking": False,
            "EnableLogging": True,
            "Enabled": True,
            "EnableRealtimeLocation": True,
            "ClientId": "c-1",
        },
        "CustomToken": str(TOKEN),
    }
    camel = {key[0].lower() + key[1:]: value for key, value in wire.items()}
    body = CreateUserRequest.model_validate(camel)
    assert body.to_upstream() == wire
    assert CreateUserRequest.model_validate(body.to_upstream()) == body


def test_refresh_and_login_bodies() -> None:
    refresh = RefreshRequest.model_validate({"accessToken": "jwt-value", "refreshToken": "rt-value"})
    assert refresh.to_upstream() == {"AccessToken": "jwt-value", "RefreshToken": "rt-value"}
    creds = InstanceCredentials.model_validate({"InstanceId": INSTANCE_ID, "InstanceKey": INSTANCE_KEY})
    login = LoginRequest.for_device(creds, TOKEN)
    assert login.to_upstream() == {
        "LoginFields": json.dumps({"Devicetoken": str(TOKEN)}, separators=(",", ":")),
        "Password": INSTANCE_KEY,
    }
    # LoginFields may come as a JSON string (the docs) or an object (some clients).
    assert LoginRequest.model_validate(login.to_upstream()) == login


def test_instance_credentials_give_the_headers() -> None:
    creds = InstanceCredentials.model_validate({"instanceid": INSTANCE_ID, "INSTANCEKEY": INSTANCE_KEY})
    assert creds.headers() == {"InstanceId": INSTANCE_ID, "InstanceKey": INSTANCE_KEY}
    with pytest.raises(ValidationError):
        InstanceCredentials.model_validate({"InstanceId": "nope", "InstanceKey": INSTANCE_KEY})


@pytest.mark.parametrize(
    "malformed",
    [
        INSTANCE_KEY + "\n",
        INSTANCE_KEY + "\r\n",
        INSTANCE_KEY + " ",
        " " + INSTANCE_KEY,
        INSTANCE_KEY + "\t",
        INSTANCE_KEY[:8] + "\x00" + INSTANCE_KEY[9:],
        INSTANCE_KEY.replace("-", ""),
        "{" + INSTANCE_KEY + "}",
        "urn:uuid:" + INSTANCE_KEY,
        INSTANCE_KEY[:-1] + "\u00e9",
        "the-key",
        "",
    ],
    ids=[
        "newline",
        "crlf",
        "trailing-space",
        "leading-space",
        "tab",
        "nul",
        "no-hyphens",
        "braces",
        "urn",
        "non-ascii",
        "not-a-uuid",
        "empty",
    ],
)
def test_a_malformed_instance_key_is_refused_without_quoting_it(malformed: str) -> None:
    # The vendor's InstanceKeys are UUIDs; anything else would go into an HTTP header, where requests and
    # http.client refuse it with the whole value in their exception text.
    with pytest.raises(ValidationError) as caught:
        InstanceCredentials.model_validate({"InstanceId": INSTANCE_ID, "InstanceKey": malformed})
    assert [error["loc"] for error in caught.value.errors()] == [("InstanceKey",)]
    for text in (
        str(caught.value),
        repr(caught.value),
        json.dumps(caught.value.errors(include_url=False, include_input=False)),
    ):
        assert INSTANCE_KEY[9:] not in text
        assert INSTANCE_KEY.replace("-", "")[12:] not in text


# --- answers -------------------------------------------------------------------------------------------


def test_create_result_binds_the_documented_answer_and_ignores_extra_keys() -> None:
    result = CreateResult.model_validate(
        {
            "deviceToken": str(TOKEN),
            "accessToken": {"token": "jwt", "expiresIn": 7200, "TokenType": "Bearer"},
            "refreshToken": "rt",
            "SomethingNew": 1,
        }
    )
    assert result.device_token == TOKEN
    assert result.access_token == AccessToken.model_validate({"Token": "jwt", "ExpiresIn": 7200})
    assert result.refresh_token is not None
    assert result.refresh_token.get_secret_value() == "rt"


def test_create_result_without_tokens() -> None:
    result = CreateResult.model_validate({"DeviceToken": str(TOKEN), "AccessToken": None, "RefreshToken": None})
    assert result.access_token is None
    assert result.expires_at(datetime.now(UTC)) is None


def test_create_many_result() -> None:
    results = CreateManyResult.model_validate({"Results": [{"DeviceToken": str(TOKEN)}] * 2}).results
    assert [r.device_token for r in results] == [TOKEN, TOKEN]


def test_envelope_field_errors() -> None:
    envelope = Envelope.model_validate(
        {"Result": None, "Status": 422, "Title": "bad", "Errors": [{"Key": "Gender", "Message": "wrong"}, {}]}
    )
    assert envelope.field_errors() == [FieldError("Gender", "wrong"), FieldError("", "")]
    assert Envelope.model_validate({}).field_errors() == []


# --- expiry --------------------------------------------------------------------------------------------


def test_expires_at_uses_expires_in_for_an_opaque_token() -> None:
    now = datetime(2024, 1, 1, tzinfo=UTC)
    result = CreateResult.model_validate(
        {"DeviceToken": str(TOKEN), "AccessToken": {"Token": "opaque", "ExpiresIn": 600}}
    )
    assert result.expires_at(now) == now + timedelta(seconds=600)
    assert result.expires_at(now.timestamp()) == now + timedelta(seconds=600)
    assert result.expires_at(now.replace(tzinfo=None)) == now + timedelta(seconds=600)


def test_expires_at_takes_the_earlier_of_expires_in_and_exp() -> None:
    now = datetime(2024, 1, 1, tzinfo=UTC)
    soon = int(now.timestamp()) + 60
    result = CreateResult.model_validate(
        {"DeviceToken": str(TOKEN), "AccessToken": {"Token": _jwt({"exp": soon}), "ExpiresIn": 7200}}
    )
    assert result.expires_at(now) == now + timedelta(seconds=60)
    late = CreateResult.model_validate(
        {"DeviceToken": str(TOKEN), "AccessToken": {"Token": _jwt({"exp": soon + 10_000}), "ExpiresIn": 7200}}
    )
    assert late.expires_at(now) == now + timedelta(seconds=7200)


def test_jwt_helpers_read_the_spec_example() -> None:
    example = (
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpYXQiOjE1NzY0MDAzNTcsIm5iZiI6MTU3NjQwMDM1NywiZXhwIjoxNTc2NDA3NTU3fQ.x"
    )
    assert read_jwt_claims(example) == {"iat": 1576400357, "nbf": 1576400357, "exp": 1576407557}
    assert jwt_expiry(example) == datetime.fromtimestamp(1576407557, tz=UTC)
    for unreadable in ["", "a.b", "a.!!!.c", _jwt({"exp": "soon"}), _jwt({"exp": True}), "a.W10.c"]:
        assert jwt_expiry(unreadable) is None


# --- secrets -------------------------------------------------------------------------------------------


def test_secrets_never_show_in_repr_or_dumps() -> None:
    result = CreateResult.model_validate(
        {"DeviceToken": str(TOKEN), "AccessToken": {"Token": "jwt-SECRET", "ExpiresIn": 1}, "RefreshToken": "rt-SECRET"}
    )
    creds = InstanceCredentials.model_validate({"InstanceId": INSTANCE_ID, "InstanceKey": INSTANCE_KEY})
    refresh = RefreshRequest(access_token="jwt-SECRET", refresh_token="rt-SECRET")  # type: ignore[arg-type]
    for model in (result, creds, refresh):
        for text in (repr(model), str(model), model.model_dump_json(), str(model.model_dump())):
            assert "SECRET" not in text
            assert INSTANCE_KEY not in text


def test_secret_validation_errors_do_not_echo_the_secret() -> None:
    with pytest.raises(ValidationError) as caught:
        RefreshRequest.model_validate({"AccessToken": "jwt-SECRET" * 2000, "RefreshToken": "rt"})
    assert "SECRET" not in str(caught.value)
