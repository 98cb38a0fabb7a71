"""The turn worker: consumes the SQS FIFO turn queue and runs the agent.

A failed record is reported in ``batchItemFailures``; the FIFO processor also
returns the later records of the same session, so turns stay in order. Those
are made visible again within seconds (not after the queue's long visibility
timeout), with a backoff that grows with each receive.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.batch import (
    SqsFifoPartialProcessor,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from rejoin.observability import lambda_handler, log_failure
from rejoin.queue import TurnRequest
from rejoin.runtime import get_runtime
from rejoin.turns import agent_for, handle_turn, schedule_retries

processor = SqsFifoPartialProcessor(skip_group_on_error=True)
# Report every failed record instead of raising when all failed: SQS retries
# exactly those, and the answer says which.
processor.raise_on_entire_batch_failure = False


def record_handler(record: SQSRecord) -> str:
    rt = get_runtime()
    try:
        return handle_turn(rt, TurnRequest.from_json(record.body), agent_for(rt))
    except Exception as exc:
        # Powertools reports the failure to SQS but logs it only at DEBUG.
        log_failure("turn record failed", exc, message_id=record.message_id)
        raise


@lambda_handler
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    result = process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
    failed = [f["itemIdentifier"] for f in result.get("batchItemFailures", [])]
    if failed:
        rt = get_runtime()
        rt.run(schedule_retries(rt, event, failed))
    return result
