"""``load FILE``: validate every row, then send the rows to the registration queue in batches, resumably.

Pass 1 reads the whole file and validates every row with the service's own parser, keeping only the first few
problems (and a count). Unless ``--skip-invalid`` is given, one bad row means nothing is sent. Pass 2 reads the
file again and sends the rows ``SendMessageBatch`` 10 at a time on ``--parallel`` threads, with at most two
batches per thread in flight, so memory stays flat for any file size.

Pass 1 also checks each row's ``Instance`` against the aliases of the stack's credentials secret (only its keys
are read), so a row for an unknown instance is reported here instead of being dead-lettered later.

``--wait`` then reports what became of each row sent now: registered, duplicate (the ClientId was already
stored), or dead-lettered with its reason (:mod:`telematics_cli.watch`), within ``--timeout`` seconds.

Resuming: ``FILE.load-state.json`` (beside the input) records, per (sha256 of the file, queue URL), the highest
line up to which every row was sent. A re-run of the same file to the same queue starts after it. Sending a row
twice is harmless anyway: single registrations are idempotent by (Instance, ClientId), and a bulk row without a
RequestId gets ``<sha256>:<line>`` as its RequestId, so the service never makes its users twice.

Rows with an ``Action`` (lifecycle changes) go to the lifecycle queue, each stamped ``OccurredAt`` when it is sent,
strictly increasing in file order, so a file's changes to one user apply in the file's order. A row that gives its
own ``OccurredAt`` keeps it: re-sending it is then a duplicate, not a newer change.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from botocore.exceptions import BotoCoreError, ClientError
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from telematics_cli import output
from telematics_cli.errors import EXIT_DATA, EXIT_OK, CliError
from telematics_cli.rows import InputFormat, Row, detect_format, file_sha256, open_input, read_rows
from telematics_cli.stamps import OccurredAtStamp
from telematics_cli.target import Target
from telematics_cli.watch import RegistrationWatch, SentRow
from telematics_cli.watch import summary as count_outcomes
from telematics_reg.errors import FieldError

BATCH_ENTRIES: Final = 10
#: SQS limit on the bodies of one SendMessageBatch (the contract caps one body at 64 KiB).
BATCH_BYTES: Final = 256 * 1024
ENTRY_ATTEMPTS: Final = 4
STATE_SUFFIX: Final = ".load-state.json"
_SAVE_EVERY_SECONDS: Final = 0.5
_KEPT_FAILURES: Final = 1000


@dataclass(frozen=True)
class LoadOptions:
    path: Path
    fmt: str | None = None
    dry_run: bool = False
    skip_invalid: bool = False
    max_errors: int = 20
    parallel: int = 4
    restart: bool = False
    state_file: Path | None = None
    progress: bool = True
    as_json: bool = False
    wait: bool = False
    timeout: float = 300.0


@dataclass(frozen=True)
class Failure:
    line: int
    code: str
    message: str


@dataclass
class Validation:
    rows: int = 0
    valid: int = 0
    invalid: int = 0
    bulk_rows: int = 0
    bulk_users: int = 0
    lifecycle_rows: int = 0
    to_send: int = 0
    last_line: int = 0
    problems: list[Row] = field(default_factory=list)

    def add(self, row: Row, *, keep: int, after_line: int) -> None:
        self.rows += 1
        self.last_line = max(self.last_line, row.line)
        if row.valid:
            self.valid += 1
            if row.bulk:
                self.bulk_rows += 1
                self.bulk_users += row.quantity
            self.lifecycle_rows += row.lifecycle
            if row.line > after_line:
                self.to_send += 1
        else:
            self.invalid += 1
            if keep <= 0 or len(self.problems) < keep:
                self.problems.append(row)


@dataclass
class SendReport:
    sent: int = 0
    batches: int = 0
    already_sent: int = 0
    skipped_invalid: int = 0
    failed: int = 0
    failures: list[Failure] = field(default_factory=list)
    #: With --wait: every row sent now, with its message id.
    sent_rows: list[SentRow] = field(default_factory=list)

    def fail(self, failure: Failure) -> None:
        self.failed += 1
        if len(self.failures) < _KEPT_FAILURES:
            self.failures.append(failure)


# ------------------------------------------------------------------------------------------------ checkpoint


class Checkpoint:
    """``FILE.load-state.json``: per (file sha256, queue URL), the highest line up to which all rows were sent."""

    def __init__(self, path: Path, *, sha256: str, queue_url: str, source: Path) -> None:
        self.path = path
        self._key = f"{sha256} {queue_url}"
        self._entry = {"sha256": sha256, "queue_url": queue_url, "file": source.name}
        self._saved: tuple[int, bool] | None = None

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"format": 1, "loads": {}}
        except (OSError, ValueError) as exc:
            raise CliError(
                f"the checkpoint {self.path} cannot be read ({exc}): fix or delete it, or give --restart"
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("loads"), dict):
            raise CliError(f"{self.path} is not a load checkpoint: delete it, or give --state-file or --restart")
        return data

    def last_line(self) -> int:
        entry = self._read()["loads"].get(self._key)
        line = entry.get("last_line") if isinstance(entry, dict) else None
        return line if isinstance(line, int) and line > 0 else 0

    def complete(self) -> bool:
        entry = self._read()["loads"].get(self._key)
        return isinstance(entry, dict) and entry.get("complete") is True

    def save(self, last_line: int, *, complete: bool, force: bool = False) -> None:
        if (last_line, complete) == self._saved and not force:
            return
        data = self._read()
        data["loads"][self._key] = {
            **self._entry,
            "last_line": last_line,
            "complete": complete,
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            os.replace(temporary, self.path)
        except OSError as exc:
            raise CliError(
                f"cannot write the checkpoint {self.path} ({exc.strerror or exc}): give --state-file PATH "
                "in a writable folder"
            ) from None
        self._saved = (last_line, complete)


class Watermark:
    """The highest line up to which every batch was sent, advanced as batches finish (in any order)."""

    def __init__(self, start: int) -> None:
        self.value = start
        self.blocked = False
        self._next = 0
        self._done: dict[int, tuple[int, int | None]] = {}

    def complete(self, seq: int, end_line: int, first_failed_line: int | None) -> None:
        if self.blocked:
            return
        self._done[seq] = (end_line, first_failed_line)
        while self._next in self._done:
            end, failed = self._done.pop(self._next)
            self._next += 1
            if failed is not None:
                self.value = max(self.value, failed - 1)
                self.blocked = True  # nothing past an unsent row may count as sent
                self._done.clear()
                return
            self.value = max(self.value, end)

    def finish(self, last_line: int) -> None:
        """Every batch is done: lines after the last batch (blank or skipped rows) are covered too."""
        if not self.blocked and not self._done:
            self.value = max(self.value, last_line)


# ----------------------------------------------------------------------------------------------------- sending


@dataclass(frozen=True)
class Batch:
    seq: int
    rows: list[Row]

    @property
    def end_line(self) -> int:
        return self.rows[-1].line

    @property
    def lifecycle(self) -> bool:
        return self.rows[0].lifecycle


def make_batches(
    rows: Iterator[Row], *, after_line: int, report: SendReport, stamp: OccurredAtStamp | None = None
) -> Iterator[Batch]:
    """Batches of rows for one queue each. Lifecycle rows are stamped ``OccurredAt`` here, in file order (the
    batches may then be sent in any order: the stamps keep a user's changes in the file's order)."""
    stamp = stamp or OccurredAtStamp()
    current: list[Row] = []
    size = 0
    seq = 0
    for row in rows:
        if row.line <= after_line:
            if row.valid:
                report.already_sent += 1
            continue
        if row.body is None:
            report.skipped_invalid += 1
            continue
        ready = replace(row, body=stamp.stamp(row.body)) if row.lifecycle else row
        body_size = len((ready.body or "").encode("utf-8"))
        switch = bool(current) and current[0].lifecycle != ready.lifecycle
        if current and (len(current) == BATCH_ENTRIES or size + body_size > BATCH_BYTES or switch):
            yield Batch(seq, current)
            seq += 1
            current, size = [], 0
        current.append(ready)
        size += body_size
    if current:
        yield Batch(seq, current)


def send_batch(
    sqs: Any, queue_url: str, batch: Batch, *, watch: RegistrationWatch | None = None
) -> tuple[list[Failure], list[SentRow]]:
    """Send one batch; entries SQS refuses for a passing reason are sent again. Returns what could not be sent,
    and (with a ``watch``) the rows that were, with their message ids.

    A ClientError for the whole call (credentials, a missing queue) propagates: the load stops there.
    """
    lines = {f"line-{row.line}": row.line for row in batch.rows}
    entries: list[dict[str, str]] = [{"Id": f"line-{row.line}", "MessageBody": row.body or ""} for row in batch.rows]
    watched = (
        {}
        if watch is None
        else {
            f"line-{row.line}": SentRow(
                label=f"line {row.line}",
                message_id="",
                instance=row.instance,
                client_id=row.client_id,
                request_id=row.request_id,
                quantity=row.quantity,
            )
            for row in batch.rows
        }
    )
    if watch is not None:
        watch.before_send(watched.values())
    sent: list[SentRow] = []
    failures: list[Failure] = []
    for attempt in range(ENTRY_ATTEMPTS):
        response = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
        if watch is not None:
            for item in response.get("Successful", []):
                row = watched[str(item["Id"])]
                row.message_id = str(item.get("MessageId", ""))
                sent.append(row)
        refused = {str(item["Id"]): item for item in response.get("Failed", [])}
        retry = []
        for entry in entries:
            item = refused.get(entry["Id"])
            if item is None:
                continue
            failure = Failure(lines[entry["Id"]], str(item.get("Code", "")), str(item.get("Message", "")))
            if item.get("SenderFault") or attempt == ENTRY_ATTEMPTS - 1:
                failures.append(failure)
            else:
                retry.append(entry)
        if not retry:
            break
        entries = retry
        time.sleep(random.uniform(0, 0.2 * 2**attempt))  # noqa: S311 - jitter, not secrecy
    return sorted(failures, key=lambda f: f.line), (sent if watch is not None else [])


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} rows/s" if speed else "- rows/s", style="cyan")


def _progress(enabled: bool, *, by_bytes: bool = False) -> Progress:
    """Rows sent (with rate and ETA), or bytes read while validating; only on a terminal (stderr)."""
    console = output.stderr()
    amount: list[ProgressColumn] = (
        [DownloadColumn(), TransferSpeedColumn(), TextColumn("{task.fields[rows]:,} rows")]
        if by_bytes
        else [MofNCompleteColumn(), _RateColumn()]
    )
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        *amount,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled or not console.is_terminal,
        transient=False,
    )


def send_rows(
    target: Target,
    queue_url: str,
    options: LoadOptions,
    sha256: str,
    fmt: InputFormat,
    *,
    start_line: int,
    total: int,
    last_line: int,
    checkpoint: Checkpoint,
    watch: RegistrationWatch | None = None,
    lifecycle_url: str | None = None,
) -> SendReport:
    """Pass 2: stream the file again and send its valid rows after ``start_line``, saving the checkpoint.
    Registrations go to ``queue_url``, lifecycle rows to ``lifecycle_url``."""
    sqs = target.client("sqs")
    report = SendReport()
    watermark = Watermark(start_line)
    max_in_flight = max(1, options.parallel) * 2
    in_flight: dict[Future[tuple[list[Failure], list[SentRow]]], Batch] = {}
    last_save = time.monotonic()

    def collect(done: set[Future[tuple[list[Failure], list[SentRow]]]]) -> None:
        nonlocal last_save
        fatal: BaseException | None = None
        for future in sorted(done, key=lambda f: in_flight[f].seq):
            batch = in_flight.pop(future)
            error = future.exception()
            if error is not None:  # record every batch that did succeed first, then stop the load
                fatal = fatal or error
                continue
            failures, sent = future.result()
            report.sent_rows += sent
            report.batches += 1
            report.sent += len(batch.rows) - len(failures)
            for failure in failures:
                report.fail(failure)
            watermark.complete(batch.seq, batch.end_line, failures[0].line if failures else None)
            progress.advance(task, len(batch.rows))
        if fatal is not None:
            raise fatal
        if time.monotonic() - last_save >= _SAVE_EVERY_SECONDS:
            checkpoint.save(watermark.value, complete=False)
            last_save = time.monotonic()

    # Fails now, before sending, if it cannot be written; a finished load run again stays complete.
    checkpoint.save(start_line, complete=start_line >= last_line and checkpoint.complete(), force=True)
    rows = read_rows(options.path, fmt, sha256)
    with (
        _progress(options.progress and total > 0) as progress,
        ThreadPoolExecutor(max_workers=max(1, options.parallel)) as pool,
    ):
        task = progress.add_task("sending", total=total)
        try:
            for batch in make_batches(rows, after_line=start_line, report=report):
                while len(in_flight) >= max_in_flight:
                    collect(wait(in_flight, return_when=FIRST_COMPLETED).done)
                url = queue_url
                if batch.lifecycle:
                    assert lifecycle_url is not None
                    url = lifecycle_url
                in_flight[pool.submit(send_batch, sqs, url, batch, watch=watch)] = batch
            while in_flight:
                collect(wait(in_flight, return_when=FIRST_COMPLETED).done)
            watermark.finish(last_line)
        finally:
            for future in in_flight:
                future.cancel()
            # Whatever happened, record what is known to be sent (a re-run continues from there).
            checkpoint.save(watermark.value, complete=not watermark.blocked and watermark.value >= last_line)
    return report


# ----------------------------------------------------------------------------------------------------- command


def known_instances(target: Target) -> set[str] | None:
    """The instance aliases of the stack's credentials secret (its keys only); None when it cannot be read."""
    arn = target.setting("CREDENTIALS_SECRET_ARN", "InstanceCredentialsSecretArn")
    if not arn:
        output.warn(f"{target.description} names no credentials secret: the rows' Instance is not checked")
        return None
    try:
        value = target.client("secretsmanager").get_secret_value(SecretId=arn)["SecretString"]
        aliases = json.loads(value)
    except (ClientError, BotoCoreError, KeyError, ValueError) as exc:
        reason = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else type(exc).__name__
        output.warn(f"cannot read the credentials secret ({reason}): the rows' Instance is not checked")
        return None
    return {str(alias) for alias in aliases} if isinstance(aliases, dict) else None


def _check_instance(row: Row, instances: set[str] | None) -> Row:
    if instances is None or not row.valid or row.instance in instances:
        return row
    problem = FieldError("Instance", f"unknown instance {row.instance!r}: the credentials secret has no such alias")
    return Row(row.line, None, [problem], row.bulk)


def validate(
    options: LoadOptions, fmt: InputFormat, sha256: str, *, after_line: int, instances: set[str] | None = None
) -> Validation:
    """Pass 1: every row validated, streaming; keeps the first ``max_errors`` problems (all when 0)."""
    result = Validation()
    size = options.path.stat().st_size
    with _progress(options.progress, by_bytes=True) as progress:
        task = progress.add_task("validating", total=size, rows=0)
        for row in read_rows(
            options.path,
            fmt,
            sha256,
            progress=lambda position: progress.update(task, completed=position, rows=result.rows),
        ):
            result.add(_check_instance(row, instances), keep=options.max_errors, after_line=after_line)
        progress.update(task, completed=size, rows=result.rows)
    return result


def _summary(options: LoadOptions, fmt: Any, sha256: str, checked: Any) -> dict[str, Any]:
    """What the validation pass found, as the command reports it (``--json`` too)."""
    return {
        "file": str(options.path),
        "format": fmt.value,
        "sha256": sha256,
        "rows": checked.rows,
        "valid": checked.valid,
        "invalid": checked.invalid,
        "bulk_rows": checked.bulk_rows,
        "bulk_users": checked.bulk_users,
        "lifecycle_rows": checked.lifecycle_rows,
        "errors": [
            {"line": row.line, "problems": [{"field": e.key, "message": e.message} for e in row.errors]}
            for row in checked.problems
        ],
        "dry_run": options.dry_run,
    }


def _resolve(
    options: LoadOptions, target_factory: Any, sha256: str
) -> tuple[Target | None, str, Checkpoint | None, int, Any]:
    """The stack, its registration queue, the checkpoint and where to resume, and the credentials' aliases."""
    target: Target | None = None
    queue_url = ""
    checkpoint: Checkpoint | None = None
    start_line = 0
    if not options.dry_run:
        target = target_factory()
        queue_url = target.output("RegistrationQueueUrl")
        state_path = options.state_file or options.path.with_name(options.path.name + STATE_SUFFIX)
        checkpoint = Checkpoint(state_path, sha256=sha256, queue_url=queue_url, source=options.path)
        start_line = 0 if options.restart else checkpoint.last_line()
        instances = known_instances(target)
    else:
        try:  # a dry run needs no stack, but checks the Instance of each row when one is found
            instances = known_instances(target_factory())
        except CliError:
            instances = None
            output.info("no stack found: the rows' Instance is not checked against the credentials secret")
    return target, queue_url, checkpoint, start_line, instances


def run(options: LoadOptions, target_factory: Any) -> int:
    """The ``load`` command. ``target_factory()`` resolves the stack (not needed for ``--dry-run``)."""
    fmt = detect_format(options.path, options.fmt)
    open_input(options.path).close()
    sha256 = file_sha256(options.path)

    target, queue_url, checkpoint, start_line, instances = _resolve(options, target_factory, sha256)

    checked = validate(options, fmt, sha256, after_line=start_line, instances=instances)
    summary = _summary(options, fmt, sha256, checked)
    if checked.invalid:
        _print_problems(options, checked)
    if options.dry_run:
        summary |= {"would_send": checked.valid if not checked.invalid or options.skip_invalid else 0}
        _finish(options, summary, f"dry run: {checked.valid:,} valid rows, {checked.invalid:,} invalid; nothing sent")
        return EXIT_DATA if checked.invalid else EXIT_OK
    if checked.invalid and not options.skip_invalid:
        summary |= {"sent": 0, "queue_url": queue_url}
        _finish(
            options,
            summary,
            f"{checked.invalid:,} invalid rows: nothing sent (fix them, or give --skip-invalid to send the rest)",
        )
        return EXIT_DATA

    assert target is not None
    assert checkpoint is not None
    lifecycle_url = target.output("LifecycleQueueUrl") if checked.lifecycle_rows else None
    if start_line and checked.to_send:
        output.info(f"resuming after line {start_line:,} (checkpoint {checkpoint.path})")
    elif start_line:
        output.info(f"every row was already sent (checkpoint {checkpoint.path}; --restart sends them again)")
    watch = RegistrationWatch(target) if options.wait else None
    report = send_rows(
        target,
        queue_url,
        options,
        sha256,
        fmt,
        start_line=start_line,
        total=checked.to_send,
        last_line=checked.last_line,
        checkpoint=checkpoint,
        watch=watch,
        lifecycle_url=lifecycle_url,
    )
    summary |= {
        "queue_url": queue_url,
        "lifecycle_queue_url": lifecycle_url,
        "checkpoint": str(checkpoint.path),
        "sent": report.sent,
        "batches": report.batches,
        "already_sent": report.already_sent,
        "skipped_invalid": report.skipped_invalid,
        "failed": report.failed,
        "failures": [{"line": f.line, "code": f.code, "message": f.message} for f in report.failures],
    }
    outcomes_ok = True
    if watch is not None:
        rows = sorted(report.sent_rows, key=lambda r: int(r.label.removeprefix("line ")))
        if not options.as_json:
            output.info(f"waiting up to {options.timeout:.0f} s for what becomes of {len(rows):,} rows ...")
        watch.wait(rows, timeout=options.timeout)
        counts = count_outcomes(rows)
        summary |= {"outcomes": counts, "sent_rows": [row.as_dict() for row in rows]}
        outcomes_ok = set(counts) <= {"registered", "duplicate"}
    _print_report(options, summary, report)
    return EXIT_DATA if report.failed or not outcomes_ok else EXIT_OK


def _print_problems(options: LoadOptions, checked: Validation) -> None:
    if options.as_json:
        return
    table = Table(title=f"Invalid rows of {output.escape(options.path.name)}", title_justify="left")
    table.add_column("Line", justify="right")
    table.add_column("Field")
    table.add_column("Problem")
    for row in checked.problems:
        for error in row.errors:
            table.add_row(str(row.line), output.escape(error.key) or "-", output.escape(error.message))
    console = output.stdout()
    console.print(table)
    hidden = checked.invalid - len(checked.problems)
    if hidden > 0:
        console.print(f"… and {hidden:,} more invalid rows (--max-errors 0 lists them all)")


def _finish(options: LoadOptions, summary: dict[str, Any], message: str) -> None:
    if options.as_json:
        output.print_json(summary)
    else:
        output.stdout().print(message)


def _print_report(options: LoadOptions, summary: dict[str, Any], report: SendReport) -> None:
    if options.as_json:
        output.print_json(summary)
        return
    console = output.stdout()
    table = Table(
        title=f"Loaded {output.escape(options.path.name)} → registration queue", title_justify="left", show_header=False
    )
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("rows in file", f"{summary['rows']:,}")
    table.add_row("sent now", f"{report.sent:,} ({report.batches:,} batches)")
    table.add_row("already sent (checkpoint)", f"{report.already_sent:,}")
    table.add_row("skipped invalid", f"{report.skipped_invalid:,}")
    table.add_row("failed", f"{report.failed:,}")
    table.add_row("bulk rows / users asked", f"{summary['bulk_rows']:,} / {summary['bulk_users']:,}")
    if summary["lifecycle_rows"]:
        table.add_row("lifecycle rows (→ lifecycle queue)", f"{summary['lifecycle_rows']:,}")
    console.print(table)
    if report.failures:
        failed = Table(title="Entries SQS did not take", title_justify="left")
        failed.add_column("Line", justify="right")
        failed.add_column("Code")
        failed.add_column("Message")
        for failure in report.failures:
            failed.add_row(str(failure.line), failure.code, output.escape(failure.message))
        console.print(failed)
        console.print("Run the same command again to send them: rows already sent are not sent again.")
    if "outcomes" in summary:
        outcomes = Table(title="What became of the rows sent now", title_justify="left")
        outcomes.add_column("Row", justify="right")
        outcomes.add_column("Message id")
        outcomes.add_column("Outcome")
        outcomes.add_column("Detail", overflow="fold")
        styles = {"registered": "green", "duplicate": "cyan", "dead-lettered": "red", "pending": "yellow"}
        for row in summary["sent_rows"]:
            style = styles.get(row["status"], "")
            outcomes.add_row(
                str(row["row"]).removeprefix("line "),
                output.escape(row["message_id"]),
                f"[{style}]{row['status']}[/{style}]",
                output.escape(row["detail"]),
            )
        console.print(outcomes)
        console.print(", ".join(f"{count:,} {status}" for status, count in sorted(summary["outcomes"].items())))
    console.print(f"checkpoint: {output.escape(summary['checkpoint'])}")
