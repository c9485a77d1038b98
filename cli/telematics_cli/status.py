"""``status``: users by status, tokens due soon, the oldest overdue token, and the depth of every queue.

Costs, in DynamoDB reads:

* users by status: one Scan of the whole table, projecting only ``pk`` and ``Status`` (a scan reads every item:
  about 1 read unit per 8 KB of table, eventually consistent). ``--no-scan`` leaves it out on a big table;
* tokens due soon: one ``Select=COUNT`` Query of the sparse ``RefreshDue`` index per shard (cost grows with
  the users due, not the table);
* oldest overdue token: one ``Limit=1`` Query per shard;
* queue depths: one ``GetQueueAttributes`` per queue (free of DynamoDB cost).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

from rich.table import Table

from telematics_cli import output
from telematics_cli.errors import EXIT_OK
from telematics_cli.target import Target

#: The queues of the stack, by the output that names each.
QUEUES: Final = {
    "RegistrationQueue": "RegistrationQueueUrl",
    "RegistrationDeadLetterQueue": "RegistrationDeadLetterQueueUrl",
    "SignupDeadLetterQueue": "SignupDeadLetterQueueUrl",
    "RefreshQueue": "RefreshQueueUrl",
    "RefreshDeadLetterQueue": "RefreshDeadLetterQueueUrl",
    "SweepDeadLetterQueue": "SweepDeadLetterQueueUrl",
}
STATUSES: Final = ("PENDING", "ACTIVE", "TOKENLESS", "NEEDS_RELOGIN")
DEFAULT_SHARDS: Final = 8
DEFAULT_MARGIN: Final = 900


@dataclass(frozen=True)
class StatusOptions:
    margin: int | None = None
    shards: int | None = None
    scan: bool = True
    segments: int = 4
    as_json: bool = False


def shard_count(target: Target, explicit: int | None) -> int:
    if explicit:
        return explicit
    return target.int_setting("REFRESH_SHARDS", "RefreshIndexShards", DEFAULT_SHARDS)


def count_users(dynamodb: Any, table: str, segments: int) -> dict[str, int]:
    """Users by Status: a parallel Scan projecting ``pk`` and ``Status`` only, paginated, counted here."""

    def scan_segment(segment: int) -> dict[str, int]:
        counts: dict[str, int] = {}
        kwargs: dict[str, Any] = {
            "TableName": table,
            "ProjectionExpression": "pk, #s",
            "ExpressionAttributeNames": {"#s": "Status"},
            "Segment": segment,
            "TotalSegments": segments,
        }
        while True:
            page = dynamodb.scan(**kwargs)
            for item in page.get("Items", []):
                if not item.get("pk", {}).get("S", "").startswith("USER#"):
                    continue  # bulk progress and Login budget items
                status = item.get("Status", {}).get("S", "UNKNOWN")
                counts[status] = counts.get(status, 0) + 1
            if "LastEvaluatedKey" not in page:
                return counts
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    totals: dict[str, int] = dict.fromkeys(STATUSES, 0)
    with ThreadPoolExecutor(max_workers=segments) as pool:
        for counts in pool.map(scan_segment, range(segments)):
            for status, count in counts.items():
                totals[status] = totals.get(status, 0) + count
    return totals


def count_due(dynamodb: Any, table: str, shards: int, horizon: int) -> int:
    """Users whose access token expires at or before ``horizon``: a COUNT Query per shard of ``RefreshDue``."""

    def count_shard(shard: str) -> int:
        kwargs: dict[str, Any] = {
            "TableName": table,
            "IndexName": "RefreshDue",
            "KeyConditionExpression": "DueShard = :s AND AccessExpiresAt <= :h",
            "ExpressionAttributeValues": {":s": {"S": shard}, ":h": {"N": str(horizon)}},
            "Select": "COUNT",
        }
        total = 0
        while True:
            page = dynamodb.query(**kwargs)
            total += int(page.get("Count", 0))
            if "LastEvaluatedKey" not in page:
                return total
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    with ThreadPoolExecutor(max_workers=min(8, shards)) as pool:
        return sum(pool.map(count_shard, [f"{n:03d}" for n in range(shards)]))


def oldest_overdue(dynamodb: Any, table: str, shards: int, now: int) -> dict[str, Any] | None:
    """The token that expired longest ago among those still kept fresh: ``Limit=1`` ascending per shard."""

    def first_of(shard: str) -> dict[str, Any] | None:
        page = dynamodb.query(
            TableName=table,
            IndexName="RefreshDue",
            KeyConditionExpression="DueShard = :s AND AccessExpiresAt < :now",
            ExpressionAttributeValues={":s": {"S": shard}, ":now": {"N": str(now)}},
            ScanIndexForward=True,
            Limit=1,
        )
        items: list[dict[str, Any]] = page.get("Items", [])
        return items[0] if items else None

    with ThreadPoolExecutor(max_workers=min(8, shards)) as pool:
        found = [item for item in pool.map(first_of, [f"{n:03d}" for n in range(shards)]) if item]
    if not found:
        return None
    oldest = min(found, key=lambda item: int(item["AccessExpiresAt"]["N"]))
    expires_at = int(oldest["AccessExpiresAt"]["N"])
    return {
        "DeviceToken": oldest.get("DeviceToken", {}).get("S"),
        "ClientId": oldest.get("ClientId", {}).get("S"),
        "Instance": oldest.get("Instance", {}).get("S"),
        "AccessExpiresAt": expires_at,
        "OverdueSeconds": now - expires_at,
    }


def queue_depths(target: Target) -> dict[str, dict[str, int] | None]:
    sqs = target.client("sqs")
    depths: dict[str, dict[str, int] | None] = {}
    for name, output_name in QUEUES.items():
        url = target.outputs.get(output_name)
        if not url:
            depths[name] = None
            continue
        attributes = sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )["Attributes"]
        depths[name] = {
            "visible": int(attributes.get("ApproximateNumberOfMessages", 0)),
            "in_flight": int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0)),
            "delayed": int(attributes.get("ApproximateNumberOfMessagesDelayed", 0)),
        }
    return depths


def collect(target: Target, options: StatusOptions) -> dict[str, Any]:
    table = target.output("TokensTableName")
    dynamodb = target.client("dynamodb")
    now = int(time.time())
    shards = shard_count(target, options.shards)
    margin = (
        options.margin
        if options.margin is not None
        else target.int_setting("REFRESH_MARGIN_SECONDS", "RefreshMarginSeconds", DEFAULT_MARGIN)
    )
    users: dict[str, int] | None = None
    if options.scan:
        users = count_users(dynamodb, table, max(1, options.segments))
    return {
        "target": target.description,
        "table": table,
        "users": users,
        "users_total": sum(users.values()) if users is not None else None,
        "refresh": {
            "shards": shards,
            "margin_seconds": margin,
            "due_soon": count_due(dynamodb, table, shards, now + margin),
            "oldest_overdue": oldest_overdue(dynamodb, table, shards, now),
        },
        "queues": queue_depths(target),
        "at": output.iso(now),
    }


def run(target: Target, options: StatusOptions) -> int:
    report = collect(target, options)
    if options.as_json:
        output.print_json(report)
        return EXIT_OK
    console = output.stdout()
    console.print(f"[bold]{output.escape(report['target'])}[/bold] at {report['at']}")

    users = Table(title="Users by status", title_justify="left")
    users.add_column("Status")
    users.add_column("Users", justify="right")
    if report["users"] is None:
        users.add_row("(not counted: --no-scan)", "-")
    else:
        for status, count in report["users"].items():
            users.add_row(status, f"{count:,}")
        users.add_row("[bold]total[/bold]", f"[bold]{report['users_total']:,}[/bold]")
    console.print(users)

    refresh = report["refresh"]
    tokens = Table(title="Token maintenance", title_justify="left", show_header=False)
    tokens.add_column("what")
    tokens.add_column("value", justify="right")
    tokens.add_row(f"due within {refresh['margin_seconds']:,} s", f"{refresh['due_soon']:,}")
    oldest = refresh["oldest_overdue"]
    if oldest is None:
        tokens.add_row("oldest overdue token", "none")
    else:
        overdue = output.relative(-oldest["OverdueSeconds"])
        tokens.add_row("oldest overdue token", f"{oldest['DeviceToken']} (expired {overdue})")
    tokens.add_row("index shards", str(refresh["shards"]))
    console.print(tokens)

    queues = Table(title="Queues", title_justify="left")
    queues.add_column("Queue")
    queues.add_column("Visible", justify="right")
    queues.add_column("In flight", justify="right")
    queues.add_column("Delayed", justify="right")
    for name, depth in report["queues"].items():
        if depth is None:
            queues.add_row(name, "-", "-", "-")
            continue
        style = "red" if "DeadLetter" in name and depth["visible"] else ""
        queues.add_row(
            f"[{style}]{name}[/{style}]" if style else name,
            f"{depth['visible']:,}",
            f"{depth['in_flight']:,}",
            f"{depth['delayed']:,}",
        )
    console.print(queues)
    return EXIT_OK
