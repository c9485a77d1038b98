"""The ``telematics-reg`` command line: options, commands, and clear errors instead of stack traces."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ReadTimeoutError,
    SSOTokenLoadError,
    TokenRetrievalError,
    UnauthorizedSSOTokenError,
)

from telematics_cli import dlq, lifecycle, load, output, reconcile, status, trace, users
from telematics_cli.errors import EXIT_DATA, EXIT_INTERRUPTED, EXIT_USAGE, CliError
from telematics_cli.target import DEFAULT_LOCAL_STACK, Target, resolve
from telematics_reg.models import read_jwt_claims

PROG: Final = "telematics-reg"
DEFAULT_MIN_VALIDITY: Final = 300
MAX_PARALLEL: Final = 32
CREDENTIAL_CODES: Final = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "AuthFailure",
        "RequestExpired",
    }
)
ACCESS_CODES: Final = frozenset({"AccessDenied", "AccessDeniedException", "AuthorizationError"})
MISSING_CODES: Final = frozenset(
    {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "ResourceNotFoundException", "NotFound"}
)

_DESCRIPTION: Final = """\
Operate the telematics registration service: load registration files, check its state, look at a user,
get a valid access token, update, deactivate, reactivate, delete or move a user, and list or redrive dead
letters.

Resources come from a deployed CloudFormation stack (--stack NAME, with --region/--profile), or from the
local stack that `make run ARGS=--serve` saves in .local-stack/stack.json while it runs (used when it exists
and no --stack is given; --local-stack PATH names another file)."""

_EPILOG: Final = """\
exit codes: 0 ok · 1 problems in the data (invalid rows, entries not sent, no such user, no token, dead letters
not moved) · 2 usage or configuration (bad options, no stack, unreadable file, missing or expired credentials)

examples:
  telematics-reg load users.csv --dry-run
  telematics-reg --stack telematics-prod --region eu-west-1 load users.csv --parallel 8
  telematics-reg status --json
  telematics-reg show --client-id customer-42
  telematics-reg trace --client-id customer-42
  TOKEN=$(telematics-reg token --client-id customer-42)
  telematics-reg update --client-id customer-42 --set City=Paris --no-tracking --wait
  telematics-reg delete --client-id customer-42 --yes
  telematics-reg dlq list --queue registration
  telematics-reg dlq redrive --queue registration --reason upstream_rejected --dry-run
  telematics-reg reconcile --dry-run
  telematics-reg bulk adopt load-2026-11-21 --dry-run"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=110)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _parallel(text: str) -> int:
    value = _positive(text)
    if value > MAX_PARALLEL:
        raise argparse.ArgumentTypeError(f"at most {MAX_PARALLEL}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _target_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Where the resources are. Accepted before or after the command (``--stack X status`` = ``status --stack X``)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("where the service is")
    group.add_argument("--stack", metavar="NAME", default=default(None), help="a deployed CloudFormation stack")
    group.add_argument("--region", default=default(None), help="its AWS region (default: the profile's/environment's)")
    group.add_argument("--profile", default=default(None), help="the AWS profile to use")
    group.add_argument(
        "--local",
        action="store_true",
        default=default(False),
        help=f"use the local stack of `make run ARGS=--serve` ({DEFAULT_LOCAL_STACK}); the default when it exists",
    )
    group.add_argument("--local-stack", metavar="PATH", default=default(None), help="use the local stack saved in PATH")


def _user_options(parser: argparse.ArgumentParser) -> None:
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--client-id", metavar="ID", help="the user's id in your system (looked up in the ByClient index)")
    who.add_argument("--device-token", metavar="UUID", help="the user's DeviceToken")
    parser.add_argument("--instance", default="default", help="instance alias of --client-id (default: default)")


_Command = Callable[[str, str, str, Callable[..., int]], argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION, epilog=_EPILOG, formatter_class=_Formatter)
    _target_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _target_options(common, suppress=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, description: str, run: Callable[..., int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help_text, description=description, parents=[common], formatter_class=_Formatter
        )
        sub.set_defaults(handler=run)
        return sub

    _add_load(command)
    _add_status(command)
    _add_show(command)
    _add_token(command)
    _add_relogin(command)
    _add_trace(command)
    lifecycle.add_commands(command)
    _add_dlq(commands, common)
    _add_reconcile(command)
    _add_bulk(commands, common)
    return parser


def _add_load(command: _Command) -> None:
    loader = command(
        "load",
        "validate a CSV / JSON Lines file of registrations (and Action rows) and send it to the queues",
        load.__doc__ or "",
        _run_load,
    )
    loader.add_argument("file", metavar="FILE", type=Path, help="a .csv, .jsonl or .ndjson file")
    loader.add_argument("--format", choices=["csv", "jsonl"], help="the file's format (default: from its extension)")
    loader.add_argument("--dry-run", action="store_true", help="validate every row, send nothing (needs no stack)")
    loader.add_argument("--skip-invalid", action="store_true", help="send the valid rows even if some are invalid")
    loader.add_argument(
        "--max-errors", type=_non_negative, default=20, metavar="N", help="invalid rows to list (default 20; 0: all)"
    )
    loader.add_argument(
        "--parallel", type=_parallel, default=4, metavar="N", help="batches sent at once (threads; default 4, max 32)"
    )
    loader.add_argument(
        "--restart", action="store_true", help="ignore the checkpoint and send from the first row (harmless twice)"
    )
    loader.add_argument(
        "--state-file", type=Path, metavar="PATH", help="the checkpoint file (default: FILE.load-state.json)"
    )
    loader.add_argument("--no-progress", action="store_true", help="no progress bar")
    loader.add_argument(
        "--wait",
        action="store_true",
        help="then report each row sent: registered, duplicate, or dead-lettered with its reason",
    )
    loader.add_argument(
        "--timeout", type=float, default=300.0, metavar="SECONDS", help="with --wait: longest wait (default 300)"
    )
    loader.add_argument("--json", action="store_true", help="the report as JSON")


def _add_status(command: _Command) -> None:
    state = command(
        "status",
        "users by status, tokens due soon, the oldest overdue token, queue depths",
        status.__doc__ or "",
        _run_status,
    )
    state.add_argument(
        "--margin", type=_non_negative, metavar="SECONDS", help="'due soon' horizon (default: the stack's margin)"
    )
    state.add_argument("--shards", type=_positive, metavar="N", help="shards of the RefreshDue index (default: stack)")
    state.add_argument(
        "--no-scan",
        action="store_true",
        help="do not count users by status (that count scans the whole table: ~1 read unit per 8 KB)",
    )
    state.add_argument("--segments", type=_positive, default=4, metavar="N", help="parallel scan segments (default 4)")
    state.add_argument("--json", action="store_true", help="the report as JSON")


def _add_show(command: _Command) -> None:
    show = command("show", "one user: status, version, expiry, last error, claim and lease", "", _run_show)
    _user_options(show)
    show.add_argument("--reveal-tokens", action="store_true", help="show the tokens in full (they are secrets)")
    show.add_argument("--upstream", action="store_true", help="also the user as the upstream sees it (find, admin)")
    show.add_argument("--user-service-url", metavar="URL", help="with --upstream: the User Service (default: stack's)")
    show.add_argument("--json", action="store_true", help="the user as JSON")


def _add_token(command: _Command) -> None:
    token = command(
        "token",
        "print a valid access token (refreshed under the lease when it is about to expire)",
        "Prints only the token on stdout, e.g. TOKEN=$(telematics-reg token --client-id c-1); "
        "diagnostics go to stderr.",
        _run_token,
    )
    _user_options(token)
    token.add_argument(
        "--min-validity",
        type=_non_negative,
        metavar="SECONDS",
        help="refresh if the token expires sooner than this (default: 300, or half the token's lifetime if shorter)",
    )
    token.add_argument("--wait", type=float, default=10.0, metavar="SECONDS", help="longest wait for a busy lease")
    _upstream_options(token)
    token.add_argument("--json", action="store_true", help='{"DeviceToken", "AccessToken", "ExpiresAt" (epoch s)}')


def _upstream_options(parser: argparse.ArgumentParser) -> None:
    """Options of the commands that call the User Service (through the read path)."""
    parser.add_argument("--user-service-url", metavar="URL", help="the User Service (default: the stack's)")
    parser.add_argument(
        "--credentials-secret-arn", metavar="ARN", help="the instance credentials secret (default: the stack's)"
    )
    parser.add_argument("--verbose", action="store_true", help="the library's info logs on stderr")


def _add_relogin(command: _Command) -> None:
    relogin = command(
        "relogin",
        "bring a NEEDS_RELOGIN user back: Login, store the tokens, refresh it again",
        "For a user whose refresh token and Login both failed, once the cause is fixed (e.g. the instance "
        "credentials). Spends one Login of the budget shared with the refresh workers.",
        _run_relogin,
    )
    _user_options(relogin)
    _upstream_options(relogin)
    relogin.add_argument("--json", action="store_true", help='{"DeviceToken", "Outcome"}')


def _add_trace(command: _Command) -> None:
    tracer = command(
        "trace",
        "everything known about one registration, in order: messages, deliveries, outcomes, dead letters, refreshes",
        trace.__doc__ or "",
        _run_trace,
    )
    who = tracer.add_mutually_exclusive_group(required=True)
    who.add_argument("--client-id", metavar="ID", help="the user's id in your system")
    who.add_argument("--device-token", metavar="UUID", help="the user's DeviceToken")
    who.add_argument("--message-id", metavar="ID", help="an SQS message id, or a signup event's id")
    tracer.add_argument("--instance", default="default", help="instance alias of --client-id (default: default)")
    tracer.add_argument(
        "--since", default="7d", metavar="DURATION", help="how far back the logs are read: 30m, 24h, 7d (default 7d)"
    )
    tracer.add_argument(
        "--log-file", type=Path, metavar="PATH", help="local stack: its log (default: run.log beside its stack.json)"
    )
    tracer.add_argument(
        "--dlq-limit", type=_positive, default=1000, metavar="N", help="dead letters examined per queue (default 1000)"
    )
    tracer.add_argument(
        "--query-timeout", type=float, default=60.0, metavar="SECONDS", help="AWS: longest wait for Logs Insights"
    )
    tracer.add_argument("--json", action="store_true", help="the trace as JSON")


def _add_dlq(commands: Any, common: argparse.ArgumentParser) -> None:
    letters = commands.add_parser(
        "dlq",
        help="dead letters: list them by reason, or redrive them",
        description=dlq.__doc__,
        formatter_class=_Formatter,
    )
    letter_commands = letters.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    listing = letter_commands.add_parser(
        "list", help="dead letters grouped by reason (nothing is removed)", parents=[common], formatter_class=_Formatter
    )
    listing.set_defaults(handler=_run_dlq_list)
    listing.add_argument("--queue", choices=dlq.QUEUE_CHOICES, default="all", help="which dead-letter queue")
    listing.add_argument(
        "--limit", type=_positive, default=1000, metavar="N", help="messages examined per queue (default 1000)"
    )
    listing.add_argument("--examples", type=_non_negative, default=3, metavar="N", help="examples per reason")
    listing.add_argument(
        "--bodies", action="store_true", help="show the examples' bodies (personal data; tokens stay redacted)"
    )
    listing.add_argument("--json", action="store_true", help="the report as JSON")
    redrive = letter_commands.add_parser(
        "redrive",
        help="move matching dead letters back to their source",
        description="registration DLQ -> registration queue; signup DLQ -> the bus (UserSignedUp, or the original "
        "event); refresh DLQ -> refresh queue. A letter is deleted only after it was sent back.",
        parents=[common],
        formatter_class=_Formatter,
    )
    redrive.set_defaults(handler=_run_dlq_redrive)
    redrive.add_argument(
        "--queue", choices=dlq.QUEUE_CHOICES, default="all", help="which dead-letter queue (default all but sweep)"
    )
    redrive.add_argument("--reason", action="append", default=[], metavar="R", help="only this reason (repeatable)")
    redrive.add_argument("--match", metavar="SUBSTRING", help="only letters whose body or error detail contains it")
    redrive.add_argument("--dry-run", action="store_true", help="show what would move, move nothing")
    redrive.add_argument("--limit", type=_positive, metavar="N", help="move at most N letters")
    redrive.add_argument(
        "--scan-limit", type=_positive, default=10_000, metavar="N", help="letters examined per queue (default 10000)"
    )
    redrive.add_argument("--json", action="store_true", help="the report as JSON")


def _reconcile_options(parser: argparse.ArgumentParser) -> None:
    _upstream_options(parser)
    parser.add_argument(
        "--admin-credentials-secret-arn", metavar="ARN", help="the admin account's secret (default: the stack's)"
    )
    parser.add_argument("--json", action="store_true", help="the report as JSON")


def _add_reconcile(command: _Command) -> None:
    audit = command(
        "reconcile",
        "run the drift audit now: users gone, deactivated, re-flagged or moved upstream, and ours not stored",
        "Walks the upstream's users page by page and the table once, then prints the report (exit 1 when it found "
        "drift). It takes the audit's lease: a scheduled audit in progress with the same options is continued to its "
        "end. Users gone upstream are marked GONE (no longer refreshed) unless --dry-run.",
        _run_reconcile,
    )
    audit.add_argument(
        "--instance", action="append", metavar="ALIAS", help="judge only this instance's users (repeatable)"
    )
    audit.add_argument("--dry-run", action="store_true", help="report only: change no user, publish nothing")
    audit.add_argument("--report", action="store_true", help="print the last finished audit's report, run nothing")
    _reconcile_options(audit)


def _add_bulk(commands: Any, common: argparse.ArgumentParser) -> None:
    bulk = commands.add_parser("bulk", help="bulk requests: adopt the users of lost chunks", formatter_class=_Formatter)
    bulk_commands = bulk.add_subparsers(dest="bulk_command", metavar="ACTION", required=True)
    adopt = bulk_commands.add_parser(
        "adopt",
        help="find the users a lost CreateMany answer left upstream, and store them",
        description=(
            "For each chunk of the bulk that is UNKNOWN (or CALLING past its claim): lists the instance's users "
            "created in the chunk's call window without a ClientId and not stored. Exactly the chunk's size: they are "
            "stored under the bulk and logged in within the Login budget. Anything else is reported with the "
            "candidates (exit 1), never guessed. With --retry-unmade: a chunk that provably made nobody upstream (its "
            "call window closed, and no user of it, nor any user without ClientId we do not store, created since "
            "its call began) is given back to the bulk, so that redriving the bulk's dead letter calls it again."
        ),
        parents=[common],
        formatter_class=_Formatter,
    )
    adopt.set_defaults(handler=_run_adopt)
    adopt.add_argument("request_id", metavar="REQUEST_ID", help="the bulk's RequestId")
    adopt.add_argument("--instance", default="default", metavar="ALIAS", help="the bulk's instance (default: default)")
    adopt.add_argument("--dry-run", action="store_true", help="judge each chunk and list the candidates; store nothing")
    adopt.add_argument(
        "--retry-unmade",
        action="store_true",
        help="instead of adopting: give back each lost chunk that made nobody, to be called again (dry-run first)",
    )
    _reconcile_options(adopt)


class _Context:
    """Resolves the target once, when a command first needs it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args
        self.target: Target | None = None

    def __call__(self) -> Target:
        if self.target is None:
            self.target = resolve(
                stack=self._args.stack,
                region=self._args.region,
                profile=self._args.profile,
                local=self._args.local,
                local_stack=self._args.local_stack,
            )
        return self.target


def _run_load(args: argparse.Namespace, context: _Context) -> int:
    options = load.LoadOptions(
        path=args.file,
        fmt=args.format,
        dry_run=args.dry_run,
        skip_invalid=args.skip_invalid,
        max_errors=args.max_errors,
        parallel=args.parallel,
        restart=args.restart,
        state_file=args.state_file,
        progress=not args.no_progress,
        as_json=args.json,
        wait=args.wait,
        timeout=args.timeout,
    )
    return load.run(options, context)


def _run_status(args: argparse.Namespace, context: _Context) -> int:
    options = status.StatusOptions(
        margin=args.margin, shards=args.shards, scan=not args.no_scan, segments=args.segments, as_json=args.json
    )
    return status.run(context(), options)


def _user_ref(args: argparse.Namespace) -> users.UserRef:
    return users.UserRef(client_id=args.client_id, instance=args.instance, device_token=args.device_token)


def _run_show(args: argparse.Namespace, context: _Context) -> int:
    return users.run_show(
        context(),
        _user_ref(args),
        reveal=args.reveal_tokens,
        as_json=args.json,
        upstream=users.TokenOptions(user_service_url=args.user_service_url) if args.upstream else None,
    )


def _default_min_validity(target: Target, ref: users.UserRef) -> int:
    """300 s, or half the lifetime of the user's tokens when they live shorter (the local stack's live about a
    minute: asking for 300 s would refresh on every call). The lifetime is the stored JWT's ``exp - iat``."""
    item = users.find_user(target, ref) or {}
    claims = read_jwt_claims(str(item.get("AccessToken") or "")) or {}
    with contextlib.suppress(TypeError, ValueError, KeyError):
        lifetime = int(claims["exp"]) - int(claims["iat"])
        if lifetime > 0:
            return max(1, min(DEFAULT_MIN_VALIDITY, lifetime // 2))
    return DEFAULT_MIN_VALIDITY


def _run_token(args: argparse.Namespace, context: _Context) -> int:
    ref = _user_ref(args)
    min_validity = args.min_validity if args.min_validity is not None else _default_min_validity(context(), ref)
    options = users.TokenOptions(
        min_validity=min_validity,
        wait=args.wait,
        user_service_url=args.user_service_url,
        credentials_secret_arn=args.credentials_secret_arn,
        as_json=args.json,
        verbose=args.verbose,
    )
    return users.run_token(context(), ref, options)


def _run_relogin(args: argparse.Namespace, context: _Context) -> int:
    options = users.TokenOptions(
        min_validity=0,
        wait=0.0,
        user_service_url=args.user_service_url,
        credentials_secret_arn=args.credentials_secret_arn,
        as_json=args.json,
        verbose=args.verbose,
    )
    return users.run_relogin(context(), _user_ref(args), options)


def _run_trace(args: argparse.Namespace, context: _Context) -> int:
    since = trace.parse_duration(args.since)
    target = context()
    logs: trace.LogSource
    if target.local:
        folder = target.local_path.parent if target.local_path is not None else Path(".local-stack")
        logs = trace.LocalLog(args.log_file or folder / "run.log")
    else:
        logs = trace.InsightsLogs(target.client("logs"), trace.log_groups_of(target), timeout=args.query_timeout)
    ref = (
        users.UserRef(client_id=args.client_id, instance=args.instance, device_token=args.device_token)
        if args.client_id or args.device_token
        else None
    )
    options = trace.TraceOptions(
        ref=ref,
        message_id=args.message_id,
        since_seconds=since,
        log_file=args.log_file,
        dlq_limit=args.dlq_limit,
        query_timeout=args.query_timeout,
        as_json=args.json,
    )
    return trace.run(target, logs, options)


def _run_dlq_list(args: argparse.Namespace, context: _Context) -> int:
    return dlq.run_list(
        context(), queue=args.queue, limit=args.limit, examples=args.examples, as_json=args.json, bodies=args.bodies
    )


def _run_dlq_redrive(args: argparse.Namespace, context: _Context) -> int:
    return dlq.run_redrive(
        context(),
        queue=args.queue,
        reasons=args.reason,
        match=args.match,
        dry_run=args.dry_run,
        limit=args.limit,
        scan_limit=args.scan_limit,
        as_json=args.json,
    )


def _reconcile_opts(args: argparse.Namespace) -> reconcile.ReconcileOptions:
    return reconcile.ReconcileOptions(
        user_service_url=args.user_service_url,
        credentials_secret_arn=args.credentials_secret_arn,
        admin_credentials_secret_arn=args.admin_credentials_secret_arn,
        as_json=args.json,
        verbose=args.verbose,
    )


def _run_reconcile(args: argparse.Namespace, context: _Context) -> int:
    return reconcile.run_reconcile(
        context(), _reconcile_opts(args), instances=args.instance, dry_run=args.dry_run, report_only=args.report
    )


def _run_adopt(args: argparse.Namespace, context: _Context) -> int:
    return reconcile.run_adopt(
        context(),
        _reconcile_opts(args),
        request_id=args.request_id,
        instance=args.instance,
        dry_run=args.dry_run,
        retry_unmade=args.retry_unmade,
    )


def _fail(message: str, exit_code: int) -> int:
    output.stderr().print(f"[red]{PROG}: error:[/red] {output.escape(message)}")
    return exit_code


def _client_error(exc: ClientError, context: _Context) -> int:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "Unknown"))
    message = str(error.get("Message", ""))
    operation = exc.operation_name
    if code in CREDENTIAL_CODES:
        return _fail(
            f"AWS rejected the credentials ({code}): they are missing, expired or for another account; "
            "refresh them (e.g. `aws sso login`) or pick another --profile",
            EXIT_USAGE,
        )
    if code in ACCESS_CODES:
        return _fail(f"not allowed to {operation}: {message}", EXIT_USAGE)
    if code in MISSING_CODES:
        where = context.target.description if context.target else "the stack"
        return _fail(f"{operation}: a resource of {where} does not exist ({code}: {message})", EXIT_USAGE)
    return _fail(f"{operation} failed: {code}: {message}", EXIT_DATA)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 data problems, 2 usage or configuration)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already explained
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    context = _Context(args)
    try:
        return int(args.handler(args, context))
    except CliError as exc:
        return _fail(exc.message, exc.exit_code)
    except (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError):
        return _fail(
            "no AWS credentials found: configure a profile (--profile), environment variables or SSO", EXIT_USAGE
        )
    except (TokenRetrievalError, SSOTokenLoadError, UnauthorizedSSOTokenError):
        return _fail("the AWS SSO session has expired: run `aws sso login` (with --profile as needed)", EXIT_USAGE)
    except NoRegionError:
        return _fail("no AWS region: give --region, or set AWS_REGION or a region in the profile", EXIT_USAGE)
    except (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError) as exc:
        hint = context.target.unreachable_hint if context.target else "is the region right, and the network up?"
        return _fail(f"cannot reach AWS: {exc} ({hint})", EXIT_USAGE)
    except ClientError as exc:
        return _client_error(exc, context)
    except KeyboardInterrupt:
        message = "interrupted"
        if getattr(args, "command", None) == "load":
            message += " (the checkpoint records what was sent: run the same command to continue)"
        return _fail(message, EXIT_INTERRUPTED)
    except BrokenPipeError:  # e.g. `telematics-reg status | head`
        sys.stderr.close()
        return EXIT_DATA


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
