"""What tests need beyond the SDK's scripted model (``agents.testing.ScriptedModel``).

Tests script the agent's model with the SDK's own ``ScriptedModel``: one step
per model call, a step being a list of output items, an exception to raise,
or a ``ModelStep``. This module keeps only what it lacks:

- fresh ids: the SDK's ``assistant_message`` gives every message the same id
  (``scripted-message``) and the Runner drops input items that repeat an id,
  so a second answer would hide the first from the next call; :func:`text`
  gives each message its own id, :func:`call` a fresh call id when none is
  given;
- a bare string as a step (an assistant message), in :func:`script`;
- word-by-word streaming (:func:`words`; the SDK streams a message as one
  delta) and a stream that breaks midway (:func:`cut`: the connection to
  the model dropping mid-answer).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from agents.items import TResponseOutputItem, TResponseStreamEvent
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)
from openai.types.responses.response_reasoning_item import Summary

from rejoin.models import split_into_chunks

__all__ = ["call", "cut", "held", "reasoning", "script", "text", "words"]


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def text(said: str) -> list[TResponseOutputItem]:
    """A step's output: one assistant message, with its own id."""
    return [assistant_message(said, item_id=_id("msg"))]


def call(
    name: str, arguments: Mapping[str, Any] | None = None, *, call_id: str | None = None
) -> list[TResponseOutputItem]:
    """A step's output: one function call (a fresh call id unless given)."""
    return [function_call(name, dict(arguments or {}), call_id=call_id or _id("call"))]


def reasoning(summary: str) -> list[TResponseOutputItem]:
    """Output: a reasoning item, to put before other outputs of the same step."""
    return [
        ResponseReasoningItem(
            id=_id("rs"),
            type="reasoning",
            summary=[Summary(type="summary_text", text=summary)],
            status="completed",
        )
    ]


def _message(said: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(
        id=_id("msg"),
        type="message",
        role="assistant",
        status="completed",
        content=[ResponseOutputText(type="output_text", text=said, annotations=[], logprobs=[])],
    )


def _events(message: ResponseOutputMessage, deltas: int | None) -> list[TResponseStreamEvent]:
    """The Responses events streaming ``message`` word by word (the first ``deltas`` only)."""
    part = message.content[0]
    assert isinstance(part, ResponseOutputText)
    response = Response(
        id=_id("resp"),
        object="response",
        created_at=0,
        model="scripted-model",
        output=[message],
        status="completed",
        parallel_tool_calls=True,
        tool_choice="auto",
        tools=[],
    )
    pending = response.model_copy(update={"output": [], "status": "in_progress"})
    chunks = split_into_chunks(part.text)
    events: list[Any] = [
        ResponseCreatedEvent(type="response.created", response=pending, sequence_number=0),
        ResponseInProgressEvent(type="response.in_progress", response=pending, sequence_number=0),
        ResponseOutputItemAddedEvent(
            type="response.output_item.added",
            item=message.model_copy(update={"content": [], "status": "in_progress"}),
            output_index=0,
            sequence_number=0,
        ),
        ResponseContentPartAddedEvent(
            type="response.content_part.added",
            item_id=message.id,
            output_index=0,
            content_index=0,
            part=part.model_copy(update={"text": ""}),
            sequence_number=0,
        ),
        *(
            ResponseTextDeltaEvent(
                type="response.output_text.delta",
                item_id=message.id,
                output_index=0,
                content_index=0,
                delta=chunk,
                logprobs=[],
                sequence_number=0,
            )
            for chunk in chunks[: len(chunks) if deltas is None else deltas]
        ),
    ]
    if deltas is None:
        events += [
            ResponseTextDoneEvent(
                type="response.output_text.done",
                item_id=message.id,
                output_index=0,
                content_index=0,
                text=part.text,
                logprobs=[],
                sequence_number=0,
            ),
            ResponseContentPartDoneEvent(
                type="response.content_part.done",
                item_id=message.id,
                output_index=0,
                content_index=0,
                part=part,
                sequence_number=0,
            ),
            ResponseOutputItemDoneEvent(
                type="response.output_item.done", item=message, output_index=0, sequence_number=0
            ),
            ResponseCompletedEvent(type="response.completed", response=response, sequence_number=0),
        ]
    for number, event in enumerate(events):
        event.sequence_number = number
    return events


def words(said: str) -> ModelStep:
    """A step that answers ``said``, streamed one word per delta."""
    message = _message(said)
    events = _events(message, None)
    return ModelStep.stream(events, output=[message])


def cut(said: str, error: Exception, *, deltas: int | None = None) -> ModelStep:
    """A streamed step that sends the first words of ``said``, then raises ``error``.

    Args:
        said: the message being streamed.
        error: what the model connection raises midway.
        deltas: how many words are sent first; default half of them (at least one).

    Returns:
        The step (for streamed runs; unstreamed, it answers nothing).
    """
    count = deltas if deltas is not None else max(1, len(split_into_chunks(said)) // 2)
    events = _events(_message(said), count)

    async def stream(_: Any) -> AsyncIterator[TResponseStreamEvent]:
        for event in events:
            yield event
        # Let consumers take the deltas first, as over a network: the SDK drops
        # queued events once the run fails.
        await asyncio.sleep(0)
        raise error

    return ModelStep.stream(stream)


def held(said: str, entered: asyncio.Event, release: asyncio.Event) -> ModelStep:
    """A streamed step that answers ``said`` only once ``release`` is set.

    It sets ``entered`` when the model is called, so a test knows the turn is
    under way (its lease taken) and can act while it waits.
    """
    message = _message(said)
    events = _events(message, None)

    async def stream(_: Any) -> AsyncIterator[TResponseStreamEvent]:
        entered.set()
        await release.wait()
        for event in events:
            yield event

    return ModelStep.stream(stream, output=[message])


def script(steps: Iterable[Any]) -> ScriptedModel:
    """The SDK's ScriptedModel on ``steps``; a bare string is :func:`text`."""
    return ScriptedModel([text(step) if isinstance(step, str) else step for step in steps])
