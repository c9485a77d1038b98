"""The moto server of the local stack, with DynamoDB's per-item atomicity restored.

DynamoDB applies each write (a conditional ``UpdateItem`` above all) atomically: the condition is evaluated and the
update applied as one step, so of two workers racing for the same refresh lease exactly one wins. moto's DynamoDB
backend takes no lock, and its server handles requests on threads, so two conditional writes to one item can both
pass their condition before either applies. The service relies on that atomicity (claims, leases, versioned
commits), so a local stack without it can spend a refresh token twice where AWS never would.

SQS has the same gap: moto's ``ReceiveMessage`` checks that a message is visible and then marks it received, with
no lock between the two, so two pollers receiving at once can both get the same message (measured: 1 to 3 of 1,000
messages delivered twice to 8 concurrent receivers). SQS never hands a message in flight to a second receiver
before its visibility timeout lapses; the local event source mappings rely on that, as Lambda's do.

:func:`start` serialises moto's DynamoDB requests (one at a time, as its backend assumes) and the steps of SQS that
pick, delete or re-time messages, then starts a ``ThreadedMotoServer``. moto's work is bound by one interpreter
lock anyway, so this costs little throughput. Every moto server of this project (``make run``, ``make soak``, the
tests, the benchmarks) starts through here.

Run as a module it is ``python -m moto.server`` with that fix: ``python -m local.moto_server -H 127.0.0.1 -p 5000``.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from typing import Any

from moto.dynamodb.responses import DynamoHandler
from moto.server import ThreadedMotoServer
from moto.server import main as moto_main
from moto.sqs.models import SQSBackend

_LOCK = threading.RLock()
_SQS_LOCK = threading.RLock()
_PATCHED = "_telematics_serialised"


def serialise_dynamodb() -> None:
    """Make moto handle one DynamoDB request at a time in this process (idempotent)."""
    original = DynamoHandler.call_action
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def call_action(self: DynamoHandler) -> Any:
        with _LOCK:
            return original(self)

    setattr(call_action, _PATCHED, True)
    DynamoHandler.call_action = call_action  # type: ignore[method-assign]


def serialise_sqs_receives() -> None:
    """Make moto's SQS pick each message for one receiver only, as SQS does (idempotent).

    A receive is one pass over the queue under a lock (no waiting inside it); a long poll repeats that pass until a
    message comes or its wait ends, outside the lock, so a waiting receiver never holds up the others. Deleting and
    changing visibility take the same lock, so a message is never half deleted while a receiver looks at it.
    """
    original_receive = SQSBackend.receive_message
    if getattr(original_receive, _PATCHED, False):
        return
    original_delete = SQSBackend.delete_message
    original_change = SQSBackend.change_message_visibility

    @functools.wraps(original_receive)
    def receive_message(
        self: SQSBackend,
        queue_name: str,
        count: int,
        wait_seconds_timeout: int,
        visibility_timeout: int,
        message_attribute_names: list[str] | None = None,
    ) -> list[Any]:
        deadline = time.monotonic() + (wait_seconds_timeout or 0)
        while True:
            with _SQS_LOCK:
                received = original_receive(self, queue_name, count, 0, visibility_timeout, message_attribute_names)
            remaining = deadline - time.monotonic()
            if received or remaining <= 0:
                return received
            self.get_queue(queue_name).wait_for_messages(min(remaining, 0.2))  # type: ignore[arg-type]

    @functools.wraps(original_delete)
    def delete_message(self: SQSBackend, queue_name: str, receipt_handle: str) -> None:
        with _SQS_LOCK:
            original_delete(self, queue_name, receipt_handle)

    @functools.wraps(original_change)
    def change_message_visibility(
        self: SQSBackend, queue_name: str, receipt_handle: str, visibility_timeout: int
    ) -> None:
        with _SQS_LOCK:
            original_change(self, queue_name, receipt_handle, visibility_timeout)

    setattr(receive_message, _PATCHED, True)
    SQSBackend.receive_message = receive_message  # type: ignore[method-assign]
    SQSBackend.delete_message = delete_message  # type: ignore[method-assign]
    SQSBackend.change_message_visibility = change_message_visibility  # type: ignore[method-assign]


def start() -> ThreadedMotoServer:
    """A moto server on a free loopback port, DynamoDB and SQS receives serialised; ``get_host_and_port()`` tells
    where."""
    serialise_dynamodb()
    serialise_sqs_receives()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    return server


def endpoint(server: ThreadedMotoServer) -> str:
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}"


def main(argv: list[str] | None = None) -> None:
    """``python -m moto.server`` with DynamoDB and SQS receives serialised."""
    serialise_dynamodb()
    serialise_sqs_receives()
    moto_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
