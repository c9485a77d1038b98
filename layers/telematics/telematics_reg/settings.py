"""The one place configuration is read: environment variables set by template.yaml, validated once.

Logic never touches ``os.environ``; each handler builds :class:`ServiceSettings` once, on its first invocation,
and passes what each piece needs.
"""

from __future__ import annotations

from pydantic import Field, HttpUrl
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Configuration of every function, from the environment template.yaml gives it.

    Example
    -------
    >>> import os
    >>> os.environ |= {"USER_SERVICE_URL": "http://127.0.0.1:8081", "TOKENS_TABLE_NAME": "tokens"}
    >>> ServiceSettings().tokens_table_name
    'tokens'
    """

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    user_service_url: HttpUrl = Field(HttpUrl("https://user.telematicssdk.com"))
    credentials_secret_arn: str = ""
    tokens_table_name: str = ""
    event_bus_name: str = "default"
    outcome_event_source: str = "telematics.registration"
    dead_letter_queue_url: str = ""
    # The queue function's own source queue: a bulk that stopped part-way is sent back there to continue.
    registration_queue_url: str = ""
    bulk_continuation_delay_seconds: int = Field(5, ge=0, le=900)
    refresh_queue_url: str = ""

    # Upstream protection: how many upstream calls one invocation keeps in flight, and per-call timeouts.
    upstream_concurrency: int = Field(10, ge=1, le=64)
    upstream_connect_timeout: float = Field(3.05, gt=0)
    upstream_read_timeout: float = Field(10.0, gt=0)
    upstream_max_attempts: int = Field(4, ge=1, le=10)

    credentials_cache_seconds: int = Field(300, ge=0)
    # A registration claim outlives one invocation so a crashed attempt is taken over by the next delivery.
    claim_seconds: int = Field(120, ge=10)

    # Token maintenance.
    refresh_margin_seconds: int = Field(900, ge=1)
    refresh_shards: int = Field(8, ge=1, le=256)
    refresh_lease_seconds: int = Field(60, ge=5)
    refresh_spread_seconds: int = Field(60, ge=0, le=900)
    sweep_page_size: int = Field(500, ge=1, le=1000)
    login_budget_per_minute: int = Field(5, ge=0)

    # User lifecycle (flow 5).
    admin_credentials_secret_arn: str = ""
    # The user's lease while a change is applied: above the function's Timeout plus clock skew between workers.
    lifecycle_lease_seconds: int = Field(120, ge=10)
    # A change for a user not registered this long after its first delivery is dead-lettered unknown_user.
    unknown_user_seconds: int = Field(900, ge=0)
    tombstone_retention_days: int = Field(90, ge=1, le=3650)
    # Dead-letter queues a deletion erases the user's letters from (comma-separated URLs).
    erasure_queue_urls: str = ""
