"""Logger and Metrics shared by every function: one instance each, imported from here.

Traces come from Lambda's active tracing (``Tracing: Active`` in template.yaml), without the X-Ray SDK: the SDK
cost about 200 ms of every cold start's import (bench/results/cold_start.md) for per-call subsegments whose
timings the service already publishes as metrics (``Upstream*Latency``).

The logger's invocation state (the Lambda context keys ``inject_lambda_context`` adds, the correlation id, and
any ``append_keys``) lives in a context variable instead of on the shared formatter. On Lambda one process runs one
invocation at a time, so this changes nothing there; where several invocations share one process (the local
runtime runs every function in-process, on threads), each line still carries its own invocation's function name,
request id and correlation id. Work handed to other threads keeps them when it runs in a copy of the caller's
context (:func:`contextvars.copy_context`, as :mod:`telematics_reg.batching` does for a batch's records).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter

SERVICE = "telematics-registration"
NAMESPACE = "TelematicsRegistration"

_INVOCATION_KEYS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "telematics_log_keys", default=None
)


class InvocationScopedFormatter(LambdaPowertoolsFormatter):
    """Powertools' JSON formatter whose appended keys belong to the current context, not to the process.

    Keys are never changed in place: every change stores a new dict in the current context, so a copy of the
    context taken by another thread (a record of the same batch) keeps what it saw and cannot alter the caller's.

    Example
    -------
    >>> logger = Logger(service="example", logger_formatter=InvocationScopedFormatter())
    >>> logger.append_keys(correlation_id="event-1")  # only this context's lines carry it
    """

    _base: dict[str, Any]

    @property
    def log_format(self) -> dict[str, Any]:
        scoped = _INVOCATION_KEYS.get()
        return self._base if scoped is None else scoped

    @log_format.setter
    def log_format(self, value: dict[str, Any]) -> None:
        if "_base" not in self.__dict__:  # the constructor's keys: shared by every context
            self._base = value
        else:
            _INVOCATION_KEYS.set(value)

    def append_keys(self, **additional_keys: Any) -> None:
        self.log_format = {**self.log_format, **additional_keys}

    def remove_keys(self, keys: Iterable[str]) -> None:
        drop = set(keys)
        self.log_format = {key: value for key, value in self.log_format.items() if key not in drop}

    def share_current_keys(self) -> None:
        """Make the keys of the current context every context's starting keys (once, when the logger is built)."""
        self._base = dict(self.log_format)
        _INVOCATION_KEYS.set(None)


_formatter = InvocationScopedFormatter(use_rfc3339=True, utc=True)
logger = Logger(service=SERVICE, logger_formatter=_formatter)
_formatter.share_current_keys()  # the service name Logger just appended belongs to every line
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)
