"""A Powertools batch processor that handles a batch's records concurrently.

The registration queue's records each wait on an upstream round trip; handled one after another a batch of 10
costs ten round trips. This processor runs them on a bounded thread pool, so a batch costs about one, while
keeping Powertools' partial-failure bookkeeping (``batchItemFailures``) unchanged.

Each record runs in a copy of the invoking thread's context, so its log lines keep the invocation's keys (function
name, request id) on the pool's threads, and carry the record's SQS message id as ``message_id`` and
``correlation_id``: one registration, or one refresh job, can be followed through the logs by its message id.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType

from telematics_reg.observability import logger


class ConcurrentBatchProcessor(BatchProcessor):
    """``BatchProcessor`` whose ``process`` runs up to ``max_workers`` records at once.

    Example
    -------
    >>> from aws_lambda_powertools.utilities.batch import process_partial_response
    >>> processor = ConcurrentBatchProcessor(EventType.SQS, max_workers=10)
    >>> process_partial_response(event={"Records": []}, record_handler=print, processor=processor)
    {'batchItemFailures': []}
    """

    def __init__(self, event_type: EventType, *, max_workers: int = 10, **kwargs: Any) -> None:
        super().__init__(event_type, **kwargs)
        self.max_workers = max_workers

    def process(self) -> list[tuple[Any, ...]]:
        if len(self.records) <= 1 or self.max_workers <= 1:
            return [self._process_in_context(contextvars.copy_context(), record) for record in self.records]
        # Success/failure handlers only append to lists, which is safe across threads.
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(self.records))) as pool:
            contexts = [contextvars.copy_context() for _ in self.records]
            return list(pool.map(self._process_in_context, contexts, self.records))

    def _process_in_context(self, context: contextvars.Context, record: dict[str, Any]) -> Any:
        return context.run(self._process_correlated, record)

    def _process_correlated(self, record: dict[str, Any]) -> Any:
        message_id = record.get("messageId") if isinstance(record, dict) else None
        if message_id:
            logger.append_keys(message_id=message_id, correlation_id=message_id)  # this record's context only
        return self._process_record(record)
