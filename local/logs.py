"""The local stack's log: one JSON object per line, whoever wrote it.

On Lambda, CloudWatch Logs keeps what a function prints; the handlers' Powertools logger prints one JSON object per
line, and so do its metrics (EMF). In-process, the same file also receives the local runtime's own lines, the
libraries' (botocore, urllib3), warnings, and anything a handler prints. :func:`configure` makes every one of them
a JSON object on one line, so a person can ``grep`` the file and a parser (``telematics-reg trace``) can read it:

* records of the standard ``logging`` loggers become ``{"timestamp", "level", "logger", "message", ...}`` with
  their ``extra`` fields, a traceback as ``exception``, and, when written inside a handler's invocation, that
  invocation's ``function_name`` and ``function_request_id``;
* text written to ``sys.stdout`` is kept line by line: a line that is a JSON object stays as it is (Powertools'
  log lines, EMF blobs), any other line is wrapped as ``{"level": "INFO", "logger": "stdout", "message": line}``.

Example
-------
>>> import io
>>> out = io.StringIO()
>>> stream = JsonLines(out)
>>> _ = stream.write('{"level": "INFO", "message": "kept"}\\nplain text\\n')
>>> out.getvalue().splitlines()[1]
'{"level": "INFO", "logger": "stdout", "message": "plain text"}'
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

from aws_lambda_powertools.logging.filters import SuppressFilter

from local.lambda_runtime import current_invocation
from telematics_reg.observability import SERVICE

#: Attributes every LogRecord has: what is left over came from ``extra=``.
_RECORD_ATTRIBUTES: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _json_default(value: Any) -> Any:
    return str(value)


class JsonLineFormatter(logging.Formatter):
    """A ``logging`` record as one JSON object (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        invocation = current_invocation()
        if invocation is not None:
            line["function_name"] = invocation.function
            line["function_request_id"] = invocation.request_id
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
            if record.exc_info[0] is not None:
                line["exception_name"] = record.exc_info[0].__name__
        if record.stack_info:
            line["stack_info"] = record.stack_info
        return json.dumps(line, default=_json_default, ensure_ascii=False)


class JsonLines(io.TextIOBase):
    """A text stream that writes only whole JSON lines to ``target`` (thread-safe; see the module docstring)."""

    def __init__(self, target: TextIO) -> None:
        super().__init__()
        self._target = target
        self._lock = threading.Lock()
        self._partial: dict[int, str] = {}  # per thread: text written since its last newline

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        thread = threading.get_ident()
        with self._lock:
            pending = self._partial.pop(thread, "") + text
            *lines, rest = pending.split("\n")
            if rest:
                self._partial[thread] = rest
            for line in lines:
                self._emit(line)
        return len(text)

    def _emit(self, line: str) -> None:
        stripped = line.strip()
        if not stripped:
            return
        if stripped.startswith("{"):
            try:
                parsed = json.loads(stripped)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                self._target.write(stripped + "\n")
                return
        self._target.write(json.dumps({"level": "INFO", "logger": "stdout", "message": line}, ensure_ascii=False))
        self._target.write("\n")

    def flush(self) -> None:
        with self._lock:
            for line in self._partial.values():
                self._emit(line)
            self._partial.clear()
            self._target.flush()

    def isatty(self) -> bool:
        return False


def configure(stream: TextIO, *, level: int = logging.INFO) -> JsonLines:
    """Send every log line of this process to ``stream`` as JSON lines; returns the stream for ``sys.stdout``.

    The root logger gets one handler with :class:`JsonLineFormatter`; warnings are logged; every handler that writes
    to the terminal (Powertools' among them) is pointed at the returned :class:`JsonLines`.
    """
    lines = JsonLines(stream)
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonLineFormatter())
    # Powertools keeps its logger's records off the root handlers that exist when that logger is built. This one
    # may come later (whatever imported telematics_reg first): without the same filter each line is written twice.
    handler.addFilter(SuppressFilter(SERVICE))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)
    redirect_terminal_handlers(lines)
    return lines


def redirect_terminal_handlers(stream: TextIO | JsonLines) -> None:
    """Point the handlers that write to the terminal (Powertools' JSON logger among them) at ``stream``."""
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    terminal = {id(sys.stdout), id(sys.stderr), id(sys.__stdout__), id(sys.__stderr__)}
    for logger in loggers:
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler and id(handler.stream) in terminal:
                handler.setStream(stream)


@contextlib.contextmanager
def captured_to(path: str | Path, *, loggers: tuple[str, ...] = ("local",)) -> Iterator[JsonLines]:
    """While the block runs, write the handlers' lines (Powertools') and those of ``loggers`` to ``path`` as JSON
    lines, leaving every other handler as it is (tests use this; ``make run`` uses :func:`configure`)."""
    from telematics_reg.observability import logger as service_logger  # noqa: PLC0415 - the handlers' logger

    handler_of_service = service_logger.registered_handler
    with Path(path).open("a", encoding="utf-8") as stream:
        lines = JsonLines(stream)
        previous = handler_of_service.setStream(lines)  # type: ignore[attr-defined]
        handler = logging.StreamHandler(lines)
        handler.setFormatter(JsonLineFormatter())
        for name in loggers:
            logging.getLogger(name).addHandler(handler)
        try:
            yield lines
        finally:
            for name in loggers:
                logging.getLogger(name).removeHandler(handler)
            handler_of_service.setStream(previous)  # type: ignore[attr-defined]
            lines.flush()


def read(path: str | Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a log file, in order (a line that is not one is skipped)."""
    with Path(path).open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                yield value
