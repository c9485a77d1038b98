"""Request and reply values shared by the router, the public API and the admin API."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any


@dataclass(frozen=True)
class FieldError:
    """One entry of the envelope's ``Errors[]``: ``Key`` names the field (PascalCase, dotted when nested)."""

    key: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"Key": self.key, "Message": self.message}


class ApiError(Exception):
    """A handled failure of a public call; becomes an envelope with ``Status`` = the HTTP status."""

    def __init__(
        self,
        status: int,
        errors: list[FieldError] | None = None,
        *,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status}: {errors}")
        self.status = status
        self.errors = list(errors or [])
        self.title = title
        self.headers = dict(headers or {})

    @classmethod
    def single(cls, status: int, key: str, message: str) -> ApiError:
        return cls(status, [FieldError(key, message)])


def status_phrase(status: int) -> str:
    """The reason phrase of ``status`` (``"Error"`` for codes :class:`HTTPStatus` does not know)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


@dataclass(frozen=True)
class Request:
    """A parsed HTTP request. ``body`` is the JSON body with every object key lower-cased (``None`` if empty)."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: Any
    path_params: tuple[str, ...] = ()

    def header(self, name: str) -> str | None:
        """A header by case-insensitive name, stripped; ``None`` when absent or blank."""
        value = self.headers.get(name.lower())
        if value is None:
            return None
        value = value.strip()
        return value or None


@dataclass
class Reply:
    """What to send back: ``payload`` is sent as is (admin API) or wrapped in the envelope (public API)."""

    status: int = 200
    payload: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def envelope(status: int, result: Any = None, errors: list[FieldError] | None = None, title: str = "") -> Reply:
    """The upstream's envelope: ``{"Result", "Status", "Title", "Errors"}``; ``Status`` mirrors the HTTP code."""
    return Reply(
        status=status,
        payload={
            "Result": result,
            "Status": status,
            "Title": title,
            "Errors": [error.as_json() for error in errors or []],
        },
    )


def error_envelope(error: ApiError) -> Reply:
    reply = envelope(
        error.status,
        None,
        error.errors,
        title=error.title if error.title is not None else status_phrase(error.status),
    )
    reply.headers.update(error.headers)
    return reply
