"""The emulator against the seed documents and the contract in notes/emulator-spec.md.

Responses are compared with the seeds' examples field by field for shape and JSON type (never the example
values), and tokens are checked for what they must carry.
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from typing import Any

import jwt
import pytest
import requests

from local.emulator.testing import EmulatorError, EmulatorHandle, running_emulator
from tests.functional.emulator import seeds
from tests.functional.emulator.helpers import (
    JWT_CLAIMS,
    Api,
    assert_envelope,
    assert_same_shape,
    assert_token_pair,
    decode,
    is_uuid,
)

# ---------------------------------------------------------------------------------------------- Create


def test_create_with_the_seed_body_answers_the_seed_shape(emulator: EmulatorHandle, api: Api) -> None:
    response = api.create(seeds.CREATE_BODY)

    body = assert_envelope(response, 200)
    assert_same_shape(body, seeds.CREATE_RESPONSE)
    assert body["Title"] == ""
    claims = assert_token_pair(emulator, body["Result"])
    assert body["Result"]["AccessToken"]["ExpiresIn"] == 432_000  # 5 days, as registration-api.md documents
    seed_claims = jwt.decode(seeds.SEED_JWT, options={"verify_signature": False})
    for claim in JWT_CLAIMS:
        assert type(claims[claim]) is type(seed_claims[claim]), claim

    user = emulator.user(body["Result"]["DeviceToken"])
    assert user is not None
    assert user["InstanceId"] == emulator.instance_id()
    assert user["ClientId"] == "string"
    assert user["Status"] == "Active"
    assert user["Profile"]["Gender"] == "None"
    assert user["Profile"]["Birthday"] == "2019-12-13T06:19:18.837Z"
    assert user["Profile"]["ChildrenCount"] == 0
    assert user["UserFields"] == {
        "EnableTracking": True,
        "EnableLogging": False,
        "Enabled": True,
        "EnableRealtimeLocation": False,
        "ClientId": "string",
    }


@pytest.mark.parametrize("body", [{}, None], ids=["empty-object", "no-body"])
def test_create_without_a_profile_uses_the_defaults(emulator: EmulatorHandle, body: Any) -> None:
    response = requests.post(
        f"{emulator.url}/v1/Registration/Create",
        headers=emulator.headers(),
        json=body,
        timeout=10,
    )

    result = assert_envelope(response, 200)["Result"]
    assert_same_shape(response.json(), seeds.CREATE_RESPONSE)
    assert_token_pair(emulator, result)
    user = emulator.user(result["DeviceToken"])
    assert user is not None
    assert user["ClientId"] is None
    assert user["UserFields"]["EnableTracking"] is True
    assert user["UserFields"]["EnableLogging"] is False
    assert user["UserFields"]["Enabled"] is True
    assert emulator.counters()["users_by_client_id"] == {}


def test_create_binds_camel_case_and_lower_case_keys(emulator: EmulatorHandle, api: Api) -> None:
    result = api.created(
        {
            "firstName": "Ann",
            "lastname": "Lee",
            "gender": "female",
            "childrenCount": 2,
            "status": "deactivated",
            "userFields": {"clientId": "crm-1", "enableTracking": False, "ENABLELOGGING": True},
        }
    )

    user = emulator.user(result["DeviceToken"])
    assert user is not None
    assert user["Profile"] == {"FirstName": "Ann", "LastName": "Lee", "Gender": "Female", "ChildrenCount": 2}
    assert user["Status"] == "Deactivated"
    assert user["UserFields"]["ClientId"] == "crm-1"
    assert user["UserFields"]["EnableTracking"] is False
    assert user["UserFields"]["EnableLogging"] is True
    assert emulator.counters()["users_by_client_id"] == {f"{emulator.instance_id()}/crm-1": 1}


@pytest.mark.parametrize("path", ["/v1/registration/create", "/V1/REGISTRATION/CREATE", "/v1/Registration/Create/"])
def test_routes_match_case_insensitively(emulator: EmulatorHandle, api: Api, path: str) -> None:
    response = api.create({}, path=path)

    assert_envelope(response, 200)
    assert emulator.counters()["creates"] == 1


@pytest.mark.parametrize("names", [("InstanceID", "InstanceKey"), ("instanceid", "instancekey")])
def test_instance_header_names_are_case_insensitive(emulator: EmulatorHandle, names: tuple[str, str]) -> None:
    headers = {names[0]: emulator.instance_id(), names[1]: emulator.instance_key()}

    response = requests.post(f"{emulator.url}/v1/Registration/Create", headers=headers, json={}, timeout=10)

    assert_envelope(response, 200)


def test_custom_token_becomes_the_device_token(emulator: EmulatorHandle, api: Api) -> None:
    custom = str(uuid.uuid4())

    result = api.created({"CustomToken": custom.upper()})

    assert result["DeviceToken"] == custom
    assert_token_pair(emulator, result)


def test_duplicate_custom_token_is_422_and_creates_nothing(emulator: EmulatorHandle, api: Api) -> None:
    custom = str(uuid.uuid4())
    api.created({"CustomToken": custom, "UserFields": {"ClientId": "c-1"}})

    response = api.create({"customToken": custom, "UserFields": {"ClientId": "c-1"}})

    body = assert_envelope(response, 422, "CustomToken")
    assert body["Errors"] == [{"Key": "CustomToken", "Message": "A user with this DeviceToken already exists"}]
    counters = emulator.counters()
    assert counters["users_total"] == 1
    assert counters["creates"] == 1
    assert counters["users_by_client_id"] == {f"{emulator.instance_id()}/c-1": 1}


def test_create_without_access_token_returns_only_the_device_token(emulator: EmulatorHandle, api: Api) -> None:
    response = api.create({"CreateAccessToken": False})

    result = assert_envelope(response, 200)["Result"]
    assert set(result) == {"DeviceToken", "AccessToken", "RefreshToken"}
    assert is_uuid(result["DeviceToken"])
    assert result["AccessToken"] is None
    assert result["RefreshToken"] is None
    user = emulator.user(result["DeviceToken"])
    assert user is not None
    assert user["HasRefreshToken"] is False
    # The user gets tokens by logging in.
    login = api.login(result["DeviceToken"])
    assert_token_pair(emulator, assert_envelope(login, 200)["Result"])


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"InstanceId": "INSTANCE"},
        {"InstanceId": "INSTANCE", "InstanceKey": str(uuid.uuid4())},
        {"InstanceId": str(uuid.uuid4()), "InstanceKey": "KEY"},
        {"InstanceId": "INSTANCE", "InstanceKey": "OTHER_KEY"},
    ],
    ids=["no-headers", "no-key", "wrong-key", "unknown-instance", "key-of-another-instance"],
)
def test_wrong_instance_credentials_are_401(emulator: EmulatorHandle, headers: dict[str, str]) -> None:
    values = {
        "INSTANCE": emulator.instance_id(),
        "KEY": emulator.instance_key(),
        "OTHER_KEY": emulator.instance_key("fleet-eu"),
    }
    sent = {name: values.get(value, value) for name, value in headers.items()}

    for path in ("/v1/Registration/Create", "/v1/Registration/CreateMany"):
        response = requests.post(emulator.url + path, headers=sent, json={"Quantity": 1}, timeout=10)
        assert_envelope(response, 401, "InstanceKey")
    assert emulator.counters()["users_total"] == 0


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("Gender", "Unknown", "Gender"),
        ("Gender", 7, "Gender"),
        ("Birthday", "13/12/2019", "Birthday"),
        ("Birthday", 20191213, "Birthday"),
        ("ChildrenCount", -1, "ChildrenCount"),
        ("ChildrenCount", "2", "ChildrenCount"),
        ("ChildrenCount", 1.5, "ChildrenCount"),
        ("Status", "Deleted", "Status"),
        ("FirstName", 5, "FirstName"),
        ("Email", ["a@b.c"], "Email"),
        ("CreateAccessToken", "true", "CreateAccessToken"),
        ("CustomToken", "not-a-uuid", "CustomToken"),
        ("UserFields", "tracking", "UserFields"),
        ("UserFields", {"EnableTracking": "yes"}, "UserFields.EnableTracking"),
        ("userFields", {"clientId": 42}, "UserFields.ClientId"),
        ("UserFields", {"Enabled": 1}, "UserFields.Enabled"),
    ],
)
def test_invalid_fields_are_422_with_the_field_key(
    emulator: EmulatorHandle, api: Api, field: str, value: Any, key: str
) -> None:
    response = api.create({**seeds.CREATE_BODY, field: value})

    body = assert_envelope(response, 422, key)
    assert body["Errors"][0]["Message"]
    assert emulator.counters()["users_total"] == 0


def test_every_invalid_field_is_reported(emulator: EmulatorHandle, api: Api) -> None:
    response = api.create({"Gender": "x", "ChildrenCount": -2, "UserFields": {"EnableLogging": "no"}})

    body = assert_envelope(response, 422, "Gender", "ChildrenCount", "UserFields.EnableLogging")
    assert body["Title"]


@pytest.mark.parametrize("birthday", ["2019-12-13", "2019-12-13T06:19:18", "2019-12-13T06:19:18+02:00"])
def test_birthday_takes_a_date_or_a_date_time(api: Api, birthday: str) -> None:
    assert_envelope(api.create({"Birthday": birthday}), 200)


def test_unknown_keys_are_ignored(api: Api) -> None:
    assert_envelope(api.create({"ClientId": "top-level", "Instance": "default", "Whatever": [1]}), 200)


# ---------------------------------------------------------------------------------------------- CreateMany


def test_create_many_with_the_seed_body_answers_the_seed_shape(emulator: EmulatorHandle, api: Api) -> None:
    response = api.create_many({**seeds.CREATE_MANY_BODY, "Quantity": 2})

    body = assert_envelope(response, 200)
    assert_same_shape(body, seeds.CREATE_MANY_RESPONSE)
    results = body["Result"]["Results"]
    for result in results:
        assert_token_pair(emulator, result)
    assert len({result["DeviceToken"] for result in results}) == 2
    counters = emulator.counters()
    assert counters["create_many_calls"] == 1
    assert counters["create_many_users"] == 2
    assert counters["users_total"] == 2
    assert counters["creates"] == 0


def test_create_many_applies_custom_fields_and_create_access_token(emulator: EmulatorHandle, api: Api) -> None:
    response = api.create_many(
        {"quantity": 3, "createAccessToken": False, "customFields": {"enableTracking": False, "EnableLogging": True}}
    )

    results = assert_envelope(response, 200)["Result"]["Results"]
    assert len(results) == 3
    for result in results:
        assert result["AccessToken"] is None
        assert result["RefreshToken"] is None
        user = emulator.user(result["DeviceToken"])
        assert user is not None
        assert user["UserFields"]["EnableTracking"] is False
        assert user["UserFields"]["EnableLogging"] is True
        assert user["UserFields"]["Enabled"] is True


@pytest.mark.parametrize("quantity", [0, -1, 1001, "2", 2.5, None])
def test_create_many_quantity_is_required_and_bounded(emulator: EmulatorHandle, api: Api, quantity: Any) -> None:
    body = {**seeds.CREATE_MANY_BODY, "Quantity": quantity}

    assert_envelope(api.create_many(body), 422, "Quantity")
    assert emulator.counters()["users_total"] == 0


def test_create_many_validates_custom_fields(api: Api) -> None:
    response = api.create_many({"Quantity": 1, "CustomFields": {"Enabled": "on"}})

    assert_envelope(response, 422, "CustomFields.Enabled")


def test_create_many_can_be_switched_off(emulator: EmulatorHandle, api: Api) -> None:
    emulator.set_config(create_many_enabled=False)
    emulator.set_faults(error_rate=1.0, calls=["create_many"])

    assert_envelope(api.create_many({"Quantity": 2}), 404, "Route")
    assert emulator.counters()["faults_served"]["error"] == 0

    emulator.set_faults(error_rate=0.0)
    emulator.set_config(create_many_enabled=True)
    assert_envelope(api.create_many({"Quantity": 2}), 200)


# ---------------------------------------------------------------------------------------------- Refresh


@pytest.mark.parametrize("path", ["observed", "spec", "/v1/auth/refreshtoken", "/V1/REFRESHTOKEN"])
def test_refresh_rotates_both_tokens(emulator: EmulatorHandle, api: Api, path: str) -> None:
    created = api.created({"UserFields": {"ClientId": "c-1"}})

    response = api.refresh(created["AccessToken"]["Token"], created["RefreshToken"], path)

    body = assert_envelope(response, 200)
    assert_same_shape(body, seeds.REFRESH_RESPONSE)
    refreshed = body["Result"]
    assert_token_pair(emulator, refreshed)
    assert refreshed["DeviceToken"] == created["DeviceToken"]
    assert refreshed["RefreshToken"] != created["RefreshToken"]
    assert refreshed["AccessToken"]["Token"] != created["AccessToken"]["Token"]
    assert emulator.counters()["refreshes"] == 1
    # The new pair refreshes again.
    again = api.refresh(refreshed["AccessToken"]["Token"], refreshed["RefreshToken"], path)
    assert_envelope(again, 200)


@pytest.mark.parametrize("second_path", ["observed", "spec"])
def test_refresh_token_is_single_use(emulator: EmulatorHandle, api: Api, second_path: str) -> None:
    created = api.created()
    assert_envelope(api.refresh(created["AccessToken"]["Token"], created["RefreshToken"]), 200)

    response = api.refresh(created["AccessToken"]["Token"], created["RefreshToken"], second_path)

    body = assert_envelope(response, 400, "RefreshToken")
    assert body["Errors"][0]["Message"]
    counters = emulator.counters()
    assert counters["refreshes"] == 1
    assert counters["rejected_refresh_tokens"] == 1


def test_refresh_with_an_unknown_refresh_token_is_400_and_counted(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created()

    response = api.refresh(created["AccessToken"]["Token"], "xZrst21uJ3zpl52h2n/pQs7yEla6zfkap1VOhgaHNQQ=")

    assert_envelope(response, 400, "RefreshToken")
    assert emulator.counters()["rejected_refresh_tokens"] == 1


@pytest.mark.parametrize(
    ("body", "keys"),
    [
        ({}, ("AccessToken", "RefreshToken")),
        ({"AccessToken": "x"}, ("RefreshToken",)),
        ({"RefreshToken": "x"}, ("AccessToken",)),
        ({"AccessToken": 1, "RefreshToken": "x"}, ("AccessToken",)),
    ],
)
def test_refresh_requires_both_fields(emulator: EmulatorHandle, api: Api, body: Any, keys: tuple[str, ...]) -> None:
    response = api.post("/v1/Auth/RefreshToken", body)

    assert_envelope(response, 400, *keys)
    assert emulator.counters()["rejected_refresh_tokens"] == 0


def test_refresh_with_the_seed_placeholders_is_400(api: Api) -> None:
    assert_envelope(api.post("/v1/RefreshToken", seeds.REFRESH_BODY), 400, "AccessToken")


def test_refresh_rejects_a_foreign_or_forged_access_token(emulator: EmulatorHandle, api: Api) -> None:
    first, second = api.created(), api.created()
    forged = jwt.encode(
        {**decode(emulator, first["AccessToken"]["Token"]), "jti": str(uuid.uuid4())},
        "not-the-emulator-secret-not-the-emulator-secret",
        algorithm="HS256",
    )

    assert_envelope(api.refresh(forged, first["RefreshToken"]), 400, "AccessToken")
    assert_envelope(api.refresh(seeds.SEED_JWT, first["RefreshToken"]), 400, "AccessToken")
    assert_envelope(api.refresh(second["AccessToken"]["Token"], first["RefreshToken"]), 400, "AccessToken")
    assert emulator.counters()["rejected_refresh_tokens"] == 0
    # None of those spent the refresh token.
    assert_envelope(api.refresh(first["AccessToken"]["Token"], first["RefreshToken"]), 200)


def test_an_expired_access_token_still_refreshes_but_no_longer_authorizes(emulator: EmulatorHandle, api: Api) -> None:
    emulator.set_config(token_lifetime_s=1)
    session = api.admin_login()
    assert session["AccessToken"]["ExpiresIn"] == 1
    time.sleep(2.1)

    assert_envelope(api.find(session["AccessToken"]["Token"], ClientId="x"), 401, "Authorization")
    # A lifetime long enough that the refreshed token cannot expire on a loaded machine before it is used.
    emulator.set_config(token_lifetime_s=60)
    response = api.refresh(session["AccessToken"]["Token"], session["RefreshToken"])
    refreshed = assert_envelope(response, 200)["Result"]
    assert refreshed["AccessToken"]["ExpiresIn"] == 60
    assert_envelope(api.find(refreshed["AccessToken"]["Token"], ClientId="x"), 200)


@pytest.mark.parametrize(("enabled", "disabled"), [("spec", "observed"), ("observed", "spec")])
def test_each_refresh_path_can_be_switched_off(emulator: EmulatorHandle, api: Api, enabled: str, disabled: str) -> None:
    emulator.set_config(refresh_paths=[enabled])
    created = api.created()

    assert_envelope(api.refresh(created["AccessToken"]["Token"], created["RefreshToken"], disabled), 404, "Route")
    response = api.refresh(created["AccessToken"]["Token"], created["RefreshToken"], enabled)
    assert_envelope(response, 200)
    assert emulator.counters()["rejected_refresh_tokens"] == 0


# ---------------------------------------------------------------------------------------------- Login


@pytest.mark.parametrize("as_object", [False, True], ids=["string-login-fields", "object-login-fields"])
def test_login_issues_a_new_pair_and_retires_the_old_refresh_token(
    emulator: EmulatorHandle, api: Api, as_object: bool
) -> None:
    created = api.created()

    response = api.login(created["DeviceToken"], as_object=as_object)

    body = assert_envelope(response, 200)
    assert_same_shape(body, seeds.CREATE_RESPONSE)
    logged_in = body["Result"]
    assert_token_pair(emulator, logged_in)
    assert logged_in["DeviceToken"] == created["DeviceToken"]
    assert logged_in["RefreshToken"] != created["RefreshToken"]
    assert_envelope(api.refresh(created["AccessToken"]["Token"], created["RefreshToken"]), 400, "RefreshToken")
    assert_envelope(api.refresh(logged_in["AccessToken"]["Token"], logged_in["RefreshToken"]), 200)
    counters = emulator.counters()
    assert counters["logins"] == 1
    assert counters["failed_logins"] == 0


def test_login_with_the_documented_body(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created()
    body = {
        "LoginFields": seeds.LOGIN_BODY_TEMPLATE["LoginFields"].replace("<DeviceToken>", created["DeviceToken"]),
        "Password": emulator.instance_key(),
    }

    response = api.post("/v1/Auth/Login", body, {"InstanceId": emulator.instance_id()})

    assert_token_pair(emulator, assert_envelope(response, 200)["Result"])


def test_login_keys_are_case_insensitive(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created()
    body = {"loginFields": {"DEVICETOKEN": created["DeviceToken"].upper()}, "password": emulator.instance_key()}

    response = api.post("/v1/auth/login", body, {"instanceid": emulator.instance_id()})

    assert assert_envelope(response, 200)["Result"]["DeviceToken"] == created["DeviceToken"]


@pytest.mark.parametrize(
    ("how", "status", "key"),
    [
        ("wrong password", 401, "Password"),
        ("unknown instance", 401, "Password"),
        ("another instance's key", 401, "Password"),
        ("unknown user", 404, "DeviceToken"),
        ("user of another instance", 404, "DeviceToken"),
        ("no LoginFields", 400, "LoginFields"),
    ],
)
def test_login_failures(emulator: EmulatorHandle, api: Api, how: str, status: int, key: str) -> None:
    created = api.created()
    other = api.created(alias="fleet-eu")
    attempts = {
        "wrong password": lambda: api.login(created["DeviceToken"], password=str(uuid.uuid4())),
        "unknown instance": lambda: api.login(created["DeviceToken"], instance_id=str(uuid.uuid4())),
        "another instance's key": lambda: api.login(created["DeviceToken"], password=emulator.instance_key("fleet-eu")),
        "unknown user": lambda: api.login(str(uuid.uuid4())),
        "user of another instance": lambda: api.login(other["DeviceToken"]),
        "no LoginFields": lambda: api.post("/v1/Auth/Login", {"Password": emulator.instance_key()}),
    }

    body = assert_envelope(attempts[how](), status, key)

    if how == "unknown user":
        assert body["Errors"] == [{"Key": "DeviceToken", "Message": "User not found"}]
    counters = emulator.counters()
    assert counters["failed_logins"] == 1
    assert counters["logins"] == 0
    # The user's refresh token survived it.
    assert_envelope(api.refresh(created["AccessToken"]["Token"], created["RefreshToken"]), 200)


def test_login_can_be_disabled_per_user(emulator: EmulatorHandle, api: Api) -> None:
    blocked, free = api.created(), api.created()

    assert emulator.disable_login([blocked["DeviceToken"]]) == [blocked["DeviceToken"]]

    assert_envelope(api.login(blocked["DeviceToken"]), 401, "DeviceToken")
    assert_envelope(api.login(free["DeviceToken"]), 200)
    assert emulator.counters()["failed_logins"] == 1
    emulator.disable_login([blocked["DeviceToken"]], disabled=False)
    assert_envelope(api.login(blocked["DeviceToken"]), 200)


# ---------------------------------------------------------------------------------------------- users


def test_user_exists_by_client_id_email_and_phone(emulator: EmulatorHandle, api: Api) -> None:
    api.created({"Email": "Ann@Example.com", "Phone": "+100", "UserFields": {"ClientId": "c-1"}})

    def exists(alias: str = "default", **params: str) -> bool:
        result: bool = assert_envelope(api.user_exists(alias, **params), 200)["Result"]["UserExists"]
        return result

    assert exists(ClientId="c-1")
    assert exists(clientId="c-1")
    assert not exists(ClientId="c-2")
    assert exists(Email="ann@example.com")
    assert exists(Phone="+100")
    assert not exists(Phone="+200")
    assert not exists("fleet-eu", ClientId="c-1")
    assert_envelope(api.user_exists(), 400, "ClientId")
    response = requests.get(f"{emulator.url}/v1/Check/UserExists", params={"ClientId": "c-1"}, timeout=10)
    assert_envelope(response, 401, "InstanceKey")


# ---------------------------------------------------------------------------------------------- envelope, HTTP


def test_malformed_requests(emulator: EmulatorHandle) -> None:
    url = f"{emulator.url}/v1/Registration/Create"
    headers = {**emulator.headers(), "Content-Type": "application/json"}

    assert_envelope(requests.post(url, headers=headers, data="{not json", timeout=10), 400, "Body")
    assert_envelope(requests.post(url, headers=headers, data="[1, 2]", timeout=10), 400, "Body")
    assert_envelope(requests.post(url, headers=headers, data=b"\xff\xfe", timeout=10), 400, "Body")
    assert_envelope(requests.get(f"{emulator.url}/v1/Nothing/Here", timeout=10), 404, "Route")
    wrong_method = requests.get(url, headers=headers, timeout=10)
    assert_envelope(wrong_method, 405, "Method")
    assert wrong_method.headers["Allow"] == "POST"
    assert emulator.counters()["users_total"] == 0


def test_keep_alive_connection_survives_every_kind_of_answer(emulator: EmulatorHandle) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=10)
    headers = {**emulator.headers(), "Content-Type": "application/json"}
    exchanges = [
        ("POST", "/v1/Registration/Create", "{}", 200),
        ("POST", "/v1/Registration/Create", '{"Gender": 9}', 422),
        ("POST", "/v1/Registration/Create", "{broken", 400),
        ("GET", "/v1/Registration/Create", None, 405),
        ("GET", "/nowhere", None, 404),
        ("POST", "/v1/Registration/CreateMany", '{"Quantity": 3}', 200),
        ("GET", "/_emulator/health", None, 200),
        ("POST", "/v1/Registration/Create", "", 200),
    ]
    try:
        connection.connect()
        local_port = connection.sock.getsockname()[1]
        for method, path, body, status in exchanges:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            assert response.status == status, (path, payload)
            assert int(response.getheader("Content-Length", "-1")) == len(payload)
            assert response.getheader("Connection") != "close"
            json.loads(payload)
            assert connection.sock is not None
            assert connection.sock.getsockname()[1] == local_port, "the connection was not reused"
    finally:
        connection.close()


def test_chunked_request_bodies_are_read(emulator: EmulatorHandle) -> None:
    def chunks() -> Any:
        yield b'{"FirstName": '
        yield b'"Chunky"}'

    response = requests.post(
        f"{emulator.url}/v1/Registration/Create", headers=emulator.headers(), data=chunks(), timeout=10
    )

    result = assert_envelope(response, 200)["Result"]
    user = emulator.user(result["DeviceToken"])
    assert user is not None
    assert user["Profile"]["FirstName"] == "Chunky"


# ---------------------------------------------------------------------------------------------- admin API


def test_counters_count_what_happened(emulator: EmulatorHandle, api: Api) -> None:
    first = api.created({"UserFields": {"ClientId": "c-1"}})
    api.created({"UserFields": {"ClientId": "c-1"}})  # the emulator, like the upstream, allows it
    api.created(alias="fleet-eu")
    api.create_many({"Quantity": 4}, alias="fleet-eu")
    refreshed = api.refresh(first["AccessToken"]["Token"], first["RefreshToken"]).json()["Result"]
    api.refresh(first["AccessToken"]["Token"], first["RefreshToken"])  # rejected: already used
    api.login(first["DeviceToken"])
    api.login(first["DeviceToken"], password="wrong")
    admin_token = api.admin_login()["AccessToken"]["Token"]
    api.find(admin_token, ClientId="c-1")
    api.create({"Gender": "?"})  # 422
    emulator.health()

    counters = emulator.counters()

    assert counters == {
        "users_total": 7,
        "users_by_instance": {emulator.instance_id(): 2, emulator.instance_id("fleet-eu"): 5},
        "users_by_client_id": {f"{emulator.instance_id()}/c-1": 2},
        "creates": 3,
        "create_many_calls": 1,
        "create_many_users": 4,
        "refreshes": 1,
        "logins": 1,
        "failed_logins": 1,
        "admin_logins": 1,
        "failed_admin_logins": 0,
        "admin_refreshes": 0,
        "admin_rejected_refresh_tokens": 0,
        "logins_refused_by_limit": 0,
        "login_blocks_begun": 0,
        "login_blocked_addresses": [],
        "rejected_refresh_tokens": 1,
        "rejected_refresh_tokens_by_cause": {"revoked": 0, "spent": 1, "deleted": 0, "unknown": 0},
        "in_flight_peak": 1,
        "management_calls": {"find": 1, "get_filtered_page": 0, "update": 0, "delete": 0, "change_instance": 0},
        "updates": 0,
        "deletes": 0,
        "instance_changes": 0,
        "faults_served": {"error": 0, "rate_limit": 0, "hang": 0, "drop_after_commit": 0},
        "faults_by_call": {},
        "requests_total": 11,
    }
    assert refreshed["DeviceToken"] == first["DeviceToken"]
    users = emulator.users(client_id="c-1")
    assert len(users) == 2
    assert {user["InstanceId"] for user in users} == {emulator.instance_id()}
    assert len(emulator.users(instance_id=emulator.instance_id("fleet-eu"))) == 5


def test_reset_clears_users_tokens_counters_faults_and_config(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created()
    emulator.set_faults(latency_ms=[1, 2], error_rate=0.5, script=[{"call": "login", "fault": "error"}])
    emulator.set_config(token_lifetime_s=5, create_many_enabled=False, refresh_paths=["spec"], login_block_s=7200)

    emulator.reset()

    counters = emulator.counters()
    assert counters["users_total"] == 0
    assert counters["requests_total"] == 0
    faults = emulator.faults()
    assert faults["latency_ms"] == 0
    assert faults["error_rate"] == 0
    assert faults["script"] == []
    assert emulator.config() == {
        "token_lifetime_s": None,
        "token_lifetimes_s": {"create": 432_000, "login": 86_400, "refresh": 86_400, "admin": 86_400},
        "create_many_enabled": True,
        "refresh_paths": ["observed", "spec"],
        "login_limit_per_minute": 5,
        "login_block_s": 3600,
    }
    assert emulator.user(created["DeviceToken"]) is None
    assert_envelope(api.refresh(created["AccessToken"]["Token"], created["RefreshToken"]), 400, "RefreshToken")
    assert_envelope(api.create(), 200)  # the instances stay


def test_revoke_by_device_token_and_by_fraction(emulator: EmulatorHandle, api: Api) -> None:
    users = [api.created() for _ in range(4)]

    assert emulator.revoke(device_tokens=[users[0]["DeviceToken"], str(uuid.uuid4())]) == [users[0]["DeviceToken"]]
    assert_envelope(api.refresh(users[0]["AccessToken"]["Token"], users[0]["RefreshToken"]), 400, "RefreshToken")
    assert emulator.counters()["rejected_refresh_tokens"] == 1
    recovered = assert_envelope(api.login(users[0]["DeviceToken"]), 200)["Result"]
    assert_envelope(api.refresh(recovered["AccessToken"]["Token"], recovered["RefreshToken"]), 200)

    revoked = emulator.revoke(fraction=0.5)
    assert len(revoked) == 2
    for user in users[1:]:
        expected = 400 if user["DeviceToken"] in revoked else 200
        assert api.refresh(user["AccessToken"]["Token"], user["RefreshToken"]).status_code == expected


def test_a_rejected_refresh_token_is_counted_by_cause_and_by_user(emulator: EmulatorHandle, api: Api) -> None:
    revoked, spent = api.created(), api.created()
    emulator.revoke(device_tokens=[revoked["DeviceToken"]])
    assert_envelope(api.refresh(revoked["AccessToken"]["Token"], revoked["RefreshToken"]), 400, "RefreshToken")
    assert_envelope(api.refresh(spent["AccessToken"]["Token"], spent["RefreshToken"]), 200)
    assert_envelope(api.refresh(spent["AccessToken"]["Token"], spent["RefreshToken"]), 400, "RefreshToken")
    assert_envelope(api.refresh(spent["AccessToken"]["Token"], "bm90IGEgdG9rZW4="), 400, "RefreshToken")

    counters = emulator.counters()

    assert counters["rejected_refresh_tokens"] == 3
    assert counters["rejected_refresh_tokens_by_cause"] == {"revoked": 1, "spent": 1, "deleted": 0, "unknown": 1}
    assert emulator.user(revoked["DeviceToken"])["RejectedRefreshTokens"] == {"revoked": 1}
    assert emulator.user(spent["DeviceToken"])["RejectedRefreshTokens"] == {"spent": 1}


def test_admin_rejects_bad_settings_and_keeps_the_old_ones(emulator: EmulatorHandle) -> None:
    emulator.set_faults(error_rate=0.25)

    bad_faults: list[dict[str, Any]] = [
        {"error_rate": 2},
        {"latency_ms": [10, 5]},
        {"calls": ["remove"]},
        {"error_status": 200},
        {"script": [{"call": "create", "fault": "explode"}]},
        {"unknown": 1},
    ]
    for bad in bad_faults:
        with pytest.raises(EmulatorError, match="400"):
            emulator.set_faults(**bad)
    bad_config: list[dict[str, Any]] = [
        {"token_lifetime_s": 0},
        {"refresh_paths": ["nope"]},
        {"create_many_enabled": "yes"},
        {"login_limit_per_minute": -1},
        {"login_block_s": 0},
    ]
    for bad in bad_config:
        with pytest.raises(EmulatorError, match="400"):
            emulator.admin("PUT", "/config", bad)

    assert emulator.faults()["error_rate"] == 0.25
    assert emulator.config()["token_lifetime_s"] is None
    with pytest.raises(ValueError, match="exactly one"):
        emulator.revoke()


def test_admin_user_lookup(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created({"UserFields": {"ClientId": "c-9"}})

    user = emulator.user(created["DeviceToken"].upper())

    assert user is not None
    assert user["DeviceToken"] == created["DeviceToken"]
    assert user["ClientId"] == "c-9"
    assert user["CreatedAt"]
    assert "RefreshToken" not in user
    assert emulator.user(str(uuid.uuid4())) is None


# ---------------------------------------------------------------------------------------------- start-up


def test_generated_default_instance_is_printed_and_usable() -> None:
    with running_emulator() as emulator:
        assert set(emulator.instances) == {"default"}
        assert is_uuid(emulator.instance_id())
        assert is_uuid(emulator.instance_key())
        assert any(line.startswith("instances: ") for line in emulator.output())
        response = requests.post(
            f"{emulator.url}/v1/Registration/Create", headers=emulator.headers(), json={}, timeout=10
        )
        assert_token_pair(emulator, assert_envelope(response, 200)["Result"])


def test_generated_admin_account_is_printed_and_usable() -> None:
    with running_emulator() as emulator:
        assert emulator.admin_account is not None
        assert any(line.startswith("admin: ") for line in emulator.output())
        response = requests.post(f"{emulator.url}/v1/Auth/Login", json=emulator.admin_login_body(), timeout=10)
        assert assert_envelope(response, 200)["Result"]["AccessToken"]["ExpiresIn"] == 86_400


@pytest.mark.parametrize("how", ["argument", "EMULATOR_ADMIN=@file"])
def test_admin_account_from_the_environment_or_a_file(tmp_path: Any, how: str) -> None:
    admin = {"Email": "ops@example.com", "Password": "correct horse"}
    path = tmp_path / "admin.json"
    path.write_text(json.dumps(admin), encoding="utf-8")
    options: dict[str, Any] = {"admin": admin} if how == "argument" else {"env": {"EMULATOR_ADMIN": f"@{path}"}}

    with running_emulator(**options) as emulator:
        assert not any(line.startswith("admin: ") for line in emulator.output())  # given, so not printed
        emulator.admin_account = admin
        response = requests.post(f"{emulator.url}/v1/Auth/Login", json=emulator.admin_login_body(), timeout=10)
        assert_envelope(response, 200)


@pytest.mark.parametrize("how", ["EMULATOR_INSTANCES=@file", "EMULATOR_INSTANCES_FILE"])
def test_instances_token_lifetime_and_faults_from_the_environment(tmp_path: Any, how: str) -> None:
    instances = {"fleet-us": {"instanceId": str(uuid.uuid4()), "instanceKey": str(uuid.uuid4())}}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(instances), encoding="utf-8")
    env = {"EMULATOR_INSTANCES": f"@{path}"} if how.startswith("EMULATOR_INSTANCES=") else {}
    env["EMULATOR_INSTANCES_FILE"] = str(path)  # when both are set, EMULATOR_INSTANCES wins
    faults = {"error_rate": 1.0, "calls": ["login"]}

    with running_emulator(token_lifetime=60, faults=faults, env=env) as emu:
        assert emu.instances == {}  # nothing generated, nothing printed
        emu.instances = {
            "fleet-us": {
                "InstanceId": instances["fleet-us"]["instanceId"],
                "InstanceKey": instances["fleet-us"]["instanceKey"],
            }
        }
        response = requests.post(
            f"{emu.url}/v1/Registration/Create", headers=emu.headers("fleet-us"), json={}, timeout=10
        )
        result = assert_envelope(response, 200)["Result"]
        assert_token_pair(emu, result, "fleet-us")
        assert result["AccessToken"]["ExpiresIn"] == 60
        assert emu.config()["token_lifetime_s"] == 60
        assert emu.faults()["calls"] == ["login"]
        login = Api(emu).login(result["DeviceToken"], "fleet-us")
        assert_envelope(login, 503, "Fault")


def test_bad_start_configuration_fails_fast() -> None:
    with (
        pytest.raises(EmulatorError, match="exited during start-up"),
        running_emulator(env={"EMULATOR_INSTANCES": '{"default": {"InstanceId": ""}}'}),
    ):
        pass
    with pytest.raises(EmulatorError, match="error_rate"), running_emulator(faults={"error_rate": 3}):
        pass
    with pytest.raises(EmulatorError, match="admin: Email"), running_emulator(admin={"Email": "nobody"}):
        pass


def test_the_emulator_exits_when_its_parent_pipe_closes() -> None:
    with running_emulator() as emulator:
        assert emulator.process is not None
        assert emulator.process.stdin is not None

        emulator.process.stdin.close()

        assert emulator.process.wait(timeout=30) == 0


def test_a_handle_can_attach_to_a_running_emulator(emulator: EmulatorHandle, api: Api) -> None:
    api.created()
    attached = EmulatorHandle.attach(emulator.url + "/", emulator.instances)
    try:
        assert attached.url == emulator.url
        assert attached.counters()["creates"] == 1
        assert attached.headers("fleet-eu") == emulator.headers("fleet-eu")
    finally:
        attached.close()
