"""A Powertools batch processor that handles a batch's records concurrently.

The registration queue's records each wait on an upstream round trip; handled one after another a batch of 10
costs ten round trips. This processor runs them on a bounded thread pool, so a batch costs about one, while
keeping Powertools' partial-failure bookkeeping (``batchItemFailures``) unchanged.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType


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
            return super().process()
        # Success/failure handlers only append to lists, which is safe across threads.
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(self.records))) as pool:
            return list(pool.map(self._process_record, self.records))
