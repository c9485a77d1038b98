"""The admin API under ``/_emulator``: plain JSON (no envelope), no auth, never faulted."""

from __future__ import annotations

from typing import Any

from local.emulator.faults import FaultConfigError, FaultInjector
from local.emulator.messages import FieldError, Reply, Request
from local.emulator.state import REFRESH_PATHS, EmulatorState, normalize_device_token


class AdminError(Exception):
    def __init__(self, status: int, message: str, errors: list[FieldError] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = list(errors or [])

    def reply(self) -> Reply:
        return Reply(
            self.status,
            {"error": self.message, "errors": [error.as_json() for error in self.errors]},
        )


def _object(request: Request) -> dict[str, Any]:
    if request.body is None:
        return {}
    if not isinstance(request.body, dict):
        raise AdminError(400, "the body must be a JSON object")
    return request.body


def _device_tokens(body: dict[str, Any]) -> list[str]:
    tokens = body.get("devicetokens")
    if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
        raise AdminError(400, "DeviceTokens must be a list of strings")
    return [normalize_device_token(token) for token in tokens]


class AdminApi:
    def __init__(self, state: EmulatorState, faults: FaultInjector) -> None:
        self._state = state
        self._faults = faults

    def health(self, request: Request) -> Reply:
        return Reply(200, {"ok": True})

    def counters(self, request: Request) -> Reply:
        return Reply(200, self._state.counters())

    def reset(self, request: Request) -> Reply:
        self._faults.clear()
        self._state.reset()
        return Reply(200, {"ok": True})

    def get_faults(self, request: Request) -> Reply:
        return Reply(200, self._faults.snapshot())

    def put_faults(self, request: Request) -> Reply:
        try:
            return Reply(200, self._faults.update(_object(request)))
        except FaultConfigError as exc:
            raise AdminError(400, "invalid faults", exc.errors) from None

    def get_config(self, request: Request) -> Reply:
        return Reply(200, self._state.config.as_json())

    def put_config(self, request: Request) -> Reply:
        body = _object(request)
        changes: dict[str, Any] = {}
        errors: list[FieldError] = []
        known = {"token_lifetime_s", "create_many_enabled", "refresh_paths", "login_limit_per_minute", "login_block_s"}
        for key in sorted(set(body) - known):
            errors.append(FieldError(key, "unknown config setting"))
        if "token_lifetime_s" in body:
            lifetime = body["token_lifetime_s"]
            valid = lifetime is None or (isinstance(lifetime, int) and not isinstance(lifetime, bool) and lifetime >= 1)
            if not valid:
                errors.append(FieldError("token_lifetime_s", "must be an integer >= 1, or null: the documented ones"))
            else:
                changes["token_lifetime_s"] = lifetime
        for key, low in (("login_limit_per_minute", 0), ("login_block_s", 1)):
            if key in body:
                value = body[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    errors.append(FieldError(key, f"must be an integer >= {low}"))
                else:
                    changes[key] = value
        if "create_many_enabled" in body:
            if not isinstance(body["create_many_enabled"], bool):
                errors.append(FieldError("create_many_enabled", "must be true or false"))
            else:
                changes["create_many_enabled"] = body["create_many_enabled"]
        if "refresh_paths" in body:
            paths = body["refresh_paths"]
            if not isinstance(paths, list) or not all(path in REFRESH_PATHS for path in paths):
                errors.append(FieldError("refresh_paths", f"must be a list among {', '.join(REFRESH_PATHS)}"))
            else:
                changes["refresh_paths"] = frozenset(paths)
        if errors:
            raise AdminError(400, "invalid config", errors)
        return Reply(200, self._state.update_config(**changes).as_json())

    def revoke(self, request: Request) -> Reply:
        body = _object(request)
        if "fraction" in body:
            fraction = body["fraction"]
            if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
                raise AdminError(400, "fraction must be a number between 0 and 1")
            return Reply(200, {"revoked": self._state.revoke(fraction=float(fraction))})
        return Reply(200, {"revoked": self._state.revoke(device_tokens=_device_tokens(body))})

    def login_disabled(self, request: Request) -> Reply:
        body = _object(request)
        disabled = body.get("disabled", True)
        if not isinstance(disabled, bool):
            raise AdminError(400, "disabled must be true or false")
        changed = self._state.set_login_disabled(_device_tokens(body), disabled)
        return Reply(200, {"login_disabled" if disabled else "login_enabled": changed})

    def user(self, request: Request) -> Reply:
        (device_token,) = request.path_params
        user = self._state.describe(normalize_device_token(device_token))
        if user is None:
            raise AdminError(404, "user not found")
        return Reply(200, user)

    def users(self, request: Request) -> Reply:
        return Reply(
            200,
            {
                "users": self._state.find(
                    instance_id=request.query.get("instanceid"), client_id=request.query.get("clientid")
                )
            },
        )
