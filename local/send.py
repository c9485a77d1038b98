"""Feed a running local stack by hand, through the AWS APIs only (the stack found in ``.local-stack/stack.json``).

Usage (from the repository root, while ``make run ARGS=--serve`` runs)::

    .venv/bin/python -m local.send signup '{"ClientId": "c-1", "FirstName": "Ada"}'   # put_events UserSignedUp
    .venv/bin/python -m local.send message '{"ClientId": "c-2"}'                       # one queue message
    .venv/bin/python -m local.send load registrations.jsonl                            # a file onto the queue
    .venv/bin/python -m local.send bulk 25                                             # a Quantity message

A file holds one message body per line (JSON Lines), or a JSON array of bodies. Bodies are sent as written:
a line that is not valid JSON is sent too, and the service dead-letters it with its reason.

``--wait`` (after the command) reports what became of each message instead of its id: registered, duplicate,
or dead-lettered with its reason (``--timeout`` seconds at most; exit status 1 unless every one was registered)::

    .venv/bin/python -m local.send message '{"ClientId": "c-2"}' --wait
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import boto3

from local.stack import DEFAULT_STATE_PATH, DUMMY_CREDENTIALS, LocalStack

#: The ``detail-type`` of signup events (design contract); their ``source`` is the SignupEventSource parameter.
SIGNUP_DETAIL_TYPE: Final = "UserSignedUp"
_BATCH: Final = 10  # entries per PutEvents and per SendMessageBatch call


class SendError(Exception):
    """AWS refused some entries, or the input cannot be read."""


def client(stack: LocalStack, service: str) -> Any:
    """A boto3 client of the local stack's moto server (dummy credentials: real ones never reach it)."""
    return boto3.client(
        service,
        endpoint_url=stack.endpoint_url,
        region_name=stack.region,
        aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=DUMMY_CREDENTIALS["AWS_SESSION_TOKEN"],
    )


def publish_signups(stack: LocalStack, details: Iterable[Mapping[str, Any]], *, events: Any = None) -> list[str]:
    """Publish one ``UserSignedUp`` event per detail on the stack's signup bus, as the customer's app does.

    Parameters
    ----------
    stack
        The local stack (bus and source come from its parameters).
    details
        Registration requests (the events' ``detail``).
    events
        An EventBridge client to reuse; one is made when ``None``.

    Returns
    -------
    list[str]
        The event ids, in order.

    Raises
    ------
    SendError
        EventBridge refused an entry.
    """
    events = events or client(stack, "events")
    entries = [
        {
            "EventBusName": stack.parameters["SignupEventBusName"],
            "Source": stack.parameters["SignupEventSource"],
            "DetailType": SIGNUP_DETAIL_TYPE,
            "Detail": json.dumps(dict(detail)),
        }
        for detail in details
    ]
    ids: list[str] = []
    for start in range(0, len(entries), _BATCH):
        response = events.put_events(Entries=entries[start : start + _BATCH])
        if response.get("FailedEntryCount"):
            codes = sorted({str(e.get("ErrorCode")) for e in response["Entries"] if e.get("ErrorCode")})
            raise SendError(f"EventBridge refused {response['FailedEntryCount']} events: {', '.join(codes)}")
        ids.extend(str(entry["EventId"]) for entry in response["Entries"])
    return ids


def send_messages(
    stack: LocalStack, bodies: Sequence[str | Mapping[str, Any]], *, queue: str = "RegistrationQueue", sqs: Any = None
) -> list[str]:
    """Send message bodies to a queue of the stack, ten per ``SendMessageBatch`` call.

    Parameters
    ----------
    stack
        The local stack.
    bodies
        Strings are sent as they are; mappings as JSON.
    queue
        Logical id of the queue in template.yaml.
    sqs
        An SQS client to reuse; one is made when ``None``.

    Returns
    -------
    list[str]
        The message ids, in order.

    Raises
    ------
    SendError
        SQS refused an entry (twice).
    """
    sqs = sqs or client(stack, "sqs")
    url = stack.queue_url(queue)
    texts = [body if isinstance(body, str) else json.dumps(dict(body)) for body in bodies]
    ids: list[str] = []
    for start in range(0, len(texts), _BATCH):
        entries = [{"Id": str(i), "MessageBody": text} for i, text in enumerate(texts[start : start + _BATCH])]
        sent: dict[str, str] = {}
        for _ in range(2):
            response = sqs.send_message_batch(QueueUrl=url, Entries=entries)
            sent |= {item["Id"]: item["MessageId"] for item in response.get("Successful", [])}
            entries = [e for e in entries if e["Id"] not in sent]
            if not entries:
                break
        else:
            raise SendError(f"SQS refused {len(entries)} messages: {response.get('Failed')}")
        ids.extend(sent[str(i)] for i in range(len(sent)))
    return ids


def read_bodies(path: str | Path) -> list[str]:
    """Message bodies of a file: a JSON array of bodies, or one body per non-empty line (JSON Lines).

    Example
    -------
    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
    ...     _ = f.write('{"ClientId": "a"}\\n\\n{"ClientId": "b"}\\n')
    >>> read_bodies(f.name)
    ['{"ClientId": "a"}', '{"ClientId": "b"}']
    >>> os.unlink(f.name)
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SendError(
            f"cannot read {path}: no such file. Write one message body per line first, for example:\n"
            f"""  printf '%s\\n' '{{"ClientId": "customer-9"}}' '{{"ClientId": "customer-10"}}' > {path}"""
        ) from None
    except IsADirectoryError:
        raise SendError(f"cannot read {path}: it is a directory") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise SendError(f"{path}: starts like a JSON array but is not valid JSON: {exc}") from None
        return [item if isinstance(item, str) else json.dumps(item) for item in items]
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_file(stack: LocalStack, path: str | Path, *, sqs: Any = None) -> list[str]:
    """Put every body of a file (see :func:`read_bodies`) on the registration queue; returns the message ids."""
    return send_messages(stack, read_bodies(path), sqs=sqs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m local.send", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stack", default=str(DEFAULT_STATE_PATH), help="stack description saved by make run (%(default)s)"
    )
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument(
        "--wait", action="store_true", help="report registered / duplicate / dead-lettered for each message"
    )
    waiting.add_argument("--timeout", type=float, default=60.0, help="with --wait: seconds at most (%(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    signup = commands.add_parser("signup", help="publish UserSignedUp events (one per JSON detail)", parents=[waiting])
    signup.add_argument("detail", nargs="+", help="a registration request as JSON")
    message = commands.add_parser("message", help="send message bodies to the registration queue", parents=[waiting])
    message.add_argument("body", nargs="+", help="a message body (sent as given)")
    load = commands.add_parser("load", help="send a file of bodies (JSON Lines or a JSON array)", parents=[waiting])
    load.add_argument("file")
    bulk = commands.add_parser("bulk", help="send one bulk request for QUANTITY anonymous users", parents=[waiting])
    bulk.add_argument("quantity", type=int)
    bulk.add_argument("--instance", default="default")
    bulk.add_argument("--request-id", help="idempotency key of the bulk request")
    return parser


def _request(body: str | Mapping[str, Any]) -> dict[str, Any]:
    """What a body asks for, as far as ``--wait`` needs it (Instance, ClientId or RequestId, Quantity)."""
    try:
        data = json.loads(body) if isinstance(body, str) else dict(body)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    keys = {str(key).lower(): value for key, value in data.items()}
    fields = keys.get("userfields") if isinstance(keys.get("userfields"), dict) else {}
    client_id = keys.get("clientid", (fields or {}).get("ClientId"))
    return {
        "instance": str(keys.get("instance") or "default"),
        "client_id": str(client_id) if client_id is not None and "quantity" not in keys else None,
        "request_id": str(keys["requestid"]) if keys.get("requestid") is not None else None,
    }


def _detail(text: str) -> dict[str, Any]:
    detail = json.loads(text)
    if not isinstance(detail, dict):
        raise SendError(f'a signup event\'s detail is a JSON object, e.g. \'{{"ClientId": "c-1"}}\', not {text}')
    return detail


class _Waiter:
    """``--wait``: notes which ClientIds are stored before sending, then reports what became of each message."""

    def __init__(self, stack_path: str, bodies: Sequence[str | Mapping[str, Any]]) -> None:
        from telematics_cli.target import from_local  # noqa: PLC0415 - only --wait needs the CLI's watcher
        from telematics_cli.watch import RegistrationWatch, SentRow  # noqa: PLC0415

        self.rows = [SentRow(label=str(n), message_id="", **_request(body)) for n, body in enumerate(bodies, 1)]
        self.watch = RegistrationWatch(from_local(Path(stack_path)))
        self.watch.before_send(self.rows)

    def report(self, ids: Sequence[str], timeout: float) -> int:
        """0 when every message was registered (or found its user already registered)."""
        from telematics_cli.watch import summary  # noqa: PLC0415

        for row, message_id in zip(self.rows, ids, strict=True):
            row.message_id = message_id
        print(f"waiting up to {timeout:.0f} s for what becomes of them ...", flush=True)
        self.watch.wait(self.rows, timeout=timeout)
        for row in self.rows:
            print(f"  {row.message_id}  {row.status:<13} {row.detail}")
        counts = summary(self.rows)
        print(", ".join(f"{count} {status}" for status, count in sorted(counts.items())))
        return 0 if set(counts) <= {"registered", "duplicate"} else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m local.send``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        stack = LocalStack.load(args.stack)
    except FileNotFoundError:
        print(f"no local stack at {args.stack}: start one with `make run ARGS=--serve`", file=sys.stderr)
        return 2
    try:
        bodies: list[str | Mapping[str, Any]]
        if args.command == "signup":
            bodies = [_detail(text) for text in args.detail]
        elif args.command == "message":
            bodies = list(args.body)
        elif args.command == "load":
            bodies = list(read_bodies(args.file))
        else:
            body: dict[str, Any] = {"Quantity": args.quantity, "Instance": args.instance}
            if args.request_id or args.wait:
                # Waiting needs the bulk's id: the service keeps its progress under it.
                body["RequestId"] = args.request_id or f"send-{uuid.uuid4()}"
            bodies = [body]
        waiter = _Waiter(args.stack, bodies) if args.wait else None
        if args.command == "signup":
            ids = publish_signups(stack, [detail for detail in bodies if isinstance(detail, Mapping)])
            print(f"published {len(ids)} UserSignedUp event(s) on bus {stack.parameters['SignupEventBusName']}:")
        else:
            ids = send_messages(stack, bodies)
            if args.command == "bulk":
                print(f"sent a bulk request for {args.quantity} user(s) to the registration queue")
            else:
                source = f" from {args.file}" if args.command == "load" else ""
                print(f"sent {len(ids)} message(s){source} to the registration queue")
        if waiter is not None:
            return waiter.report(ids, args.timeout)
    except (SendError, ValueError, OSError) as exc:
        print(f"local.send: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - most often the stack is no longer running: say so plainly
        print(f"local.send: {type(exc).__name__}: {exc} (is the local stack still running?)", file=sys.stderr)
        return 1
    for identifier in ids:
        print(f"  {identifier}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
