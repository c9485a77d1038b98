"""Outcome events published on EventBridge: ids and reasons only, never a token.

Each event is a pydantic model without any token field, so a token cannot reach a published event by
mistake. The app backend subscribes to ``TelematicsUserRegistered`` to hand the DeviceToken to its mobile SDK.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from telematics_reg.observability import logger

Source = Literal["signup", "queue", "bulk", "refresh"]


class OutcomeEvent(BaseModel):
    """Base of the published events; ``detail_type`` is the EventBridge ``detail-type``."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    detail_type: ClassVar[str]

    def detail(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ErrorItem(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)
    key: str = Field(alias="Key")
    message: str = Field(alias="Message")


class UserRegistered(OutcomeEvent):
    detail_type: ClassVar[str] = "TelematicsUserRegistered"
    device_token: str = Field(alias="DeviceToken")
    instance: str = Field(alias="Instance")
    client_id: str | None = Field(None, alias="ClientId")
    bulk_request_id: str | None = Field(None, alias="BulkRequestId")
    duplicate: bool = Field(False, alias="Duplicate")
    has_tokens: bool = Field(True, alias="HasTokens")
    source: Source = Field(alias="Source")


class RegistrationFailed(OutcomeEvent):
    detail_type: ClassVar[str] = "TelematicsRegistrationFailed"
    instance: str | None = Field(None, alias="Instance")
    client_id: str | None = Field(None, alias="ClientId")
    bulk_request_id: str | None = Field(None, alias="BulkRequestId")
    message_id: str | None = Field(None, alias="MessageId")
    reason: str = Field(alias="Reason")
    errors: list[ErrorItem] = Field(default_factory=list, alias="Errors")
    source: Source = Field(alias="Source")


class TokenRefreshFailed(OutcomeEvent):
    detail_type: ClassVar[str] = "TelematicsTokenRefreshFailed"
    device_token: str = Field(alias="DeviceToken")
    instance: str = Field(alias="Instance")
    client_id: str | None = Field(None, alias="ClientId")
    reason: str = Field(alias="Reason")
    source: Source = Field("refresh", alias="Source")


class EventPublisher(Protocol):
    """Publishes outcome events."""

    def publish(self, event: OutcomeEvent) -> None:
        """Publish one event; raises when it could not be put (the caller retries its message)."""
        ...

    def publish_many(self, events: Sequence[OutcomeEvent]) -> None:
        """Publish several events (batched); raises if any could not be put."""
        ...


class PublishError(Exception):
    """EventBridge refused the event."""


class EventBridgePublisher:
    """Puts events on an EventBridge bus with a fixed ``source``."""

    def __init__(self, client: Any, *, bus_name: str, source: str) -> None:
        self._client = client
        self._bus_name = bus_name
        self._source = source

    def publish(self, event: OutcomeEvent) -> None:
        self.publish_many([event])

    def publish_many(self, events: Sequence[OutcomeEvent]) -> None:
        # PutEvents takes at most 10 entries; failed entries are retried a few times before giving up.
        for start in range(0, len(events), 10):
            entries = [
                {
                    "EventBusName": self._bus_name,
                    "Source": self._source,
                    "DetailType": event.detail_type,
                    "Detail": json.dumps(event.detail()),
                }
                for event in events[start : start + 10]
            ]
            batch = events[start : start + 10]
            for _ in range(3):
                response = self._client.put_events(Entries=entries)
                if not response.get("FailedEntryCount"):
                    _log_published(batch)
                    break
                results = response.get("Entries", [])
                failed = [entry for entry, result in zip(entries, results, strict=False) if result.get("ErrorCode")]
                codes = sorted({str(result.get("ErrorCode")) for result in results if result.get("ErrorCode")})
                entries = failed or entries
            else:
                raise PublishError(f"EventBridge refused {len(entries)} events: {', '.join(codes)}")


def _log_published(events: Sequence[OutcomeEvent]) -> None:
    # One line per event, with its ids (an event holds nothing else): the outcomes `telematics-reg trace` shows.
    for event in events:
        detail = event.detail()
        logger.info(
            "outcome event published",
            extra={
                "detail_type": event.detail_type,
                **{_LOG_KEYS[key]: value for key, value in detail.items() if key in _LOG_KEYS},
            },
        )


_LOG_KEYS = {
    "DeviceToken": "device_token",
    "ClientId": "client_id",
    "Instance": "instance",
    "BulkRequestId": "bulk_request_id",
    "MessageId": "message_id",
    "Reason": "reason",
    "Duplicate": "duplicate",
    "Source": "source",
}
