"""The moto server of the local stack, with DynamoDB's per-item atomicity restored.

DynamoDB applies each write (a conditional ``UpdateItem`` above all) atomically: the condition is evaluated and the
update applied as one step, so of two workers racing for the same refresh lease exactly one wins. moto's DynamoDB
backend takes no lock, and its server handles requests on threads, so two conditional writes to one item can both
pass their condition before either applies. The service relies on that atomicity (claims, leases, versioned
commits), so a local stack without it can spend a refresh token twice where AWS never would.

:func:`start` serialises moto's DynamoDB requests (one at a time, as its backend assumes), then starts a
``ThreadedMotoServer``. moto's work is bound by one interpreter lock anyway, so this costs little throughput.
Every moto server of this project (``make run``, ``make soak``, the tests, the benchmarks) starts through here.

Run as a module it is ``python -m moto.server`` with that fix: ``python -m local.moto_server -H 127.0.0.1 -p 5000``.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from typing import Any

from moto.dynamodb.responses import DynamoHandler
from moto.server import ThreadedMotoServer
from moto.server import main as moto_main

_LOCK = threading.RLock()
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


def start() -> ThreadedMotoServer:
    """A moto server on a free loopback port, DynamoDB serialised; ``get_host_and_port()`` tells where."""
    serialise_dynamodb()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    return server


def endpoint(server: ThreadedMotoServer) -> str:
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}"


def main(argv: list[str] | None = None) -> None:
    """``python -m moto.server`` with DynamoDB serialised."""
    serialise_dynamodb()
    moto_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
