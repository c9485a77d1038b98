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
    from telematics_reg.credentials import SecretsManagerCredentials
    from telematics_reg.intake import RegistrationIntake
    from telematics_reg.outcomes import EventBridgePublisher
    from telematics_reg.refresh import Sweeper, TokenRefresher
    from telematics_reg.settings import ServiceSettings
    from telematics_reg.store import DynamoTokenStore
    from telematics_reg.upstream import UserServiceClient


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


def build_user_service(settings: ServiceSettings) -> UserServiceClient:
    from telematics_reg.upstream import UserServiceClient

    return UserServiceClient(
        str(settings.user_service_url),
        connect_timeout=settings.upstream_connect_timeout,
        read_timeout=settings.upstream_read_timeout,
        max_attempts=settings.upstream_max_attempts,
        max_connections=settings.upstream_concurrency * 2,
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


def build_intake(settings: ServiceSettings) -> RegistrationIntake:
    """Everything the signup and queue functions need, wired to AWS and the User Service."""
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
        publisher=publisher,
        claim_seconds=settings.claim_seconds,
    )
    dead_letters = SqsDeadLetters(aws_client("sqs", settings), queue_url=settings.dead_letter_queue_url)
    return RegistrationIntake(service=service, dead_letters=dead_letters, publisher=publisher)


def build_refresher(settings: ServiceSettings) -> TokenRefresher:
    """The refresh worker's and the read path's service."""
    from telematics_reg.budget import DynamoLoginBudget
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
        budget=DynamoLoginBudget(
            dynamodb, table_name=settings.tokens_table_name, per_minute=settings.login_budget_per_minute
        ),
        margin_seconds=settings.refresh_margin_seconds,
        lease_seconds=settings.refresh_lease_seconds,
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
