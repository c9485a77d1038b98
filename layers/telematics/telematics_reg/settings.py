"""The one place configuration is read: environment variables set by template.yaml, validated once.

Logic never touches ``os.environ``; each handler builds :class:`ServiceSettings` once, on its first invocation,
and passes what each piece needs.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, HttpUrl, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Hosts to which the upstream's URL may be plain http: a local emulator on this machine, never the network.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def insecure_url_problem(url: str) -> str | None:
    """Why InstanceKeys and tokens must not be sent to ``url``, or None when they may (https, or loopback http).

    Example
    -------
    >>> insecure_url_problem("https://user.telematicssdk.com") is None
    True
    >>> insecure_url_problem("http://user.telematicssdk.com")
    'must be https:// (plain http only to localhost, 127.0.0.1 or [::1]): it carries InstanceKeys and tokens'
    """
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS:
        return None
    return "must be https:// (plain http only to localhost, 127.0.0.1 or [::1]): it carries InstanceKeys and tokens"


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
    refresh_queue_url: str = ""

    @field_validator("user_service_url")
    @classmethod
    def _only_https_beyond_this_machine(cls, url: HttpUrl) -> HttpUrl:
        problem = insecure_url_problem(str(url))
        if problem:
            raise ValueError(problem)
        return url

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
