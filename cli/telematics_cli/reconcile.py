"""``reconcile`` (the drift audit, on demand) and ``bulk adopt`` (the users of a bulk's lost chunks).

Both run the reconcile function's library in this process, against the stack's table and the User Service, with
the same admin account (the secret ``AdminCredentialsSecretArn``) and the fleet's Login budget. The audit takes the
same lease as the scheduled one, so the two never run at once: a run in progress with the same options is continued
here to its end; with other options the command says so and exits 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from telematics_cli import output
from telematics_cli.errors import EXIT_DATA, EXIT_OK, CliError, DataError
from telematics_cli.target import Target, secure_user_service_url
from telematics_cli.users import _library_logs_on_stderr, lease_timing
from telematics_reg.budget import DynamoLoginBudget
from telematics_reg.credentials import (
    CredentialsConfigError,
    SecretsManagerCredentials,
    SecretsManagerDeviceTokenKey,
)
from telematics_reg.errors import LoginDeferredError, TelematicsError
from telematics_reg.lifecycle.admin import (
    AdminCredentialsError,
    DynamoAdminSessionStore,
    FleetAdminSession,
    SecretsManagerAdminCredentials,
)
from telematics_reg.outcomes import EventBridgePublisher
from telematics_reg.reconcile.adoption import ChunkAdopter, ChunkAdoption
from telematics_reg.reconcile.audit import DriftAudit
from telematics_reg.reconcile.records import DynamoReconcileRecords
from telematics_reg.store import DynamoTokenStore
from telematics_reg.upstream import UserServiceClient

#: The CLI is never cut off at a timeout, but a page may wait out the client's retries: its lease is longer.
CLI_LEASE_SECONDS = 600


@dataclass(frozen=True)
class ReconcileOptions:
    user_service_url: str | None = None
    credentials_secret_arn: str | None = None
    admin_credentials_secret_arn: str | None = None
    as_json: bool = False
    verbose: bool = False


@dataclass(frozen=True)
class _Parts:
    adopter: ChunkAdopter
    audit: DriftAudit


def _build(target: Target, options: ReconcileOptions) -> _Parts:
    url = options.user_service_url or target.setting("USER_SERVICE_URL", "UserServiceUrl")
    if not url:
        raise CliError(f"no User Service URL in {target.description}: give --user-service-url")
    url = secure_user_service_url(url)
    secret = options.credentials_secret_arn or target.setting("CREDENTIALS_SECRET_ARN", "InstanceCredentialsSecretArn")
    if not secret:
        raise CliError(f"no credentials secret in {target.description}: give --credentials-secret-arn")
    admin_secret = options.admin_credentials_secret_arn or target.setting(
        "ADMIN_CREDENTIALS_SECRET_ARN", "AdminCredentialsSecretArn"
    )
    if not admin_secret:
        raise CliError(
            f"no admin credentials secret in {target.description}: give --admin-credentials-secret-arn "
            "(the stack's parameter AdminCredentialsSecretArn)"
        )
    key_secret = target.setting("DEVICE_TOKEN_KEY_SECRET_ARN", None) or target.outputs.get("DeviceTokenKeySecretArn")
    if not key_secret:
        raise CliError(f"no DeviceToken key secret in {target.description}")
    table = target.output("TokensTableName")
    dynamodb = target.client("dynamodb")
    secrets = target.client("secretsmanager")
    skew = target.int_setting("CLOCK_SKEW_SECONDS", None, 10)
    claim = target.int_setting("CLAIM_SECONDS", None, 120)
    margin = target.int_setting("RECONCILE_WINDOW_MARGIN_SECONDS", None, 60)
    budget_per_minute = target.int_setting("LOGIN_BUDGET_PER_MINUTE", "LoginBudgetPerMinute", 3)
    upstream = UserServiceClient(
        url,
        max_attempts=3,
        login_budget=DynamoLoginBudget(
            dynamodb,
            table_name=table,
            per_minute=budget_per_minute,
            clock_skew_seconds=skew,
            default_block_seconds=target.int_setting("LOGIN_BLOCK_SECONDS", None, 3600),
        ),
    )
    store = DynamoTokenStore(
        dynamodb, table_name=table, shards=target.int_setting("REFRESH_SHARDS", "RefreshIndexShards", 8)
    )
    records = DynamoReconcileRecords(store)
    credentials = SecretsManagerCredentials(secret, max_age=300, client=secrets)
    bus = target.outputs.get("EventBusName") or target.setting("EVENT_BUS_NAME", "SignupEventBusName", "default")
    publisher = EventBridgePublisher(
        target.client("events"),
        bus_name=str(bus),
        source=str(target.setting("OUTCOME_EVENT_SOURCE", None, "telematics.registration")),
    )
    # The fleet's one admin session, as the functions use it: no Login of its own while a live session is stored.
    admin = FleetAdminSession(
        upstream=upstream,
        store=DynamoAdminSessionStore(store),
        credentials=SecretsManagerAdminCredentials(admin_secret, max_age=300, client=secrets),
        timing=lease_timing(target),  # its client makes at most 3 attempts, as the read path's
    )
    adopter = ChunkAdopter(
        upstream=upstream,
        admin=admin,
        records=records,
        credentials=credentials,
        publisher=publisher,
        claim_seconds=claim,
        clock_skew_seconds=skew,
        window_margin_seconds=margin,
        refresh_margin_seconds=target.int_setting("REFRESH_MARGIN_SECONDS", "RefreshMarginSeconds", 900),
        login_interval_seconds=60.0 / max(1, budget_per_minute),
    )
    audit = DriftAudit(
        upstream=upstream,
        admin=admin,
        records=records,
        credentials=credentials,
        device_token_key=SecretsManagerDeviceTokenKey(key_secret, max_age=300, client=secrets),
        publisher=publisher,
        interval_seconds=target.int_setting("RECONCILE_AUDIT_INTERVAL_SECONDS", "DriftAuditIntervalSeconds", 86_400),
        lease_seconds=CLI_LEASE_SECONDS,
        created_margin_seconds=claim + skew + margin,
    )
    return _Parts(adopter, audit)


def _library_errors(what: str, exc: Exception) -> CliError:
    if isinstance(exc, AdminCredentialsError | CredentialsConfigError):
        return CliError(f"{what}: {exc}")
    if isinstance(exc, LoginDeferredError):
        return DataError(f"{what}: no admin Login allowed now ({exc.message}); try again later")
    return DataError(f"{what}: {type(exc).__name__}: {exc}")


def run_reconcile(
    target: Target, options: ReconcileOptions, *, instances: list[str] | None, dry_run: bool, report_only: bool
) -> int:
    """Run the drift audit to its end (or print the last report); exit 1 when it found drift or could not run."""
    with _library_logs_on_stderr(options.verbose):
        parts = _build(target, options)
        if report_only:
            last = parts.audit.last_report()
            if last is None:
                raise DataError("no drift audit has finished yet")
            return _print_report(last, options)
        started = time.monotonic()
        try:
            step = parts.audit.run(force=True, instances=instances or None, dry_run=dry_run)
        except TelematicsError as exc:
            raise _library_errors("drift audit", exc) from None
    if step.report is None or step.status != "finished":
        raise DataError(f"drift audit not run: {step.detail or step.status}")
    summary = step.report.as_dict() | {"Seconds": round(time.monotonic() - started, 1)}
    return _print_report(summary, options)


def _print_report(report: dict[str, Any], options: ReconcileOptions) -> int:
    if options.as_json:
        output.print_json(report)
    else:
        console = output.stdout()
        console.print(
            f"drift audit {report['RunId']} ({'dry run' if report.get('DryRun') else 'applied'}; instances "
            f"{report['Instances']}): {report['Audited']} stored users audited, {report['Pages']} pages, "
            f"{report['UpstreamUsers']} upstream users",
            markup=False,
        )
        table = Table("class", "users", "DeviceTokens (first 50)")
        for name, count in report["Counts"].items():
            table.add_row(name, str(count), " ".join(report["Users"].get(name, [])) or "-")
        console.print(table)
        console.print(
            f"upstream users without ClientId that we do not store (lost bulk chunks): {report['AnonymousUnstored']}",
            markup=False,
        )
    return EXIT_DATA if report.get("Drift") else EXIT_OK


def run_adopt(
    target: Target,
    options: ReconcileOptions,
    *,
    request_id: str,
    instance: str,
    dry_run: bool,
    retry_unmade: bool = False,
) -> int:
    """Adopt (or judge) the lost chunks of one bulk, or with ``retry_unmade`` give back those that made nobody; exit 1
    when one needs an operator or must wait."""
    with _library_logs_on_stderr(options.verbose):
        parts = _build(target, options)
        try:
            if retry_unmade:
                results = parts.adopter.retry_unmade(instance, request_id, dry_run=dry_run)
            else:
                results = parts.adopter.adopt_request(instance, request_id, dry_run=dry_run)
        except LookupError as exc:
            raise DataError(str(exc.args[0])) from None
        except TelematicsError as exc:
            raise _library_errors("adoption", exc) from None
    reopened = any(r.outcome == "reopened" for r in results)
    next_step = (
        f"telematics-reg dlq redrive --queue registration --reason bulk_incomplete --match {request_id}"
        if reopened
        else None
    )
    if options.as_json:
        chunks = [r.as_dict() for r in results]
        report: dict[str, Any] = {"RequestId": request_id, "Instance": instance, "Chunks": chunks}
        if next_step:
            report["Next"] = next_step
        output.print_json(report)
    else:
        _print_adoptions(request_id, results)
        if next_step:
            output.stdout().print(
                f"the reopened chunks are called by the bulk's next delivery: redrive its dead letter ({next_step}), "
                "or send the same bulk again with this RequestId and Quantity",
                markup=False,
            )
    good = {"adopted", "would_adopt", "settled", "reopened", "would_reopen"}
    return EXIT_OK if all(r.outcome in good for r in results) else EXIT_DATA


def _print_adoptions(request_id: str, results: list[ChunkAdoption]) -> None:
    console = output.stdout()
    if not results:
        console.print(f"bulk {request_id}: no lost chunk (none UNKNOWN or abandoned CALLING)", markup=False)
        return
    table = Table("chunk", "outcome", "reason", "window", "candidates")
    for r in results:
        window = " .. ".join(r.window) if r.window else "-"
        table.add_row(f"Chunk{r.index}", r.outcome, r.reason, window, " ".join(r.candidates) or "-")
    console.print(table)
