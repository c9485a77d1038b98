"""Time budgets that the refresh lease and the registration claim must respect.

A lease is only as good as its arithmetic. The holder of a refresh lease writes ``LeaseExpiresAt`` with its own
clock; another worker takes the lease over once that time has passed by *its* clock, which may run ahead by up to
the allowed skew. So, in the holder's clock, the lease is safe only until ``LeaseExpiresAt - skew``; a rotating call
(Refresh or Login, which spend the stored refresh token) and the commit of its answer must both fit before then::

    holder:   acquire ---- start call ====== longest call ======> commit -|
                                                                           | <= LeaseExpiresAt - skew
    other:                                        (its clock ahead by skew) takes over at LeaseExpiresAt - skew

:class:`LeaseTiming` holds those numbers and answers "may I start a call now?"; :func:`longest_call_seconds`
derives the longest call from the HTTP client's settings (every attempt timing out, every pause a full
``Retry-After``).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Time allowed, after a rotating call answered, to store its pair (one DynamoDB write and its SDK retries).
COMMIT_SECONDS = 10.0

#: The HTTP client's full-jitter back-off (``UserServiceClient(backoff_base=..., backoff_cap=...)`` defaults): before
#: retry ``n`` it sleeps at most ``min(cap, base * 2**n)``.
CLIENT_BACKOFF_BASE_SECONDS = 0.2
CLIENT_BACKOFF_CAP_SECONDS = 5.0


def longest_call_seconds(
    *,
    max_attempts: int,
    connect_timeout: float,
    read_timeout: float,
    max_retry_after: float,
    backoff_base: float = CLIENT_BACKOFF_BASE_SECONDS,
    backoff_cap: float = CLIENT_BACKOFF_CAP_SECONDS,
) -> float:
    """The longest one upstream call of the client can take, retries and their pauses included.

    Every attempt may wait ``connect_timeout + read_timeout`` (the read timeout bounds each wait for bytes: an
    answer trickling in slower than that is the one case it does not bound), and every pause between attempts
    may be a full ``Retry-After`` the client honours (``max_retry_after``) or a full back-off, whichever is longer.

    Example
    -------
    >>> longest_call_seconds(max_attempts=4, connect_timeout=3.05, read_timeout=10, max_retry_after=30)
    142.2
    """
    per_attempt = connect_timeout + read_timeout
    pauses = sum(max(max_retry_after, min(backoff_cap, backoff_base * float(2**n))) for n in range(max_attempts - 1))
    return round(max_attempts * per_attempt + pauses, 3)


@dataclass(frozen=True)
class LeaseTiming:
    """The refresh lease's length and what must fit in it.

    Parameters
    ----------
    lease_seconds
        How long a lease lives (``LeaseExpiresAt = now + lease_seconds``, by the holder's clock).
    call_seconds
        The longest rotating call (see :func:`longest_call_seconds`).
    clock_skew_seconds
        The most another worker's clock may run ahead of this one's.
    commit_seconds
        Time allowed to store a pair after its call answered.

    Example
    -------
    >>> timing = LeaseTiming(lease_seconds=180, call_seconds=142.2, clock_skew_seconds=10)
    >>> timing.may_start_call(lease_expires_at=1_000_180, now=1_000_000)
    True
    >>> timing.may_start_call(lease_expires_at=1_000_180, now=1_000_020)
    False
    """

    lease_seconds: int
    call_seconds: float
    clock_skew_seconds: float
    commit_seconds: float = COMMIT_SECONDS

    def __post_init__(self) -> None:
        if min(self.call_seconds, self.clock_skew_seconds, self.commit_seconds) < 0:
            raise ValueError("call, skew and commit seconds must not be negative")
        if self.lease_seconds < self.needed_for_call:
            raise ValueError(
                f"a refresh lease of {self.lease_seconds} s cannot hold one rotating call: it needs at least "
                f"{self.needed_for_call:g} s (longest call {self.call_seconds:g} s + commit {self.commit_seconds:g} s "
                f"+ clock skew {self.clock_skew_seconds:g} s)"
            )

    @property
    def needed_for_call(self) -> float:
        """Lease time that must be left, by the holder's clock, to start a rotating call."""
        return self.call_seconds + self.commit_seconds + self.clock_skew_seconds

    def may_start_call(self, *, lease_expires_at: float, now: float) -> bool:
        """Whether a call started ``now`` and its commit end before anyone else may take the lease over."""
        return now + self.needed_for_call <= lease_expires_at
