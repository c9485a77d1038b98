"""The one place configuration is read: environment variables set by template.yaml, validated once.

Logic never touches ``os.environ``; each handler builds :class:`ServiceSettings` once, on its first invocation,
and passes what each piece needs.
"""

from __future__ import annotations

from typing import Self
from urllib.parse import urlsplit

from pydantic import Field, HttpUrl, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from telematics_reg.timing import COMMIT_SECONDS, LeaseTiming, longest_call_seconds

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
    device_token_key_secret_arn: str = ""
    tokens_table_name: str = ""
    event_bus_name: str = "default"
    outcome_event_source: str = "telematics.registration"
    dead_letter_queue_url: str = ""
    # The queue function's own source queue: a bulk that stopped part-way is sent back there to continue.
    registration_queue_url: str = ""
    bulk_continuation_delay_seconds: int = Field(5, ge=0, le=900)
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
    # Longest Retry-After the client waits out by sleeping; a longer one reschedules instead.
    upstream_max_retry_after: float = Field(30.0, gt=0, le=300)

    credentials_cache_seconds: int = Field(300, ge=0)

    # Time. A claim or a lease is safe only while it outlives whoever holds it: the function holding it (its
    # template Timeout, FUNCTION_TIMEOUT_SECONDS) and any upstream call made under it, by every clock that judges it
    # (clocks of two workers may differ by up to clock_skew_seconds). Checked below, at start.
    function_timeout_seconds: int = Field(60, ge=1, le=900)
    clock_skew_seconds: int = Field(10, ge=0, le=300)
    # Time allowed, after a rotating call answered, to store its pair before the lease may be taken over.
    refresh_commit_seconds: float = Field(COMMIT_SECONDS, ge=0.5, le=60)
    # A registration claim outlives one invocation so a crashed attempt is taken over by the next delivery.
    claim_seconds: int = Field(120, ge=10)

    # Token maintenance.
    refresh_margin_seconds: int = Field(900, ge=1)
    refresh_shards: int = Field(8, ge=1, le=256)
    refresh_lease_seconds: int = Field(180, ge=5)
    refresh_spread_seconds: int = Field(60, ge=0, le=900)
    sweep_page_size: int = Field(500, ge=1, le=1000)

    # The upstream's Login limit (the vendor's: 5 a minute per source IP, user and admin Logins together; beyond it,
    # 429 and an hour's block). The fleet's budget stays below it, leaving room for a person; 0 = no Logins.
    upstream_login_limit_per_minute: int = Field(5, ge=1, le=10_000)
    login_budget_per_minute: int = Field(3, ge=0, le=9_999)
    # How long a 429 on Login without Retry-After blocks every Login of the fleet.
    login_block_seconds: int = Field(3600, ge=60, le=86_400)

    # Reconciliation (flow 6). The admin account lists users; the audit starts a run every interval (the schedule
    # only wakes the function), under a lease that outlives the function, checkpointing each page.
    reconcile_audit_interval_seconds: int = Field(86_400, ge=300)
    reconcile_lease_seconds: int = Field(180, ge=30)
    reconcile_window_margin_seconds: int = Field(60, ge=0, le=3600)
    reconcile_page_size: int = Field(1000, ge=10, le=1000)

    @property
    def longest_upstream_call_seconds(self) -> float:
        """The longest one upstream call can take with these client settings (retries and pauses included)."""
        return longest_call_seconds(
            max_attempts=self.upstream_max_attempts,
            connect_timeout=self.upstream_connect_timeout,
            read_timeout=self.upstream_read_timeout,
            max_retry_after=self.upstream_max_retry_after,
        )

    @property
    def lease_timing(self) -> LeaseTiming:
        """What a refresh lease must hold: the longest call, its commit, and the clock skew."""
        return LeaseTiming(
            lease_seconds=self.refresh_lease_seconds,
            call_seconds=self.longest_upstream_call_seconds,
            clock_skew_seconds=self.clock_skew_seconds,
            commit_seconds=self.refresh_commit_seconds,
        )

    @model_validator(mode="after")
    def _claims_and_leases_outlive_their_holders(self) -> Self:
        """Refuse settings under which a claim or a lease could be taken over while its holder still acts."""
        skew = self.clock_skew_seconds
        claim_needed = self.function_timeout_seconds + skew
        if self.claim_seconds < claim_needed:
            raise ValueError(
                f"CLAIM_SECONDS={self.claim_seconds} is too short: a registration claim must outlive the function "
                f"holding it, FUNCTION_TIMEOUT_SECONDS={self.function_timeout_seconds} + CLOCK_SKEW_SECONDS={skew} "
                f"= {claim_needed} s"
            )
        if self.lifecycle_lease_seconds < claim_needed:
            raise ValueError(
                f"LIFECYCLE_LEASE_SECONDS={self.lifecycle_lease_seconds} is too short: a change's lease must outlive "
                f"the function applying it, FUNCTION_TIMEOUT_SECONDS={self.function_timeout_seconds} + "
                f"CLOCK_SKEW_SECONDS={skew} = {claim_needed} s"
            )
        if self.login_budget_per_minute >= self.upstream_login_limit_per_minute:
            raise ValueError(
                f"LOGIN_BUDGET_PER_MINUTE={self.login_budget_per_minute} must stay below the upstream's Login limit "
                f"(UPSTREAM_LOGIN_LIMIT_PER_MINUTE={self.upstream_login_limit_per_minute}), leaving room for a person: "
                "one Login over it blocks every Login from our address for an hour"
            )
        reconcile_needed = self.function_timeout_seconds + skew
        if self.reconcile_lease_seconds < reconcile_needed:
            raise ValueError(
                f"RECONCILE_LEASE_SECONDS={self.reconcile_lease_seconds} is too short: the audit's lease must outlive "
                f"the function holding it, FUNCTION_TIMEOUT_SECONDS={self.function_timeout_seconds} + "
                f"CLOCK_SKEW_SECONDS={skew} = {reconcile_needed} s"
            )
        call = self.longest_upstream_call_seconds
        commit = self.refresh_commit_seconds
        lease_needed = max(self.function_timeout_seconds, call + commit) + skew
        if self.refresh_lease_seconds < lease_needed:
            raise ValueError(
                f"REFRESH_LEASE_SECONDS={self.refresh_lease_seconds} is too short: a refresh lease must outlive the "
                f"function holding it (FUNCTION_TIMEOUT_SECONDS={self.function_timeout_seconds}) and the longest "
                f"upstream call with its commit ({call:g} s from UPSTREAM_MAX_ATTEMPTS, the timeouts and "
                f"UPSTREAM_MAX_RETRY_AFTER, + REFRESH_COMMIT_SECONDS={commit:g}), plus CLOCK_SKEW_SECONDS={skew}: "
                f"at least {lease_needed:g} s"
            )
        return self

    # User lifecycle (flow 5) and reconciliation (flow 6): the admin account of the fleet's one admin session.
    admin_credentials_secret_arn: str = ""
    # The user's lease while a change is applied: above the function's Timeout plus clock skew between workers.
    lifecycle_lease_seconds: int = Field(120, ge=10)
    # A change for a user not registered this long after its first delivery is dead-lettered unknown_user.
    unknown_user_seconds: int = Field(900, ge=0)
    tombstone_retention_days: int = Field(90, ge=1, le=3650)
    # Dead-letter queues a deletion erases the user's letters from (comma-separated URLs).
    erasure_queue_urls: str = ""
