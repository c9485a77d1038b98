"""Invoke one function of the running local stack with an event file, in-process (``sam local invoke -e``
without Docker).

Usage (from the repository root, while ``make run ARGS=--serve`` runs)::

    .venv/bin/python -m local.invoke SignupFunction events/signup.json
    .venv/bin/python -m local.invoke RegistrationQueueFunction events/queue-mixed.json

The function runs with the environment the template gives it, against the stack's moto and emulator, and is cut
off at its Timeout like any local invocation. Its JSON log lines go to stderr; the handler's result is printed on
stdout. An SQS event's ``eventSourceARN`` is set to the stack's queue of that function, as Lambda would deliver it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from local.lambda_runtime import FunctionTimeoutError, LocalFunction
from local.logs import JsonLines, configure
from local.runner import LOCAL_ENVIRONMENT
from local.stack import DEFAULT_STATE_PATH, LocalStack


def _source_queue_arn(stack: LocalStack, logical_id: str) -> str | None:
    mapping = next((m for m in stack.event_source_mappings if m.function == logical_id), None)
    return mapping.event_source_arn if mapping is not None else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m local.invoke``; returns the exit status (1 when the invocation failed)."""
    parser = argparse.ArgumentParser(prog="python -m local.invoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("function", help="the function's logical id in template.yaml, e.g. SignupFunction")
    parser.add_argument("event", type=Path, help="a JSON event file, e.g. events/signup.json")
    parser.add_argument("--stack", default=str(DEFAULT_STATE_PATH), help="the running stack (%(default)s)")
    args = parser.parse_args(argv)
    try:
        stack = LocalStack.load(args.stack)
    except FileNotFoundError:
        print(f"no local stack at {args.stack}: start one with `make run ARGS=--serve`", file=sys.stderr)
        return 2
    if args.function not in stack.functions:
        print(f"{args.function} is not a function of the stack ({', '.join(sorted(stack.functions))})", file=sys.stderr)
        return 2
    try:
        event: Any = json.loads(args.event.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"cannot read the event {args.event}: {exc}", file=sys.stderr)
        return 2
    queue_arn = _source_queue_arn(stack, args.function)
    if queue_arn and isinstance(event, dict):
        for record in event.get("Records", []):
            record["eventSourceARN"] = queue_arn

    spec = stack.functions[args.function]
    environment = {**stack.function_environment(args.function), **LOCAL_ENVIRONMENT}
    os.environ.update(environment)  # one invocation in this process: its environment is the process's
    configure(sys.stderr, level=logging.WARNING)
    logs = JsonLines(sys.stderr)
    stdout, sys.stdout = sys.stdout, logs  # what the handler prints (its logs, metric lines) goes to stderr
    try:
        assert spec.code_path is not None
        function = LocalFunction(
            spec.name,
            handler=spec.handler,
            code_path=Path(spec.code_path),
            environment=environment,
            timeout=spec.timeout,
            memory=spec.memory,
        )
        result = function.invoke(event)
    except FunctionTimeoutError as exc:
        print(f"{args.function}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the handler's error is the invocation's outcome: show it as Lambda does
        print(json.dumps({"errorType": type(exc).__name__, "errorMessage": str(exc)}), file=stdout)
        return 1
    finally:
        logs.flush()
        sys.stdout = stdout
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
