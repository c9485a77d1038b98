"""Case-insensitive JSON binding and field-level validation of request bodies.

Bodies arrive with their keys folded to lower case (:func:`fold_keys`), so ``FirstName``, ``firstName``
and ``firstname`` all bind to the same field. Errors name fields in PascalCase, dotted when nested
(``UserFields.EnableTracking``), as the upstream's ``Errors[]`` does.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from local.emulator.messages import FieldError

Converter = Callable[[Any], Any]
"""Checks one JSON value and returns its canonical form; raises :class:`InvalidValue` with the message."""


class InvalidValue(ValueError):
    """A field's value is wrong; the message is the one ``Errors[]`` shows."""


def fold_keys(value: Any) -> Any:
    """``value`` with the keys of every object, at any depth, lower-cased (values untouched)."""
    if isinstance(value, dict):
        return {str(key).lower(): fold_keys(item) for key, item in value.items()}
    if isinstance(value, list):
        return [fold_keys(item) for item in value]
    return value


def as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidValue("must be a string")
    return value


def as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidValue("must be true or false")
    return value


def as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue("must be an integer")
    return value


def as_non_negative_int(value: Any) -> int:
    number = as_int(value)
    if number < 0:
        raise InvalidValue("must be 0 or more")
    return number


def int_between(low: int, high: int) -> Converter:
    def convert(value: Any) -> int:
        number = as_int(value)
        if not low <= number <= high:
            raise InvalidValue(f"must be between {low} and {high}")
        return number

    return convert


def as_uuid(value: Any) -> str:
    """A UUID in canonical lower-case form."""
    if not isinstance(value, str):
        raise InvalidValue("must be a UUID string")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidValue("must be a UUID") from None


def as_iso_date(value: Any) -> str:
    """An ISO 8601 date (``2019-12-13``) or date-time (``2019-12-13T06:19:18.837Z``), kept as sent."""
    if not isinstance(value, str):
        raise InvalidValue("must be an ISO 8601 date or date-time string")
    try:
        date.fromisoformat(value)
    except ValueError:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise InvalidValue("must be an ISO 8601 date or date-time") from None
    return value


def one_of(*names: str) -> Converter:
    """A string enum matched case-insensitively; returns the canonical spelling."""
    canonical = {name.lower(): name for name in names}
    allowed = ", ".join(names)

    def convert(value: Any) -> str:
        if isinstance(value, str) and value.lower() in canonical:
            return canonical[value.lower()]
        raise InvalidValue(f"must be one of {allowed}")

    return convert


def enum_of(*names: str) -> Converter:
    """Like :func:`one_of`, and also accepts the member's index (as .NET enums bind numbers)."""
    by_name = one_of(*names)

    def convert(value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            return names[value]
        return str(by_name(value))

    return convert


@dataclass(frozen=True)
class Field:
    """A body field: its PascalCase ``name`` and either a converter or, for objects, nested fields."""

    name: str
    convert: Converter | None = None
    nested: tuple[Field, ...] = ()
    required: bool = False


def bind(body: Mapping[str, Any], fields: Sequence[Field], prefix: str = "") -> tuple[dict[str, Any], list[FieldError]]:
    """Bind a folded JSON object to ``fields``: canonical values by PascalCase name, and every error found.

    ``null`` counts as absent. Unknown keys are ignored (as the upstream does).
    """
    values: dict[str, Any] = {}
    errors: list[FieldError] = []
    for spec in fields:
        key = prefix + spec.name
        raw = body.get(spec.name.lower())
        if raw is None:
            if spec.required:
                errors.append(FieldError(key, f"The {spec.name} field is required."))
            continue
        if spec.convert is None:
            if not isinstance(raw, dict):
                errors.append(FieldError(key, "must be an object"))
                continue
            nested, nested_errors = bind(raw, spec.nested, key + ".")
            values[spec.name] = nested
            errors.extend(nested_errors)
            continue
        try:
            values[spec.name] = spec.convert(raw)
        except InvalidValue as exc:
            errors.append(FieldError(key, str(exc)))
    return values, errors


def list_of(item: Converter) -> Converter:
    """A JSON array whose items each pass ``item``."""

    def convert(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise InvalidValue("must be an array")
        try:
            return [item(entry) for entry in value]
        except InvalidValue as exc:
            raise InvalidValue(f"every item {exc}") from None

    return convert


def as_utc_datetime(value: Any) -> datetime:
    """An ISO 8601 date or date-time as an aware UTC datetime (no zone given: UTC; a date: its midnight)."""
    if not isinstance(value, str):
        raise InvalidValue("must be an ISO 8601 date or date-time string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidValue("must be an ISO 8601 date or date-time") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


GENDERS = ("None", "Male", "Female", "Other")
STATUSES = ("Active", "Deactivated")
#: ``Status`` as the management API's PUT writes it (``Deleted`` is a soft state; DELETE is the hard one).
WRITE_STATUSES = ("Active", "Deactivated", "Deleted")

TELEMATICS_FLAGS = (
    Field("EnableTracking", as_bool),
    Field("EnableLogging", as_bool),
    Field("Enabled", as_bool),
    Field("EnableRealtimeLocation", as_bool),
)
USER_FIELDS = (*TELEMATICS_FLAGS, Field("ClientId", as_str))

PROFILE_STRINGS = (
    "FirstName",
    "LastName",
    "Nickname",
    "Phone",
    "Email",
    "MaritalStatus",
    "Country",
    "District",
    "City",
    "Address",
    "ImageUrl",
)

PROFILE_FIELDS: tuple[Field, ...] = (
    *(Field(name, as_str) for name in PROFILE_STRINGS),
    Field("Gender", enum_of(*GENDERS)),
    Field("Birthday", as_iso_date),
    Field("ChildrenCount", as_non_negative_int),
)

CREATE_FIELDS: tuple[Field, ...] = (
    *PROFILE_FIELDS,
    Field("Status", one_of(*STATUSES)),
    Field("UserFields", nested=USER_FIELDS),
    Field("CreateAccessToken", as_bool),
    Field("CustomToken", as_uuid),
    Field("InstanceInviteCode", as_str),
)

MAX_QUANTITY = 1000

CREATE_MANY_FIELDS: tuple[Field, ...] = (
    Field("Quantity", int_between(1, MAX_QUANTITY), required=True),
    Field("CreateAccessToken", as_bool),
    Field("CustomFields", nested=TELEMATICS_FLAGS),
)

PROFILE_NAMES = frozenset(spec.name for spec in PROFILE_FIELDS)

# The management API's PUT body (``UpdateUserCommandDataContractBody`` in user-management-api.md): the profile
# without ImageUrl (it takes ExternalImageUrl), the identity fields, the written Status, and the flags.
UPDATE_FIELDS: tuple[Field, ...] = (
    *(spec for spec in PROFILE_FIELDS if spec.name != "ImageUrl"),
    Field("ExternalImageUrl", as_str),
    Field("Status", one_of(*WRITE_STATUSES)),
    Field("OldPassword", as_str),
    Field("NewPassword", as_str),
    Field("IdentityId", as_str),
    Field("IdentityProvider", as_str),
    Field("UserFields", nested=USER_FIELDS),
)

#: ``Sort`` of GetFilteredPage (registration-api.md, ``UserSort``): each field ascending, and ``...Desc``.
SORT_FIELDS = (
    "DeviceToken",
    "FirstName",
    "LastName",
    "Nickname",
    "Phone",
    "Email",
    "Gender",
    "Birthday",
    "MaritalStatus",
    "ChildrenCount",
    "Country",
    "District",
    "City",
    "DateCreated",
    "ActivityStatus",
)
SORTS = tuple(name + suffix for name in SORT_FIELDS for suffix in ("", "Desc"))
ACTIVITY_STATUSES = ("Active", "Inactive", "Lost", "NoData", "Error")
MAX_PAGE_SIZE = 1000

PAGE_FIELDS: tuple[Field, ...] = (
    Field("CompanyIds", list_of(as_uuid)),
    Field("ApplicationIds", list_of(as_uuid)),
    Field("InstanceIds", list_of(as_uuid)),
    Field("PageNumber", int_between(1, 1_000_000)),
    Field("PageSize", int_between(1, MAX_PAGE_SIZE)),
    Field("IncludeAccountInfo", as_bool),
    Field("SearchTerm", as_str),
    Field("Sort", enum_of(*SORTS)),
    Field("ActivityStatuses", list_of(one_of(*ACTIVITY_STATUSES))),
    Field("DateCreatedFrom", as_utc_datetime),
    Field("DateCreatedTo", as_utc_datetime),
    Field("Country", as_str),
    Field("City", as_str),
    Field("ShowInactiveUsers", as_bool),
    Field("RtdEnabled", as_bool),
    # The other documented body (user-management-api.md): "Pagination": {"Page", "PageSize"}.
    Field(
        "Pagination",
        nested=(Field("Page", int_between(1, 1_000_000)), Field("PageSize", int_between(1, MAX_PAGE_SIZE))),
    ),
)

CHANGE_INSTANCE_FIELDS: tuple[Field, ...] = (
    Field("DeviceToken", as_uuid, required=True),
    Field("ToInstanceId", as_uuid, required=True),
    Field("ToInstanceKey", as_str, required=True),
)
