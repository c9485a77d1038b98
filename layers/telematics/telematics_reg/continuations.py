"""Sending an unfinished bulk back onto the registration queue, so that a large bulk finishes without an operator.

A bulk of thousands of users made one Create per user needs many invocations. Were each early stop a failed
record, every stop would spend one of the queue's ``maxReceiveCount`` receives (with the visibility timeout
between them) and the bulk would be dead-lettered unfinished. Instead, a delivery that stored users before it
ran short of time sends the same body (which carries the bulk's ``RequestId``) back as a new message, and its
own record is reported handled. See :class:`telematics_reg.intake.RegistrationIntake` for when it does.
"""

from __future__ import annotations

from typing import Any, Protocol


class BulkContinuations(Protocol):
    """Where a bulk that stopped part-way goes to be continued."""

    def send(self, body: str) -> str:
        """Queue ``body`` again; returns the new message's id. Raises when it could not (nothing was queued, or
        it is unknown whether it was: the caller then lets its own message be retried)."""
        ...


class SqsBulkContinuations:
    """Sends the bulk back onto the queue the function reads (the registration queue), after a short delay.

    Parameters
    ----------
    client
        A boto3 SQS client.
    queue_url
        The registration queue.
    delay_seconds
        How long the new message stays invisible (SQS ``DelaySeconds``, 0..900): the invocation that sent it
        finishes its batch first, and a bulk that keeps stopping does not spin.

    Example
    -------
    >>> continuations = SqsBulkContinuations(boto3.client("sqs"), queue_url=url, delay_seconds=5)  # doctest: +SKIP
    >>> continuations.send('{"Quantity": 5000, "RequestId": "load-7"}')  # doctest: +SKIP
    '6f1d...'
    """

    def __init__(self, client: Any, *, queue_url: str, delay_seconds: int) -> None:
        if not 0 <= delay_seconds <= 900:
            raise ValueError("delay_seconds must be 0..900 (SQS DelaySeconds)")
        self._client = client
        self._queue_url = queue_url
        self._delay_seconds = delay_seconds

    def send(self, body: str) -> str:
        response = self._client.send_message(
            QueueUrl=self._queue_url, MessageBody=body, DelaySeconds=self._delay_seconds
        )
        return str(response["MessageId"])
