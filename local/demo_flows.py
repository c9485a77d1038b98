"""The lifecycle and reconciliation parts of ``make run`` (:mod:`local.demo`): what they send, when, and their checks.

* **Lifecycle** (flow 5): users registered for it are updated, re-flagged, deactivated then reactivated, moved to
  another instance and deleted; one deletion races its own registration; after another, a stale update and the
  registration's redelivery arrive; bad changes are sent too. The checks read the emulator (the user as the
  upstream holds it) and the table.
* **Reconciliation** (flow 6): one bulk's CreateMany answer is dropped on purpose (the emulator's scripted fault
  ``drop_after_commit``), so its chunk is lost and the reconcile function adopts its users; and one drift of each
  class is made behind the service's back (through the upstream's own API, as the vendor's console would), then
  ``telematics-reg reconcile`` runs the drift audit and its report is checked.

Adoption waits a claim plus the clock skew after the lost call, and a drift audit judges only users older than
that: :func:`shorten_timing` shortens ``CLAIM_SECONDS``, the functions' ``Timeout`` (``FUNCTION_TIMEOUT_SECONDS``)
and ``CLOCK_SKEW_SECONDS`` together, keeping the relations the settings check (a claim outlives the function
holding it plus the skew), so the demo need not wait minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from uuid import UUID

import requests
from boto3.dynamodb.types import TypeDeserializer

from local.runner import REPO_ROOT, LocalService
from local.send import client, publish_signups, send_messages
from local.stack import LocalStack
from telematics_reg.budget import DynamoLoginBudget
from telematics_reg.lifecycle.admin import DynamoAdminSessionStore, FleetAdminSession, SecretsManagerAdminCredentials
from telematics_reg.management_models import UserUpdate, UserUpdateFields
from telematics_reg.models import InstanceCredentials
from telematics_reg.reconcile.records import DynamoReconcileRecords
from telematics_reg.store import ChunkState, DynamoTokenStore
from telematics_reg.upstream import UserServiceClient

#: The demo's timing, shorter than production's so that adoption and the audit fit in a run (see the module doc).
#: The settings refuse any combination where a claim could lapse while its holder still acts.
DEMO_FUNCTION_TIMEOUT: Final = 45
DEMO_TIMING: Final = {
    "CLAIM_SECONDS": "50",  # >= FUNCTION_TIMEOUT_SECONDS + CLOCK_SKEW_SECONDS
    "CLOCK_SKEW_SECONDS": "2",
    "FUNCTION_TIMEOUT_SECONDS": str(DEMO_FUNCTION_TIMEOUT),
    # The emulator runs on this machine's clock: a small margin for the upstream's clock is enough.
    "RECONCILE_WINDOW_MARGIN_SECONDS": "5",
}
#: The second instance of the emulator (moves go there).
OTHER_ALIAS: Final = "fleet-eu"
#: Users of the bulk whose CreateMany answer is dropped, then adopted.
LOST_BULK: Final = 5
DRIFT_CLASSES: Final = ("gone", "deactivated", "reflagged", "moved", "unstored")


def timing_line() -> str:
    """What the demo shortens, said in its output."""
    return (
        f"demo timing (shortened from production's so adoption and the audit fit in a run): every function's Timeout "
        f"and FUNCTION_TIMEOUT_SECONDS {DEMO_FUNCTION_TIMEOUT} s, CLAIM_SECONDS {DEMO_TIMING['CLAIM_SECONDS']}, "
        f"CLOCK_SKEW_SECONDS {DEMO_TIMING['CLOCK_SKEW_SECONDS']}, RECONCILE_WINDOW_MARGIN_SECONDS "
        f"{DEMO_TIMING['RECONCILE_WINDOW_MARGIN_SECONDS']} (production: 60-300 / 120 / 10 / 60)"
    )


def shorten_timing(stack: LocalStack) -> None:
    """Give every function the demo's Timeout and timing settings (before the stack is saved and run)."""
    for spec in stack.functions.values():
        spec.timeout = min(spec.timeout, DEMO_FUNCTION_TIMEOUT)
        spec.environment.update(DEMO_TIMING)
        spec.environment["FUNCTION_TIMEOUT_SECONDS"] = str(spec.timeout)


def iso_ms(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _put(stack: LocalStack, events: Any, detail_type: str, details: list[dict[str, Any]]) -> None:
    entries = [
        {
            "EventBusName": stack.parameters["SignupEventBusName"],
            "Source": stack.parameters["SignupEventSource"],
            "DetailType": detail_type,
            "Detail": json.dumps(detail),
        }
        for detail in details
    ]
    response = events.put_events(Entries=entries)
    if response.get("FailedEntryCount"):
        raise RuntimeError(f"PutEvents refused {detail_type}: {response}")


def _items(stack: LocalStack, dynamodb: Any, client_id: str) -> list[dict[str, Any]]:
    """Every item of a ClientId, in any instance (consistent reads; tokens are never printed)."""
    deserializer = TypeDeserializer()
    found: list[dict[str, Any]] = []
    table = stack.outputs["TokensTableName"]
    for alias in ("default", OTHER_ALIAS):
        keys = dynamodb.query(
            TableName=table,
            IndexName="ByClient",
            KeyConditionExpression="ClientKey = :k",
            ExpressionAttributeValues={":k": {"S": f"{alias}#{client_id}"}},
        )["Items"]
        for key in keys:
            item = dynamodb.get_item(TableName=table, Key={"pk": key["pk"]}, ConsistentRead=True).get("Item")
            if item:
                found.append({k: deserializer.deserialize(v) for k, v in item.items()})
    return found


@dataclass
class FlowCheck:
    name: str
    ok: bool
    detail: str


@dataclass
class Flows:
    """The lifecycle and reconciliation scenario of one run (driven by :meth:`step` from the demo's loop)."""

    run: str
    state_path: Path
    phase: str = "registering"
    notes: list[str] = field(default_factory=list)
    signed_up_at: float = 0.0
    changed_at: float = 0.0
    stale_sent_at: float = 0.0
    subjects_ready_at: float = 0.0
    tokens: dict[str, str] = field(default_factory=dict)
    reference_audit: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None
    audit_error: str = ""
    gone_version_after_audit: int | None = None
    reactivated_at: float = 0.0
    unstored_token: str = ""
    signups: dict[str, dict[str, Any]] = field(default_factory=dict)

    # ------------------------------------------------------------------ who is who
    def cid(self, role: str) -> str:
        return f"{role}-{self.run}"

    @property
    def lost_request(self) -> str:
        return f"demo-{self.run}-lost"

    @property
    def lifecycle_roles(self) -> tuple[str, ...]:
        return ("life-upd", "life-flags", "life-deact", "life-move", "life-del")

    @property
    def drift_roles(self) -> tuple[str, ...]:
        return tuple(f"drift-{name}" for name in DRIFT_CLASSES)

    @property
    def client_ids(self) -> list[str]:
        """The ClientIds registered for the flows (each must end as one stored user)."""
        return [self.cid(role) for role in (*self.lifecycle_roles, *self.drift_roles)]

    @property
    def bad_changes(self) -> list[tuple[str, dict[str, Any], str]]:
        """(detail-type or ``queue``, body, reason it must be dead-lettered with)."""
        marker = self.cid("life-bad")
        return [
            ("UserUpdated", {"ClientId": marker, "Gender": "Robot"}, "invalid_fields"),
            ("UserMoved", {"ClientId": marker, "ToInstance": "nowhere"}, "unknown_instance"),
            ("UserDeactivated", {"FirstName": "no ClientId"}, "invalid_fields"),
            ("queue", {"Action": "Explode", "ClientId": marker}, "unknown_action"),
        ]

    # ------------------------------------------------------------------ phase 0: at feed time
    def feed_lost_bulk(self, service: LocalService, say: Any) -> None:
        """A bulk whose CreateMany answer the emulator drops after committing (its users exist, unknown to us)."""
        service.emulator.set_faults(script=[{"call": "create_many", "fault": "drop_after_commit"}])
        send_messages(service.stack, [{"Quantity": LOST_BULK, "RequestId": self.lost_request}])
        deadline = time.monotonic() + 30
        while service.emulator.faults().get("script") and time.monotonic() < deadline:
            time.sleep(0.3)
        say(f"sent a bulk of {LOST_BULK} ({self.lost_request!r}) whose CreateMany answer the emulator drops")

    def feed(self, service: LocalService, say: Any) -> None:
        stack = service.stack
        events, sqs = client(stack, "events"), client(stack, "sqs")
        self.signed_up_at = time.time()
        for role in (*self.lifecycle_roles, *self.drift_roles):
            self.signups[role] = {
                "ClientId": self.cid(role),
                "FirstName": "Flow",
                "LastName": role,
                "City": "Oslo",
                "UserFields": {"EnableTracking": True, "EnableLogging": False},
                "OccurredAt": iso_ms(self.signed_up_at),
            }
        publish_signups(stack, list(self.signups.values()), events=events)
        race = self.cid("life-race")
        _put(stack, events, "UserSignedUp", [{"ClientId": race, "OccurredAt": iso_ms(self.signed_up_at)}])
        _put(stack, events, "UserDeleted", [{"ClientId": race, "OccurredAt": iso_ms(self.signed_up_at + 0.001)}])
        for kind, body, _ in self.bad_changes:
            if kind == "queue":
                sqs.send_message(QueueUrl=stack.outputs["LifecycleQueueUrl"], MessageBody=json.dumps(body))
            else:
                _put(stack, events, kind, [body])
        say(
            f"published {len(self.signups)} signups for the lifecycle and drift scenarios, a deletion racing its own "
            f"registration, and {len(self.bad_changes)} bad lifecycle changes"
        )

    # ------------------------------------------------------------------ the loop
    def step(self, service: LocalService, say: Any) -> None:
        """Advance the scenario as far as the service's state allows (called every second by the demo)."""
        stack, dynamodb = service.stack, client(service.stack, "dynamodb")
        if self.phase == "registering":
            users = {role: _items(stack, dynamodb, self.cid(role)) for role in self.signups}
            if not all(items and items[0].get("Status") == "ACTIVE" for items in users.values()):
                return
            self.tokens = {role: str(items[0]["DeviceToken"]) for role, items in users.items()}
            self.subjects_ready_at = time.time()
            self._send_changes(stack)
            say("sent the lifecycle changes (updates, a flag change, deactivate + reactivate, a move, a deletion)")
            self.phase = "changing"
        elif self.phase == "changing":
            if not self._changes_applied(service, dynamodb):
                return
            # After the deletion: a stale update (occurred before it) and the registration delivered again.
            stack_events = client(stack, "events")
            _put(
                stack,
                stack_events,
                "UserUpdated",
                [{"ClientId": self.cid("life-del"), "City": "Stale", "OccurredAt": iso_ms(self.changed_at - 1)}],
            )
            publish_signups(stack, [self.signups["life-del"]], events=stack_events)
            self.stale_sent_at = time.time()
            say("after the deletion: sent a stale update and the deleted user's registration again")
            # The reference audit records each user's flags, so that a later change of flags made behind the
            # service's back is drift (a change the lifecycle applies updates that reference: not drift).
            self.reference_audit = self._audit(say, "reference")
            self._drift(service, include_gone=False)
            say(
                "made drift upstream behind the service's back: deactivated, re-flagged, moved, a second user with "
                "one of our ClientIds"
            )
            self.phase = "waiting_adoption"
        elif self.phase == "waiting_adoption":
            claim = int(DEMO_TIMING["CLAIM_SECONDS"]) + int(DEMO_TIMING["CLOCK_SKEW_SECONDS"])
            # The audit judges gone only users created a claim, the skew and the margin before it starts (whole
            # seconds): counted from when the subjects were seen stored (at or after their CreatedAt), not from when
            # their signups were sent, which a loaded machine may store seconds later.
            old_enough = (
                time.time()
                > max(self.signed_up_at, self.subjects_ready_at)
                + claim
                + int(DEMO_TIMING["RECONCILE_WINDOW_MARGIN_SECONDS"])
                + 2
            )
            if not (
                self._chunk_state(stack, dynamodb) == ChunkState.DONE
                and old_enough
                and time.time() > self.stale_sent_at + 4
            ):
                return
            self._drift(service, include_gone=True)
            self.audit = self._audit(say, "drift")
            # A refresh may hold the gone user's lease when the audit judges it (its token due): the same audit
            # waits for the lease to end and marks it then, so one audit settles it.
            gone = _items(stack, dynamodb, self.cid("drift-gone"))
            self.gone_version_after_audit = int(gone[0].get("Version", 0)) if gone else None
            self.phase = "done"

    @property
    def done(self) -> bool:
        return self.phase == "done"

    # ------------------------------------------------------------------ actions
    def _send_changes(self, stack: LocalStack) -> None:
        events = client(stack, "events")
        now = time.time()
        self.changed_at = now
        _put(
            stack,
            events,
            "UserUpdated",
            [
                {
                    "ClientId": self.cid("life-upd"),
                    "City": "Reykjavik",
                    "LastName": "Updated",
                    "OccurredAt": iso_ms(now),
                },
                {
                    "ClientId": self.cid("life-flags"),
                    "UserFields": {"EnableTracking": False},
                    "OccurredAt": iso_ms(now),
                },
            ],
        )
        _put(stack, events, "UserDeactivated", [{"ClientId": self.cid("life-deact"), "OccurredAt": iso_ms(now)}])
        _put(
            stack,
            events,
            "UserMoved",
            [{"ClientId": self.cid("life-move"), "ToInstance": OTHER_ALIAS, "OccurredAt": iso_ms(now)}],
        )
        _put(stack, events, "UserDeleted", [{"ClientId": self.cid("life-del"), "OccurredAt": iso_ms(now)}])

    def _changes_applied(self, service: LocalService, dynamodb: Any) -> bool:
        stack = service.stack
        deact = _items(stack, dynamodb, self.cid("life-deact"))
        if not self.reactivated_at:
            # Sent once the deactivation is applied: sent together, the two may arrive in either order, and a
            # deactivation arriving after the reactivation is (rightly) dropped as stale.
            if not (deact and deact[0].get("Deactivated")):
                return False
            self.reactivated_at = max(time.time(), self.changed_at + 0.001)
            _put(
                stack,
                client(stack, "events"),
                "UserReactivated",
                [{"ClientId": self.cid("life-deact"), "OccurredAt": iso_ms(self.reactivated_at)}],
            )
        reactivated = int(self.reactivated_at * 1000)  # OccurredAt is truncated to the millisecond
        upd = _items(stack, dynamodb, self.cid("life-upd"))
        flags = _items(stack, dynamodb, self.cid("life-flags"))
        move = _items(stack, dynamodb, self.cid("life-move"))
        deleted = _items(stack, dynamodb, self.cid("life-del"))
        return (
            bool(upd)
            and int(upd[0].get("LastChangeAt", 0)) > 0
            and bool(flags)
            and int(flags[0].get("LastChangeAt", 0)) > 0
            and bool(deact)
            and int(deact[0].get("LastChangeAt", 0)) >= reactivated
            and bool(move)
            and move[0].get("Instance") == OTHER_ALIAS
            and bool(deleted)
            and all(i.get("Status") == "DELETED" for i in deleted)
        )

    def _admin(self, service: LocalService) -> tuple[UserServiceClient, FleetAdminSession]:
        """The upstream's API with the company's admin account, through the fleet's stored session (no Login of
        its own while a live session is stored; a Login, if needed, within the fleet's budget)."""
        stack = service.stack
        dynamodb = client(stack, "dynamodb")
        table = stack.outputs["TokensTableName"]
        upstream = UserServiceClient(
            service.emulator.url,
            max_attempts=3,
            login_budget=DynamoLoginBudget(dynamodb, table_name=table, per_minute=3, clock_skew_seconds=2),
        )
        admin_secret = next(
            f.environment["ADMIN_CREDENTIALS_SECRET_ARN"]
            for f in stack.functions.values()
            if f.environment.get("ADMIN_CREDENTIALS_SECRET_ARN")
        )
        session = FleetAdminSession(
            upstream=upstream,
            store=DynamoAdminSessionStore(DynamoTokenStore(dynamodb, table_name=table)),
            credentials=SecretsManagerAdminCredentials(admin_secret, client=client(stack, "secretsmanager")),
        )
        return upstream, session

    def _drift(self, service: LocalService, *, include_gone: bool) -> None:
        upstream, session = self._admin(service)

        def token(role: str) -> UUID:
            return UUID(self.tokens[role])

        if include_gone:
            # Deleted last, just before the audit: until the audit marks it GONE the service still refreshes it.
            session.call(lambda jwt: upstream.delete_user(jwt, token("drift-gone")))
            return
        session.call(
            lambda jwt: upstream.update_user(
                jwt, token("drift-deactivated"), UserUpdate.model_validate({"Status": "Deactivated"})
            )
        )
        session.call(
            lambda jwt: upstream.update_user(
                jwt, token("drift-reflagged"), UserUpdate(user_fields=UserUpdateFields(enable_logging=True))
            )
        )
        other = service.emulator
        to = InstanceCredentials.model_validate(
            {"InstanceId": other.instance_id(OTHER_ALIAS), "InstanceKey": other.instance_key(OTHER_ALIAS)}
        )
        session.call(lambda jwt: upstream.change_instance(jwt, token("drift-moved"), to))
        # A user created upstream by someone else, carrying one of our ClientIds (we store that ClientId already).
        made = requests.post(
            f"{service.emulator.url}/v1/Registration/Create",
            headers={**service.emulator.headers("default"), "Content-Type": "application/json"},
            json={"FirstName": "Console", "UserFields": {"ClientId": self.cid("drift-unstored")}},
            timeout=10,
        )
        made.raise_for_status()
        self.unstored_token = str(made.json()["Result"]["DeviceToken"])

    def _audit(self, say: Any, what: str) -> dict[str, Any] | None:
        """``telematics-reg reconcile --json`` against the running stack; retried while a scheduled wake-up holds
        the audit's lease."""
        command = [sys.executable, "-m", "telematics_cli", "--local-stack", str(self.state_path), "reconcile", "--json"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "layers" / "telematics"), str(REPO_ROOT)])}
        for _ in range(5):
            done = subprocess.run(
                command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
            )
            if done.returncode in (0, 1) and done.stdout.strip().startswith("{"):
                report: dict[str, Any] = json.loads(done.stdout)
                say(f"telematics-reg reconcile ({what} audit): {report.get('Counts')}")
                return report
            self.audit_error = (done.stderr or done.stdout).strip()[-300:]
            time.sleep(2)
        say(f"telematics-reg reconcile ({what} audit) did not run: {self.audit_error}")
        return None

    @staticmethod
    def _records(stack: LocalStack, dynamodb: Any) -> DynamoReconcileRecords:
        return DynamoReconcileRecords(DynamoTokenStore(dynamodb, table_name=stack.outputs["TokensTableName"]))

    def _chunk_state(self, stack: LocalStack, dynamodb: Any) -> ChunkState | None:
        progress = self._records(stack, dynamodb).get_bulk("default", self.lost_request)
        return progress.chunks.get(0) if progress is not None else None

    # ------------------------------------------------------------------ checks
    def checks(  # noqa: PLR0915 - one block per promise, read top to bottom
        self, service: LocalService, events: list[tuple[str, dict[str, Any]]], options_margin: int
    ) -> list[FlowCheck]:
        """The scenario's promises, read from the emulator, the table and the outcome events."""
        stack, dynamodb = service.stack, client(service.stack, "dynamodb")
        emulator = service.emulator
        found: list[FlowCheck] = []

        def kinds_for(client_id: str) -> list[str]:
            return [kind for kind, detail in events if detail.get("ClientId") == client_id]

        def reasons_for(client_id: str, kind: str) -> list[str]:
            return [str(d.get("Reason")) for k, d in events if k == kind and d.get("ClientId") == client_id]

        upd = emulator.user(self.tokens.get("life-upd", "")) if self.tokens else None
        flags = emulator.user(self.tokens.get("life-flags", "")) if self.tokens else None
        profile = (upd or {}).get("Profile", {})
        tracking = (flags or {}).get("UserFields", {}).get("EnableTracking")
        found.append(
            FlowCheck(
                "Lifecycle: update, flags",
                profile.get("City") == "Reykjavik" and profile.get("LastName") == "Updated" and tracking is False,
                f"upstream City {profile.get('City')!r}, LastName {profile.get('LastName')!r} (sent Reykjavik, "
                f"Updated); EnableTracking {tracking} (sent false)",
            )
        )

        deact_items = _items(stack, dynamodb, self.cid("life-deact"))
        deact_up = emulator.user(self.tokens.get("life-deact", "")) if self.tokens else None
        seen = kinds_for(self.cid("life-deact"))
        ok = (
            deact_up is not None
            and deact_up.get("Status") == "Active"
            and len(deact_items) == 1
            and not deact_items[0].get("Deactivated")
            and "TelematicsUserDeactivated" in seen
            and "TelematicsUserReactivated" in seen
        )
        found.append(
            FlowCheck(
                "Lifecycle: deactivate, reactivate",
                ok,
                f"upstream Status {(deact_up or {}).get('Status')}, stored Deactivated "
                f"{bool(deact_items and deact_items[0].get('Deactivated'))}; announced "
                f"{', '.join(k for k in seen if 'activated' in k) or 'nothing'}",
            )
        )

        move_items = _items(stack, dynamodb, self.cid("life-move"))
        move_up = emulator.user(self.tokens.get("life-move", "")) if self.tokens else None
        other_id = emulator.instance_id(OTHER_ALIAS)
        ok = (
            len(move_items) == 1
            and move_items[0].get("Instance") == OTHER_ALIAS
            and move_items[0].get("DeviceToken") == self.tokens.get("life-move")
            and move_up is not None
            and move_up.get("InstanceId") == other_id
        )
        found.append(
            FlowCheck(
                "Lifecycle: move",
                ok,
                f"stored in {move_items[0].get('Instance') if move_items else 'nothing'} with the same DeviceToken "
                f"{bool(move_items) and move_items[0].get('DeviceToken') == self.tokens.get('life-move')}; upstream "
                f"in {OTHER_ALIAS if move_up and move_up.get('InstanceId') == other_id else 'another instance'}",
            )
        )

        # Deletions: the tombstone only, nobody upstream, nothing recreated by the stale update or the redelivery.
        problems: list[str] = []
        kept = {"AccessToken", "RefreshToken", "DueShard", "FirstName", "Email", "City", "Profile"}
        for role in ("life-del", "life-race"):
            cid = self.cid(role)
            items = _items(stack, dynamodb, cid)
            if [i.get("Status") for i in items] != ["DELETED"]:
                problems.append(f"{role} stored as {[i.get('Status') for i in items]}")
            elif kept & set(items[0]):
                problems.append(f"{role}'s tombstone keeps {sorted(kept & set(items[0]))}")
            upstream = emulator.users(client_id=cid)
            if upstream:
                problems.append(f"{role} has {len(upstream)} user(s) upstream")
        redelivered = reasons_for(self.cid("life-del"), "TelematicsRegistrationFailed")
        stale = reasons_for(self.cid("life-del"), "TelematicsLifecycleFailed")
        if "user_deleted" not in redelivered:
            problems.append(f"the redelivered registration was not dropped as user_deleted ({redelivered})")
        if not stale:
            problems.append("the stale update was not announced as not applied")
        found.append(
            FlowCheck(
                "Lifecycle: deletions",
                not problems,
                "; ".join(problems)
                or "deleted user and the one racing its registration: a tombstone each (no token, no profile), nobody "
                f"upstream; the stale update dropped ({', '.join(sorted(set(stale)))}), the redelivered registration "
                "dropped (user_deleted), no Create",
            )
        )

        # Adoption of the lost chunk.
        state = self._chunk_state(stack, dynamodb)
        adopted = [u for u in _scan_adopted(stack, dynamodb) if u.get("BulkRequestId") == self.lost_request]
        tokens = {str(u["DeviceToken"]) for u in adopted}
        upstream_ok = all((user := emulator.user(token)) is not None and not user.get("ClientId") for token in tokens)
        pace = 60.0 / 3
        now = time.time()
        statuses = sorted(str(u.get("Status")) for u in adopted)
        tokenless_due = all(
            u.get("Status") == "ACTIVE"
            or (
                u.get("Status") == "TOKENLESS"
                and "DueShard" in u
                and int(u.get("AccessExpiresAt", 0)) - options_margin <= now + LOST_BULK * pace
            )
            for u in adopted
        )
        ok = (
            state == ChunkState.DONE
            and len(adopted) == LOST_BULK == len(tokens)
            and all(u.get("AdoptedFrom") for u in adopted)
            and upstream_ok
            and tokenless_due
        )
        found.append(
            FlowCheck(
                "Lost chunk adopted",
                ok,
                f"bulk {self.lost_request} chunk {state.value if state else 'missing'}; {len(adopted)} users stored "
                f"once (AdoptedFrom) of {LOST_BULK} created upstream without ClientId: "
                + " · ".join(f"{s} {statuses.count(s)}" for s in sorted(set(statuses)))
                + ("; TOKENLESS ones due for Login within the fleet's budget" if tokenless_due else "; NOT due"),
            )
        )

        # The drift audit's report.
        report = self.audit or {}
        counts = report.get("Counts", {})
        users = report.get("Users", {})
        expected = {
            "gone": self.tokens.get("drift-gone"),
            "deactivated": self.tokens.get("drift-deactivated"),
            "reflagged": self.tokens.get("drift-reflagged"),
            "moved": self.tokens.get("drift-moved"),
            "unstored": self.unstored_token,
        }
        wrong = [name for name in DRIFT_CLASSES if counts.get(name) != 1 or expected[name] not in users.get(name, [])]
        gone = _items(stack, dynamodb, self.cid("drift-gone"))
        gone_ok = (
            len(gone) == 1
            and gone[0].get("Status") == "GONE"
            and not {"AccessToken", "RefreshToken", "DueShard"} & set(gone[0])
            and int(gone[0].get("Version", 0)) == self.gone_version_after_audit
            and "TelematicsUserGone" in [k for k, d in events if d.get("DeviceToken") == expected["gone"]]
        )
        found.append(
            FlowCheck(
                "Drift audit (reconcile)",
                bool(report) and not wrong and gone_ok,
                (
                    f"report {' · '.join(f'{n} {counts.get(n)}' for n in DRIFT_CLASSES)}"
                    + (f" (wrong: {wrong})" if wrong else ", each the user drifted")
                    + f"; gone user {gone[0].get('Status') if gone else 'missing'}, "
                    + (
                        "no token, out of the refresh index, not refreshed since, announced"
                        if gone_ok
                        else "NOT settled"
                    )
                    + f"; admin Logins {emulator.counters().get('admin_logins')}"
                )
                if report
                else f"the audit did not run: {self.audit_error or self.phase}",
            )
        )
        return found


def _scan_adopted(stack: LocalStack, dynamodb: Any) -> list[dict[str, Any]]:
    deserializer = TypeDeserializer()
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {
        "TableName": stack.outputs["TokensTableName"],
        "ProjectionExpression": "pk, DeviceToken, #s, AdoptedFrom, BulkRequestId, DueShard, AccessExpiresAt",
        "FilterExpression": "attribute_exists(AdoptedFrom)",
        "ExpressionAttributeNames": {"#s": "Status"},
    }
    while True:
        page = dynamodb.scan(**kwargs)
        items += [{k: deserializer.deserialize(v) for k, v in item.items()} for item in page.get("Items", [])]
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
