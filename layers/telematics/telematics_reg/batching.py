"""SQS batches handled with partial failures, the records of a batch concurrently.

The registration queue's records each wait on an upstream round trip; handled one after another a batch of 10
costs ten round trips. :func:`process_sqs_batch` runs them on a bounded thread pool, so a batch costs about one,
and answers Lambda with the ids of the records that failed (``ReportBatchItemFailures``), as Powertools'
``process_partial_response`` does with the same rules: a record fails when its handler raises, and when every
record of the batch failed the invocation itself fails (the whole batch is retried).

It stands on its own rather than on Powertools' batch utility, whose import (asyncio and the data classes of
every event source) cost the SQS functions about a tenth of their cold start (bench/results/cold_start.md).

Each record runs in a copy of the invoking thread's context, so its log lines keep the invocation's keys (function
name, request id) on the pool's threads, and carry the record's SQS message id as ``message_id`` and
``correlation_id``: one registration, or one refresh job, can be followed through the logs by its message id.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from telematics_reg.errors import TelematicsError
from telematics_reg.observability import logger


class BatchFailedError(TelematicsError):
    """Every record of a batch failed: the invocation fails so that SQS delivers the whole batch again."""


@dataclass(frozen=True)
class SqsMessage:
    """One record of an SQS event, as a record handler sees it."""

    message_id: str
    body: str
    receive_count: int
    raw: Mapping[str, Any]

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SqsMessage:
        attributes = record.get("attributes") or {}
        return cls(
            message_id=str(record["messageId"]),
            body=str(record.get("body", "")),
            receive_count=int(attributes.get("ApproximateReceiveCount", 1)),
            raw=record,
        )


def process_sqs_batch(
    event: Mapping[str, Any], record_handler: Callable[[SqsMessage], Any], *, max_workers: int = 10
) -> dict[str, list[dict[str, str]]]:
    """Run ``record_handler`` on every record of an SQS event; returns the partial batch response.

    Parameters
    ----------
    event
        The SQS event Lambda delivered (``{"Records": [...]}``).
    record_handler
        Called once per record; a record fails when it raises.
    max_workers
        Records handled at once.

    Raises
    ------
    BatchFailedError
        When every record failed (chained to the first record's exception).

    Example
    -------
    >>> process_sqs_batch({"Records": []}, print)
    {'batchItemFailures': []}
    """
    records: Sequence[Mapping[str, Any]] = event.get("Records") or []
    messages = [SqsMessage.from_record(record) for record in records]

    def handle(message: SqsMessage) -> BaseException | None:
        try:
            record_handler(message)
        except Exception as exc:  # noqa: BLE001 - a failed record is reported to SQS, not raised
            logger.debug("record failed", extra={"message_id": message.message_id, "error": type(exc).__name__})
            return exc
        return None

    def handle_correlated(message: SqsMessage) -> BaseException | None:
        logger.append_keys(message_id=message.message_id, correlation_id=message.message_id)  # this record's only
        return handle(message)

    def handle_in_context(context: contextvars.Context, message: SqsMessage) -> BaseException | None:
        return context.run(handle_correlated, message)

    # Every record runs in its own copy of the caller's context, so the keys one record appends stay its own.
    contexts = [contextvars.copy_context() for _ in messages]
    if len(messages) <= 1 or max_workers <= 1:
        errors = [handle_in_context(context, message) for context, message in zip(contexts, messages, strict=True)]
    else:
        with ThreadPoolExecutor(max_workers=min(max_workers, len(messages))) as pool:
            errors = list(pool.map(handle_in_context, contexts, messages))
    failed = [(message, error) for message, error in zip(messages, errors, strict=True) if error is not None]
    if messages and len(failed) == len(messages):
        raise BatchFailedError(f"all {len(messages)} records of the batch failed") from failed[0][1]
    return {"batchItemFailures": [{"itemIdentifier": message.message_id} for message, _ in failed]}
