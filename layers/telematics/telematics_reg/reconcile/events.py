"""Events the reconcile flow publishes beside the registration's (ids and reasons only, never a token)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from telematics_reg.outcomes import OutcomeEvent


class UserGone(OutcomeEvent):
    """The drift audit did not find the user upstream: its tokens are no longer kept (status ``GONE``)."""

    detail_type: ClassVar[str] = "TelematicsUserGone"
    device_token: str = Field(alias="DeviceToken")
    instance: str = Field(alias="Instance")
    client_id: str | None = Field(None, alias="ClientId")
    reason: str = Field("not found upstream by the drift audit", alias="Reason")
    source: str = Field("reconcile", alias="Source")
