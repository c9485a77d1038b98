"""``make run``: the whole service on this machine, fed a realistic workload, checked, and summarised.

What it does, in order:

1. starts a moto server and the User Service emulator on free loopback ports, creates template.yaml's
   resources in moto (:func:`local.stack.provision`), saves the stack description for other tools
   (``.local-stack/stack.json``) and runs the event routing in-process (:class:`local.runner.LocalRuntime`);
2. feeds it through the AWS APIs only: ``UserSignedUp`` events on the bus, a generated file of registrations
   loaded onto the registration queue plus one bulk ``Quantity`` message, duplicates (republished events,
   repeated lines, the same ClientId through both paths), bad messages, and two registrations for an instance
   whose key the upstream no longer accepts (one redriven to the DLQ after maxReceiveCount, one sent to the
   signup function's on-failure destination after its retries);
3. shows progress until every user is stored and every token has been rotated by the refresh job (tokens are
   short-lived and the sweep runs every few seconds), then prints a summary and checks it: exit status 0 when
   everything is as expected, 1 otherwise (each failed check says why).

``--serve`` keeps the service running for manual use instead (``--workload`` feeds the demo workload first),
printing endpoints and ready-to-paste commands; Ctrl-C (or SIGTERM) stops it cleanly.

The handlers' own logs (JSON, as in CloudWatch) and the runtime's go to ``--log-file``, not the terminal.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

from boto3.dynamodb.types import TypeDeserializer

from local.demo_flows import LOST_BULK, OTHER_ALIAS, Flows, shorten_timing, timing_line
from local.logs import JsonLines, redirect_terminal_handlers
from local.logs import configure as configure_logs
from local.runner import LocalRuntimeError, LocalService, RuntimeOptions
from local.send import client, load_file, publish_signups, send_messages
from local.stack import DEFAULT_STATE_PATH, LocalStack, LocalStackError

STATE_DIR: Final = DEFAULT_STATE_PATH.parent
#: An instance alias in the credentials secret whose key the emulator rejects (a revoked or rotated key).
REVOKED_ALIAS: Final = "fleet-revoked"
#: The queues whose contents the summary lists, by logical id in template.yaml.
DEAD_LETTER_QUEUES: Final = (
    "RegistrationDeadLetterQueue",
    "SignupDeadLetterQueue",
    "RefreshDeadLetterQueue",
    "SweepDeadLetterQueue",
    "LifecycleDeadLetterQueue",
    "ReconcileDeadLetterQueue",
)
REDRIVEN: Final = "redriven after maxReceiveCount"
#: The functions that register users (logical ids): the run has settled when they are quiet.
REGISTERING_FUNCTIONS: Final = ("SignupFunction", "RegistrationQueueFunction")
_FIRST_NAMES: Final = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Niklaus")
_LAST_NAMES: Final = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Perlman")
_CITIES: Final = (("GB", "London"), ("DE", "Berlin"), ("FR", "Lyon"), ("US", "Austin"), ("JP", "Osaka"))


# --------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class DemoOptions:
    """The knobs of a run (see ``python -m local.demo --help``)."""

    signups: int = 20
    file_users: int = 100
    bulk: int = 50
    duplicates: int = 6
    token_lifetime: int = 70
    refresh_margin: int = 60
    sweep_every: float = 5.0
    rotations: int = 2
    timeout: float = 240.0
    log_level: str = "INFO"
    log_file: Path = STATE_DIR / "run.log"
    state: Path = DEFAULT_STATE_PATH
    serve: bool = False
    workload: bool = False
    seed: int | None = None
    stack_name: str = "telematics-local"


def parse_options(argv: Sequence[str] | None = None) -> DemoOptions:
    """Command-line options of ``python -m local.demo``."""
    defaults = DemoOptions()
    parser = argparse.ArgumentParser(
        prog="python -m local.demo",
        description="Run the registration service locally (moto + emulator + in-process Lambda), feed it, check it.",
    )
    parser.add_argument("--serve", action="store_true", help="keep running for manual use (Ctrl-C stops)")
    parser.add_argument("--workload", action="store_true", help="with --serve: feed the demo workload first")
    parser.add_argument("--signups", type=int, default=defaults.signups, help="UserSignedUp events (%(default)s)")
    parser.add_argument("--file-users", type=int, default=defaults.file_users, help="lines of the file (%(default)s)")
    parser.add_argument("--bulk", type=int, default=defaults.bulk, help="Quantity of the bulk message (%(default)s)")
    parser.add_argument(
        "--duplicates", type=int, default=defaults.duplicates, help="duplicate deliveries (%(default)s)"
    )
    parser.add_argument(
        "--token-lifetime", type=int, default=defaults.token_lifetime, help="emulator token lifetime, s (%(default)s)"
    )
    parser.add_argument(
        "--refresh-margin",
        type=int,
        default=defaults.refresh_margin,
        help="RefreshMarginSeconds parameter, s; the template's minimum is 60 (%(default)s)",
    )
    parser.add_argument(
        "--sweep-every", type=float, default=defaults.sweep_every, help="fire the refresh sweep every S s (%(default)s)"
    )
    parser.add_argument(
        "--rotations", type=int, default=defaults.rotations, help="token rotations to wait for per user (%(default)s)"
    )
    parser.add_argument("--timeout", type=float, default=defaults.timeout, help="give up after S s (%(default)s)")
    parser.add_argument(
        "--log-level",
        default=defaults.log_level,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the functions' LogLevel parameter (%(default)s)",
    )
    parser.add_argument("--log-file", type=Path, default=defaults.log_file, help="logs go here (%(default)s)")
    parser.add_argument("--state", type=Path, default=defaults.state, help="stack description (%(default)s)")
    parser.add_argument("--seed", type=int, help="seed of the generated workload")
    args = parser.parse_args(argv)
    for name in ("signups", "file_users", "bulk", "duplicates", "rotations"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more")
    if args.token_lifetime <= args.refresh_margin:
        print(
            f"note: tokens live {args.token_lifetime} s, no more than the {args.refresh_margin} s margin: every sweep "
            "refreshes every token",
            file=sys.stderr,
        )
    return DemoOptions(
        signups=args.signups,
        file_users=args.file_users,
        bulk=args.bulk,
        duplicates=args.duplicates,
        token_lifetime=args.token_lifetime,
        refresh_margin=args.refresh_margin,
        sweep_every=args.sweep_every,
        rotations=args.rotations,
        timeout=args.timeout,
        log_level=args.log_level,
        log_file=args.log_file,
        state=args.state,
        serve=args.serve,
        workload=args.workload,
        seed=args.seed,
    )


# --------------------------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """What the demo sends, and what must come of it."""

    run: str
    signups: list[dict[str, Any]] = field(default_factory=list)
    file_path: Path | None = None
    file_client_ids: list[str] = field(default_factory=list)
    bulk: int = 0
    duplicate_signups: list[dict[str, Any]] = field(default_factory=list)
    duplicate_messages: list[str] = field(default_factory=list)
    #: (body, reason the service must dead-letter it with)
    bad_messages: list[tuple[str, str]] = field(default_factory=list)
    bad_signups: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    failing_message: dict[str, Any] = field(default_factory=dict)
    failing_signup: dict[str, Any] = field(default_factory=dict)
    #: The lifecycle and reconciliation scenario (:mod:`local.demo_flows`).
    flows: Flows | None = None

    @property
    def client_ids(self) -> list[str]:
        """Every ClientId that must end as one stored user (the scenario's deleted one as its tombstone)."""
        flows = self.flows.client_ids if self.flows else []
        return [str(d["ClientId"]) for d in self.signups] + self.file_client_ids + flows

    @property
    def expected_users(self) -> int:
        """User items that must be stored: one per ClientId, plus the bulk request's and the adopted chunk's."""
        return len(self.client_ids) + self.bulk + (LOST_BULK if self.flows else 0)

    def upstream_users_expected(self, client_id: str) -> int:
        """Users the upstream must hold for a ClientId at the end: one, except where the scenario made it otherwise."""
        if self.flows is None:
            return 1
        special = {
            self.flows.cid("life-del"): 0,  # erased
            self.flows.cid("drift-gone"): 0,  # deleted behind our back
            self.flows.cid("drift-unstored"): 2,  # someone else created a second one
        }
        return special.get(client_id, 1)

    @property
    def expected_duplicates(self) -> int:
        """Deliveries that must be answered with an existing user."""
        return len(self.duplicate_signups) + len(self.duplicate_messages)

    def expected_dead_letters(self) -> dict[str, collections.Counter[str]]:
        """Reasons expected in each dead-letter queue."""
        registration = collections.Counter(reason for _, reason in self.bad_messages)
        signup = collections.Counter(reason for _, reason in self.bad_signups)
        if self.failing_message:
            registration[REDRIVEN] += 1
        if self.failing_signup:
            signup["RetriesExhausted: UnauthorizedError"] += 1
        lifecycle: collections.Counter[str] = collections.Counter()
        if self.flows:
            registration["bulk_incomplete"] += 1  # the lost chunk's bulk, before its adoption
            lifecycle.update(reason for _, _, reason in self.flows.bad_changes)
        return {
            "RegistrationDeadLetterQueue": registration,
            "SignupDeadLetterQueue": signup,
            "RefreshDeadLetterQueue": collections.Counter(),
            "SweepDeadLetterQueue": collections.Counter(),
            "LifecycleDeadLetterQueue": lifecycle,
            "ReconcileDeadLetterQueue": collections.Counter(),
        }


def _profile(rng: random.Random, client_id: str) -> dict[str, Any]:
    first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
    country, city = rng.choice(_CITIES)
    return {
        "ClientId": client_id,
        "FirstName": first,
        "LastName": last,
        "Email": f"{first}.{last}.{client_id}@example.com".lower(),
        "Phone": f"+1555{rng.randrange(10**6):06d}",
        "Gender": rng.choice(["Female", "Male", "Other", "None"]),
        "Birthday": f"{rng.randrange(1950, 2005)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}",
        "Country": country,
        "City": city,
        "UserFields": {"EnableTracking": True, "EnableLogging": rng.random() < 0.2},
    }


def build_workload(options: DemoOptions, directory: Path) -> Workload:
    """Generate the run's signups, file, duplicates and bad messages (written file: ``directory``)."""
    rng = random.Random(options.seed)
    run = uuid.UUID(int=rng.getrandbits(128)).hex[:6] if options.seed is not None else uuid.uuid4().hex[:6]
    work = Workload(run=run, bulk=options.bulk)
    work.signups = [_profile(rng, f"app-{run}-{n:04d}") for n in range(options.signups)]
    file_lines = [_profile(rng, f"file-{run}-{n:05d}") for n in range(options.file_users)]
    # camelCase keys on some lines: the contract accepts both spellings.
    for line in file_lines[::7]:
        line["firstName"] = line.pop("FirstName")
    work.file_client_ids = [str(line["ClientId"]) for line in file_lines]
    directory.mkdir(parents=True, exist_ok=True)
    work.file_path = directory / "demo-registrations.jsonl"
    work.file_path.write_text("".join(json.dumps(line) + "\n" for line in file_lines), encoding="utf-8")

    # Duplicates, a third each: republished events, repeated file lines, a signup's ClientId on the queue too.
    for n in range(options.duplicates):
        kind = n % 3
        if kind == 0 and work.signups:
            work.duplicate_signups.append(work.signups[n % len(work.signups)])
        elif kind == 1 and file_lines:
            work.duplicate_messages.append(json.dumps(file_lines[n % len(file_lines)]))
        elif work.signups:
            work.duplicate_messages.append(
                json.dumps({"ClientId": work.signups[-1 - n % len(work.signups)]["ClientId"]})
            )
        elif file_lines:
            work.duplicate_messages.append(json.dumps(file_lines[n % len(file_lines)]))

    work.bad_messages = [
        ("{not json", "not_json"),
        ("[1, 2, 3]", "not_an_object"),
        (json.dumps({"FirstName": "No ClientId"}), "invalid_fields"),
        (json.dumps({"ClientId": f"bad-{run}-1", "Gender": "Robot"}), "invalid_fields"),
        (json.dumps({"Quantity": 0}), "invalid_fields"),
        (json.dumps({"ClientId": f"bad-{run}-2", "Instance": "nowhere"}), "unknown_instance"),
    ]
    work.bad_signups = [({"FirstName": "No client id", "ChildrenCount": -1}, "invalid_fields")]
    work.failing_message = {"ClientId": f"revoked-{run}-q", "Instance": REVOKED_ALIAS}
    work.failing_signup = {"ClientId": f"revoked-{run}-s", "Instance": REVOKED_ALIAS}
    work.flows = Flows(run=run, state_path=options.state)
    return work


def feed(stack: LocalStack, work: Workload, say: Callable[[str], None]) -> None:
    """Send the workload through the AWS APIs (EventBridge PutEvents, SQS SendMessageBatch) only."""
    events, sqs = client(stack, "events"), client(stack, "sqs")
    publish_signups(stack, work.signups, events=events)
    say(f"published {len(work.signups)} UserSignedUp events on bus {stack.parameters['SignupEventBusName']!r}")
    if work.file_path is not None:
        count = len(load_file(stack, work.file_path, sqs=sqs))
        say(f"loaded {count} registrations from {work.file_path} onto the registration queue")
    if work.bulk:
        send_messages(stack, [{"Quantity": work.bulk, "RequestId": f"demo-{work.run}"}], sqs=sqs)
        say(f"sent one bulk request for {work.bulk} anonymous users")
    publish_signups(stack, work.duplicate_signups, events=events)
    send_messages(stack, work.duplicate_messages, sqs=sqs)
    say(f"sent {work.expected_duplicates} duplicate deliveries (republished events, repeated lines, both paths)")
    send_messages(stack, [body for body, _ in work.bad_messages], sqs=sqs)
    publish_signups(stack, [detail for detail, _ in work.bad_signups], events=events)
    say(f"sent {len(work.bad_messages) + len(work.bad_signups)} bad messages")
    send_messages(stack, [work.failing_message], sqs=sqs)
    publish_signups(stack, [work.failing_signup], events=events)
    say(f"sent 2 registrations for instance {REVOKED_ALIAS!r}, whose key the upstream rejects (401)")


# --------------------------------------------------------------------------------------------- observation


class OutcomeObserver:
    """Subscribes to the service's outcome events, as the customer's backend would: a rule and a queue in moto.

    These two resources belong to the demo (the subscriber), not to template.yaml.
    """

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.counts: collections.Counter[str] = collections.Counter()
        #: ``TelematicsUserRegistered`` details by DeviceToken, and ``TelematicsRegistrationFailed`` by MessageId.
        self.registered: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        self.failed: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        #: Every event received, in order: (detail-type, detail).
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._sqs = client(stack, "sqs")
        source = next(iter(stack.functions.values())).environment["OUTCOME_EVENT_SOURCE"]
        name = f"{stack.stack_name}-demo-outcomes"
        self.queue_url: str = self._sqs.create_queue(QueueName=name)["QueueUrl"]
        arn = self._sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])["Attributes"]
        events = client(stack, "events")
        bus = stack.parameters["SignupEventBusName"]
        events.put_rule(Name=name, EventBusName=bus, EventPattern=json.dumps({"source": [source]}))
        events.put_targets(Rule=name, EventBusName=bus, Targets=[{"Id": "demo", "Arn": arn["QueueArn"]}])

    def poll(self) -> collections.Counter[str]:
        """Count the events that arrived since the last poll; returns the totals."""
        while True:
            messages = self._sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10).get("Messages", [])
            if not messages:
                return self.counts
            for message in messages:
                event = json.loads(message["Body"])
                kind = str(event.get("detail-type"))
                detail = event.get("detail") if isinstance(event.get("detail"), dict) else {}
                self.events.append((kind, detail))
                if kind == "TelematicsUserRegistered":
                    self.registered[str(detail.get("DeviceToken"))].append(detail)
                    if detail.get("Duplicate"):
                        kind += " (duplicate)"
                elif kind == "TelematicsRegistrationFailed":
                    self.failed[str(detail.get("MessageId"))].append(detail)
                self.counts[kind] += 1
            self._sqs.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
            )


@dataclass
class Snapshot:
    """The service's state as seen through the AWS APIs and the emulator's counters."""

    elapsed: float
    users: dict[str, int]  # Status -> count
    versions: list[int]  # Version of every ACTIVE user
    expired: int  # ACTIVE users whose access token has expired
    queue_depths: dict[str, int]  # logical id -> visible + in flight + delayed
    upstream: dict[str, Any]
    sweeps: int
    #: Nothing registering: the registration functions neither run nor hold asynchronous events, the taps are empty.
    idle: bool

    @property
    def stored(self) -> int:
        """Users in the table, whatever their status."""
        return sum(self.users.values())

    def rotated(self, rotations: int) -> int:
        """ACTIVE users whose tokens were rotated at least ``rotations`` times since registration."""
        return sum(1 for version in self.versions if version >= 1 + rotations)


def scan_users(stack: LocalStack, dynamodb: Any) -> list[dict[str, Any]]:
    """Every user item of the tokens table (attributes needed for the summary only; no token is read)."""
    deserializer = TypeDeserializer()
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {
        "TableName": stack.outputs["TokensTableName"],
        "ProjectionExpression": "pk, #s, Version, AccessExpiresAt, ClientId, Instance, AdoptedFrom",
        "FilterExpression": "begins_with(pk, :user)",
        "ExpressionAttributeNames": {"#s": "Status"},
        "ExpressionAttributeValues": {":user": {"S": "USER#"}},
    }
    while True:
        page = dynamodb.scan(**kwargs)
        items += [{k: deserializer.deserialize(v) for k, v in item.items()} for item in page.get("Items", [])]
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def queue_depth(sqs: Any, url: str) -> int:
    """Messages in a queue: visible, in flight and delayed."""
    names = [
        "ApproximateNumberOfMessages",
        "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed",
    ]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
    return sum(int(attributes.get(name, 0)) for name in names)


def snapshot(service: LocalService, started: float, dynamodb: Any, sqs: Any) -> Snapshot:
    """Read the service's state now (a scan of the table, queue attributes, the emulator's counters)."""
    stack = service.stack
    users = scan_users(stack, dynamodb)
    now = time.time()
    # Adopted users are logged in at the fleet's Login pace, not rotated by the demo's deadline: not counted here.
    active = [u for u in users if u.get("Status") == "ACTIVE" and not u.get("AdoptedFrom")]
    stats = service.runtime.stats()
    taps = [t.tap_queue_url for rule in stack.rules for t in rule.targets if t.tap_queue_url]
    depths = {
        logical_id: queue_depth(sqs, stack.queue_url(logical_id))
        for logical_id, kind in stack.resource_types.items()
        if kind == "AWS::SQS::Queue"
    }
    return Snapshot(
        elapsed=time.monotonic() - started,
        users=dict(collections.Counter(str(u.get("Status")) for u in users)),
        versions=sorted(int(u.get("Version", 0)) for u in active),
        expired=sum(1 for u in active if int(u.get("AccessExpiresAt", 0)) <= now),
        queue_depths=depths,
        upstream=service.emulator.counters(),
        sweeps=sum(stats.schedule_fires.values()),
        idle=not any(stats.busy(name) for name in REGISTERING_FUNCTIONS)
        and all(queue_depth(sqs, url) == 0 for url in taps),
    )


def status_line(snap: Snapshot, work: Workload | None, rotations: int) -> str:
    """One line of progress: users stored, queue depths, dead letters, sweeps, refreshes, rotated users."""
    depths = snap.queue_depths
    registered = f"{snap.stored}/{work.expected_users}" if work else str(snap.stored)
    rotated = f"{snap.rotated(rotations)}/{len(snap.versions)}"
    return (
        f"{snap.elapsed:6.1f}s  registered {registered}  queued {depths.get('RegistrationQueue', 0)}"
        f"  refresh jobs {depths.get('RefreshQueue', 0)}"
        f"  DLQ reg {depths.get('RegistrationDeadLetterQueue', 0)} signup {depths.get('SignupDeadLetterQueue', 0)}"
        f"  sweeps {snap.sweeps}  refreshes {snap.upstream.get('refreshes', 0)}  rotated {rotated}"
    )


def settled(snap: Snapshot, work: Workload, rotations: int) -> bool:
    """Every user stored and rotated, the queue drained, every expected dead letter in place, registration done.

    The refresh functions keep working while tokens live (that is their job): only the registration side must be
    quiet, so a busy machine cannot keep the run from settling.
    """
    expected = work.expected_dead_letters()
    return (
        snap.stored >= work.expected_users
        and snap.queue_depths.get("RegistrationQueue", 0) == 0
        and all(snap.queue_depths.get(q, 0) >= sum(expected[q].values()) for q in expected)
        and snap.rotated(rotations) == len(snap.versions)
        and snap.idle
        and (work.flows is None or work.flows.done)
    )


# --------------------------------------------------------------------------------------------- summary


def dead_letter_reason(message: dict[str, Any]) -> str:
    """Why a message is in a dead-letter queue, from whatever put it there.

    The service's own dead letters carry a ``Reason`` attribute; Lambda's on-failure destination sends an
    invocation record (``requestContext.condition`` and the error type); EventBridge and Scheduler add
    ``ERROR_CODE``; a message SQS redrove carries nothing but its receive count.
    """
    attributes = message.get("MessageAttributes", {})
    if "Reason" in attributes:
        return str(attributes["Reason"]["StringValue"])
    if "ERROR_CODE" in attributes:
        return f"undeliverable: {attributes['ERROR_CODE']['StringValue']}"
    with contextlib.suppress(ValueError, KeyError, AttributeError, TypeError):
        record = json.loads(message["Body"])
        condition = record["requestContext"]["condition"]
        return f"{condition}: {(record.get('responsePayload') or {}).get('errorType', 'no error')}"
    return REDRIVEN


def dead_letter_origin(message: dict[str, Any]) -> str:
    """The delivery a dead letter stands for, so that a letter repeated by a legitimate redelivery counts once.

    The service's own letters carry ``OriginalMessageId`` (the SQS message id, or the signup event's id); Lambda's
    on-failure record holds the event (``requestPayload.id``); a message SQS redrove is itself.
    """
    attributes = message.get("MessageAttributes", {})
    if "OriginalMessageId" in attributes:
        return str(attributes["OriginalMessageId"]["StringValue"])
    with contextlib.suppress(ValueError, KeyError, AttributeError, TypeError):
        return str(json.loads(message["Body"])["requestPayload"]["id"])
    return str(message.get("MessageId"))


def distinct_reasons(messages: Sequence[dict[str, Any]]) -> collections.Counter[str]:
    """Dead-letter reasons, each delivery counted once (see :func:`dead_letter_origin`)."""
    origins = {dead_letter_origin(m): dead_letter_reason(m) for m in messages}
    return collections.Counter(origins.values())


def drain_dead_letters(stack: LocalStack, sqs: Any) -> dict[str, list[dict[str, Any]]]:
    """Every message of each dead-letter queue (received; the run is ending)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for logical_id in DEAD_LETTER_QUEUES:
        url = stack.queue_url(logical_id)
        messages: list[dict[str, Any]] = []
        while True:
            batch = sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["All"], MessageAttributeNames=["All"]
            ).get("Messages", [])
            if not batch:
                break
            messages += batch
        found[logical_id] = messages
    return found


@dataclass
class Check:
    """One promise of the run, whether it was kept, and the numbers behind it."""

    name: str
    ok: bool
    detail: str


def _counter_text(counter: collections.Counter[str]) -> str:
    return " · ".join(f"{reason} {count}" for reason, count in sorted(counter.items())) or "none"


def summarise(  # noqa: PLR0915 - one block per promise, read top to bottom
    service: LocalService, work: Workload, observer: OutcomeObserver, options: DemoOptions
) -> list[Check]:
    """Compare the end state with what the workload must have produced; one :class:`Check` per promise."""
    stack = service.stack
    dynamodb, sqs = client(stack, "dynamodb"), client(stack, "sqs")
    users = scan_users(stack, dynamodb)
    counters = service.emulator.counters()
    stats = service.runtime.stats()
    outcomes = observer.poll()
    letters = drain_dead_letters(stack, sqs)
    now = time.time()
    checks: list[Check] = []

    statuses = collections.Counter(str(u.get("Status")) for u in users)
    flows = work.flows
    expected_status = {}
    if flows is not None:
        expected_status = {flows.cid("life-del"): "DELETED", flows.cid("drift-gone"): "GONE"}
    per_cid = collections.Counter(str(u["ClientId"]) for u in users if u.get("ClientId"))
    status_of = {str(u["ClientId"]): str(u.get("Status")) for u in users if u.get("ClientId")}
    not_once = [cid for cid in work.client_ids if per_cid.get(cid) != 1]
    wrong_status = [
        f"{cid} {status_of.get(cid)}"
        for cid in work.client_ids
        if per_cid.get(cid) == 1 and status_of[cid] != expected_status.get(cid, "ACTIVE")
    ]
    adopted = [u for u in users if u.get("AdoptedFrom")]
    bulk_users = [u for u in users if not u.get("ClientId") and not u.get("AdoptedFrom")]
    bulk_active = sum(1 for u in bulk_users if u.get("Status") == "ACTIVE")
    checks.append(
        Check(
            "Users registered (DynamoDB)",
            not not_once and not wrong_status and len(bulk_users) == bulk_active == work.bulk,
            f"{len(users)} stored: {len(work.client_ids)} ClientIds"
            + (f" ({len(not_once)} not stored exactly once: {not_once[:5]})" if not_once else " once each")
            + f", {len(bulk_users)} bulk ({bulk_active} ACTIVE, expected {work.bulk}), {len(adopted)} adopted"
            + f"; status {_counter_text(statuses)}"
            + (f"; unexpected status: {wrong_status[:5]}" if wrong_status else ""),
        )
    )

    per_client = counters.get("users_by_client_id", {})
    upstream_of: collections.Counter[str] = collections.Counter()
    for key, n in per_client.items():
        upstream_of[key.split("/", 1)[1]] += int(n)
    wrong = {
        cid: upstream_of.get(cid, 0)
        for cid in work.client_ids
        if upstream_of.get(cid, 0) != work.upstream_users_expected(cid)
    }
    expected_total = sum(work.upstream_users_expected(cid) for cid in work.client_ids) + work.bulk
    expected_total += LOST_BULK if flows is not None else 0
    checks.append(
        Check(
            "Upstream users per ClientId",
            not wrong and counters.get("users_total") == expected_total,
            f"{len(work.client_ids) - len(wrong)}/{len(work.client_ids)} ClientIds have the users they must (1; the "
            "erased and the one deleted behind our back 0, the one someone else registered again 2)"
            + (f"; not so: {dict(list(wrong.items())[:5])}" if wrong else "")
            + f"; upstream users in all {counters.get('users_total')} (expected {expected_total})",
        )
    )

    # Invariants, not counts: a legitimate redelivery (SQS delivers at least once) may announce a user twice or
    # dead-letter a message twice; it must never make a second user. Each duplicate delivery is answered with the
    # existing user, so there are at least as many duplicate answers as duplicates sent.
    duplicates = outcomes.get("TelematicsUserRegistered (duplicate)", 0)
    checks.append(
        Check(
            "Duplicates suppressed",
            duplicates >= work.expected_duplicates,
            f"{work.expected_duplicates} duplicate deliveries sent, {duplicates} answered with the existing user; "
            f"no second Create (Creates {counters.get('creates')}, CreateMany users "
            f"{counters.get('create_many_users')})",
        )
    )

    active = [u for u in users if u.get("Status") == "ACTIVE" and not u.get("AdoptedFrom")]
    versions = sorted(int(u.get("Version", 0)) for u in active)
    # A refresh token dies with its user: one refresh of a user deleted upstream may be in flight (the erased one,
    # the one deleted behind our back) before the service knows. Any other rejection is a lost token.
    by_cause = dict(counters.get("rejected_refresh_tokens_by_cause", {}))
    lost_tokens = sum(int(n) for cause, n in by_cause.items() if cause != "deleted")
    deleted_rejections = int(by_cause.get("deleted", 0))
    rotated = sum(1 for v in versions if v >= 1 + options.rotations)
    expired = sum(1 for u in active if int(u.get("AccessExpiresAt", 0)) <= now)
    behind = sorted(
        str(u.get("ClientId") or u["pk"]) for u in active if int(u.get("Version", 0)) < 1 + options.rotations
    )
    spread = f"min {versions[0]} · median {statistics.median(versions):g} · max {versions[-1]}" if versions else "none"
    checks.append(
        Check(
            "Tokens refreshed",
            rotated == len(versions) and expired == 0 and lost_tokens == 0 and deleted_rejections <= 2,
            f"{counters.get('refreshes', 0)} refreshes, {counters.get('logins', 0)} logins, "
            f"{counters.get('rejected_refresh_tokens', 0)} refresh tokens rejected ({deleted_rejections} of users "
            f"deleted upstream); {rotated}/{len(versions)} users "
            f"rotated at least {options.rotations}x (Version {spread}); {expired} expired access tokens"
            + (f"; not rotated: {behind[:5]}" if behind else ""),
        )
    )

    expected_letters = work.expected_dead_letters()
    for logical_id in DEAD_LETTER_QUEUES:
        reasons = distinct_reasons(letters[logical_id])
        repeated = len(letters[logical_id]) - sum(reasons.values())
        checks.append(
            Check(
                f"{logical_id}",
                reasons == expected_letters[logical_id],
                f"{sum(reasons.values())} messages: {_counter_text(reasons)}"
                + (f" (+{repeated} repeated by a redelivery)" if repeated else "")
                + (
                    ""
                    if reasons == expected_letters[logical_id]
                    else f" (expected {_counter_text(expected_letters[logical_id])})"
                ),
            )
        )

    # Every stored user was announced (by DeviceToken), every ClientId among them; every bad message was announced
    # as failed (by its message id), and nothing else was.
    stored_tokens = {str(u["pk"]).removeprefix("USER#") for u in users if u.get("Status") != "DELETED"}
    every_token = {str(u["pk"]).removeprefix("USER#") for u in users}
    announced = set(observer.registered)
    announced_clients = {str(d.get("ClientId")) for ds in observer.registered.values() for d in ds if d.get("ClientId")}
    missing_clients = set(work.client_ids) - announced_clients
    # Failed: every bad message, the lost chunk's bulk and the deleted user's redelivered registration; the
    # registration racing its deletion too when the deletion won (either order is right).
    expected_failed = len(work.bad_messages) + len(work.bad_signups) + (2 if flows is not None else 0)
    failed_ok = expected_failed <= len(observer.failed) <= expected_failed + (1 if flows is not None else 0)
    checks.append(
        Check(
            "Outcome events",
            stored_tokens <= announced <= every_token and not missing_clients and failed_ok,
            f"{_counter_text(outcomes)}; {len(announced)} users announced for {len(stored_tokens)} stored"
            + (f", ClientIds never announced: {sorted(missing_clients)[:5]}" if missing_clients else "")
            + f"; {len(observer.failed)} failed messages announced (expected {expected_failed}"
            + (", +1 if the racing deletion won)" if flows is not None else ")"),
        )
    )
    if flows is not None:
        checks += [
            Check(c.name, c.ok, c.detail)
            for c in flows.checks(service, observer.events, options_margin=options.refresh_margin)
        ]
    stragglers = sum(s.stragglers for s in stats.functions.values())
    checks.append(
        Check(
            "Local runtime",
            stats.async_discarded == 0 and sum(stats.schedule_fires.values()) > 0 and stragglers == 0,
            " · ".join(
                f"{name} {s.invocations} invocations ({s.errors} failed"
                + (f", {s.timeouts} timed out" if s.timeouts else "")
                + (f"; {s.records} records, {s.records_failed} failed)" if s.records else ")")
                for name, s in sorted(stats.functions.items())
            )
            + f"; {stats.async_retries} async retries; {sum(stats.schedule_fires.values())} sweeps fired"
            + (f"; {stragglers} cut-off invocations still running" if stragglers else ""),
        )
    )
    return checks


def print_summary(checks: Sequence[Check], out: TextIO, *, elapsed: float) -> None:
    """Print the checks as a table a person reads at a glance, and the verdict."""
    width = max(len(check.name) for check in checks) + 2
    print(f"\n{'─' * 30} summary ({elapsed:.0f} s) {'─' * 30}", file=out)
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<{width}}{check.detail}", file=out)
    failed = [check.name for check in checks if not check.ok]
    if failed:
        print(f"\nRESULT: FAILED - not as expected: {', '.join(failed)}", file=out)
    else:
        print(
            "\nRESULT: OK - every registration accounted for, no duplicate upstream user, every token rotated", file=out
        )


# --------------------------------------------------------------------------------------------- running


def _redirect_stdout_logging(stream: TextIO | JsonLines) -> None:
    """Send handlers that write to the terminal (Powertools' JSON logger among them) to ``stream``."""
    redirect_terminal_handlers(stream)


def print_endpoints(service: LocalService, options: DemoOptions, out: TextIO) -> None:
    """Endpoints of the running stack and ready-to-paste commands."""
    stack = service.stack
    python = ".venv/bin/python" if Path(".venv/bin/python").exists() else sys.executable
    telematics_reg = ".venv/bin/telematics-reg" if Path(".venv/bin/telematics-reg").exists() else "telematics-reg"
    endpoints = [
        ("moto (AWS APIs)", f"{stack.endpoint_url}   (region {stack.region}, any credentials)"),
        ("User Service emulator", f"{service.emulator.url}   (counters: {service.emulator.url}/_emulator/counters)"),
        (
            "signup bus / source",
            f"{stack.parameters['SignupEventBusName']} / {stack.parameters['SignupEventSource']}"
            " (detail-type UserSignedUp)",
        ),
        ("tokens table", stack.outputs["TokensTableName"]),
        *[(name.removesuffix("Url"), url) for name, url in stack.outputs.items() if name.endswith("QueueUrl")],
        ("stack description", f"{options.state}   (LocalStack.load, for other tools)"),
        ("logs", str(options.log_file)),
    ]
    width = max(len(label) for label, _ in endpoints) + 2
    lines = ["", "The service runs locally:", *[f"  {label:<{width}}{value}" for label, value in endpoints], ""]
    lines += [
        "Try (in another terminal, from the repository root):",
        f'  {python} -m local.send signup \'{{"ClientId": "me-1", "FirstName": "Ada"}}\' --wait',
        f'  {python} -m local.send message \'{{"ClientId": "me-2", "Gender": "Robot"}}\' --wait   # dead-lettered',
        f"  {python} -m local.send load {options.state.parent / 'demo-registrations.jsonl'}   # one body a line",
        f"  {python} -m local.send bulk 25 --wait",
        f"  {telematics_reg} status",
        f"  {telematics_reg} trace --client-id me-1   # everything about one registration, from {options.log_file}",
        f"  {python} -c \"import boto3; print(boto3.client('dynamodb', endpoint_url='{stack.endpoint_url}', "
        f"region_name='{stack.region}', aws_access_key_id='x', aws_secret_access_key='x')"
        f".scan(TableName='{stack.outputs['TokensTableName']}', Select='COUNT')['Count'])\"",
        f"  curl -s {service.emulator.url}/_emulator/counters",
        "",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), file=out, flush=True)


class _Progress:
    """A status line: rewritten in place on a terminal, printed every few seconds otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._last = 0.0
        self._text = ""

    def show(self, text: str, *, every: float = 5.0) -> None:
        """Update the status line (off a terminal: print it when it changed, at most every ``every`` s)."""
        if self.tty:
            print(f"\r{text}\033[K", end="", file=self.out, flush=True)
        elif text != self._text and time.monotonic() - self._last >= every:
            print(text, file=self.out, flush=True)
            self._last = time.monotonic()
        self._text = text

    def say(self, text: str) -> None:
        """Print a message line (clearing the status line first)."""
        if self.tty and self._text:
            print("\r\033[K", end="", file=self.out)
        print(text, file=self.out, flush=True)
        self._text = ""

    def done(self) -> None:
        """End the status line."""
        if self.tty and self._text:
            print(file=self.out, flush=True)
        self._text = ""


@contextlib.contextmanager
def _graceful_signals() -> Iterator[None]:
    """SIGTERM stops the run like Ctrl-C; a second Ctrl-C during shutdown exits at once."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _force_exit_on_second_interrupt() -> None:
    def force(signum: int, frame: FrameType | None) -> None:
        os._exit(130)

    signal.signal(signal.SIGINT, force)
    signal.signal(signal.SIGTERM, force)


def run_workload(
    service: LocalService, options: DemoOptions, progress: _Progress, observer: OutcomeObserver
) -> tuple[list[Check], float]:
    """Feed the workload, wait until it settles (or the timeout), and check the outcome."""
    started = time.monotonic()
    work = build_workload(options, options.state.parent)
    if work.flows is not None:
        # First, alone: the emulator drops the answer of the next CreateMany, which must be this bulk's.
        work.flows.feed_lost_bulk(service, progress.say)
    feed(service.stack, work, progress.say)
    if work.flows is not None:
        work.flows.feed(service, progress.say)
    dynamodb, sqs = client(service.stack, "dynamodb"), client(service.stack, "sqs")
    deadline = started + options.timeout
    while True:
        snap = snapshot(service, started, dynamodb, sqs)
        observer.poll()
        if work.flows is not None:
            work.flows.step(service, progress.say)
        progress.show(status_line(snap, work, options.rotations))
        if settled(snap, work, options.rotations):
            break
        if time.monotonic() >= deadline:
            progress.done()
            progress.say(f"timed out after {options.timeout:.0f} s: summarising what there is")
            break
        time.sleep(1.0)
    progress.done()
    service.runtime.wait_until_idle(10)
    return summarise(service, work, observer, options), time.monotonic() - started


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m local.demo`` (``make run``); returns the exit status."""
    options = parse_options(argv)
    out = sys.stdout
    progress = _Progress(out)
    options.log_file.parent.mkdir(parents=True, exist_ok=True)
    log_stream = options.log_file.open("w", encoding="utf-8")
    json_lines = configure_logs(log_stream)
    service = LocalService(
        stack_name=options.stack_name,
        parameters={
            "LogLevel": options.log_level,
            "RefreshMarginSeconds": str(options.refresh_margin),
            "RefreshSpreadSeconds": "2",
        },
        instances={
            alias: {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())}
            for alias in ("default", OTHER_ALIAS)
        },
        unknown_instances={REVOKED_ALIAS: {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())}},
        token_lifetime=options.token_lifetime,
        options=RuntimeOptions(
            failure_visibility_timeout=1,
            schedule_interval=options.sweep_every,
            async_retry_delay=1.0,
        ),
        state_path=options.state,
        prepare_stack=shorten_timing,
    )
    progress.say(timing_line())
    progress.say("starting moto, the User Service emulator and the template's resources ...")
    status = 0
    with _graceful_signals():
        try:
            service.start()
            # Like Lambda's stdout going to CloudWatch Logs: what the handlers print (Powertools' JSON logs, and
            # its metric lines, which it prints even when disabled) goes to the log file, not the terminal, one
            # JSON object a line.
            _redirect_stdout_logging(json_lines)
            sys.stdout = json_lines
            progress.say(
                f"stack {options.stack_name!r} provisioned from template.yaml in moto {service.stack.endpoint_url}; "
                f"handlers run in-process (logs: {options.log_file})"
            )
            progress.say(f"User Service emulator {service.emulator.login_limit_line}")
            observer = OutcomeObserver(service.stack)
            if options.serve:
                if not options.workload:
                    build_workload(
                        DemoOptions(signups=0, file_users=10, bulk=0, duplicates=0, seed=options.seed),
                        options.state.parent,
                    )
                print_endpoints(service, options, out)
            if not options.serve or options.workload:
                checks, elapsed = run_workload(service, options, progress, observer)
                print_summary(checks, out, elapsed=elapsed)
                status = 0 if all(check.ok for check in checks) else 1
            if options.serve:
                serve(service, progress)
        except KeyboardInterrupt:
            progress.done()
            progress.say("interrupted: shutting down (finishing running invocations) ...")
            # Ctrl-C is how --serve ends; a demo run that is cut short did not check anything.
            status = status if options.serve else 130
        except (LocalStackError, LocalRuntimeError, OSError) as exc:
            progress.done()
            print(f"local.demo: {exc}", file=sys.stderr)
            status = 2
        finally:
            _force_exit_on_second_interrupt()
            service.stop()
            sys.stdout = out
            json_lines.flush()
            log_stream.close()
    progress.say("stopped: moto, the emulator and the runtime are down")
    return status


def serve(service: LocalService, progress: _Progress) -> None:
    """Run until interrupted, showing a status line when something changes."""
    started = time.monotonic()
    dynamodb, sqs = client(service.stack, "dynamodb"), client(service.stack, "sqs")
    while True:
        snap = snapshot(service, started, dynamodb, sqs)
        progress.show(status_line(snap, None, 1), every=10.0)
        time.sleep(2.0)


if __name__ == "__main__":
    sys.exit(main())
