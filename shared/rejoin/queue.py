"""The turn queue: hands agent turns from the message route to the turn worker.

Turns of one session must never interleave, so on AWS they go through an SQS
FIFO queue with ``MessageGroupId`` = session id (one group is delivered in
order, one batch at a time) and ``MessageDeduplicationId`` derived from the
client's message id (a resent message is not queued twice). Tests and the local
stack use :class:`InMemoryTurnQueue`, which keeps the same guarantees.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import RejoinError

__all__ = [
    "InMemoryTurnQueue",
    "SqsTurnQueue",
    "TurnQueue",
    "TurnRequest",
    "dedup_id",
    "sqs_event",
]


@dataclass(frozen=True)
class TurnRequest:
    """One agent turn, as queued.

    The message that asks for it is already in the agent's history (the
    ``say`` transition put it there), so the turn carries only where it stands.

    Attributes:
        session_id: the session the turn belongs to.
        epoch: the session's epoch when the message was sent; a turn for
            another epoch (the session expired or was replaced) writes nothing.
        turn_id: the turn's id, unique in the epoch (the message's seq); also
            its idempotency key.
        reply_to: the seq of the message the agent answers.
    """

    session_id: str
    epoch: str
    turn_id: str
    reply_to: int

    def to_json(self) -> str:
        """Encode as the queue message body (version 2)."""
        return json.dumps(
            {
                "v": 2,
                "session": self.session_id,
                "epoch": self.epoch,
                "turn": self.turn_id,
                "reply_to": self.reply_to,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str) -> TurnRequest:
        """Decode a queue message body.

        Raises:
            RejoinError: the body is not a version-2 turn.
        """
        try:
            body = json.loads(raw)
            if body.get("v") != 2:
                raise ValueError(f"unsupported version {body.get('v')!r}")
            reply_to = body["reply_to"]
            if isinstance(reply_to, bool) or not isinstance(reply_to, int):
                raise ValueError("reply_to must be an integer")
            return cls(
                session_id=str(body["session"]),
                epoch=str(body["epoch"]),
                turn_id=str(body["turn"]),
                reply_to=reply_to,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RejoinError(f"malformed turn message: {exc}") from None


def dedup_id(session_id: str, epoch: str, turn_id: str) -> str:
    """The SQS deduplication id of a turn (at most 128 characters, always).

    The epoch is part of it: a session recreated within SQS's five-minute
    deduplication window reuses turn ids, and its turns must not be dropped.
    """
    return hashlib.sha256(f"{session_id}\0{epoch}\0{turn_id}".encode()).hexdigest()


class TurnQueue(Protocol):
    """Where the message route puts turns for the worker."""

    async def enqueue(self, turn: TurnRequest) -> None:
        """Queue a turn; queueing the same (session, epoch, turn id) twice is a no-op."""
        ...

    async def retry_later(self, deliveries: list[tuple[str, int]]) -> None:
        """Make failed deliveries (receipt handle, delay in seconds) visible again soon."""
        ...


class SqsTurnQueue:
    """An SQS FIFO queue, one message group per session.

    Args:
        queue_url: the FIFO queue's URL (ends in ``.fifo``).
        client: a boto3 SQS client; created on first use if omitted.
    """

    def __init__(self, queue_url: str, *, client: Any = None) -> None:
        if not queue_url.endswith(".fifo"):
            raise ValueError("the turn queue must be an SQS FIFO queue (URL ending in .fifo)")
        self.queue_url = queue_url
        self._client = client

    def _sqs(self) -> Any:
        if self._client is None:
            import boto3

            self._client = boto3.client("sqs")
        return self._client

    async def enqueue(self, turn: TurnRequest) -> None:
        """Send the turn with MessageGroupId = session id."""
        await asyncio.to_thread(
            self._sqs().send_message,
            QueueUrl=self.queue_url,
            MessageBody=turn.to_json(),
            MessageGroupId=turn.session_id,
            MessageDeduplicationId=dedup_id(turn.session_id, turn.epoch, turn.turn_id),
        )

    async def retry_later(self, deliveries: list[tuple[str, int]]) -> None:
        """Shorten the visibility timeout of failed deliveries.

        Without this a failed turn would wait out the queue's whole visibility
        timeout (minutes: it must exceed the worker's timeout), and block its
        session's message group meanwhile.
        """
        for start in range(0, len(deliveries), 10):  # the batch API takes 10
            chunk = deliveries[start : start + 10]
            await asyncio.to_thread(
                self._sqs().change_message_visibility_batch,
                QueueUrl=self.queue_url,
                Entries=[
                    {"Id": str(n), "ReceiptHandle": handle, "VisibilityTimeout": delay}
                    for n, (handle, delay) in enumerate(chunk)
                ],
            )


@dataclass
class InMemoryTurnQueue:
    """A per-session FIFO queue in memory, with SQS FIFO's 5-minute dedup.

    Attributes:
        on_enqueue: called with each newly queued turn (the local stack starts
            its worker from here).
    """

    on_enqueue: Callable[[TurnRequest], Awaitable[None] | None] | None = None
    clock: Callable[[], float] = time.time
    dedup_seconds: float = 300.0
    _queues: dict[str, list[TurnRequest]] = field(default_factory=dict)
    _seen: dict[str, float] = field(default_factory=dict)
    retries: list[tuple[str, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def enqueue(self, turn: TurnRequest) -> None:
        """Queue a turn unless the same one was queued in the last 5 minutes."""
        key = dedup_id(turn.session_id, turn.epoch, turn.turn_id)
        now = self.clock()
        with self._lock:
            seen_at = self._seen.get(key)
            if seen_at is not None and now - seen_at < self.dedup_seconds:
                return
            self._seen[key] = now
            self._queues.setdefault(turn.session_id, []).append(turn)
        if self.on_enqueue is not None:
            result = self.on_enqueue(turn)
            if result is not None:
                await result

    async def retry_later(self, deliveries: list[tuple[str, int]]) -> None:
        """Record the retries asked for (the local worker re-queues by itself)."""
        with self._lock:
            self.retries.extend(deliveries)

    def pending(self, session_id: str | None = None) -> list[TurnRequest]:
        """Queued turns (of one session, or all), oldest first, not removed."""
        with self._lock:
            if session_id is not None:
                return list(self._queues.get(session_id, []))
            return [t for q in self._queues.values() for t in q]

    def take(self, session_id: str, max_count: int = 10) -> list[TurnRequest]:
        """Remove and return up to ``max_count`` of a session's oldest turns."""
        with self._lock:
            queue = self._queues.get(session_id, [])
            batch, self._queues[session_id] = queue[:max_count], queue[max_count:]
            return batch

    def sessions(self) -> list[str]:
        """Sessions with queued turns."""
        with self._lock:
            return [s for s, q in self._queues.items() if q]


def sqs_event(turns: list[TurnRequest], *, receive_count: int = 1) -> dict[str, Any]:
    """An SQS FIFO event, as Lambda receives it, carrying ``turns`` in order."""
    records = []
    for n, turn in enumerate(turns):
        records.append(
            {
                "messageId": f"{dedup_id(turn.session_id, turn.epoch, turn.turn_id)[:32]}-{n}",
                "receiptHandle": f"rh-{turn.turn_id}",
                "body": turn.to_json(),
                "attributes": {
                    "ApproximateReceiveCount": str(receive_count),
                    "SentTimestamp": str(int(time.time() * 1000)),
                    "SequenceNumber": str(10**19 + n),
                    "MessageGroupId": turn.session_id,
                    "SenderId": "local",
                    "MessageDeduplicationId": dedup_id(turn.session_id, turn.epoch, turn.turn_id),
                    "ApproximateFirstReceiveTimestamp": str(int(time.time() * 1000)),
                },
                "messageAttributes": {},
                "md5OfBody": hashlib.md5(turn.to_json().encode()).hexdigest(),
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:rejoin-turns.fifo",
                "awsRegion": "us-east-1",
            }
        )
    return {"Records": records}
