"""Access tokens (HS256 JWTs signed by the emulator) and opaque refresh tokens."""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from typing import Any

import jwt

ISSUER = "user-service-emulator"
ALGORITHM = "HS256"
ADMIN_ROLE = "Admin"


def new_refresh_token() -> str:
    """An opaque refresh token: base64 of 32 random bytes, like the upstream's."""
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def new_jwt_secret() -> str:
    return secrets.token_urlsafe(48)


class TokenIssuer:
    """Signs and checks the emulator's access tokens."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def access_token(self, device_token: str, instance_id: str, lifetime_s: int) -> tuple[str, int]:
        """A signed JWT for the user and its ``ExpiresIn`` (== ``exp - iat``)."""
        issued_at = int(time.time())
        claims = {
            "sub": device_token,
            "jti": str(uuid.uuid4()),
            "iat": issued_at,
            "nbf": issued_at,
            "exp": issued_at + lifetime_s,
            "DeviceToken": device_token,
            "InstanceId": instance_id,
            "iss": ISSUER,
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM), lifetime_s

    def admin_access_token(self, email: str, lifetime_s: int) -> tuple[str, int]:
        """A signed JWT for the admin account (``Role: Admin``, no DeviceToken) and its ``ExpiresIn``."""
        issued_at = int(time.time())
        claims = {
            "sub": email.lower(),
            "jti": str(uuid.uuid4()),
            "iat": issued_at,
            "nbf": issued_at,
            "exp": issued_at + lifetime_s,
            "Email": email,
            "Role": ADMIN_ROLE,
            "iss": ISSUER,
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM), lifetime_s

    def decode(self, token: str, *, verify_exp: bool) -> dict[str, Any]:
        """The claims of a token signed by us (a user's or the admin's); raises :class:`jwt.PyJWTError` otherwise.

        ``verify_exp=False`` accepts an expired token (Refresh takes one); signature, issuer and the
        ``DeviceToken`` + ``InstanceId`` claims (a user's) or the ``Role`` + ``Email`` claims (the admin's) are
        always checked.
        """
        claims: dict[str, Any] = jwt.decode(
            token,
            self._secret,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"verify_exp": verify_exp, "verify_nbf": verify_exp, "require": ["exp", "iat", "sub"]},
        )
        if is_admin(claims):
            if not isinstance(claims.get("Email"), str):
                raise jwt.InvalidTokenError("admin token lacks the Email claim")
            return claims
        if not isinstance(claims.get("DeviceToken"), str) or not isinstance(claims.get("InstanceId"), str):
            raise jwt.InvalidTokenError("token lacks the DeviceToken or InstanceId claim")
        return claims


def is_admin(claims: dict[str, Any]) -> bool:
    """Whether decoded ``claims`` are an admin token's (else a user's)."""
    return claims.get("Role") == ADMIN_ROLE
