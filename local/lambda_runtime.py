"""Runs the service's Lambda handlers in this process, the way Lambda would: each function's module loaded
from its code folder, its environment (from template.yaml) in place for its cold start, a context object,
and the real event shapes.

Environment variables are process-wide, so cold starts are serialised under a lock: a handler reads its
environment once, on its first invocation, and keeps what it built. Warm invocations run concurrently.
"""

from __future__ import annotations

import importlib.util
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
from typing import Any

_ENV_LOCK = threading.RLock()


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
        """Invoke the handler with ``event``; exceptions propagate as a failed invocation would."""
        self.invocations += 1
        context = LambdaContext(self.name, self.memory, self.timeout)
        if self._cold:
            with self._cold_lock:
                if self._cold:
                    with environment(self.environment):
                        result = self._load()(event, context)
                    self._cold = False
                    return result
        return self._load()(event, context)
