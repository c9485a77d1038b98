"""Models of the User Service's requests and answers, and of our own registration messages.

Every model binds JSON keys case-insensitively (the upstream's official clients send camelCase, its docs
PascalCase), rejects unknown keys and wrong types (no ``"123"`` to ``int``, no ``"true"`` to ``bool``), caps
the size of every string, and serializes back to the upstream's PascalCase JSON with ``to_upstream()``.
Tokens and keys are ``SecretStr``: they never show in ``repr``, logs or ``model_dump_json()``; only
``to_upstream()`` (the wire format) reveals them.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from functools import cache
from typing import Annotated, Any, Final, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SecretStr,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    WrapSerializer,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_pascal
from pydantic_core import PydanticCustomError

from telematics_reg.errors import FieldError, InvalidMessageError

__all__ = [
    "MAX_BULK_QUANTITY",
    "MAX_CREATE_MANY_PER_CALL",
    "MAX_MESSAGE_BYTES",
    "MAX_TOKEN_LIFETIME_SECONDS",
    "AccessToken",
    "BulkRegistrationRequest",
    "CreateManyRequest",
    "CreateManyResult",
    "CreateResult",
    "CreateUserRequest",
    "CustomFields",
    "Envelope",
    "ErrorItem",
    "Gender",
    "InstanceCredentials",
    "IssuedUser",
    "LoginFields",
    "LoginRequest",
    "RefreshRequest",
    "RegistrationRequest",
    "UserExistsResult",
    "UserFields",
    "UserStatus",
    "field_errors",
    "jwt_expiry",
    "parse_registration_message",
    "read_jwt_claims",
]

MAX_CREATE_MANY_PER_CALL: Final = 100
"""Most users one CreateMany call may ask for; bigger bulks are split by the caller."""
MAX_BULK_QUANTITY: Final = 10_000
"""Most users one bulk registration message may ask for."""
MAX_MESSAGE_BYTES: Final = 64 * 1024
"""Largest registration message body accepted (UTF-8 bytes)."""
MAX_TOKEN_LIFETIME_SECONDS: Final = 10 * 366 * 86_400
"""Largest ``ExpiresIn`` of an access token taken from the upstream (ten years)."""

_REVEAL_SECRETS: Final = "reveal_secrets"
# fullmatch only: ``$`` would let a trailing newline through.
_CANONICAL_UUID: Final = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_MAX_TEXT: Final = 256
_MAX_URL: Final = 2048


# --- field types ---------------------------------------------------------------------------------------------


def _serialize_secret(value: SecretStr, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
    # Only to_upstream() passes this context: every other dump (logs, events, debugging) stays masked.
    if isinstance(info.context, Mapping) and info.context.get(_REVEAL_SECRETS):
        return value.get_secret_value()
    return handler(value)


Secret = Annotated[SecretStr, WrapSerializer(_serialize_secret)]
Text = Annotated[str, Field(max_length=_MAX_TEXT)]
_CONTROL_CHARACTERS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _no_control_characters(value: str) -> str:
    # An id is shown to operators (show, dlq list, logs): a C0/C1 control in it could drive their terminal.
    if _CONTROL_CHARACTERS.search(value):
        raise PydanticCustomError(
            "control_characters",
            "ClientId must not contain control characters (C0, DEL or C1: U+0000-U+001F, U+007F-U+009F)",
        )
    return value


ClientId = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_no_control_characters)]
InstanceAlias = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
# strict mode would only take UUID objects; JSON carries UUIDs as strings.
LaxUUID = Annotated[UUID, Field(strict=False)]

_BIRTHDAY_MESSAGE: Final = (
    "Birthday should be an ISO 8601 date (2019-12-13) or date-time (2019-12-13T06:19:18.837Z) string"
)


def _parse_birthday(value: Any) -> date | datetime:
    if isinstance(value, date):  # datetime is a date too
        return value
    if not isinstance(value, str) or not 8 <= len(value) <= 64:
        raise PydanticCustomError("birthday", _BIRTHDAY_MESSAGE)
    try:
        if len(value) > 10:
            return datetime.fromisoformat(value)
        return date.fromisoformat(value)
    except ValueError:
        raise PydanticCustomError("birthday", _BIRTHDAY_MESSAGE) from None


def _iso(value: date | datetime) -> str:
    return value.isoformat()


# Lax on purpose: a plain int (a Unix time) is not a birthday, but an ISO string must become a date.
Birthday = Annotated[
    date | datetime,
    PlainValidator(_parse_birthday),
    PlainSerializer(_iso, return_type=str, when_used="json"),
]


class _CaseInsensitiveEnum(StrEnum):
    @classmethod
    def _missing_(cls, value: object) -> Any:
        # The upstream binds enum values as .NET does: any case.
        if isinstance(value, str):
            for member in cls:
                if member.value.lower() == value.lower():
                    return member
        return None


class Gender(_CaseInsensitiveEnum):
    """A user's gender as the User Service spells it."""

    NONE = "None"
    MALE = "Male"
    FEMALE = "Female"
    OTHER = "Other"


class UserStatus(_CaseInsensitiveEnum):
    """Whether a user is created switched on (``Active``, the upstream's default) or off."""

    ACTIVE = "Active"
    DEACTIVATED = "Deactivated"


GenderField = Annotated[Gender, Field(strict=False)]
UserStatusField = Annotated[UserStatus, Field(strict=False)]


# --- bases ---------------------------------------------------------------------------------------------------


@cache
def _key_map(model: type[BaseModel]) -> dict[str, str]:
    keys: dict[str, str] = {}
    for name, info in model.model_fields.items():
        alias = info.alias or name
        keys[alias.lower()] = alias
        keys[name.lower()] = alias
    return keys


class _Model(BaseModel):
    """Case-insensitive keys, strict types, PascalCase on the wire, no input values in error texts.

    Validators are built by :func:`build_models`, not when this module is imported (``defer_build``): a function
    that never validates these models (the sweeper) never pays for them.
    """

    model_config = ConfigDict(
        defer_build=True,
        alias_generator=to_pascal,
        validate_by_alias=True,
        validate_by_name=True,
        serialize_by_alias=True,
        strict=True,
        extra="forbid",
        hide_input_in_errors=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _bind_keys_case_insensitively(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        keys = _key_map(cls)
        bound: dict[Any, Any] = {}
        for key, value in data.items():
            target = keys.get(key.lower(), key) if isinstance(key, str) else key
            if target in bound:
                raise PydanticCustomError(
                    "duplicate_key",
                    "Key {field} is given more than once (keys are case-insensitive)",
                    {"field": str(target)},
                )
            bound[target] = value
        return cls._prepare(bound)

    @classmethod
    def _prepare(cls, data: dict[Any, Any]) -> dict[Any, Any]:
        """Hook for subclasses: adjust the key-normalized input before validation."""
        return data

    def to_upstream(self) -> dict[str, Any]:
        """Serialize to the User Service's JSON: PascalCase keys, no unset or null fields, secrets revealed.

        Returns
        -------
        dict[str, Any]
            A JSON-ready dict. It holds secrets in clear text: send it, never log it.

        Example
        -------
        >>> CreateUserRequest.model_validate({"firstName": "Ada"}).to_upstream()
        {'FirstName': 'Ada'}
        """
        dumped: dict[str, Any] = self.model_dump(
            mode="json",
            by_alias=True,
            exclude_unset=True,
            exclude_none=True,
            context={_REVEAL_SECRETS: True},
        )
        return dumped


def build_models() -> None:
    """Build the validators of every model of the service now; cheap once they are built.

    Call it before models are first used from several threads at once: pydantic 2.13 builds a deferred model on
    its first use, and two threads building the same model at once can see it half built (pydantic issue 13419).
    The wiring's builders call it on each function's first invocation, before any batch runs concurrently.

    Example
    -------
    >>> build_models()
    >>> RegistrationRequest.__pydantic_complete__
    True
    """
    pending: list[type[BaseModel]] = [_Model]
    while pending:
        model = pending.pop()
        pending.extend(model.__subclasses__())
        if not model.__pydantic_complete__:
            model.model_rebuild()


class _ResponseModel(_Model):
    # The upstream may add fields at any time: ignore what we do not use instead of failing a call.
    model_config = ConfigDict(extra="ignore")


# --- requests to the User Service -------------------------------------------------------------------------


_FLAGS: Final = frozenset({"enable_tracking", "enable_logging", "enabled"})


class _Flags(_Model):
    @model_validator(mode="after")
    def _send_flags_explicitly(self) -> _Flags:
        # A partial object may bind missing booleans to false upstream (.NET defaults); always send all three.
        self.__pydantic_fields_set__.update(_FLAGS)
        return self


class UserFields(_Flags):
    """Telematics flags of one user, and the user's id in the customer's system (``ClientId``)."""

    enable_tracking: bool = True
    enable_logging: bool = False
    enabled: bool = True
    enable_realtime_location: bool | None = None
    client_id: ClientId | None = None


class CustomFields(_Flags):
    """Telematics flags applied to every user of a CreateMany call."""

    enable_tracking: bool = True
    enable_logging: bool = False
    enabled: bool = True


class _Profile(_Model):
    """The optional profile of the upstream's Create body (UPSTREAM.md, "Create body")."""

    create_access_token: bool = True
    first_name: Text | None = None
    last_name: Text | None = None
    nickname: Text | None = None
    phone: Text | None = None
    email: Text | None = None
    gender: GenderField | None = None
    birthday: Birthday | None = None
    marital_status: Text | None = None
    children_count: int | None = Field(default=None, ge=0, le=100)
    country: Text | None = None
    district: Text | None = None
    city: Text | None = None
    address: Text | None = None
    image_url: Annotated[str, Field(max_length=_MAX_URL)] | None = None
    status: UserStatusField | None = None
    instance_invite_code: Text | None = None
    user_fields: UserFields | None = None


class CreateUserRequest(_Profile):
    """Body of ``POST /v1/Registration/Create``. ``CustomToken`` becomes the new user's DeviceToken."""

    custom_token: LaxUUID | None = None


class CreateManyRequest(_Model):
    """Body of ``POST /v1/Registration/CreateMany``."""

    quantity: int = Field(ge=1, le=MAX_CREATE_MANY_PER_CALL)
    create_access_token: bool = True
    custom_fields: CustomFields | None = None


class RefreshRequest(_Model):
    """Body of the Refresh call: the (possibly expired) access token and the single-use refresh token."""

    access_token: Secret = Field(min_length=1, max_length=16_384)
    refresh_token: Secret = Field(min_length=1, max_length=4_096)


class LoginFields(_Model):
    """The object inside Login's ``LoginFields`` (sent as a JSON string, as the docs do)."""

    device_token: LaxUUID = Field(alias="Devicetoken")


class LoginRequest(_Model):
    """Body of ``POST /v1/Auth/Login`` for a user identified by DeviceToken; the password is the InstanceKey.

    Example
    -------
    >>> from uuid import UUID
    >>> body = LoginRequest.model_validate(
    ...     {"LoginFields": {"Devicetoken": "3fa85f64-5717-4562-b3fc-2c963f66afa6"}, "Password": "k"}
    ... )
    >>> body.to_upstream()["LoginFields"]
    '{"Devicetoken":"3fa85f64-5717-4562-b3fc-2c963f66afa6"}'
    """

    login_fields: LoginFields
    password: Secret = Field(min_length=1, max_length=_MAX_TEXT)

    @field_validator("login_fields", mode="before")
    @classmethod
    def _login_fields_may_be_a_json_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise PydanticCustomError("json_string", "LoginFields should be a JSON object") from None
        return value

    @classmethod
    def for_device(cls, creds: InstanceCredentials, device_token: UUID) -> LoginRequest:
        """Build the Login body for one user of the instance ``creds``.

        Parameters
        ----------
        creds
            The instance the user belongs to; its InstanceKey is the password.
        device_token
            The user's DeviceToken.

        Returns
        -------
        LoginRequest
            The body; ``to_upstream()`` gives the wire form.

        Example
        -------
        >>> from uuid import uuid4
        >>> key = "1b7cc25f-329e-4482-9dd1-0bb07c0c794b"
        >>> creds = InstanceCredentials(instance_id=uuid4(), instance_key=key)
        >>> LoginRequest.for_device(creds, uuid4()).to_upstream()["Password"] == key
        True
        """
        return cls(login_fields=LoginFields(device_token=device_token), password=creds.instance_key)

    def to_upstream(self) -> dict[str, Any]:
        """Serialize as the docs show it: ``LoginFields`` is a JSON string, ``Password`` in clear text.

        Returns
        -------
        dict[str, Any]
            ``{"LoginFields": "{\\"Devicetoken\\":\\"<uuid>\\"}", "Password": "<InstanceKey>"}``.

        Example
        -------
        See the class docstring.
        """
        fields = json.dumps(self.login_fields.to_upstream(), separators=(",", ":"))
        return {"LoginFields": fields, "Password": self.password.get_secret_value()}


class InstanceCredentials(_Model):
    """One instance's credentials, as stored in the credentials secret (``{"InstanceId", "InstanceKey"}``).

    Example
    -------
    >>> creds = InstanceCredentials.model_validate(
    ...     {"instanceId": "3c1c8fd7-4133-404a-82e9-93a015d85362",
    ...      "instanceKey": "1b7cc25f-329e-4482-9dd1-0bb07c0c794b"}
    ... )
    >>> "1b7cc25f" in repr(creds)
    False
    """

    instance_id: LaxUUID
    instance_key: Secret

    @field_validator("instance_key", mode="before")
    @classmethod
    def _instance_key_is_a_uuid(cls, value: Any) -> Any:
        # The vendor issues InstanceKeys as UUIDs. Anything else (a trailing newline or space pasted into the
        # secret, a control character) ends up in an HTTP header, where requests and http.client refuse it
        # with the whole value in their exception text: refuse it here, never echoing it.
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(raw, str) or _CANONICAL_UUID.fullmatch(raw) is None:
            raise PydanticCustomError("instance_key", "InstanceKey should be a UUID (8-4-4-4-12 hex digits only)")
        return value

    def headers(self) -> dict[str, str]:
        """The request headers that authenticate a call for this instance (the key in clear text)."""
        return {"InstanceId": str(self.instance_id), "InstanceKey": self.instance_key.get_secret_value()}


# --- answers of the User Service --------------------------------------------------------------------------


def read_jwt_claims(token: str) -> dict[str, Any] | None:
    """Read a JWT's claims without checking its signature (we only use them as hints, e.g. ``exp``).

    Parameters
    ----------
    token
        A compact JWT (``header.payload.signature``) or anything else.

    Returns
    -------
    dict[str, Any] | None
        The payload's claims, or None when ``token`` is not a readable JWT.

    Example
    -------
    >>> read_jwt_claims("eyJhbGciOiJub25lIn0.eyJleHAiOjEwfQ.") == {"exp": 10}
    True
    >>> read_jwt_claims("opaque") is None
    True
    """
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > 65_536:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError, RecursionError):  # a payload nested deeper than the parser recurses
        return None
    return claims if isinstance(claims, dict) else None


def jwt_expiry(token: str) -> datetime | None:
    """The ``exp`` claim of a JWT as an aware UTC datetime, or None when it cannot be read.

    Example
    -------
    >>> jwt_expiry("eyJhbGciOiJub25lIn0.eyJleHAiOjEwfQ.")
    datetime.datetime(1970, 1, 1, 0, 0, 10, tzinfo=datetime.timezone.utc)
    """
    claims = read_jwt_claims(token)
    exp = claims.get("exp") if claims else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    try:
        return datetime.fromtimestamp(exp, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


class AccessToken(_ResponseModel):
    """A user's JWT and its lifetime in seconds."""

    token: Secret = Field(min_length=1, max_length=16_384)
    # No access token lives for decades: a bigger ExpiresIn is a broken answer (and overflows a datetime).
    expires_in: int = Field(ge=0, le=MAX_TOKEN_LIFETIME_SECONDS)


class CreateResult(_ResponseModel):
    """A user and tokens as Create, CreateMany, Login and Refresh return them."""

    device_token: LaxUUID
    access_token: AccessToken | None = None
    refresh_token: Secret | None = Field(default=None, min_length=1, max_length=4_096)

    def expires_at(self, now: datetime | float) -> datetime | None:
        """When the access token expires: ``now + ExpiresIn``, or the JWT's ``exp`` if that is earlier.

        Parameters
        ----------
        now
            When the answer was received: a datetime (a naive one is taken as UTC) or Unix seconds.

        Returns
        -------
        datetime | None
            Aware UTC datetime, or None when no access token was issued.

        Example
        -------
        >>> from datetime import datetime, UTC
        >>> result = CreateResult.model_validate({
        ...     "DeviceToken": "3fa85f64-5717-4562-b3fc-2c963f66afa6",
        ...     "AccessToken": {"Token": "opaque", "ExpiresIn": 60},
        ... })
        >>> result.expires_at(datetime(2024, 1, 1, tzinfo=UTC))
        datetime.datetime(2024, 1, 1, 0, 1, tzinfo=datetime.timezone.utc)
        """
        if self.access_token is None:
            return None
        if not isinstance(now, datetime):
            now = datetime.fromtimestamp(now, tz=UTC)
        elif now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        by_lifetime = (now + timedelta(seconds=self.access_token.expires_in)).astimezone(UTC)
        by_claim = jwt_expiry(self.access_token.token.get_secret_value())
        return min(by_lifetime, by_claim) if by_claim is not None else by_lifetime


IssuedUser = CreateResult
"""Another name for :class:`CreateResult`: a user with the tokens the upstream issued."""


class CreateManyResult(_ResponseModel):
    """Result of CreateMany: one Create result per user."""

    results: list[CreateResult]


class UserExistsResult(_ResponseModel):
    """Result of ``GET /v1/Check/UserExists``."""

    user_exists: bool


class ErrorItem(_ResponseModel):
    """One entry of the envelope's ``Errors[]``."""

    key: str | None = None
    message: str | None = None


class Envelope(_ResponseModel):
    """The body of every User Service answer: ``{Result, Status, Title, Errors}``."""

    result: Any = None
    status: int | None = None
    title: str | None = None
    errors: list[ErrorItem] | None = None

    def field_errors(self) -> list[FieldError]:
        """The envelope's ``Errors[]`` as :class:`FieldError` items (missing parts become ``""``)."""
        return [FieldError(e.key or "", e.message or "") for e in self.errors or []]


# --- our messages ------------------------------------------------------------------------------------------


class RegistrationRequest(_Profile):
    """One registration message (signup event ``detail`` or queue body): a Create body plus routing fields.

    ``ClientId`` (required) may be given at the top or as ``UserFields.ClientId``; if both, they must agree.
    ``Instance`` names which instance's credentials to use; it is not forwarded.

    Example
    -------
    >>> request = RegistrationRequest.model_validate({"clientId": "c-1", "firstName": "Ada"})
    >>> request.instance
    'default'
    """

    client_id: ClientId
    instance: InstanceAlias = "default"
    #: When the registration occurred (ISO 8601, ms; not forwarded). Without it, the intake sets the event's
    #: ``time`` or the message's ``SentTimestamp``. Orders it against a deletion of the same ClientId.
    occurred_at: Annotated[datetime, Field(strict=False)] | None = None

    @property
    def occurred_at_ms(self) -> int | None:
        if self.occurred_at is None:
            return None
        moment = self.occurred_at if self.occurred_at.tzinfo else self.occurred_at.replace(tzinfo=UTC)
        return int(moment.timestamp() * 1000)

    @classmethod
    def _prepare(cls, data: dict[Any, Any]) -> dict[Any, Any]:
        user_fields = data.get("UserFields")
        nested = None
        if isinstance(user_fields, Mapping):
            nested = next(
                (v for k, v in user_fields.items() if isinstance(k, str) and k.lower() in {"clientid", "client_id"}),
                None,
            )
        if nested is None:
            return data
        top = data.get("ClientId")
        if top is None:
            return {**data, "ClientId": nested}
        if top != nested:
            raise PydanticCustomError(
                "client_id_conflict",
                "ClientId and UserFields.ClientId differ: give the user's id once, or the same value in both",
                {"field": "ClientId"},
            )
        return data

    def create_body(self, custom_token: UUID) -> CreateUserRequest:
        """The upstream Create body for this request: the profile, ``UserFields.ClientId`` and ``CustomToken``.

        Parameters
        ----------
        custom_token
            The DeviceToken we choose for the user (deterministic, so a lost answer can be recovered by Login).

        Returns
        -------
        CreateUserRequest
            Every field the message set, except the routing field ``Instance``.

        Example
        -------
        >>> from uuid import UUID
        >>> token = UUID("3fa85f64-5717-4562-b3fc-2c963f66afa6")
        >>> RegistrationRequest.model_validate({"ClientId": "c-1"}).create_body(token).to_upstream()
        ... # doctest: +NORMALIZE_WHITESPACE
        {'UserFields': {'EnableTracking': True, 'EnableLogging': False, 'Enabled': True, 'ClientId': 'c-1'},
         'CustomToken': '3fa85f64-5717-4562-b3fc-2c963f66afa6'}
        """
        data: dict[str, Any] = {
            name: getattr(self, name) for name in self.model_fields_set if name in _Profile.model_fields
        }
        user_fields = self.user_fields.model_dump(exclude_unset=True) if self.user_fields else {}
        data["user_fields"] = UserFields.model_validate({**user_fields, "client_id": self.client_id})
        data["custom_token"] = custom_token
        return CreateUserRequest.model_validate(data)


class BulkRegistrationRequest(_Model):
    """A queue message asking for ``Quantity`` anonymous users at once.

    ``RequestId`` is the caller's idempotency key for the whole bulk (a redelivered message with the same key
    must not make a second batch of users).

    Example
    -------
    >>> bulk = BulkRegistrationRequest.model_validate({"quantity": 250, "requestId": "load-7"})
    >>> [body.quantity for body in bulk.create_many_bodies()]
    [100, 100, 50]
    """

    quantity: int = Field(ge=1, le=MAX_BULK_QUANTITY)
    create_access_token: bool = True
    custom_fields: CustomFields | None = None
    instance: InstanceAlias = "default"
    request_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None

    def create_many_bodies(self, per_call: int = MAX_CREATE_MANY_PER_CALL) -> list[CreateManyRequest]:
        """Split the bulk into CreateMany bodies of at most ``per_call`` users each.

        Parameters
        ----------
        per_call
            Users per CreateMany call, 1 to ``MAX_CREATE_MANY_PER_CALL``.

        Returns
        -------
        list[CreateManyRequest]
            Bodies whose quantities add up to ``quantity``.

        Example
        -------
        See the class docstring.
        """
        if not 1 <= per_call <= MAX_CREATE_MANY_PER_CALL:
            raise ValueError(f"per_call must be 1..{MAX_CREATE_MANY_PER_CALL}, not {per_call}")
        bodies: list[CreateManyRequest] = []
        for start in range(0, self.quantity, per_call):
            data: dict[str, Any] = {
                "quantity": min(per_call, self.quantity - start),
                "create_access_token": self.create_access_token,
            }
            if self.custom_fields is not None:
                data["custom_fields"] = self.custom_fields
            bodies.append(CreateManyRequest.model_validate(data))
        return bodies


# --- parsing messages ---------------------------------------------------------------------------------------


_MessageReason = Literal["not_json", "not_an_object", "invalid_fields", "too_large"]


def _key_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def field_errors(exc: ValidationError) -> list[FieldError]:
    """Turn a pydantic ``ValidationError`` into field errors a human can act on (never echoing input values).

    Parameters
    ----------
    exc
        Raised by one of this module's models.

    Returns
    -------
    list[FieldError]
        One per problem; ``key`` is the dotted PascalCase path (``UserFields.EnableTracking``, ``Errors.0``).

    Example
    -------
    >>> try:
    ...     RegistrationRequest.model_validate({"ClientId": "c", "Foo": 1})
    ... except ValidationError as exc:
    ...     print(field_errors(exc))
    [FieldError(key='Foo', message="Unknown field 'Foo' (keys are case-insensitive; see the Create body)")]
    """
    found: list[FieldError] = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = tuple(error["loc"])
        ctx = error.get("ctx") or {}
        if "field" in ctx:
            loc = (*loc, str(ctx["field"]))
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = f"Unknown field {str(loc[-1])!r} (keys are case-insensitive; see the Create body)"
        elif error["type"] == "missing" and loc == ("ClientId",):
            message = "Field required: the user's id in your system, as ClientId or UserFields.ClientId"
        found.append(FieldError(_key_path(loc), message))
    return found


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _invalid(reason: _MessageReason, key: str, message: str) -> InvalidMessageError:
    return InvalidMessageError(reason, [FieldError(key, message)])


def parse_registration_message(raw: str | bytes | Mapping[str, Any]) -> RegistrationRequest | BulkRegistrationRequest:
    """Parse one registration message: a single registration, or a bulk one when it has a ``Quantity`` key.

    Parameters
    ----------
    raw
        The queue message body (``str`` or ``bytes``), or an already-decoded object (an EventBridge ``detail``).

    Returns
    -------
    RegistrationRequest | BulkRegistrationRequest
        The validated request.

    Raises
    ------
    InvalidMessageError
        ``reason`` is ``"too_large"`` (body over 64 KiB), ``"not_json"``, ``"not_an_object"`` or
        ``"invalid_fields"``; ``errors`` names each bad field by its dotted PascalCase path.

    Example
    -------
    >>> parse_registration_message('{"clientId": "c-1", "gender": "Female"}').gender
    <Gender.FEMALE: 'Female'>
    >>> parse_registration_message(b'{"Quantity": 5}').quantity
    5
    >>> try:
    ...     parse_registration_message('{"Quantity": "5"}')
    ... except InvalidMessageError as exc:
    ...     print(exc.reason, exc.errors[0].key)
    invalid_fields Quantity
    """
    data: Any
    if isinstance(raw, str | bytes | bytearray):
        size = len(raw.encode("utf-8", "surrogatepass")) if isinstance(raw, str) else len(raw)
        if size > MAX_MESSAGE_BYTES:
            raise _invalid("too_large", "", f"Message is {size} bytes; the limit is {MAX_MESSAGE_BYTES} bytes")
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            # The parser's message says where the JSON breaks (line, column), without echoing the body.
            raise _invalid("not_json", "", f"Message body is not valid JSON: {exc}") from None
    else:
        data = raw
        if isinstance(data, Mapping):
            try:
                size = len(json.dumps(data, default=str).encode("utf-8", "surrogatepass"))
            except (ValueError, TypeError, RecursionError):
                raise _invalid("not_json", "", "Message cannot be represented as JSON") from None
            if size > MAX_MESSAGE_BYTES:
                raise _invalid("too_large", "", f"Message is {size} bytes; the limit is {MAX_MESSAGE_BYTES} bytes")
    if not isinstance(data, Mapping):
        raise _invalid("not_an_object", "", f"Message must be a JSON object, not {_json_kind(data)}")
    is_bulk = any(isinstance(key, str) and key.lower() == "quantity" for key in data)
    model: type[RegistrationRequest | BulkRegistrationRequest] = (
        BulkRegistrationRequest if is_bulk else RegistrationRequest
    )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidMessageError("invalid_fields", field_errors(exc)) from None


def _json_kind(value: Any) -> str:
    kinds: dict[type, str] = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, name in kinds.items():
        if isinstance(value, kind):
            return name
    return "a number" if isinstance(value, int | float) else type(value).__name__
