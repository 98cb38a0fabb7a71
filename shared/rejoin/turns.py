"""The turn worker: runs the agent for one queued turn at a time per session.

A turn takes the session's turn lease, remembers how long the history was,
runs the agent with :class:`UpstashSession` (whose writes need that lease)
and either commits (logs the reply, marks the turn done) or rolls the history
back to where it started. So a failed turn leaves no duplicated user input
and no tool call without its output, and its retry starts clean; a retry of a
committed turn is a no-op. This module imports the Agents SDK: only the turn
worker loads it.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import agents

from .errors import SessionGone, TurnBusy
from .frames import agent_delta_frame, error_frame
from .models import build_model, make_current_time_tool
from .observability import bind, count, log_failure, logger, register_flush
from .queue import TurnRequest
from .rooms import RoomStore
from .routes import publish, rooms_for
from .runtime import Runtime
from .sender import ConnectionSender, broadcast
from .session import UpstashSession

__all__ = [
    "build_agent",
    "configure_tracing",
    "handle_turn",
    "retry_delay",
    "run_turn",
    "schedule_retries",
]

# Deltas are sent at most this often (seconds): coalesced, not one post per token.
DELTA_INTERVAL = 0.1
# Connections that resumed mid-turn start receiving deltas within this long.
RECIPIENTS_REFRESH = 2.0


_tracing_configured = False


def _tracing_once() -> None:
    # On the first turn, not at import: under SnapStart an import-time secret
    # read (the OTLP headers) would be frozen into the snapshot.
    global _tracing_configured
    if not _tracing_configured:
        configure_tracing()
        _tracing_configured = True


def configure_tracing(mode: str | None = None) -> None:
    """Agent tracing goes to the observability tool, never into the store.

    ``REJOIN_TRACING``: ``off`` (default), ``openai`` (the SDK's exporter) or
    ``otlp`` (OpenTelemetry, e.g. Langfuse, see :mod:`rejoin.tracing`).
    """
    mode = (mode or os.environ.get("REJOIN_TRACING", "off")).lower()
    if mode == "otlp":
        from .tracing import enable_otlp_tracing

        enable_otlp_tracing()
    elif mode == "openai":
        # The SDK batches spans; send them before Lambda freezes the container.
        register_flush(agents.tracing.flush_traces)
    else:
        agents.set_tracing_disabled(True)


def retry_delay(receive_count: int) -> int:
    """Seconds before a failed turn is delivered again: 5, 10, 20, ... 300."""
    return int(min(300, 5 * 2 ** max(0, receive_count - 1)))


async def schedule_retries(rt: Runtime, event: dict[str, Any], failed: list[str]) -> None:
    """Have the queue redeliver the failed records of an SQS batch soon."""
    wanted = set(failed)
    deliveries = [
        (
            r["receiptHandle"],
            retry_delay(int(r.get("attributes", {}).get("ApproximateReceiveCount", 1))),
        )
        for r in event.get("Records", [])
        if r.get("messageId") in wanted
    ]
    if not deliveries:
        return
    try:
        await rt.queue().retry_later(deliveries)
    except Exception as exc:
        # Best effort: without it SQS still redelivers, after the full
        # visibility timeout. Failing here would return the whole batch.
        log_failure("could not shorten the retry delay", exc, records=len(deliveries))


def build_agent(rt: Runtime) -> agents.Agent[Any]:
    """The agent from settings: the real model with a key, the offline one without."""
    s = rt.settings
    return agents.Agent(
        name=s.agent_name,
        instructions=s.agent_instructions,
        model=build_model(api_key=s.openai_api_key, model=s.model, base_url=s.openai_base_url),
        tools=[make_current_time_tool(clock=rt.clock)],
    )


def _is_gone(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, SessionGone):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


async def run_turn(
    rt: Runtime,
    turn: TurnRequest,
    *,
    agent: agents.Agent[Any] | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> str:
    """Run one turn; returns ``done``, ``skipped`` (already done) or ``dropped``.

    Raises:
        TurnBusy: another turn of the session holds the lease (retry later).
        Exception: the agent failed; the history was rolled back and the
            participants were told, so the turn can be retried as is.
    """
    bind(session_id=turn.session_id)
    _tracing_once()
    rooms = rooms_for(rt)
    attempt = uuid.uuid4().hex
    lease = rt.settings.turn_lease_seconds
    try:
        start = await rooms.begin_turn(turn.session_id, turn.epoch, turn.turn_id, attempt, lease)
    except SessionGone:
        logger.info("turn dropped: session gone", extra={"turn": turn.turn_id})
        count("TurnsDropped")
        return "dropped"
    if start.state == "done":
        return "skipped"
    if start.state == "busy":
        count("TurnsBusy")
        raise TurnBusy(f"session {turn.session_id} is running another turn")
    sender = rt.sender()
    session = UpstashSession(
        turn.session_id,
        redis=rt.redis(),
        key_prefix=rt.settings.key_prefix,
        epoch=turn.epoch,
        turn_attempt=attempt,
        clock=rt.clock,
    )
    text = "\n".join(f"{i.name}: {i.text}" for i in turn.input)
    try:
        if turn.respond:
            reply = await _stream(
                rooms, sender, agent or build_agent(rt), text, session, turn, monotonic
            )
        else:
            await session.add_items([{"role": "user", "content": text}])
            reply = ""
        event, recipients = await rooms.commit_turn(
            turn.session_id, turn.epoch, turn.turn_id, attempt, reply
        )
    except Exception as exc:
        if _is_gone(exc):
            # Deleted (or taken over) mid-turn: write nothing, do not retry.
            logger.info("turn dropped mid-run: session gone", extra={"turn": turn.turn_id})
            count("TurnsDropped")
            return "dropped"
        count("TurnFailures")
        log_failure("turn failed", exc, turn=turn.turn_id)
        told = await rooms.rollback_turn(turn.session_id, turn.epoch, attempt)
        if told:
            await broadcast(
                sender,
                told,
                error_frame(
                    "turn_failed",
                    "the agent could not answer; retrying",
                    turn=turn.turn_id,
                ),
            )
        raise
    count("Turns")
    await publish(rooms, sender, turn.session_id, recipients, event)
    return "done"


async def _stream(
    rooms: RoomStore,
    sender: ConnectionSender,
    agent: agents.Agent[Any],
    text: str,
    session: UpstashSession,
    turn: TurnRequest,
    monotonic: Callable[[], float],
) -> str:
    recipients = await rooms.recipients(turn.session_id, turn.epoch)
    refreshed = last_flush = monotonic()
    buffer: list[str] = []
    index = 0

    async def flush() -> None:
        nonlocal index, recipients, refreshed, last_flush
        if not buffer:
            return
        if monotonic() - refreshed > RECIPIENTS_REFRESH:
            recipients = await rooms.recipients(turn.session_id, turn.epoch)
            refreshed = monotonic()
        frame = agent_delta_frame(turn.turn_id, index, "".join(buffer))
        buffer.clear()
        index += 1
        last_flush = monotonic()
        if recipients:
            await broadcast(sender, recipients, frame)

    result = agents.Runner.run_streamed(
        agent,
        text,
        session=session,
        run_config=agents.RunConfig(
            workflow_name="rejoin turn",
            group_id=turn.session_id,
            trace_metadata={"turn": turn.turn_id, "epoch": turn.epoch},
        ),
    )
    async for event in result.stream_events():
        if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
            buffer.append(event.data.delta)
            if monotonic() - last_flush >= DELTA_INTERVAL:
                await flush()
    await flush()
    return str(result.final_output or "")


def handle_turn(rt: Runtime, turn: TurnRequest, agent: agents.Agent[Any] | None = None) -> str:
    """Synchronous entry for one queue record (the Lambda handler's loop)."""
    return rt.run(run_turn(rt, turn, agent=agent))
