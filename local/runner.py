"""The service's event routing, run locally and in-process, with the event shapes and failure semantics of AWS.

moto holds the resources of template.yaml (see :mod:`local.stack`) but cannot run Lambda code, deliver an
EventBridge event to a function or fire a schedule. :class:`LocalRuntime` does those three things for a
provisioned :class:`~local.stack.LocalStack`:

* **SQS event source mappings.** ``MaximumConcurrency`` pollers per mapping (each one invocation at a time),
  batches of up to ``BatchSize`` records gathered for up to ``MaximumBatchingWindowInSeconds``, received with the
  queue's own visibility timeout (as Lambda's pollers do; a queue whose timeout is shorter than the function's is
  refused, as Lambda refuses the mapping), the real SQS event shape, and partial batch responses read as Lambda
  reads them: a record listed in ``batchItemFailures`` (or every record, when the invocation fails or overruns its
  ``Timeout``) is *not* deleted and comes back when its visibility timeout lapses; SQS itself (moto, like AWS)
  moves it to the dead-letter queue after ``maxReceiveCount`` receives. A record that succeeded is deleted and
  never delivered again.
* **EventBridge rules.** moto matches the pattern and delivers into an SQS *tap* queue
  (:attr:`~local.stack.RuleTargetSpec.tap_queue_url`); the runtime polls it and hands each event to the target
  function as an asynchronous invocation. A target that cannot be invoked at all is retried by the rule's
  ``RetryPolicy`` and then sent to its ``DeadLetterConfig`` queue, with EventBridge's error attributes.
* **Schedules.** A timer fires each EventBridge Scheduler schedule at its ``rate()`` (or at an interval given
  in :class:`RuntimeOptions`, so a demo need not wait five minutes) as an asynchronous invocation.

Asynchronous invocations follow Lambda: a function error is retried up to the function's
``EventInvokeConfig.MaximumRetryAttempts`` (default 2) while the event is younger than
``MaximumEventAgeInSeconds``, then the event goes to the ``OnFailure`` destination as Lambda's invocation
record (``requestContext.condition``, ``requestPayload``, ``responsePayload.errorType`` ...).

Each function runs with the environment the template gives it (:meth:`LocalStack.function_environment`), plus
:data:`LOCAL_ENVIRONMENT`, and is stopped at its ``Timeout`` (:mod:`local.lambda_runtime`): the invocation fails
as a timed-out one does on Lambda (its records come back, an asynchronous event is retried, then sent to its
destination). Every invocation ends with one log line of the runtime's (``invocation finished``: the function,
its request id, the SQS message ids or the event id, and the outcome), which ``telematics-reg trace`` reads as
the deliveries of a message. What is deliberately approximated is listed in :data:`APPROXIMATIONS`.

Example
-------
    stack = provision(moto_url, parameters={"UserServiceUrl": emulator_url}, instance_credentials=credentials)
    with LocalRuntime(stack, RuntimeOptions(schedule_interval=5, failure_visibility_timeout=2)) as runtime:
        ...                      # put_events / send_message through the AWS APIs; the handlers run here
        runtime.stats().idle     # nothing running, queued or waiting to be retried
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import heapq
import itertools
import json
import logging
import math
import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, cast

import boto3
from aws_lambda_powertools.utilities import parameters as powertools_parameters
from botocore.config import Config
from moto.events.models import EventPattern  # the pattern syntax of Lambda's filter criteria too

from local import moto_server
from local.emulator.testing import EmulatorHandle, running_emulator
from local.lambda_runtime import STRAGGLER_SECONDS, FunctionTimeoutError, LocalFunction, last_request_id
from local.stack import (
    DEFAULT_REGION,
    DEFAULT_STACK_NAME,
    DUMMY_CREDENTIALS,
    EventSourceMappingSpec,
    LocalStack,
    RuleSpec,
    RuleTargetSpec,
    ScheduleSpec,
    provision,
)

log = logging.getLogger("local.runner")

REPO_ROOT: Final = Path(__file__).resolve().parents[1]

#: Set for every function locally: no CloudWatch metrics (EMF lines on stdout) and no X-Ray segments.
LOCAL_ENVIRONMENT: Final[Mapping[str, str]] = MappingProxyType(
    {"POWERTOOLS_METRICS_DISABLED": "true", "POWERTOOLS_TRACE_DISABLED": "true"}
)

#: Lambda's defaults for asynchronous invocation when a function has no EventInvokeConfig.
DEFAULT_ASYNC_RETRIES: Final = 2
DEFAULT_ASYNC_MAX_AGE: Final = 21600

#: Where the local runtime knowingly differs from AWS.
APPROXIMATIONS: Final = (
    "pollers per SQS mapping are fixed at MaximumConcurrency (Lambda scales up to it gradually)",
    "a handler that overruns its Timeout fails at once, as on Lambda, but its threads stop at their next Python"
    " instruction: a socket read finishes first (up to its client's timeout), a sleep ends first; no outside call"
    " starts after the cut-off, and a thread still running "
    f"{STRAGGLER_SECONDS:.0f} s later is logged and counted (FunctionStats.stragglers)",
    "asynchronous retries wait RuntimeOptions.async_retry_delay (doubling) instead of about 1 and 2 minutes",
    "failed SQS records may be made visible again sooner (RuntimeOptions.failure_visibility_timeout)",
    "schedules support rate(...) expressions, or any expression with RuntimeOptions.schedule_interval",
    "an event a rule delivered stays in flight in its tap queue until its asynchronous invocation is finished, as in"
    " Lambda's durable event queue; one abandoned at stop (or lost with a killed runtime) comes back when that"
    " message's visibility lapses, and is invoked afresh (its retry count starts again)",
    "at stop, asynchronous events not yet running are abandoned (see above); schedule fires are not kept: the next"
    " fire redoes a sweep",
)

_RATE: Final = re.compile(r"^rate\(\s*(\d+)\s+(minute|minutes|hour|hours|day|days)\s*\)$")
_RATE_UNITS: Final[Mapping[str, int]] = MappingProxyType(
    {"minute": 60, "minutes": 60, "hour": 3600, "hours": 3600, "day": 86400, "days": 86400}
)
_SQS_RECEIVE_MAX: Final = 10


class LocalRuntimeError(Exception):
    """The stack cannot be run locally (a function without local code, an unusable option)."""


# --------------------------------------------------------------------------------------------- options, stats


@dataclass(frozen=True)
class RuntimeOptions:
    """How the local runtime runs the stack's event sources.

    Parameters
    ----------
    failure_visibility_timeout
        Seconds a failed SQS record stays invisible before it is received again. ``None`` keeps the queue's
        own visibility timeout, as Lambda does (360 s in the template: a local run would appear stuck).
    poll_wait_seconds
        Long-poll wait of each receive (Lambda uses 20 s; short, so that :meth:`LocalRuntime.stop` is quick).
    async_retry_delay
        Wait before the first retry of a failed asynchronous invocation; doubles for each further retry.
    schedule_interval
        Fire every schedule at this interval (seconds) instead of its own expression.
    default_maximum_concurrency
        Pollers of an SQS mapping without ``ScalingConfig.MaximumConcurrency``.
    async_concurrency
        Asynchronous invocations of one function that run at once (fewer if it has reserved concurrency).
    environment
        Extra variables for every function (after the template's and :data:`LOCAL_ENVIRONMENT`).
    function_environment
        Extra variables per function logical id (after ``environment``).
    """

    failure_visibility_timeout: int | None = None
    poll_wait_seconds: int = 1
    async_retry_delay: float = 1.0
    schedule_interval: float | None = None
    default_maximum_concurrency: int = 5
    async_concurrency: int = 4
    environment: Mapping[str, str] = field(default_factory=dict)
    function_environment: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.failure_visibility_timeout is not None and not 0 <= self.failure_visibility_timeout <= 43200:
            raise LocalRuntimeError("failure_visibility_timeout must be 0..43200 seconds (SQS's range)")
        if not 0 <= self.poll_wait_seconds <= 20:
            raise LocalRuntimeError("poll_wait_seconds must be 0..20 (SQS's long-poll range)")
        if self.schedule_interval is not None and self.schedule_interval <= 0:
            raise LocalRuntimeError("schedule_interval must be positive")
        if self.default_maximum_concurrency < 1 or self.async_concurrency < 1:
            raise LocalRuntimeError("concurrencies must be at least 1")


@dataclass
class FunctionStats:
    """What one function did so far."""

    invocations: int = 0
    errors: int = 0
    timeouts: int = 0
    #: Invocations of the function running right now.
    in_flight: int = 0
    #: Timed-out invocations with a thread still running long after the cut-off (see APPROXIMATIONS).
    stragglers: int = 0
    #: SQS records delivered to the function, and those that failed (reported, or with their whole batch).
    records: int = 0
    records_failed: int = 0
    #: SQS records deleted unseen because no filter pattern of the mapping matched them.
    records_filtered: int = 0


@dataclass
class RuntimeStats:
    """A snapshot of the runtime's counters (see :meth:`LocalRuntime.stats`)."""

    functions: dict[str, FunctionStats] = field(default_factory=dict)
    #: Invocations running right now.
    in_flight: int = 0
    #: Asynchronous events accepted and not finished: queued, running, or waiting for a retry.
    async_pending: int = 0
    async_pending_by_function: dict[str, int] = field(default_factory=dict)
    async_retries: int = 0
    #: Invocation records sent, per destination ARN.
    async_destinations: dict[str, int] = field(default_factory=dict)
    #: Asynchronous events that failed for good with no OnFailure destination (Lambda discards them too).
    async_discarded: int = 0
    #: Events a rule or schedule could not deliver at all, sent to its dead-letter queue.
    deliveries_dead_lettered: int = 0
    schedule_fires: dict[str, int] = field(default_factory=dict)
    #: Asynchronous retries dropped because the runtime stopped first.
    abandoned: int = 0

    @property
    def idle(self) -> bool:
        """Nothing running, queued or waiting for an asynchronous retry (SQS queues are not looked at)."""
        return self.in_flight == 0 and self.async_pending == 0

    def busy(self, logical_id: str) -> bool:
        """One function is running, or has asynchronous events queued or waiting for a retry."""
        return self.function(logical_id).in_flight > 0 or self.async_pending_by_function.get(logical_id, 0) > 0

    def function(self, logical_id: str) -> FunctionStats:
        """The counters of one function (zeros if it never ran)."""
        return self.functions.get(logical_id, FunctionStats())


# --------------------------------------------------------------------------------------------- event shapes


def schedule_period(expression: str) -> float | None:
    """Seconds between fires of a ``rate(...)`` expression; ``None`` for ``cron(...)``/``at(...)``.

    Example
    -------
    >>> schedule_period("rate(5 minutes)")
    300.0
    >>> schedule_period("cron(0 12 * * ? *)") is None
    True
    """
    match = _RATE.match(expression.strip())
    if match is None:
        return None
    return float(int(match.group(1)) * _RATE_UNITS[match.group(2)])


def _message_attribute(value: Mapping[str, Any]) -> dict[str, Any]:
    """One SQS message attribute in the form Lambda's event uses (camelCase, binaries base64)."""

    def b64(data: Any) -> str:
        return base64.b64encode(data if isinstance(data, bytes) else str(data).encode()).decode()

    converted: dict[str, Any] = {
        "stringListValues": list(value.get("StringListValues", [])),
        "binaryListValues": [b64(item) for item in value.get("BinaryListValues", [])],
        "dataType": value.get("DataType", "String"),
    }
    if "StringValue" in value:
        converted["stringValue"] = value["StringValue"]
    if "BinaryValue" in value:
        converted["binaryValue"] = b64(value["BinaryValue"])
    return converted


def sqs_record(message: Mapping[str, Any], *, queue_arn: str, region: str) -> dict[str, Any]:
    """The record Lambda puts in an SQS event for a message received with all its attributes.

    Parameters
    ----------
    message
        One message of ``ReceiveMessage`` (``AttributeNames=["All"]``, ``MessageAttributeNames=["All"]``).
    queue_arn, region
        The source queue (``eventSourceARN``) and its region (``awsRegion``).

    Returns
    -------
    dict
        ``messageId``, ``receiptHandle``, ``body``, ``attributes``, ``messageAttributes``, ``md5OfBody``,
        ``eventSource``, ``eventSourceARN``, ``awsRegion`` (and ``md5OfMessageAttributes`` when there are any).
    """
    attributes = dict(message.get("Attributes", {}))
    record: dict[str, Any] = {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message.get("Body", ""),
        "attributes": attributes,
        "messageAttributes": {
            name: _message_attribute(value) for name, value in message.get("MessageAttributes", {}).items()
        },
        "md5OfBody": message.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": region,
    }
    if "MD5OfMessageAttributes" in message:
        record["md5OfMessageAttributes"] = message["MD5OfMessageAttributes"]
    return record


def failed_message_ids(response: Any, message_ids: Sequence[str], *, report_batch_item_failures: bool) -> set[str]:
    """The records of a batch that failed, read from a successful invocation's response as Lambda reads it.

    Without ``ReportBatchItemFailures`` every record succeeded. With it, an empty or null response or
    ``batchItemFailures`` means success; a failure whose ``itemIdentifier`` is missing, empty or not a
    message of the batch makes Lambda treat the *whole* batch as failed.

    Example
    -------
    >>> sorted(failed_message_ids({"batchItemFailures": [{"itemIdentifier": "b"}]}, ["a", "b"],
    ...                           report_batch_item_failures=True))
    ['b']
    >>> sorted(failed_message_ids({"batchItemFailures": [{"itemIdentifier": "zz"}]}, ["a", "b"],
    ...                           report_batch_item_failures=True))
    ['a', 'b']
    """
    if not report_batch_item_failures or response is None or response in ("", {}):
        return set()
    everything = set(message_ids)
    if not isinstance(response, Mapping):
        return everything  # not a valid partial batch response: Lambda fails the batch
    failures = response.get("batchItemFailures")
    if failures is None:
        return set()
    if not isinstance(failures, list):
        return everything
    failed: set[str] = set()
    for item in failures:
        identifier = item.get("itemIdentifier") if isinstance(item, Mapping) else None
        if not isinstance(identifier, str) or identifier not in everything:
            return everything
        failed.add(identifier)
    return failed


def invocation_record(
    *,
    function_arn: str,
    request_id: str,
    condition: str,
    approximate_invoke_count: int,
    event: Any,
    error: BaseException | None = None,
    result: Any = None,
) -> dict[str, Any]:
    """Lambda's record of an asynchronous invocation, as it sends it to an OnSuccess/OnFailure destination.

    Parameters
    ----------
    function_arn
        The function (``:$LATEST`` is appended, as Lambda does for an unqualified invocation).
    request_id
        The request id of the last attempt.
    condition
        ``Success``, ``RetriesExhausted`` or ``EventAgeExceeded``.
    approximate_invoke_count
        Attempts made.
    event
        The event (``requestPayload``).
    error, result
        The last attempt's exception (for a failure), or its result (for a success).

    Returns
    -------
    dict
        ``version``, ``timestamp``, ``requestContext``, ``requestPayload``, ``responseContext``,
        ``responsePayload``.
    """
    response_context: dict[str, Any] = {"statusCode": 200, "executedVersion": "$LATEST"}
    payload: Any = result
    if error is not None:
        response_context["functionError"] = "Unhandled"
        payload = {
            "errorMessage": str(error),
            "errorType": type(error).__name__,
            "requestId": request_id,
            "stackTrace": traceback.format_tb(error.__traceback__)[-5:],
        }
    return {
        "version": "1.0",
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "requestContext": {
            "requestId": request_id,
            "functionArn": f"{function_arn}:$LATEST",
            "condition": condition,
            "approximateInvokeCount": approximate_invoke_count,
        },
        "requestPayload": event,
        "responseContext": response_context,
        "responsePayload": payload,
    }


def _json_path(document: Any, path: str) -> Any:
    """The value an EventBridge ``InputPath`` (``$`` or ``$.a.b``) selects."""
    if path in {"", "$"}:
        return document
    if not path.startswith("$."):
        raise LocalRuntimeError(f"InputPath {path!r} is not supported locally (only $.a.b paths)")
    value = document
    for part in path[2:].split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _string_attributes(values: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    return {name: {"DataType": "String", "StringValue": str(value)} for name, value in values.items()}


# --------------------------------------------------------------------------------------------- internals


class _Timers:
    """One thread that runs callbacks when they are due (schedules, asynchronous retries)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None], Callable[[], None] | None]] = []
        self._order = itertools.count()
        self._condition = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="local-runtime-timers", daemon=True)

    def start(self) -> None:
        """Start the timer thread."""
        self._thread.start()

    def call_later(
        self, delay: float, callback: Callable[[], None], *, on_drop: Callable[[], None] | None = None
    ) -> bool:
        """Run ``callback`` in ``delay`` seconds (``on_drop`` instead if stopped first); False if stopped."""
        with self._condition:
            if self._stopped:
                return False
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._order), callback, on_drop))
            self._condition.notify()
        return True

    def stop(self) -> None:
        """Stop (a running callback finishes first); callbacks still waiting get their ``on_drop``."""
        with self._condition:
            self._stopped = True
            dropped = [on_drop for *_, on_drop in self._heap if on_drop is not None]
            self._heap.clear()
            self._condition.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        for on_drop in dropped:
            on_drop()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._condition.wait(timeout)
                if self._stopped:
                    return
                _, _, callback, _ = heapq.heappop(self._heap)
            try:
                callback()
            except Exception:  # a broken callback must not stop every schedule and retry
                log.exception("timer callback failed")


@dataclass
class _AsyncEvent:
    """An event accepted for asynchronous invocation (Lambda's internal queue holds these)."""

    function: str
    event: Any
    accepted_at: float = field(default_factory=time.time)
    attempts: int = 0
    #: Called once the event is finished with (succeeded, or sent to its destination, or discarded); never when it
    #: is abandoned at stop. A rule's delivery deletes its tap message here: until then the event is not lost.
    on_finished: Callable[[], None] | None = None


@dataclass
class _Outcome:
    result: Any = None
    error: BaseException | None = None
    request_id: str = ""
    duration: float = 0.0


# --------------------------------------------------------------------------------------------- the runtime


class LocalRuntime:
    """Runs a provisioned stack's SQS mappings, rule targets and schedules against its functions, in-process.

    Parameters
    ----------
    stack
        The provisioned stack (:func:`local.stack.provision` or :meth:`LocalStack.load`).
    options
        How to run it; the defaults follow AWS where a local run can.

    Notes
    -----
    Handlers build their clients once, on their cold start, from their own environment (:meth:`start` warms
    every function). Some clients are built later, outside that environment: Powertools' Secrets Manager
    provider, for one, is created on the first secret read and kept for the process. :meth:`start` therefore
    also sets the variables every function shares (moto's endpoint, dummy credentials, region,
    :data:`LOCAL_ENVIRONMENT`) process-wide and clears Powertools' provider cache; :meth:`stop` restores both.
    Run one runtime per process at a time.

    Example
    -------
    >>> runtime = LocalRuntime(stack, RuntimeOptions(schedule_interval=5)).start()  # doctest: +SKIP
    >>> runtime.stats().function("SignupFunction").invocations  # doctest: +SKIP
    0
    >>> runtime.stop()  # doctest: +SKIP
    """

    def __init__(self, stack: LocalStack, options: RuntimeOptions | None = None) -> None:
        self.stack = stack
        self.options = options or RuntimeOptions()
        self.functions: dict[str, LocalFunction] = {}
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._timers = _Timers()
        self._lock = threading.Lock()
        self._stats = RuntimeStats()
        self._saved_environment: dict[str, str | None] | None = None
        self._started = False
        self._stopped = False
        self._sqs: Any = None
        self._events: Any = None
        #: Visibility timeout of each polled queue (its own attribute, read at start).
        self._visibility: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalRuntime:
        """Warm every function and start the pollers and timers; returns ``self``.

        Raises
        ------
        LocalRuntimeError
            A function has no local code, or an event source names a function the stack does not have.
        """
        if self._started:
            raise LocalRuntimeError("the runtime was already started (make a new one)")
        self._started = True
        self._set_shared_environment()
        try:
            session = boto3.session.Session(
                aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                aws_session_token=DUMMY_CREDENTIALS["AWS_SESSION_TOKEN"],
                region_name=self.stack.region,
            )
            config = Config(max_pool_connections=64, retries={"mode": "standard", "max_attempts": 5})
            self._sqs = session.client("sqs", endpoint_url=self.stack.endpoint_url, config=config)
            self._events = session.client("events", endpoint_url=self.stack.endpoint_url, config=config)
            for logical_id in self.stack.functions:
                self.functions[logical_id] = self._load_function(logical_id)
            self._timers.start()
            for mapping in self.stack.event_source_mappings:
                self._start_mapping(mapping)
            for rule in self.stack.rules:
                self._start_rule(rule)
            for schedule in self.stack.schedules:
                self._start_schedule(schedule)
        except BaseException:
            self.stop()
            raise
        log.info(
            "local runtime started: %d functions, %d pollers",
            len(self.functions),
            len(self._threads),
        )
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop polling and firing, let running invocations finish, then restore the process environment.

        Parameters
        ----------
        timeout
            Most seconds to wait for each poller; ``None`` waits as long as a function's timeout allows.
        """
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        # Pollers first (each finishes the batch in hand), then the timers (no new schedule fire or retry), then
        # the asynchronous invocations already running (those still queued are abandoned, see _attempt_async).
        join_timeout = timeout if timeout is not None else max((f.timeout for f in self.functions.values()), default=60)
        for thread in self._threads:
            thread.join(join_timeout + self.options.poll_wait_seconds + 5)
        self._timers.stop()
        for executor in self._executors.values():
            executor.shutdown(wait=True)
        self._restore_shared_environment()
        log.info("local runtime stopped")

    def __enter__(self) -> LocalRuntime:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stats(self) -> RuntimeStats:
        """A consistent copy of the counters."""
        with self._lock:
            for logical_id, function in self.functions.items():
                if function.stragglers:
                    self._stats.functions.setdefault(logical_id, FunctionStats()).stragglers = function.stragglers
            return copy.deepcopy(self._stats)

    def wait_until_idle(self, timeout: float, *, settle: float = 0.5) -> bool:
        """Wait until nothing runs or waits for an asynchronous retry for ``settle`` seconds in a row.

        Queues are not looked at: check them through SQS. Returns False on timeout.
        """
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            if self.stats().idle:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= settle:
                    return True
            else:
                quiet_since = None
            time.sleep(0.05)
        return False

    # ------------------------------------------------------------------ environment

    def _shared_environment(self) -> dict[str, str]:
        return {
            **DUMMY_CREDENTIALS,
            "AWS_ENDPOINT_URL": self.stack.endpoint_url,
            "AWS_REGION": self.stack.region,
            "AWS_DEFAULT_REGION": self.stack.region,
            **LOCAL_ENVIRONMENT,
        }

    def _set_shared_environment(self) -> None:
        values = self._shared_environment()
        self._saved_environment = {key: os.environ.get(key) for key in values}
        os.environ.update(values)
        # Powertools keeps one Secrets Manager client per process, made with the endpoint of its time.
        powertools_parameters.clear_caches()  # type: ignore[no-untyped-call]

    def _restore_shared_environment(self) -> None:
        if self._saved_environment is None:
            return
        for key, value in self._saved_environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_environment = None
        powertools_parameters.clear_caches()  # type: ignore[no-untyped-call]

    def _load_function(self, logical_id: str) -> LocalFunction:
        spec = self.stack.functions[logical_id]
        if spec.code_path is None:
            raise LocalRuntimeError(f"{logical_id} has no local code (inline or image code cannot run here)")
        environment = {
            **self.stack.function_environment(logical_id),
            **LOCAL_ENVIRONMENT,
            **self.options.environment,
            **self.options.function_environment.get(logical_id, {}),
        }
        return LocalFunction(
            spec.name,
            handler=spec.handler,
            code_path=Path(spec.code_path),
            environment=environment,
            timeout=spec.timeout,
            memory=spec.memory,
        ).warm()

    # ------------------------------------------------------------------ invocation

    def _function(self, logical_id: str | None, where: str) -> LocalFunction:
        if logical_id is None or logical_id not in self.functions:
            raise LocalRuntimeError(f"{where} targets {logical_id or 'a function outside the template'}")
        return self.functions[logical_id]

    @contextlib.contextmanager
    def _counting(self, logical_id: str) -> Iterator[FunctionStats]:
        with self._lock:
            stats = self._stats.functions.setdefault(logical_id, FunctionStats())
            stats.invocations += 1
            stats.in_flight += 1
            self._stats.in_flight += 1
        try:
            yield stats
        finally:
            with self._lock:
                stats.in_flight -= 1
                self._stats.in_flight -= 1

    def _invoke(self, logical_id: str, event: Any) -> _Outcome:
        """One invocation; an error (or overrunning the timeout) comes back in ``_Outcome.error``."""
        function = self.functions[logical_id]
        outcome = _Outcome()
        started = time.monotonic()
        with self._counting(logical_id) as stats:
            try:
                outcome.result = function.invoke(event)
            except Exception as exc:  # noqa: BLE001 - the handler's error is the invocation's outcome, as in Lambda
                outcome.error = exc
            outcome.request_id = last_request_id()
            outcome.duration = time.monotonic() - started
            if outcome.error is not None:
                with self._lock:
                    stats.errors += 1
                    stats.timeouts += isinstance(outcome.error, FunctionTimeoutError)
        return outcome

    def _log_invocation(self, logical_id: str, outcome: _Outcome, result: str, **ids: Any) -> None:
        """The runtime's line for one finished invocation (Lambda's END/REPORT lines, with what was delivered)."""
        error = outcome.error
        log.log(
            logging.WARNING if error is not None else logging.INFO,
            "invocation finished: %s",
            result,
            extra={
                "function_name": self.functions[logical_id].name,
                "function_request_id": outcome.request_id,
                "outcome": result,
                "duration_ms": round(outcome.duration * 1000),
                **({"error": f"{type(error).__name__}: {error}"} if error is not None else {}),
                **ids,
            },
        )

    # ------------------------------------------------------------------ SQS event source mappings

    def _start_mapping(self, mapping: EventSourceMappingSpec) -> None:
        if not mapping.enabled:
            log.info("%s is disabled: not polled", mapping.logical_id)
            return
        if mapping.queue_url is None:
            raise LocalRuntimeError(f"{mapping.logical_id}: only SQS event sources of the template can run locally")
        function = self._function(mapping.function, mapping.logical_id)
        attributes = self._sqs.get_queue_attributes(QueueUrl=mapping.queue_url, AttributeNames=["VisibilityTimeout"])
        visibility = int(attributes["Attributes"].get("VisibilityTimeout", "30"))
        if visibility < function.timeout:
            # Lambda refuses such a mapping: a batch still running would be delivered again to another poller.
            raise LocalRuntimeError(
                f"{mapping.logical_id}: the queue's visibility timeout ({visibility} s) is shorter than "
                f"{mapping.function}'s timeout ({function.timeout} s)"
            )
        self._visibility[mapping.queue_url] = visibility
        pollers = mapping.maximum_concurrency or self.options.default_maximum_concurrency
        for index in range(pollers):
            self._spawn(f"{mapping.logical_id}-{index}", lambda: self._poll_mapping(mapping))

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _receive(self, queue_url: str, count: int, wait: int) -> list[dict[str, Any]]:
        visibility = self._visibility.get(queue_url)
        messages: list[dict[str, Any]] = self._sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=max(1, min(_SQS_RECEIVE_MAX, count)),
            WaitTimeSeconds=wait,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
            # An event source mapping's records stay invisible for the queue's own timeout, as Lambda receives them.
            **({"VisibilityTimeout": visibility} if visibility is not None else {}),
        ).get("Messages", [])
        return messages

    def _poll_mapping(self, mapping: EventSourceMappingSpec) -> None:
        assert mapping.queue_url is not None
        while not self._stopping.is_set():
            try:
                batch = self._gather(mapping.queue_url, mapping.batch_size, mapping.batching_window)
                if batch:
                    self._process_batch(mapping, batch)
            except Exception:  # moto hiccup or a bug here: keep polling, as Lambda's pollers do
                log.exception("%s: polling failed", mapping.logical_id)
                self._stopping.wait(1.0)

    def _gather(self, queue_url: str, batch_size: int, window: int) -> list[dict[str, Any]]:
        """Up to ``batch_size`` messages, waiting at most ``window`` seconds after the first for more."""
        batch = self._receive(queue_url, batch_size, self.options.poll_wait_seconds)
        if not batch:
            return batch
        deadline = time.monotonic() + window
        while len(batch) < batch_size and not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            more = self._receive(queue_url, batch_size - len(batch), min(int(remaining), 1))
            if more:
                batch.extend(more)
            elif remaining < 1:
                time.sleep(min(remaining, 0.2))
        return batch

    def _process_batch(self, mapping: EventSourceMappingSpec, batch: list[dict[str, Any]]) -> None:
        assert mapping.queue_url is not None
        records = [sqs_record(m, queue_arn=mapping.event_source_arn, region=self.stack.region) for m in batch]
        if mapping.filter_patterns:
            kept = [r for r in records if _matches_any(mapping.filter_patterns, r)]
            dropped = [r for r in records if r not in kept]
            # Lambda deletes the records no filter matches, without invoking the function.
            self._delete(mapping.queue_url, dropped)
            with self._lock:
                self._stats.functions.setdefault(mapping.function, FunctionStats()).records_filtered += len(dropped)
            records = kept
            if not records:
                return
        ids = [r["messageId"] for r in records]
        outcome = self._invoke(mapping.function, {"Records": records})
        if outcome.error is not None:
            failed = set(ids)
        else:
            failed = failed_message_ids(
                outcome.result,
                ids,
                report_batch_item_failures="ReportBatchItemFailures" in mapping.function_response_types,
            )
        if isinstance(outcome.error, FunctionTimeoutError):
            result = "timed out"
        elif outcome.error is not None:
            result = "failed"
        else:
            result = "partial" if failed else "succeeded"
        self._log_invocation(
            mapping.function,
            outcome,
            result,
            invocation_type="SQS",
            message_ids=ids,
            failed_message_ids=sorted(failed),
            receive_counts={r["messageId"]: int(r["attributes"].get("ApproximateReceiveCount", "1")) for r in records},
        )
        # Succeeded records are deleted; failed ones are left for SQS to deliver again (and to redrive).
        self._delete(mapping.queue_url, [r for r in records if r["messageId"] not in failed])
        if failed and self.options.failure_visibility_timeout is not None:
            self._change_visibility(
                mapping.queue_url,
                [r for r in records if r["messageId"] in failed],
                self.options.failure_visibility_timeout,
            )
        with self._lock:
            stats = self._stats.functions.setdefault(mapping.function, FunctionStats())
            stats.records += len(records)
            stats.records_failed += len(failed)

    def _delete(self, queue_url: str, records: Sequence[Mapping[str, Any]]) -> None:
        for start in range(0, len(records), _SQS_RECEIVE_MAX):
            chunk = records[start : start + _SQS_RECEIVE_MAX]
            response = self._sqs.delete_message_batch(
                QueueUrl=queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": r["receiptHandle"]} for i, r in enumerate(chunk)],
            )
            for failure in response.get("Failed", []):
                log.warning("could not delete a message from %s: %s", queue_url, failure.get("Message"))

    def _change_visibility(self, queue_url: str, records: Sequence[Mapping[str, Any]], seconds: int) -> None:
        for start in range(0, len(records), _SQS_RECEIVE_MAX):
            chunk = records[start : start + _SQS_RECEIVE_MAX]
            self._sqs.change_message_visibility_batch(
                QueueUrl=queue_url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": r["receiptHandle"], "VisibilityTimeout": seconds}
                    for i, r in enumerate(chunk)
                ],
            )

    # ------------------------------------------------------------------ EventBridge rules (via tap queues)

    def _start_rule(self, rule: RuleSpec) -> None:
        if rule.state != "ENABLED":
            log.info("rule %s is %s: not polled", rule.name, rule.state)
            return
        if rule.schedule_expression is not None:
            log.warning("rule %s is a scheduled rule: not fired locally (use a ScheduleV2 event)", rule.name)
            return
        for target in rule.targets:
            if target.tap_queue_url is None:
                log.info("rule %s target %s is delivered by moto itself", rule.name, target.id)
                continue
            self._spawn(f"{rule.logical_id}-{target.id}", functools.partial(self._poll_tap, rule, target))

    def _poll_tap(self, rule: RuleSpec, target: RuleTargetSpec) -> None:
        assert target.tap_queue_url is not None
        while not self._stopping.is_set():
            try:
                for message in self._receive(target.tap_queue_url, _SQS_RECEIVE_MAX, self.options.poll_wait_seconds):
                    self._deliver_rule_event(rule, target, message)
            except Exception:
                log.exception("rule %s: polling its tap failed", rule.name)
                self._stopping.wait(1.0)

    def _deliver_rule_event(self, rule: RuleSpec, target: RuleTargetSpec, message: Mapping[str, Any]) -> None:
        """Hand one matched event to its target as an asynchronous invocation (EventBridge's part)."""
        assert target.tap_queue_url is not None
        event = json.loads(message["Body"])
        if target.input is not None:
            event = json.loads(target.input)
        elif target.input_path is not None:
            event = _json_path(event, target.input_path)
        attempts = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
        try:
            self._function(target.function, f"rule {rule.name}")
        except LocalRuntimeError as exc:
            # Delivery failed: EventBridge retries by the target's RetryPolicy, then dead-letters the event.
            policy = target.retry_policy or {}
            sent = int(message.get("Attributes", {}).get("SentTimestamp", "0")) / 1000
            too_old = time.time() - sent >= policy.get("MaximumEventAgeInSeconds", 86400)
            if attempts <= policy.get("MaximumRetryAttempts", 185) and not too_old:
                delay = min(900, math.ceil(self.options.async_retry_delay * 2 ** (attempts - 1)))
                self._sqs.change_message_visibility(
                    QueueUrl=target.tap_queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=delay
                )
                return
            self._dead_letter_delivery(
                target.dead_letter_arn,
                message["Body"],
                {
                    "RULE_ARN": rule.arn,
                    "TARGET_ARN": target.arn,
                    "ERROR_CODE": "ResourceNotFoundException",
                    "ERROR_MESSAGE": str(exc),
                    "EXHAUSTED_RETRY_CONDITION": "MaximumEventAgeInSeconds" if too_old else "MaximumRetryAttempts",
                    "RETRY_ATTEMPTS": attempts - 1,
                },
            )
        else:
            assert target.function is not None
            # Lambda's asynchronous queue is durable: an accepted event survives the crash of the function or of
            # the poller. Locally the tap message plays that part: it stays in flight (for as long as Lambda may
            # keep the event) and is deleted only once the event is finished with. If this runtime dies (or stops
            # with the event waiting for a retry), the message comes back when that visibility lapses.
            url, receipt = target.tap_queue_url, message["ReceiptHandle"]
            self._sqs.change_message_visibility(
                QueueUrl=url, ReceiptHandle=receipt, VisibilityTimeout=self._async_hold(target.function)
            )
            self._accept_async(
                target.function,
                event,
                on_finished=lambda: self._sqs.delete_message(QueueUrl=url, ReceiptHandle=receipt),
            )
            return
        self._sqs.delete_message(QueueUrl=target.tap_queue_url, ReceiptHandle=message["ReceiptHandle"])

    def _async_hold(self, logical_id: str) -> int:
        """Seconds Lambda may hold an asynchronous event of this function: its maximum age, plus a last run."""
        config = self.stack.event_invoke_configs.get(logical_id, {})
        max_age = int(config.get("MaximumEventAgeInSeconds", DEFAULT_ASYNC_MAX_AGE))
        return min(43200, max_age + self.functions[logical_id].timeout + 60)

    def _dead_letter_delivery(self, dead_letter_arn: str | None, body: str, attributes: Mapping[str, Any]) -> None:
        if dead_letter_arn is None:
            log.error("an event could not be delivered and has no dead-letter queue: dropped (%s)", attributes)
            return
        self._sqs.send_message(
            QueueUrl=self._queue_url(dead_letter_arn),
            MessageBody=body,
            MessageAttributes=_string_attributes(attributes),
        )
        with self._lock:
            self._stats.deliveries_dead_lettered += 1

    # ------------------------------------------------------------------ schedules

    def _start_schedule(self, schedule: ScheduleSpec) -> None:
        if schedule.state != "ENABLED":
            log.info("schedule %s is %s: not fired", schedule.name, schedule.state)
            return
        period = self.options.schedule_interval or schedule_period(schedule.expression)
        if period is None:
            log.warning(
                "schedule %s (%s) is not fired locally: only rate() expressions are, or give schedule_interval",
                schedule.name,
                schedule.expression,
            )
            return
        self._timers.call_later(period, lambda: self._fire_schedule(schedule, period))

    def _fire_schedule(self, schedule: ScheduleSpec, period: float, attempt: int = 0) -> None:
        if attempt == 0:
            # The next fire is due whatever becomes of this one.
            self._timers.call_later(period, lambda: self._fire_schedule(schedule, period))
            with self._lock:
                self._stats.schedule_fires[schedule.logical_id] = (
                    self._stats.schedule_fires.get(schedule.logical_id, 0) + 1
                )
        event = json.loads(schedule.input) if schedule.input else {}
        try:
            self._function(schedule.function, f"schedule {schedule.name}")
        except LocalRuntimeError as exc:
            policy = schedule.retry_policy or {}
            if attempt < policy.get("MaximumRetryAttempts", 185):
                delay = self.options.async_retry_delay * 2**attempt
                self._timers.call_later(delay, lambda: self._fire_schedule(schedule, period, attempt + 1))
                return
            self._dead_letter_delivery(
                schedule.dead_letter_arn,
                json.dumps(event),
                {
                    "SCHEDULE_ARN": schedule.arn,
                    "TARGET_ARN": schedule.target_arn,
                    "ERROR_CODE": "ResourceNotFoundException",
                    "ERROR_MESSAGE": str(exc),
                    "EXHAUSTED_RETRY_CONDITION": "MaximumRetryAttempts",
                    "RETRY_ATTEMPTS": attempt,
                },
            )
            return
        assert schedule.function is not None
        self._accept_async(schedule.function, event)

    # ------------------------------------------------------------------ asynchronous invocation

    def _executor(self, logical_id: str) -> ThreadPoolExecutor:
        with self._lock:
            executor = self._executors.get(logical_id)
            if executor is None:
                reserved = self.stack.functions[logical_id].reserved_concurrency
                workers = min(self.options.async_concurrency, reserved or self.options.async_concurrency)
                executor = ThreadPoolExecutor(max(1, workers), thread_name_prefix=f"async-{logical_id}")
                self._executors[logical_id] = executor
            return executor

    def _count_pending(self, logical_id: str, delta: int) -> None:
        with self._lock:
            self._stats.async_pending += delta
            by_function = self._stats.async_pending_by_function
            by_function[logical_id] = by_function.get(logical_id, 0) + delta

    def _accept_async(self, logical_id: str, event: Any, *, on_finished: Callable[[], None] | None = None) -> None:
        """Lambda accepted the event into its asynchronous queue (the caller's delivery succeeded)."""
        self._count_pending(logical_id, 1)
        self._executor(logical_id).submit(self._attempt_async, _AsyncEvent(logical_id, event, on_finished=on_finished))

    def _attempt_async(self, pending: _AsyncEvent) -> None:
        if self._stopping.is_set():
            # Stopping: an event that has not started yet is left where it came from instead of holding up the stop
            # (a rule's event comes back through its tap; a schedule's next fire redoes a sweep).
            self._abandon(pending)
            return
        finished = True
        try:
            finished = self._run_async(pending)
        except Exception:
            log.exception("asynchronous invocation of %s could not be handled", pending.function)
        finally:
            if finished:
                self._count_pending(pending.function, -1)
                if pending.on_finished is not None:
                    try:
                        pending.on_finished()
                    except Exception:  # the event was handled; only its bookkeeping failed (it may come back)
                        log.exception("%s: could not finish an asynchronous event's delivery", pending.function)

    def _run_async(self, pending: _AsyncEvent) -> bool:
        """One attempt; returns False when a retry was scheduled (the event is still pending)."""
        config = self.stack.event_invoke_configs.get(pending.function, {})
        retries = int(config.get("MaximumRetryAttempts", DEFAULT_ASYNC_RETRIES))
        max_age = int(config.get("MaximumEventAgeInSeconds", DEFAULT_ASYNC_MAX_AGE))
        destinations = config.get("DestinationConfig", {})
        outcome = self._invoke(pending.function, pending.event)
        pending.attempts += 1
        event_id = pending.event.get("id") if isinstance(pending.event, Mapping) else None
        self._log_invocation(
            pending.function,
            outcome,
            "succeeded"
            if outcome.error is None
            else "timed out"
            if isinstance(outcome.error, FunctionTimeoutError)
            else "failed",
            invocation_type="Event",
            attempt=pending.attempts,
            **({"event_id": event_id, "correlation_id": event_id} if event_id else {}),
        )
        if outcome.error is None:
            success = destinations.get("OnSuccess", {}).get("Destination")
            if success:
                self._send_record(success, pending, outcome, "Success")
            return True
        delay = self.options.async_retry_delay * 2 ** (pending.attempts - 1)
        age = time.time() - pending.accepted_at
        if pending.attempts <= retries and age + delay < max_age:
            if self._timers.call_later(
                delay, lambda: self._retry_async(pending), on_drop=lambda: self._abandon(pending)
            ):
                with self._lock:
                    self._stats.async_retries += 1
            else:
                self._abandon(pending)  # stopping: not a failure of the event, so no destination either
            return False
        condition = "RetriesExhausted" if pending.attempts > retries else "EventAgeExceeded"
        failure = destinations.get("OnFailure", {}).get("Destination")
        if failure:
            self._send_record(failure, pending, outcome, condition)
        else:
            log.error(
                "%s: asynchronous event discarded after %d attempts (%s)", pending.function, pending.attempts, condition
            )
            with self._lock:
                self._stats.async_discarded += 1
        return True

    def _abandon(self, pending: _AsyncEvent) -> None:
        log.warning("%s: an asynchronous event not finished was abandoned at stop", pending.function)
        with self._lock:
            self._stats.abandoned += 1
        self._count_pending(pending.function, -1)

    def _retry_async(self, pending: _AsyncEvent) -> None:
        if self._stopping.is_set():
            self._abandon(pending)
            return
        self._executor(pending.function).submit(self._attempt_async, pending)

    def _send_record(self, destination: str, pending: _AsyncEvent, outcome: _Outcome, condition: str) -> None:
        record = invocation_record(
            function_arn=self.stack.functions[pending.function].arn,
            request_id=outcome.request_id,
            condition=condition,
            approximate_invoke_count=pending.attempts,
            event=pending.event,
            error=outcome.error,
            result=outcome.result,
        )
        service = destination.split(":")[2]
        if service == "sqs":
            self._sqs.send_message(QueueUrl=self._queue_url(destination), MessageBody=json.dumps(record, default=str))
        elif service == "events":
            success = condition == "Success"
            self._events.put_events(
                Entries=[
                    {
                        "EventBusName": destination,
                        "Source": "lambda",
                        "DetailType": f"Lambda Function Invocation Result - {'Success' if success else 'Failure'}",
                        "Detail": json.dumps(record, default=str),
                    }
                ]
            )
        elif service == "lambda":
            target = next((lid for lid, spec in self.stack.functions.items() if spec.arn == destination), None)
            self._function(target, "an invocation destination")
            assert target is not None
            self._accept_async(target, record)
        else:
            log.error("destination %s is not supported locally: the invocation record is dropped", destination)
            return
        with self._lock:
            self._stats.async_destinations[destination] = self._stats.async_destinations.get(destination, 0) + 1

    def _queue_url(self, arn: str) -> str:
        for attributes in self.stack.attributes.values():
            if attributes.get("Arn") == arn and "QueueUrl" in attributes:
                return attributes["QueueUrl"]
        _, _, _, _, account, name = arn.split(":", 5)
        url: str = self._sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]
        return url


def _matches_any(patterns: Sequence[str], record: Mapping[str, Any]) -> bool:
    """Whether an SQS record matches one of a mapping's filter patterns (the body is matched as JSON)."""
    view = dict(record)
    with contextlib.suppress(ValueError):
        view["body"] = json.loads(record["body"])
    return any(EventPattern.load(pattern).matches_event(cast(Any, view)) for pattern in patterns)


# --------------------------------------------------------------------------------------------- the whole service


class LocalService:
    """The whole service on this machine: moto, the User Service emulator, the template's resources, the runtime.

    Parameters
    ----------
    template_path
        The SAM template (provisioned by :func:`local.stack.provision`).
    stack_name, region
        Where in moto; moto's state is per process, so two services in one process need different ones.
    parameters
        Template parameters (``UserServiceUrl`` is always the emulator's URL).
    instances
        The emulator's instances (``{"alias": {"InstanceId", "InstanceKey"}}``); generated when ``None``.
    unknown_instances
        Aliases added to the credentials secret only: the emulator does not know them, so their calls are
        answered 401 (a revoked or mistyped instance key).
    token_lifetime
        Lifetime of the emulator's access tokens, seconds.
    emulator_faults
        The emulator's fault configuration at start (as ``PUT /_emulator/faults``).
    options
        The runtime's options.
    state_path
        Where to save the stack description (:meth:`LocalStack.save`) for other processes; ``None``: not saved.
    prepare_stack
        Called with the provisioned stack before it is saved and run: a demo that shortens its functions'
        ``Timeout`` and timing settings does it here, so the runtime, the saved description and the CLI agree.

    Example
    -------
    >>> with LocalService(options=RuntimeOptions(schedule_interval=5)) as service:  # doctest: +SKIP
    ...     service.stack.outputs["RegistrationQueueUrl"]
    """

    def __init__(
        self,
        *,
        template_path: str | os.PathLike[str] = REPO_ROOT / "template.yaml",
        stack_name: str = DEFAULT_STACK_NAME,
        region: str = DEFAULT_REGION,
        parameters: Mapping[str, str] | None = None,
        instances: Mapping[str, Mapping[str, str]] | None = None,
        unknown_instances: Mapping[str, Mapping[str, str]] | None = None,
        token_lifetime: int | None = None,
        emulator_faults: Mapping[str, Any] | None = None,
        options: RuntimeOptions | None = None,
        state_path: str | os.PathLike[str] | None = None,
        prepare_stack: Callable[[LocalStack], None] | None = None,
    ) -> None:
        self.prepare_stack = prepare_stack
        self.template_path = Path(template_path)
        self.stack_name = stack_name
        self.region = region
        self.parameters = dict(parameters or {})
        self.instances = {alias: dict(value) for alias, value in (instances or {}).items()} or None
        self.unknown_instances = {alias: dict(value) for alias, value in (unknown_instances or {}).items()}
        self.token_lifetime = token_lifetime
        self.emulator_faults = emulator_faults
        self.options = options or RuntimeOptions()
        self.state_path = Path(state_path) if state_path is not None else None
        self._exit = ExitStack()
        self._stack: LocalStack | None = None
        self._runtime: LocalRuntime | None = None
        self._emulator: EmulatorHandle | None = None

    @property
    def stack(self) -> LocalStack:
        """The provisioned stack (after :meth:`start`)."""
        if self._stack is None:
            raise LocalRuntimeError("the service is not started")
        return self._stack

    @property
    def runtime(self) -> LocalRuntime:
        """The running :class:`LocalRuntime` (after :meth:`start`)."""
        if self._runtime is None:
            raise LocalRuntimeError("the service is not started")
        return self._runtime

    @property
    def emulator(self) -> EmulatorHandle:
        """The User Service emulator (after :meth:`start`)."""
        if self._emulator is None:
            raise LocalRuntimeError("the service is not started")
        return self._emulator

    def start(self) -> LocalService:
        """Start moto and the emulator, provision the template, save the stack, start the runtime."""
        try:
            moto = moto_server.start()
            self._exit.callback(moto.stop)
            host, port = moto.get_host_and_port()
            emulator = self._exit.enter_context(
                running_emulator(
                    instances={alias: dict(value) for alias, value in self.instances.items()}
                    if self.instances
                    else None,
                    token_lifetime=self.token_lifetime,
                    faults=self.emulator_faults,
                )
            )
            self._emulator = emulator
            credentials = {**emulator.instances, **self.unknown_instances}
            self._stack = provision(
                f"http://{host}:{port}",
                template_path=self.template_path,
                parameters={**self.parameters, "UserServiceUrl": emulator.url},
                stack_name=self.stack_name,
                region=self.region,
                instance_credentials=credentials,
                admin_credentials=emulator.admin_account,
            )
            if self.prepare_stack is not None:
                self.prepare_stack(self._stack)
            if self.state_path is not None:
                self._stack.save(self.state_path)
                self._exit.callback(self._forget_state)
            self._runtime = LocalRuntime(self._stack, self.options).start()
            self._exit.callback(self._runtime.stop)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the runtime (running invocations finish), then the emulator and moto; idempotent."""
        self._exit.close()

    def _forget_state(self) -> None:
        # The saved description names a moto server that is going away: leave no stale pointer behind.
        if self.state_path is not None:
            self.state_path.unlink(missing_ok=True)

    def __enter__(self) -> LocalService:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
