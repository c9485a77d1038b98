"""Runs the service's Lambda handlers in this process, the way Lambda would: each function's module loaded
from its code folder, its environment (from template.yaml) in place for its cold start, a context object,
and the real event shapes.

Environment variables are process-wide, so cold starts are serialised under a lock: a handler reads its
environment once, on its first invocation, and keeps what it built. Warm invocations run concurrently.

**Timeouts.** Each invocation runs on a thread of its own, and the caller waits at most the function's ``Timeout``.
At the deadline the invocation fails with :class:`FunctionTimeoutError` (``Task timed out after N seconds``, as
Lambda reports it) and its work is cut off, as Lambda cuts it off by stopping the process:

* :class:`InvocationCutOff` is raised asynchronously in the invocation's threads (its own, and every thread that
  made an outside call for it, such as a batch processor's workers). It derives from ``BaseException``, so the
  handler's ``except Exception`` blocks do not swallow it;
* every outside call (HTTP through urllib3: botocore and requests both use it) checks the invocation it runs for,
  and refuses to start once that invocation is cut off.

Python cannot stop a thread that is blocked inside C: a socket read waits for its own timeout (the handlers'
clients all set one), a ``time.sleep`` for its end. Such a thread raises as soon as it runs Python code again, and
sends nothing more; a call already on the wire may land, as it may when Lambda stops a process mid-call. A thread
still alive :data:`STRAGGLER_SECONDS` after its cut-off is logged as an error and counted
(:attr:`LocalFunction.stragglers`), so an overrun is never silent.
"""

from __future__ import annotations

import contextvars
import ctypes
import functools
import importlib.util
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import urllib3.connectionpool

log = logging.getLogger("local.lambda_runtime")

_ENV_LOCK = threading.RLock()

#: Seconds after its cut-off that a thread of an invocation may still run before it is reported as a straggler.
STRAGGLER_SECONDS: Final = 15.0


class FunctionTimeoutError(Exception):
    """The handler ran longer than the function's Timeout: the invocation failed, as Lambda reports it."""


class InvocationCutOff(BaseException):
    """Raised inside a handler's threads when its invocation reached the function's Timeout.

    A ``BaseException``, like ``KeyboardInterrupt``: handler code that catches ``Exception`` (to retry, to log, to
    report a batch item failure) must not carry on after Lambda would have stopped it.
    """


@dataclass
class Invocation:
    """One running invocation: its deadline, and the threads that work for it."""

    function: str
    request_id: str
    timeout: float
    #: Set at the deadline: from then on no outside call may start for this invocation.
    cut: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    _threads: dict[int, threading.Thread] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def adopt(self) -> None:
        """Record that the current thread works for this invocation (it is cut off with it)."""
        current = threading.current_thread()
        with self._lock:
            self._threads.setdefault(current.ident or 0, current)

    def alive(self) -> list[threading.Thread]:
        """The threads of this invocation still running."""
        with self._lock:
            return [thread for thread in self._threads.values() if thread.is_alive()]

    def check(self) -> None:
        """Raise :class:`InvocationCutOff` if the invocation was cut off (called before every outside call)."""
        if self.cut.is_set():
            raise InvocationCutOff(f"{self.function} invocation {self.request_id} was cut off at its timeout")

    def cut_off(self) -> None:
        """Stop the invocation's threads: raise :class:`InvocationCutOff` in each, at its next Python instruction."""
        self.cut.set()
        for thread in self.alive():
            _raise_in(thread, InvocationCutOff)


_CURRENT: contextvars.ContextVar[Invocation | None] = contextvars.ContextVar("local_invocation", default=None)


_CALLER = threading.local()


def last_request_id() -> str:
    """The request id of the last invocation the calling thread made (empty before any)."""
    return str(getattr(_CALLER, "request_id", ""))


def current_invocation() -> Invocation | None:
    """The invocation the calling code runs for (None outside handlers)."""
    return _CURRENT.get()


def _raise_in(thread: threading.Thread, exception: type[BaseException]) -> None:
    if thread.ident is None or thread is threading.current_thread():
        return
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exception))


_GUARD_INSTALLED = False
_GUARD_LOCK = threading.Lock()


def install_cut_off_guard() -> None:
    """Make every HTTP call through urllib3 (botocore's and requests') check its invocation first (idempotent).

    Outside an invocation (the runtime's pollers, tests, tools) nothing changes.
    """
    global _GUARD_INSTALLED  # noqa: PLW0603 - one patch per process
    with _GUARD_LOCK:
        if _GUARD_INSTALLED:
            return
        original = urllib3.connectionpool.HTTPConnectionPool.urlopen

        @functools.wraps(original)
        def urlopen(self: urllib3.connectionpool.HTTPConnectionPool, *args: Any, **kwargs: Any) -> Any:
            invocation = _CURRENT.get()
            if invocation is not None:
                invocation.adopt()
                invocation.check()
            return original(self, *args, **kwargs)

        urllib3.connectionpool.HTTPConnectionPool.urlopen = urlopen  # type: ignore[method-assign]
        previous_hook = threading.excepthook

        def excepthook(args: threading.ExceptHookArgs) -> None:
            # A worker thread of a batch that ended with its invocation's cut-off: expected, not a crash.
            if args.exc_type is not None and issubclass(args.exc_type, InvocationCutOff):
                return
            previous_hook(args)

        threading.excepthook = excepthook
        _GUARD_INSTALLED = True


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block (under the process-wide lock)."""
    with _ENV_LOCK:
        saved = {key: os.environ.get(key) for key in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@dataclass
class LambdaContext:
    """The attributes of Lambda's context object that handlers and Powertools read."""

    function_name: str
    memory_limit_in_mb: int
    timeout_seconds: int
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_version: str = "$LATEST"
    log_group_name: str = ""
    log_stream_name: str = "local"
    _deadline: float = field(default=0.0)

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.timeout_seconds
        self.log_group_name = f"/aws/lambda/{self.function_name}"

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:123456789012:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class LocalFunction:
    """One function of the template, invocable in-process.

    Parameters
    ----------
    name
        The function's name (its logical id).
    handler
        ``module.function``, as in the template.
    code_path
        The function's ``CodeUri`` folder.
    environment
        Its environment, with the template's references resolved.
    timeout, memory
        From the template; the context reports them.
    """

    def __init__(
        self,
        name: str,
        *,
        handler: str,
        code_path: Path,
        environment: Mapping[str, str],
        timeout: int = 60,
        memory: int = 256,
    ) -> None:
        self.name = name
        self.handler = handler
        self.code_path = code_path
        self.environment = dict(environment)
        self.timeout = timeout
        self.memory = memory
        self._module: ModuleType | None = None
        self._cold = True
        self._cold_lock = threading.Lock()
        self.invocations = 0
        #: Invocations cut off at their timeout, and those with a thread still running long after (see module doc).
        self.cut_offs = 0
        self.stragglers = 0
        install_cut_off_guard()

    def _load(self) -> Callable[[Any, Any], Any]:
        module_name, function_name = self.handler.rsplit(".", 1)
        if self._module is None:
            path = self.code_path / f"{module_name.replace('.', '/')}.py"
            spec = importlib.util.spec_from_file_location(f"_local_fn_{self.name}_{module_name}", path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load handler {self.handler} from {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            self._module = module
        handler: Callable[[Any, Any], Any] = getattr(self._module, function_name)
        return handler

    def warm(self) -> LocalFunction:
        """Load the handler and build what it builds on a cold start, with the function's environment.

        After this, invocations need no environment and run concurrently (as separate Lambda containers do).
        """
        with self._cold_lock:
            if self._cold:
                with environment(self.environment):
                    self._load()
                    assert self._module is not None
                    warm = getattr(self._module, "warm", None)
                    if callable(warm):
                        warm()
                        self._cold = False
        return self

    def invoke(self, event: Any) -> Any:
        """Invoke the handler with ``event``; its exception propagates as a failed invocation would.

        :func:`last_request_id` then tells the calling thread the invocation's request id.

        Raises
        ------
        FunctionTimeoutError
            The handler did not finish within the function's timeout; it was cut off (see the module docstring).
        """
        self.invocations += 1
        context = LambdaContext(self.name, self.memory, self.timeout)
        invocation = Invocation(self.name, context.aws_request_id, float(self.timeout))
        _CALLER.request_id = context.aws_request_id
        outcome: dict[str, Any] = {}

        def run() -> None:
            _CURRENT.set(invocation)
            invocation.adopt()
            try:
                outcome["result"] = self._call(event, context)
            except InvocationCutOff:
                outcome["cut_off"] = True
            except BaseException as exc:  # noqa: BLE001 - the handler's error is the invocation's outcome
                outcome["error"] = exc
            finally:
                invocation.finished.set()

        # A fresh thread starts with an empty context: nothing of another invocation (log keys above all) leaks in.
        thread = threading.Thread(target=run, name=f"{self.name}:{context.aws_request_id[:8]}", daemon=True)
        thread.start()
        if not invocation.finished.wait(self.timeout):
            self.cut_offs += 1
            invocation.cut_off()
            threading.Thread(target=self._watch, args=(invocation,), name=f"{thread.name}:watch", daemon=True).start()
            raise FunctionTimeoutError(f"Task timed out after {self.timeout:.2f} seconds")
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("result")

    def _call(self, event: Any, context: LambdaContext) -> Any:
        if self._cold:
            with self._cold_lock:
                if self._cold:
                    with environment(self.environment):
                        result = self._load()(event, context)
                    self._cold = False
                    return result
        return self._load()(event, context)

    def _watch(self, invocation: Invocation) -> None:
        """After a cut-off: report a thread that keeps running (blocked in C, or catching BaseException)."""
        deadline = time.monotonic() + STRAGGLER_SECONDS
        while invocation.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = invocation.alive()
        if not alive:
            return
        self.stragglers += 1
        log.error(
            "%s invocation %s still runs %.0f s after its cut-off (threads: %s); it can make no outside call",
            self.name,
            invocation.request_id,
            STRAGGLER_SECONDS,
            ", ".join(thread.name for thread in alive),
        )
        while invocation.alive():  # ask again, in case a handler caught the first one
            invocation.cut_off()
            time.sleep(5.0)
