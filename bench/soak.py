"""``make soak``: a load and fault soak of the whole service on the local stack of ``make run``, checked against the
invariants of DESIGN.md; it exits 1 when one is broken (so it can gate a release) and records its results.

Usage (from the repository root)::

    make soak                   # the default sizes: about 20 minutes on 2 shared CPUs
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
   ``--bulk`` users without ``RequestId`` (the intake stamps its message id). **Lifecycle events** are mixed in, each
   some seconds of feed after its user's registration: ``--update-rate`` of the users updated (every other one with
   a flag change), each then sent an update that occurred a second *before* it (stale); ``--delete-rate`` deleted,
   each then sent a redelivered registration and a late update that both occurred before the deletion;
   ``--move-rate`` moved to the second instance (``fleet-eu``); ``--deactivate-rate`` deactivated then reactivated;
   one deletion racing its own registration (1 ms later); and bad lifecycle input (invalid fields, an unknown
   instance). Users drawn for changes are registered once only, so what each ends as follows from its changes.
4. **Kill.** Half-way through the feed (and once token refreshes are under way) the bulk request is sent; while its
   first CreateMany chunk is in flight its message is **delivered a second time** (made visible again in moto: a
   second poller receives it and must wait, never judge the chunk lost), and as soon as a chunk is in flight the
   runner is killed with SIGKILL. What it held is recorded (PENDING claims, live refresh leases, bulk chunk states,
   messages in flight) and a new runner starts at once against the same moto server and emulator, as Lambda's
   pollers would go on, with a **second runner beside it whose clock runs** ``--clock-offset`` **seconds ahead**
   (``time.time`` moved in that process; below the skew the functions allow): from then on two fleets whose clocks
   differ take and judge the same claims, leases and budgets. CreateMany is then **switched off** and a bulk of
   ``--big-bulk`` users (above the ~1,100 one delivery makes without it; no tokens, so no refresh load; on the second
   instance) is sent: it must finish by continuations, each of its messages received once. The messages the dead
   runner held stay invisible until their visibility timeout lapses. The template's is 360 s (6x the function
   timeout) and no parameter overrides it, so the lapse is *simulated*: ``--orphan-visibility`` (185 s) after the
   kill, exactly those messages (same receipt handle as at the kill) are made visible again in moto. 185 s keeps the
   order the design relies on -- visibility timeout > refresh lease (180 s) > registration claim (120 s) -- so a
   redelivered message finds its dead holder's claim or lease expired, as on AWS; making them visible at once would
   not. The chunk the kill cut is then judged lost (``bulk_incomplete``) and the **reconcile function adopts** its
   users from the upstream's listing (or reports it, when the call never reached the upstream: "fewer").
5. **Tokens.** Tokens live ``--token-lifetime`` s and are refreshed ``--refresh-margin`` s before expiry, so every user
   goes through at least ``--cycles`` refreshes during the run. When the feed is over, a **slow upstream** phase of
   ``--slow-seconds``: refresh and Login answers held for 50-95% of the client's read timeout, 10% of them after a
   429 whose Retry-After is the longest the client waits out, so rotating calls last most of what a lease may hold.
   Then 1% of all refresh tokens are revoked (``emulator.revoke(fraction=0.01)``), and ``--dead-tokens`` more users
   are revoked *and* denied Login: only those may end ``NEEDS_RELOGIN``. Once the lost chunk is adopted or reported,
   an **operator redrives** the registration DLQ with ``telematics-reg dlq redrive`` (the malformed letters and the
   bulk's ``bulk_incomplete``, which must continue the same bulk, never make it again).
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
    duration  ~=  kill time + the longer of: the lost chunk's adoption (~310 s: its call window, a claim, the skew)
                  and the bulk without CreateMany (one Create after another: 1-3 users/s here), then the cycles

The defaults (300 + 300 signups/registrations, 60 on both paths, bulk 150: 690 users; 120 s tokens; 7 messages/s so
the feed is still running when refreshes begin and the kill catches both; the bulk of 1,200 without CreateMany,
TOKENLESS so that it adds no refresh load) took about 7 minutes before the bulk without CreateMany and the reconcile
function's adoption joined; with them, about 20 minutes on this loaded machine (the 1,200 Creates, one after another,
set the pace). The issue's sizes (10,300 users) need 1,500 s tokens and so about 1 h 45 min.

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
One upstream user per ClientId (none for a deleted one) · every registration stored or dead-lettered with its reason,
bad input never upstream · the bulk request never doubled, never judged lost while in flight, each chunk stored,
adopted or reported, and nothing made upstream but not stored · the bulk without CreateMany finished by continuations,
each message received once · the operator's redrive · no token lost (every stored refresh token live, dead tokens
marked and announced, revoked ones recovered by Login) · no refresh token spent twice · deleted users: nothing left
(no token, no profile, no dead letter) and none resurrected upstream · no stale change applied · every changed user's
upstream profile, flags, status and instance as its last change left them · one admin Login for the whole run · no
secret in logs, events or dead letters · upstream concurrency bounded · and that the run did what it claims (kill with
work in flight, refresh cycles, overlapping sweeps, revocation, the duplicate delivery, the slow phase, the skewed
runner, the redrive).
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
    queue_depth,
)
from local.emulator.faults import CALLS as FAULT_CALLS  # noqa: E402
from local.emulator.login_limit import VENDOR_LIMIT_PER_MINUTE  # noqa: E402
from local.emulator.testing import EmulatorHandle, login_limit_relaxations, running_emulator  # noqa: E402
from local.send import client, publish_signups, send_messages  # noqa: E402
from local.stack import LocalStack, provision  # noqa: E402
from telematics_reg.credentials import SecretsManagerDeviceTokenKey  # noqa: E402
from telematics_reg.registration import CREATE_MANY_CHUNK, device_token_for  # noqa: E402
from telematics_reg.settings import ServiceSettings  # noqa: E402

log = logging.getLogger("soak")

RESULTS_PATH: Final = REPO_ROOT / "bench" / "RESULTS.md"
#: The second instance of the run's credentials: users are moved there, and the big bulk is made there.
MOVE_TO: Final = "fleet-eu"
#: The dead-letter queues the checks read: make run's (every function's, each once: a second read finds none).
SOAK_DEAD_LETTER_QUEUES: Final = tuple(dict.fromkeys(DEAD_LETTER_QUEUES))
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
#: 2 s of clock skew allowed (the skewed runner's offset must stay below it), a declared function timeout of the
#: shorter TTL less the skew, and the reconcile function's lease and window margin at their least. Below what AWS
#: needs: said in the output.
QUICK_TIMING: Final = {
    "UPSTREAM_MAX_ATTEMPTS": "2",
    "UPSTREAM_CONNECT_TIMEOUT": "0.5",
    "UPSTREAM_READ_TIMEOUT": "1.5",
    "UPSTREAM_MAX_RETRY_AFTER": "2",
    "REFRESH_COMMIT_SECONDS": "1",
    "CLOCK_SKEW_SECONDS": "2",
    "RECONCILE_LEASE_SECONDS": "30",
    "RECONCILE_WINDOW_MARGIN_SECONDS": "2",
}
#: The service's own clock skew allowance (ServiceSettings.clock_skew_seconds) when timings are not shortened.
SERVICE_CLOCK_SKEW: Final = 10


def quick_timing_environment(claim_seconds: int | None, lease_seconds: int | None) -> dict[str, str]:
    """The functions' environment for shortened claims and leases (empty when neither is shortened)."""
    if claim_seconds is None and lease_seconds is None:
        return {}
    environment = dict(QUICK_TIMING)
    skew = int(QUICK_TIMING["CLOCK_SKEW_SECONDS"])
    shortest = min(claim_seconds or 120, lease_seconds or 180)
    environment["FUNCTION_TIMEOUT_SECONDS"] = str(max(1, shortest - skew))
    if claim_seconds is not None:
        environment["CLAIM_SECONDS"] = str(claim_seconds)
        environment["LIFECYCLE_LEASE_SECONDS"] = str(claim_seconds)
    if lease_seconds is not None:
        environment["REFRESH_LEASE_SECONDS"] = str(lease_seconds)
    return environment


#: The lifecycle queue's maxReceiveCount in template.yaml.
LIFECYCLE_MAX_RECEIVES: Final = 10


def unknown_user_environment(failure_visibility: int) -> dict[str, str]:
    """UNKNOWN_USER_SECONDS scaled to the run's visibility timeout, as the template scales it to its own.

    On AWS a change waiting for its user's registration comes back every VisibilityTimeout (360 s) and has
    maxReceiveCount (10) receives: an hour, well past the 900 s after which it is dead-lettered ``unknown_user``.
    The run brings failed records back after ``failure_visibility`` seconds, so the bound shrinks with it (keeping
    two receives spare for transient failures); otherwise the queue's redrive, not the function, would end the wait.
    """
    default = int(ServiceSettings.model_fields["unknown_user_seconds"].default)
    return {"UNKNOWN_USER_SECONDS": str(min(default, (LIFECYCLE_MAX_RECEIVES - 2) * failure_visibility))}


def clock_skew_allowed(claim_seconds: int | None, lease_seconds: int | None) -> float:
    """The clock skew the functions are told to allow (CLOCK_SKEW_SECONDS)."""
    quick = quick_timing_environment(claim_seconds, lease_seconds)
    return float(quick.get("CLOCK_SKEW_SECONDS", SERVICE_CLOCK_SKEW))


def upstream_read_timeout(claim_seconds: int | None, lease_seconds: int | None) -> float:
    """Each upstream attempt's read timeout (UPSTREAM_READ_TIMEOUT) as the functions will have it."""
    quick = quick_timing_environment(claim_seconds, lease_seconds)
    return float(quick.get("UPSTREAM_READ_TIMEOUT", ServiceSettings.model_fields["upstream_read_timeout"].default))


def upstream_max_retry_after(claim_seconds: int | None, lease_seconds: int | None) -> float:
    """The longest Retry-After the functions wait out (UPSTREAM_MAX_RETRY_AFTER)."""
    quick = quick_timing_environment(claim_seconds, lease_seconds)
    return float(
        quick.get("UPSTREAM_MAX_RETRY_AFTER", ServiceSettings.model_fields["upstream_max_retry_after"].default)
    )


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
    update_rate: float = 0.05
    delete_rate: float = 0.02
    move_rate: float = 0.01
    deactivate_rate: float = 0.01
    big_bulk: int = 1200
    clock_offset: float = 8.0
    slow_seconds: float = 40.0
    redrive: bool = True
    timeout: float = 1500.0
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


def parse_options(argv: Sequence[str] | None = None) -> SoakOptions:  # noqa: PLR0915 - one statement per option
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
    add("--update-rate", type=float, default=d.update_rate, help="users updated (UserUpdated) (%(default)s)")
    add("--delete-rate", type=float, default=d.delete_rate, help="users deleted (UserDeleted) (%(default)s)")
    add("--move-rate", type=float, default=d.move_rate, help="users moved to fleet-eu (UserMoved) (%(default)s)")
    add(
        "--deactivate-rate",
        type=float,
        default=d.deactivate_rate,
        help="users deactivated, then reactivated (%(default)s)",
    )
    add(
        "--big-bulk",
        type=int,
        default=d.big_bulk,
        help="Quantity of a bulk made with CreateMany switched off, 0 for none (%(default)s)",
    )
    add(
        "--clock-offset",
        type=float,
        default=d.clock_offset,
        help="a second runner whose clock runs S s ahead, 0 for none; below the skew the service allows (%(default)s)",
    )
    add(
        "--slow-seconds",
        type=float,
        default=d.slow_seconds,
        help="a phase of S s with refresh and Login answers held close to the read timeout (%(default)s)",
    )
    add("--no-redrive", action="store_true", help="no operator redrive of the registration DLQ")
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
    # Beyond the allowed skew the service's leases promise nothing: such a run would test a misconfiguration.
    if not 0 <= args.clock_offset < clock_skew_allowed(args.claim_seconds, args.lease_seconds):
        parser.error(
            f"--clock-offset must be below the clock skew the functions allow "
            f"({clock_skew_allowed(args.claim_seconds, args.lease_seconds):g} s)"
        )
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
        update_rate=args.update_rate,
        delete_rate=args.delete_rate,
        move_rate=args.move_rate,
        deactivate_rate=args.deactivate_rate,
        big_bulk=args.big_bulk,
        clock_offset=args.clock_offset,
        slow_seconds=args.slow_seconds,
        redrive=not args.no_redrive,
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
    """One delivery the soak makes: a signup event's detail, a registration queue message's body, or a lifecycle
    event's detail (``detail_type`` names it)."""

    path: str  # "signup" | "queue" | "lifecycle"
    body: Any  # dict (signup detail / queue JSON / lifecycle detail) or str (a queue body sent as is)
    kind: str  # "new" | "duplicate" | "both" | "malformed" | "change" | "stale" | "late" | "race"
    client_id: str | None = None
    reason: str | None = None  # the dead-letter reason a malformed message must get
    marker: str | None = None  # a string of the malformed body that finds its dead letter
    detail_type: str | None = None  # a lifecycle event's detail-type
    #: Stamp ``OccurredAt`` when sent: ``occurred_from``'s occurrence plus ``occurred_delta`` seconds (a stale
    #: change, a redelivered registration), or the moment of sending when ``occurred_from`` is None.
    stamp: bool = False
    occurred_from: Message | None = None
    occurred_delta: float = 0.0
    sent_at: float = 0.0
    occurred: float = 0.0  # when it occurred: its OccurredAt, or (unstamped) when it was sent


@dataclass
class Lifecycle:
    """The lifecycle changes of the run, by purpose, and what each user must end as."""

    updated: dict[str, Message] = field(default_factory=dict)  # ClientId -> its last (newest) update
    stale: dict[str, Message] = field(default_factory=dict)  # ClientId -> an update older than that, sent after it
    deleted: dict[str, Message] = field(default_factory=dict)  # ClientId -> its UserDeleted
    moved: dict[str, Message] = field(default_factory=dict)
    reactivated: dict[str, Message] = field(default_factory=dict)  # ClientId -> UserReactivated (after Deactivated)
    racing: dict[str, Message] = field(default_factory=dict)  # ClientId -> a UserDeleted 1 ms after its registration

    @property
    def client_ids(self) -> set[str]:
        return {*self.updated, *self.deleted, *self.moved, *self.reactivated, *self.racing}

    def last_change(self, client_id: str) -> Message | None:
        """The newest change of a user that must have been applied (stale and post-deletion ones never are)."""
        for changes in (self.racing, self.deleted, self.moved, self.reactivated, self.updated):
            if client_id in changes:
                return changes[client_id]
        return None


@dataclass
class Workload:
    run: str
    messages: list[Message]
    client_ids: list[str]  # every ClientId that must end as exactly one upstream user and one stored user
    bulk_request_id: str
    lifecycle: Lifecycle = field(default_factory=Lifecycle)

    @property
    def malformed(self) -> list[Message]:
        return [m for m in self.messages if m.kind == "malformed"]

    @property
    def gone(self) -> set[str]:
        """ClientIds deleted: no upstream user and no token or profile may be left of them."""
        return {*self.lifecycle.deleted, *self.lifecycle.racing}

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
    lifecycle = _lifecycle_changes(options, rng, run, originals, position, placed)
    placed.sort(key=lambda item: item[0])
    return Workload(
        run=run,
        messages=[m for _, m in placed],
        client_ids=signups + queued,
        bulk_request_id=f"soak-bulk-{run}",
        lifecycle=lifecycle,
    )


def _lifecycle_changes(
    options: SoakOptions,
    rng: random.Random,
    run: str,
    originals: list[Message],
    position: dict[int, float],
    placed: list[tuple[float, Message]],
) -> Lifecycle:
    """Updates (a flag change among them) each followed by a stale one, deletions each followed by a redelivered
    registration and a late update (both occurred before it), moves, deactivations then reactivations, one deletion
    racing its own registration, and bad lifecycle input; each change some seconds of feed after its registration.

    Users are drawn among those registered once only (no duplicate, not both paths), so that what each ends as
    upstream follows from this run's changes alone.
    """
    found = Lifecycle()
    copied = {m.client_id for _, m in placed if m.kind in ("duplicate", "both")}
    pool = [m for m in originals if m.client_id not in copied]
    rng.shuffle(pool)
    users = len(originals)

    def take(rate: float) -> list[Message]:
        count = min(len(pool), max(1, round(users * rate))) if rate > 0 else 0
        chosen = pool[:count]
        del pool[:count]
        return chosen

    def put(at: float, message: Message) -> Message:
        placed.append((at, message))
        return message

    def change(detail_type: str, cid: str, **detail: Any) -> Message:
        return Message("lifecycle", {"ClientId": cid, **detail}, "change", cid, detail_type=detail_type, stamp=True)

    for n, m in enumerate(take(options.update_rate)):
        assert m.client_id is not None
        at = position[id(m)] + rng.uniform(40, 120)
        fields: dict[str, Any] = {"FirstName": f"Updated{n}", "City": "Paris"}
        if n % 2 == 0:  # a flag change
            fields["UserFields"] = {"EnableTracking": False, "EnableRealTimeLocation": True}
        newest = put(at, change("UserUpdated", m.client_id, **fields))
        found.updated[m.client_id] = newest
        # Occurred a second before the update it follows: never applied over it.
        stale = change("UserUpdated", m.client_id, FirstName="Stale", City="Stale", UserFields={"EnableTracking": True})
        stale.kind, stale.occurred_from, stale.occurred_delta = "stale", newest, -1.0
        found.stale[m.client_id] = put(at + rng.uniform(5, 40), stale)
    for m in take(options.delete_rate):
        assert m.client_id is not None
        at = position[id(m)] + rng.uniform(40, 120)
        deletion = found.deleted[m.client_id] = put(at, change("UserDeleted", m.client_id))
        # Both occurred before the deletion: neither may bring the user back nor reach the upstream.
        redelivered = Message(m.path, dict(m.body), "late", m.client_id, stamp=True, occurred_from=m)
        late = change("UserUpdated", m.client_id, FirstName="AfterDeletion")
        late.kind, late.occurred_from, late.occurred_delta = "stale", deletion, -0.5
        put(at + rng.uniform(20, 60), redelivered)
        put(at + rng.uniform(20, 60), late)
    for m in take(options.move_rate):
        assert m.client_id is not None
        found.moved[m.client_id] = put(
            position[id(m)] + rng.uniform(40, 120), change("UserMoved", m.client_id, ToInstance=MOVE_TO)
        )
    for m in take(options.deactivate_rate):
        assert m.client_id is not None
        at = position[id(m)] + rng.uniform(40, 120)
        put(at, change("UserDeactivated", m.client_id))
        found.reactivated[m.client_id] = put(at + rng.uniform(10, 60), change("UserReactivated", m.client_id))
    if options.delete_rate > 0:
        # A deletion racing its own registration (1 ms later): nothing may be left upstream or stored.
        cid = f"r-{run}-00000"
        at = rng.uniform(0, len(originals))
        signup = put(at, Message("signup", _profile(rng, cid), "race", cid, stamp=True))
        deletion = change("UserDeleted", cid)
        deletion.kind, deletion.occurred_from, deletion.occurred_delta = "race", signup, 0.001
        found.racing[cid] = put(at + 0.01, deletion)
    for n, (detail_type, detail, reason) in enumerate(
        (
            ("UserUpdated", {"Gender": "Robot"}, "invalid_fields"),
            ("UserMoved", {"ToInstance": "nowhere"}, "unknown_instance"),
        )
    ):
        marker = f"bad-{run}-lifecycle-{n:04d}"
        bad = Message("lifecycle", {"ClientId": marker, **detail}, "malformed", reason=reason, marker=marker)
        bad.detail_type = detail_type
        put(rng.uniform(0, len(originals)), bad)
    return found


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
                    m.sent_at = m.occurred = now
                    if m.stamp:
                        base = m.occurred_from.occurred if m.occurred_from is not None else now
                        m.occurred = base + m.occurred_delta
                        m.body = {**m.body, "OccurredAt": iso_ms(m.occurred)}
                    if m.client_id and m.kind != "late" and m.client_id not in self.published:
                        self.published[m.client_id] = now
                        self.path_of[m.client_id] = m.path
                if path == "signup":
                    publish_signups(self.stack, [m.body for m in batch], events=events)
                elif path == "lifecycle":
                    publish_changes(self.stack, [(str(m.detail_type), m.body) for m in batch], events=events)
                else:
                    send_messages(self.stack, [m.body for m in batch], sqs=sqs)
                index += len(batch)
                self.sent = index
        except Exception as exc:  # noqa: BLE001 - reported by the driver, and the run then fails
            self.error = exc
        finally:
            self.finished_at = time.time()


def iso_ms(moment: float) -> str:
    """ISO 8601 with milliseconds, as ``OccurredAt`` is written."""
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def publish_changes(stack: LocalStack, changes: Sequence[tuple[str, dict[str, Any]]], *, events: Any) -> None:
    """Publish lifecycle events (detail-type, detail) on the signup bus, as the customer's backend does."""
    entries = [
        {
            "EventBusName": stack.parameters["SignupEventBusName"],
            "Source": stack.parameters["SignupEventSource"],
            "DetailType": detail_type,
            "Detail": json.dumps(detail),
        }
        for detail_type, detail in changes
    ]
    for start in range(0, len(entries), 10):
        response = events.put_events(Entries=entries[start : start + 10])
        if response.get("FailedEntryCount"):
            raise RuntimeError(f"EventBridge refused {response['FailedEntryCount']} lifecycle events")


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
        #: ClientIds announced deleted (TelematicsUserDeleted, first or repeated).
        self.deleted: set[str] = set()
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
        elif kind == "TelematicsUserDeleted":
            self.deleted.add(str(detail.get("ClientId")))
            if detail.get("Duplicate"):
                kind += " (duplicate)"
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


def bulk_progress(
    stack: LocalStack, dynamodb: Any, request_id: str, instance: str = "default"
) -> dict[str, Any] | None:
    """The bulk request's progress item (``Chunk<n>`` states, ``Stored<n>``), or None before it started."""
    item = dynamodb.get_item(
        TableName=stack.outputs["TokensTableName"],
        Key={"pk": {"S": f"BULK#{instance}#{request_id}"}},
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

    def __init__(
        self, index: int, stack_path: Path, options: SoakOptions, *, clock_offset: float = 0.0, twin: bool = True
    ) -> None:
        self.index = index
        self.clock_offset = clock_offset
        self.log_file = options.workdir / f"runner-{index}.log"
        self.events_file = options.workdir / f"runner-{index}.events.jsonl"
        runtime_options = {
            "failure_visibility_timeout": options.failure_visibility,
            "schedule_interval": options.sweep_every,
            "async_retry_delay": options.async_retry_delay,
            # As many signup invocations at once as the template reserves for the function (SignupMaximumConcurrency).
            "async_concurrency": 10,
            "environment": quick_timing_environment(options.claim_seconds, options.lease_seconds)
            | login_budget_environment(options.login_budget)
            | unknown_user_environment(options.failure_visibility),
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
                *(("--twin",) if twin else ()),
                *(("--clock-offset", str(clock_offset)) if clock_offset else ()),
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
class BulkPhases:
    """What the soak saw of the bulks: the duplicate delivery, the big bulk without CreateMany, the redrive."""

    main_sent_at: float = 0.0
    #: Chunk states right after the duplicate delivery of the main bulk's message reached a second poller.
    twin_states: dict[int, str] = field(default_factory=dict)
    twin_delivered: bool = False
    twin_seen: list[str] = field(default_factory=list)  # every chunk state seen meanwhile
    big_request_id: str | None = None
    big_sent_at: float = 0.0
    #: Message id -> the highest receive count seen, for every message of the big bulk (continuations included).
    big_receives: dict[str, int] = field(default_factory=dict)
    create_many_off_at: float = 0.0
    slow_started: float = 0.0
    slow_ended: float = 0.0
    slow_faults: dict[str, Any] = field(default_factory=dict)
    redrive_at: float = 0.0
    redrive: dict[str, Any] = field(default_factory=dict)
    #: The operator's redrives of lifecycle changes dead-lettered ``unknown_user`` once their users registered.
    lifecycle_redrives: list[dict[str, Any]] = field(default_factory=list)
    lifecycle_redrive_checked: float = 0.0
    lifecycle_redrive_running: bool = False


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
    skewed: Runner | None = None
    kill: KillRecord | None = None
    revoke: RevokeRecord | None = None
    started: float = field(default_factory=time.time)
    settled_at: float = 0.0
    problems: list[str] = field(default_factory=list)
    bulk_sent_at: float = 0.0
    orphans: dict[tuple[str, str], str | None] = field(default_factory=dict)
    phases: BulkPhases = field(default_factory=BulkPhases)

    def __post_init__(self) -> None:
        self.outcomes = Outcomes(self.stack)
        self.dynamodb = client(self.stack, "dynamodb")
        self.sqs = client(self.stack, "sqs")
        self.instance_id = self.emulator.instance_id("default")
        self.instance_ids = {alias: self.emulator.instance_id(alias) for alias in self.emulator.instances}
        key_secret = self.stack.outputs["DeviceTokenKeySecretArn"]
        self.device_token_key = SecretsManagerDeviceTokenKey(
            key_secret, client=client(self.stack, "secretsmanager")
        ).get()

    @property
    def every_runner(self) -> list[Runner]:
        return [*self.runners, *([self.skewed] if self.skewed is not None else [])]

    def say(self, text: str) -> None:
        print(f"{time.time() - self.started:7.1f}s  {text}", file=self.out, flush=True)

    def at(self, moment: float) -> str:
        """A moment of the run, in seconds since it began."""
        return f"{moment - self.started:.0f}"

    # ---------------------------------------------------------------- phases

    def run(self) -> None:
        self.runners.append(Runner(1, self.stack_path, self.options))
        self.say("runner 1 started (pollers, the signup rule's tap, the schedule and a twin sweeper)")
        if not self.options.kill:
            self._start_skewed()
        self.emulator.set_faults(**self.options.faults)
        self.say(f"upstream faults on: {json.dumps(self.options.faults)}")
        feeder = Feeder(self.stack, self.work, self.options.rate)
        self.feeder = feeder
        feeder.start()
        rate = f"at {self.options.rate:g}/s" if self.options.rate > 0 else "all at once"
        self.say(f"feeding {len(self.work.messages)} messages {rate} ({self._workload_text()})")
        if not self.options.kill:
            if self.options.bulk:
                self._send_bulk()
            self._send_big_bulk()
        deadline = self.started + self.options.timeout
        last_status = 0.0
        last_rotation_check = 0.0
        rotated = False
        while True:
            self.outcomes.poll()
            self._watch_big_bulk()
            if feeder.error is not None:
                self.problems.append(f"the feed failed: {feeder.error!r}")
                return
            self._next_phase()
            if time.time() - last_status >= 10:
                self.say(self._status())
                last_status = time.time()
            if self.revoke is not None and self._registrations_settled():
                # (A full scan of the table each time: rarer for a big one.)
                every = max(min(10.0, max(2.0, self.options.sweep_every)), len(self.work.client_ids) / 500)
                if time.time() - last_rotation_check >= every:
                    rotated = self._rotated() and self._lifecycle_settled()
                    last_rotation_check = time.time()
                if rotated:
                    self.settled_at = time.time()
                    self.say("settled: every registration and change accounted for, every user rotated")
                    return
            if time.time() >= deadline:
                self.problems.append(
                    f"did not settle within {self.options.timeout:.0f} s ({self._unsettled()}): {self._status()}"
                )
                self.say(f"timed out after {self.options.timeout:.0f} s")
                return
            time.sleep(1.0)

    def _next_phase(self) -> None:
        """Start what is due: the kill, the orphans' return, the slow phase, the revocation, the redrive."""
        if self.kill is None and self.options.kill and self._kill_due():
            self._kill_and_restart()
        if self.kill and not self.kill.expired_at and time.time() >= self.kill.at + self.options.orphan_visibility:
            self._expire_orphans()
        killed = self.kill is not None or not self.options.kill
        if self.feeder.done and killed:
            self._slow_phase()
        slow_over = not self.options.slow_seconds or self.phases.slow_ended > 0
        if self.revoke is None and self.feeder.done and killed and slow_over:
            self._revoke()
        if self.options.redrive and not self.phases.redrive_at and self._main_bulk_settled():
            self._redrive()
        if self.options.redrive and self.feeder.done and self.kill is not None and self.kill.expired_at:
            self._maybe_redrive_lifecycle()

    # ---------------------------------------------------------------- the bulks

    def _send_big_bulk(self) -> None:
        """A bulk above what one invocation can make (1,100 users without CreateMany), with CreateMany switched off:
        it must finish by continuations (BulkContinued), each message received once. Without tokens
        (CreateAccessToken false: stored TOKENLESS), so that its users add no refresh load; on the second instance,
        so that its Creates (users without ClientId) never overlap the lost chunk's adoption window."""
        if not self.options.big_bulk:
            return
        self.emulator.set_config(create_many_enabled=False)
        self.phases.create_many_off_at = time.time()
        body = {"Quantity": self.options.big_bulk, "CreateAccessToken": False, "Instance": MOVE_TO}
        (message_id,) = send_messages(self.stack, [body], sqs=self.sqs)
        self.phases.big_request_id = message_id
        self.phases.big_sent_at = time.time()
        self.say(
            f"CreateMany switched off; sent a bulk of {self.options.big_bulk} users without RequestId to {MOVE_TO} "
            f"(its id is its message's, {message_id})"
        )

    def _watch_big_bulk(self) -> None:
        """Record the receive count of every message of the big bulk (the first, and the continuations that carry
        its RequestId): moto runs in this process, so its queue is read directly."""
        request_id = self.phases.big_request_id
        if request_id is None:
            return
        backend = sqs_backends[self.stack.account_id][self.stack.region]
        queue = backend.get_queue(self.stack.queue_url("RegistrationQueue").rsplit("/", 1)[1])
        for message in list(queue._messages):
            if message.id == request_id or request_id in str(message.body):
                count = int(message.approximate_receive_count)
                self.phases.big_receives[message.id] = max(count, self.phases.big_receives.get(message.id, 0))

    def _main_bulk_settled(self) -> bool:
        """Every chunk of the main bulk DONE, or UNKNOWN and judged by adoption (adopted or reported)."""
        if not self.options.bulk or (self.options.kill and (self.kill is None or not self.kill.expired_at)):
            return not self.options.bulk
        progress = bulk_progress(self.stack, self.dynamodb, self.work.bulk_request_id)
        states = chunk_states(progress)
        if not states or {"TODO", "CALLING"} & set(states.values()):
            return False
        assert progress is not None
        return all(state == "DONE" or progress.get(f"Adoption{i}") for i, state in states.items())

    def _big_bulk_settled(self) -> bool:
        if self.phases.big_request_id is None:
            return not self.options.big_bulk
        progress = bulk_progress(self.stack, self.dynamodb, self.phases.big_request_id, instance=MOVE_TO)
        states = chunk_states(progress)
        return bool(states) and set(states.values()) == {"DONE"}

    def _slow_phase(self) -> None:
        """Refresh and Login answers held close to the read timeout, 10% of them after a 429 whose Retry-After is
        the longest the client waits out: calls that last most of what a lease may hold (the lease arithmetic,
        the function Timeout and the cut-off are then what keeps one rotator per token)."""
        phases = self.phases
        if not self.options.slow_seconds or phases.slow_ended:
            return
        if not phases.slow_started:
            read = upstream_read_timeout(self.options.claim_seconds, self.options.lease_seconds)
            retry_after = upstream_max_retry_after(self.options.claim_seconds, self.options.lease_seconds)
            phases.slow_faults = {
                "latency_ms": [round(read * 500), round(read * 950)],
                "rate_limit_rate": 0.10,
                "retry_after_s": retry_after,
                "calls": ["refresh", "login"],
            }
            self.emulator.set_faults(**phases.slow_faults)
            phases.slow_started = time.time()
            self.say(f"slow upstream for {self.options.slow_seconds:g} s: {json.dumps(phases.slow_faults)}")
        elif time.time() >= phases.slow_started + self.options.slow_seconds:
            self.emulator.set_faults(**self.options.faults, calls=list(FAULT_CALLS))
            phases.slow_ended = time.time()
            self.say("slow upstream over: the run's faults again, on every call")

    def _redrive(self) -> None:
        """An operator redrives the registration DLQ with the CLI (every letter: the malformed ones, and the bulk's
        bulk_incomplete): the bulk carries its stamped RequestId, so nothing may be made twice. (On a thread: the
        CLI takes seconds to start, and the run's phases go on meanwhile.)"""
        self.phases.redrive_at = time.time()
        threading.Thread(target=self._run_redrive, name="soak-redrive", daemon=True).start()

    def _run_redrive(self) -> None:
        # As many as the queue holds now: the letters it moves are handled within a second here, and those that are
        # dead-lettered again would otherwise be seen, and moved, again by the same run of the command.
        letters = self._depth("RegistrationDeadLetterQueue")
        command = [
            str(Path(sys.executable).with_name("telematics-reg")),
            *("dlq", "redrive", "--queue", "registration", "--json", "--limit", str(max(1, letters))),
            *("--local-stack", str(self.stack_path)),
        ]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
        try:
            printed = json.loads(done.stdout)
            report: dict[str, Any] = {k: printed.get(k) for k in ("examined", "moved")}
            report["failed"] = len(printed.get("failed") or [])
        except (ValueError, AttributeError):
            report = {"output": (done.stdout + done.stderr)[-500:]}
        report["exit"] = done.returncode
        report["letters"] = letters
        self.phases.redrive = report
        if done.returncode != 0:
            self.problems.append(f"telematics-reg dlq redrive exited {done.returncode}: {report}")
        self.say(f"operator: telematics-reg dlq redrive --queue registration -> {json.dumps(report)[:300]}")

    def _maybe_redrive_lifecycle(self) -> None:
        """What README tells an operator to do with an ``unknown_user`` dead letter: once the user is registered,
        redrive it. (A registration can take longer than the bound: a lost Create answer whose recovery Logins
        meet faults.) The letter carries the time its change was ordered by, so the redriven change keeps its
        place: an older one is dropped as stale, never applied over a newer one."""
        phases = self.phases
        if phases.lifecycle_redrive_running or time.time() < phases.lifecycle_redrive_checked + 20:
            return
        phases.lifecycle_redrive_checked = time.time()
        malformed = sum(1 for m in self.work.malformed if m.path == "lifecycle")
        waiting = self._depth("LifecycleDeadLetterQueue") - malformed
        if waiting <= 0 or any(cid not in self.outcomes.registered for cid in self.work.client_ids):
            return
        phases.lifecycle_redrive_running = True
        threading.Thread(target=self._run_lifecycle_redrive, name="soak-lifecycle-redrive", daemon=True).start()

    def _run_lifecycle_redrive(self) -> None:
        command = [
            str(Path(sys.executable).with_name("telematics-reg")),
            *("dlq", "redrive", "--queue", "lifecycle", "--reason", "unknown_user", "--json"),
            *("--local-stack", str(self.stack_path)),
        ]
        try:
            done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
            try:
                printed = json.loads(done.stdout)
                report: dict[str, Any] = {k: printed.get(k) for k in ("examined", "moved")}
                report["failed"] = len(printed.get("failed") or [])
            except (ValueError, AttributeError):
                report = {"output": (done.stdout + done.stderr)[-500:]}
            report["exit"] = done.returncode
            report["at"] = self.at(time.time())
            self.phases.lifecycle_redrives.append(report)
            if done.returncode != 0:
                self.problems.append(f"telematics-reg dlq redrive --queue lifecycle exited {done.returncode}: {report}")
            self.say(
                f"operator: telematics-reg dlq redrive --queue lifecycle --reason unknown_user -> "
                f"{json.dumps(report)[:300]}"
            )
        finally:
            self.phases.lifecycle_redrive_running = False

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

    def _start_skewed(self) -> None:
        """A second fleet of workers whose clock runs ahead: leases, claims and budgets are judged by both clocks.
        (Started with the runner that replaces the killed one, so that what the kill cuts is the killed runner's.)"""
        if not self.options.clock_offset or self.skewed is not None:
            return
        self.skewed = Runner(0, self.stack_path, self.options, clock_offset=self.options.clock_offset, twin=False)
        self.say(f"runner 0 started beside it, its clock {self.options.clock_offset:g} s ahead of the host's")

    def _send_bulk(self) -> None:
        """The main bulk, without RequestId as a customer may send it: the intake stamps its message id into the
        body, which every re-send (dead letter, redrive) keeps."""
        (message_id,) = send_messages(self.stack, [{"Quantity": self.options.bulk}], sqs=self.sqs)
        self.work.bulk_request_id = message_id
        self.bulk_sent_at = time.time()
        self.say(
            f"sent the bulk request ({self.options.bulk} users, no RequestId: known by its message id {message_id})"
        )

    def _deliver_bulk_twice(self) -> None:
        """SQS delivers the bulk's message a second time while its first delivery calls a chunk (at-least-once): the
        message is made visible again in moto, a second poller receives it, and must wait, never judge the chunk in
        flight lost (UNKNOWN)."""
        backend = sqs_backends[self.stack.account_id][self.stack.region]
        queue = backend.get_queue(self.stack.queue_url("RegistrationQueue").rsplit("/", 1)[1])
        message = next((m for m in list(queue._messages) if m.id == self.work.bulk_request_id), None)
        if message is None or message.visible:
            return
        message.change_visibility(0)
        deadline = time.time() + 5
        while time.time() < deadline and message.approximate_receive_count < 2:
            time.sleep(0.02)
        # The twin's handling: it finds the chunk CALLING under a live claim, and must leave it so.
        seen: set[str] = set()
        until = time.time() + 1.0
        while time.time() < until:
            states = chunk_states(bulk_progress(self.stack, self.dynamodb, self.work.bulk_request_id))
            seen |= {f"{i}:{state}" for i, state in states.items()}
            time.sleep(0.05)
        self.phases.twin_delivered = message.approximate_receive_count >= 2
        self.phases.twin_states = states
        self.phases.twin_seen = sorted(seen)
        self.say(
            f"the bulk's message delivered a second time (receive count {message.approximate_receive_count}); "
            f"chunks then {_states_text(self.phases.twin_states)}"
        )

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

            def states() -> dict[int, str]:
                return chunk_states(bulk_progress(self.stack, self.dynamodb, self.work.bulk_request_id))

            deadline = time.time() + 10
            while time.time() < deadline and "CALLING" not in states().values():
                time.sleep(0.02)
            self._deliver_bulk_twice()
            # Then kill while a CreateMany chunk is in flight (its answer lost with the runner: adoption's case).
            deadline = time.time() + 15
            while time.time() < deadline and "CALLING" not in states().values():
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
        self._start_skewed()
        self._send_big_bulk()

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
        changed = self.work.lifecycle.client_ids
        registered = sorted(
            cid for cid in self.work.client_ids if cid in self.outcomes.registered and cid not in changed
        )
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
        for path, queue in (
            ("signup", "SignupDeadLetterQueue"),
            ("queue", "RegistrationDeadLetterQueue"),
            ("lifecycle", "LifecycleDeadLetterQueue"),
        ):
            if self._depth(queue) < sum(1 for m in self.work.malformed if m.path == path):
                return False
        if self._depth("RegistrationQueue") or self._tap_depth() or self._depth("LifecycleQueue"):
            return False
        if not self._main_bulk_settled() or not self._big_bulk_settled():
            return False
        if self.options.redrive and not self.phases.redrive:
            return False
        assert self.revoke is not None
        return all(dt in self.outcomes.token_failed for dt in self.revoke.dead)

    def _rotated(self) -> bool:
        """Every ACTIVE user went through ``cycles`` refreshes, and every revoked one we store is back (logged in).

        (The emulator revokes among all its users: bulk users of a chunk whose answer was lost are not ours.)
        """
        users = scan_items(self.stack, self.dynamodb, projection="pk, #s, Version, AdoptedFrom")
        active = [u for u in users if u.get("Status") == "ACTIVE"]
        if any(int(u.get("Version", 0)) < 1 + self.options.cycles for u in active if not u.get("AdoptedFrom")):
            return False
        # Adopted users were stored TOKENLESS and log in when due: ACTIVE and once rotated after that is enough.
        if any(u.get("AdoptedFrom") and u.get("Status") != "ACTIVE" for u in users):
            return False
        assert self.revoke is not None
        stored = {str(u["pk"]).removeprefix("USER#") for u in users}
        return all((self.emulator.user(dt) or {}).get("HasRefreshToken") for dt in self.revoke.revoked if dt in stored)

    def _unsettled(self) -> str:
        """What the run still waits for (said when it times out)."""
        waiting = []
        if not self._main_bulk_settled():
            waiting.append("the bulk's chunks")
        if not self._big_bulk_settled():
            waiting.append("the bulk without CreateMany")
        if self.options.redrive and not self.phases.redrive:
            waiting.append("the redrive")
        if any(cid not in self.outcomes.registered for cid in self.work.client_ids):
            waiting.append("registrations")
        if self.revoke is not None and not all(dt in self.outcomes.token_failed for dt in self.revoke.dead):
            waiting.append("dead tokens announced")
        if pending := lifecycle_pending(self.work.lifecycle, scan_items(self.stack, self.dynamodb)):
            waiting.append(f"lifecycle changes of {pending[:3]}")
        if self.revoke is not None and not self._rotated():
            waiting.append("rotations")
        return ", ".join(waiting) or "nothing (in the last second)"

    def _lifecycle_settled(self) -> bool:
        """Every change that must apply has (its OccurredAt recorded on the user), every deletion left a tombstone."""
        return not lifecycle_pending(self.work.lifecycle, scan_items(self.stack, self.dynamodb))

    # ---------------------------------------------------------------- the end

    def stop_runner(self) -> None:
        if self.skewed is not None:
            code = self.skewed.stop()
            if code != 0:
                self.problems.append(f"runner {self.skewed.index} did not stop cleanly (exit {code})")
            self.say(
                f"runner {self.skewed.index} (clock ahead) stopped" + (" cleanly" if code == 0 else f" exit {code}")
            )
        code = self.runners[-1].stop()
        if code == 0:
            self.say(f"runner {self.runners[-1].index} stopped cleanly")
        else:
            # Killed after the timeout: refreshes it had in flight may have lost their rotated pair (not the kill
            # under test), so the token checks below cannot be trusted to mean what they say.
            self.problems.append(f"runner {self.runners[-1].index} did not stop cleanly (exit {code})")
            self.say(f"runner {self.runners[-1].index} did NOT stop cleanly (exit {code})")
        self.emulator.clear_faults()


def items_by_client(users: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for user in users:
        if user.get("ClientId"):
            found[str(user["ClientId"])].append(user)
    return found


def lifecycle_pending(lifecycle: Lifecycle, users: Iterable[dict[str, Any]]) -> list[str]:
    """ClientIds whose last change is not applied yet (or whose deletion left anything but a tombstone)."""
    by_client = items_by_client(users)
    pending = []
    for cid in sorted(lifecycle.client_ids):
        items = by_client.get(cid, [])
        last = lifecycle.last_change(cid)
        assert last is not None
        if cid in lifecycle.deleted or cid in lifecycle.racing:
            done = bool(items) and all(i.get("Status") == "DELETED" for i in items)
        else:
            live = [i for i in items if i.get("Status") != "DELETED"]
            done = len(live) == 1 and int(live[0].get("LastChangeAt", 0)) >= int(last.occurred * 1000)
            if cid in lifecycle.moved:
                done = done and live[0].get("Instance") == MOVE_TO
        if not done:
            pending.append(cid)
    return pending


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
    users: list[dict[str, Any]]  # the table's live users (full items: tokens stay in memory, to be verified)
    letters: dict[str, list[dict[str, Any]]]
    runner_events: list[dict[str, Any]]
    kill: KillRecord
    revoke: RevokeRecord
    tombstones: list[dict[str, Any]] = field(default_factory=list)  # the table's DELETED users

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
    items = scan_items(soak.stack, soak.dynamodb)
    state = EndState(
        soak=soak,
        m=Measures(),
        counters=soak.emulator.counters(),
        by_device={u["DeviceToken"]: u for u in soak.emulator.users()},
        users=[u for u in items if u.get("Status") != "DELETED"],
        tombstones=[u for u in items if u.get("Status") == "DELETED"],
        letters=drain_letters(soak.stack, soak.sqs),
        runner_events=[event for runner in soak.every_runner for event in runner.events()],
        kill=soak.kill or KillRecord(),
        revoke=soak.revoke or RevokeRecord(),
    )
    checks = [
        check_one_user_per_client(state),
        check_bad_input(state),
        check_stored(state),
        *check_bulk(state),
        *check_big_bulk(state),
        *check_redrive(state),
        *check_dead_letters(state),
        check_tokens(state),
        check_rejections(state),
        check_revoked(state),
        *check_lifecycle(state),
        check_secrets(state),
        check_concurrency(state),
        check_completeness(state),
    ]
    measure(state, elapsed)
    return checks, state.m


def drain_letters(stack: LocalStack, sqs: Any) -> dict[str, list[dict[str, Any]]]:
    """Every message of each dead-letter queue the checks read (received, never deleted: the run is ending)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for logical_id in SOAK_DEAD_LETTER_QUEUES:
        url = stack.queue_url(logical_id)
        messages: list[dict[str, Any]] = []
        while True:
            batch = sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=10,
                VisibilityTimeout=600,
                AttributeNames=["All"],
                MessageAttributeNames=["All"],
            ).get("Messages", [])
            if not batch:
                break
            messages += batch
        found[logical_id] = messages
    return found


def check_one_user_per_client(state: EndState) -> Check:
    """DESIGN.md: one upstream user per (Instance, ClientId), whatever the delivery; none left of a deleted one."""
    work, counters = state.soak.work, state.counters
    gone = work.gone
    expected = set(work.client_ids) | gone
    ids = getattr(state.soak, "instance_ids", None) or {"default": state.soak.instance_id}

    def upstream(cid: str) -> int:
        return sum(int(state.per_client.get(f"{instance_id}/{cid}", 0)) for instance_id in ids.values())

    counts = collections.Counter(upstream(cid) for cid in work.client_ids if cid not in gone)
    resurrected = sorted(cid for cid in gone if upstream(cid))
    strays = {k: n for k, n in state.per_client.items() if n and k.split("/", 1)[1] not in expected}
    state.m["per_client"] = dict(counts)
    return Check(
        "One upstream user per ClientId",
        set(counts) <= {1} and not strays and not resurrected,
        f"{counts.get(1, 0)}/{len(work.client_ids) - len(gone & set(work.client_ids))} ClientIds have exactly 1 "
        f"upstream user, {len(gone) - len(resurrected)}/{len(gone)} deleted ones have none"
        + "".join(f"; {n} have {k}" for k, n in sorted(counts.items()) if k != 1)
        + (f"; deleted but upstream: {resurrected[:5]}" if resurrected else "")
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
        f"{len(markers)} malformed messages (lifecycle ones too), {len(reached)} of them reached the upstream",
    )


def _anonymous_upstream(state: EndState, instance: str) -> set[str]:
    """DeviceTokens of the upstream users of an instance that carry no ClientId (made by bulks)."""
    instance_id = state.soak.instance_ids[instance]
    return {dt for dt, u in state.by_device.items() if u.get("InstanceId") == instance_id and not u.get("ClientId")}


def _bulk_state(state: EndState) -> dict[str, Any]:
    soak, options = state.soak, state.soak.options
    progress = bulk_progress(soak.stack, soak.dynamodb, soak.work.bulk_request_id)
    chunks = chunk_states(progress)
    quantity = {i: min(CREATE_MANY_CHUNK, options.bulk - i * CREATE_MANY_CHUNK) for i in range(len(chunks))}
    unknown = sorted(i for i, s in chunks.items() if s == "UNKNOWN")
    done = sorted(i for i, s in chunks.items() if s == "DONE")
    notes: dict[int, dict[str, Any]] = {}
    for i in chunks:
        with contextlib.suppress(ValueError, TypeError):
            notes[i] = json.loads(str((progress or {}).get(f"Adoption{i}")))
    return {
        "chunks": chunks,
        "unknown": unknown,
        "done_quantity": sum(quantity[i] for i in done),
        "stored_per_chunk": sum(int(progress.get(f"Stored{i}", 0)) for i in done) if progress else 0,
        "reported_users": sum(quantity[i] for i in unknown),
        "users": [u for u in state.users if u.get("BulkRequestId") == soak.work.bulk_request_id],
        "adoptions": notes,
    }


def _big_bulk_users(state: EndState) -> list[dict[str, Any]]:
    big = state.soak.phases.big_request_id
    return [u for u in state.users if big and u.get("BulkRequestId") == big]


def check_stored(state: EndState) -> Check:
    """DESIGN.md: no registration is lost (every one stored, or reported with a reason); a deleted one is erased."""
    work, options, users = state.soak.work, state.soak.options, state.users
    gone = work.gone
    expected = set(work.client_ids) - gone
    statuses = collections.Counter(str(u.get("Status")) for u in users)
    stored_clients = collections.Counter(str(u["ClientId"]) for u in users if u.get("ClientId"))
    missing = sorted(expected - set(stored_clients))
    doubled = sorted(cid for cid, n in stored_clients.items() if n > 1)
    extra = sorted(set(stored_clients) - expected)
    bulk = _bulk_state(state)
    bulk_users = bulk["users"]
    big_users = _big_bulk_users(state)
    big = state.soak.options.big_bulk if state.soak.phases.big_request_id else 0
    expected_users = len(expected) + options.bulk + big
    state.m.values |= {
        "stored": len(users),
        "expected_users": expected_users,
        "statuses": dict(statuses),
        "bulk_stored": len(bulk_users),
        "bulk_reported": bulk["reported_users"],
        "chunks": bulk["chunks"],
        "big_stored": len(big_users),
    }
    ok = (
        not missing
        and not doubled
        and not extra
        and len(users) == len(expected) + len(bulk_users) + len(big_users)
        and len(bulk_users) == bulk["stored_per_chunk"] == bulk["done_quantity"]
        and len(users) + bulk["reported_users"] == expected_users
    )
    detail = (
        f"{len(users)} stored of {expected_users} expected ({len(expected)} ClientIds not deleted + bulk "
        f"{options.bulk} + bulk without CreateMany {big}): {len(users) - len(bulk_users) - len(big_users)} by "
        f"ClientId, {len(bulk_users)} + {len(big_users)} bulk"
    )
    if bulk["unknown"]:
        detail += (
            f", {bulk['reported_users']} bulk users of {len(bulk['unknown'])} chunk(s) reported as bulk_incomplete"
        )
    detail += f"; {len(state.tombstones)} tombstones; status {_counter_text(statuses)}"
    detail += f"; MISSING {missing[:5]} ({len(missing)})" if missing else ""
    detail += f"; stored twice {doubled[:5]}" if doubled else ""
    detail += f"; not expected {extra[:5]}" if extra else ""
    return Check("Users stored vs expected", ok, detail)


def check_bulk(state: EndState) -> list[Check]:
    """The bulk request: no chunk called twice, never judged lost while in flight, each stored, adopted or reported
    (and then only when the upstream's listing is not exactly the chunk: never guessed)."""
    if not state.soak.options.bulk:
        return []
    phases = state.soak.phases
    bulk = _bulk_state(state)
    chunks, counters = bulk["chunks"], state.counters
    stored = {str(u["DeviceToken"]) for u in state.users}
    made = _anonymous_upstream(state, "default")
    orphans = sorted(made - stored)
    adopted = [u for u in bulk["users"] if u.get("AdoptedFrom")]
    # Users of an adopted chunk that its runner stored before it died: adoption counted them, and adopted the rest.
    adopted_chunks = {str(i) for i, n in bulk["adoptions"].items() if (n or {}).get("Outcome") == "adopted"}
    stored_before = [
        u
        for u in bulk["users"]
        if not u.get("AdoptedFrom") and str(u.get("BulkChunk") or "").rpartition("#")[2] in adopted_chunks
    ]
    unreported = [i for i in bulk["unknown"] if (bulk["adoptions"].get(i) or {}).get("Outcome") != "needs_operator"]
    guessed = [i for i in bulk["unknown"] if (bulk["adoptions"].get(i) or {}).get("Candidates") is None]
    twin_lost = [seen for seen in phases.twin_seen if seen.endswith(":UNKNOWN")]
    state.m["orphans"] = len(orphans)
    state.m["adopted"] = len(adopted)
    ok = (
        bool(chunks)
        and set(chunks.values()) <= {"DONE", "UNKNOWN"}
        and int(counters.get("create_many_calls", 0)) <= len(chunks)
        and not orphans
        and not unreported
        and not guessed
        and not twin_lost
    )
    adoption = "; ".join(
        f"chunk {i}: {n.get('Outcome')} ({n.get('Reason')})" for i, n in sorted(bulk["adoptions"].items())
    )
    return [
        Check(
            "Bulk request never doubled",
            ok,
            f"{len(chunks)} chunks: {_states_text(chunks)}; CreateMany calls that committed "
            f"{counters.get('create_many_calls')} (at most one per chunk); a second delivery while a chunk was in "
            f"flight saw {' '.join(phases.twin_seen) or 'nothing'}"
            + ("" if phases.twin_delivered else " (the second delivery did not happen)")
            + f"; upstream bulk users {len(made)}, stored {len(made & stored)} ({len(adopted)} adopted by the "
            f"reconcile function, {len(stored_before)} of their chunks stored before the kill), "
            f"made upstream but not stored {len(orphans)}"
            + (f"; adoption: {adoption}" if adoption else "")
            + (f"; UNKNOWN chunks not reported: {unreported}" if unreported else "")
            + (f"; a second delivery judged chunks in flight lost: {twin_lost}" if twin_lost else ""),
        )
    ]


#: About what one delivery of the queue function makes without CreateMany before its Timeout (issue 11: ~1,100 at
#: 50 ms a Create): a bigger bulk must continue in new messages.
ONE_DELIVERY_WITHOUT_CREATE_MANY: Final = 1100


def check_big_bulk(state: EndState) -> list[Check]:
    """Issue 11: a bulk above what one invocation makes without CreateMany finishes by continuations, each of its
    messages received once (no receive spent), every user made once and stored."""
    soak = state.soak
    phases = soak.phases
    if not soak.options.big_bulk or phases.big_request_id is None:
        return []
    progress = bulk_progress(soak.stack, soak.dynamodb, phases.big_request_id, instance=MOVE_TO)
    chunks = chunk_states(progress)
    users = _big_bulk_users(state)
    made = _anonymous_upstream(state, MOVE_TO)
    stored = {str(u["DeviceToken"]) for u in users}
    # Every message of the bulk after its first is a continuation (the queue function's BulkContinued; its log line
    # is at INFO, below the soak's LogLevel).
    continued = max(0, len(phases.big_receives) - 1)
    receives = collections.Counter(phases.big_receives.values())
    ok = (
        bool(chunks)
        and set(chunks.values()) == {"DONE"}
        and len(users) == len(stored) == soak.options.big_bulk
        and made == stored
        and (continued >= 1 or soak.options.big_bulk <= ONE_DELIVERY_WITHOUT_CREATE_MANY)
        # Every message seen was received once. A bulk that one delivery makes can be handled between two of the
        # driver's looks at the queue (none seen); a bigger one must have been seen continuing.
        and set(receives) <= {1}
        and (bool(receives) or soak.options.big_bulk <= ONE_DELIVERY_WITHOUT_CREATE_MANY)
    )
    return [
        Check(
            "Bulk without CreateMany continued",
            ok,
            f"Quantity {soak.options.big_bulk} on {MOVE_TO}: {len(chunks)} chunks "
            f"{_counter_text(collections.Counter(chunks.values()))}; "
            f"stored {len(users)}, made upstream {len(made)}, made but not stored {len(made - stored)}; "
            f"BulkContinued {continued}; {len(phases.big_receives)} messages, received "
            + ", ".join(f"{n}x: {c}" for n, c in sorted(receives.items())),
        )
    ]


def check_redrive(state: EndState) -> list[Check]:
    """Issue 11: an operator's redrive (telematics-reg dlq redrive) makes nothing twice and loses nothing."""
    phases = state.soak.phases
    if not state.soak.options.redrive:
        return []
    report = phases.redrive
    moved = report.get("moved")
    ok = bool(phases.redrive_at) and report.get("exit") == 0 and not report.get("failed")
    lifecycle = phases.lifecycle_redrives
    ok = ok and all(r.get("exit") == 0 and not r.get("failed") for r in lifecycle)
    lifecycle_text = (
        "; lifecycle changes dead-lettered unknown_user, redriven once their users registered: "
        + ", ".join(f"{r.get('moved')} at {r.get('at')} s (exit {r.get('exit')})" for r in lifecycle)
        if lifecycle
        else "; no lifecycle change needed a redrive"
    )
    return [
        Check(
            "Operator redrive",
            ok,
            (
                f"telematics-reg dlq redrive --queue registration {state.soak.at(phases.redrive_at)} s in: "
                f"exit {report.get('exit')}, moved {moved} of the {report.get('letters')} letters there; those it "
                "moved came back with their reasons, the bulk continued under its stamped RequestId (see the checks "
                "above)" + lifecycle_text
            )
            if phases.redrive_at
            else "never ran (the main bulk did not settle)",
        )
    ]


def check_dead_letters(state: EndState) -> list[Check]:
    """Each DLQ holds exactly the malformed messages, each with its reason (and bulk_incomplete for lost chunks)."""
    work = state.soak.work
    expected: dict[str, dict[str, str]] = {
        "RegistrationDeadLetterQueue": {},
        "SignupDeadLetterQueue": {},
        "LifecycleDeadLetterQueue": {},
    }
    queue_of = {
        "signup": "SignupDeadLetterQueue",
        "queue": "RegistrationDeadLetterQueue",
        "lifecycle": "LifecycleDeadLetterQueue",
    }
    for msg in work.malformed:
        expected[queue_of[msg.path]][str(msg.marker)] = str(msg.reason)
    checks = []
    state.m["dlq"] = {}
    for logical_id in SOAK_DEAD_LETTER_QUEUES:
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
    # A bulk user made without tokens (CreateAccessToken false, or a Create repeated after a cut-off: "exists") is
    # TOKENLESS until first needed; an adopted one logs in when due, so it must be ACTIVE by now.
    tokenless = [
        u for u in users if u.get("Status") == "TOKENLESS" and u.get("BulkRequestId") and not u.get("AdoptedFrom")
    ]
    others = [u for u in users if u.get("Status") not in ("ACTIVE", "NEEDS_RELOGIN") and u not in tokenless]
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
    detail += f"; {len(tokenless)} bulk users TOKENLESS (made without tokens)" if tokenless else ""
    detail += (
        f"; left PENDING/TOKENLESS/other: {_counter_text(collections.Counter(str(u.get('Status')) for u in others))}"
        if others
        else ""
    )
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


#: Attributes that hold a user's tokens or profile: none may remain on a deleted user's item.
PERSONAL: Final = frozenset(
    {
        "AccessToken",
        "RefreshToken",
        "FirstName",
        "LastName",
        "Nickname",
        "Email",
        "Phone",
        "Birthday",
        "Address",
        "City",
        "Country",
        "Profile",
    }
)


def check_lifecycle(state: EndState) -> list[Check]:
    """Issue 14 under the same faults, kill and skew: deletions final and complete, changes in order, the upstream
    as the last change left it, one admin Login."""
    soak = state.soak
    lifecycle = soak.work.lifecycle
    if not lifecycle.client_ids:
        return []
    by_client = items_by_client([*state.users, *state.tombstones])
    tombstoned = {cid for cid in soak.work.gone if by_client.get(cid)}
    # Deleted: only tombstones left, no token or profile field, and no dead letter naming them.
    left = sorted(
        cid
        for cid in soak.work.gone
        if any(i.get("Status") != "DELETED" or PERSONAL & set(i) for i in by_client.get(cid, []))
    )
    in_letters = sorted(
        cid
        for cid in soak.work.gone
        for letters in state.letters.values()
        for letter in letters
        if cid in letter["Body"]
    )
    ids = soak.instance_ids
    resurrected = sorted(
        cid
        for cid in soak.work.gone
        if any(int(state.per_client.get(f"{instance_id}/{cid}", 0)) for instance_id in ids.values())
        or any(str(i.get("DeviceToken")) in state.by_device for i in by_client.get(cid, []))
    )
    # Upstream as the last change left it (stale changes never applied over a newer one).
    stale_applied: list[str] = []
    differ: list[str] = []
    for cid in sorted(lifecycle.client_ids - soak.work.gone):
        live = [i for i in by_client.get(cid, []) if i.get("Status") != "DELETED"]
        upstream = state.by_device.get(str(live[0]["DeviceToken"])) if len(live) == 1 else None
        if upstream is None:
            differ.append(f"{cid} (not upstream, or stored {len(live)} times)")
            continue
        profile, flags = upstream.get("Profile") or {}, upstream.get("UserFields") or {}
        if "Stale" in (profile.get("FirstName"), profile.get("City")) or profile.get("FirstName") == "AfterDeletion":
            stale_applied.append(cid)
        wanted: dict[str, Any] = {}
        if cid in lifecycle.updated:
            update = lifecycle.updated[cid].body
            wanted |= {k: update[k] for k in ("FirstName", "City")}
            # Flag names compared without case: the management API writes EnableRealTimeLocation, Create (and the
            # emulator's store) EnableRealtimeLocation.
            wanted |= {f"UserFields.{k.lower()}": v for k, v in (update.get("UserFields") or {}).items()}
        if cid in lifecycle.reactivated:
            wanted["Status"] = "Active"
        if cid in lifecycle.moved:
            wanted["InstanceId"] = ids[MOVE_TO]
            wanted["Stored Instance"] = MOVE_TO
        seen = {
            **{k: profile.get(k) for k in ("FirstName", "City")},
            **{f"UserFields.{k.lower()}": v for k, v in flags.items()},
            "Status": upstream.get("Status"),
            "InstanceId": upstream.get("InstanceId"),
            "Stored Instance": live[0].get("Instance"),
        }
        wrong = {k: f"{seen.get(k)!r} not {v!r}" for k, v in wanted.items() if seen.get(k) != v}
        if wrong:
            differ.append(f"{cid} {wrong}")
    admin_logins = int(state.counters.get("admin_logins", 0))
    deleted_events = soak.outcomes.kinds.get("TelematicsUserDeleted", 0)
    repeated = soak.outcomes.kinds.get("TelematicsUserDeleted (duplicate)", 0)
    unannounced = sorted(soak.work.gone - soak.outcomes.deleted)
    counts = (
        f"{len(lifecycle.updated)} updated ({len(lifecycle.stale)} then sent a stale update), "
        f"{len(lifecycle.deleted)} deleted (each then sent a redelivered registration and a late update, both older), "
        f"{len(lifecycle.racing)} deleted racing its registration, {len(lifecycle.moved)} moved to {MOVE_TO}, "
        f"{len(lifecycle.reactivated)} deactivated then reactivated"
    )
    state.m["lifecycle"] = counts
    return [
        Check(
            "Deleted users: nothing left",
            not left and not in_letters and tombstoned == soak.work.gone and not unannounced,
            f"{len(soak.work.gone)} deleted, {len(tombstoned)} tombstones; with a token or profile left: {len(left)}"
            f"{' ' + str(left[:5]) if left else ''}; named in a dead letter: {len(in_letters)}; "
            f"TelematicsUserDeleted {deleted_events} (+ {repeated} repeated by a redelivered deletion); "
            f"deleted users never announced: {len(unannounced)}" + (f" {unannounced[:5]}" if unannounced else ""),
        ),
        Check(
            "Deleted users: none resurrected upstream",
            not resurrected,
            f"{len(resurrected)} of {len(soak.work.gone)} deleted users exist upstream again"
            + (f": {resurrected[:5]}" if resurrected else "")
            + f"; registrations dropped as older than a deletion: "
            f"{sum(1 for r in soak.outcomes.failed_message_ids.values() if r == 'user_deleted')}",
        ),
        Check(
            "Stale changes applied",
            not stale_applied,
            f"{len(stale_applied)} users show a change older than one applied ({len(lifecycle.stale)} stale updates "
            f"sent, {len(lifecycle.deleted)} updates older than their deletion)",
        ),
        Check(
            "Upstream profile and flags = last change",
            not differ,
            f"{len(differ)} of {len(lifecycle.client_ids - soak.work.gone)} changed users differ from the last change "
            f"sent{': ' + '; '.join(differ[:5]) if differ else ''} ({counts})",
        ),
        check_admin_logins(state, admin_logins),
    ]


def admin_session_lines(soak: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The service's "admin Login" and "admin answer lost" log lines, across every runner (the killed one too)."""
    logins: list[dict[str, Any]] = []
    lost: list[dict[str, Any]] = []
    for runner in soak.every_runner:
        if not runner.log_file.exists():
            continue
        with runner.log_file.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if '"admin ' not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("message") == "admin Login":
                    logins.append(record)
                elif record.get("message") == "admin answer lost":
                    lost.append(record)
    return logins, lost


def check_admin_logins(state: EndState, admin_logins: int) -> Check:
    """Issue 14: one admin session for the fleet: one Login, plus exactly one per admin answer that was lost.

    A lost Refresh or Login answer leaves no usable token (the refresh token may be spent), so a Login is the only
    recovery; anything beyond that, or an admin refresh token the emulator saw twice, is a defect.
    """
    logins, lost = admin_session_lines(state.soak)
    faults = state.counters.get("faults_by_call") or {}
    dropped = sum(int((faults.get(c) or {}).get("drop_after_commit", 0)) for c in ("admin_refresh", "admin_login"))
    rejected = int(state.counters.get("admin_rejected_refresh_tokens", 0))
    causes = collections.Counter(str(r.get("cause")) for r in logins)
    granted_lines = sum(1 for r in logins if r.get("outcome") in ("ok", "answer_lost"))
    fresh = sum(1 for r in logins if r.get("cause") == "no_session" and r.get("outcome") == "ok")
    problems = []
    if not 1 <= admin_logins <= 1 + len(lost):
        problems.append(f"{admin_logins} Logins for {len(lost)} lost answers")
    if dropped > len(lost):
        problems.append(f"{dropped} dropped by the emulator but {len(lost)} seen as lost")
    if rejected:
        problems.append(f"{rejected} admin refresh tokens presented twice")
    if causes.get("refresh_token_rejected"):
        problems.append(f"{causes['refresh_token_rejected']} Logins after a rejected refresh token")
    if fresh > 1:
        problems.append(f"{fresh} Logins without a session")
    if granted_lines != admin_logins:
        problems.append(f"{granted_lines} Logins logged, {admin_logins} granted upstream")
    state.m["admin_logins"] = f"{admin_logins} ({len(lost)} lost admin answers)"
    return Check(
        "Admin Logins",
        not problems,
        f"{admin_logins} admin Login(s) = 1 + {len(lost)} lost admin answer(s) at most ({dropped} dropped by the "
        f"emulator, {len(lost) - dropped} timed out or cut off); causes {dict(causes) or 'none'}; admin refresh "
        f"tokens rejected {rejected} (lifecycle and reconcile functions, {len(state.soak.every_runner)} runners, one "
        f"killed: one fleet session stored in the table)" + (f"; NOT OK: {'; '.join(problems)}" if problems else ""),
    )


def check_secrets(state: EndState) -> Check:
    """DESIGN.md: tokens are never logged or put in events (nor in dead letters)."""
    soak = state.soak
    leaks = list(soak.outcomes.secrets)
    for runner in soak.every_runner:
        if runner.log_file.exists():
            with runner.log_file.open(encoding="utf-8", errors="replace") as handle:
                for number, line in enumerate(handle, 1):
                    leaks += secrets_in(line, f"{runner.log_file.name}:{number}")
    for logical_id in SOAK_DEAD_LETTER_QUEUES:
        for letter in state.letters[logical_id]:
            leaks += secrets_in(json.dumps(letter.get("MessageAttributes", {})) + letter["Body"], logical_id)
    size = sum(r.log_file.stat().st_size for r in soak.every_runner if r.log_file.exists()) // 1024
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
    # The runner whose clock runs ahead polls the same queues with the same mappings: two local "fleets" at once,
    # each bounded as Lambda bounds one (on AWS the mappings' MaximumConcurrency is one bound for the fleet).
    fleets = 2 if state.soak.skewed is not None else 1
    bound = fleets * (queue * per_call + signup + refresh * per_call)
    peak = int(state.counters.get("in_flight_peak", 0))
    state.m.values |= {"in_flight_peak": peak, "in_flight_bound": bound}
    return Check(
        "Upstream concurrency bounded",
        0 < peak <= bound,
        f"peak {peak} calls in flight at the emulator (bound {bound}: {fleets} runner(s) x (queue {queue} x "
        f"{per_call} + signup {signup} + refresh {refresh} x {per_call})); faults served "
        f"{state.counters.get('faults_served')}",
    )


def check_completeness(state: EndState) -> Check:
    """Not an invariant: that the run did what it claims (else its other checks prove less than they say)."""
    soak, options, kill, m = state.soak, state.soak.options, state.kill, state.m
    # Adopted users were stored TOKENLESS long after the rest and log in when found: not held to the cycles.
    cycled = [u for u in state.active if not u.get("AdoptedFrom")]
    versions = sorted(int(u.get("Version", 0)) for u in cycled)
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
    laggards = [str(u["DeviceToken"]) for u in cycled if int(u.get("Version", 0)) < 1 + options.cycles]
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
    phases = soak.phases
    if options.kill and options.bulk:
        parts.append((phases.twin_delivered, "the bulk's message delivered twice while a chunk was in flight"))
    if options.slow_seconds:
        parts.append((phases.slow_ended > 0, "the slow-upstream phase ran"))
    if options.clock_offset:
        parts.append((soak.skewed is not None, "a runner with its clock ahead ran"))
    if options.redrive:
        parts.append((phases.redrive_at > 0, "an operator redrove the registration DLQ"))
    missing = [what for ok, what in parts if not ok]
    return Check(
        "The soak did what it claims",
        not missing and not soak.problems,
        f"Version min {m['versions'][0]} · median {m['versions'][1]:g} · max {m['versions'][2]} "
        f"({state.counters.get('refreshes')} refreshes, {state.counters.get('logins')} logins); sweeps "
        f"{dict(sweep_counts)}, {overlaps} overlapping pairs; kill: {len(kill.pending_claims)} claims, "
        f"{len(kill.leases)} leases, bulk {_states_text(kill.bulk_chunks)}, {in_flight} messages in flight; "
        + (f"clock ahead {options.clock_offset:g} s in runner 0; " if soak.skewed is not None else "")
        + (
            f"slow upstream {phases.slow_ended - phases.slow_started:.0f} s from {soak.at(phases.slow_started)} s; "
            if phases.slow_ended
            else ""
        )
        + (f"redrive at {soak.at(phases.redrive_at)} s" if phases.redrive_at else "")
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
        "runner_stats": _runner_totals(soak.every_runner),
        "slow_faults": soak.phases.slow_faults,
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
                    for runner in soak.every_runner
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
            f"{m['stored']:,} / {m['expected_users']:,} (bulk: {m['bulk_stored']} stored ({m.get_or('adopted', 0)} "
            f"adopted), {m['bulk_reported']} reported as bulk_incomplete; chunks {_states_text(m['chunks'])}; bulk "
            f"without CreateMany: {m['big_stored']} stored)",
        ),
        ("lifecycle changes", str(m.values.get("lifecycle", "none"))),
        ("admin Logins", str(m.values.get("admin_logins", "n/a"))),
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
        f"malformed, bulk Quantity {options.bulk} (no RequestId; its message delivered twice while a chunk was in "
        f"flight); lifecycle events mixed in ({options.update_rate:.0%} of users updated, each then sent a stale "
        f"update, {options.delete_rate:.0%} deleted, {options.move_rate:.0%} moved, {options.deactivate_rate:.0%} "
        f"deactivated then reactivated, one deletion racing its registration, bad lifecycle input); fed at "
        f"{m['feed_rate']:.1f} messages/s. Faults `{json.dumps(options.faults)}` on every upstream call. "
        + (
            f"After the kill, CreateMany switched off and a bulk of {options.big_bulk} sent to {MOVE_TO}. "
            if options.big_bulk
            else ""
        )
        + (
            f"A second runner with its clock {options.clock_offset:g} s ahead from the kill on (skew allowed "
            f"{clock_skew_allowed(options.claim_seconds, options.lease_seconds):g} s). "
            if options.clock_offset
            else ""
        )
        + (
            f"After the feed, {options.slow_seconds:g} s of slow upstream on refresh and Login "
            f"`{json.dumps(m['slow_faults'])}`. "
            if options.slow_seconds
            else ""
        )
        + (
            "Once the bulk's lost chunk was judged by the reconcile function, an operator ran "
            "`telematics-reg dlq redrive --queue registration`. "
            if options.redrive
            else ""
        )
        + f"Tokens live {options.token_lifetime} s and are refreshed "
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
            "2 s of clock skew allowed)"
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
        # Two instances: users move to the second, and the big bulk is made there.
        instances = {
            alias: {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())} for alias in ("default", MOVE_TO)
        }
        with running_emulator(
            instances=instances,
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
                admin_credentials=emulator.admin_account,
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
            for runner in soak.every_runner:
                if runner.process.poll() is None:
                    runner.process.kill()
        moto.stop()


if __name__ == "__main__":
    sys.exit(main())
