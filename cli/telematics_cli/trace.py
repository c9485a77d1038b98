"""``trace``: everything the service knows about one registration, in order.

Given a ClientId (with its instance), a DeviceToken or a message id, ``trace`` gathers:

* **the log lines** of every function about it: the functions log JSON with correlation ids (``client_id``,
  ``device_token``, ``message_id``, and ``correlation_id``: the SQS message id or the signup event's id), so this
  is a query, not a scan. On AWS it is a CloudWatch Logs Insights query over the stack's function log groups; on
  the local stack it reads the log file ``make run`` writes (``.local-stack/run.log``), where the local runtime
  also logs each invocation with the message ids it delivered. Two rounds: the lines that name the user give its
  message ids, and the lines of those messages give the rest (a retry names only its message id);
* **the dead letters** of its messages, from the registration and signup dead-letter queues (peeked: nothing is
  removed);
* **the current state** from DynamoDB (tokens are never shown).

From these it shows the messages and their ids, each delivery and its outcome, the outcome events published,
the dead letters with their reasons, and the refresh history (every token version: when, and by refresh or Login).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from rich.table import Table

from telematics_cli import output
from telematics_cli.dlq import QUEUES, Peek, classify
from telematics_cli.errors import EXIT_OK, CliError, DataError
from telematics_cli.target import Target
from telematics_cli.users import UserRef, find_user, user_view

#: The fields of a log line that name a registration.
ID_FIELDS: Final = ("client_id", "device_token", "message_id", "correlation_id")
#: Dead-letter queues that can hold a registration's messages.
TRACE_QUEUES: Final = ("registration", "signup")
QUERY_LIMIT: Final = 10_000
_DURATION: Final = re.compile(r"^(\d+)([mhd])$")
_UNITS: Final = {"m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class TraceOptions:
    ref: UserRef | None
    message_id: str | None
    since_seconds: int
    log_file: Path | None = None
    dlq_limit: int = 1000
    query_timeout: float = 60.0
    as_json: bool = False


def parse_duration(text: str) -> int:
    """``30m``, ``24h``, ``7d`` in seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise CliError(f"--since {text!r}: give a number and a unit, e.g. 30m, 24h or 7d")
    return int(match.group(1)) * _UNITS[match.group(2)]


# ------------------------------------------------------------------------------------------------ log sources


@dataclass(frozen=True)
class Wanted:
    """What to look for in the logs: a line matches when any of its id fields holds one of these values."""

    client_ids: frozenset[str] = frozenset()
    device_tokens: frozenset[str] = frozenset()
    message_ids: frozenset[str] = frozenset()

    def matches(self, line: Mapping[str, Any]) -> bool:
        if str(line.get("client_id")) in self.client_ids or str(line.get("device_token")) in self.device_tokens:
            return True
        if str(line.get("message_id")) in self.message_ids or str(line.get("correlation_id")) in self.message_ids:
            return True
        delivered = line.get("message_ids")  # the local runtime's line for one SQS invocation
        return isinstance(delivered, list) and any(str(m) in self.message_ids for m in delivered)


class LogSource(Protocol):
    """Where the functions' log lines are read from."""

    description: str

    def lines(self, wanted: Wanted, *, since: float) -> list[dict[str, Any]]:
        """The JSON log lines that match ``wanted``, written since the epoch second ``since``."""
        ...


class LocalLog:
    """The log file of the local stack (one JSON object per line)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = str(path)

    def lines(self, wanted: Wanted, *, since: float) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        try:
            with self.path.open(encoding="utf-8", errors="replace") as stream:
                for text in stream:
                    if not any(value in text for value in _needles(wanted)):
                        continue  # cheap pre-filter: most lines name none of the ids
                    with contextlib.suppress(ValueError):
                        line = json.loads(text)
                        if isinstance(line, dict) and wanted.matches(line) and line_time(line) >= since:
                            found.append(line)
        except FileNotFoundError:
            raise CliError(
                f"no log file at {self.path}: the local stack writes it (`make run ARGS=--serve`); "
                "give --log-file PATH if it was started with another --log-file"
            ) from None
        return found


def _needles(wanted: Wanted) -> list[str]:
    return [*wanted.client_ids, *wanted.device_tokens, *wanted.message_ids]


def insights_string(value: str) -> str:
    """A CloudWatch Logs Insights string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def insights_query(wanted: Wanted) -> str:
    """The Logs Insights query for the lines that name any wanted id.

    Example
    -------
    >>> print(insights_query(Wanted(client_ids=frozenset({"c-1"}))))
    fields @timestamp, @message, @log
    | filter client_id = "c-1"
    | sort @timestamp asc
    | limit 10000
    """
    terms: list[str] = []

    def among(name: str, values: Iterable[str]) -> None:
        ordered = sorted(values)
        if len(ordered) == 1:
            terms.append(f"{name} = {insights_string(ordered[0])}")
        elif ordered:
            terms.append(f"{name} in [{', '.join(insights_string(v) for v in ordered)}]")

    among("client_id", wanted.client_ids)
    among("device_token", wanted.device_tokens)
    among("message_id", wanted.message_ids)
    among("correlation_id", wanted.message_ids)
    if not terms:
        raise ValueError("nothing to look for")
    return (
        "fields @timestamp, @message, @log\n"
        f"| filter {' or '.join(terms)}\n"
        "| sort @timestamp asc\n"
        f"| limit {QUERY_LIMIT}"
    )


class InsightsLogs:
    """The functions' CloudWatch log groups, queried with Logs Insights."""

    def __init__(
        self,
        client: Any,
        log_groups: list[str],
        *,
        timeout: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self.log_groups = log_groups
        self._timeout = timeout
        self._sleep = sleep
        self._clock = clock
        self.description = f"CloudWatch Logs Insights over {', '.join(log_groups)}"

    def lines(self, wanted: Wanted, *, since: float) -> list[dict[str, Any]]:
        query_id = self._client.start_query(
            logGroupNames=self.log_groups,
            startTime=int(since),
            endTime=int(self._clock()) + 60,
            queryString=insights_query(wanted),
            limit=QUERY_LIMIT,
        )["queryId"]
        deadline = self._clock() + self._timeout
        while True:
            response = self._client.get_query_results(queryId=query_id)
            status = response.get("status")
            if status == "Complete":
                break
            if status in {"Failed", "Cancelled", "Timeout", "Unknown"}:
                raise CliError(f"the Logs Insights query {query_id} ended {status}")
            if self._clock() >= deadline:
                with contextlib.suppress(Exception):
                    self._client.stop_query(queryId=query_id)
                raise CliError(f"the Logs Insights query did not finish in {self._timeout:.0f} s (--query-timeout)")
            self._sleep(1.0)
        found: list[dict[str, Any]] = []
        for row in response.get("results", []):
            cells = {cell.get("field"): cell.get("value") for cell in row}
            with contextlib.suppress(ValueError, TypeError):
                line = json.loads(str(cells.get("@message", "")))
                if isinstance(line, dict):
                    line.setdefault("timestamp", cells.get("@timestamp"))
                    found.append(line)
        return found


def log_groups_of(target: Target) -> list[str]:
    """The log groups of the stack's functions (its ``AWS::Logs::LogGroup`` resources)."""
    if not target.stack_name:
        raise CliError("the functions' log groups are known only for a deployed stack (--stack NAME)")
    groups: list[str] = []
    paginator = target.client("cloudformation").get_paginator("list_stack_resources")
    for page in paginator.paginate(StackName=target.stack_name):
        groups += [
            str(r["PhysicalResourceId"])
            for r in page.get("StackResourceSummaries", [])
            if r.get("ResourceType") == "AWS::Logs::LogGroup" and r.get("PhysicalResourceId")
        ]
    if not groups:
        raise CliError(
            f"{target.description} has no log groups (AWS::Logs::LogGroup): was it deployed from this template?"
        )
    return sorted(groups)


# ------------------------------------------------------------------------------------------------- the trace


def line_time(line: Mapping[str, Any]) -> float:
    """Epoch seconds of a log line (Powertools' and the local runtime's formats, and Logs Insights' @timestamp)."""
    text = str(line.get("timestamp") or "")
    for pattern in ("%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%d %H:%M:%S,%f%z", "%Y-%m-%d %H:%M:%S.%f"):
        with contextlib.suppress(ValueError):
            moment = datetime.strptime(text, pattern)
            return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    return 0.0


def _short_function(name: Any) -> str:
    text = str(name or "")
    for suffix in ("SignupFunction", "RegistrationQueueFunction", "RefreshWorkerFunction", "RefreshSweeperFunction"):
        if suffix in text:
            return suffix.removesuffix("Function")
    return text.rsplit("-", 1)[-1] if text else "-"


def describe(line: Mapping[str, Any], message_ids: set[str]) -> tuple[str, str]:
    """What one log line says, as (what, details)."""
    message = str(line.get("message", ""))
    if message == "registration stored":
        return (
            "duplicate answered" if line.get("duplicate") else "registered"
        ), f"DeviceToken {line.get('device_token')}"
    if message == "ClientId already registered":
        return "duplicate detected", f"DeviceToken {line.get('device_token')}: no second Create"
    if message == "registration will be retried":
        return "delivery failed (will be retried)", str(line.get("error", ""))
    if message == "message dead-lettered":
        errors = "; ".join(
            f"{e.get('Key') or e.get('key')}: {e.get('Message') or e.get('message')}"
            for e in line.get("errors") or []
            if isinstance(e, dict)
        )
        return "dead-lettered", f"Reason {line.get('reason')}" + (f" ({errors})" if errors else "")
    if message == "outcome event published":
        kind = str(line.get("detail_type", ""))
        extra = " (Duplicate)" if line.get("duplicate") else ""
        reason = f" Reason {line.get('reason')}" if line.get("reason") else ""
        return "outcome event", f"{kind}{extra}{reason}"
    if message == "tokens committed":
        return f"tokens rotated ({line.get('via', 'refresh')})", f"Version {line.get('version')}"
    if message == "user needs relogin":
        return "NEEDS_RELOGIN", str(line.get("reason", ""))
    if message.startswith("invocation finished"):
        ids = [m for m in line.get("message_ids") or [] if m in message_ids]
        counts = line.get("receive_counts") or {}
        receive = ", ".join(f"receive #{counts.get(m, '?')}" for m in ids)
        failed = set(line.get("failed_message_ids") or [])
        if line.get("invocation_type") == "Event":
            result = str(line.get("outcome"))
            return "delivery", f"attempt {line.get('attempt')}: {result}" + (
                f" ({line.get('error')})" if line.get("error") else ""
            )
        result = "failed" if any(m in failed for m in ids) else "succeeded"
        if line.get("outcome") == "timed out":
            result = "timed out"
        return "delivery", f"{receive}: {result}" + (f" ({line.get('error')})" if line.get("error") else "")
    return str(line.get("level", "")).lower() or "log", message


@dataclass
class Trace:
    identity: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)
    letters: list[dict[str, Any]] = field(default_factory=list)
    message_ids: set[str] = field(default_factory=set)


def _ids(lines: Iterable[Mapping[str, Any]], key: str) -> set[str]:
    return {str(line[key]) for line in lines if line.get(key)}


def gather(target: Target, logs: LogSource, options: TraceOptions, *, now: float) -> Trace:
    """Collect what is known: the user's item, the matching log lines (two rounds), its dead letters."""
    trace = Trace()
    since = now - options.since_seconds
    item = find_user(target, options.ref) if options.ref is not None else None
    client_ids: set[str] = set()
    device_tokens: set[str] = set()
    instance = options.ref.instance if options.ref is not None else None
    if options.ref is not None and options.ref.client_id:
        client_ids.add(options.ref.client_id)
    if options.ref is not None and options.ref.device_token:
        device_tokens.add(options.ref.device_token)
    if item is not None:
        trace.state = user_view(item, reveal=False, now=now)
        client_ids |= {str(item["ClientId"])} if item.get("ClientId") else set()
        device_tokens.add(str(item["DeviceToken"]))
        instance = str(item.get("Instance", instance))
    message_ids = {options.message_id} if options.message_id else set()

    lines = logs.lines(Wanted(frozenset(client_ids), frozenset(device_tokens), frozenset(message_ids)), since=since)
    if options.message_id and not client_ids and not device_tokens:
        # Found by message id: the lines name the user, whose state and other messages come next.
        client_ids |= _ids(lines, "client_id")
        device_tokens |= _ids(lines, "device_token")
        if device_tokens and item is None:
            item = find_user(target, UserRef(client_id=None, instance="default", device_token=sorted(device_tokens)[0]))
            if item is not None:
                trace.state = user_view(item, reveal=False, now=now)
                instance = str(item.get("Instance", "")) or instance
    # A ClientId may exist in several instances: keep the lines of this user's DeviceToken.
    lines = [
        line
        for line in lines
        if not line.get("device_token") or not device_tokens or str(line["device_token"]) in device_tokens
    ]
    message_ids |= _ids((line for line in lines if line.get("message") != "outcome event published"), "message_id")
    signup_lines = (line for line in lines if "Signup" in str(line.get("function_name", "")))
    message_ids |= _ids(signup_lines, "correlation_id")
    # A message rejected before its ClientId was read (not JSON, invalid fields) is found by its letter's body.
    trace.letters = dead_letters(target, client_ids, message_ids, limit=options.dlq_limit)
    message_ids |= {str(letter["OriginalMessageId"]) for letter in trace.letters if letter.get("OriginalMessageId")}
    if message_ids:
        seen = {json.dumps(line, sort_keys=True, default=str) for line in lines}
        for line in logs.lines(Wanted(message_ids=frozenset(message_ids)), since=since):
            key = json.dumps(line, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                lines.append(line)
    trace.lines = sorted(lines, key=line_time)
    trace.message_ids = message_ids
    trace.identity = {
        "ClientId": sorted(client_ids)[0] if len(client_ids) == 1 else sorted(client_ids) or None,
        "Instance": instance,
        "DeviceToken": sorted(device_tokens)[0] if len(device_tokens) == 1 else sorted(device_tokens) or None,
    }
    return trace


def _letter_names(letter_body: str, client_ids: set[str]) -> bool:
    try:
        document = json.loads(letter_body)
    except ValueError:
        return False
    if not isinstance(document, dict):
        return False
    candidates = [
        document,
        document.get("detail"),
        (document.get("requestPayload") or {}).get("detail")
        if isinstance(document.get("requestPayload"), dict)
        else None,
    ]
    for candidate in candidates:
        if isinstance(candidate, dict):
            client = candidate.get("ClientId") or candidate.get("clientId")
            fields = candidate.get("UserFields") or candidate.get("userFields")
            if client is None and isinstance(fields, dict):
                client = fields.get("ClientId")
            if client is not None and str(client) in client_ids:
                return True
    return False


def dead_letters(target: Target, client_ids: set[str], message_ids: set[str], *, limit: int) -> list[dict[str, Any]]:
    """The letters of the registration and signup DLQs that are this user's (peeked, left in place)."""
    sqs = target.client("sqs")
    found: list[dict[str, Any]] = []
    for name in TRACE_QUEUES:
        url = target.outputs.get(QUEUES[name].output)
        if not url:
            continue
        depth = int(
            sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"].get(
                "ApproximateNumberOfMessages", 0
            )
        )
        if depth == 0:
            continue
        peek = Peek(sqs, url, 30)
        try:
            for message in peek.messages(min(limit, depth)):
                letter = classify(message)
                original = (message.get("MessageAttributes", {}).get("OriginalMessageId") or {}).get("StringValue")
                event_id = (letter.event or {}).get("id")
                if (
                    letter.message_id in message_ids
                    or original in message_ids
                    or event_id in message_ids
                    or _letter_names(letter.body, client_ids)
                ):
                    found.append(
                        {
                            "Queue": name,
                            "Reason": letter.reason,
                            "OriginalMessageId": original or event_id or letter.message_id,
                            **letter.example(),
                        }
                    )
        finally:
            peek.release()
    return found


# ----------------------------------------------------------------------------------------------------- report


def report(trace: Trace) -> dict[str, Any]:
    """The trace as one JSON document."""
    timeline = []
    deliveries = []
    outcome_events = []
    history = []
    for line in trace.lines:
        what, details = describe(line, trace.message_ids)
        entry = {
            "time": line.get("timestamp"),
            "function": _short_function(line.get("function_name")),
            "request_id": line.get("function_request_id"),
            "message_id": line.get("message_id") or line.get("correlation_id"),
            "what": what,
            "details": output.redact_text(details),
        }
        timeline.append(entry)
        if what == "delivery":
            deliveries.append(entry)
        elif what == "outcome event":
            outcome_events.append(
                {**entry, "detail_type": line.get("detail_type"), "duplicate": bool(line.get("duplicate"))}
            )
        if line.get("message") == "registration stored" and not line.get("duplicate"):
            history.append({"version": 1, "time": line.get("timestamp"), "via": "create"})
        elif line.get("message") == "tokens committed":
            history.append({"version": line.get("version"), "time": line.get("timestamp"), "via": line.get("via")})
    return {
        "identity": trace.identity,
        "messages": sorted(trace.message_ids),
        "state": trace.state,
        "deliveries": deliveries,
        "outcome_events": outcome_events,
        "dead_letters": trace.letters,
        "refresh_history": history,
        "timeline": timeline,
    }


def run(target: Target, logs: LogSource, options: TraceOptions) -> int:
    trace = gather(target, logs, options, now=time.time())
    if not trace.lines and trace.state is None and not trace.letters:
        subject = options.ref.describe() if options.ref is not None else f"message {options.message_id}"
        raise DataError(f"nothing known about {subject} (searched {logs.description} and the dead-letter queues)")
    document = report(trace)
    if options.as_json:
        output.print_json(document)
        return EXIT_OK
    _print(document, logs.description)
    return EXIT_OK


def _print(document: dict[str, Any], source: str) -> None:
    console = output.stdout()
    identity = document["identity"]
    console.print(
        output.escape(
            f"ClientId {identity.get('ClientId') or '-'} · Instance {identity.get('Instance') or '-'} · "
            f"DeviceToken {identity.get('DeviceToken') or '-'}"
        )
    )
    console.print(output.escape(f"messages: {', '.join(document['messages']) or 'none found'}  (logs: {source})"))
    timeline = Table(title="What happened", title_justify="left")
    timeline.add_column("Time")
    timeline.add_column("Function")
    timeline.add_column("Message")
    timeline.add_column("What")
    timeline.add_column("Details", overflow="fold")
    for entry in document["timeline"]:
        timeline.add_row(
            output.escape(str(entry["time"] or "")),
            entry["function"],
            output.escape(str(entry["message_id"] or "")[:8]),
            output.escape(entry["what"]),
            output.escape(entry["details"]),
        )
    console.print(timeline)
    if document["dead_letters"]:
        letters = Table(title="Dead letters", title_justify="left")
        for column in ("Queue", "Reason", "Message", "Sent", "Detail"):
            letters.add_column(column, overflow="fold")
        for letter in document["dead_letters"]:
            letters.add_row(
                letter["Queue"],
                output.escape(letter["Reason"]),
                output.escape(str(letter["OriginalMessageId"])),
                str(letter.get("SentAt") or ""),
                output.escape(str(letter.get("Detail") or "")),
            )
        console.print(letters)
    if document["refresh_history"]:
        versions = ", ".join(f"v{h['version']} {h['via']} {h['time']}" for h in document["refresh_history"])
        console.print(output.escape(f"refresh history: {versions}"))
    state = document["state"]
    if state is None:
        console.print("current state: not in the table")
    else:
        console.print(
            output.escape(
                f"current state: {state.get('Status')} · Version {state.get('Version')} · token expires "
                f"{state.get('AccessExpiresAtIso', '-')}"
                + (f" · LastError {state['LastError']}" if state.get("LastError") else "")
            )
        )
