"""Outcome events of the lifecycle: ids, times and reasons only (no profile field, no token)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from telematics_reg.outcomes import ErrorItem, OutcomeEvent


class _Applied(OutcomeEvent):
    device_token: str = Field(alias="DeviceToken")
    instance: str = Field(alias="Instance")
    client_id: str = Field(alias="ClientId")
    occurred_at: int = Field(alias="OccurredAt")  # epoch ms


class UserUpdated(_Applied):
    detail_type: ClassVar[str] = "TelematicsUserUpdated"
    #: The names of the fields changed (never their values).
    fields: list[str] = Field(default_factory=list, alias="Fields")


class UserDeactivated(_Applied):
    detail_type: ClassVar[str] = "TelematicsUserDeactivated"


class UserReactivated(_Applied):
    detail_type: ClassVar[str] = "TelematicsUserReactivated"


class UserDeleted(_Applied):
    detail_type: ClassVar[str] = "TelematicsUserDeleted"
    #: False when the user was never registered here (the tombstone stops a late registration); null when
    #: ``Duplicate``.
    was_registered: bool | None = Field(True, alias="WasRegistered")
    #: Announced again by a redelivered deletion (at least once: the first delivery may have been cut off, or its
    #: erasure of dead letters retried, after the user was deleted and before it announced it).
    duplicate: bool = Field(False, alias="Duplicate")


class UserMoved(_Applied):
    detail_type: ClassVar[str] = "TelematicsUserMoved"
    from_instance: str = Field(alias="FromInstance")


class LifecycleFailed(OutcomeEvent):
    """A change not applied: dead-lettered (bad input, ``unknown_user``, rejected upstream) or dropped (``stale``,
    ``duplicate``, ``user_deleted``); ``DeadLettered`` tells which."""

    detail_type: ClassVar[str] = "TelematicsLifecycleFailed"
    action: str | None = Field(None, alias="Action")
    instance: str | None = Field(None, alias="Instance")
    client_id: str | None = Field(None, alias="ClientId")
    device_token: str | None = Field(None, alias="DeviceToken")
    occurred_at: int | None = Field(None, alias="OccurredAt")
    #: For ``stale``: when the change already applied occurred (epoch ms).
    applied_at: int | None = Field(None, alias="AppliedAt")
    message_id: str | None = Field(None, alias="MessageId")
    reason: str = Field(alias="Reason")
    dead_lettered: bool = Field(alias="DeadLettered")
    errors: list[ErrorItem] = Field(default_factory=list, alias="Errors")
