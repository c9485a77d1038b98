"""Builds the real implementations from :class:`ServiceSettings` (once per Lambda container).

Handlers call these at cold start; tests build the same services from fakes or from moto-backed clients.

Each builder imports what it builds when it runs: a handler imports the modules of its own path, and this module
adds none of the others' (the signup function never loads the refresh flow, the sweeper never loads the intake),
which keeps each function's cold start short (bench/results/cold_start.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from telematics_reg.budget import DynamoLoginBudget
    from telematics_reg.continuations import BulkContinuations
    from telematics_reg.credentials import SecretsManagerCredentials, SecretsManagerDeviceTokenKey
    from telematics_reg.intake import RegistrationIntake
    from telematics_reg.lifecycle.admin import FleetAdminSession
    from telematics_reg.lifecycle.intake import LifecycleIntake
    from telematics_reg.outcomes import EventBridgePublisher
    from telematics_reg.reconcile.service import ReconcileOff, Reconciler
    from telematics_reg.refresh import Sweeper, TokenRefresher
    from telematics_reg.settings import ServiceSettings
    from telematics_reg.store import DynamoTokenStore
    from telematics_reg.upstream import UserServiceClient

# Time a bulk chunk needs beyond its upstream call: storing 100 users (batch writes, retried) and its events.
BULK_STORE_SECONDS = 10.0


def aws_client(service: str, settings: ServiceSettings) -> Any:
    """A boto3 client sized for the function's concurrency (the endpoint comes from ``AWS_ENDPOINT_URL``)."""
    import boto3
    from botocore.config import Config

    config = Config(
        max_pool_connections=max(10, settings.upstream_concurrency * 2),
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=3,
        read_timeout=10,
    )
    return boto3.client(service, config=config)


def build_login_budget(settings: ServiceSettings) -> DynamoLoginBudget:
    """The fleet's Login budget and block, shared by every function through the tokens table."""
    from telematics_reg.budget import DynamoLoginBudget

    return DynamoLoginBudget(
        aws_client("dynamodb", settings),
        table_name=settings.tokens_table_name,
        per_minute=settings.login_budget_per_minute,
        clock_skew_seconds=settings.clock_skew_seconds,
        default_block_seconds=settings.login_block_seconds,
    )


def build_user_service(settings: ServiceSettings, *, max_attempts: int | None = None) -> UserServiceClient:
    from telematics_reg.upstream import UserServiceClient

    return UserServiceClient(
        str(settings.user_service_url),
        connect_timeout=settings.upstream_connect_timeout,
        read_timeout=settings.upstream_read_timeout,
        max_attempts=max_attempts or settings.upstream_max_attempts,
        max_retry_after=settings.upstream_max_retry_after,
        max_connections=settings.upstream_concurrency * 2,
        login_budget=build_login_budget(settings),
    )


def build_store(settings: ServiceSettings) -> DynamoTokenStore:
    from telematics_reg.store import DynamoTokenStore

    return DynamoTokenStore(
        aws_client("dynamodb", settings), table_name=settings.tokens_table_name, shards=settings.refresh_shards
    )


def build_publisher(settings: ServiceSettings) -> EventBridgePublisher:
    from telematics_reg.outcomes import EventBridgePublisher

    return EventBridgePublisher(
        aws_client("events", settings), bus_name=settings.event_bus_name, source=settings.outcome_event_source
    )


def build_credentials(settings: ServiceSettings) -> SecretsManagerCredentials:
    from telematics_reg.credentials import SecretsManagerCredentials

    return SecretsManagerCredentials(
        settings.credentials_secret_arn,
        max_age=settings.credentials_cache_seconds,
        client=aws_client("secretsmanager", settings),
    )


def build_device_token_key(settings: ServiceSettings) -> SecretsManagerDeviceTokenKey:
    from telematics_reg.credentials import SecretsManagerDeviceTokenKey

    return SecretsManagerDeviceTokenKey(
        settings.device_token_key_secret_arn,
        max_age=settings.credentials_cache_seconds,
        client=aws_client("secretsmanager", settings),
    )


def build_intake(settings: ServiceSettings, *, continuations: BulkContinuations | None = None) -> RegistrationIntake:
    """Everything the signup function needs (and the queue function, with ``continuations``), wired to AWS and
    the User Service."""
    from telematics_reg.dead_letters import SqsDeadLetters
    from telematics_reg.intake import RegistrationIntake
    from telematics_reg.models import build_models
    from telematics_reg.registration import RegistrationService

    build_models()  # before a batch validates messages on several threads
    publisher = build_publisher(settings)
    service = RegistrationService(
        upstream=build_user_service(settings),
        store=build_store(settings),
        credentials=build_credentials(settings),
        device_token_key=build_device_token_key(settings),
        publisher=publisher,
        claim_seconds=settings.claim_seconds,
        # Bulk chunks: one attempt per call, so the longest call is its connect + read timeouts (plus storing
        # its users), which is what a chunk needs left of the invocation to start; retries are the service's.
        bulk_upstream=build_user_service(settings, max_attempts=1),
        bulk_call_seconds=settings.upstream_connect_timeout + settings.upstream_read_timeout + BULK_STORE_SECONDS,
        bulk_attempts=settings.upstream_max_attempts,
    )
    dead_letters = SqsDeadLetters(aws_client("sqs", settings), queue_url=settings.dead_letter_queue_url)
    return RegistrationIntake(
        service=service, dead_letters=dead_letters, publisher=publisher, continuations=continuations
    )


def build_queue_intake(settings: ServiceSettings) -> RegistrationIntake:
    """The queue function's intake: a bulk that stopped part-way after storing users is sent back onto the
    registration queue to continue, instead of spending one of its receives."""
    from telematics_reg.continuations import SqsBulkContinuations

    continuations = SqsBulkContinuations(
        aws_client("sqs", settings),
        queue_url=settings.registration_queue_url,
        delay_seconds=settings.bulk_continuation_delay_seconds,
    )
    return build_intake(settings, continuations=continuations)


def build_refresher(settings: ServiceSettings) -> TokenRefresher:
    """The refresh worker's and the read path's service."""
    from telematics_reg.models import build_models
    from telematics_reg.refresh import TokenRefresher
    from telematics_reg.store import DynamoTokenStore

    build_models()  # before a batch validates upstream answers on several threads
    dynamodb = aws_client("dynamodb", settings)
    return TokenRefresher(
        upstream=build_user_service(settings),
        store=DynamoTokenStore(dynamodb, table_name=settings.tokens_table_name, shards=settings.refresh_shards),
        credentials=build_credentials(settings),
        publisher=build_publisher(settings),
        margin_seconds=settings.refresh_margin_seconds,
        timing=settings.lease_timing,
    )


def build_sweeper(settings: ServiceSettings) -> Sweeper:
    from telematics_reg.refresh import SqsRefreshJobQueue, Sweeper

    return Sweeper(
        store=build_store(settings),
        queue=SqsRefreshJobQueue(aws_client("sqs", settings), queue_url=settings.refresh_queue_url),
        margin_seconds=settings.refresh_margin_seconds,
        spread_seconds=settings.refresh_spread_seconds,
        lease_seconds=settings.refresh_lease_seconds,
        page_size=settings.sweep_page_size,
    )


def build_admin_session(settings: ServiceSettings) -> FleetAdminSession:
    """The fleet's one admin session (stored in the tokens table, renewed under a lease), for the lifecycle and
    reconcile functions and the CLI."""
    # Imported here: the management models are built only by the functions that use them.
    from telematics_reg.lifecycle.admin import (
        DynamoAdminSessionStore,
        FleetAdminSession,
        SecretsManagerAdminCredentials,
    )

    return FleetAdminSession(
        upstream=build_user_service(settings),
        store=DynamoAdminSessionStore(build_store(settings)),
        credentials=SecretsManagerAdminCredentials(
            settings.admin_credentials_secret_arn,
            max_age=settings.credentials_cache_seconds,
            client=aws_client("secretsmanager", settings),
        ),
        # The refresh lease's arithmetic (the same client, the same skew): a Refresh or Login starts only while the
        # lease has room for the longest call and its commit, so a slow answer is never taken over.
        timing=settings.lease_timing,
    )


def build_lifecycle_intake(settings: ServiceSettings) -> LifecycleIntake:
    """The lifecycle function's intake: the User Management API under the fleet's admin session (stored in the
    tokens table), the order marker and tombstones on the same table, dead letters erased on deletion."""
    from telematics_reg.dead_letters import SqsDeadLetters
    from telematics_reg.lifecycle.erasure import SqsDeadLetterEraser
    from telematics_reg.lifecycle.intake import LifecycleIntake
    from telematics_reg.lifecycle.records import DynamoLifecycleRecords
    from telematics_reg.lifecycle.service import LifecycleService
    from telematics_reg.models import build_models

    build_models()  # with the lifecycle's models imported: before a batch validates changes on several threads
    sqs = aws_client("sqs", settings)
    publisher = build_publisher(settings)
    service = LifecycleService(
        upstream=build_user_service(settings),
        records=DynamoLifecycleRecords(build_store(settings)),
        credentials=build_credentials(settings),
        device_token_key=build_device_token_key(settings),
        admin=build_admin_session(settings),
        publisher=publisher,
        eraser=SqsDeadLetterEraser(
            sqs, queue_urls=[url.strip() for url in settings.erasure_queue_urls.split(",") if url.strip()]
        ),
        lease_seconds=settings.lifecycle_lease_seconds,
        tombstone_retention_seconds=settings.tombstone_retention_days * 86400,
    )
    return LifecycleIntake(
        service=service,
        dead_letters=SqsDeadLetters(sqs, queue_url=settings.dead_letter_queue_url),
        publisher=publisher,
        unknown_user_seconds=settings.unknown_user_seconds,
    )


def build_reconciler(settings: ServiceSettings) -> Reconciler | ReconcileOff:
    """The reconcile function's service: adoption of lost chunks and the drift audit, under the fleet's admin
    session."""
    from telematics_reg.models import build_models
    from telematics_reg.reconcile.adoption import ChunkAdopter
    from telematics_reg.reconcile.audit import DriftAudit
    from telematics_reg.reconcile.records import DynamoReconcileRecords
    from telematics_reg.reconcile.service import ReconcileOff, Reconciler

    if not settings.admin_credentials_secret_arn:
        return ReconcileOff("ADMIN_CREDENTIALS_SECRET_ARN is not set (template parameter AdminCredentialsSecretArn)")
    build_models()  # with the management models imported: before the audit reads pages on several threads
    upstream = build_user_service(settings)
    records = DynamoReconcileRecords(build_store(settings))
    credentials = build_credentials(settings)
    publisher = build_publisher(settings)
    admin = build_admin_session(settings)
    skew = settings.clock_skew_seconds
    adopter = ChunkAdopter(
        upstream=upstream,
        admin=admin,
        records=records,
        credentials=credentials,
        publisher=publisher,
        claim_seconds=settings.claim_seconds,
        clock_skew_seconds=skew,
        window_margin_seconds=settings.reconcile_window_margin_seconds,
        refresh_margin_seconds=settings.refresh_margin_seconds,
        login_interval_seconds=60.0 / max(1, settings.login_budget_per_minute),
        page_size=settings.reconcile_page_size,
    )
    audit = DriftAudit(
        upstream=upstream,
        admin=admin,
        records=records,
        credentials=credentials,
        device_token_key=build_device_token_key(settings),
        publisher=publisher,
        interval_seconds=settings.reconcile_audit_interval_seconds,
        lease_seconds=settings.reconcile_lease_seconds,
        created_margin_seconds=settings.claim_seconds + skew + settings.reconcile_window_margin_seconds,
        page_size=settings.reconcile_page_size,
        workers=settings.upstream_concurrency,
    )
    return Reconciler(adopter=adopter, audit=audit)


class ColdStart[T]:
    """What a function builds from its environment on its first invocation, reused while its container lives.

    Example
    -------
    >>> intake = ColdStart(build_intake)  # doctest: +SKIP
    >>> intake.get().handle(body, message_id="m-1", source="queue")  # doctest: +SKIP
    """

    def __init__(self, build: Callable[[ServiceSettings], T]) -> None:
        self._build = build
        self._built: tuple[ServiceSettings, T] | None = None
        self._lock = threading.Lock()

    def _get(self) -> tuple[ServiceSettings, T]:
        if self._built is None:
            with self._lock:
                if self._built is None:
                    from telematics_reg.settings import ServiceSettings

                    settings = ServiceSettings()
                    self._built = (settings, self._build(settings))
        return self._built

    def get(self) -> T:
        return self._get()[1]

    @property
    def settings(self) -> ServiceSettings:
        return self._get()[0]
