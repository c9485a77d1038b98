"""Contract of the admin account and the User Management API, written from the vendor's reference
(Mobile-Telematics/damoov-telematics-skills: user-management-api.md, admin-auth.md, registration-api.md,
error-handling.md) and UPSTREAM.md, section "User Management API"."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
import requests

from local.emulator.testing import EmulatorHandle
from tests.functional.emulator.helpers import Api, assert_envelope, assert_refresh_token, assert_same_shape, decode

# The find sample of user-management-api.md ("Live response sample"), values replaced by ones of the same type.
FIND_USER_SAMPLE: dict[str, Any] = {
    "DeviceToken": "00000000-0000-0000-0000-000000000000",
    "DateCreated": "2024-10-29T11:53:57.108485",
    "Status": "Active",
    "ActivityStatus": "Active",
    "UserProfile": {
        "FirstName": "John",
        "LastName": "Doe",
        "Gender": "None",
        "Birthday": "1989-02-17T00:00:00",
        "MaritalStatus": None,
        "ChildrenCount": None,
        "Address": None,
        "Country": None,
        "District": None,
        "City": None,
        "Nickname": None,
        "Email": "email@mail.com",
        "Phone": "+12345565",
        "ImageUrl": "https://user.telematicssdk.com/Files/DefaultImages/ic_no_avatar_white.png",
        "ExternalImageUrl": None,
    },
    "MobileDevice": {
        "MobileUid": None,
        "DeviceModel": None,
        "OsType": None,
        "OsVersion": None,
        "SdkVersion": None,
        "AppVersion": None,
        "VirtualImei": "000000000000000",
    },
    "AccountInfo": {
        "CompanyId": "00000000-0000-0000-0000-000000000000",
        "CompanyName": None,
        "ApplicationId": "00000000-0000-0000-0000-000000000000",
        "ApplicationName": None,
        "InstanceId": "00000000-0000-0000-0000-000000000000",
        "InstanceName": None,
    },
    "UserWallets": [],
    "IdentityId": None,
    "IdentityProvider": None,
    "UserFields": [
        {
            "ClientId": "client-id-001",
            "EnableLogging": True,
            "EnableRealTimeLocation": True,
            "EnableTracking": True,
            "Enabled": True,
        }
    ],
}
PAGE_BODY = {
    "PageNumber": 1,
    "PageSize": 50,
    "IncludeAccountInfo": True,
    "Sort": "DateCreatedDesc",
    "ShowInactiveUsers": True,
}


def found(api: Api, token: str, **params: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = assert_envelope(api.find(token, **params), 200)["Result"]
    assert isinstance(result, list)
    return result


def one(api: Api, token: str, device_token: str) -> dict[str, Any]:
    users = found(api, token, DeviceToken=device_token)
    assert len(users) == 1
    return users[0]


def page(api: Api, token: str, **body: Any) -> dict[str, Any]:
    result: dict[str, Any] = assert_envelope(api.page(token, {**PAGE_BODY, **body}), 200)["Result"]
    return result


def tokens_of(users: list[dict[str, Any]]) -> list[str]:
    return [user["DeviceToken"] for user in users]


# ---------------------------------------------------------------------------------------------- admin Login


def test_admin_login_with_the_documented_body_answers_the_documented_shape(emulator: EmulatorHandle, api: Api) -> None:
    response = api.post("/v1/Auth/Login", emulator.admin_login_body())

    body = assert_envelope(response, 200)
    result = body["Result"]
    assert set(result) == {"AccessToken", "RefreshToken"}  # no DeviceToken: it is not a user
    assert set(result["AccessToken"]) == {"Token", "ExpiresIn"}
    assert result["AccessToken"]["ExpiresIn"] == 86_400
    claims = decode(emulator, result["AccessToken"]["Token"])
    assert claims["exp"] - claims["iat"] == 86_400
    assert "DeviceToken" not in claims
    assert_refresh_token(result["RefreshToken"])
    counters = emulator.counters()
    assert (counters["admin_logins"], counters["logins"]) == (1, 0)


def test_admin_login_binds_keys_and_e_mail_case_insensitively(emulator: EmulatorHandle, api: Api) -> None:
    assert emulator.admin_account is not None
    email, password = emulator.admin_account["Email"], emulator.admin_account["Password"]

    as_object = api.post("/v1/auth/login", {"loginFields": {"EMAIL": email.upper()}, "password": password})

    assert_envelope(as_object, 200)


@pytest.mark.parametrize("wrong", ["password", "email"])
def test_admin_login_with_wrong_credentials_is_401(emulator: EmulatorHandle, api: Api, wrong: str) -> None:
    assert emulator.admin_account is not None
    email = "someone@else.invalid" if wrong == "email" else emulator.admin_account["Email"]
    password = "wrong" if wrong == "password" else emulator.admin_account["Password"]
    body = {"LoginFields": json.dumps({"email": email}), "Password": password}

    assert_envelope(api.post("/v1/Auth/Login", body), 401, "Password")
    assert emulator.counters()["failed_admin_logins"] == 1


@pytest.mark.parametrize("path", ["observed", "spec"])
def test_admin_refresh_rotates_a_single_use_refresh_token_on_both_paths(
    emulator: EmulatorHandle, api: Api, path: str
) -> None:
    session = api.admin_login()

    response = api.refresh(session["AccessToken"]["Token"], session["RefreshToken"], path)

    refreshed = assert_envelope(response, 200)["Result"]
    assert set(refreshed) == {"AccessToken", "RefreshToken"}
    assert refreshed["AccessToken"]["ExpiresIn"] == 86_400
    assert refreshed["RefreshToken"] != session["RefreshToken"]
    # Single-use: the old one is dead, on either path; the new one works and manages users.
    assert_envelope(api.refresh(session["AccessToken"]["Token"], session["RefreshToken"]), 400, "RefreshToken")
    assert_envelope(api.refresh(session["AccessToken"]["Token"], session["RefreshToken"], "spec"), 400, "RefreshToken")
    assert_envelope(api.find(refreshed["AccessToken"]["Token"], ClientId="x"), 200)
    again = api.refresh(refreshed["AccessToken"]["Token"], refreshed["RefreshToken"], path)
    assert_envelope(again, 200)
    counters = emulator.counters()
    assert counters["admin_refreshes"] == 2
    assert counters["rejected_refresh_tokens_by_cause"]["spent"] == 2


def test_two_admin_sessions_live_side_by_side(api: Api) -> None:
    first, second = api.admin_login(), api.admin_login()

    assert_envelope(api.refresh(first["AccessToken"]["Token"], first["RefreshToken"]), 200)
    assert_envelope(api.refresh(second["AccessToken"]["Token"], second["RefreshToken"]), 200)


# ---------------------------------------------------------------------------------------------- auth


CALLS = ["find", "page", "update", "delete", "change_instance"]


def call(api: Api, name: str, token: str | None, device_token: str, emulator: EmulatorHandle) -> Any:
    calls = {
        "find": lambda: api.find(token, DeviceToken=device_token),
        "page": lambda: api.page(token, PAGE_BODY),
        "update": lambda: api.update(token, device_token, {"FirstName": "Changed"}),
        "delete": lambda: api.delete(token, device_token),
        "change_instance": lambda: api.change_instance(
            token,
            {
                "DeviceToken": device_token,
                "ToInstanceId": emulator.instance_id("fleet-eu"),
                "ToInstanceKey": emulator.instance_key("fleet-eu"),
            },
        ),
    }
    return calls[name]()


@pytest.mark.parametrize("name", CALLS)
def test_every_management_call_takes_an_admin_jwt_only(emulator: EmulatorHandle, api: Api, name: str) -> None:
    user = api.created()
    device_token = user["DeviceToken"]

    assert_envelope(call(api, name, None, device_token, emulator), 401, "Authorization")
    assert_envelope(call(api, name, "not-a-jwt", device_token, emulator), 401, "Authorization")
    forged = decode(emulator, api.admin_token())  # an admin's claims, signed with another key
    other_key = jwt.encode(forged, "another-secret-of-enough-length-for-hs256-0123", algorithm="HS256")
    assert_envelope(call(api, name, other_key, device_token, emulator), 401, "Authorization")
    # A user's own, valid JWT is the wrong token type.
    assert_envelope(call(api, name, user["AccessToken"]["Token"], device_token, emulator), 403, "Authorization")

    after = emulator.user(device_token)
    assert after is not None
    assert after["InstanceId"] == emulator.instance_id()
    assert "FirstName" not in after["Profile"]
    counters = emulator.counters()
    assert (counters["updates"], counters["deletes"], counters["instance_changes"]) == (0, 0, 0)
    kind = "get_filtered_page" if name == "page" else name
    assert counters["management_calls"][kind] == 4


@pytest.mark.parametrize("name", CALLS)
def test_an_expired_admin_jwt_is_401(emulator: EmulatorHandle, api: Api, name: str) -> None:
    user = api.created()
    emulator.set_config(token_lifetime_s=1)
    token = api.admin_token()
    time.sleep(2.1)

    assert_envelope(call(api, name, token, user["DeviceToken"], emulator), 401, "Authorization")


def test_management_routes_and_parameters_are_case_insensitive(emulator: EmulatorHandle, api: Api) -> None:
    user = api.created({"UserFields": {"ClientId": "c-1"}})
    token = api.admin_token()

    response = requests.get(
        f"{emulator.url}/V1/management/USERS/Find",
        params={"clientid": "c-1"},
        headers={"authorization": f"bearer {token}"},
        timeout=10,
    )

    assert tokens_of(assert_envelope(response, 200)["Result"]) == [user["DeviceToken"]]


# ---------------------------------------------------------------------------------------------- find


def test_find_answers_the_documented_read_shape(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created(
        {
            "FirstName": "John",
            "LastName": "Doe",
            "Email": "email@mail.com",
            "Phone": "+12345565",
            "Birthday": "1989-02-17",
            "UserFields": {"ClientId": "client-id-001", "EnableLogging": True, "EnableRealtimeLocation": True},
        }
    )
    token = api.admin_token()

    body = assert_envelope(api.find(token, DeviceToken=created["DeviceToken"]), 200)

    assert body["Title"] == ""
    (user,) = body["Result"]
    assert_same_shape(user, {**FIND_USER_SAMPLE, "ActivityStatus": "No Data"})
    assert user["DeviceToken"] == created["DeviceToken"]
    assert user["Status"] == "Active"
    assert user["UserProfile"]["Birthday"] == "1989-02-17T00:00:00"
    assert user["AccountInfo"]["InstanceId"] == emulator.instance_id()
    assert user["AccountInfo"]["InstanceName"] is None  # names only with IncludeAccountInfo
    assert user["UserFields"] == [FIND_USER_SAMPLE["UserFields"][0]]
    created_at = datetime.fromisoformat(user["DateCreated"]).replace(tzinfo=UTC)
    assert abs(created_at - datetime.now(UTC)) < timedelta(minutes=1)


def test_find_result_is_always_an_array(api: Api) -> None:
    token = api.admin_token()

    assert found(api, token, DeviceToken=str(uuid.uuid4())) == []
    assert found(api, token, ClientId="nobody") == []


def test_find_ands_its_parameters(emulator: EmulatorHandle, api: Api) -> None:
    ann = api.created(
        {"FirstName": "Ann", "LastName": "Lee", "Email": "Ann@Example.com", "UserFields": {"ClientId": "c"}}
    )
    bob = api.created({"FirstName": "Bob", "LastName": "Lee", "Phone": "+200", "UserFields": {"ClientId": "c"}})
    eve = api.created({"FirstName": "Ann", "LastName": "Ray"}, alias="fleet-eu")
    token = api.admin_token()

    assert sorted(tokens_of(found(api, token, ClientId="c"))) == sorted([ann["DeviceToken"], bob["DeviceToken"]])
    assert tokens_of(found(api, token, ClientId="c", FirstName="ann")) == [ann["DeviceToken"]]
    assert sorted(tokens_of(found(api, token, FirstName="Ann"))) == sorted([ann["DeviceToken"], eve["DeviceToken"]])
    assert tokens_of(found(api, token, LastName="Lee", Phone="+200")) == [bob["DeviceToken"]]
    assert tokens_of(found(api, token, Email="ann@example.com")) == [ann["DeviceToken"]]
    assert tokens_of(found(api, token, FullName="Ann  Ray")) == [eve["DeviceToken"]]
    assert found(api, token, ClientId="c", FirstName="Eve") == []
    # It finds across every instance of the company: the admin manages them all.
    assert tokens_of(found(api, token, DeviceToken=eve["DeviceToken"].upper())) == [eve["DeviceToken"]]


def test_find_needs_a_parameter_and_a_uuid_device_token(api: Api) -> None:
    token = api.admin_token()

    assert_envelope(api.find(token), 422, "Query")
    assert_envelope(api.find(token, DeviceToken="not-a-uuid"), 422, "DeviceToken")


# ---------------------------------------------------------------------------------------------- GetFilteredPage


def test_get_filtered_page_pages_through_every_user(emulator: EmulatorHandle, api: Api) -> None:
    users = [api.created() for _ in range(7)]
    token = api.admin_token()

    first = page(api, token, PageSize=3, Sort="DateCreated")
    third = page(api, token, PageSize=3, PageNumber=3, Sort="DateCreated")
    beyond = page(api, token, PageSize=3, PageNumber=4)

    assert {k: v for k, v in first.items() if k != "Users"} == {
        "HasPreviousPage": False,
        "HasNextPage": True,
        "TotalUsers": 7,
        "TotalPages": 3,
        "CurrentPage": 1,
    }
    assert len(first["Users"]) == 3
    assert (third["HasPreviousPage"], third["HasNextPage"], third["CurrentPage"]) == (True, False, 3)
    assert len(third["Users"]) == 1
    assert beyond["Users"] == []
    everyone = [
        user
        for number in (1, 2, 3)
        for user in page(api, token, PageSize=3, PageNumber=number, Sort="DateCreated")["Users"]
    ]
    assert sorted(tokens_of(everyone)) == sorted(user["DeviceToken"] for user in users)
    # The same user object as find's (registration-api.md: "the same user object shape as /find").
    sample = {key: set(value) if isinstance(value, dict) else None for key, value in FIND_USER_SAMPLE.items()}
    for user in everyone:
        assert {key: set(value) if isinstance(value, dict) else None for key, value in user.items()} == sample
        assert set(user["UserFields"][0]) == set(FIND_USER_SAMPLE["UserFields"][0])


def test_get_filtered_page_sorts_by_date_created(emulator: EmulatorHandle, api: Api) -> None:
    created = []
    for _ in range(3):
        created.append(api.created()["DeviceToken"])
        time.sleep(0.01)
    token = api.admin_token()

    assert tokens_of(page(api, token, Sort="DateCreated")["Users"]) == created
    assert tokens_of(page(api, token, Sort="dateCreatedDesc")["Users"]) == created[::-1]
    assert tokens_of(page(api, token, Sort="DeviceToken")["Users"]) == sorted(created)


def test_get_filtered_page_filters_by_instance_and_date_created(emulator: EmulatorHandle, api: Api) -> None:
    early = api.created()["DeviceToken"]
    time.sleep(0.05)
    middle = datetime.now(UTC)
    time.sleep(0.05)
    late = api.created()["DeviceToken"]
    eu = api.created(alias="fleet-eu")["DeviceToken"]
    token = api.admin_token()

    only_default = page(api, token, InstanceIds=[emulator.instance_id()], Sort="DateCreated")
    assert tokens_of(only_default["Users"]) == [early, late]
    assert only_default["TotalUsers"] == 2
    both = page(api, token, InstanceIds=[emulator.instance_id(), emulator.instance_id("fleet-eu")])
    assert both["TotalUsers"] == 3
    assert sorted(tokens_of(page(api, token, DateCreatedFrom=middle.isoformat())["Users"])) == sorted([late, eu])
    naive_utc = middle.replace(tzinfo=None).isoformat()  # no zone: UTC
    assert tokens_of(page(api, token, DateCreatedTo=naive_utc)["Users"]) == [early]
    assert page(api, token, InstanceIds=[str(uuid.uuid4())])["Users"] == []


def test_get_filtered_page_hides_inactive_users_unless_asked(emulator: EmulatorHandle, api: Api) -> None:
    active, inactive = api.created()["DeviceToken"], api.created()["DeviceToken"]
    token = api.admin_token()
    assert_envelope(api.update(token, inactive, {"Status": "Deactivated"}), 200)

    assert tokens_of(page(api, token, ShowInactiveUsers=False)["Users"]) == [active]
    shown = {user["DeviceToken"]: user["Status"] for user in page(api, token, ShowInactiveUsers=True)["Users"]}
    assert shown == {active: "Active", inactive: "Inactive"}


def test_get_filtered_page_account_info_names_on_request(emulator: EmulatorHandle, api: Api) -> None:
    api.created(alias="fleet-eu")
    token = api.admin_token()

    (named,) = page(api, token, IncludeAccountInfo=True)["Users"]
    (bare,) = page(api, token, IncludeAccountInfo=False)["Users"]

    assert named["AccountInfo"]["InstanceId"] == bare["AccountInfo"]["InstanceId"] == emulator.instance_id("fleet-eu")
    assert named["AccountInfo"]["InstanceName"] == "fleet-eu"
    assert isinstance(named["AccountInfo"]["CompanyName"], str)
    assert bare["AccountInfo"]["InstanceName"] is None


def test_get_filtered_page_takes_the_filters_and_pagination_body_too(emulator: EmulatorHandle, api: Api) -> None:
    mine = api.created()["DeviceToken"]
    api.created(alias="fleet-eu")
    token = api.admin_token()
    body = {
        "Filters": [{"Name": "InstanceId", "Value": emulator.instance_id()}],
        "Pagination": {"Page": 1, "PageSize": 50},
    }

    result = assert_envelope(api.page(token, body), 200)["Result"]

    assert tokens_of(result["Users"]) == [mine]


@pytest.mark.parametrize(
    ("body", "keys"),
    [
        ({"PageSize": 10}, ("PageNumber",)),
        ({"PageNumber": 1}, ("PageSize",)),
        ({"PageNumber": 0, "PageSize": 10}, ("PageNumber",)),
        ({"PageNumber": 1, "PageSize": 100_000}, ("PageSize",)),
        ({"PageNumber": 1, "PageSize": 10, "Sort": "Shoe size"}, ("Sort",)),
        ({"PageNumber": 1, "PageSize": 10, "InstanceIds": ["x"]}, ("InstanceIds",)),
        ({"PageNumber": 1, "PageSize": 10, "DateCreatedFrom": "yesterday"}, ("DateCreatedFrom",)),
        ({"PageNumber": 1, "PageSize": 10, "Filters": [{"Name": "Shoe", "Value": 1}]}, ("Filters[0].Name",)),
    ],
)
def test_get_filtered_page_validates_its_body(api: Api, body: dict[str, Any], keys: tuple[str, ...]) -> None:
    assert_envelope(api.page(api.admin_token(), body), 422, *keys)


# ---------------------------------------------------------------------------------------------- update


def test_update_changes_only_the_given_fields(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created(
        {"FirstName": "Ann", "LastName": "Lee", "UserFields": {"ClientId": "old", "EnableLogging": True}}
    )
    token = api.admin_token()

    body = assert_envelope(
        api.update(token, created["DeviceToken"], {"lastName": "Ray", "ExternalImageUrl": "https://x/y.png"}), 200
    )

    assert body == {"Result": None, "Status": 200, "Title": "", "Errors": []}
    user = one(api, token, created["DeviceToken"])
    assert (user["UserProfile"]["FirstName"], user["UserProfile"]["LastName"]) == ("Ann", "Ray")
    assert user["UserProfile"]["ExternalImageUrl"] == "https://x/y.png"
    assert user["UserFields"][0] == {
        "ClientId": "old",
        "EnableLogging": True,
        "EnableRealTimeLocation": False,
        "EnableTracking": True,
        "Enabled": True,
    }
    assert emulator.counters()["updates"] == 1


def test_update_sets_flags_and_client_id_one_by_one(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created({"UserFields": {"ClientId": "old"}})
    token = api.admin_token()

    assert_envelope(api.update(token, created["DeviceToken"], {"UserFields": {"EnableRealTimeLocation": True}}), 200)
    assert_envelope(
        api.update(token, created["DeviceToken"], {"UserFields": {"Enabled": False, "ClientId": "new"}}), 200
    )

    (flags,) = one(api, token, created["DeviceToken"])["UserFields"]
    assert flags == {
        "ClientId": "new",
        "EnableLogging": False,
        "EnableRealTimeLocation": True,
        "EnableTracking": True,
        "Enabled": False,
    }
    assert tokens_of(found(api, token, ClientId="new")) == [created["DeviceToken"]]
    assert found(api, token, ClientId="old") == []
    assert emulator.counters()["users_by_client_id"] == {f"{emulator.instance_id()}/new": 1}


@pytest.mark.parametrize(
    ("written", "read"), [("Deactivated", "Inactive"), ("Deleted", "Inactive"), ("Active", "Active")]
)
def test_status_is_written_three_ways_and_read_two(emulator: EmulatorHandle, api: Api, written: str, read: str) -> None:
    created = api.created()
    token = api.admin_token()
    assert_envelope(api.update(token, created["DeviceToken"], {"Status": "Deactivated"}), 200)

    assert_envelope(api.update(token, created["DeviceToken"], {"status": written.lower()}), 200)

    assert one(api, token, created["DeviceToken"])["Status"] == read
    user = emulator.user(created["DeviceToken"])
    assert user is not None
    assert user["Status"] == written  # a soft "Deleted" keeps the user


def test_update_errors(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created()
    token = api.admin_token()

    assert_envelope(api.update(token, None, {"FirstName": "x"}), 422, "UserDeviceToken")
    assert_envelope(api.update(token, "not-a-uuid", {"FirstName": "x"}), 422, "UserDeviceToken")
    assert_envelope(api.update(token, str(uuid.uuid4()), {"FirstName": "x"}), 404, "DeviceToken")
    assert_envelope(
        api.update(token, created["DeviceToken"], {"Gender": "robot", "Status": "Inactive"}), 422, "Gender", "Status"
    )
    assert_envelope(
        api.update(token, created["DeviceToken"], {"UserFields": {"Enabled": "yes"}}), 422, "UserFields.Enabled"
    )
    assert emulator.counters()["updates"] == 0


# ---------------------------------------------------------------------------------------------- delete


def test_delete_is_hard_and_final(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created({"UserFields": {"ClientId": "c-1"}})
    kept = api.created()
    token = api.admin_token()

    body = assert_envelope(api.delete(token, created["DeviceToken"].upper()), 200)

    assert body["Result"] is None
    assert found(api, token, DeviceToken=created["DeviceToken"]) == []
    assert emulator.user(created["DeviceToken"]) is None
    # Its tokens die and its Login fails; deleting again is 404 (callers treat it as done).
    assert_envelope(api.refresh(created["AccessToken"]["Token"], created["RefreshToken"]), 400, "RefreshToken")
    assert_envelope(api.login(created["DeviceToken"]), 404, "DeviceToken")
    assert_envelope(api.delete(token, created["DeviceToken"]), 404, "DeviceToken")
    assert_envelope(api.update(token, created["DeviceToken"], {"FirstName": "x"}), 404, "DeviceToken")
    assert_envelope(api.refresh(kept["AccessToken"]["Token"], kept["RefreshToken"]), 200)
    counters = emulator.counters()
    assert counters["deletes"] == 1
    assert counters["users_total"] == 1
    assert counters["users_by_client_id"] == {}
    assert counters["rejected_refresh_tokens_by_cause"]["deleted"] == 1


# ---------------------------------------------------------------------------------------------- change instance


def move_body(
    emulator: EmulatorHandle, device_token: str, alias: str = "fleet-eu", key: str | None = None
) -> dict[str, str]:
    return {
        "DeviceToken": device_token,
        "ToInstanceId": emulator.instance_id(alias),
        "ToInstanceKey": emulator.instance_key(alias) if key is None else key,
    }


def test_change_instance_moves_the_user_and_its_login(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created({"UserFields": {"ClientId": "c-1"}})
    token = api.admin_token()

    body = assert_envelope(api.change_instance(token, move_body(emulator, created["DeviceToken"])), 200)

    assert body["Result"] is None
    user = one(api, token, created["DeviceToken"])
    assert user["AccountInfo"]["InstanceId"] == emulator.instance_id("fleet-eu")
    assert user["DeviceToken"] == created["DeviceToken"]  # it keeps its DeviceToken
    # Afterwards it logs in with the new instance only.
    assert_envelope(api.login(created["DeviceToken"]), 404, "DeviceToken")
    relogged = assert_envelope(api.login(created["DeviceToken"], alias="fleet-eu"), 200)["Result"]
    assert decode(emulator, relogged["AccessToken"]["Token"])["InstanceId"] == emulator.instance_id("fleet-eu")
    counters = emulator.counters()
    assert counters["instance_changes"] == 1
    assert counters["users_by_instance"] == {emulator.instance_id(): 0, emulator.instance_id("fleet-eu"): 1}
    assert counters["users_by_client_id"] == {f"{emulator.instance_id('fleet-eu')}/c-1": 1}


def test_change_instance_keeps_the_refresh_token(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created()
    token = api.admin_token()
    assert_envelope(api.change_instance(token, move_body(emulator, created["DeviceToken"])), 200)

    refreshed = assert_envelope(api.refresh(created["AccessToken"]["Token"], created["RefreshToken"]), 200)["Result"]

    assert decode(emulator, refreshed["AccessToken"]["Token"])["InstanceId"] == emulator.instance_id("fleet-eu")


def test_changing_to_the_instance_the_user_is_in_succeeds_and_changes_nothing(
    emulator: EmulatorHandle, api: Api
) -> None:
    created = api.created()
    token = api.admin_token()

    assert_envelope(api.change_instance(token, move_body(emulator, created["DeviceToken"], "default")), 200)

    assert one(api, token, created["DeviceToken"])["AccountInfo"]["InstanceId"] == emulator.instance_id()
    assert_envelope(api.login(created["DeviceToken"]), 200)


def test_change_instance_errors_leave_the_user_where_it_was(emulator: EmulatorHandle, api: Api) -> None:
    created = api.created()
    device_token = created["DeviceToken"]
    token = api.admin_token()
    unknown = {**move_body(emulator, device_token), "ToInstanceId": str(uuid.uuid4())}

    assert_envelope(
        api.change_instance(token, move_body(emulator, device_token, key=str(uuid.uuid4()))), 422, "ToInstanceKey"
    )
    # Another instance's key is a wrong key too.
    assert_envelope(
        api.change_instance(token, move_body(emulator, device_token, key=emulator.instance_key())), 422, "ToInstanceKey"
    )
    assert_envelope(api.change_instance(token, unknown), 422, "ToInstanceId")
    assert_envelope(api.change_instance(token, move_body(emulator, str(uuid.uuid4()))), 404, "DeviceToken")
    assert_envelope(api.change_instance(token, {}), 422, "DeviceToken", "ToInstanceId", "ToInstanceKey")

    assert one(api, token, device_token)["AccountInfo"]["InstanceId"] == emulator.instance_id()
    assert emulator.counters()["instance_changes"] == 0
