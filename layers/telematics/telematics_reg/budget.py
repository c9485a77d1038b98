"""The fleet's Login budget and the fleet-wide Login block: how the service stays under the upstream's Login limit.

The vendor limits Login to 5 calls a minute per source IP, user and admin Logins together; the next call gets 429 and
the address is blocked from Login for an hour. Every function and the CLI share one budget, kept in one DynamoDB item
(``pk = LOGIN#FLEET``), below that limit (default 3 a minute, leaving room for a person):

* **Sliding minute.** The item holds one slot per Login of the budget (``Slot0``..``Slot<n-1>``), each the time of
  the Login that took it. A Login takes a slot whose time is over a minute old with a conditional write, so at most
  ``n`` Logins start in any 60 seconds, whichever worker makes them (a calendar-minute counter let twice the budget
  through across a minute's boundary). A slot is free only once a minute *plus the allowed clock skew* has passed by
  the taker's clock, so a worker whose clock runs ahead cannot free slots early.
* **Block.** A 429 on any Login sets ``BlockedUntil`` (its ``Retry-After``, or an hour without one, plus the skew).
  Taking a slot is conditioned on no block being in force, in the same write, so no Login starts once the block is
  stored; refreshes are not affected.

Every Login goes through :meth:`LoginBudget.acquire` (the HTTP client calls it before each Login, Create recovery
included) and every 429 on a Login through :meth:`LoginBudget.block`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import ClientError

from telematics_reg.errors import LoginDeferredError
from telematics_reg.observability import logger, metrics
from telematics_reg.store import StoreError, iso

LOGIN_BUDGET_PK: Final = "LOGIN#FLEET"
WINDOW_SECONDS: Final = 60.0
#: How long a 429 without Retry-After blocks Login (the vendor's documented block).
DEFAULT_BLOCK_SECONDS: Final = 3600.0
_ATTEMPTS: Final = 4


class LoginBudget(Protocol):
    """The Login budget shared by the whole fleet."""

    def acquire(self) -> None:
        """Take one Login of the budget now; raises :class:`LoginDeferredError` when none may be made."""
        ...

    def block(self, retry_after: float | None) -> None:
        """A Login was answered 429: stop every Login of the fleet until ``retry_after`` s (or an hour) from now."""
        ...


def login_deferred(message: str, retry_at: float, *, blocked: bool) -> LoginDeferredError:
    """The error of a Login the budget or the block does not allow now (counted as a metric)."""
    metrics.add_metric("LoginsBlocked" if blocked else "LoginBudgetExhausted", MetricUnit.Count, 1)
    return LoginDeferredError(message, status=None, call="login", retry_at=retry_at, blocked=blocked)


class DynamoLoginBudget:
    """:class:`LoginBudget` on the item ``LOGIN#FLEET`` of the tokens table (see the module docstring).

    Parameters
    ----------
    client
        A low-level boto3 DynamoDB client.
    table_name
        The tokens table.
    per_minute
        Logins the fleet may start in any 60 s (0: none).
    clock_skew_seconds
        The most two workers' clocks may differ.
    default_block_seconds
        Block after a 429 without ``Retry-After``.
    clock
        Epoch seconds (tests pass a fake).

    Example
    -------
    >>> budget = DynamoLoginBudget(dynamodb, table_name="tokens", per_minute=3)  # doctest: +SKIP
    >>> budget.acquire()  # doctest: +SKIP
    """

    def __init__(
        self,
        client: Any,
        *,
        table_name: str,
        per_minute: int,
        clock_skew_seconds: float = 10.0,
        default_block_seconds: float = DEFAULT_BLOCK_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._table = table_name
        self._per_minute = per_minute
        self._skew = clock_skew_seconds
        self._default_block = default_block_seconds
        self._clock = clock

    def _read(self) -> dict[str, float]:
        try:
            response = self._client.get_item(
                TableName=self._table, Key={"pk": {"S": LOGIN_BUDGET_PK}}, ConsistentRead=True
            )
        except ClientError as exc:
            raise StoreError(f"login budget: {exc.response.get('Error', {}).get('Code')}") from exc
        item = response.get("Item", {})
        return {name: float(value["N"]) for name, value in item.items() if "N" in value}

    def acquire(self) -> None:
        for _ in range(_ATTEMPTS):
            now = self._clock()
            item = self._read()
            blocked_until = item.get("BlockedUntil", 0.0)
            if blocked_until > now:
                raise login_deferred(
                    f"Login blocked fleet-wide until {iso(blocked_until)} (429)", blocked_until, blocked=True
                )
            if self._per_minute <= 0:
                raise login_deferred("Login budget is 0", now + WINDOW_SECONDS, blocked=False)
            free_before = now - WINDOW_SECONDS - self._skew
            slots = [item.get(f"Slot{n}") for n in range(self._per_minute)]
            free = [n for n, taken_at in enumerate(slots) if taken_at is None or taken_at <= free_before]
            if not free:
                oldest = min(t for t in slots if t is not None)
                retry_at = oldest + WINDOW_SECONDS + self._skew
                raise login_deferred(f"Login budget spent ({self._per_minute} a minute)", retry_at, blocked=False)
            slot = f"Slot{free[0]}"
            # Timeline: W1 and W2 both read slot n free; both write it conditioned on it still being free: DynamoDB
            # applies one write, the other fails its condition and reads again. A block stored in between fails both.
            #   W1 read (n free) -- W1 write Slot n = t1 if Slot n <= t-60-skew and no block ............. ok
            #   W2 read (n free) ------------- W2 write Slot n = t2 if Slot n <= t-60-skew ............... refused
            try:
                self._client.update_item(
                    TableName=self._table,
                    Key={"pk": {"S": LOGIN_BUDGET_PK}},
                    UpdateExpression="SET #slot = :now",
                    ConditionExpression=(
                        "(attribute_not_exists(#slot) OR #slot <= :free_before) "
                        "AND (attribute_not_exists(BlockedUntil) OR BlockedUntil <= :now)"
                    ),
                    ExpressionAttributeNames={"#slot": slot},
                    ExpressionAttributeValues={
                        ":now": {"N": repr(now)},
                        ":free_before": {"N": repr(free_before)},
                    },
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                    raise StoreError(f"login budget: {exc.response.get('Error', {}).get('Code')}") from exc
                continue  # another worker took the slot, or a block began: read again
            return
        raise login_deferred("Login budget contended: try again shortly", self._clock() + 5, blocked=False)

    def block(self, retry_after: float | None) -> None:
        now = self._clock()
        until = now + (retry_after if retry_after else self._default_block) + self._skew
        metrics.add_metric("LoginBlockOpened", MetricUnit.Count, 1)
        logger.warning(
            "Login answered 429: Login blocked fleet-wide",
            extra={"blocked_until": iso(until), "retry_after": retry_after},
        )
        try:
            # Only ever extended: a shorter Retry-After seen later does not end a longer block.
            self._client.update_item(
                TableName=self._table,
                Key={"pk": {"S": LOGIN_BUDGET_PK}},
                UpdateExpression="SET BlockedUntil = :until, BlockedAt = :at",
                ConditionExpression="attribute_not_exists(BlockedUntil) OR BlockedUntil < :until",
                ExpressionAttributeValues={":until": {"N": repr(until)}, ":at": {"S": iso(now)}},
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise StoreError(f"login block: {exc.response.get('Error', {}).get('Code')}") from exc
