"""Small clients and assertions shared by the emulator's tests."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import jwt
import requests

from local.emulator.testing import EmulatorHandle

TIMEOUT_S = 10.0
PATHS = {"observed": "/v1/Auth/RefreshToken", "spec": "/v1/RefreshToken"}
JWT_CLAIMS = {"sub", "jti", "iat", "nbf", "exp", "DeviceToken", "InstanceId", "iss"}


class Api:
    """The public endpoints, called the way the service's client calls them (pooled session)."""

    def __init__(self, emulator: EmulatorHandle, session: requests.Session | None = None) -> None:
        self.emulator = emulator
        self.session = session or requests.Session()

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = None, **kw: Any) -> Any:
        kw.setdefault("timeout", TIMEOUT_S)
        return self.session.post(self.emulator.url + path, json=body, headers=headers, **kw)

    def create(self, body: Any = None, alias: str = "default", path: str = "/v1/Registration/Create", **kw: Any) -> Any:
        return self.post(path, {} if body is None else body, self.emulator.headers(alias), **kw)

    def created(self, body: Any = None, alias: str = "default") -> dict[str, Any]:
        """Create a user and return its Result (asserting 200)."""
        response = self.create(body, alias)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()["Result"]
        return result

    def create_many(self, body: Any, alias: str = "default", **kw: Any) -> Any:
        return self.post("/v1/Registration/CreateMany", body, self.emulator.headers(alias), **kw)

    def refresh(self, access_token: str, refresh_token: str, path: str = "observed", **kw: Any) -> Any:
        return self.post(PATHS.get(path, path), {"AccessToken": access_token, "RefreshToken": refresh_token}, **kw)

    def login(
        self,
        device_token: str,
        alias: str = "default",
        *,
        password: str | None = None,
        as_object: bool = False,
        instance_id: str | None = None,
        **kw: Any,
    ) -> Any:
        fields = {"Devicetoken": device_token}
        body = {
            "LoginFields": fields if as_object else json.dumps(fields),
            "Password": self.emulator.instance_key(alias) if password is None else password,
        }
        headers = {"InstanceId": instance_id or self.emulator.instance_id(alias)}
        return self.post("/v1/Auth/Login", body, headers, **kw)

    def user_exists(self, alias: str = "default", **params: str) -> Any:
        return self.session.get(
            self.emulator.url + "/v1/Check/UserExists",
            params=params,
            headers=self.emulator.headers(alias),
            timeout=TIMEOUT_S,
        )

    # --- the admin account and the User Management API (user-management-api.md, admin-auth.md) ---

    def admin_login(self, **kw: Any) -> dict[str, Any]:
        """Log the admin in with the documented body and return the Result (asserting 200)."""
        response = self.post("/v1/Auth/Login", self.emulator.admin_login_body(), **kw)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()["Result"]
        return result

    def admin_token(self) -> str:
        token: str = self.admin_login()["AccessToken"]["Token"]
        return token

    @staticmethod
    def bearer(token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token is not None else {}

    def find(self, token: str | None, **params: str) -> Any:
        return self.session.get(
            self.emulator.url + "/v1/Management/users/find",
            params=params,
            headers=self.bearer(token),
            timeout=TIMEOUT_S,
        )

    def page(self, token: str | None, body: Any) -> Any:
        return self.post("/v1/Management/users/GetFilteredPage", body, self.bearer(token))

    def update(self, token: str | None, device_token: str | None, body: Any) -> Any:
        headers = {**self.bearer(token), "Content-Type": "application/json-patch+json"}
        if device_token is not None:
            headers["UserDeviceToken"] = device_token
        return self.session.put(
            self.emulator.url + "/v1/Management/users", data=json.dumps(body), headers=headers, timeout=TIMEOUT_S
        )

    def delete(self, token: str | None, device_token: str) -> Any:
        return self.session.delete(
            f"{self.emulator.url}/v1/Management/users/{device_token}",
            headers=self.bearer(token),
            timeout=TIMEOUT_S,
        )

    def change_instance(self, token: str | None, body: Any) -> Any:
        return self.post("/v1/Management/users/instances/change", body, self.bearer(token))


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def assert_same_shape(actual: Any, expected: Any, where: str = "$") -> None:
    """Field by field: the same keys at every level and the same JSON type for every value."""
    assert json_type(actual) == json_type(expected), f"{where}: {json_type(actual)} != {json_type(expected)}"
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for key, value in expected.items():
            assert_same_shape(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), f"{where}: {len(actual)} items != {len(expected)}"
        for index, (item, expected_item) in enumerate(zip(actual, expected, strict=True)):
            assert_same_shape(item, expected_item, f"{where}[{index}]")


def assert_envelope(response: Any, status: int, *error_keys: str) -> dict[str, Any]:
    """The body is the envelope with ``Status`` == the HTTP status, and exactly these ``Errors[].Key``."""
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    body: dict[str, Any] = response.json()
    assert set(body) == {"Result", "Status", "Title", "Errors"}
    assert body["Status"] == status
    assert isinstance(body["Title"], str)
    assert all(set(error) == {"Key", "Message"} for error in body["Errors"])
    assert [error["Key"] for error in body["Errors"]] == list(error_keys), body["Errors"]
    if status >= 400:
        assert body["Result"] is None
    return body


def is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except (ValueError, AttributeError, TypeError):
        return False


def assert_refresh_token(value: str) -> None:
    assert len(base64.b64decode(value, validate=True)) == 32


def decode(emulator: EmulatorHandle, token: str) -> dict[str, Any]:
    """The claims of an emulator JWT, verified with its secret (expiry not checked)."""
    assert emulator.jwt_secret is not None
    claims: dict[str, Any] = jwt.decode(
        token, emulator.jwt_secret, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False}
    )
    return claims


def assert_token_pair(emulator: EmulatorHandle, result: dict[str, Any], alias: str = "default") -> dict[str, Any]:
    """A Create/Refresh/Login Result: UUID DeviceToken, HS256 JWT with the right claims, base64 refresh token."""
    device_token = result["DeviceToken"]
    assert is_uuid(device_token)
    claims = decode(emulator, result["AccessToken"]["Token"])
    assert jwt.get_unverified_header(result["AccessToken"]["Token"])["alg"] == "HS256"
    assert set(claims) >= JWT_CLAIMS
    assert claims["sub"] == claims["DeviceToken"] == device_token
    assert claims["InstanceId"] == emulator.instance_id(alias)
    assert claims["iss"] == "user-service-emulator"
    assert is_uuid(claims["jti"])
    assert claims["nbf"] == claims["iat"]
    assert result["AccessToken"]["ExpiresIn"] == claims["exp"] - claims["iat"]
    assert_refresh_token(result["RefreshToken"])
    return claims
