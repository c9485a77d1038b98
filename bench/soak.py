"""``make soak``: a load and fault soak of the whole service on the local stack of ``make run``, checked against the
invariants of DESIGN.md; it exits 1 when one is broken (so it can gate a release) and records its results.

Usage (from the repository root)::

    make soak                   # the default sizes: about 7 minutes on 2 CPUs
    make soak ARGS="--signups 5000 --registrations 5000 --both-paths 200 --bulk 500 --rate 9 --token-lifetime 1350 \
                    --kill-after-refreshes 0 --timeout 6600"   # the issue's sizes: about 1 h 30 min here
    .venv/bin/python bench/soak.py --help

What one run does
-----------------
1. **The stack of make run.** A moto server (in this process), the User Service emulator (a child process) and
   template.yaml's resources provisioned in moto (:func:`local.stack.provision`); the event runner
   (:class:`local.runner.LocalRuntime`: SQS pollers, the signup rule's tap, the schedule) runs in a *child process*
   (``bench/soak_runtime.py``) so it can be killed. That child also fires a **second sweeper** (a twin of the sweeper
   function on its own timer) so that two sweeps overlap.
2. **Faults.** The emulator answers 10% of the four upstream calls with 503, 5% with 429 + ``Retry-After: 1``, drops
   2% of them after committing ("commit then drop"), and waits 20-200 ms before each.
3. **Load.** ``--signups`` ``UserSignedUp`` events on the bus and ``--registrations`` messages on the registration
   queue, fed at ``--rate`` messages/s in a random interleaving: 10% of each delivered twice (the copy a few seconds
   later), ``--both-paths`` ClientIds sent on the bus and on the queue at the same moment, 2% malformed messages of
   every kind (each must be dead-lettered with its reason and never reach the upstream), and a bulk request of
   ``--bulk`` users.
4. **Kill.** Half-way through the feed (and once token refreshes are under way) the bulk request is sent, and as soon
   as one of its CreateMany chunks is in flight the runner is killed with SIGKILL. What it held is recorded
   (PENDING claims, live refresh leases, bulk chunk states, messages in flight) and a new runner starts at once
   against the same moto server and emulator, as Lambda's pollers would go on. The messages the dead runner held
   stay invisible until their visibility timeout lapses. The template's is 360 s (6x the function timeout) and no
   parameter overrides it, so the lapse is *simulated*: ``--orphan-visibility`` (185 s) after the kill, exactly those
   messages (same receipt handle as at the kill) are made visible again in moto. 125 s keeps the order the design
   relies on -- visibility timeout > registration claim (120 s) > refresh lease (60 s) -- so a redelivered message
   finds its dead holder's claim or lease expired, as on AWS; making them visible at once would not.
5. **Tokens.** Tokens live ``--token-lifetime`` s and are refreshed ``--refresh-margin`` s before expiry, so every user
   goes through at least ``--cycles`` refreshes during the run. When the feed is over, 1% of all refresh tokens are
   revoked (``emulator.revoke(fraction=0.01)``), and ``--dead-tokens`` more users are revoked *and* denied Login: only
   those may end ``NEEDS_RELOGIN``.
6. **Settle, stop, check.** When every registration is accounted for and every user is rotated, the runner is stopped
   cleanly, the faults are cleared, every stored refresh token is spent once against the emulator (each must be the
   live one), and the checks below are printed and appended to ``bench/RESULTS.md``.

Sizing
------
On the local stack one moto process serves every AWS call on two shared cores, and that bounds what a run can
carry: about 10 refreshes/s with everything else going on (the default run refreshed 6.4/s on average and kept every
token alive). Every user is refreshed ``--cycles`` times, one cycle taking about ``--token-lifetime`` minus
``--refresh-margin`` plus 10 s (sweep period and spread), so a run needs::

    users / (token_lifetime - refresh_margin + 10)  <=  ~8 refreshes/s       (else tokens expire while queued)
    duration  ~=  kill time + orphan visibility (125 s) + cycles x (token_lifetime - refresh_margin + 10)

(the bulk request is held by the killed runner, so its users are stored only when the orphans come back). The
defaults (300 + 300 signups/registrations, 60 on both paths, bulk 150: 690 users; 120 s tokens; 7 messages/s so the
feed is still running when refreshes begin and the kill catches both) finish in about 7 minutes. The issue's sizes
(10,300 users) need 1,500 s tokens and so about 1 h 45 min.

Methods
-------
* *Signup-to-stored latency*: the time of the publish call (this process's clock, taken just before PutEvents /
  SendMessageBatch) to the ``SentTimestamp`` (ms) that moto, in this process, stamps on the first
  ``TelematicsUserRegistered`` event of that ClientId when it reaches a queue subscribed to the outcome events. The
  service publishes that event only after the user's tokens are stored (a duplicate delivery only after reading the
  stored user), so it bounds the storing time from above by one PutEvents call; DynamoDB's ``CreatedAt`` is the
  claim's time and has second resolution, and polling the table would add the polling period.
* *Rejected refresh tokens*: the emulator records why it rejected each one (``revoked`` / ``spent`` / ``unknown``) and
  for which user. Revoked tokens are expected (each at most once); a spent token presented again means two refreshers
  spent the same token, or one replayed a token whose rotation was lost. None is allowed, not even for the refreshes
  the kill cut between the upstream's rotation and the commit: the worker that takes over a lapsed lease logs in
  instead of presenting the stored token.

Checks (exit status 1 when one fails)
-------------------------------------
One upstream user per ClientId · every registration stored or dead-lettered with its reason, bad input never upstream
· the bulk request never doubled, each chunk stored or reported · no token lost (every stored refresh token live, dead
tokens marked and announced, revoked ones recovered by Login) · no refresh token spent twice · no secret in logs,
events or dead letters · upstream concurrency bounded · and that the run did what it claims (kill with work in flight,
refresh cycles, overlapping sweeps, revocation).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import math
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "layers" / "telematics"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import requests  # noqa: E402
from boto3.dynamodb.types import TypeDeserializer  # noqa: E402
from moto.sqs.models import sqs_backends  # noqa: E402

from local import moto_server  # noqa: E402
from local.demo import (  # noqa: E402
    DEAD_LETTER_QUEUES,
    Check,
    _counter_text,
    _profile,
    dead_letter_reason,
    drain_dead_letters,
    queue_depth,
)
from local.emulator.login_limit import VENDOR_LIMIT_PER_MINUTE  # noqa: E402
from local.emulator.testing import EmulatorHandle, login_limit_relaxations, running_emulator  # noqa: E402
from local.send import client, publish_signups, send_messages  # noqa: E402
from local.stack import LocalStack, provision  # noqa: E402
from telematics_reg.credentials import SecretsManagerDeviceTokenKey  # noqa: E402
from telematics_reg.registration import CREATE_MANY_CHUNK, device_token_for  # noqa: E402
from telematics_reg.settings import ServiceSettings  # noqa: E402

log = logging.getLogger("soak")

RESULTS_PATH: Final = REPO_ROOT / "bench" / "RESULTS.md"
RUNNER_SCRIPT: Final = REPO_ROOT / "bench" / "soak_runtime.py"
OUTCOME_SOURCE: Final = "telematics.registration"
RUNNER_POLL_WAIT: Final = 1  # RuntimeOptions.poll_wait_seconds of the runner (its default)
SWEEPER: Final = "RefreshSweeperFunction"
#: Shaped like an access token (a JWT) or a refresh token (base64 of 32 bytes): must never appear in a log or event.
JWT: Final = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
REFRESH_TOKEN: Final = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{43}=(?![A-Za-z0-9+/=])")
_deserializer: Final = TypeDeserializer()
#: With --claim-seconds/--lease-seconds (quick runs), what lets such short claims and leases pass the service's own
#: checks (claims and leases must outlive the function and its longest upstream call, plus clock skew): upstream calls
#: bounded to a few seconds (2 attempts, 0.5 s connect, 1.5 s read, Retry-After up to 2 s), a 1 s commit allowance,
#: no clock skew, and a declared function timeout no longer than the TTLs. Below what AWS needs: said in the output.
QUICK_TIMING: Final = {
    "UPSTREAM_MAX_ATTEMPTS": "2",
    "UPSTREAM_CONNECT_TIMEOUT": "0.5",
    "UPSTREAM_READ_TIMEOUT": "1.5",
    "UPSTREAM_MAX_RETRY_AFTER": "2",
    "REFRESH_COMMIT_SECONDS": "1",
    "CLOCK_SKEW_SECONDS": "0",
}


def quick_timing_environment(claim_seconds: int | None, lease_seconds: int | None) -> dict[str, str]:
    """The functions' environment for shortened claims and leases (empty when neither is shortened)."""
    if claim_seconds is None and lease_seconds is None:
        return {}
    environment = dict(QUICK_TIMING)
    environment["FUNCTION_TIMEOUT_SECONDS"] = str(min(claim_seconds or 120, lease_seconds or 180))
    if claim_seconds is not None:
        environment["CLAIM_SECONDS"] = str(claim_seconds)
    if lease_seconds is not None:
        environment["REFRESH_LEASE_SECONDS"] = str(lease_seconds)
    return environment


#: The template's most for LoginBudgetPerMinute (below the vendor's Login limit of 5 a minute per source IP).
TEMPLATE_MAX_LOGIN_BUDGET: Final = 4


def login_budget_environment(login_budget: int) -> dict[str, str]:
    """The functions' environment for a Login budget above what the template allows: the soak's revocations and lost
    answers need more Logins than the vendor permits, so the service is told the upstream's limit is higher (the
    emulator's Login limit must allow it too). Said in the run's output."""
    if login_budget <= TEMPLATE_MAX_LOGIN_BUDGET:
        return {}
    return {"LOGIN_BUDGET_PER_MINUTE": str(login_budget), "UPSTREAM_LOGIN_LIMIT_PER_MINUTE": str(login_budget + 1)}


def quick_timing_problem(claim_seconds: int | None, lease_seconds: int | None) -> str | None:
    """Why the service would refuse these shortened claims and leases, or None."""
    quick = quick_timing_environment(claim_seconds, lease_seconds)
    try:
        ServiceSettings(**{name.lower(): value for name, value in quick.items()})
    except ValueError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class SoakOptions:
    """The knobs of a run (``python bench/soak.py --help``)."""

    signups: int = 300
    registrations: int = 300
    duplicate_rate: float = 0.10
    both_paths: int = 60
    bulk: int = 150
    malformed_rate: float = 0.02
    rate: float = 7.0
    token_lifetime: int = 120
    refresh_margin: int = 60
    refresh_spread: int = 5
    cycles: int = 3
    sweep_every: float = 10.0
    login_budget: int = 600
    refresh_concurrency: int = 5
    revoke_fraction: float = 0.01
    dead_tokens: int = 5
    error_rate: float = 0.10
    rate_limit_rate: float = 0.05
    retry_after_s: float = 1.0
    drop_rate: float = 0.02
    latency_ms: tuple[int, int] = (20, 200)
    kill: bool = True
    kill_at: float = 0.5
    kill_after_refreshes: int = 20
    orphan_visibility: int = 185
    claim_seconds: int | None = None
    lease_seconds: int | None = None
    failure_visibility: int = 40
    async_retry_delay: float = 60.0
    timeout: float = 560.0
    seed: int | None = None
    log_level: str = "WARNING"
    workdir: Path = REPO_ROOT / ".local-stack" / "soak"
    results: Path | None = RESULTS_PATH
    label: str | None = None

    @property
    def faults(self) -> dict[str, Any]:
        """The emulator's fault settings for the run (all four upstream calls, create_many included)."""
        return {
            "error_rate": self.error_rate,
            "rate_limit_rate": self.rate_limit_rate,
            "retry_after_s": self.retry_after_s,
            "drop_after_commit_rate": self.drop_rate,
            "latency_ms": list(self.latency_ms),
        }

    @property
    def title(self) -> str:
        if self.label:
            return self.label
        return f"{self.signups:,} signups + {self.registrations:,} registrations"


def parse_options(argv: Sequence[str] | None = None) -> SoakOptions:
    """Command-line options."""
    d = SoakOptions()
    parser = argparse.ArgumentParser(
        prog="bench/soak.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add = parser.add_argument
    add("--signups", type=int, default=d.signups, help="UserSignedUp events with a new ClientId (%(default)s)")
    add("--registrations", type=int, default=d.registrations, help="registration messages (%(default)s)")
    add("--duplicate-rate", type=float, default=d.duplicate_rate, help="of each, delivered twice (%(default)s)")
    add("--both-paths", type=int, default=d.both_paths, help="ClientIds sent on the bus and the queue (%(default)s)")
    add("--bulk", type=int, default=d.bulk, help="Quantity of the bulk request, 0 for none (%(default)s)")
    add("--malformed-rate", type=float, default=d.malformed_rate, help="malformed messages (%(default)s)")
    add("--rate", type=float, default=d.rate, help="messages fed per second, 0 = all at once (%(default)s)")
    add("--token-lifetime", type=int, default=d.token_lifetime, help="access token lifetime, s (%(default)s)")
    add("--refresh-margin", type=int, default=d.refresh_margin, help="RefreshMarginSeconds, >= 60 (%(default)s)")
    add("--refresh-spread", type=int, default=d.refresh_spread, help="RefreshSpreadSeconds (%(default)s)")
    add("--cycles", type=int, default=d.cycles, help="refreshes every user must go through (%(default)s)")
    add("--sweep-every", type=float, default=d.sweep_every, help="period of each of the 2 sweepers, s (%(default)s)")
    add("--login-budget", type=int, default=d.login_budget, help="LoginBudgetPerMinute (%(default)s)")
    add(
        "--refresh-concurrency",
        type=int,
        default=d.refresh_concurrency,
        help="RefreshMaximumConcurrency, refresh worker invocations at once (%(default)s)",
    )
    add("--revoke-fraction", type=float, default=d.revoke_fraction, help="refresh tokens revoked (%(default)s)")
    add("--dead-tokens", type=int, default=d.dead_tokens, help="users revoked and denied Login (%(default)s)")
    add("--error-rate", type=float, default=d.error_rate, help="upstream 503 rate (%(default)s)")
    add("--rate-limit-rate", type=float, default=d.rate_limit_rate, help="upstream 429 rate (%(default)s)")
    add("--drop-rate", type=float, default=d.drop_rate, help="commit-then-drop rate (%(default)s)")
    add("--latency-ms", type=int, nargs=2, default=list(d.latency_ms), help="upstream latency range (20 200)")
    add("--no-kill", action="store_true", help="do not kill the runner mid-run")
    add("--kill-at", type=float, default=d.kill_at, help="kill when this fraction is fed (%(default)s)")
    add(
        "--kill-after-refreshes",
        type=int,
        default=d.kill_after_refreshes,
        help="... and this many refreshes were made, unless the feed is over (%(default)s)",
    )
    add(
        "--orphan-visibility",
        type=int,
        default=d.orphan_visibility,
        help="messages the killed runner held come back after S s (%(default)s)",
    )
    add(
        "--claim-seconds",
        type=int,
        help="registration claim TTL (the functions' CLAIM_SECONDS; unset: the service's 120) - for quick runs",
    )
    add(
        "--lease-seconds",
        type=int,
        help="refresh lease TTL (REFRESH_LEASE_SECONDS; unset: the service's 180) - for quick runs",
    )
    add("--failure-visibility", type=int, default=d.failure_visibility, help="failed SQS records back after S s")
    add("--async-retry-delay", type=float, default=d.async_retry_delay, help="first async retry after S s")
    add("--timeout", type=float, default=d.timeout, help="give up waiting after S s (%(default)s)")
    add("--seed", type=int, help="seed of the workload")
    add("--log-level", default=d.log_level, choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="LogLevel parameter")
    add("--workdir", type=Path, default=d.workdir, help="logs and state (%(default)s)")
    add("--results", type=Path, default=d.results, help="markdown file to record in (%(default)s)")
    add("--no-record", action="store_true", help="do not write the results file")
    add("--label", help="heading of the recorded section (default: the sizes)")
    args = parser.parse_args(argv)
    if args.refresh_margin < 60:
        parser.error("--refresh-margin must be at least 60 (the template's MinValue)")
    if args.token_lifetime <= args.refresh_margin + args.sweep_every:
        parser.error("--token-lifetime must exceed the refresh margin plus a sweep period")
    if args.both_paths > min(args.signups, args.registrations):
        parser.error("--both-paths cannot exceed --signups or --registrations")
    # The simulated visibility timeout must stay longer than a claim and a lease, as 360 s is on AWS: a redelivered
    # message must find its dead holder's claim or lease expired.
    if args.orphan_visibility <= max(args.claim_seconds or 120, args.lease_seconds or 180):
        parser.error("--orphan-visibility must exceed the claim (120 s) and lease (180 s) TTLs")
    if problem := quick_timing_problem(args.claim_seconds, args.lease_seconds):
        parser.error(f"--claim-seconds/--lease-seconds too short even for a quick run: {problem}")
    return SoakOptions(
        signups=args.signups,
        registrations=args.registrations,
        duplicate_rate=args.duplicate_rate,
        both_paths=args.both_paths,
        bulk=args.bulk,
        malformed_rate=args.malformed_rate,
        rate=args.rate,
        token_lifetime=args.token_lifetime,
        refresh_margin=args.refresh_margin,
        refresh_spread=args.refresh_spread,
        cycles=args.cycles,
        sweep_every=args.sweep_every,
        login_budget=args.login_budget,
        refresh_concurrency=args.refresh_concurrency,
        revoke_fraction=args.revoke_fraction,
        dead_tokens=args.dead_tokens,
        error_rate=args.error_rate,
        rate_limit_rate=args.rate_limit_rate,
        drop_rate=args.drop_rate,
        latency_ms=(args.latency_ms[0], args.latency_ms[1]),
        kill=not args.no_kill,
        kill_at=args.kill_at,
        kill_after_refreshes=args.kill_after_refreshes,
        orphan_visibility=args.orphan_visibility,
        claim_seconds=args.claim_seconds,
        lease_seconds=args.lease_seconds,
        failure_visibility=args.failure_visibility,
        async_retry_delay=args.async_retry_delay,
        timeout=args.timeout,
        seed=args.seed,
        log_level=args.log_level,
        workdir=args.workdir,
        results=None if args.no_record else args.results,
        label=args.label,
    )


# --------------------------------------------------------------------------------------------- workload


@dataclass
class Message:
    """One delivery the soak makes: a signup event's detail, or a registration queue message's body."""

    path: str  # "signup" | "queue"
    body: Any  # dict (signup detail / queue JSON) or str (a queue body sent as is)
    kind: str  # "new" | "duplicate" | "both" | "malformed"
    client_id: str | None = None
    reason: str | None = None  # the dead-letter reason a malformed message must get
    marker: str | None = None  # a string of the malformed body that finds its dead letter


@dataclass
class Workload:
    run: str
    messages: list[Message]
    client_ids: list[str]  # every ClientId that must end as exactly one upstream user and one stored user
    bulk_request_id: str

    @property
    def malformed(self) -> list[Message]:
        return [m for m in self.messages if m.kind == "malformed"]

    def count(self, kind: str, path: str | None = None) -> int:
        return sum(1 for m in self.messages if m.kind == kind and (path is None or m.path == path))


def _malformed_queue(n: int, marker: str) -> tuple[Any, str]:
    kinds: list[tuple[Any, str]] = [
        (f"{{not json {marker}", "not_json"),
        (f'["{marker}"]', "not_an_object"),
        ({"FirstName": marker}, "invalid_fields"),  # no ClientId
        ({"ClientId": marker, "Gender": "Robot"}, "invalid_fields"),
        ({"ClientId": marker, "ChildrenCount": "2"}, "invalid_fields"),
        ({"Quantity": 0, "RequestId": marker}, "invalid_fields"),
        ({"ClientId": marker, "Instance": "nowhere"}, "unknown_instance"),
        ({"ClientId": marker, "FirstName": "x" * 70_000}, "too_large"),
    ]
    return kinds[n % len(kinds)]


def _malformed_signup(n: int, marker: str) -> tuple[Any, str]:
    kinds: list[tuple[Any, str]] = [
        ({"ClientId": marker, "Gender": "Robot"}, "invalid_fields"),
        ({"FirstName": marker}, "invalid_fields"),
        ({"ClientId": marker, "ChildrenCount": -1}, "invalid_fields"),
        ({"Quantity": 5, "RequestId": marker}, "invalid_fields"),  # bulk requests belong on the queue
        ({"ClientId": marker, "Instance": "nowhere"}, "unknown_instance"),
    ]
    return kinds[n % len(kinds)]


def build_workload(options: SoakOptions) -> Workload:
    """The deliveries of the run, in feeding order: originals shuffled, each copy placed shortly after its original."""
    rng = random.Random(options.seed)
    run = uuid.UUID(int=rng.getrandbits(128)).hex[:6]
    placed: list[tuple[float, Message]] = []
    signups = [f"s-{run}-{n:05d}" for n in range(options.signups)]
    queued = [f"q-{run}-{n:05d}" for n in range(options.registrations - options.both_paths)]
    originals = [Message("signup", _profile(rng, cid), "new", cid) for cid in signups]
    originals += [Message("queue", _profile(rng, cid), "new", cid) for cid in queued]
    rng.shuffle(originals)
    placed += [(float(i), m) for i, m in enumerate(originals)]
    position = {id(m): float(i) for i, m in enumerate(originals)}
    # Both paths at once: the queue copy goes out right next to the signup of the same ClientId.
    both_signups = rng.sample([m for m in originals if m.path == "signup"], options.both_paths)
    for m in both_signups:
        copy = Message("queue", {"ClientId": m.client_id, "FirstName": "both paths"}, "both", m.client_id)
        placed.append((position[id(m)] + rng.uniform(-0.5, 0.5), copy))
    # Delivered twice: the same body again a few seconds of feed later (an at-least-once redelivery, an app retry).
    per_path = {"signup": options.signups, "queue": options.registrations - options.both_paths}
    for path, count in per_path.items():
        pool = [m for m in originals if m.path == path]
        for m in rng.sample(pool, round(count * options.duplicate_rate)):
            placed.append((position[id(m)] + rng.uniform(1, 150), Message(path, m.body, "duplicate", m.client_id)))
    total = len(originals)
    for path, count, make in (
        ("signup", options.signups, _malformed_signup),
        ("queue", options.registrations, _malformed_queue),
    ):
        for n in range(round(count * options.malformed_rate)):
            marker = f"bad-{run}-{path}-{n:04d}"
            body, reason = make(n, marker)
            placed.append((rng.uniform(0, total), Message(path, body, "malformed", reason=reason, marker=marker)))
    placed.sort(key=lambda item: item[0])
    return Workload(
        run=run,
        messages=[m for _, m in placed],
        client_ids=signups + queued,
        bulk_request_id=f"soak-bulk-{run}",
    )


class Feeder(threading.Thread):
    """Sends the workload through the AWS APIs at ``rate`` messages/s, recording when each ClientId was first sent."""

    def __init__(self, stack: LocalStack, work: Workload, rate: float) -> None:
        super().__init__(name="soak-feeder", daemon=True)
        self.stack = stack
        self.work = work
        self.rate = rate
        self.sent = 0
        self.published: dict[str, float] = {}
        self.path_of: dict[str, str] = {}
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.finished_at = 0.0

    @property
    def fraction(self) -> float:
        return self.sent / max(1, len(self.work.messages))

    @property
    def done(self) -> bool:
        return self.finished_at > 0

    def run(self) -> None:
        events, sqs = client(self.stack, "events"), client(self.stack, "sqs")
        self.started_at = time.time()
        messages = self.work.messages
        try:
            index = 0
            while index < len(messages):
                path = messages[index].path
                batch = [messages[index]]
                while index + len(batch) < len(messages) and len(batch) < 10:
                    following = messages[index + len(batch)]
                    if following.path != path:
                        break
                    batch.append(following)
                if self.rate > 0:
                    due = self.started_at + index / self.rate
                    time.sleep(max(0.0, due - time.time()))
                now = time.time()
                for m in batch:
                    if m.client_id and m.client_id not in self.published:
                        self.published[m.client_id] = now
                        self.path_of[m.client_id] = m.path
                if path == "signup":
                    publish_signups(self.stack, [m.body for m in batch], events=events)
                else:
                    send_messages(self.stack, [m.body for m in batch], sqs=sqs)
                index += len(batch)
                self.sent = index
        except Exception as exc:  # noqa: BLE001 - reported by the driver, and the run then fails
            self.error = exc
        finally:
            self.finished_at = time.time()


# --------------------------------------------------------------------------------------------- observing


class Outcomes:
    """Subscribes to the service's outcome events (a rule and a queue of the soak's own, as a customer would)."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.sqs = client(stack, "sqs")
        name = f"{stack.stack_name}-soak-outcomes"
        self.queue_url: str = self.sqs.create_queue(QueueName=name)["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])["Attributes"]
        events = client(stack, "events")
        bus = stack.parameters["SignupEventBusName"]
        events.put_rule(Name=name, EventBusName=bus, EventPattern=json.dumps({"source": [OUTCOME_SOURCE]}))
        events.put_targets(Rule=name, EventBusName=bus, Targets=[{"Id": "soak", "Arn": arn["QueueArn"]}])
        #: ClientId -> SentTimestamp (epoch s) of its first TelematicsUserRegistered event.
        self.registered: dict[str, float] = {}
        self.kinds: collections.Counter[str] = collections.Counter()
        self.bulk_users: set[str] = set()
        self.failed_message_ids: dict[str, str] = {}  # MessageId -> Reason
        self.token_failed: dict[str, str] = {}  # DeviceToken -> Reason
        self.secrets: list[str] = []

    def poll(self) -> None:
        """Take every event waiting in the queue."""
        while True:
            messages = self.sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=10, AttributeNames=["SentTimestamp"]
            ).get("Messages", [])
            if not messages:
                return
            for message in messages:
                self._take(message)
            self.sqs.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
            )

    def _take(self, message: dict[str, Any]) -> None:
        self.secrets += secrets_in(message["Body"], "an outcome event")
        event = json.loads(message["Body"])
        detail = event.get("detail") or {}
        kind = str(event.get("detail-type"))
        sent = int(message["Attributes"]["SentTimestamp"]) / 1000
        if kind == "TelematicsUserRegistered":
            if detail.get("Duplicate"):
                kind += " (duplicate)"
            client_id = detail.get("ClientId")
            if client_id:
                self.registered[client_id] = min(sent, self.registered.get(client_id, math.inf))
            elif detail.get("BulkRequestId"):
                self.bulk_users.add(str(detail.get("DeviceToken")))
        elif kind == "TelematicsRegistrationFailed":
            self.failed_message_ids[str(detail.get("MessageId"))] = str(detail.get("Reason"))
        elif kind == "TelematicsTokenRefreshFailed":
            self.token_failed[str(detail.get("DeviceToken"))] = str(detail.get("Reason"))
        self.kinds[kind] += 1


def secrets_in(text: str, where: str) -> list[str]:
    """Token-shaped strings of ``text`` (reported by kind and place only, never the value)."""
    found = [f"a JWT in {where}" for _ in JWT.finditer(text)]
    found += [f"a refresh token in {where}" for _ in REFRESH_TOKEN.finditer(text)]
    return found


def scan_items(stack: LocalStack, dynamodb: Any, prefix: str = "USER#", projection: str | None = None) -> list[dict]:
    """Items of the tokens table whose ``pk`` starts with ``prefix``."""
    kwargs: dict[str, Any] = {
        "TableName": stack.outputs["TokensTableName"],
        "FilterExpression": "begins_with(pk, :p)",
        "ExpressionAttributeValues": {":p": {"S": prefix}},
    }
    if projection:
        kwargs["ProjectionExpression"] = projection
        kwargs["ExpressionAttributeNames"] = {"#s": "Status"}
    items: list[dict[str, Any]] = []
    while True:
        page = dynamodb.scan(**kwargs)
        items += [{k: _deserializer.deserialize(v) for k, v in item.items()} for item in page.get("Items", [])]
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def bulk_progress(stack: LocalStack, dynamodb: Any, request_id: str) -> dict[str, Any] | None:
    """The bulk request's progress item (``Chunk<n>`` states, ``Stored<n>``), or None before it started."""
    item = dynamodb.get_item(
        TableName=stack.outputs["TokensTableName"],
        Key={"pk": {"S": f"BULK#default#{request_id}"}},
        ConsistentRead=True,
    ).get("Item")
    return {k: _deserializer.deserialize(v) for k, v in item.items()} if item else None


def chunk_states(progress: dict[str, Any] | None) -> dict[int, str]:
    if not progress:
        return {}
    return {i: str(progress[f"Chunk{i}"]) for i in range(int(progress["ChunkCount"]))}


def in_flight_queues(stack: LocalStack) -> dict[str, str]:
    """The queues a runner receives from (name -> URL): the SQS event sources and the rules' taps."""
    urls = {m.source_logical_id or m.logical_id: m.queue_url for m in stack.event_source_mappings if m.queue_url}
    for rule in stack.rules:
        for target in rule.targets:
            if target.tap_queue_url:
                urls[f"{rule.logical_id} tap"] = target.tap_queue_url
    return {name: url for name, url in urls.items() if url}


def held_messages(stack: LocalStack, urls: Iterable[str]) -> dict[tuple[str, str], str | None]:
    """The messages in flight in these queues now: (queue name, message id) -> the receipt handle they were taken with.

    moto runs in this process, so its queues are read directly (SQS has no API to list messages in flight).
    """
    backend = sqs_backends[stack.account_id][stack.region]
    held: dict[tuple[str, str], str | None] = {}
    for url in urls:
        name = url.rsplit("/", 1)[1]
        for message in list(backend.get_queue(name)._messages):
            if not message.visible and not message.delayed:
                held[(name, message.id)] = message.receipt_handle
    return held


def held_client_ids(stack: LocalStack, held: Iterable[tuple[str, str]]) -> set[str]:
    """The ClientIds named by held messages (a registration body, or a signup event's detail)."""
    backend = sqs_backends[stack.account_id][stack.region]
    found: set[str] = set()
    for name, message_id in held:
        for message in list(backend.get_queue(name)._messages):
            if message.id != message_id:
                continue
            with contextlib.suppress(ValueError, AttributeError):
                body = json.loads(message.body)
                detail = body.get("detail", body) if isinstance(body.get("detail"), dict) else body
                if isinstance(detail.get("ClientId"), str):
                    found.add(detail["ClientId"])
    return found


def expire_held(stack: LocalStack, held: dict[tuple[str, str], str | None]) -> int:
    """Make the messages a killed runner held visible again, as their visibility timeout lapsing would.

    Only those still held with the receipt handle of the kill: one that came back on its own since (a failed record's
    shorter visibility) and was taken by the new runner is left alone.
    """
    backend = sqs_backends[stack.account_id][stack.region]
    expired = 0
    for (name, message_id), receipt in held.items():
        queue = backend.get_queue(name)
        for message in list(queue._messages):
            if message.id == message_id and message.receipt_handle == receipt and not message.visible:
                message.change_visibility(0)
                expired += 1
    return expired


# --------------------------------------------------------------------------------------------- the runner child


class Runner:
    """One event runner process (``bench/soak_runtime.py``)."""

    def __init__(self, index: int, stack_path: Path, options: SoakOptions) -> None:
        self.index = index
        self.log_file = options.workdir / f"runner-{index}.log"
        self.events_file = options.workdir / f"runner-{index}.events.jsonl"
        runtime_options = {
            "failure_visibility_timeout": options.failure_visibility,
            "schedule_interval": options.sweep_every,
            "async_retry_delay": options.async_retry_delay,
            # As many signup invocations at once as the template reserves for the function (SignupMaximumConcurrency).
            "async_concurrency": 10,
            "environment": quick_timing_environment(options.claim_seconds, options.lease_seconds)
            | login_budget_environment(options.login_budget),
        }
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "layers" / "telematics"), str(REPO_ROOT)]),
            "PYTHONUNBUFFERED": "1",
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(RUNNER_SCRIPT),
                *("--state", str(stack_path)),
                *("--options", json.dumps(runtime_options)),
                *("--log-file", str(self.log_file)),
                *("--events-file", str(self.events_file)),
                "--twin",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.started_at = time.time()
        assert self.process.stdout is not None
        lines = []
        for line in self.process.stdout:
            if line.strip() == "ready":
                break
            lines.append(line)
        else:
            raise RuntimeError(f"runner {index} did not start: {''.join(lines)[-2000:]}")
        self._drain = threading.Thread(target=self.process.stdout.read, daemon=True)
        self._drain.start()

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as a crashed host or an OOM kill."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout: float = 180) -> int:
        """SIGTERM: the runner stops polling and lets running invocations finish."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        return int(self.process.returncode)

    def events(self) -> list[dict[str, Any]]:
        if not self.events_file.exists():
            return []
        found = []
        for line in self.events_file.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found


# --------------------------------------------------------------------------------------------- the run


@dataclass
class KillRecord:
    at: float = 0.0
    restarted_at: float = 0.0
    pending_claims: list[str] = field(default_factory=list)  # ClientIds
    leases: list[str] = field(default_factory=list)  # DeviceTokens with a live refresh lease
    bulk_chunks: dict[int, str] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    expired: int = 0
    expired_at: float = 0.0
    orphaned_client_ids: list[str] = field(default_factory=list)  # named by a message the dead runner held


@dataclass
class RevokeRecord:
    at: float = 0.0
    revoked: list[str] = field(default_factory=list)  # by fraction
    dead: list[str] = field(default_factory=list)  # revoked and denied Login
    holders: int = 0


@dataclass
class Soak:
    options: SoakOptions
    stack: LocalStack
    emulator: EmulatorHandle
    stack_path: Path
    work: Workload
    out: TextIO
    outcomes: Outcomes = field(init=False)
    runners: list[Runner] = field(default_factory=list)
    kill: KillRecord | None = None
    revoke: RevokeRecord | None = None
    started: float = field(default_factory=time.time)
    settled_at: float = 0.0
    problems: list[str] = field(default_factory=list)
    bulk_sent_at: float = 0.0
    orphans: dict[tuple[str, str], str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.outcomes = Outcomes(self.stack)
        self.dynamodb = client(self.stack, "dynamodb")
        self.sqs = client(self.stack, "sqs")
        self.instance_id = self.emulator.instance_id("default")
        key_secret = self.stack.outputs["DeviceTokenKeySecretArn"]
        self.device_token_key = SecretsManagerDeviceTokenKey(
            key_secret, client=client(self.stack, "secretsmanager")
        ).get()

    def say(self, text: str) -> None:
        print(f"{time.time() - self.started:7.1f}s  {text}", file=self.out, flush=True)

    # ---------------------------------------------------------------- phases

    def run(self) -> None:
        self.runners.append(Runner(1, self.stack_path, self.options))
        self.say("runner 1 started (pollers, the signup rule's tap, the schedule and a twin sweeper)")
        self.emulator.set_faults(**self.options.faults)
        self.say(f"upstream faults on: {json.dumps(self.options.faults)}")
        feeder = Feeder(self.stack, self.work, self.options.rate)
        self.feeder = feeder
        feeder.start()
        rate = f"at {self.options.rate:g}/s" if self.options.rate > 0 else "all at once"
        self.say(f"feeding {len(self.work.messages)} messages {rate} ({self._workload_text()})")
        if not self.options.kill and self.options.bulk:
            self._send_bulk()
        deadline = self.started + self.options.timeout
        last_status = 0.0
        last_rotation_check = 0.0
        rotated = False
        while True:
            self.outcomes.poll()
            if feeder.error is not None:
                self.problems.append(f"the feed failed: {feeder.error!r}")
                return
            if self.kill is None and self.options.kill and self._kill_due():
                self._kill_and_restart()
            if self.kill and not self.kill.expired_at and time.time() >= self.kill.at + self.options.orphan_visibility:
                self._expire_orphans()
            if self.revoke is None and feeder.done and (self.kill is not None or not self.options.kill):
                self._revoke()
            if time.time() - last_status >= 10:
                self.say(self._status())
                last_status = time.time()
            if self.revoke is not None and self._registrations_settled():
                # (A full scan of the table each time: rarer for a big one.)
                every = max(min(10.0, max(2.0, self.options.sweep_every)), len(self.work.client_ids) / 500)
                if time.time() - last_rotation_check >= every:
                    rotated = self._rotated()
                    last_rotation_check = time.time()
                if rotated:
                    self.settled_at = time.time()
                    self.say("settled: every registration accounted for, every user rotated")
                    return
            if time.time() >= deadline:
                self.problems.append(f"did not settle within {self.options.timeout:.0f} s: {self._status()}")
                self.say(f"timed out after {self.options.timeout:.0f} s")
                return
            time.sleep(1.0)

    def _workload_text(self) -> str:
        w = self.work
        return (
            f"{w.count('new', 'signup')} signups, {w.count('new', 'queue')} + {w.count('both')} registrations "
            f"({w.count('both')} ClientIds on both paths), {w.count('duplicate')} duplicates, "
            f"{w.count('malformed')} malformed"
        )

    def _kill_due(self) -> bool:
        if self.feeder.fraction < self.options.kill_at:
            return False
        # A wave of refreshes under way (so leases are in flight), unless the feed is over and none started.
        refreshes = int(self.emulator.counters().get("refreshes", 0))
        return refreshes >= self.options.kill_after_refreshes or self.feeder.done

    def _send_bulk(self) -> None:
        send_messages(self.stack, [{"Quantity": self.options.bulk, "RequestId": self.work.bulk_request_id}])
        self.bulk_sent_at = time.time()
        self.say(f"sent the bulk request ({self.options.bulk} users, RequestId {self.work.bulk_request_id})")

    def _kill_and_restart(self) -> None:
        record = KillRecord()
        refresh_queue = self.stack.queue_url("RefreshQueue")

        def refreshing() -> bool:
            attributes = self.sqs.get_queue_attributes(
                QueueUrl=refresh_queue, AttributeNames=["ApproximateNumberOfMessagesNotVisible"]
            )["Attributes"]
            return int(attributes["ApproximateNumberOfMessagesNotVisible"]) >= 5

        # Kill while refresh jobs are being worked on (leases held) and one of the bulk's CreateMany chunks is in
        # flight with more to come, if each can be caught within a few seconds; else with what is in flight then.
        deadline = time.time() + 10
        while self.options.kill_after_refreshes and time.time() < deadline and not refreshing():
            time.sleep(0.05)
        if self.options.bulk:
            self._send_bulk()
            deadline = time.time() + 10
            while time.time() < deadline:
                states = chunk_states(bulk_progress(self.stack, self.dynamodb, self.work.bulk_request_id))
                if "CALLING" in states.values() and "TODO" in states.values():
                    break
                time.sleep(0.02)
        self.runners[-1].kill()
        record.at = time.time()
        self.say(f"runner {self.runners[-1].index} killed (SIGKILL) with {self.feeder.fraction:.0%} fed")
        # A long poll the dead runner had open goes on in moto for up to its wait time and takes messages for no one:
        # let those end, so that what the dead runner holds is complete before a new runner starts receiving.
        time.sleep(RUNNER_POLL_WAIT + 1.5)
        now = time.time()
        users = scan_items(
            self.stack,
            self.dynamodb,
            projection="pk, ClientId, #s, ClaimExpiresAt, LeaseOwner, LeaseExpiresAt, DeviceToken",
        )
        record.pending_claims = sorted(str(u.get("ClientId")) for u in users if u.get("Status") == "PENDING")
        record.leases = sorted(
            str(u["DeviceToken"]) for u in users if u.get("LeaseOwner") and int(u.get("LeaseExpiresAt", 0)) >= now
        )
        record.bulk_chunks = chunk_states(bulk_progress(self.stack, self.dynamodb, self.work.bulk_request_id))
        queues = in_flight_queues(self.stack)
        for name, url in queues.items():
            attributes = self.sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"]
            )["Attributes"]
            record.in_flight[name] = int(attributes["ApproximateNumberOfMessagesNotVisible"])
        self.orphans = held_messages(self.stack, queues.values())
        record.orphaned_client_ids = sorted(held_client_ids(self.stack, self.orphans))
        self.say(
            f"left behind: {len(record.pending_claims)} PENDING claims, {len(record.leases)} live refresh leases, "
            f"bulk chunks {_states_text(record.bulk_chunks)}, messages in flight {record.in_flight}"
        )
        # Lambda would go on polling at once: so does a new runner. The messages the dead one held stay invisible
        # until their visibility timeout lapses (simulated below, after --orphan-visibility seconds).
        self.runners.append(Runner(len(self.runners) + 1, self.stack_path, self.options))
        record.restarted_at = time.time()
        self.kill = record
        self.say(f"runner {self.runners[-1].index} started against the same moto server and emulator")

    def _expire_orphans(self) -> None:
        assert self.kill is not None
        self.kill.expired = expire_held(self.stack, self.orphans)
        self.kill.expired_at = time.time()
        self.say(
            f"visibility timeout of the {len(self.orphans)} messages the killed runner held lapsed (simulated, "
            f"{self.options.orphan_visibility} s after the kill): {self.kill.expired} visible again"
        )

    def _revoke(self) -> None:
        record = RevokeRecord(at=time.time())
        # The users whose tokens must truly die: denied Login first, then revoked, so no refresh can slip between.
        registered = sorted(cid for cid in self.work.client_ids if cid in self.outcomes.registered)
        rng = random.Random(self.options.seed)
        chosen = rng.sample(registered, min(self.options.dead_tokens, len(registered)))
        record.dead = [device_token_for(self.instance_id, cid, key=self.device_token_key) for cid in chosen]
        if record.dead:
            self.emulator.disable_login(record.dead)
            self.emulator.revoke(device_tokens=record.dead)
        record.holders = int(self.emulator.counters()["users_total"])
        record.revoked = [
            dt for dt in self.emulator.revoke(fraction=self.options.revoke_fraction) if dt not in record.dead
        ]
        self.revoke = record
        self.say(
            f"revoked {len(record.revoked)} refresh tokens ({self.options.revoke_fraction:.0%} of the users), and "
            f"{len(record.dead)} more whose Login is denied too (they must end NEEDS_RELOGIN)"
        )

    # ---------------------------------------------------------------- progress

    def _depth(self, logical_id: str) -> int:
        return queue_depth(self.sqs, self.stack.queue_url(logical_id))

    def _tap_depth(self) -> int:
        taps = [t.tap_queue_url for rule in self.stack.rules for t in rule.targets if t.tap_queue_url]
        return sum(queue_depth(self.sqs, url) for url in taps)

    def _status(self) -> str:
        counters = self.emulator.counters()
        registered = sum(1 for cid in self.work.client_ids if cid in self.outcomes.registered)
        return (
            f"fed {self.feeder.sent}/{len(self.work.messages)} · registered {registered}/{len(self.work.client_ids)} "
            f"+ bulk {len(self.outcomes.bulk_users)} · queue {self._depth('RegistrationQueue')} "
            f"tap {self._tap_depth()} "
            f"refresh jobs {self._depth('RefreshQueue')} · upstream users {counters['users_total']} "
            f"refreshes {counters['refreshes']} logins {counters['logins']} "
            f"rejected {counters['rejected_refresh_tokens']} · faults {counters['faults_served']}"
        )

    def _registrations_settled(self) -> bool:
        if self.kill is not None and not self.kill.expired_at:
            return False
        if not self.feeder.done or any(cid not in self.outcomes.registered for cid in self.work.client_ids):
            return False
        for path, queue in (("signup", "SignupDeadLetterQueue"), ("queue", "RegistrationDeadLetterQueue")):
            if self._depth(queue) < sum(1 for m in self.work.malformed if m.path == path):
                return False
        if self._depth("RegistrationQueue") or self._tap_depth():
            return False
        if self.options.bulk:
            states = chunk_states(bulk_progress(self.stack, self.dynamodb, self.work.bulk_request_id))
            if not states or {"TODO", "CALLING"} & set(states.values()):
                return False
        assert self.revoke is not None
        return all(dt in self.outcomes.token_failed for dt in self.revoke.dead)

    def _rotated(self) -> bool:
        """Every ACTIVE user went through ``cycles`` refreshes, and every revoked one we store is back (logged in).

        (The emulator revokes among all its users: bulk users of a chunk whose answer was lost are not ours.)
        """
        users = scan_items(self.stack, self.dynamodb, projection="pk, #s, Version")
        active = [u for u in users if u.get("Status") == "ACTIVE"]
        if any(int(u.get("Version", 0)) < 1 + self.options.cycles for u in active):
            return False
        assert self.revoke is not None
        stored = {str(u["pk"]).removeprefix("USER#") for u in users}
        return all((self.emulator.user(dt) or {}).get("HasRefreshToken") for dt in self.revoke.revoked if dt in stored)

    # ---------------------------------------------------------------- the end

    def stop_runner(self) -> None:
        code = self.runners[-1].stop()
        if code == 0:
            self.say(f"runner {self.runners[-1].index} stopped cleanly")
        else:
            # Killed after the timeout: refreshes it had in flight may have lost their rotated pair (not the kill
            # under test), so the token checks below cannot be trusted to mean what they say.
            self.problems.append(f"runner {self.runners[-1].index} did not stop cleanly (exit {code})")
            self.say(f"runner {self.runners[-1].index} did NOT stop cleanly (exit {code})")
        self.emulator.clear_faults()


def _states_text(states: dict[int, str]) -> str:
    return " ".join(f"{i}:{s}" for i, s in sorted(states.items())) or "none"


# --------------------------------------------------------------------------------------------- checks


@dataclass
class Measures:
    """The numbers of a run, for the summary and the results file."""

    values: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.values[key] = value

    def get_or(self, key: str, default: float = math.nan) -> Any:
        return self.values.get(key, default)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def verify_live_tokens(emulator: EmulatorHandle, users: Sequence[dict[str, Any]]) -> tuple[int, list[str]]:
    """Spend each stored refresh token once (faults off, runner stopped): each must be the live one.

    Returns the number verified and the DeviceTokens whose stored token the emulator rejected.
    """
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=16)
    session.mount("http://", adapter)

    def spend(user: dict[str, Any]) -> str | None:
        response = session.post(
            f"{emulator.url}/v1/Auth/RefreshToken",
            json={"AccessToken": user["AccessToken"], "RefreshToken": user["RefreshToken"]},
            timeout=30,
        )
        return None if response.status_code == 200 else str(user["DeviceToken"])

    with ThreadPoolExecutor(16) as pool:
        dead = [dt for dt in pool.map(spend, users) if dt is not None]
    session.close()
    return len(users), dead


@dataclass
class EndState:
    """Everything read at the end of a run, shared by the checks below."""

    soak: Soak
    m: Measures
    counters: dict[str, Any]
    by_device: dict[str, dict[str, Any]]  # the emulator's users
    users: list[dict[str, Any]]  # the table's users (full items: tokens stay in memory, to be verified)
    letters: dict[str, list[dict[str, Any]]]
    runner_events: list[dict[str, Any]]
    kill: KillRecord
    revoke: RevokeRecord

    @property
    def active(self) -> list[dict[str, Any]]:
        return [u for u in self.users if u.get("Status") == "ACTIVE"]

    @property
    def per_client(self) -> dict[str, int]:
        found: dict[str, int] = self.counters.get("users_by_client_id", {})
        return found


def check(soak: Soak, elapsed: float) -> tuple[list[Check], Measures]:
    """Compare the end state with the workload and the invariants; one :class:`Check` per promise."""
    soak.outcomes.poll()
    state = EndState(
        soak=soak,
        m=Measures(),
        counters=soak.emulator.counters(),
        by_device={u["DeviceToken"]: u for u in soak.emulator.users()},
        users=scan_items(soak.stack, soak.dynamodb),
        letters=drain_dead_letters(soak.stack, soak.sqs),
        runner_events=[event for runner in soak.runners for event in runner.events()],
        kill=soak.kill or KillRecord(),
        revoke=soak.revoke or RevokeRecord(),
    )
    checks = [
        check_one_user_per_client(state),
        check_bad_input(state),
        check_stored(state),
        *check_bulk(state),
        *check_dead_letters(state),
        check_tokens(state),
        check_rejections(state),
        check_revoked(state),
        check_secrets(state),
        check_concurrency(state),
        check_completeness(state),
    ]
    measure(state, elapsed)
    return checks, state.m


def check_one_user_per_client(state: EndState) -> Check:
    """DESIGN.md: one upstream user per (Instance, ClientId), whatever the delivery."""
    work, counters = state.soak.work, state.counters
    expected = set(work.client_ids)
    counts = collections.Counter(
        int(state.per_client.get(f"{state.soak.instance_id}/{cid}", 0)) for cid in work.client_ids
    )
    strays = {k: n for k, n in state.per_client.items() if k.split("/", 1)[1] not in expected}
    state.m["per_client"] = dict(counts)
    return Check(
        "One upstream user per ClientId",
        set(counts) == {1} and not strays,
        f"{counts.get(1, 0)}/{len(work.client_ids)} ClientIds have exactly 1 upstream user"
        + "".join(f"; {n} have {k}" for k, n in sorted(counts.items()) if k != 1)
        + (f"; unexpected ClientIds upstream: {list(strays)[:5]}" if strays else "")
        + f" (Creates {counters['creates']}, logins {counters['logins']})",
    )


def check_bad_input(state: EndState) -> Check:
    """DESIGN.md: bad input never reaches the upstream."""
    markers = [msg.marker for msg in state.soak.work.malformed if msg.marker]
    reached = [mk for mk in markers if any(k.endswith(f"/{mk}") for k in state.per_client)]
    return Check(
        "Bad input never upstream",
        not reached,
        f"{len(markers)} malformed messages, {len(reached)} of them reached the upstream",
    )


def _bulk_state(state: EndState) -> dict[str, Any]:
    soak, options = state.soak, state.soak.options
    progress = bulk_progress(soak.stack, soak.dynamodb, soak.work.bulk_request_id)
    chunks = chunk_states(progress)
    quantity = {i: min(CREATE_MANY_CHUNK, options.bulk - i * CREATE_MANY_CHUNK) for i in range(len(chunks))}
    unknown = sorted(i for i, s in chunks.items() if s == "UNKNOWN")
    done = sorted(i for i, s in chunks.items() if s == "DONE")
    return {
        "chunks": chunks,
        "unknown": unknown,
        "done_quantity": sum(quantity[i] for i in done),
        "stored_per_chunk": sum(int(progress.get(f"Stored{i}", 0)) for i in done) if progress else 0,
        "reported_users": sum(quantity[i] for i in unknown),
        "users": [u for u in state.users if u.get("BulkRequestId") == soak.work.bulk_request_id],
    }


def check_stored(state: EndState) -> Check:
    """DESIGN.md: no registration is lost (every one stored, or reported with a reason)."""
    work, options, users = state.soak.work, state.soak.options, state.users
    expected = set(work.client_ids)
    statuses = collections.Counter(str(u.get("Status")) for u in users)
    stored_clients = collections.Counter(str(u["ClientId"]) for u in users if u.get("ClientId"))
    missing = sorted(expected - set(stored_clients))
    doubled = sorted(cid for cid, n in stored_clients.items() if n > 1)
    extra = sorted(set(stored_clients) - expected)
    bulk = _bulk_state(state)
    bulk_users = bulk["users"]
    expected_users = len(work.client_ids) + options.bulk
    state.m.values |= {
        "stored": len(users),
        "expected_users": expected_users,
        "statuses": dict(statuses),
        "bulk_stored": len(bulk_users),
        "bulk_reported": bulk["reported_users"],
        "chunks": bulk["chunks"],
    }
    ok = (
        not missing
        and not doubled
        and not extra
        and len(users) == len(work.client_ids) + len(bulk_users)
        and len(bulk_users) == bulk["stored_per_chunk"] == bulk["done_quantity"]
        and len(users) + bulk["reported_users"] == expected_users
    )
    detail = (
        f"{len(users)} stored of {expected_users} expected ({len(work.client_ids)} ClientIds + bulk "
        f"{options.bulk}): {len(users) - len(bulk_users)} by ClientId, {len(bulk_users)} bulk"
    )
    if bulk["unknown"]:
        detail += (
            f", {bulk['reported_users']} bulk users of {len(bulk['unknown'])} chunk(s) reported as bulk_incomplete"
        )
    detail += f"; status {_counter_text(statuses)}"
    detail += f"; MISSING {missing[:5]} ({len(missing)})" if missing else ""
    detail += f"; stored twice {doubled[:5]}" if doubled else ""
    detail += f"; not expected {extra[:5]}" if extra else ""
    return Check("Users stored vs expected", ok, detail)


def check_bulk(state: EndState) -> list[Check]:
    """The bulk request: no chunk called twice, each stored or reported (bulk_incomplete)."""
    if not state.soak.options.bulk:
        return []
    bulk = _bulk_state(state)
    chunks, counters = bulk["chunks"], state.counters
    create_many_users = int(counters.get("create_many_users", 0))
    orphans = create_many_users - len(bulk["users"])
    reported: set[str] = set()
    for letter in state.letters["RegistrationDeadLetterQueue"]:
        if dead_letter_reason(letter) != "bulk_incomplete":
            continue
        detail = letter.get("MessageAttributes", {}).get("ErrorDetail", {}).get("StringValue", "[]")
        with contextlib.suppress(ValueError):
            reported |= {str(e.get("Key")) for e in json.loads(detail) if isinstance(e, dict)}
    unreported = [i for i in bulk["unknown"] if f"Chunk{i}" not in reported]
    state.m["orphans"] = orphans
    ok = (
        bool(chunks)
        and set(chunks.values()) <= {"DONE", "UNKNOWN"}
        and int(counters.get("create_many_calls", 0)) <= len(chunks)
        and 0 <= orphans <= bulk["reported_users"]
        and not unreported
    )
    return [
        Check(
            "Bulk request never doubled",
            ok,
            f"{len(chunks)} chunks: {_states_text(chunks)}; CreateMany calls that committed "
            f"{counters.get('create_many_calls')} (at most one per chunk); upstream bulk users "
            f"{create_many_users}, stored {len(bulk['users'])}, made upstream but not stored {orphans} "
            f"(only chunks whose answer was lost may leave some)"
            + (f"; chunks not reported: {unreported}" if unreported else ""),
        )
    ]


def check_dead_letters(state: EndState) -> list[Check]:
    """Each DLQ holds exactly the malformed messages, each with its reason (and bulk_incomplete for lost chunks)."""
    work = state.soak.work
    expected: dict[str, dict[str, str]] = {"RegistrationDeadLetterQueue": {}, "SignupDeadLetterQueue": {}}
    for msg in work.malformed:
        queue = "SignupDeadLetterQueue" if msg.path == "signup" else "RegistrationDeadLetterQueue"
        expected[queue][str(msg.marker)] = str(msg.reason)
    checks = []
    state.m["dlq"] = {}
    for logical_id in DEAD_LETTER_QUEUES:
        found = state.letters[logical_id]
        reasons = collections.Counter(dead_letter_reason(letter) for letter in found)
        state.m["dlq"][logical_id] = dict(reasons)
        wanted = expected.get(logical_id, {})
        matched: set[str] = set()
        unexpected: list[str] = []
        originals: collections.Counter[str] = collections.Counter()
        for letter in found:
            reason = dead_letter_reason(letter)
            original = letter.get("MessageAttributes", {}).get("OriginalMessageId", {}).get("StringValue", "")
            originals[original or letter["MessageId"]] += 1
            marker = next((mk for mk in wanted if mk in letter["Body"]), None)
            if marker is not None and wanted[marker] == reason:
                matched.add(marker)
            elif not (reason == "bulk_incomplete" and work.bulk_request_id in letter["Body"]):
                unexpected.append(reason)
        not_found = sorted(set(wanted) - matched)
        repeats = sum(n - 1 for n in originals.values() if n > 1)
        detail = f"{len(found)} messages: {_counter_text(reasons)}"
        detail += f"; {len(matched)}/{len(wanted)} malformed messages dead-lettered with their reason" if wanted else ""
        detail += f"; {repeats} dead-lettered twice (redelivered after the kill)" if repeats else ""
        detail += f"; UNEXPECTED: {_counter_text(collections.Counter(unexpected))}" if unexpected else ""
        detail += f"; NOT dead-lettered as expected: {not_found[:5]} ({len(not_found)})" if not_found else ""
        checks.append(Check(logical_id, not unexpected and not not_found, detail))
    return checks


def check_tokens(state: EndState) -> Check:
    """DESIGN.md: no token is lost (stored pairs live; dead tokens marked and announced, never dropped)."""
    users, active = state.users, state.active
    # A user whose Login answer was lost has a dead stored token and knows it (RefreshTokenDead): its next attempt
    # logs in. Those are not spent here; every other stored refresh token must be the live one.
    flagged = [u for u in active if u.get("RefreshTokenDead")]
    verified, dead_stored = verify_live_tokens(
        state.soak.emulator, [u for u in active if not u.get("RefreshTokenDead")]
    )
    if dead_stored:
        explain(state.soak, dead_stored, users, state.by_device, "stored refresh token rejected at the end")
    relogin = {str(u["DeviceToken"]): str(u.get("LastError", "")) for u in users if u.get("Status") == "NEEDS_RELOGIN"}
    expected_dead = set(state.revoke.dead)
    unannounced = sorted(set(relogin) - set(state.soak.outcomes.token_failed))
    unexpected_dead = sorted(set(relogin) - expected_dead)
    others = [u for u in users if u.get("Status") not in ("ACTIVE", "NEEDS_RELOGIN")]
    state.m["needs_relogin"] = relogin
    detail = (
        f"{verified - len(dead_stored)}/{verified} stored refresh tokens are the live one (each spent once at the end)"
    )
    if flagged:
        detail += f", {len(flagged)} more known dead and flagged for Login (a Login answer lost just before the end)"
    detail += (
        f"; NEEDS_RELOGIN {len(relogin)} (expected exactly the {len(expected_dead)} users revoked and denied Login), "
        "each announced by TelematicsTokenRefreshFailed"
    )
    detail += f"; unannounced {unannounced}" if unannounced else ""
    detail += f"; REJECTED stored tokens: {dead_stored[:5]} ({len(dead_stored)})" if dead_stored else ""
    detail += f"; not expected NEEDS_RELOGIN: {unexpected_dead[:5]}" if unexpected_dead else ""
    detail += f"; left PENDING/TOKENLESS: {len(others)}" if others else ""
    ok = not dead_stored and set(relogin) == expected_dead and not unannounced and not others
    return Check("No token lost", ok, detail)


def check_rejections(state: EndState) -> Check:
    """DESIGN.md: two refreshers never spend the same refresh token (and a dead one is not presented again)."""
    causes = state.counters.get("rejected_refresh_tokens_by_cause", {})
    revoked = set(state.revoke.revoked) | set(state.revoke.dead)
    rejected = {dt: u["RejectedRefreshTokens"] for dt, u in state.by_device.items() if u["RejectedRefreshTokens"]}
    spent = {dt: r["spent"] for dt, r in rejected.items() if r.get("spent")}
    revoked_twice = [dt for dt, r in rejected.items() if r.get("revoked", 0) > 1]
    revoked_elsewhere = [dt for dt, r in rejected.items() if r.get("revoked") and dt not in revoked]
    leased = set(state.kill.leases)
    state.m.values |= {
        "rejected": dict(causes),
        "rejected_total": state.counters.get("rejected_refresh_tokens"),
        "revoked": len(state.revoke.revoked),
    }
    detail = (
        f"{state.counters.get('rejected_refresh_tokens')} rejected: revoked {causes.get('revoked', 0)} (of "
        f"{len(state.revoke.revoked)} + {len(state.revoke.dead)} revoked; each at most once), spent "
        f"{causes.get('spent', 0)}, unknown {causes.get('unknown', 0)}"
    )
    detail += f"; REVOKED TOKEN PRESENTED AGAIN: {len(revoked_twice)} users" if revoked_twice else ""
    detail += f"; revoked-token rejections for users not revoked: {revoked_elsewhere[:3]}" if revoked_elsewhere else ""
    if spent:
        # Not even for the refreshes the kill cut: a lapsed lease sends the next worker to Login, never to a replay.
        cut = sorted(set(spent) & leased)
        detail += f"; SPENT TOKEN PRESENTED AGAIN: {len(spent)} users ({len(cut)} of them leased at the kill)"
    ok = not revoked_twice and not revoked_elsewhere and not spent and not causes.get("unknown")
    return Check("Refresh tokens rejected", ok, detail)


def check_revoked(state: EndState) -> Check:
    """DESIGN.md: a dead refresh token is recovered by Login (within the shared budget)."""
    stored = {str(u["DeviceToken"]) for u in state.users}
    active = {str(u["DeviceToken"]) for u in state.active}
    ours = [dt for dt in state.revoke.revoked if dt in stored]
    not_recovered = [dt for dt in ours if (state.by_device.get(dt) or {}).get("Logins", 0) < 1 or dt not in active]
    return Check(
        "Revoked tokens recovered by Login",
        not not_recovered,
        f"{len(ours) - len(not_recovered)}/{len(ours)} revoked users of ours logged in again and ACTIVE "
        f"({len(state.revoke.revoked) - len(ours)} more revoked upstream were bulk users never stored); Login budget "
        f"{state.soak.options.login_budget}/min" + (f"; NOT recovered: {not_recovered[:5]}" if not_recovered else ""),
    )


def check_secrets(state: EndState) -> Check:
    """DESIGN.md: tokens are never logged or put in events (nor in dead letters)."""
    soak = state.soak
    leaks = list(soak.outcomes.secrets)
    for runner in soak.runners:
        if runner.log_file.exists():
            with runner.log_file.open(encoding="utf-8", errors="replace") as handle:
                for number, line in enumerate(handle, 1):
                    leaks += secrets_in(line, f"{runner.log_file.name}:{number}")
    for logical_id in DEAD_LETTER_QUEUES:
        for letter in state.letters[logical_id]:
            leaks += secrets_in(json.dumps(letter.get("MessageAttributes", {})) + letter["Body"], logical_id)
    size = sum(r.log_file.stat().st_size for r in soak.runners if r.log_file.exists()) // 1024
    return Check(
        "No secret in logs, events, dead letters",
        not leaks,
        f"{size} KiB of runner logs, {sum(soak.outcomes.kinds.values())} outcome events and every dead letter scanned"
        + (f"; FOUND {len(leaks)}: {leaks[:3]}" if leaks else ""),
    )


def check_concurrency(state: EndState) -> Check:
    """DESIGN.md: the upstream is protected (bounded concurrency, from the template's settings)."""
    params = state.soak.stack.parameters
    queue, per_call = int(params["QueueMaximumConcurrency"]), int(params["UpstreamConcurrency"])
    signup, refresh = min(10, int(params["SignupMaximumConcurrency"])), int(params["RefreshMaximumConcurrency"])
    bound = queue * per_call + signup + refresh * per_call
    peak = int(state.counters.get("in_flight_peak", 0))
    state.m.values |= {"in_flight_peak": peak, "in_flight_bound": bound}
    return Check(
        "Upstream concurrency bounded",
        0 < peak <= bound,
        f"peak {peak} calls in flight at the emulator (bound {bound}: queue {queue} x {per_call} + signup {signup} + "
        f"refresh {refresh} x {per_call}); faults served {state.counters.get('faults_served')}",
    )


def check_completeness(state: EndState) -> Check:
    """Not an invariant: that the run did what it claims (else its other checks prove less than they say)."""
    soak, options, kill, m = state.soak, state.soak.options, state.kill, state.m
    versions = sorted(int(u.get("Version", 0)) for u in state.active)
    sweeps = [e for e in state.runner_events if e.get("kind") == "sweep"]
    overlaps = sum(
        1
        for a in sweeps
        if a["sweeper"] == "schedule"
        for b in sweeps
        if b["sweeper"] == "twin" and a["start"] < b["end"] and b["start"] < a["end"]
    )
    sweep_counts = collections.Counter(e["sweeper"] for e in sweeps)
    m.values |= {
        "versions": (versions[0], statistics.median(versions), versions[-1]) if versions else (0, 0, 0),
        "sweeps": dict(sweep_counts),
        "overlaps": overlaps,
    }
    laggards = [str(u["DeviceToken"]) for u in state.active if int(u.get("Version", 0)) < 1 + options.cycles]
    overdue = [str(u["DeviceToken"]) for u in state.active if int(u.get("AccessExpiresAt", 0)) < time.time() - 30]
    if overdue:
        explain(soak, overdue[:20], state.users, state.by_device, "access token expired over 30 s ago")
    if laggards:
        explain(soak, laggards[:20], state.users, state.by_device, f"refreshed fewer than {options.cycles} times")
    in_flight = sum(kill.in_flight.values())
    parts = [
        (bool(versions) and versions[0] >= 1 + options.cycles, f"every ACTIVE user refreshed >= {options.cycles}x"),
        (overlaps > 0, "two sweepers overlapped"),
        (soak.revoke is not None and bool(state.revoke.revoked or not options.revoke_fraction), "tokens revoked"),
    ]
    if options.kill:
        parts.append((soak.kill is not None and in_flight > 0, "the kill left work in flight"))
    missing = [what for ok, what in parts if not ok]
    return Check(
        "The soak did what it claims",
        not missing and not soak.problems,
        f"Version min {m['versions'][0]} · median {m['versions'][1]:g} · max {m['versions'][2]} "
        f"({state.counters.get('refreshes')} refreshes, {state.counters.get('logins')} logins); sweeps "
        f"{dict(sweep_counts)}, {overlaps} overlapping pairs; kill: {len(kill.pending_claims)} claims, "
        f"{len(kill.leases)} leases, bulk {_states_text(kill.bulk_chunks)}, {in_flight} messages in flight"
        + (f"; MISSING: {', '.join(missing)}" if missing else "")
        + (f"; PROBLEMS: {'; '.join(soak.problems)}" if soak.problems else ""),
    )


def measure(state: EndState, elapsed: float) -> None:
    """Latency, throughput and the rest of the numbers (measures, not checks)."""
    soak, m = state.soak, state.m
    feeder, registered = soak.feeder, soak.outcomes.registered
    latencies = {
        cid: registered[cid] - feeder.published[cid]
        for cid in soak.work.client_ids
        if cid in registered and cid in feeder.published
    }
    m["latency"] = _latency_summary(latencies.values())
    m["latency_by_path"] = {
        path: _latency_summary(v for cid, v in latencies.items() if feeder.path_of.get(cid) == path)
        for path in ("signup", "queue")
    }
    if soak.kill:
        # Without the ClientIds whose message the dead runner held: those waited for the visibility timeout.
        orphaned = set(soak.kill.orphaned_client_ids)
        m["latency_calm"] = _latency_summary(v for cid, v in latencies.items() if cid not in orphaned)
        m["orphaned_clients"] = len(orphaned)
    # Without the kill's orphans: they were stored only when their visibility timeout lapsed, long after the rest.
    orphans = set(soak.kill.orphaned_client_ids) if soak.kill else set()
    stored_times = sorted(registered[cid] for cid in latencies if cid not in orphans)
    if stored_times:
        # Up to the 99th percentile of the rest.
        n99 = math.ceil(0.99 * len(stored_times))
        span = stored_times[n99 - 1] - feeder.started_at
        m["throughput"] = n99 / span if span > 0 else math.nan
        m["registration_span"] = span
    m.values |= {
        "feed_rate": len(soak.work.messages) / max(1e-9, feeder.finished_at - feeder.started_at),
        "refresh_rate": state.counters.get("refreshes", 0) / max(1.0, elapsed),
        "expired_at_end": sum(1 for u in state.active if int(u.get("AccessExpiresAt", 0)) <= time.time()),
        "counters": state.counters,
        "elapsed": elapsed,
        "kill": state.kill,
        "revoke": state.revoke,
        "runner_stats": _runner_totals(soak.runners),
    }


def explain(
    soak: Soak, device_tokens: Sequence[str], users: Sequence[dict[str, Any]], by_device: dict, why: str
) -> None:
    """Write what is known of these users (no token) to ``anomalies.jsonl`` in the workdir, to find out why."""
    stored = {str(u["DeviceToken"]): u for u in users}
    kill = soak.kill or KillRecord()
    by_client = collections.defaultdict(list)
    for m in soak.work.messages:
        if m.client_id:
            by_client[m.client_id].append(f"{m.path}:{m.kind}")
    with (soak.options.workdir / "anomalies.jsonl").open("a", encoding="utf-8") as out:
        for dt in device_tokens:
            item = {k: v for k, v in stored.get(dt, {}).items() if k not in ("AccessToken", "RefreshToken")}
            client_id = item.get("ClientId")
            record = {
                "why": why,
                "DeviceToken": dt,
                "stored": item,
                "upstream": by_device.get(dt),
                "deliveries": by_client.get(str(client_id), []),
                "claimed_at_kill": client_id in kill.pending_claims,
                "leased_at_kill": dt in kill.leases,
                "revoked": dt in (soak.revoke.revoked if soak.revoke else []),
                "log_lines": [
                    line.strip()[:600]
                    for runner in soak.runners
                    if runner.log_file.exists()
                    for line in runner.log_file.open(encoding="utf-8", errors="replace")
                    if dt in line or (client_id and str(client_id) in line)
                ][:50],
            }
            out.write(json.dumps(record, default=str) + "\n")


def _latency_summary(values: Iterable[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    return {
        "n": len(ordered),
        "p50": percentile(ordered, 0.50),
        "p99": percentile(ordered, 0.99),
        "max": ordered[-1],
    }


def _runner_totals(runners: Sequence[Runner]) -> dict[str, Any]:
    """The last counters each runner wrote (a killed one: its last snapshot before death)."""
    totals: dict[str, Any] = {}
    for runner in runners:
        last = [e["stats"] for e in runner.events() if e.get("kind") == "stats"]
        if last:
            stats = last[-1]
            totals[f"runner {runner.index}"] = {
                name: (f["invocations"], f["errors"], f["records"], f["records_failed"])
                for name, f in sorted(stats["functions"].items())
            } | {"async retries": stats["async_retries"], "destinations": stats["async_destinations"]}
    return totals


# --------------------------------------------------------------------------------------------- report


def _ms(value: float) -> str:
    return f"{value * 1000:,.0f} ms" if value < 10 else f"{value:,.1f} s"


def _latency_text(summary: dict[str, float]) -> str:
    if not summary.get("n"):
        return "n/a"
    return f"p50 {_ms(summary['p50'])} · p99 {_ms(summary['p99'])} · max {_ms(summary['max'])} (n={summary['n']:,})"


def print_summary(checks: Sequence[Check], m: Measures, out: TextIO) -> None:
    width = max(len(c.name) for c in checks) + 2
    print(f"\n{'─' * 30} soak summary ({m['elapsed']:.0f} s) {'─' * 30}", file=out)
    for c in checks:
        print(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}{c.detail}", file=out)
    print(file=out)
    for name, value in measure_rows(m):
        print(f"  {name:<52}{value}", file=out)
    failed = [c.name for c in checks if not c.ok]
    verdict = f"FAILED - {', '.join(failed)}" if failed else "OK - every invariant of DESIGN.md held"
    print(f"\nRESULT: {verdict}", file=out, flush=True)


def measure_rows(m: Measures) -> list[tuple[str, str]]:
    """The numbers of the run, as (name, value) rows."""
    counters, kill = m["counters"], m["kill"]
    per_client = collections.Counter({f"{k} user(s)": v for k, v in m["per_client"].items()})
    relogin_reasons = sorted(set(m["needs_relogin"].values()))
    rows = [
        ("upstream users per ClientId", _counter_text(per_client)),
        (
            "users stored / expected",
            f"{m['stored']:,} / {m['expected_users']:,} (bulk: {m['bulk_stored']} stored, {m['bulk_reported']} "
            f"reported as bulk_incomplete; chunks {_states_text(m['chunks'])})",
        ),
        *((f"dead letters: {queue}", _counter_text(collections.Counter(r))) for queue, r in m["dlq"].items()),
        (
            "refresh tokens rejected by the emulator",
            f"{m['rejected_total']} ({_counter_text(collections.Counter(m['rejected']))}); "
            f"{m['revoked']} + {len(m['revoke'].dead)} revoked",
        ),
        ("NEEDS_RELOGIN", f"{len(m['needs_relogin'])}: " + ("; ".join(relogin_reasons) or "none")),
        ("signup -> stored latency, all", _latency_text(m["latency"])),
        *((f"... {path} path", _latency_text(s)) for path, s in m["latency_by_path"].items()),
    ]
    if "latency_calm" in m.values:
        rows.append(
            (f"... without the {m['orphaned_clients']} ClientIds the kill orphaned", _latency_text(m["latency_calm"]))
        )
    if "throughput" in m.values:
        rows.append(
            (
                "registration throughput",
                f"{m['throughput']:.1f} users/s (99% of the ClientIds the kill did not orphan stored "
                f"{m['registration_span']:.0f} s after the feed began; fed at {m['feed_rate']:.1f} messages/s)",
            )
        )
    versions = m["versions"]
    rows += [
        ("refreshes, logins", f"{counters.get('refreshes')} ({m['refresh_rate']:.1f}/s), {counters.get('logins')}"),
        ("Version of ACTIVE users (min · median · max)", f"{versions[0]} · {versions[1]:g} · {versions[2]}"),
        (
            "sweeps (schedule / twin), overlapping pairs",
            f"{m['sweeps'].get('schedule', 0)} / {m['sweeps'].get('twin', 0)}, {m['overlaps']}",
        ),
        (
            "left by the kill",
            f"{len(kill.pending_claims)} PENDING claims, {len(kill.leases)} live leases, bulk chunks "
            f"{_states_text(kill.bulk_chunks)}, in flight {kill.in_flight}; {kill.expired} made visible again "
            f"{m['options'].orphan_visibility} s later",
        ),
        ("upstream calls in flight, peak / bound", f"{m['in_flight_peak']} / {m['in_flight_bound']}"),
        ("faults served", str(counters.get("faults_served"))),
        ("ACTIVE access tokens expired at the end", str(m["expired_at_end"])),
    ]
    return rows


def results_section(options: SoakOptions, checks: Sequence[Check], m: Measures, started: datetime) -> str:
    """The markdown section recorded in ``bench/RESULTS.md``."""
    kill: KillRecord = m["kill"]
    revoke: RevokeRecord = m["revoke"]
    uname = platform.uname()
    arguments = " ".join(sys.argv[1:])
    command = f'make soak ARGS="{arguments}"' if arguments else "make soak"
    killed = (
        f"killed (SIGKILL) {kill.at - m['started_epoch']:.0f} s in and restarted {kill.restarted_at - kill.at:.1f} s "
        f"later; the messages it held made visible again {options.orphan_visibility} s after the kill"
        if kill.at
        else "never killed"
    )
    lines = [
        f"### Soak: {options.title}",
        "",
        f"{started:%Y-%m-%d %H:%M} UTC on `{uname.system} {uname.node} {uname.release} {uname.machine}`, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}: {m['elapsed']:.0f} s; load average at the end "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}. Command: `{command}`.",
        "",
        f"Workload: {options.signups:,} signups, {options.registrations:,} registrations ({options.both_paths} "
        f"ClientIds on both paths), {options.duplicate_rate:.0%} delivered twice, {options.malformed_rate:.0%} "
        f"malformed, bulk Quantity {options.bulk}; fed at {m['feed_rate']:.1f} messages/s. "
        f"Faults `{json.dumps(options.faults)}` on create, create_many, refresh and login. "
        f"Tokens live {options.token_lifetime} s and are refreshed "
        f"{options.refresh_margin} s before expiry; two sweepers every {options.sweep_every:g} s; "
        f"RefreshMaximumConcurrency {options.refresh_concurrency}; Login budget {options.login_budget}/min"
        + (
            " (relaxed: above the vendor's Login limit of 5/min per address, which this run's emulator does not "
            "enforce)"
            if options.login_budget > TEMPLATE_MAX_LOGIN_BUDGET
            else " (the fleet's, under the vendor's limit)"
        )
        + "; claims "
        f"live {options.claim_seconds or 120} s, refresh leases {options.lease_seconds or 180} s"
        + (
            " (shortened for a quick run, below what AWS needs: upstream calls bounded to 2 attempts of 2 s, "
            "no clock skew allowed)"
            if options.claim_seconds is not None or options.lease_seconds is not None
            else ""
        )
        + ". Runner "
        f"{killed}. Revoked: {len(revoke.revoked)} refresh tokens, and {len(revoke.dead)} more denied Login.",
        "",
        "| check | result | detail |",
        "|---|---|---|",
        *(f"| {c.name} | {'ok' if c.ok else '**FAIL**'} | {c.detail.replace('|', '/')} |" for c in checks),
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {name} | {value.replace('|', '/')} |" for name, value in measure_rows(m)),
        "",
    ]
    return "\n".join(lines)


def record(path: Path, section: str, title: str) -> None:
    """Replace the section with this heading in ``path`` (or append it), keeping the file's introduction."""
    intro = (
        "# Benchmark and soak results\n\n"
        "## Soak\n\n"
        "`make soak` (`bench/soak.py`): the whole service on the local stack of `make run`, under load and upstream "
        "faults, with the event runner killed mid-run; each section below is the last run of one size, recorded by "
        "the script itself. See the docstring of `bench/soak.py` for the method.\n\n"
    )
    text = path.read_text(encoding="utf-8") if path.exists() else intro
    if "## Soak" not in text:
        text = text.rstrip("\n") + "\n\n" + intro.split("\n\n", 1)[1]
    heading = f"### Soak: {title}\n"
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n### ", start + len(heading))
        end = text.find("\n## ", start + len(heading)) if end < 0 else end
        text = text[:start] + section.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    out = sys.stdout
    options.workdir.mkdir(parents=True, exist_ok=True)
    for old in [*options.workdir.glob("runner-*"), *options.workdir.glob("anomalies.jsonl")]:
        old.unlink()
    logging.basicConfig(
        level=logging.WARNING,
        filename=options.workdir / "driver.log",
        filemode="w",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log: one line per AWS call otherwise
    started = datetime.now(UTC)
    t0 = time.time()
    moto = moto_server.start()
    soak: Soak | None = None
    try:
        host, port = moto.get_host_and_port()
        # The vendor allows 5 Logins a minute per IP (then an hour's block): a Login budget above that needs the
        # emulator's limit off, and the output says so.
        relax = options.login_budget > VENDOR_LIMIT_PER_MINUTE
        with running_emulator(
            token_lifetime=options.token_lifetime,
            login_limit_per_minute=0 if relax else None,
            login_limit_reason=f"the soak's LoginBudgetPerMinute is {options.login_budget}" if relax else None,
        ) as emulator:
            stack = provision(
                f"http://{host}:{port}",
                template_path=REPO_ROOT / "template.yaml",
                parameters={
                    "UserServiceUrl": emulator.url,
                    "LogLevel": options.log_level,
                    "RefreshMarginSeconds": str(options.refresh_margin),
                    "RefreshSpreadSeconds": str(options.refresh_spread),
                    "LoginBudgetPerMinute": str(min(options.login_budget, TEMPLATE_MAX_LOGIN_BUDGET)),
                    "RefreshMaximumConcurrency": str(options.refresh_concurrency),
                },
                stack_name="soak",
                instance_credentials=emulator.instances,
            )
            stack_path = stack.save(options.workdir / "stack.json")
            print(f"soak: moto {stack.endpoint_url}, emulator {emulator.url}, logs in {options.workdir}", file=out)
            print(f"soak: emulator {emulator.login_limit_line}", file=out)
            for line in login_limit_relaxations():
                print(f"soak: {line}", file=out)
            work = build_workload(options)
            soak = Soak(options, stack, emulator, stack_path, work, out, started=t0)
            try:
                soak.run()
            finally:
                soak.stop_runner()
            checks, measures = check(soak, time.time() - t0)
            measures["started_epoch"] = t0
            measures["options"] = options
            print_summary(checks, measures, out)
            if options.results is not None:
                record(options.results, results_section(options, checks, measures, started), options.title)
                print(f"recorded in {options.results}", file=out)
            return 0 if all(c.ok for c in checks) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if soak is not None:
            for runner in soak.runners:
                if runner.process.poll() is None:
                    runner.process.kill()
        moto.stop()


if __name__ == "__main__":
    sys.exit(main())
