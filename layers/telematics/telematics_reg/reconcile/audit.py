"""The drift audit: every stored user against the upstream, at a cost bounded by pages, resumable, never two at once.

One run has two phases, each resumable from a cursor kept in the item ``AUDIT#DRIFT``:

1. **Walk** the company's users (GetFilteredPage, ``Sort`` ``DateCreated``, inactive users included, created up to
   the run's start), a page of ``page_size`` at a time. The cursor is the last ``DateCreated`` seen (passed back as
   ``DateCreatedFrom``) and the DeviceTokens already seen at that instant: unlike a page number it does not shift
   when users are deleted meanwhile, so no user is skipped (and then judged gone). Each page's users are read from
   our table in batches (no per-user call upstream) and classified:

   * ``moved``: upstream in another instance than the one we store;
   * ``deactivated``: upstream ``Inactive`` while we hold it active (or the reverse, after our own deactivation);
   * ``reflagged``: its ``UserFields`` (flags, ClientId) changed since the last audit read them, or its ClientId is
     not the one we store;
   * ``unstored``: a user of one of our instances that we do not store, carrying one of our ClientIds (its
     DeviceToken is the one we derive for that ClientId, or the ClientId is stored under another DeviceToken).

   Every stored user seen gets ``AuditRun`` (and the flags read, and its drift, if any).
2. **Sweep** the table (a Scan, paged) for registered users created before the run (less a margin) that the walk
   did not see: ``gone``. Each is marked ``GONE`` (out of the refresh index, tokens dropped) and announced with
   ``TelematicsUserGone``.
3. **Settle** the users judged gone whose mark was refused: a refresh or a lifecycle change held the user's lease
   (the mark never steps on a lease holder), or committed a new version since the scan. Each is read again and
   marked at the version it now has, once no lease is live, by this same run: the run waits for the lease (within
   the invocation's time, else at the next wake-up), for at most ``settle_seconds``; what is left then is counted
   as ``GoneNotMarked`` and judged again by the next run. Waiting is safe: the walk did not see the user, so it was
   deleted upstream before the walk read its page, and whatever the holder stores now (a pair rotated just before
   the deletion) is dead with it.

Users without a ClientId that we do not store (a lost CreateMany chunk's) are counted, not judged: adoption
(:mod:`telematics_reg.reconcile.adoption`) is what finds their owner.

The report (counts per class, and up to ``SAMPLE_SIZE`` DeviceTokens per class) is kept in ``AUDIT#DRIFT`` as
``LastReport`` and logged; every drifted user also gets one log line (``drift found``) naming its class.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from aws_lambda_powertools.metrics import MetricUnit

from telematics_reg.credentials import CredentialsProvider, DeviceTokenKeyProvider
from telematics_reg.observability import logger, metrics
from telematics_reg.outcomes import EventPublisher
from telematics_reg.reconcile.events import UserGone
from telematics_reg.reconcile.records import AUDITED_STATUSES, ReconcileRecords, StoredUser
from telematics_reg.registration import device_token_for
from telematics_reg.store import ConditionFailedError, iso

if TYPE_CHECKING:
    from telematics_reg.management_models import ManagedUser
    from telematics_reg.reconcile.admin import AdminTokenSource
    from telematics_reg.upstream import UserService

DRIFT_CLASSES = ("gone", "deactivated", "reflagged", "moved", "unstored")
SAMPLE_SIZE = 50
#: Users judged gone whose mark waits for a lease, kept in the cursor at most (more are left to the next run).
MAX_UNSETTLED = 1000
#: How often a run waiting for leases reads those users again: a holder usually lets its lease go long before it
#: would lapse (it releases or commits), and one consistent read of a few users costs little.
SETTLE_POLL_SECONDS = 5.0
Status = Literal["finished", "in_progress", "not_due", "busy", "off"]


class InstanceCatalog(CredentialsProvider, Protocol):
    """The instance credentials, and which aliases exist."""

    def aliases(self) -> list[str]: ...


@dataclass
class AuditReport:
    """One run's findings so far (complete once ``finished_at`` is set)."""

    run_id: str
    started_at: int
    instances: list[str] = field(default_factory=list)
    dry_run: bool = False
    phase: str = "walk"
    pages: int = 0
    upstream_users: int = 0
    audited: int = 0
    scanned_pages: int = 0
    anonymous_unstored: int = 0
    gone_not_marked: int = 0
    invocations: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DRIFT_CLASSES, 0))
    samples: dict[str, list[str]] = field(default_factory=lambda: {c: [] for c in DRIFT_CLASSES})
    finished_at: int | None = None

    @property
    def drift(self) -> int:
        return sum(self.counts.values())

    def add(self, drift_class: str, device_token: str) -> None:
        self.counts[drift_class] += 1
        if len(self.samples[drift_class]) < SAMPLE_SIZE:
            self.samples[drift_class].append(device_token)

    def as_dict(self) -> dict[str, Any]:
        return {
            "RunId": self.run_id,
            "StartedAt": iso(self.started_at),
            "FinishedAt": iso(self.finished_at) if self.finished_at is not None else None,
            "Instances": self.instances or "all",
            "DryRun": self.dry_run,
            "Phase": self.phase,
            "Pages": self.pages,
            "UpstreamUsers": self.upstream_users,
            "Audited": self.audited,
            "ScannedPages": self.scanned_pages,
            "Invocations": self.invocations,
            "Drift": self.drift,
            "Counts": dict(self.counts),
            "Users": {k: list(v) for k, v in self.samples.items()},
            "AnonymousUnstored": self.anonymous_unstored,
            "GoneNotMarked": self.gone_not_marked,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> AuditReport:
        stats = json.loads(state.get("Stats", "{}"))
        report = cls(run_id=str(state["RunId"]), started_at=int(state["StartedAt"]))
        report.instances = list(state.get("Instances") or [])
        report.dry_run = bool(state.get("DryRun", False))
        report.phase = str(state.get("Phase", "walk"))
        for name in ("pages", "upstream_users", "audited", "scanned_pages", "anonymous_unstored", "gone_not_marked"):
            setattr(report, name, int(stats.get(name, 0)))
        report.invocations = int(stats.get("invocations", 0))
        report.counts.update({k: int(v) for k, v in stats.get("counts", {}).items()})
        report.samples.update({k: list(v) for k, v in stats.get("samples", {}).items()})
        return report

    def stats_json(self) -> str:
        return json.dumps(
            {
                "pages": self.pages,
                "upstream_users": self.upstream_users,
                "audited": self.audited,
                "scanned_pages": self.scanned_pages,
                "anonymous_unstored": self.anonymous_unstored,
                "gone_not_marked": self.gone_not_marked,
                "invocations": self.invocations,
                "counts": self.counts,
                "samples": self.samples,
            },
            separators=(",", ":"),
        )


@dataclass(frozen=True)
class AuditStep:
    """What one call of :meth:`DriftAudit.run` did."""

    status: Status
    report: AuditReport | None = None
    detail: str = ""


def flags_of(user: ManagedUser) -> str:
    """The upstream's ``UserFields`` as one string (what a later change is judged against)."""
    flags = user.flags
    return json.dumps(
        {
            "ClientId": flags.client_id,
            "Enabled": flags.enabled,
            "EnableTracking": flags.enable_tracking,
            "EnableLogging": flags.enable_logging,
            "EnableRealTimeLocation": flags.enable_real_time_location,
        },
        separators=(",", ":"),
        sort_keys=True,
    )


def _created(user: ManagedUser) -> datetime | None:
    if user.date_created is None:
        return None
    created = user.date_created
    return created.replace(tzinfo=UTC) if created.tzinfo is None else created.astimezone(UTC)


class DriftAudit:
    """The drift audit (see the module docstring).

    Parameters
    ----------
    interval_seconds
        A new run starts when the last one started this long ago (the schedule only wakes the function).
    lease_seconds
        The audit's lease: at least the function's timeout plus the clock skew (a page never takes longer).
    created_margin_seconds
        Users stored less than this before the run started are not judged gone (their upstream creation may fall
        after the walk's end): at least a registration claim plus the clock skew.
    page_size, scan_page_size
        Users per GetFilteredPage page; items read per page of the table's Scan.
    settle_seconds
        How long after the sweep the run keeps waiting for the leases of users judged gone (a lease lives minutes:
        a refresh's ``REFRESH_LEASE_SECONDS``, a change's ``LIFECYCLE_LEASE_SECONDS``).
    """

    def __init__(
        self,
        *,
        upstream: UserService,
        admin: AdminTokenSource,
        records: ReconcileRecords,
        credentials: InstanceCatalog,
        device_token_key: DeviceTokenKeyProvider,
        publisher: EventPublisher,
        interval_seconds: int = 86_400,
        lease_seconds: int = 180,
        created_margin_seconds: int = 300,
        page_size: int = 1000,
        scan_page_size: int = 1000,
        workers: int = 8,
        settle_seconds: int = 900,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._upstream = upstream
        self._admin = admin
        self._records = records
        self._credentials = credentials
        self._key = device_token_key
        self._publisher = publisher
        self._interval = interval_seconds
        self._lease = lease_seconds
        self._created_margin = created_margin_seconds
        self._page_size = page_size
        self._scan_page = scan_page_size
        self._workers = workers
        self._settle = settle_seconds
        self._clock = clock
        self._sleep = sleep
        self.upstream_calls = 0

    # -------------------------------------------------------------------------------------------- entry point

    def run(
        self,
        *,
        time_left: Callable[[], float] | None = None,
        reserve: float = 60.0,
        force: bool = False,
        instances: Sequence[str] | None = None,
        dry_run: bool = False,
    ) -> AuditStep:
        """Continue the run in progress, or start one when due (or ``force``d), until it ends or time runs short.

        Parameters
        ----------
        time_left
            Seconds left to the invocation; the run stops at a checkpoint once fewer than ``reserve`` are left.
        force, instances, dry_run
            Start a run now (not waiting for the interval), on these aliases only, changing nothing but the audit's
            own bookkeeping. A run in progress with other options is not continued (``busy``).

        Example
        -------
        >>> step = audit.run(time_left=lambda: 250.0)  # doctest: +SKIP
        >>> step.status, step.report.counts  # doctest: +SKIP
        ('finished', {'gone': 1, 'deactivated': 0, 'reflagged': 0, 'moved': 0, 'unstored': 0})
        """
        owner = str(uuid.uuid4())
        state = self._records.take_audit_lease(owner, now=self._clock(), ttl=self._lease)
        if state is None:
            return AuditStep("busy", detail="another audit holds the lease")
        try:
            report, detail = self._current(state, owner, force=force, instances=instances, dry_run=dry_run)
            if report is None:
                return AuditStep("not_due" if detail.startswith("not due") else "busy", detail=detail)
            report.invocations += 1
            cursor = _Cursor.from_state(state) if state.get("RunId") == report.run_id else _Cursor()
            while report.phase != "done":
                wait = 0.0
                if report.phase == "walk":
                    if self._walk_page(report, cursor):
                        report.phase = "sweep"
                elif report.phase == "sweep":
                    if self._sweep_page(report, cursor):
                        report.phase = "settle"
                        cursor.settle_until = int(self._clock()) + self._settle
                else:
                    wait = self._settle_gone(report, cursor)
                if report.phase == "settle" and not cursor.unsettled:
                    report.phase = "done"
                    report.finished_at = int(self._clock())
                self._checkpoint(owner, report, cursor)
                if report.phase == "done":
                    break
                # A wait for leases is short (our own lease is renewed by each checkpoint) and never outlasts the
                # invocation: the next wake-up goes on waiting.
                if time_left is not None and time_left() - wait < reserve:
                    logger.info("drift audit continues at the next invocation", extra={"audit": report.as_dict()})
                    return AuditStep("in_progress", report)
                if wait > 0:
                    self._sleep(wait)
            self._finish(report)
            return AuditStep("finished", report)
        except ConditionFailedError:
            # Our lease was taken over (we overran it): the other audit resumes from our last checkpoint.
            logger.error("drift audit lost its lease: stopped")
            return AuditStep("busy", detail="lease lost")
        finally:
            self._records.release_audit_lease(owner)

    def last_report(self) -> dict[str, Any] | None:
        raw = self._records.audit_state().get("LastReport")
        return json.loads(raw) if raw else None

    # ------------------------------------------------------------------------------------------- run bookkeeping

    def _current(
        self, state: dict[str, Any], owner: str, *, force: bool, instances: Sequence[str] | None, dry_run: bool
    ) -> tuple[AuditReport | None, str]:
        now = int(self._clock())
        wanted = sorted(instances or [])
        if state.get("RunId") and state.get("Phase") != "done":
            report = AuditReport.from_state(state)
            explicit = force or instances is not None or dry_run
            if explicit and (report.instances != wanted or report.dry_run != dry_run):
                return None, (
                    f"busy: run {report.run_id} is in progress with other options (instances "
                    f"{report.instances or 'all'}, dry run {report.dry_run}); it finishes at later invocations"
                )
            return report, "continued"
        last = int(state.get("StartedAt", 0))
        if not force and state.get("RunId") and now - last < self._interval:
            return None, f"not due: the last audit started at {iso(last)}"
        report = AuditReport(run_id=f"{iso(now)}/{uuid.uuid4().hex[:8]}", started_at=now, instances=wanted)
        report.dry_run = dry_run
        self._checkpoint(owner, report, _Cursor(), new=True)
        logger.info("drift audit started", extra={"audit": report.as_dict()})
        return report, "started"

    def _checkpoint(self, owner: str, report: AuditReport, cursor: _Cursor, *, new: bool = False) -> None:
        values: dict[str, Any] = {
            "Phase": report.phase,
            "Stats": report.stats_json(),
            "WalkFrom": cursor.walk_from,
            "WalkPage": cursor.walk_page,
            "WalkSeen": json.dumps(sorted(cursor.walk_seen)),
            "ScanKey": cursor.scan_key,
            "ScanStarted": cursor.scan_started,
            "Unsettled": json.dumps(sorted(cursor.unsettled)),
            "SettleUntil": cursor.settle_until,
        }
        if report.phase == "done":
            values |= {"FinishedAt": report.finished_at, "LastReport": json.dumps(report.as_dict())}
        if new:
            values |= {
                "RunId": report.run_id,
                "StartedAt": report.started_at,
                "Instances": report.instances or None,
                "DryRun": report.dry_run,
            }
        self._records.save_audit(owner, values, now=self._clock(), ttl=self._lease)

    def _finish(self, report: AuditReport) -> None:
        summary = report.as_dict()  # also kept on the audit item as LastReport (the last checkpoint)
        metrics.add_metric("AuditUsersAudited", MetricUnit.Count, report.audited)
        metrics.add_metric("AuditPages", MetricUnit.Count, report.pages)
        if not report.dry_run:
            for name, count in report.counts.items():
                metrics.add_metric(f"Drift{name.capitalize()}", MetricUnit.Count, count)
            metrics.add_metric("DriftFound", MetricUnit.Count, report.drift)
        (logger.warning if report.drift else logger.info)("drift audit report", extra={"audit": summary})

    # ---------------------------------------------------------------------------------------------------- walk

    def _walk_page(self, report: AuditReport, cursor: _Cursor) -> bool:
        """Classify one page of the upstream's users; True when the walk is over."""
        from telematics_reg.management_models import UserPageQuery, UserSort  # noqa: PLC0415 - see management_models

        walk_from = datetime.fromisoformat(cursor.walk_from) if cursor.walk_from else None
        query = UserPageQuery(
            page_number=cursor.walk_page,
            page_size=self._page_size,
            sort=UserSort.DATE_CREATED,
            show_inactive_users=True,
            include_account_info=False,
            date_created_from=walk_from,
            date_created_to=datetime.fromtimestamp(report.started_at, UTC),
        )
        page = self._admin.call(lambda token: self._upstream.users_page(token, query))
        self.upstream_calls += 1
        report.pages += 1
        fresh = [u for u in page.users if not (_created(u) == walk_from and str(u.device_token) in cursor.walk_seen)]
        report.upstream_users += len(fresh)
        self._classify(report, fresh)

        if len(page.users) < self._page_size:
            return True
        last = _created(page.users[-1])
        if last is None:
            # No DateCreated to go on (the vendor always sends one): fall back to page numbers.
            cursor.walk_page += 1
            return False
        if walk_from is None or last > walk_from:
            at_last = {str(u.device_token) for u in page.users if _created(u) == last}
            cursor.walk_from = last.isoformat()
            # A page that is one instant throughout (a CreateMany's users share it) would come back whole as page 1
            # of the next query: ask for page 2 at once (the seen set still drops any user shown twice).
            cursor.walk_page = 2 if len(at_last) == len(page.users) else 1
            cursor.walk_seen = at_last
        else:  # a page all created at one instant: page on within it
            cursor.walk_page += 1
            cursor.walk_seen |= {str(u.device_token) for u in page.users}
        return False

    def _classify(self, report: AuditReport, users: list[ManagedUser]) -> None:
        stored = self._records.users([str(u.device_token) for u in users])
        selected = set(report.instances)
        ours = self._our_instances()
        marks: list[tuple[str, str, list[str], str | None]] = []
        for user in users:
            token = str(user.device_token)
            upstream_iid = str(user.instance_id).lower() if user.instance_id is not None else None
            record = stored.get(token)
            if record is None:
                self._judge_unstored(report, user, upstream_iid, ours, selected)
                continue
            if record.status not in AUDITED_STATUSES:
                continue  # a registration in flight, or judged gone already
            drift: list[str] = []
            if not selected or record.instance in selected:
                drift = self._drift_of(user, record, upstream_iid)
                report.audited += 1
                for name in drift:
                    report.add(name, token)
                    logger.warning(
                        "drift found",
                        extra={
                            "drift": name,
                            "device_token": token,
                            "instance": record.instance,
                            "client_id": record.client_id,
                            "dry_run": report.dry_run,
                        },
                    )
            moved_to = upstream_iid if "moved" in drift else None
            marks.append((token, flags_of(user), drift, moved_to))
        self._mark(report, marks, previous={t: stored[t] for t, *_ in marks})

    @staticmethod
    def _drift_of(user: ManagedUser, record: StoredUser, upstream_iid: str | None) -> list[str]:
        drift: list[str] = []
        if upstream_iid is not None and upstream_iid != record.instance_id.lower():
            drift.append("moved")
        if user.active == record.deactivated:
            drift.append("deactivated")
        flags = flags_of(user)
        if (record.audit_flags is not None and record.audit_flags != flags) or (user.client_id or None) != (
            record.client_id or None
        ):
            drift.append("reflagged")
        return drift

    def _judge_unstored(
        self,
        report: AuditReport,
        user: ManagedUser,
        upstream_iid: str | None,
        ours: dict[str, str],
        selected: set[str],
    ) -> None:
        alias = ours.get(upstream_iid or "")
        if alias is None or (selected and alias not in selected):
            return  # another instance of the company: not ours to judge
        token = str(user.device_token)
        client_id = user.client_id
        if not client_id:
            report.anonymous_unstored += 1
            return
        derived = device_token_for(upstream_iid or "", client_id, key=self._key.get()) == token
        if not derived:
            stored = self._records.find_by_client(alias, client_id)
            if stored is None or stored.device_token == token:
                return  # a ClientId we never registered: another system's user
        report.add("unstored", token)
        logger.warning(
            "drift found",
            extra={"drift": "unstored", "device_token": token, "instance": alias, "client_id": client_id},
        )

    def _our_instances(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for alias in self._credentials.aliases():
            try:
                found[str(self._credentials.get(alias).instance_id).lower()] = alias
            except Exception as exc:  # noqa: BLE001 - a malformed entry is that alias's problem, reported where used
                logger.warning("instance not audited", extra={"instance": alias, "error": type(exc).__name__})
        return found

    def _mark(
        self,
        report: AuditReport,
        marks: list[tuple[str, str, list[str], str | None]],
        previous: dict[str, StoredUser],
    ) -> None:
        """Write ``AuditRun`` on every stored user seen (concurrently: one write each). A dry run keeps the flags
        and drift notes as they were."""
        now = self._clock()

        def write(mark: tuple[str, str, list[str], str | None]) -> None:
            token, flags, drift, moved_to = mark
            if report.dry_run:
                before = previous[token]
                self._records.mark_seen(
                    token,
                    run_id=report.run_id,
                    flags=before.audit_flags or flags,
                    drift=[],
                    instance_id=None,
                    now=now,
                    keep_notes=True,
                )
            else:
                self._records.mark_seen(
                    token, run_id=report.run_id, flags=flags, drift=drift, instance_id=moved_to, now=now
                )

        with ThreadPoolExecutor(max_workers=self._workers) as pool:
            list(pool.map(write, marks))

    # --------------------------------------------------------------------------------------------------- sweep

    def _sweep_page(self, report: AuditReport, cursor: _Cursor) -> bool:
        """Judge one page of the table's unseen users gone; True when the table is done."""
        cutoff = iso(report.started_at - self._created_margin)
        users, next_key = self._records.scan_unseen(
            run_id=report.run_id, created_before=cutoff, start_key=cursor.scan_key, limit=self._scan_page
        )
        cursor.scan_started = True
        report.scanned_pages += 1
        selected = set(report.instances)
        for user in users:
            if selected and user.instance not in selected:
                continue
            report.add("gone", user.device_token)
            logger.warning(
                "drift found",
                extra={
                    "drift": "gone",
                    "device_token": user.device_token,
                    "instance": user.instance,
                    "client_id": user.client_id,
                    "dry_run": report.dry_run,
                },
            )
            if report.dry_run:
                continue
            if self._records.mark_gone(user, run_id=report.run_id, now=self._clock()):
                self._announce_gone(user)
            elif len(cursor.unsettled) < MAX_UNSETTLED:
                cursor.unsettled.add(user.device_token)  # leased or refreshed meanwhile: settled after the sweep
            else:
                report.gone_not_marked += 1  # judged again by the next run
        cursor.scan_key = next_key
        return next_key is None

    def _announce_gone(self, user: StoredUser) -> None:
        try:
            self._publisher.publish(
                UserGone(device_token=user.device_token, instance=user.instance, client_id=user.client_id)
            )
        except Exception:  # noqa: BLE001 - the mark is the record; the event a notification
            logger.exception("could not publish TelematicsUserGone")

    # -------------------------------------------------------------------------------------------------- settle

    def _settle_gone(self, report: AuditReport, cursor: _Cursor) -> float:
        """Mark the users judged gone whose lease has ended since; the seconds to wait before trying the rest again
        (0 when none is left, or the run stops waiting for them).

        Each is read again (consistently) and marked at the version it has now, under :meth:`mark_gone`'s conditions
        (registered, unseen by this run, no live lease). Timeline of a user whose refresh held the lease::

            walk: user absent (deleted upstream) .. sweep: mark(v) refused: leased ........ settle: read v+1 -> GONE
            refresh:                            lease(v) -- Refresh ok (before the deletion) -- commit -> v+1
        """
        now = self._clock()
        current = self._records.users(sorted(cursor.unsettled))
        next_try: float | None = None
        for token in sorted(cursor.unsettled):
            user = current.get(token)
            if user is None or user.status not in AUDITED_STATUSES or user.audit_run == report.run_id:
                cursor.unsettled.discard(token)  # erased here meanwhile (a deletion): nothing left to mark
                continue
            if user.lease_expires_at is not None and user.lease_expires_at >= int(now):
                # Free by our clock once LeaseExpiresAt < now (whole seconds, as mark_gone judges it).
                ends = user.lease_expires_at + 1 - now
                next_try = ends if next_try is None else min(next_try, ends)
                continue
            if self._records.mark_gone(user, run_id=report.run_id, now=now):
                cursor.unsettled.discard(token)
                self._announce_gone(user)
            else:
                next_try = 1.0 if next_try is None else min(next_try, 1.0)  # changed again since the read: re-read
        if not cursor.unsettled:
            return 0.0
        if cursor.settle_until is not None and now >= cursor.settle_until:
            report.gone_not_marked += len(cursor.unsettled)
            logger.warning(
                "users judged gone left to the next audit: their lease outlasted the wait",
                extra={"device_tokens": sorted(cursor.unsettled)[:SAMPLE_SIZE], "count": len(cursor.unsettled)},
            )
            cursor.unsettled.clear()
            return 0.0
        return min(SETTLE_POLL_SECONDS, max(1.0, next_try or 1.0))


@dataclass
class _Cursor:
    walk_from: str | None = None
    walk_page: int = 1
    walk_seen: set[str] = field(default_factory=set)
    scan_key: str | None = None
    scan_started: bool = False
    #: Users judged gone whose mark waits for a lease to end, and until when the run waits for them (epoch s).
    unsettled: set[str] = field(default_factory=set)
    settle_until: int | None = None

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Cursor:
        return cls(
            walk_from=state.get("WalkFrom"),
            walk_page=int(state.get("WalkPage", 1)),
            walk_seen=set(json.loads(state.get("WalkSeen", "[]"))),
            scan_key=state.get("ScanKey"),
            scan_started=bool(state.get("ScanStarted", False)),
            unsettled=set(json.loads(state.get("Unsettled", "[]"))),
            settle_until=int(state["SettleUntil"]) if state.get("SettleUntil") is not None else None,
        )
