"""The service's secrets, each from one Secrets Manager secret, cached by Powertools for ``max_age`` seconds.

* Instance credentials: aliases mapped to ``InstanceId`` + ``InstanceKey``; the secret's value is JSON:
  ``{"default": {"InstanceId": "...", "InstanceKey": "..."}, "fleet-eu": {...}}``.
* The DeviceToken key: the HMAC key our deterministic DeviceTokens are derived with (see
  :func:`telematics_reg.registration.device_token_for`); the secret's value is the key itself, a string.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
from collections.abc import Mapping
from typing import Any, Final, Protocol

from aws_lambda_powertools.utilities import parameters
from pydantic import ValidationError

from telematics_reg.errors import FieldError, TelematicsError, UnknownInstanceError
from telematics_reg.models import InstanceCredentials


class CredentialsConfigError(TelematicsError):
    """The credentials secret is missing, unreadable or not in the documented format (never shows its value)."""


class CredentialsProvider(Protocol):
    """Finds the credentials of an instance alias."""

    def get(self, alias: str) -> InstanceCredentials:
        """Credentials of ``alias``; raises :class:`UnknownInstanceError` when the secret has no such alias."""
        ...

    def invalidate(self) -> None:
        """Forget cached credentials (after the upstream answered 401: the secret may have been rotated)."""
        ...


def parse_credentials(document: Mapping[str, Any]) -> dict[str, InstanceCredentials | CredentialsConfigError]:
    """Validate the secret's JSON alias by alias; errors name the alias and field at fault, never a value.

    An invalid entry (e.g. an InstanceKey pasted with a trailing newline) becomes the error that its own
    messages get; the other aliases keep working.

    Example
    -------
    >>> creds = parse_credentials({"default": {"InstanceId": "3c1c8fd7-4133-404a-82e9-93a015d85362",
    ...                                        "InstanceKey": "1b7cc25f-329e-4482-9dd1-0bb07c0c794b"},
    ...                            "broken": {"InstanceId": "3c1c8fd7-4133-404a-82e9-93a015d85362",
    ...                                       "InstanceKey": "1b7cc25f-329e-4482-9dd1-0bb07c0c794b\\n"}})
    >>> str(creds["default"].instance_id)
    '3c1c8fd7-4133-404a-82e9-93a015d85362'
    >>> str(creds["broken"])
    "credentials secret: instance 'broken' is invalid (InstanceKey)"
    """
    if not isinstance(document, Mapping) or not document:
        raise CredentialsConfigError("credentials secret must be a non-empty JSON object of instance aliases")
    parsed: dict[str, InstanceCredentials | CredentialsConfigError] = {}
    for alias, value in document.items():
        try:
            parsed[str(alias)] = InstanceCredentials.model_validate(value)
        except ValidationError as exc:
            fields = ", ".join(".".join(str(p) for p in err["loc"]) or "value" for err in exc.errors())
            parsed[str(alias)] = CredentialsConfigError(f"credentials secret: instance {alias!r} is invalid ({fields})")
    return parsed


def _unknown(alias: str) -> UnknownInstanceError:
    # Names only the alias the message itself gave: this text is published (TelematicsRegistrationFailed) and
    # stored (dead letters), so it must never list the other instances the secret holds.
    return UnknownInstanceError("unknown_instance", [FieldError("Instance", f"no credentials for instance {alias!r}")])


class SecretsManagerCredentials:
    """Credentials from the Secrets Manager secret ``secret_id``, cached by Powertools for ``max_age`` s.

    One provider (one boto3 client) per instance, and a lock around fetching: the queue function reads the
    credentials from several threads at once, and on a cold start they must not each fetch the secret (and
    each build a client).
    """

    def __init__(self, secret_id: str, *, max_age: int = 300, client: Any = None) -> None:
        if not secret_id:
            raise CredentialsConfigError("CREDENTIALS_SECRET_ARN is not set")
        self._secret_id = secret_id
        self._max_age = max_age
        self._provider = parameters.SecretsProvider(boto3_client=client) if client is not None else None
        self._force_fetch = False
        self._parsed: tuple[str, dict[str, InstanceCredentials | CredentialsConfigError]] | None = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, InstanceCredentials | CredentialsConfigError]:
        with self._lock:
            if self._provider is None:
                self._provider = parameters.SecretsProvider()
            try:
                raw = self._provider.get(self._secret_id, max_age=self._max_age, force_fetch=self._force_fetch)
            except parameters.exceptions.GetParameterError as exc:
                raise CredentialsConfigError(f"cannot read credentials secret: {type(exc).__name__}") from None
            self._force_fetch = False
            text = raw if isinstance(raw, str) else bytes(raw).decode(errors="replace")  # type: ignore[arg-type]
            if self._parsed is not None and self._parsed[0] == text:
                return self._parsed[1]
            try:
                document = json.loads(text)
            except ValueError:
                raise CredentialsConfigError("credentials secret is not valid JSON") from None
            parsed = parse_credentials(document)
            self._parsed = (text, parsed)
            return parsed

    def get(self, alias: str) -> InstanceCredentials:
        found = self._load().get(alias)
        if found is None:
            raise _unknown(alias)
        if isinstance(found, CredentialsConfigError):
            raise CredentialsConfigError(str(found))  # a fresh exception: the cached one must not gather tracebacks
        return found

    def invalidate(self) -> None:
        with self._lock:
            self._force_fetch = True

    def aliases(self) -> list[str]:
        """Every alias of the secret (the reconcile flow audits each instance)."""
        return sorted(self._load())


class StaticCredentials:
    """Fixed credentials (tests, and the local stack when no secret is wanted)."""

    def __init__(self, credentials: Mapping[str, InstanceCredentials | Mapping[str, Any]]) -> None:
        self._known = {
            alias: value if isinstance(value, InstanceCredentials) else InstanceCredentials.model_validate(value)
            for alias, value in credentials.items()
        }
        self.invalidations = 0

    def get(self, alias: str) -> InstanceCredentials:
        if alias not in self._known:
            raise _unknown(alias)
        return self._known[alias]

    def invalidate(self) -> None:
        self.invalidations += 1

    def aliases(self) -> list[str]:
        return sorted(self._known)


# --- the DeviceToken key -----------------------------------------------------------------------------------

# Visible ASCII only: a key pasted with a trailing newline must be refused, not silently become another key
# (which would give every new user a DeviceToken nobody can recompute).
_KEY_TEXT: Final = re.compile(r"[\x21-\x7e]{32,4096}")


class DeviceTokenKey:
    """The HMAC-SHA256 key DeviceTokens are derived with; its value never shows in ``repr`` or ``str``.

    Parameters
    ----------
    material
        32 to 4096 visible ASCII characters (the stack generates 64 letters and digits: about 380 bits).

    Example
    -------
    >>> key = DeviceTokenKey("k" * 32)
    >>> key
    DeviceTokenKey(***)
    >>> len(key.digest(b"message"))
    32
    """

    __slots__ = ("_material",)

    def __init__(self, material: str) -> None:
        if not isinstance(material, str) or _KEY_TEXT.fullmatch(material) is None:
            raise CredentialsConfigError(
                "DeviceToken key secret must be 32 to 4096 visible ASCII characters (no spaces or line breaks)"
            )
        self._material = material.encode("ascii")

    def digest(self, message: bytes) -> bytes:
        """HMAC-SHA256 of ``message`` under this key."""
        return hmac.new(self._material, message, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "DeviceTokenKey(***)"

    __str__ = __repr__


class DeviceTokenKeyProvider(Protocol):
    """Finds the DeviceToken key."""

    def get(self) -> DeviceTokenKey:
        """The key; raises :class:`CredentialsConfigError` when its secret is missing or malformed."""
        ...


class SecretsManagerDeviceTokenKey:
    """The DeviceToken key from the Secrets Manager secret ``secret_id``, cached by Powertools for ``max_age`` s.

    Like :class:`SecretsManagerCredentials`: one boto3 client, and a lock so that the queue function's threads
    do not each fetch the secret on a cold start.
    """

    def __init__(self, secret_id: str, *, max_age: int = 300, client: Any = None) -> None:
        if not secret_id:
            raise CredentialsConfigError("DEVICE_TOKEN_KEY_SECRET_ARN is not set")
        self._secret_id = secret_id
        self._max_age = max_age
        self._provider = parameters.SecretsProvider(boto3_client=client) if client is not None else None
        self._parsed: tuple[str, DeviceTokenKey] | None = None
        self._lock = threading.Lock()

    def get(self) -> DeviceTokenKey:
        with self._lock:
            if self._provider is None:
                self._provider = parameters.SecretsProvider()
            try:
                raw = self._provider.get(self._secret_id, max_age=self._max_age)
            except parameters.exceptions.GetParameterError as exc:
                raise CredentialsConfigError(f"cannot read DeviceToken key secret: {type(exc).__name__}") from None
            if not isinstance(raw, str):
                raise CredentialsConfigError("DeviceToken key secret must be a SecretString, not binary")
            if self._parsed is None or self._parsed[0] != raw:
                self._parsed = (raw, DeviceTokenKey(raw))
            return self._parsed[1]
