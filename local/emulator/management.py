"""The User Management API (the vendor's ``user-management-api.md``): find, GetFilteredPage, update, delete and
change instance, for the company's admin JWT only.

Auth, as ``error-handling.md`` gives it: no token, a bad one or an expired one is 401; a user's JWT is 403
(wrong token type). Users are read in the vendor's read shape (:func:`render_user`): ``Status`` ``Active`` or
``Inactive``, ``UserFields`` an array of one object, ``UserProfile``, ``AccountInfo``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, date, datetime
from typing import Any

import jwt

from local.emulator.messages import ApiError, FieldError, Reply, Request, envelope
from local.emulator.schema import (
    CHANGE_INSTANCE_FIELDS,
    PAGE_FIELDS,
    UPDATE_FIELDS,
    InvalidValue,
    as_bool,
    as_str,
    as_utc_datetime,
    as_uuid,
    bind,
)
from local.emulator.state import EmulatorState, UserView, normalize_device_token
from local.emulator.tokens import TokenIssuer, is_admin

COMPANY_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "user-service-emulator/company"))
APPLICATION_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "user-service-emulator/application"))
COMPANY_NAME = "Emulator Company"
APPLICATION_NAME = "Emulator Application"
DEFAULT_IMAGE_URL = "https://user.telematicssdk.com/Files/DefaultImages/ic_no_avatar_white.png"
NO_DATA = "No Data"
"""``ActivityStatus`` of a user without trips (the emulator records none); filtered as ``NoData``."""

PROFILE_READ = (
    "FirstName",
    "LastName",
    "Gender",
    "Birthday",
    "MaritalStatus",
    "ChildrenCount",
    "Address",
    "Country",
    "District",
    "City",
    "Nickname",
    "Email",
    "Phone",
    "ImageUrl",
    "ExternalImageUrl",
)
FIND_PARAMS = ("DeviceToken", "Email", "Phone", "ClientId", "FirstName", "LastName", "FullName")


def _unprocessable(errors: list[FieldError]) -> ApiError:
    return ApiError(422, errors, title="One or more validation errors occurred.")


def _read_birthday(value: Any) -> str | None:
    """A stored birthday as the vendor reads it back: ``1989-02-17T00:00:00`` (UTC, no zone)."""
    if not isinstance(value, str):
        return None
    try:
        return f"{date.fromisoformat(value).isoformat()}T00:00:00"
    except ValueError:
        return as_utc_datetime(value).replace(tzinfo=None).isoformat()


def read_status(status: str) -> str:
    """``Status`` on read: ``Active``, or ``Inactive`` for one written ``Deactivated`` or (soft) ``Deleted``."""
    return "Active" if status == "Active" else "Inactive"


def render_user(
    user: UserView, instance_names: Mapping[str, str], *, include_account_info: bool, for_page: bool
) -> dict[str, Any]:
    """One user in the vendor's read shape (``find`` and ``GetFilteredPage`` samples of user-management-api.md)."""
    profile = {name: user.profile.get(name) for name in PROFILE_READ}
    profile["Gender"] = profile["Gender"] or "None"
    profile["ImageUrl"] = profile["ImageUrl"] or DEFAULT_IMAGE_URL
    profile["Birthday"] = _read_birthday(profile["Birthday"])
    flags = user.user_fields
    return {
        "DeviceToken": user.device_token,
        "DateCreated": datetime.fromtimestamp(user.created_at, UTC).replace(tzinfo=None).isoformat(),
        "Status": read_status(user.status),
        "ActivityStatus": NO_DATA,
        "UserProfile": profile,
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
            "CompanyId": COMPANY_ID,
            "CompanyName": COMPANY_NAME if include_account_info else None,
            "ApplicationId": APPLICATION_ID,
            "ApplicationName": APPLICATION_NAME if include_account_info else None,
            "InstanceId": user.instance_id,
            "InstanceName": instance_names.get(user.instance_id.lower()) if include_account_info else None,
        },
        # The two samples differ here (find: [], GetFilteredPage: null); the emulator answers as each does.
        "UserWallets": None if for_page else [],
        "IdentityId": user.profile.get("IdentityId"),
        "IdentityProvider": user.profile.get("IdentityProvider"),
        "UserFields": [
            {
                "ClientId": flags.get("ClientId"),
                "EnableLogging": flags.get("EnableLogging", False),
                "EnableRealTimeLocation": flags.get("EnableRealtimeLocation", False),
                "EnableTracking": flags.get("EnableTracking", True),
                "Enabled": flags.get("Enabled", True),
            }
        ],
    }


def _sort_key(field: str) -> Callable[[UserView], tuple[Any, ...]]:
    """Order by ``field`` (absent values first), then by DeviceToken so that pages are stable."""

    def key(user: UserView) -> tuple[Any, ...]:
        if field == "DeviceToken":
            value: Any = user.device_token
        elif field == "DateCreated":
            value = user.created_at
        elif field == "ActivityStatus":
            value = NO_DATA
        else:
            value = user.profile.get(field)
            if isinstance(value, str):
                value = value.lower()
        return (value is not None, value if value is not None else 0, user.device_token)

    return key


def _contains(haystack: Any, needle: str) -> bool:
    return isinstance(haystack, str) and needle.lower() in haystack.lower()


class ManagementApi:
    """One method per management call; each takes the parsed :class:`Request` and returns a :class:`Reply`."""

    def __init__(self, state: EmulatorState, issuer: TokenIssuer) -> None:
        self._state = state
        self._issuer = issuer

    def _authorize(self, request: Request) -> None:
        """401 without a valid, unexpired admin JWT, 403 for a user's JWT."""
        header = request.header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError.single(401, "Authorization", "A Bearer access token is required")
        try:
            claims = self._issuer.decode(token.strip(), verify_exp=True)
        except jwt.ExpiredSignatureError:
            raise ApiError.single(401, "Authorization", "The access token has expired") from None
        except jwt.PyJWTError:
            raise ApiError.single(401, "Authorization", "The access token is invalid") from None
        if not is_admin(claims):
            raise ApiError.single(403, "Authorization", "This call takes an admin token, not a user's")

    def _instance_names(self) -> dict[str, str]:
        return {instance.instance_id.lower(): instance.alias for instance in self._state.instances}

    # ------------------------------------------------------------------ find

    def find(self, request: Request) -> Reply:
        self._authorize(request)
        given = {name: request.query[name.lower()] for name in FIND_PARAMS if request.query.get(name.lower())}
        if not given:
            raise _unprocessable([FieldError("Query", f"Give at least one of {', '.join(FIND_PARAMS)}")])
        device_token = given.get("DeviceToken")
        if device_token is not None:
            try:
                given["DeviceToken"] = as_uuid(device_token)
            except InvalidValue as exc:
                raise _unprocessable([FieldError("DeviceToken", str(exc))]) from None
        include = False
        if "includeaccountinfo" in request.query:
            include = request.query["includeaccountinfo"].lower() == "true"
        names = self._instance_names()
        users = [user for user in self._state.users_view() if self._matches_find(user, given)]
        users.sort(key=_sort_key("DateCreated"))
        return envelope(200, [render_user(u, names, include_account_info=include, for_page=False) for u in users])

    @staticmethod
    def _matches_find(user: UserView, given: Mapping[str, str]) -> bool:
        """Every given parameter must match (ANDed): DeviceToken, Phone and ClientId exactly, names and e-mail
        case-insensitively."""
        profile = user.profile
        for name, value_given in given.items():
            wanted = value_given
            if name == "DeviceToken":
                actual: Any = user.device_token
            elif name == "ClientId":
                actual = user.user_fields.get("ClientId")
            elif name == "FullName":
                first, last = profile.get("FirstName") or "", profile.get("LastName") or ""
                actual = f"{first} {last}".strip().lower()
                wanted = " ".join(value_given.split()).lower()
            elif name in {"Email", "FirstName", "LastName"}:
                value = profile.get(name)
                actual = value.lower() if isinstance(value, str) else None
                wanted = value_given.lower()
            else:
                actual = profile.get(name)
            if actual != wanted:
                return False
        return True

    # ------------------------------------------------------------------ GetFilteredPage

    def get_filtered_page(self, request: Request) -> Reply:
        self._authorize(request)
        body = request.body if request.body is not None else {}
        if not isinstance(body, dict):
            raise ApiError.single(400, "Body", "The request body must be a JSON object")
        values, errors = bind(body, PAGE_FIELDS)
        filters = self._filters(body.get("filters"), errors)
        pagination = values.get("Pagination", {})
        page_number = values.get("PageNumber", pagination.get("Page"))
        page_size = values.get("PageSize", pagination.get("PageSize"))
        already = {error.key for error in errors}
        for name, value in (("PageNumber", page_number), ("PageSize", page_size)):
            if value is None and name not in already and f"Pagination.{name.removesuffix('Number')}" not in already:
                errors.append(FieldError(name, f"The {name} field is required."))
        if errors:
            raise _unprocessable(errors)
        for name, value in filters.items():
            values.setdefault(name, value)
        sort = values.get("Sort", "DeviceToken")  # the first member of UserSort, as .NET binds a missing enum
        descending = sort.endswith("Desc")
        users = [user for user in self._state.users_view() if self._matches_page(user, values)]
        users.sort(key=_sort_key(sort.removesuffix("Desc")), reverse=descending)
        total = len(users)
        pages = math.ceil(total / page_size)
        chosen = users[(page_number - 1) * page_size : page_number * page_size]
        include = values.get("IncludeAccountInfo", False)
        names = self._instance_names()
        return envelope(
            200,
            {
                "Users": [render_user(u, names, include_account_info=include, for_page=True) for u in chosen],
                "HasPreviousPage": page_number > 1,
                "HasNextPage": page_number < pages,
                "TotalUsers": total,
                "TotalPages": pages,
                "CurrentPage": page_number,
            },
        )

    @staticmethod
    def _filters(raw: Any, errors: list[FieldError]) -> dict[str, Any]:
        """The other documented body (user-management-api.md): ``Filters: [{"Name", "Value"}]``."""
        if raw is None:
            return {}
        converters: dict[str, tuple[str, Callable[[Any], Any]]] = {
            "instanceid": ("InstanceIds", lambda value: [as_uuid(value)]),
            "companyid": ("CompanyIds", lambda value: [as_uuid(value)]),
            "applicationid": ("ApplicationIds", lambda value: [as_uuid(value)]),
            "country": ("Country", as_str),
            "city": ("City", as_str),
            "searchterm": ("SearchTerm", as_str),
            "datecreatedfrom": ("DateCreatedFrom", as_utc_datetime),
            "datecreatedto": ("DateCreatedTo", as_utc_datetime),
            "showinactiveusers": ("ShowInactiveUsers", as_bool),
        }
        if not isinstance(raw, list):
            errors.append(FieldError("Filters", "must be an array of {Name, Value}"))
            return {}
        found: dict[str, Any] = {}
        for index, item in enumerate(raw):
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str) or name.lower() not in converters:
                errors.append(FieldError(f"Filters[{index}].Name", f"must be one of {', '.join(converters)}"))
                continue
            target, convert = converters[name.lower()]
            try:
                value = convert(item.get("value"))
            except InvalidValue as exc:
                errors.append(FieldError(f"Filters[{index}].Value", str(exc)))
                continue
            if isinstance(value, list) and target in found:
                value = [*found[target], *value]
            found[target] = value
        return found

    def _matches_page(self, user: UserView, values: Mapping[str, Any]) -> bool:
        instance_ids = values.get("InstanceIds")
        if instance_ids and user.instance_id.lower() not in instance_ids:
            return False
        if values.get("CompanyIds") and COMPANY_ID not in values["CompanyIds"]:
            return False
        if values.get("ApplicationIds") and APPLICATION_ID not in values["ApplicationIds"]:
            return False
        if not values.get("ShowInactiveUsers", False) and read_status(user.status) != "Active":
            return False
        created = datetime.fromtimestamp(user.created_at, UTC)
        if "DateCreatedFrom" in values and created < values["DateCreatedFrom"]:
            return False
        if "DateCreatedTo" in values and created > values["DateCreatedTo"]:
            return False
        statuses = values.get("ActivityStatuses")
        if statuses and "NoData" not in statuses:
            return False
        for name in ("Country", "City"):
            if name in values and not _same_text(user.profile.get(name), values[name]):
                return False
        if "RtdEnabled" in values and bool(user.user_fields.get("EnableRealtimeLocation")) != values["RtdEnabled"]:
            return False
        term = values.get("SearchTerm")
        if term:
            texts: Iterable[Any] = (
                user.device_token,
                user.user_fields.get("ClientId"),
                *(user.profile.get(name) for name in ("FirstName", "LastName", "Nickname", "Email", "Phone")),
            )
            if not any(_contains(text, term) for text in texts):
                return False
        return True

    # ------------------------------------------------------------------ writes

    def update(self, request: Request) -> Reply:
        self._authorize(request)
        target = request.header("UserDeviceToken")
        if target is None:
            raise _unprocessable([FieldError("UserDeviceToken", "The UserDeviceToken header is required.")])
        try:
            device_token = as_uuid(target)
        except InvalidValue as exc:
            raise _unprocessable([FieldError("UserDeviceToken", str(exc))]) from None
        body = request.body if request.body is not None else {}
        if not isinstance(body, dict):
            raise ApiError.single(400, "Body", "The request body must be a JSON object")
        changes, errors = bind(body, UPDATE_FIELDS)
        if errors:
            raise _unprocessable(errors)
        self._state.update(device_token, changes)
        return envelope(200)

    def delete(self, request: Request) -> Reply:
        self._authorize(request)
        (device_token,) = request.path_params
        self._state.delete(normalize_device_token(device_token))
        return envelope(200)

    def change_instance(self, request: Request) -> Reply:
        self._authorize(request)
        body = request.body if request.body is not None else {}
        if not isinstance(body, dict):
            raise ApiError.single(400, "Body", "The request body must be a JSON object")
        values, errors = bind(body, CHANGE_INSTANCE_FIELDS)
        if errors:
            raise _unprocessable(errors)
        self._state.change_instance(values["DeviceToken"], values["ToInstanceId"], values["ToInstanceKey"])
        return envelope(200)


def _same_text(actual: Any, wanted: str) -> bool:
    return isinstance(actual, str) and actual.lower() == wanted.lower()
