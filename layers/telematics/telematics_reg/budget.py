"""A Login budget shared by every refresh worker: the upstream rate-limits Login per IP (a handful a minute,
with long blocks after), so Login is a fallback that all workers together spend sparingly.

The budget is a counter per instance per minute, kept in the tokens table and increased with a conditional
write, so it holds across any number of concurrent Lambda invocations.
"""

from __future__ import annotations

from typing import Any, Protocol

from botocore.exceptions import ClientError

from telematics_reg.store import StoreError


class LoginBudget(Protocol):
    def try_acquire(self, instance_id: str, now: float) -> bool:
        """Spend one Login of this minute's budget; False when it is used up."""
        ...


class DynamoLoginBudget:
    """Per-minute counters ``BUDGET#LOGIN#<InstanceId>#<minute>`` in the tokens table, expired by TTL."""

    def __init__(self, client: Any, *, table_name: str, per_minute: int) -> None:
        self._client = client
        self._table = table_name
        self._per_minute = per_minute

    def try_acquire(self, instance_id: str, now: float) -> bool:
        if self._per_minute <= 0:
            return False
        minute = int(now // 60)
        try:
            # Condition: the counter is below the limit (or does not exist yet). ADD creates it at 1.
            self._client.update_item(
                TableName=self._table,
                Key={"pk": {"S": f"BUDGET#LOGIN#{instance_id}#{minute}"}},
                UpdateExpression="ADD Used :one SET ExpiresAt = :ttl",
                ConditionExpression="attribute_not_exists(Used) OR Used < :limit",
                ExpressionAttributeValues={
                    ":one": {"N": "1"},
                    ":limit": {"N": str(self._per_minute)},
                    ":ttl": {"N": str((minute + 10) * 60)},
                },
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return False
            raise StoreError(f"login budget: {exc.response.get('Error', {}).get('Code')}") from exc
        return True
