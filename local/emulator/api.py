"""The public endpoints of the User Service (UPSTREAM.md), over :class:`EmulatorState`."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import jwt

from local.emulator.messages import ApiError, FieldError, Reply, Request, envelope
from local.emulator.schema import CREATE_FIELDS, CREATE_MANY_FIELDS, bind, fold_keys
from local.emulator.state import EmulatorState, Instance, NewUser, normalize_device_token
from local.emulator.tokens import TokenIssuer, is_admin


def _object_body(request: Request) -> dict[str, Any]:
    """The body as an object: an empty body is ``{}``; any other JSON type is a 400."""
    if request.body is None:
        return {}
    if not isinstance(request.body, dict):
        raise ApiError.single(400, "Body", "The request body must be a JSON object")
    return request.body


def _bind_or_422(body: dict[str, Any], fields: Any) -> dict[str, Any]:
    values, errors = bind(body, fields)
    if errors:
        raise ApiError(422, errors, title="One or more validation errors occurred.")
    return values


class PublicApi:
    """One method per upstream call; each takes the parsed :class:`Request` and returns a :class:`Reply`."""

    def __init__(self, state: EmulatorState, issuer: TokenIssuer) -> None:
        self._state = state
        self._issuer = issuer

    def _instance(self, request: Request) -> Instance:
        return self._state.authenticate(request.header("InstanceId"), request.header("InstanceKey"))

    # ------------------------------------------------------------------ registration

    def create(self, request: Request) -> Reply:
        instance = self._instance(request)
        values = _bind_or_422(_object_body(request), CREATE_FIELDS)
        new = NewUser(
            profile={
                name: value
                for name, value in values.items()
                if name not in {"UserFields", "Status", "CreateAccessToken", "CustomToken"}
            },
            user_fields=values.get("UserFields", {}),
            status=values.get("Status", "Active"),
            custom_token=values.get("CustomToken"),
            create_access_token=values.get("CreateAccessToken", True),
        )
        return envelope(200, self._state.create(instance, new))

    def create_many(self, request: Request) -> Reply:
        instance = self._instance(request)
        values = _bind_or_422(_object_body(request), CREATE_MANY_FIELDS)
        results = self._state.create_many(
            instance,
            values["Quantity"],
            values.get("CreateAccessToken", True),
            values.get("CustomFields", {}),
        )
        return envelope(200, {"Results": results})

    # ------------------------------------------------------------------ tokens

    def refresh(self, request: Request) -> Reply:
        body = _object_body(request)
        errors = [
            FieldError(name, f"The {name} field is required.")
            for name in ("AccessToken", "RefreshToken")
            if not isinstance(body.get(name.lower()), str) or not body[name.lower()]
        ]
        if errors:
            raise ApiError(400, errors)
        try:
            claims = self._issuer.decode(body["accesstoken"], verify_exp=False)
        except jwt.PyJWTError:
            raise ApiError.single(400, "AccessToken", "The access token is not valid") from None
        if is_admin(claims):
            return envelope(200, self._state.admin_refresh(body["refreshtoken"]))
        return envelope(200, self._state.refresh(claims, body["refreshtoken"]))

    def call_name(self, call: str, request: Request) -> str:
        """``call`` as the counters name it: ``admin_login`` and ``admin_refresh`` for the admin's Login and Refresh
        (the same routes as the users'), told apart by the body as :meth:`login` and :meth:`refresh` do."""
        body = request.body if isinstance(request.body, dict) else {}
        if call == "login":
            with contextlib.suppress(ApiError):
                email = self._login_fields(body).get("email")
                if isinstance(email, str) and email:
                    return "admin_login"
        if call == "refresh" and isinstance(body.get("accesstoken"), str):
            with contextlib.suppress(jwt.PyJWTError):
                if is_admin(self._issuer.decode(body["accesstoken"], verify_exp=False)):
                    return "admin_refresh"
        return call

    def login(self, request: Request) -> Reply:
        """A user's Login (``LoginFields`` ``{"Devicetoken"}``, the InstanceKey as password, ``InstanceId``
        header) or the admin's (``LoginFields`` ``{"email"}``, the admin password, no instance header)."""
        try:
            body = _object_body(request)
            fields = self._login_fields(body)
        except ApiError:
            self._state.count_failed_login()
            raise
        password = body.get("password")
        password = password if isinstance(password, str) else None
        email = fields.get("email")
        if isinstance(email, str) and email:
            return envelope(200, self._state.admin_login(email, password))
        device_token = fields.get("devicetoken")
        if not isinstance(device_token, str) or not device_token:
            self._state.count_failed_login()
            raise ApiError.single(400, "LoginFields.DeviceToken", "The DeviceToken (or an admin's email) is required.")
        result = self._state.login(request.header("InstanceId"), password, normalize_device_token(device_token))
        return envelope(200, result)

    @staticmethod
    def _login_fields(body: dict[str, Any]) -> dict[str, Any]:
        """``LoginFields`` (a JSON string, or an object) with its keys lower-cased."""
        fields = body.get("loginfields")
        if isinstance(fields, str):
            try:
                fields = fold_keys(json.loads(fields))
            except (ValueError, RecursionError):  # not JSON, an over-long number, or nested too deeply
                raise ApiError.single(400, "LoginFields", "LoginFields is not valid JSON") from None
        if not isinstance(fields, dict):
            raise ApiError.single(400, "LoginFields", "LoginFields must be an object or a JSON string of one")
        return fields

    # ------------------------------------------------------------------ users

    def user_exists(self, request: Request) -> Reply:
        instance = self._instance(request)
        client_id, email, phone = (request.query.get(name) for name in ("clientid", "email", "phone"))
        if client_id is None and email is None and phone is None:
            raise ApiError.single(400, "ClientId", "One of ClientId, Email or Phone is required")
        exists = self._state.user_exists(instance, client_id=client_id, email=email, phone=phone)
        return envelope(200, {"UserExists": exists})
