"""``update | deactivate | reactivate | delete | move``: one user's lifecycle change, sent to the lifecycle queue.

The change is the message the lifecycle function consumes (README "User lifecycle"): ``Action``, ``ClientId``,
``Instance``, the fields of an update, ``ToInstance`` for a move, and ``OccurredAt`` = now (milliseconds), which
orders it against the user's other changes. Before anything is sent it is parsed with the function's own parser,
and its ``Instance`` and ``ToInstance`` are checked against the credentials secret (aliases only, no key is shown).

``--wait`` follows the outcome where the service records it: the user's item in the tokens table (the order marker
``LastChangeAt``, the ``Deactivated`` flag, the ``Instance`` of a move, the tombstone of a deletion) and the
lifecycle dead-letter queue (a letter whose ``OriginalMessageId`` is the message sent). A deletion's wait never
reads the dead-letter queue: a letter held by a reader makes the deletion's erasure of dead letters incomplete,
and that would delay the very erasure it waits for.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from rich.table import Table

from telematics_cli import output
from telematics_cli.dlq import Peek, classify
from telematics_cli.errors import EXIT_DATA, EXIT_OK, CliError
from telematics_cli.rows import place_field
from telematics_cli.stamps import iso_ms
from telematics_cli.target import Target
from telematics_cli.users import UserRef, find_user, user_view
from telematics_reg.credentials import CredentialsConfigError, SecretsManagerCredentials
from telematics_reg.errors import InvalidMessageError, UnknownInstanceError
from telematics_reg.lifecycle.changes import Action, LifecycleChange, parse_change
from telematics_reg.store import DynamoTokenStore, UserRecord, UserStatus

#: Fields the command line sets itself (``--client-id``, ``--instance``, ``--to-instance``, the send time).
_ROUTING: Final = frozenset({"action", "clientid", "instance", "toinstance", "occurredat"})
#: ``UserFields`` flags of an update, by option name.
FLAGS: Final = {
    "enabled": "Enabled",
    "tracking": "EnableTracking",
    "logging": "EnableLogging",
    "real_time_location": "EnableRealTimeLocation",
}
_POLL_SECONDS: Final = 0.5
_DEAD_LETTER_EVERY: Final = 5.0
_DEAD_LETTER_VISIBILITY: Final = 5
_DEAD_LETTER_SCAN: Final = 1000


@dataclass(frozen=True)
class ChangeOptions:
    action: Action
    client_id: str
    instance: str = "default"
    #: ``FIELD=VALUE`` of an update (dotted for nested fields).
    fields: tuple[str, ...] = ()
    #: ``UserFields`` flags of an update (contract name -> value).
    flags: Mapping[str, bool] = field(default_factory=dict)
    to_instance: str | None = None
    yes: bool = False
    wait: bool = False
    timeout: float = 120.0
    as_json: bool = False


def change_body(options: ChangeOptions, occurred_ms: int) -> dict[str, Any]:
    """The queue message of the change (before validation)."""
    body: dict[str, Any] = {"Action": options.action.value, "ClientId": options.client_id, "Instance": options.instance}
    for item in options.fields:
        name, separator, value = item.partition("=")
        name = name.strip()
        if not separator or not name:
            raise CliError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set City=Paris")
        if name.lower() in _ROUTING:
            raise CliError(f"--set cannot set {name}: it is given by --client-id, --instance or --to-instance")
        place_field(body, name, value)
    if options.flags:
        user_fields = body.setdefault("UserFields", {})
        if not isinstance(user_fields, dict):
            raise CliError("UserFields is given whole by --set and by flag options: give the flags one way")
        user_fields.update(options.flags)
    if options.to_instance is not None:
        body["ToInstance"] = options.to_instance
    body["OccurredAt"] = iso_ms(occurred_ms)
    return body


def validate(body: Mapping[str, Any], occurred_ms: int) -> LifecycleChange:
    """The change as the lifecycle function will read it; a clear error for what it would dead-letter."""
    try:
        return parse_change(dict(body), fallback_ms=occurred_ms)
    except InvalidMessageError as exc:
        problems = "; ".join(f"{e.key}: {e.message}" if e.key else e.message for e in exc.errors) or exc.reason
        raise CliError(f"invalid {body.get('Action')} change ({exc.reason}): {problems}; nothing sent") from None


def check_instances(target: Target, change: LifecycleChange) -> None:
    """Refuse an ``Instance``/``ToInstance`` the credentials secret does not hold (the function would dead-letter it
    ``unknown_instance``). When the secret cannot be read here, say so and let the function decide."""
    secret = target.setting("CREDENTIALS_SECRET_ARN", "InstanceCredentialsSecretArn")
    if not secret:
        output.warn(f"no credentials secret known for {target.description}: the instances are not checked here")
        return
    credentials = SecretsManagerCredentials(secret, max_age=60, client=target.client("secretsmanager"))
    for option, alias in (("--instance", change.instance), ("--to-instance", change.to_instance)):
        if alias is None:
            continue
        try:
            credentials.get(alias)
        except UnknownInstanceError:
            raise CliError(f"{option} {alias!r}: the credentials secret has no such instance; nothing sent") from None
        except CredentialsConfigError as exc:
            output.warn(f"the instances are not checked here ({exc}); the lifecycle function checks them")
            return


def _store(target: Target) -> DynamoTokenStore:
    return DynamoTokenStore(
        target.client("dynamodb"),
        table_name=target.output("TokensTableName"),
        shards=target.int_setting("REFRESH_SHARDS", "RefreshIndexShards", 8),
    )


def _live(records: list[UserRecord]) -> UserRecord | None:
    return next((r for r in records if not r.status.erased), None)


def _warn_unregistered(target: Target, change: LifecycleChange, records: list[UserRecord]) -> None:
    live = _live(records)
    if change.action is Action.DELETE or (live is not None and live.status is not UserStatus.PENDING):
        return
    bound = target.int_setting("UNKNOWN_USER_SECONDS", "UnknownUserSeconds", 900)
    if live is not None:
        why = "its registration is in flight"
    elif records:
        why = "it was deleted; a change after a deletion applies only to a new registration of that ClientId"
    else:
        why = "it is not in the table"
    output.warn(
        f"no registered user with ClientId {change.client_id!r} of instance {change.instance!r} ({why}): the change "
        f"waits for its registration, and is dead-lettered unknown_user after {bound} s"
    )


def _confirm_delete(options: ChangeOptions, records: list[UserRecord]) -> None:
    if options.yes:
        return
    who = f"ClientId {options.client_id!r} of instance {options.instance!r}"
    if not sys.stdin.isatty():
        raise CliError(f"delete erases {who} upstream and here, for good: confirm with --yes (no terminal to ask on)")
    live = _live(records)
    known = f" (DeviceToken {live.device_token})" if live is not None else " (not in the table)"
    output.stderr().print(
        f"Delete {output.escape(who)}{known}? It is erased upstream and here, for good, with its dead letters.",
        markup=True,
    )
    output.stderr().print("Type the ClientId to confirm: ", end="", markup=False)
    answer = sys.stdin.readline().strip()
    if answer != options.client_id:
        raise CliError("not confirmed: nothing sent", exit_code=EXIT_DATA)


# --------------------------------------------------------------------------------------------------- outcome


@dataclass
class Outcome:
    """What became of a change: ``applied``, ``superseded`` (a newer change is applied), ``dropped`` (with the
    service's reason), ``dead_lettered`` (with its reason), or ``pending`` when the wait ended first."""

    status: str
    reason: str | None = None
    detail: str | None = None
    record: UserRecord | None = None
    item: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("applied", "superseded")


def judge(change: LifecycleChange, records: list[UserRecord]) -> Outcome | None:
    """The change's outcome as the user's items show it, or ``None`` while they show none yet.

    ``records`` are every item of the user: the live one (followed by DeviceToken across a move) and tombstones.
    """
    occurred = change.occurred_at
    tombstones = [r for r in records if r.status is UserStatus.DELETED and (r.deleted_at or 0) >= occurred]
    if change.action is Action.DELETE:
        ours = next((r for r in tombstones if r.deleted_at == occurred), None)
        if ours is not None:
            return Outcome("applied", record=ours)
        if tombstones and _live(records) is None:
            return Outcome("dropped", "duplicate", "a deletion at or after this one is already final", tombstones[0])
        return None
    if tombstones:
        return Outcome("dropped", "user_deleted", "the user was deleted after this change occurred", tombstones[0])
    live = _live(records)
    if live is None or live.last_change_at is None or live.last_change_at < occurred:
        return None
    if live.last_change_at == occurred:
        return Outcome("applied", record=live)
    return Outcome(
        "superseded",
        "newer_change",
        f"a newer change (OccurredAt {iso_ms(live.last_change_at)}) is applied: this one was applied before it, "
        "or dropped as stale",
        live,
    )


def _pending_reason(change: LifecycleChange, records: list[UserRecord]) -> str:
    live = _live(records)
    if change.action is Action.DELETE:
        if any(r.status is UserStatus.DELETING for r in records):
            return "the deletion has begun (tokens removed here); the upstream delete is still due"
        return "the deletion has not begun yet (is the lifecycle function running? `status` shows the queue)"
    if live is None or live.status is UserStatus.PENDING:
        return "no registered user yet: the change waits for its registration (then unknown_user)"
    return "not applied yet (the queue's backlog, a refresh holding the user, or retries: `status` shows the queue)"


class OutcomeWatch:
    """Polls the user's items and the lifecycle dead-letter queue until the change's outcome shows."""

    def __init__(
        self,
        target: Target,
        change: LifecycleChange,
        *,
        message_id: str,
        device_token: str | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._target = target
        self._change = change
        self._message_id = message_id
        self._device_token = device_token
        self._store = _store(target)
        self._clock = clock
        self._sleep = sleep

    def records(self) -> list[UserRecord]:
        found = {
            r.device_token: r for r in self._store.find_all_by_client(self._change.instance, self._change.client_id)
        }
        if self._device_token and self._device_token not in found:  # a move takes the user to another ClientKey
            record = self._store.get_user(self._device_token)
            if record is not None:
                found[record.device_token] = record
        return list(found.values())

    def dead_letter(self) -> Outcome | None:
        url = self._target.outputs.get("LifecycleDeadLetterQueueUrl")
        if not url:
            return None
        peek = Peek(self._target.client("sqs"), url, _DEAD_LETTER_VISIBILITY)
        try:
            for message in peek.messages(_DEAD_LETTER_SCAN):
                letter = classify(message)
                if letter.original_message_id == self._message_id:
                    return Outcome("dead_lettered", letter.reason, output.redact_text(letter.detail) or None)
        finally:
            peek.release()
        return None

    def wait(self, timeout: float) -> Outcome:
        deadline = self._clock() + timeout
        next_letters = self._clock() + 1.0
        while True:
            records = self.records()
            found = judge(self._change, records)
            if found is not None:
                return found
            if self._change.action is not Action.DELETE and self._clock() >= next_letters:
                lettered = self.dead_letter()
                if lettered is not None:
                    return lettered
                next_letters = self._clock() + _DEAD_LETTER_EVERY
            if self._clock() >= deadline:
                return Outcome("pending", "timeout", _pending_reason(self._change, records), _live(records))
            self._sleep(_POLL_SECONDS)


# --------------------------------------------------------------------------------------------------- command


def run_change(target: Target, options: ChangeOptions, *, clock: Callable[[], float] = time.time) -> int:
    """Validate, check, confirm (a deletion), send; with ``wait``, follow the outcome."""
    occurred_ms = int(clock() * 1000)
    body = change_body(options, occurred_ms)
    change = validate(body, occurred_ms)
    queue_url = target.output("LifecycleQueueUrl")
    check_instances(target, change)
    records = _store(target).find_all_by_client(change.instance, change.client_id)
    _warn_unregistered(target, change, records)
    if change.action is Action.DELETE:
        _confirm_delete(options, records)
        # The confirmation may have taken a while: the deletion occurs when it is sent, not when it was typed.
        occurred_ms = max(occurred_ms, int(clock() * 1000))
        body["OccurredAt"] = iso_ms(occurred_ms)
        change = validate(body, occurred_ms)
    sent = target.client("sqs").send_message(
        QueueUrl=queue_url, MessageBody=json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    )
    message_id = str(sent["MessageId"])
    report: dict[str, Any] = {
        "Action": change.action.value,
        "ClientId": change.client_id,
        "Instance": change.instance,
        "MessageId": message_id,
        "OccurredAt": iso_ms(change.occurred_at),
    }
    if change.to_instance is not None:
        report["ToInstance"] = change.to_instance
    live = _live(records)
    if not options.wait:
        _print_sent(options, report)
        return EXIT_OK
    if not options.as_json:
        _print_sent(options, report)
        output.info(f"waiting up to {options.timeout:g} s for the outcome…")
    watch = OutcomeWatch(
        target, change, message_id=message_id, device_token=live.device_token if live is not None else None
    )
    outcome = watch.wait(options.timeout)
    if outcome.record is not None:
        item = find_user(
            target, UserRef(client_id=None, instance=change.instance, device_token=outcome.record.device_token)
        )
        outcome.item = user_view(item, reveal=False, now=time.time()) if item is not None else None
    report["Outcome"] = {
        "Status": outcome.status,
        "Reason": outcome.reason,
        "Detail": outcome.detail,
        "User": outcome.item,
    }
    _print_outcome(options, report, outcome)
    return EXIT_OK if outcome.ok else EXIT_DATA


def _print_sent(options: ChangeOptions, report: dict[str, Any]) -> None:
    if options.as_json:
        output.print_json(report)
        return
    target = f" to instance {report['ToInstance']!r}" if "ToInstance" in report else ""
    output.stdout().print(
        f"sent {report['Action']}{target} of ClientId {report['ClientId']!r} (instance {report['Instance']!r}) "
        f"as message {report['MessageId']} (OccurredAt {report['OccurredAt']})",
        markup=False,
    )


_EXPLAIN: Final = {
    "applied": "applied",
    "superseded": "superseded",
    "dropped": "dropped",
    "dead_lettered": "dead-lettered",
    "pending": "no outcome yet",
}


def _print_outcome(options: ChangeOptions, report: dict[str, Any], outcome: Outcome) -> None:
    if options.as_json:
        output.print_json(report)
        return
    console = output.stdout()
    style = "green" if outcome.ok else ("yellow" if outcome.status == "pending" else "red")
    headline = _EXPLAIN[outcome.status] + (f" ({outcome.reason})" if outcome.reason else "")
    console.print(f"[{style}]{output.escape(headline)}[/{style}]")
    if outcome.detail:
        console.print(output.escape(outcome.detail), markup=True)
    if outcome.status == "dead_lettered":
        console.print("`telematics-reg dlq list --queue lifecycle` lists it; fix the cause, then redrive it")
    if outcome.item:
        table = Table(title=f"User {outcome.item.get('DeviceToken', '')}", title_justify="left", show_header=False)
        table.add_column("attribute", style="bold")
        table.add_column("value", overflow="fold")
        for key, value in outcome.item.items():
            table.add_row(key, output.escape(str(value)))
        console.print(table)


# ------------------------------------------------------------------------------------------------ arguments


def _change_options(parser: argparse.ArgumentParser, *, wait: bool = True) -> None:
    parser.add_argument("--client-id", metavar="ID", required=True, help="the user's id in your system")
    parser.add_argument("--instance", default="default", help="the user's instance alias (default: default)")
    if wait:
        parser.add_argument("--wait", action="store_true", help="wait for the outcome and print it (and the user)")
        parser.add_argument(
            "--timeout",
            type=_seconds,
            default=120.0,
            metavar="SECONDS",
            help="longest --wait (default 120); the change itself is not cancelled",
        )
    parser.add_argument("--json", action="store_true", help="what was sent (and the outcome) as JSON")


_DESCRIPTIONS: Final = {
    Action.UPDATE: (
        "change a user's profile fields and telematics flags (only what is given changes)",
        "Profile fields: --set FIELD=VALUE (FirstName, LastName, Nickname, Phone, Email, Gender, Birthday, "
        "MaritalStatus, ChildrenCount, Country, District, City, Address, ImageUrl, ExternalImageUrl); flags: "
        "--tracking/--no-tracking, --logging/--no-logging, --real-time-location/--no-real-time-location, "
        "--enabled/--no-enabled.",
    ),
    Action.DEACTIVATE: ("deactivate a user upstream (Status Deactivated; its tokens are kept fresh)", ""),
    Action.REACTIVATE: ("reactivate a deactivated user (Status Active)", ""),
    Action.DELETE: (
        "erase a user upstream and here (GDPR); asks for confirmation unless --yes",
        "The table keeps only a tombstone (ids, deletion time); the user's dead letters are removed. Final: a "
        "registration that occurred before it never brings the user back.",
    ),
    Action.MOVE: ("move a user to another instance (it keeps its DeviceToken)", ""),
}


_COMMON_DESCRIPTION: Final = """

The change is sent to the lifecycle queue with OccurredAt = now (it orders the user's changes: one older than a
change already applied is dropped), after it was validated and its instances checked; the message id is printed.
--wait follows it to its outcome: applied, superseded by a newer change, dropped (stale, duplicate, user_deleted) or
dead-lettered (with its reason)."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 3600")
    return value


def add_commands(command: Callable[[str, str, str, Callable[..., int]], argparse.ArgumentParser]) -> None:
    """Register the five commands with the ``command(name, help, description, handler)`` of the parser."""
    for action, (help_text, extra) in _DESCRIPTIONS.items():
        first = textwrap.fill(f"{help_text[0].upper()}{help_text[1:]}. {extra}".strip(), width=110)
        description = first + _COMMON_DESCRIPTION
        parser = command(action.value.lower(), help_text, description, _handler(action))
        _change_options(parser)
        if action is Action.UPDATE:
            parser.add_argument(
                "--set", action="append", default=[], metavar="FIELD=VALUE", dest="fields", help="a profile field"
            )
            for name, flag in FLAGS.items():
                option = name.replace("_", "-")
                parser.add_argument(
                    f"--{option}", dest=f"flag_{name}", action=argparse.BooleanOptionalAction, help=f"UserFields.{flag}"
                )
        if action is Action.MOVE:
            parser.add_argument("--to-instance", required=True, metavar="ALIAS", help="the instance to move to")
        if action is Action.DELETE:
            parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _handler(action: Action) -> Callable[[argparse.Namespace, Callable[[], Target]], int]:
    def run(args: argparse.Namespace, context: Callable[[], Target]) -> int:
        flags = {flag: getattr(args, f"flag_{name}") for name, flag in FLAGS.items() if hasattr(args, f"flag_{name}")}
        options = ChangeOptions(
            action=action,
            client_id=args.client_id,
            instance=args.instance,
            fields=tuple(getattr(args, "fields", ())),
            flags={k: v for k, v in flags.items() if v is not None},
            to_instance=getattr(args, "to_instance", None),
            yes=getattr(args, "yes", False),
            wait=args.wait,
            timeout=args.timeout,
            as_json=args.json,
        )
        return run_change(context(), options)

    return run
