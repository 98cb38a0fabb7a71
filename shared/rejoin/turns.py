"""The turn worker: runs the agent for one queued turn at a time per session.

A turn costs two store requests, whatever the number of tool rounds:

1. ``begin_turn`` takes the session's turn lease and returns the history (the
   message that asked for the turn is already in it: the ``say`` transition
   put it there).
2. The Runner runs on a :class:`TurnSession`: it reads a window of that
   history that never splits a tool call from its output nor a reasoning
   item from what it belongs to (:func:`rejoin.compaction.model_window`,
   bounded in items and estimated tokens), and the SDK's ``add_items`` calls
   (model output, tool calls and outputs) are held in memory.
3. ``commit_turn`` writes those items and logs the agent's message in one
   atomic script, once (a retried commit answers as the first).

A long meeting's history is compacted after a turn that found it past a
threshold: older items become one summary item (written with one more
request, only when due); what participants see, the event log, keeps every
message.

A failed turn has written nothing, so there is nothing to roll back: its
lease is released and the retry starts clean. No duplicated input, no tool
call without its output. While the agent streams, the worker polls the
session now and then (who to send deltas to, and whether a participant sent
``stop``). This module imports the Agents SDK: only the turn worker loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import agents
from agents.memory import SessionSettings

from .compaction import (
    CompactionPolicy,
    ModelSummariser,
    model_window,
    plan_compaction,
    summary_item,
)
from .errors import CompactionError, RejoinError, SessionGone, StoreError, TurnBusy
from .fanout import publish
from .frames import agent_delta_frame, error_frame
from .history import CALL_OUTPUT
from .models import build_model, make_current_time_tool
from .observability import bind, count, log_failure, logger, register_flush
from .queue import TurnRequest
from .rooms import RoomStore
from .runtime import Runtime
from .sender import ConnectionSender, broadcast
from .session import UpstashSession

__all__ = [
    "TurnSession",
    "agent_for",
    "build_agent",
    "configure_tracing",
    "handle_turn",
    "retry_delay",
    "run_turn",
    "schedule_retries",
]

# Deltas are sent at most this often (seconds): coalesced, not one post per token.
DELTA_INTERVAL = 0.1
# While the agent runs, the session is polled (recipients, stop) first after
# POLL_FIRST seconds, then every POLL_EVERY: a short turn costs no poll.
POLL_FIRST = 1.5
POLL_EVERY = 3.0

# Item types that are a call answered by an output item with the same call_id.
_CALLS = CALL_OUTPUT
_OUTPUTS = set(_CALLS.values())


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
        model=build_model(
            api_key=s.openai_api_key,
            model=s.model,
            base_url=s.openai_base_url,
            api=s.model_api,
            timeout=s.model_timeout_seconds,
            max_retries=s.model_max_retries,
        ),
        tools=[make_current_time_tool(clock=rt.clock)],
    )


def agent_for(rt: Runtime) -> agents.Agent[Any]:
    """The agent of the running event loop (its model's HTTP client is bound to it)."""
    bound = rt.bound()
    agent: agents.Agent[Any] | None = bound.get("agent")
    if agent is None:
        agent = (rt.agent_factory or build_agent)(rt)
        bound["agent"] = agent
    return agent


class TurnSession:
    """The Agents SDK ``Session`` a turn runs on: the history read at the turn's
    start, plus the items the run adds, held in memory until the commit.

    Args:
        session_id: the session.
        history: the history when the turn started, oldest first.
    """

    def __init__(self, session_id: str, history: list[Any]) -> None:
        self.session_id = session_id
        self.session_settings: SessionSettings | None = SessionSettings()
        self._history = history
        self.added: list[Any] = []

    async def get_items(self, limit: int | None = None) -> list[Any]:
        """The history and what the run added, or the latest ``limit`` of them."""
        items = [*self._history, *self.added]
        if limit is None and self.session_settings is not None:
            limit = self.session_settings.limit
        if limit is None:
            return items
        return items[-limit:] if limit > 0 else []

    async def add_items(self, items: list[Any]) -> None:
        """Hold items until the turn commits."""
        self.added.extend(json.loads(json.dumps(i)) for i in items)

    async def pop_item(self) -> Any | None:
        """Take back an item this run added (the SDK rewinds its own writes only)."""
        return self.added.pop() if self.added else None

    async def clear_session(self) -> None:
        """Not possible inside a turn."""
        raise RejoinError("a turn cannot clear its session's history")


def complete_items(items: list[Any]) -> list[Any]:
    """The items without calls that lack their output (or outputs that lack
    their call), and without reasoning left with nothing after it: what a
    stopped run leaves must still be a valid history for the next turn."""
    calls = {i.get("call_id") for i in items if isinstance(i, dict) and i.get("type") in _CALLS}
    answered = {
        i.get("call_id") for i in items if isinstance(i, dict) and i.get("type") in _OUTPUTS
    }
    kept = [
        i
        for i in items
        if not (
            isinstance(i, dict)
            and (
                (i.get("type") in _CALLS and i.get("call_id") not in answered)
                or (i.get("type") in _OUTPUTS and i.get("call_id") not in calls)
            )
        )
    ]
    while kept and isinstance(kept[-1], dict) and kept[-1].get("type") == "reasoning":
        kept.pop()
    return kept


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
    poll: tuple[float, float] | None = None,
) -> str:
    """Run one turn; returns ``done``, ``stopped``, ``skipped`` (already done) or ``dropped``.

    Args:
        poll: seconds before the first poll of the session while the agent
            runs, and between later ones (default ``POLL_FIRST``, ``POLL_EVERY``).

    Raises:
        TurnBusy: another turn of the session holds the lease (retry later).
        Exception: the agent failed; nothing was written, the participants
            were told, and the turn can be retried as is.
    """
    bind(session_id=turn.session_id)
    _tracing_once()
    rooms = rt.rooms()
    s = rt.settings
    attempt = uuid.uuid4().hex
    # Compaction plans over the history from its first item; without it only
    # the latest part is read (a little more than the window needs).
    read = 0 if s.compact_at_tokens or not s.history_max_items else s.history_max_items + 50
    try:
        start = await rooms.begin_turn(
            turn.session_id,
            turn.epoch,
            turn.turn_id,
            attempt,
            s.turn_lease_seconds,
            history_limit=read,
        )
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
    history = [i for i in start.items if i is not None]
    window = model_window(
        history, limit=s.history_max_items or None, max_tokens=s.history_max_tokens or None
    )
    session = TurnSession(turn.session_id, window)
    agent = agent or agent_for(rt)
    runner = _Stream(
        rooms, sender, turn, attempt, start.recipients, monotonic, poll or (POLL_FIRST, POLL_EVERY)
    )
    try:
        reply, stopped = await runner.run(agent, session)
        items = session.added
        if stopped:
            items = complete_items(items)
            if reply:
                # What the participants saw the agent say stays in its history.
                items.append({"role": "assistant", "content": reply})
        event, recipients = await rooms.commit_turn(
            turn.session_id,
            turn.epoch,
            turn.turn_id,
            attempt,
            items=items,
            reply_text=reply,
            reply_to=turn.reply_to,
            stopped=stopped,
        )
    except Exception as exc:
        if _is_gone(exc):
            # Deleted (or taken over) mid-turn: write nothing, do not retry.
            logger.info("turn dropped mid-run: session gone", extra={"turn": turn.turn_id})
            count("TurnsDropped")
            return "dropped"
        count("TurnFailures")
        log_failure("turn failed", exc, turn=turn.turn_id)
        told: list[str] | None = None
        with contextlib.suppress(RejoinError):
            told = await rooms.release_turn(turn.session_id, turn.epoch, turn.turn_id, attempt)
        if told:
            await broadcast(
                sender,
                told,
                error_frame(
                    "turn_failed",
                    "the agent could not answer; retrying",
                    turn=turn.turn_id,
                    reply_to=turn.reply_to,
                ),
            )
        raise
    if stopped:
        count("TurnsStopped")
    else:
        count("Turns")
    await publish(rooms, sender, turn.session_id, recipients, event)
    if s.compact_at_tokens and len(history) == len(start.history):
        # (an unreadable entry would shift every index: compaction waits for a clean read)
        await _compact(rt, rooms, turn, agent, history, start.history)
    return "stopped" if stopped else "done"


async def _compact(
    rt: Runtime,
    rooms: RoomStore,
    turn: TurnRequest,
    agent: agents.Agent[Any],
    history: list[Any],
    stored: list[str],
) -> None:
    """Summarise the older part of a long history; best effort, after the answer.

    Args:
        history: the history as read at the turn's start, decoded.
        stored: the same entries as stored (encrypted, when encryption is on).
    """
    s = rt.settings
    if not isinstance(agent.model, agents.Model):
        return  # a model name the SDK resolves itself: nothing to summarise with
    policy = CompactionPolicy(
        max_tokens=s.compact_at_tokens,
        keep_tokens=s.compact_keep_tokens,
        max_items=None,
        keep_items=None,
    )
    plan = plan_compaction(history, policy)
    if plan is None:
        return
    session = UpstashSession(
        turn.session_id,
        redis=rt.redis(),
        key_prefix=s.key_prefix,
        epoch=turn.epoch,
        clock=rt.clock,
    )
    try:
        summary = await ModelSummariser(agent.model, max_words=s.summary_words).summarise(
            plan.older
        )
        # The boundary as stored: an encrypted entry is never encrypted twice alike.
        applied = await session._atomic_replace_prefix(
            plan.cut,
            stored[plan.cut - 1],
            rooms.serialize_item(turn.session_id, summary_item(summary)),
        )
    except (CompactionError, StoreError) as exc:
        # The history is unchanged; the next turn plans again.
        log_failure("could not compact the history", exc, turn=turn.turn_id)
        return
    if applied:
        count("Compactions")
        logger.info(
            "history compacted", extra={"summarised": len(plan.older), "kept": len(plan.kept)}
        )


class _Stream:
    """Runs the agent streamed: deltas to the participants, polls for ``stop``."""

    def __init__(
        self,
        rooms: RoomStore,
        sender: ConnectionSender,
        turn: TurnRequest,
        attempt: str,
        recipients: list[str],
        monotonic: Callable[[], float],
        poll: tuple[float, float],
    ) -> None:
        self.poll_first, self.poll_every = poll
        self.rooms = rooms
        self.sender = sender
        self.turn = turn
        self.attempt = attempt
        self.recipients = recipients
        self.monotonic = monotonic
        self.buffer: list[str] = []
        self.streamed: list[str] = []
        self.index = 0
        self.last_flush = monotonic()
        self.stop_by: str | None = None

    async def flush(self) -> None:
        if not self.buffer:
            return
        frame = agent_delta_frame(
            self.turn.turn_id, self.index, "".join(self.buffer), self.turn.reply_to
        )
        self.buffer.clear()
        self.index += 1
        self.last_flush = self.monotonic()
        if self.recipients:
            await broadcast(self.sender, self.recipients, frame)

    async def poll(self, result: agents.RunResultStreaming) -> None:
        wait = self.poll_first
        while True:
            await asyncio.sleep(wait)
            wait = self.poll_every
            t = self.turn
            try:
                recipients, stop_by, held = await self.rooms.turn_status(
                    t.session_id, t.epoch, t.turn_id, self.attempt
                )
            except SessionGone:
                stop_by, held, recipients = "", False, []
            except StoreError as exc:
                log_failure("could not poll the turn's session", exc, turn=t.turn_id)
                continue
            self.recipients = recipients
            if stop_by or not held:
                self.stop_by = stop_by or ""
                result.cancel()
                return

    async def run(self, agent: agents.Agent[Any], session: TurnSession) -> tuple[str, bool]:
        t = self.turn
        result = agents.Runner.run_streamed(
            agent,
            [],
            session=session,
            run_config=agents.RunConfig(
                workflow_name="rejoin turn",
                group_id=t.session_id,
                trace_metadata={"turn": t.turn_id, "epoch": t.epoch},
            ),
        )
        poller = asyncio.create_task(self.poll(result))
        try:
            async for event in result.stream_events():
                if (
                    event.type == "raw_response_event"
                    and event.data.type == "response.output_text.delta"
                ):
                    self.buffer.append(event.data.delta)
                    self.streamed.append(event.data.delta)
                    if self.monotonic() - self.last_flush >= DELTA_INTERVAL:
                        await self.flush()
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await poller
        await self.flush()
        if self.stop_by is not None:
            logger.info("turn stopped", extra={"turn": t.turn_id})
            return "".join(self.streamed), True
        return str(result.final_output or ""), False


def handle_turn(rt: Runtime, turn: TurnRequest, agent: agents.Agent[Any] | None = None) -> str:
    """Synchronous entry for one queue record (the Lambda handler's loop)."""
    return rt.run(run_turn(rt, turn, agent=agent))
