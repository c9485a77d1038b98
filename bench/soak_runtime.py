"""The soak's event runner: :class:`local.runner.LocalRuntime` in a process of its own, so that ``bench/soak.py`` can
kill it abruptly (SIGKILL) in the middle of a run and start a new one against the same moto server and emulator.

Started by ``bench/soak.py`` only::

    python bench/soak_runtime.py --state STACK.json --options '{"schedule_interval": 5, ...}' \\
        --log-file runner-1.log --events-file runner-1.events.jsonl --twin

It runs the stack's SQS pollers, rule taps and schedule exactly as ``make run`` does, plus a **second sweeper**: a
twin of ``RefreshSweeperFunction`` (same code and environment, its own module instance, so its own clients) started
together with every scheduled sweep, so that two sweeps overlap as two schedules (or a late retried fire and the
next one) would in AWS. Every
sweep of either sweeper is appended to ``--events-file`` (JSON lines: which sweeper, start, end, its report), and the
runtime's counters are written there every few seconds: a killed runner leaves what it did up to its death.

With ``--clock-offset S`` every clock the functions read (``time.time``) runs S seconds ahead of the host's, as a
worker whose clock drifted would: the soak runs such a runner beside the normal one, so that two fleets of workers
whose clocks differ take and judge the same leases and claims.

It prints ``ready`` on stdout once polling, then runs until SIGTERM (a clean stop: running invocations finish).
Its handlers' logs (Powertools JSON, as in CloudWatch) go to ``--log-file``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any, TextIO


def _skew_clock(argv: list[str]) -> None:
    """Move ``time.time`` ahead by ``--clock-offset`` seconds, before the library is imported: its services take
    ``clock=time.time`` as a default argument, bound when their module is first imported."""
    if "--clock-offset" not in argv:
        return
    offset = float(argv[argv.index("--clock-offset") + 1])
    host_clock = time.time

    def skewed() -> float:
        return host_clock() + offset

    time.time = skewed


_skew_clock(sys.argv)

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "layers" / "telematics"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from local.demo import _redirect_stdout_logging  # noqa: E402
from local.lambda_runtime import LocalFunction  # noqa: E402
from local.runner import LocalRuntime, RuntimeOptions  # noqa: E402
from local.stack import LocalStack  # noqa: E402

SWEEPER = "RefreshSweeperFunction"
READY = "ready"


class EventLog:
    """Appends JSON lines (flushed at once: the process may be killed at any moment)."""

    def __init__(self, path: Path) -> None:
        self._file: TextIO = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, kind: str, **values: Any) -> None:
        line = json.dumps({"kind": kind, "at": time.time(), **values}, default=str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def record_sweeps(
    function: LocalFunction, sweeper: str, events: EventLog, *, with_twin: LocalFunction | None = None
) -> None:
    """Wrap ``function.invoke`` so each sweep is logged with its start, end and report.

    With ``with_twin``, each sweep also starts the twin sweeper at the same moment (unless the twin's previous sweep
    is still running: it has reserved concurrency 1 too), so every scheduled sweep overlaps a second one: two
    sweepers reading the same due users and racing to queue them.
    """
    invoke = function.invoke
    twin_busy = threading.Lock()

    def run_twin() -> None:
        try:
            assert with_twin is not None
            with_twin.invoke({"source": "soak.twin-schedule"})
        except Exception:
            logging.getLogger("soak.runner").exception("the twin sweep failed")
        finally:
            twin_busy.release()

    def logged(event: Any) -> Any:
        if with_twin is not None and twin_busy.acquire(blocking=False):
            threading.Thread(target=run_twin, name="twin-sweep", daemon=True).start()
        started = time.time()
        report: Any = None
        error: str | None = None
        try:
            report = invoke(event)
            return report
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            events.write("sweep", sweeper=sweeper, start=started, end=time.time(), report=report, error=error)

    function.invoke = logged  # type: ignore[method-assign]


def twin_sweeper(runtime: LocalRuntime) -> LocalFunction:
    """A second instance of the sweeper function: same handler, code and environment, separate module and clients."""
    spec = runtime.stack.functions[SWEEPER]
    original = runtime.functions[SWEEPER]
    assert spec.code_path is not None
    return LocalFunction(
        f"{spec.name}-twin",
        handler=spec.handler,
        code_path=Path(spec.code_path),
        environment=original.environment,
        timeout=spec.timeout,
        memory=spec.memory,
    ).warm()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", type=Path, required=True, help="the stack description (LocalStack.save)")
    parser.add_argument("--options", default="{}", help="RuntimeOptions as JSON")
    parser.add_argument("--log-file", type=Path, required=True)
    parser.add_argument("--events-file", type=Path, required=True)
    parser.add_argument("--twin", action="store_true", help="fire a second sweeper with every scheduled sweep")
    parser.add_argument("--clock-offset", type=float, default=0.0, help="this runner's clock ahead of the host's, s")
    args = parser.parse_args(argv)

    log_stream = args.log_file.open("a", encoding="utf-8")
    logging.basicConfig(
        level=logging.INFO, stream=log_stream, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    events = EventLog(args.events_file)
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    out = sys.stdout
    runtime = LocalRuntime(LocalStack.load(args.state), RuntimeOptions(**json.loads(args.options))).start()
    try:
        # What the handlers print (Powertools' JSON lines) goes to the log file, as Lambda's stdout goes to CloudWatch.
        _redirect_stdout_logging(log_stream)
        sys.stdout = log_stream
        twin = None
        if args.twin:
            twin = twin_sweeper(runtime)
            record_sweeps(twin, "twin", events)
        record_sweeps(runtime.functions[SWEEPER], "schedule", events, with_twin=twin)
        events.write("started", clock_offset=args.clock_offset)
        print(READY, file=out, flush=True)
        while not stop.wait(3.0):
            events.write("stats", stats=asdict(runtime.stats()))
    finally:
        runtime.stop()
        events.write("stats", stats=asdict(runtime.stats()))
        events.write("stopped")
        events.close()
        sys.stdout = out
        log_stream.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
