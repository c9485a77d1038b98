"""Lifecycle changes as they arrive: EventBridge events of five detail-types, queue messages, ``load`` rows.

Every form becomes one :class:`LifecycleChange`. Keys are case-insensitive (PascalCase or camelCase, as
registrations). ``OccurredAt`` (ISO 8601, milliseconds) orders a user's changes; without it, the event's own
``time`` (or the queue message's ``SentTimestamp``) does.

Example
-------
>>> change = parse_change({"clientId": "c-1", "firstName": "Ada"}, detail_type="UserUpdated", fallback_ms=0)
>>> change.action, change.client_id, change.update.to_upstream() if change.update else None
(<Action.UPDATE: 'Update'>, 'c-1', {'FirstName': 'Ada'})
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Final

from pydantic import Field, ValidationError, field_validator

from telematics_reg.errors import FieldError, InvalidMessageError
from telematics_reg.intake import event_time_ms
from telematics_reg.management_models import UserUpdate, UserUpdateFields, WrittenStatus
from telematics_reg.models import (
    MAX_MESSAGE_BYTES,
    ClientId,
    GenderField,
    InstanceAlias,
    Text,
    _Model,
    field_errors,
)

_MAX_URL: Final = 2048
#: How far ahead of the service's clock a change's time (``OccurredAt``, or its event's ``time``) may be: a producer's
#: clock runs a little ahead at most. A time further ahead is refused (``invalid_fields``): applied, it would become
#: the user's order marker, and every real change until then would be dropped as stale (a deletion's, the time
#: before which every registration of its ClientId is refused).
FUTURE_TOLERANCE_MS: Final = 300_000


class Action(StrEnum):
    """What a change does (the ``Action`` column of ``telematics-reg load``; none there means register)."""

    UPDATE = "Update"
    DEACTIVATE = "Deactivate"
    REACTIVATE = "Reactivate"
    DELETE = "Delete"
    MOVE = "Move"

    @classmethod
    def parse(cls, value: str) -> Action | None:
        for member in cls:
            if member.value.lower() == value.strip().lower():
                return member
        return None


#: EventBridge ``detail-type`` of each change on the signup bus.
DETAIL_TYPES: Final[Mapping[str, Action]] = {
    "UserUpdated": Action.UPDATE,
    "UserDeactivated": Action.DEACTIVATE,
    "UserReactivated": Action.REACTIVATE,
    "UserDeleted": Action.DELETE,
    "UserMoved": Action.MOVE,
}


class _Flags(_Model):
    """``UserFields`` of an update: only the flags given change. ``ClientId`` may repeat the routing one."""

    enabled: bool | None = None
    enable_tracking: bool | None = None
    enable_logging: bool | None = None
    enable_real_time_location: bool | None = Field(None, validation_alias="EnableRealTimeLocation")
    client_id: ClientId | None = None

    @classmethod
    def _prepare(cls, data: dict[Any, Any]) -> dict[Any, Any]:
        # Create spells it EnableRealtimeLocation, the management API EnableRealTimeLocation: both are taken.
        if "EnableRealtimeLocation" in data and "EnableRealTimeLocation" not in data:
            data = {**data, "EnableRealTimeLocation": data.pop("EnableRealtimeLocation")}
        return data


class _Envelope(_Model):
    """Fields every change carries."""

    action: Annotated[str, Field(max_length=32)] | None = None
    client_id: ClientId
    instance: InstanceAlias = "default"
    occurred_at: Annotated[datetime, Field(strict=False)] | None = None

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("OccurredAt needs a time zone (e.g. 2026-01-31T12:00:00.000Z)")
        return value

    @classmethod
    def _prepare(cls, data: dict[Any, Any]) -> dict[Any, Any]:
        flags = data.get("UserFields")
        if isinstance(flags, Mapping):
            nested = next((v for k, v in flags.items() if isinstance(k, str) and k.lower() == "clientid"), None)
            if nested is not None and data.get("ClientId") is None:
                data = {**data, "ClientId": nested}
        return data


class _UpdateBody(_Envelope):
    first_name: Text | None = None
    last_name: Text | None = None
    nickname: Text | None = None
    phone: Text | None = None
    email: Text | None = None
    gender: GenderField | None = None
    birthday: Text | None = None
    marital_status: Text | None = None
    children_count: int | None = Field(default=None, ge=0, le=100)
    country: Text | None = None
    district: Text | None = None
    city: Text | None = None
    address: Text | None = None
    image_url: Annotated[str, Field(max_length=_MAX_URL)] | None = None
    external_image_url: Annotated[str, Field(max_length=_MAX_URL)] | None = None
    user_fields: _Flags | None = None


class _StatusBody(_Envelope):
    pass


class _MoveBody(_Envelope):
    to_instance: InstanceAlias


_PROFILE: Final = (
    "first_name",
    "last_name",
    "nickname",
    "phone",
    "email",
    "gender",
    "birthday",
    "marital_status",
    "children_count",
    "country",
    "district",
    "city",
    "address",
)


@dataclass(frozen=True)
class LifecycleChange:
    """One change to one user. ``occurred_at`` is epoch milliseconds; ``update`` is set for every action but a
    deletion or a move (``Status`` for de/reactivation)."""

    action: Action
    client_id: str
    instance: str
    occurred_at: int
    # The profile values stay out of reprs (logs, errors): ids and reasons only.
    update: UserUpdate | None = field(default=None, repr=False)
    to_instance: str | None = None

    @property
    def key(self) -> str:
        return f"{self.instance}#{self.client_id}"


def _ms(value: datetime) -> int:
    # ``timestamp()`` of an aware time, not ``astimezone(UTC)``: the latter fails (OverflowError) for a time whose
    # UTC date falls outside the calendar, such as 0001-01-01T00:00:00+02:00.
    return int(value.timestamp() * 1000)


__all__ = [
    "DETAIL_TYPES",
    "FUTURE_TOLERANCE_MS",
    "Action",
    "LifecycleChange",
    "action_of",
    "event_time_ms",
    "parse_change",
]


def _invalid(key: str, message: str, reason: str = "invalid_fields") -> InvalidMessageError:
    return InvalidMessageError(reason, [FieldError(key, message)])


def _decode(raw: str | bytes | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(raw, str | bytes | bytearray):
        if len(raw) > MAX_MESSAGE_BYTES:
            raise _invalid("", f"Message is over {MAX_MESSAGE_BYTES} bytes", "too_large")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise _invalid("", f"Message body is not valid JSON: {exc}", "not_json") from None
    else:
        data = raw
    if not isinstance(data, Mapping):
        raise _invalid("", "Message must be a JSON object", "not_an_object")
    return data


def action_of(raw: str | bytes | Mapping[str, Any]) -> Action | None:
    """The ``Action`` a queue message names, ``None`` when it names none (a registration); raises for bad input."""
    data = _decode(raw)
    value = next((v for k, v in data.items() if isinstance(k, str) and k.lower() == "action"), None)
    if value in (None, ""):
        return None
    action = Action.parse(value) if isinstance(value, str) else None
    if action is None:
        raise _invalid("Action", f"Unknown Action; use one of {', '.join(a.value for a in Action)}", "unknown_action")
    return action


def parse_change(
    raw: str | bytes | Mapping[str, Any],
    *,
    detail_type: str | None = None,
    fallback_ms: int,
    not_after_ms: int | None = None,
) -> LifecycleChange:
    """Parse one change: an event's ``detail`` (with its ``detail_type``) or a queue message with ``Action``.

    Parameters
    ----------
    raw
        The detail or message body.
    detail_type
        The EventBridge ``detail-type``; ``None`` for a queue message (its ``Action`` field decides).
    fallback_ms
        The order time when the change has no ``OccurredAt``: the event's ``time``, the message's send time.
    not_after_ms
        The latest order time accepted (the caller's clock plus :data:`FUTURE_TOLERANCE_MS`); ``None``: any.

    Raises
    ------
    InvalidMessageError
        ``reason`` ``unknown_action``, ``invalid_fields``, ``not_json``, ``not_an_object`` or ``too_large``;
        ``errors`` names each bad field.
    """
    data = dict(_decode(raw))
    if detail_type is not None:
        action = DETAIL_TYPES.get(detail_type)
        if action is None:
            raise _invalid("detail-type", f"Not a lifecycle detail-type: {detail_type[:64]}", "unknown_action")
        named = action_of(data)
        if named is not None and named is not action:
            raise _invalid("Action", f"Action {named.value} contradicts detail-type {detail_type}")
    else:
        named = action_of(data)
        if named is None:
            raise _invalid("Action", "A lifecycle message needs an Action", "unknown_action")
        action = named
    models: dict[Action, type[_Envelope]] = {Action.UPDATE: _UpdateBody, Action.MOVE: _MoveBody}
    model = models.get(action, _StatusBody)
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise InvalidMessageError("invalid_fields", field_errors(exc)) from None
    occurred = _ms(body.occurred_at) if body.occurred_at is not None else fallback_ms
    if not_after_ms is not None and occurred > not_after_ms:
        key = "OccurredAt" if body.occurred_at is not None else "time"
        raise _invalid(key, f"{key} is in the future (more than {FUTURE_TOLERANCE_MS // 1000} s ahead of the service)")
    common = {"client_id": body.client_id, "instance": body.instance, "occurred_at": occurred}
    if isinstance(body, _UpdateBody):
        return LifecycleChange(Action.UPDATE, update=_update_of(body), **common)  # type: ignore[arg-type]
    if isinstance(body, _MoveBody):
        return LifecycleChange(Action.MOVE, to_instance=body.to_instance, **common)  # type: ignore[arg-type]
    if action is Action.DEACTIVATE:
        return LifecycleChange(action, update=UserUpdate(status=WrittenStatus.DEACTIVATED), **common)  # type: ignore[arg-type]
    if action is Action.REACTIVATE:
        return LifecycleChange(action, update=UserUpdate(status=WrittenStatus.ACTIVE), **common)  # type: ignore[arg-type]
    return LifecycleChange(action, **common)  # type: ignore[arg-type]


def _update_of(body: _UpdateBody) -> UserUpdate:
    values: dict[str, Any] = {name: getattr(body, name) for name in _PROFILE if name in body.model_fields_set}
    if "gender" in values and values["gender"] is not None:
        values["gender"] = values["gender"].value
    # The management API takes ExternalImageUrl, not ImageUrl: an ImageUrl change is sent as ExternalImageUrl.
    image = body.external_image_url if "external_image_url" in body.model_fields_set else body.image_url
    if image is not None:
        values["external_image_url"] = image
    if body.user_fields is not None:
        if body.user_fields.client_id not in (None, body.client_id):
            raise _invalid("UserFields.ClientId", "ClientId cannot be changed by an update")
        flags = body.user_fields.model_dump(exclude={"client_id"}, exclude_none=True)
        if flags:
            values["user_fields"] = UserUpdateFields(**flags)
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        raise _invalid("", "The update changes nothing: give a profile field or a flag of UserFields")
    return UserUpdate(**values)
