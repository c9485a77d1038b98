"""``show`` (one user, tokens redacted; ``--upstream``: also as the upstream sees it) and ``token`` (a valid access
token, refreshed under the lease if needed)."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final
from uuid import UUID

from boto3.dynamodb.types import TypeDeserializer
from rich.table import Table

from telematics_cli import output
from telematics_cli.errors import EXIT_DATA, EXIT_OK, CliError, DataError
from telematics_cli.target import Target, secure_user_service_url
from telematics_reg.budget import DynamoLoginBudget
from telematics_reg.credentials import CredentialsConfigError, SecretsManagerCredentials
from telematics_reg.errors import TelematicsError
from telematics_reg.lifecycle.admin import (
    AdminCredentialsError,
    AdminSessionUnavailableError,
    DynamoAdminSessionStore,
    FleetAdminSession,
    SecretsManagerAdminCredentials,
)
from telematics_reg.observability import logger
from telematics_reg.outcomes import EventBridgePublisher
from telematics_reg.refresh import RefreshOutcome, TokenRefresher, TokenUnavailableError
from telematics_reg.store import DynamoTokenStore, client_key, user_pk
from telematics_reg.timing import LeaseTiming, longest_call_seconds
from telematics_reg.upstream import UserServiceClient

_deserializer = TypeDeserializer()
_TOKEN_ATTRIBUTES: Final = ("AccessToken", "RefreshToken")
_TIME_ATTRIBUTES: Final = ("AccessExpiresAt", "ClaimExpiresAt", "LeaseExpiresAt", "RetryAfter", "QueuedUntil")
#: Display order; any other attribute follows.
_ORDER: Final = (
    "DeviceToken", "ClientId", "Instance", "InstanceId", "Status", "Version", "AccessToken", "AccessExpiresAt",
    "RefreshToken", "DueShard", "LastError", "RetryAfter", "ClaimOwner", "ClaimExpiresAt", "LeaseOwner",
    "LeaseExpiresAt", "QueuedUntil", "BulkRequestId", "CreatedAt", "UpdatedAt",
)  # fmt: skip
_HIDDEN: Final = frozenset({"pk", "Kind", "ClientKey"})


@dataclass(frozen=True)
class UserRef:
    client_id: str | None
    instance: str
    device_token: str | None

    def describe(self) -> str:
        if self.device_token:
            return f"DeviceToken {self.device_token}"
        return f"ClientId {self.client_id!r} of instance {self.instance!r}"


def _plain(value: Any) -> Any:
    value = _deserializer.deserialize(value)
    if hasattr(value, "as_integer_ratio") and not isinstance(value, bool | int | float):  # Decimal
        return int(value) if value == int(value) else float(value)
    return value


def find_user(target: Target, ref: UserRef) -> dict[str, Any] | None:
    """The user's item (consistent read), found by DeviceToken or through the ``ByClient`` index."""
    dynamodb = target.client("dynamodb")
    table = target.output("TokensTableName")
    device_token = ref.device_token
    if not device_token:
        assert ref.client_id is not None
        found = dynamodb.query(
            TableName=table,
            IndexName="ByClient",
            KeyConditionExpression="ClientKey = :k",
            ExpressionAttributeValues={":k": {"S": client_key(ref.instance, ref.client_id)}},
            Limit=2,
        ).get("Items", [])
        if not found:
            return None
        if len(found) > 1:
            output.warn(f"more than one item has {ref.describe()}: showing the first")
        device_token = str(found[0]["DeviceToken"]["S"])
    item = dynamodb.get_item(TableName=table, Key={"pk": {"S": user_pk(device_token)}}, ConsistentRead=True).get("Item")
    if not item:
        return None
    return {key: _plain(value) for key, value in item.items()}


def user_view(item: dict[str, Any], *, reveal: bool, now: float) -> dict[str, Any]:
    """The user's attributes for display: known ones first, tokens redacted unless ``reveal``."""
    keys = [k for k in _ORDER if k in item] + sorted(k for k in item if k not in _ORDER and k not in _HIDDEN)
    view: dict[str, Any] = {}
    for key in keys:
        value = item[key]
        if key in _TOKEN_ATTRIBUTES and isinstance(value, str) and not reveal:
            value = output.redact(value)
        view[key] = value
    expires = item.get("AccessExpiresAt")
    if isinstance(expires, int):
        view["AccessExpiresAtIso"] = output.iso(expires)
        view["AccessExpiresInSeconds"] = int(expires - now)
    return view


def run_show(target: Target, ref: UserRef, *, reveal: bool, as_json: bool, upstream: TokenOptions | None = None) -> int:
    """``show``: the stored user; with ``upstream`` (its options), also the user as the upstream's find sees it."""
    item = find_user(target, ref)
    if upstream is not None:
        return _show_with_upstream(target, ref, item, upstream, reveal=reveal, as_json=as_json)
    if item is None:
        raise DataError(f"no user with {ref.describe()} in {target.output('TokensTableName')}")
    now = time.time()
    view = user_view(item, reveal=reveal, now=now)
    if as_json:
        output.print_json(view)
        return EXIT_OK
    _print_stored(item, view, now)
    if not reveal and any(k in item for k in _TOKEN_ATTRIBUTES):
        output.stderr().print("tokens redacted (--reveal-tokens shows them)")
    return EXIT_OK


def _print_stored(item: dict[str, Any], view: dict[str, Any], now: float) -> None:
    table = Table(title=f"User {item.get('DeviceToken', '')}", title_justify="left", show_header=False)
    table.add_column("attribute", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in view.items():
        if key in ("AccessExpiresAtIso", "AccessExpiresInSeconds"):
            continue
        text = output.when(value, now) if key in _TIME_ATTRIBUTES and isinstance(value, int) else str(value)
        if key == "Status":
            style = {"ACTIVE": "green", "NEEDS_RELOGIN": "red", "PENDING": "yellow", "DELETED": "red"}.get(
                str(value), ""
            )
            text = f"[{style}]{text}[/{style}]" if style else text
        else:
            text = output.escape(text)
        table.add_row(key, text)
    output.stdout().print(table)


# ---------------------------------------------------------------------------------------------- show --upstream


def build_admin_session(target: Target, options: TokenOptions) -> tuple[FleetAdminSession, UserServiceClient]:
    """The fleet's one admin session (the JWT and refresh token stored in the tokens table, renewed under its lease,
    Login only when no live refresh token exists and within the fleet's Login budget), as the lifecycle function
    uses it: this tool never starts a session of its own."""
    secret = target.setting("ADMIN_CREDENTIALS_SECRET_ARN", "AdminCredentialsSecretArn")
    if not secret:
        raise CliError(
            f"no admin credentials secret in {target.description} (template parameter AdminCredentialsSecretArn)"
        )
    client = build_user_service(target, options)
    store = DynamoTokenStore(
        target.client("dynamodb"),
        table_name=target.output("TokensTableName"),
        shards=target.int_setting("REFRESH_SHARDS", "RefreshIndexShards", 8),
    )
    admin = FleetAdminSession(
        upstream=client,
        store=DynamoAdminSessionStore(store),
        credentials=SecretsManagerAdminCredentials(secret, max_age=300, client=target.client("secretsmanager")),
        timing=lease_timing(target),
    )
    return admin, client


def find_upstream(target: Target, ref: UserRef, item: dict[str, Any] | None, options: TokenOptions) -> list[Any]:
    """The user as the upstream's find returns it: by DeviceToken (the stored one, or ``--device-token``), else by
    ClientId (across every instance of the company)."""
    device_token = str(item["DeviceToken"]) if item and item.get("DeviceToken") else ref.device_token
    try:
        wanted = UUID(device_token) if device_token else None
    except ValueError:
        raise CliError(f"--device-token {device_token!r} is not a UUID") from None
    with _library_logs_on_stderr(options.verbose):
        admin, client = build_admin_session(target, options)
        try:
            if wanted is not None:
                return list(admin.call(lambda token: client.find_users(token, device_token=wanted)))
            return list(admin.call(lambda token: client.find_users(token, client_id=ref.client_id)))
        except AdminCredentialsError as exc:
            raise CliError(f"admin credentials: {exc}") from None
        except AdminSessionUnavailableError as exc:
            raise DataError(f"no admin session now: {exc}") from None
        except TelematicsError as exc:
            raise DataError(f"find of {ref.describe()} failed upstream: {type(exc).__name__}: {exc}") from None


def differences(item: dict[str, Any] | None, found: list[Any]) -> list[str]:
    """Where the stored user and the upstream's disagree (ids and state only, never profile values)."""
    if item is None:
        return ["not in the table"] if found else []
    erased = str(item.get("Status")) in ("DELETING", "DELETED")
    if not found:
        return [] if erased else ["not found upstream"]
    notes: list[str] = []
    if erased:
        notes.append(f"{item.get('Status')} here, but the upstream still has it")
    for user in found:
        if item.get("InstanceId") and str(user.instance_id or "") != str(item["InstanceId"]):
            notes.append(f"InstanceId upstream {user.instance_id}, stored {item['InstanceId']}")
        if item.get("ClientId") and user.client_id != item["ClientId"]:
            notes.append("ClientId upstream differs from the stored one")
        if not erased and bool(item.get("Deactivated")) == user.active:
            stored = "deactivated" if item.get("Deactivated") else "active"
            notes.append(f"Status upstream {user.status}, stored {stored}")
    return notes


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [pair for key, inner in value.items() for pair in _flatten(inner, f"{prefix}{key}.")]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        return _flatten(value[0], prefix)
    return [(prefix.rstrip("."), value)]


def _show_with_upstream(
    target: Target, ref: UserRef, item: dict[str, Any] | None, options: TokenOptions, *, reveal: bool, as_json: bool
) -> int:
    found = find_upstream(target, ref, item, options)
    now = time.time()
    view = user_view(item, reveal=reveal, now=now) if item is not None else None
    upstream = [user.model_dump(mode="json", by_alias=True, exclude_none=True) for user in found]
    notes = differences(item, found)
    if as_json:
        output.print_json({"Stored": view, "Upstream": upstream, "Differences": notes})
    else:
        if item is not None and view is not None:
            _print_stored(item, view, now)
        else:
            output.stdout().print(f"no user with {output.escape(ref.describe())} in the table")
        if not upstream:
            output.stdout().print("upstream: no such user (find)")
        for user in upstream:
            table = Table(title=f"Upstream {user.get('DeviceToken', '')}", title_justify="left", show_header=False)
            table.add_column("attribute", style="bold")
            table.add_column("value", overflow="fold")
            for key, value in _flatten(user):
                table.add_row(key, output.escape(str(value)))
            output.stdout().print(table)
        for note in notes:
            output.warn(note)
    return EXIT_OK if (item is not None or found) else EXIT_DATA


# ------------------------------------------------------------------------------------------------------- token


@dataclass(frozen=True)
class TokenOptions:
    min_validity: int = 300
    wait: float = 10.0
    user_service_url: str | None = None
    credentials_secret_arn: str | None = None
    as_json: bool = False
    verbose: bool = False


@contextlib.contextmanager
def _library_logs_on_stderr(verbose: bool) -> Iterator[None]:
    """The library logs with Powertools to stdout (Lambda's convention); here stdout carries only the token."""
    handler = logger.registered_handler
    previous_level = logger.log_level
    stream = handler.setStream(sys.stderr) if isinstance(handler, logging.StreamHandler) else None
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(previous_level)
        if stream is not None and isinstance(handler, logging.StreamHandler):
            handler.setStream(stream)


_ATTEMPTS: Final = 3
_MAX_RETRY_AFTER: Final = 30.0


def build_user_service(target: Target, options: TokenOptions) -> UserServiceClient:
    """The User Service client of the read path: its calls bounded, every Login within the fleet's Login budget and
    block (a person's Login through this tool counts with the functions' Logins)."""
    url = options.user_service_url or target.setting("USER_SERVICE_URL", "UserServiceUrl")
    if not url:
        raise CliError(f"no User Service URL in {target.description}: give --user-service-url")
    url = secure_user_service_url(url)
    login_budget = DynamoLoginBudget(
        target.client("dynamodb"),
        table_name=target.output("TokensTableName"),
        per_minute=target.int_setting("LOGIN_BUDGET_PER_MINUTE", "LoginBudgetPerMinute", 3),
        clock_skew_seconds=target.int_setting("CLOCK_SKEW_SECONDS", None, 10),
        default_block_seconds=target.int_setting("LOGIN_BLOCK_SECONDS", None, 3600),
    )
    return UserServiceClient(
        url,
        max_attempts=_ATTEMPTS,
        connect_timeout=3.05,
        read_timeout=10.0,
        max_retry_after=_MAX_RETRY_AFTER,
        login_budget=login_budget,
    )


def lease_timing(target: Target) -> LeaseTiming:
    """The lease arithmetic of this tool's calls (a user's refresh lease, the admin session's), with this target's
    lease and skew.

    Unlike a function, this process is never cut off at a Timeout: only the lease's arithmetic keeps its calls
    from overlapping a worker's. Its own client bounds its calls; the skew allowed is the stack's.
    """
    call_seconds = longest_call_seconds(
        max_attempts=_ATTEMPTS, connect_timeout=3.05, read_timeout=10.0, max_retry_after=_MAX_RETRY_AFTER
    )
    try:
        return LeaseTiming(
            lease_seconds=target.int_setting("REFRESH_LEASE_SECONDS", None, 180),
            call_seconds=call_seconds,
            clock_skew_seconds=target.int_setting("CLOCK_SKEW_SECONDS", None, 10),
        )
    except ValueError as exc:
        raise CliError(f"{target.description}: {exc}") from None


def build_refresher(target: Target, options: TokenOptions) -> TokenRefresher:
    """The read path's service, wired as the refresh worker is, to this target's resources."""
    upstream = build_user_service(target, options)
    secret = options.credentials_secret_arn or target.setting("CREDENTIALS_SECRET_ARN", "InstanceCredentialsSecretArn")
    if not secret:
        raise CliError(f"no credentials secret in {target.description}: give --credentials-secret-arn")
    table = target.output("TokensTableName")
    dynamodb = target.client("dynamodb")
    shards = target.int_setting("REFRESH_SHARDS", "RefreshIndexShards", 8)
    bus = target.outputs.get("EventBusName") or target.setting("EVENT_BUS_NAME", "SignupEventBusName", "default")
    timing = lease_timing(target)
    return TokenRefresher(
        upstream=upstream,
        store=DynamoTokenStore(dynamodb, table_name=table, shards=shards),
        credentials=SecretsManagerCredentials(secret, max_age=300, client=target.client("secretsmanager")),
        publisher=EventBridgePublisher(
            target.client("events"),
            bus_name=str(bus),
            source=str(target.setting("OUTCOME_EVENT_SOURCE", None, "telematics.registration")),
        ),
        margin_seconds=target.int_setting("REFRESH_MARGIN_SECONDS", "RefreshMarginSeconds", 900),
        timing=timing,
    )


def run_token(target: Target, ref: UserRef, options: TokenOptions) -> int:
    with _library_logs_on_stderr(options.verbose):
        refresher = build_refresher(target, options)
        try:
            token = refresher.valid_token(
                device_token=ref.device_token,
                instance=ref.instance,
                client_id=ref.client_id,
                min_validity_seconds=options.min_validity,
                wait_seconds=options.wait,
            )
        except TokenUnavailableError as exc:
            raise DataError(f"no valid token for {ref.describe()}: {exc}") from None
        except CredentialsConfigError as exc:
            raise CliError(f"instance credentials: {exc}") from None
        except TelematicsError as exc:
            raise DataError(f"no valid token for {ref.describe()}: {type(exc).__name__}: {exc}") from None
    if options.as_json:
        output.print_json(
            {"DeviceToken": token.device_token, "AccessToken": token.access_token, "ExpiresAt": token.expires_at}
        )
    else:
        # A JWT has no control characters: one that does is not shown raw to the terminal (nor to $(...)).
        sys.stdout.write(output.clean(token.access_token) + "\n")
        sys.stdout.flush()
    output.stderr().print(
        f"token of {token.device_token}, valid until {output.when(token.expires_at, time.time())}", markup=False
    )
    return EXIT_OK


def run_relogin(target: Target, ref: UserRef, options: TokenOptions) -> int:
    """Log a NEEDS_RELOGIN user back in; exit 1 unless it is ACTIVE again (or had nothing to recover)."""
    with _library_logs_on_stderr(options.verbose):
        refresher = build_refresher(target, options)
        try:
            outcome = refresher.relogin(device_token=ref.device_token, instance=ref.instance, client_id=ref.client_id)
        except TokenUnavailableError as exc:
            raise DataError(f"cannot relogin {ref.describe()}: {exc}") from None
        except CredentialsConfigError as exc:
            raise CliError(f"instance credentials: {exc}") from None
        except TelematicsError as exc:
            raise DataError(f"cannot relogin {ref.describe()}: {type(exc).__name__}: {exc}") from None
    ok = outcome in (RefreshOutcome.LOGGED_IN, RefreshOutcome.FRESH)
    if options.as_json:
        output.print_json({"User": ref.describe(), "Outcome": outcome.value})
    else:
        explanation = {
            RefreshOutcome.LOGGED_IN: "logged in: tokens stored, back in the refresh index",
            RefreshOutcome.FRESH: "not in NEEDS_RELOGIN: nothing to do",
            RefreshOutcome.DEFERRED: (
                "deferred: the fleet's Login budget is spent, Login is blocked after a 429, or the upstream is busy "
                "(see its LastError with show); try again later"
            ),
            RefreshOutcome.NEEDS_RELOGIN: "Login failed again: still NEEDS_RELOGIN (see its LastError with show)",
            RefreshOutcome.LEASE_CONFLICT: "another worker holds the user right now; try again",
            RefreshOutcome.LEASE_LOST: "the lease was taken over before the tokens were stored; try again",
        }.get(outcome, outcome.value)
        output.stderr().print(f"{ref.describe()}: {explanation}", markup=False)
    return EXIT_OK if ok else EXIT_DATA
