"""Routing, fault application and error shaping, independent of sockets (see :mod:`server`)."""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from local.emulator.admin import AdminApi, AdminError
from local.emulator.api import PublicApi
from local.emulator.faults import DROP_AFTER_COMMIT, ERROR, HANG, NO_FAULT, RATE_LIMIT, FaultInjector
from local.emulator.management import ManagementApi
from local.emulator.messages import ApiError, FieldError, Reply, Request, error_envelope
from local.emulator.schema import fold_keys
from local.emulator.state import MANAGEMENT_CALLS, EmulatorState
from local.emulator.tokens import TokenIssuer

Handler = Callable[[Request], Reply]
PARAM = "{}"


@dataclass(frozen=True)
class Route:
    method: str
    segments: tuple[str, ...]
    handler: Handler
    call: str | None = None
    """The fault class of the route (one of :data:`local.emulator.faults.CALLS`), if faultable."""
    enabled: Callable[[], bool] | None = None
    """When it returns False the route answers 404 (switched off by config)."""
    admin: bool = False

    def match(self, segments: tuple[str, ...]) -> tuple[str, ...] | None:
        """The path parameters when ``segments`` (original case) fit this route, case-insensitively."""
        if len(segments) != len(self.segments):
            return None
        params = []
        for pattern, segment in zip(self.segments, segments, strict=True):
            if pattern == PARAM:
                params.append(segment)
            elif pattern != segment.lower():
                return None
        return tuple(params)


def _segments(path: str) -> tuple[str, ...]:
    return tuple(unquote(part) for part in path.split("/") if part)


@dataclass(frozen=True)
class Outcome:
    """The reply to send, or ``drop=True``: close the connection without a byte of answer."""

    reply: Reply | None
    drop: bool = False


class App:
    """The whole emulator minus the sockets: give it a request, get an :class:`Outcome`."""

    def __init__(self, state: EmulatorState, faults: FaultInjector, issuer: TokenIssuer) -> None:
        self.state = state
        self.faults = faults
        public = PublicApi(state, issuer)
        self._public = public
        management = ManagementApi(state, issuer)
        admin = AdminApi(state, faults)

        def refresh_enabled(kind: str) -> Callable[[], bool]:
            return lambda: kind in state.config.refresh_paths

        def public_route(method: str, path: str, handler: Handler, **options: Any) -> Route:
            return Route(method, tuple(path.lower().split("/")[1:]), handler, **options)

        def admin_route(method: str, path: str, handler: Handler) -> Route:
            return Route(method, ("_emulator", *path.lower().split("/")[1:]), handler, admin=True)

        self.routes = (
            public_route("POST", "/v1/Registration/Create", public.create, call="create"),
            public_route(
                "POST",
                "/v1/Registration/CreateMany",
                public.create_many,
                call="create_many",
                enabled=lambda: state.config.create_many_enabled,
            ),
            public_route(
                "POST", "/v1/Auth/RefreshToken", public.refresh, call="refresh", enabled=refresh_enabled("observed")
            ),
            public_route("POST", "/v1/RefreshToken", public.refresh, call="refresh", enabled=refresh_enabled("spec")),
            public_route("POST", "/v1/Auth/Login", public.login, call="login"),
            public_route("GET", "/v1/Check/UserExists", public.user_exists),
            public_route("GET", "/v1/Management/users/find", management.find, call="find"),
            public_route(
                "POST", "/v1/Management/users/GetFilteredPage", management.get_filtered_page, call="get_filtered_page"
            ),
            public_route("PUT", "/v1/Management/users", management.update, call="update"),
            public_route("DELETE", "/v1/Management/users/{}", management.delete, call="delete"),
            public_route(
                "POST", "/v1/Management/users/instances/change", management.change_instance, call="change_instance"
            ),
            admin_route("GET", "/health", admin.health),
            admin_route("GET", "/counters", admin.counters),
            admin_route("POST", "/reset", admin.reset),
            admin_route("GET", "/faults", admin.get_faults),
            admin_route("PUT", "/faults", admin.put_faults),
            admin_route("GET", "/config", admin.get_config),
            admin_route("PUT", "/config", admin.put_config),
            admin_route("POST", "/revoke", admin.revoke),
            admin_route("POST", "/login-disabled", admin.login_disabled),
            admin_route("GET", "/users", admin.users),
            admin_route("GET", "/users/{}", admin.user),
        )

    def handle(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        client_gone: Callable[[], bool] = lambda: False,
        client_address: str = "127.0.0.1",
    ) -> Outcome:
        try:
            url = urlsplit(target)
        except ValueError as exc:  # e.g. "//[": urlsplit reads a netloc with a broken IPv6 address
            return Outcome(error_envelope(ApiError.single(400, "Path", f"Invalid request target: {exc}")))
        segments = _segments(url.path)
        is_admin = bool(segments) and segments[0].lower() == "_emulator"
        if not is_admin:
            self.state.count_request()
        candidates = [(route, params) for route in self.routes if (params := route.match(segments)) is not None]
        chosen = next(((route, params) for route, params in candidates if route.method == method), None)
        if chosen is None:
            return Outcome(self._no_route(is_admin, method, url.path, sorted({r.method for r, _ in candidates})))
        route, params = chosen
        if route.enabled is not None and not route.enabled():
            return Outcome(self._not_found(f"{method} {url.path} is switched off"))
        try:
            parsed = _parse_json(body)
        except ValueError as exc:
            if route.admin:
                return Outcome(AdminError(400, str(exc)).reply())
            return Outcome(error_envelope(ApiError.single(400, "Body", str(exc))))
        request = Request(
            method=method,
            path=url.path,
            query={key.lower(): value for key, value in reversed(parse_qsl(url.query, keep_blank_values=True))},
            headers={key.lower(): value for key, value in headers.items()},
            body=parsed,
            path_params=params,
        )
        if route.admin:
            return Outcome(self._run_admin(route, request))
        if route.call == "login" and (refusal := self.state.admit_login(client_address)) is not None:
            # Before faults, as the vendor's limiter stands in front of its service: a refused Login did nothing.
            error = ApiError(
                429,
                [FieldError("Login", f"Too many Login calls from this address: blocked for {refusal.retry_after_s} s")],
                headers={"Retry-After": str(refusal.retry_after_s)},
            )
            return Outcome(error_envelope(error))
        if route.call in MANAGEMENT_CALLS:
            self.state.count_management(route.call)  # every call received, faulted or not
        self.state.enter_call()
        try:
            return self._run_public(route, request, client_gone)
        finally:
            self.state.leave_call()

    def _run_admin(self, route: Route, request: Request) -> Reply:
        try:
            return route.handler(request)
        except AdminError as exc:
            return exc.reply()
        except Exception as exc:  # noqa: BLE001 - the admin API must answer, whatever went wrong
            traceback.print_exc(file=sys.stderr)
            return AdminError(500, f"internal error: {exc!r}").reply()

    def _run_public(self, route: Route, request: Request, client_gone: Callable[[], bool]) -> Outcome:
        decision = self.faults.decide(route.call) if route.call is not None else NO_FAULT
        call = self._public.call_name(route.call, request) if route.call is not None and decision.fault else None
        if decision.latency_s > 0:
            time.sleep(decision.latency_s)
        if decision.fault == ERROR:
            self.state.count_fault(ERROR, call)
            return Outcome(error_envelope(ApiError.single(decision.status, "Fault", "Injected server error")))
        if decision.fault == RATE_LIMIT:
            self.state.count_fault(RATE_LIMIT, call)
            error = ApiError(
                429,
                [FieldError("Fault", "Injected rate limit")],
                headers={"Retry-After": decision.retry_after_header},
            )
            return Outcome(error_envelope(error))
        if decision.fault == HANG:
            self.state.count_fault(HANG, call)
            time.sleep(decision.hang_s)
            if decision.abandon_if_gone and client_gone():
                return Outcome(None, drop=True)
        try:
            reply = route.handler(request)
        except ApiError as exc:
            reply = error_envelope(exc)
        except Exception:  # noqa: BLE001 - a bug must become a 500 envelope, not a dead connection
            traceback.print_exc(file=sys.stderr)
            reply = error_envelope(ApiError.single(500, "Server", "Internal error in the emulator"))
        if decision.fault == DROP_AFTER_COMMIT:
            self.state.count_fault(DROP_AFTER_COMMIT, call)
            return Outcome(None, drop=True)
        return Outcome(reply)

    @staticmethod
    def _not_found(message: str) -> Reply:
        return error_envelope(ApiError.single(404, "Route", message))

    def _no_route(self, is_admin: bool, method: str, path: str, allowed: list[str]) -> Reply:
        if allowed:
            reply = (
                AdminError(405, f"{method} not allowed on {path}").reply()
                if is_admin
                else error_envelope(ApiError.single(405, "Method", f"{method} is not allowed on {path}"))
            )
            reply.headers["Allow"] = ", ".join(allowed)
            return reply
        if is_admin:
            return AdminError(404, f"no admin route {method} {path}").reply()
        return self._not_found(f"No route for {method} {path}")


def _parse_json(body: bytes) -> Any:
    """The body's JSON with object keys lower-cased; ``None`` when the body is empty."""
    if not body.strip():
        return None
    try:
        return fold_keys(json.loads(body))
    except UnicodeDecodeError:
        raise ValueError("The request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"The request body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:  # nested deeper than the parser (or fold_keys) recurses: a client error, not ours
        raise ValueError("The request body is nested too deeply") from None
