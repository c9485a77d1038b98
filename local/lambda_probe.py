"""Runs one function of the built artifact (``.aws-sam/build``) the way Lambda's Python runtime would, in a fresh
interpreter, and reports what it saw as JSON.

Run it with the runtime's Python and nothing on ``sys.path`` but that interpreter's own packages (boto3, like the
Lambda runtime): ``python -P local/lambda_probe.py plan.json``. It uses the standard library only, so it proves
that the function's folder plus the layer are all the code a function needs.

The plan (JSON) says what to do:

- ``{"mode": "baseline", "output": ...}``: ``import boto3`` and create one client (the figure a cold start of a
  function is compared with);
- ``{"mode": "function", "function_dir": ..., "layer_dir": ..., "handler": "module.function", "events": [...],
  "memory": 256, "timeout": 60, "setup": true, "output": ...}``: put the function's folder, then the layer's
  ``python`` folder, first on ``sys.path`` (``/var/task``, then ``/opt/python``, as Lambda does), import the
  handler's module, run its ``warm()`` (the first invocation's set-up) unless ``setup`` is false, then invoke it
  once per event with a Lambda-like context.

The report holds the import and set-up times (wall and CPU), each invocation's wall and CPU time, its result (or
the exception's type and message, as Lambda reports a failed invocation), the process's peak resident memory (after
the import, after the set-up, after each invocation, at the end), and where boto3, botocore and the handler's
modules were loaded from.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any


class LambdaContext:
    """The attributes of Lambda's context object that handlers and Powertools read."""

    def __init__(self, function_name: str, memory: int, timeout: int) -> None:
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = memory
        self.aws_request_id = str(uuid.uuid4())
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{function_name}"
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = "probe"
        self._deadline = time.monotonic() + timeout

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    """Peak resident memory of this process, as Lambda's "Max Memory Used" counts it.

    VmHWM belongs to this program's address space; ``ru_maxrss`` would not do: Linux keeps it across exec, so a
    probe started by a large test process would report that process's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _origin(module: str) -> str | None:
    loaded = sys.modules.get(module)
    return getattr(loaded, "__file__", None) if loaded is not None else None


def baseline() -> dict[str, Any]:
    started, cpu = time.perf_counter(), _cpu_seconds()
    import boto3  # noqa: PLC0415 - the import is what is timed

    boto3.client("sqs")
    return {
        "import_ms": (time.perf_counter() - started) * 1000,
        "import_cpu_ms": (_cpu_seconds() - cpu) * 1000,
        "boto3": _origin("boto3"),
    }


def function(plan: dict[str, Any]) -> dict[str, Any]:
    # As on Lambda: the function's folder, then the layer's, before the runtime's own packages.
    sys.path[:0] = [plan["function_dir"], plan["layer_dir"]]
    module_name, handler_name = str(plan["handler"]).rsplit(".", 1)
    started, cpu = time.perf_counter(), _cpu_seconds()
    module = importlib.import_module(module_name)
    import_ms, import_cpu_ms = (time.perf_counter() - started) * 1000, (_cpu_seconds() - cpu) * 1000
    handler = getattr(module, handler_name)
    modules_after_import = len(sys.modules)
    import_peak_mb = _peak_rss_mb()
    # The first invocation's set-up (settings, clients, the services a handler builds once per container) is timed
    # on its own through the handler module's warm(): exactly what its first invocation would do before its work.
    setup_ms = setup_cpu_ms = None
    warm = getattr(module, "warm", None)
    if plan.get("setup", True) and callable(warm):
        started, cpu = time.perf_counter(), _cpu_seconds()
        warm()
        setup_ms, setup_cpu_ms = (time.perf_counter() - started) * 1000, (_cpu_seconds() - cpu) * 1000
    setup_peak_mb = _peak_rss_mb()

    invocations: list[dict[str, Any]] = []
    for event in plan.get("events", []):
        context = LambdaContext(os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "probe"), plan["memory"], plan["timeout"])
        cpu, wall = _cpu_seconds(), time.perf_counter()
        outcome: dict[str, Any]
        try:
            outcome = {"result": handler(event, context)}
        except Exception as exc:  # noqa: BLE001 - reported as Lambda reports a failed invocation
            outcome = {"error": {"type": type(exc).__name__, "message": str(exc)}}
        outcome |= {
            "ms": (time.perf_counter() - wall) * 1000,
            "cpu_ms": (_cpu_seconds() - cpu) * 1000,
            "peak_mb": _peak_rss_mb(),  # the process's peak so far: after this invocation
        }
        invocations.append(outcome)
    return {
        "import_ms": import_ms,
        "import_cpu_ms": import_cpu_ms,
        "setup_ms": setup_ms,
        "setup_cpu_ms": setup_cpu_ms,
        "import_peak_mb": import_peak_mb,
        "setup_peak_mb": setup_peak_mb,
        "modules_after_import": modules_after_import,
        "invocations": invocations,
        "handler_module": _origin(module_name),
        "boto3": _origin("boto3"),
        "botocore": _origin("botocore"),
        "pydantic": _origin("pydantic"),
        "telematics_reg": _origin("telematics_reg"),
        "modules": sorted(name for name in sys.modules if "." not in name),
    }


def main(argv: list[str]) -> int:
    plan: dict[str, Any] = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    report = baseline() if plan["mode"] == "baseline" else function(plan)
    report["max_rss_mb"] = _peak_rss_mb()
    report["python"] = list(sys.version_info[:3])
    report["dont_write_bytecode"] = sys.dont_write_bytecode
    Path(plan["output"]).write_text(json.dumps(report, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
