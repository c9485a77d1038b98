"""Models of the User Service's admin session and User Management API (the vendor's user-management-api.md).

Imported on first use by :class:`~telematics_reg.upstream.UserServiceClient`'s management calls, so that the
registration and refresh functions never build these models at cold start.

Reads and writes differ as the vendor documents: a user is read with ``Status`` ``Active``/``Inactive`` and
``UserFields`` an array of one object (:class:`ManagedUser`); it is written with ``Status``
``Active``/``Deactivated``/``Deleted`` and ``UserFields`` an object, only the fields given (:class:`UserUpdate`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final
from uuid import UUID

from pydantic import Field, field_validator

from telematics_reg.models import (
    AccessToken,
    LaxUUID,
    Secret,
    Text,
    _CaseInsensitiveEnum,
    _Model,
    _ResponseModel,
    jwt_expiry,
)

__all__ = [
    "MAX_PAGE_SIZE",
    "AccountInfo",
    "AdminCredentials",
    "AdminSession",
    "ManagedUser",
    "ManagedUserFields",
    "ManagedUserProfile",
    "UserPage",
    "UserPageQuery",
    "UserSort",
    "UserUpdate",
    "UserUpdateFields",
    "WrittenStatus",
]

MAX_PAGE_SIZE: Final = 1000
"""Largest ``PageSize`` asked of GetFilteredPage (the vendor documents none; the emulator enforces this one)."""

LaxDatetime = Annotated[datetime, Field(strict=False)]


# --- the admin session ----------------------------------------------------------------------------------------


class AdminCredentials(_Model):
    """The company's admin API credentials (the vendor's console: Admin Credentials > API Auth Credentials).

    Example
    -------
    >>> creds = AdminCredentials(email="ops@example.com", password="secret")
    >>> "secret" in repr(creds)
    False
    """

    email: Annotated[str, Field(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")]
    password: Secret = Field(min_length=1, max_length=256)

    def login_body(self) -> dict[str, str]:
        """The documented admin Login body: ``LoginFields`` a JSON string of ``{"email"}``; the password in clear."""
        return {
            "LoginFields": json.dumps({"email": self.email}, separators=(",", ":")),
            "Password": self.password.get_secret_value(),
        }


class AdminSession(_ResponseModel):
    """An admin JWT (``ExpiresIn`` 86400 s at the vendor) and its single-use refresh token (about 3 months)."""

    access_token: AccessToken
    refresh_token: Secret = Field(min_length=1, max_length=4_096)

    def expires_at(self, now: datetime) -> datetime:
        """When the admin JWT expires: ``now + ExpiresIn``, or the JWT's ``exp`` if that is earlier."""
        by_lifetime = (now + timedelta(seconds=self.access_token.expires_in)).astimezone(UTC)
        by_claim = jwt_expiry(self.access_token.token.get_secret_value())
        return min(by_lifetime, by_claim) if by_claim is not None else by_lifetime


# --- a user as the management API reads it --------------------------------------------------------------------


class ManagedUserProfile(_ResponseModel):
    """``UserProfile`` of a user read by find or GetFilteredPage (every field nullable)."""

    first_name: str | None = None
    last_name: str | None = None
    nickname: str | None = None
    phone: str | None = None
    email: str | None = None
    gender: str | None = None
    birthday: str | None = None
    marital_status: str | None = None
    children_count: int | None = None
    country: str | None = None
    district: str | None = None
    city: str | None = None
    address: str | None = None
    image_url: str | None = None
    external_image_url: str | None = None


class AccountInfo(_ResponseModel):
    """Where the user belongs; the names only come with ``IncludeAccountInfo``."""

    company_id: LaxUUID | None = None
    company_name: str | None = None
    application_id: LaxUUID | None = None
    application_name: str | None = None
    instance_id: LaxUUID | None = None
    instance_name: str | None = None


class ManagedUserFields(_ResponseModel):
    """The telematics flags and ``ClientId`` of a user as read (``UserFields[0]``)."""

    client_id: str | None = None
    enabled: bool | None = None
    enable_tracking: bool | None = None
    enable_logging: bool | None = None
    enable_real_time_location: bool | None = None


class ManagedUser(_ResponseModel):
    """One user as ``find`` and ``GetFilteredPage`` return it.

    Example
    -------
    >>> user = ManagedUser.model_validate({
    ...     "DeviceToken": "3fa85f64-5717-4562-b3fc-2c963f66afa6", "Status": "Inactive",
    ...     "AccountInfo": {"InstanceId": "3c1c8fd7-4133-404a-82e9-93a015d85362"},
    ...     "UserFields": [{"ClientId": "c-1", "EnableTracking": False}],
    ... })
    >>> user.client_id, user.active, str(user.instance_id)
    ('c-1', False, '3c1c8fd7-4133-404a-82e9-93a015d85362')
    """

    device_token: LaxUUID
    date_created: LaxDatetime | None = None
    status: str | None = None
    activity_status: str | None = None
    user_profile: ManagedUserProfile | None = None
    account_info: AccountInfo | None = None
    identity_id: str | None = None
    identity_provider: str | None = None
    user_fields: list[ManagedUserFields] = Field(default_factory=list)

    @field_validator("user_fields", mode="before")
    @classmethod
    def _one_object_or_an_array_of_one(cls, value: Any) -> Any:
        # Read as an array of one object (the vendor's samples); an object alone is taken too.
        if value is None:
            return []
        return [value] if isinstance(value, dict) else value

    @property
    def flags(self) -> ManagedUserFields:
        """``UserFields[0]`` (empty when the upstream sent none)."""
        return self.user_fields[0] if self.user_fields else ManagedUserFields()

    @property
    def client_id(self) -> str | None:
        return self.flags.client_id

    @property
    def instance_id(self) -> UUID | None:
        return self.account_info.instance_id if self.account_info is not None else None

    @property
    def active(self) -> bool:
        """Read ``Status`` is ``Active`` (``Inactive`` covers a user written ``Deactivated`` or ``Deleted``)."""
        return (self.status or "").lower() == "active"


class UserPage(_ResponseModel):
    """One page of GetFilteredPage."""

    users: list[ManagedUser]
    has_previous_page: bool = False
    has_next_page: bool = False
    total_users: int = Field(default=0, ge=0)
    total_pages: int = Field(default=0, ge=0)
    current_page: int = Field(default=1, ge=0)


class UserSort(_CaseInsensitiveEnum):
    """``Sort`` of GetFilteredPage (the vendor's ``UserSort``, the date orders; others pass as strings)."""

    DATE_CREATED = "DateCreated"
    DATE_CREATED_DESC = "DateCreatedDesc"
    DEVICE_TOKEN = "DeviceToken"  # noqa: S105 - a sort order's name, not a secret
    DEVICE_TOKEN_DESC = "DeviceTokenDesc"  # noqa: S105


class UserPageQuery(_Model):
    """Body of ``POST /v1/Management/users/GetFilteredPage``; every field the vendor marks required is sent.

    Example
    -------
    >>> UserPageQuery(page_size=2).to_upstream()  # doctest: +NORMALIZE_WHITESPACE
    {'PageNumber': 1, 'PageSize': 2, 'IncludeAccountInfo': True, 'Sort': 'DateCreated', 'ShowInactiveUsers': True}
    """

    instance_ids: list[LaxUUID] | None = None
    page_number: int = Field(default=1, ge=1)
    page_size: int = Field(default=100, ge=1, le=MAX_PAGE_SIZE)
    include_account_info: bool = True
    sort: Annotated[UserSort, Field(strict=False)] = UserSort.DATE_CREATED
    show_inactive_users: bool = True
    date_created_from: LaxDatetime | None = None
    date_created_to: LaxDatetime | None = None
    search_term: Text | None = None

    def to_upstream(self) -> dict[str, Any]:
        """PascalCase JSON with the defaults included (the vendor requires them) and no nulls."""
        dumped: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return dumped

    def next_page(self) -> UserPageQuery:
        return self.model_copy(update={"page_number": self.page_number + 1})


# --- writes ----------------------------------------------------------------------------------------------------


class WrittenStatus(_CaseInsensitiveEnum):
    """``Status`` as an update writes it (read back as ``Active`` or ``Inactive``); ``Deleted`` is soft."""

    ACTIVE = "Active"
    DEACTIVATED = "Deactivated"
    DELETED = "Deleted"


class UserUpdateFields(_Model):
    """``UserFields`` of an update: only the flags given are sent, so only they change."""

    client_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    enabled: bool | None = None
    enable_tracking: bool | None = None
    enable_logging: bool | None = None
    enable_real_time_location: bool | None = None


class UserUpdate(_Model):
    """Body of ``PUT /v1/Management/users`` (the target user goes in the ``UserDeviceToken`` header).

    Only the fields set are sent, and only they change upstream.

    Example
    -------
    >>> UserUpdate(status="Deactivated", user_fields=UserUpdateFields(enable_tracking=False)).to_upstream()
    {'Status': 'Deactivated', 'UserFields': {'EnableTracking': False}}
    """

    first_name: Text | None = None
    last_name: Text | None = None
    nickname: Text | None = None
    phone: Text | None = None
    email: Text | None = None
    gender: Annotated[str, Field(pattern=r"^(?i:none|male|female|other)$")] | None = None
    birthday: Text | None = None
    marital_status: Text | None = None
    children_count: int | None = Field(default=None, ge=0, le=100)
    country: Text | None = None
    district: Text | None = None
    city: Text | None = None
    address: Text | None = None
    external_image_url: Annotated[str, Field(max_length=2048)] | None = None
    status: Annotated[WrittenStatus, Field(strict=False)] | None = None
    identity_id: Text | None = None
    identity_provider: Text | None = None
    user_fields: UserUpdateFields | None = None
