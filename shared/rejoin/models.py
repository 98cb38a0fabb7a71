"""The models the turn worker runs: the real one, or an offline stand-in.

- :func:`build_model` picks the OpenAI model (Responses API, or Chat
  Completions for an ``OPENAI_BASE_URL``), or the stand-in when no key is set.
- :class:`OfflineModel` answers without an API key, so the local stack works
  on any machine; every answer starts with ``[offline model]``. It reads
  rejoin's speaker items (see :mod:`rejoin.compaction`), calls the
  ``current_time`` tool when asked for the time, and answers the
  summarisation requests of :class:`rejoin.compaction.ModelSummariser`.

The stand-in speaks the same protocol as the SDK's OpenAI models:
``get_response`` returns a :class:`~agents.items.ModelResponse`, and
``stream_response`` yields OpenAI Responses stream events, word by word,
ending with ``response.completed`` carrying the full ``Response`` (the Runner
builds the turn's result from that last event only).

Tests script models with the SDK's own ``agents.testing.ScriptedModel`` (and
the few helpers it lacks in ``tests/scripted.py``), not with a model shipped
in the Lambda layer.

This module imports the Agents SDK, which is slow to import: only the turn
worker (and tests) import it.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeAlias

from agents import FunctionTool, function_tool
from agents.items import ModelResponse, TResponseInputItem, TResponseStreamEvent
from agents.models.interface import Model, ModelTracing
from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
from agents.models.openai_responses import OpenAIResponsesModel
from agents.usage import Usage
from openai import AsyncOpenAI
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseInProgressEvent,
    ResponseOutputItem,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
)
from openai.types.responses.response_reasoning_item import Summary
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

from .compaction import TRANSCRIPT_HEADER, _said, parse_summary_item
from .observability import logger

if TYPE_CHECKING:
    from agents.agent_output import AgentOutputSchemaBase
    from agents.handoffs import Handoff
    from agents.model_settings import ModelSettings
    from agents.tool import Tool
    from openai.types.responses.response_prompt_param import ResponsePromptParam

__all__ = [
    "CURRENT_TIME_TOOL_NAME",
    "OFFLINE_LABEL",
    "OfflineModel",
    "build_model",
    "current_time_tool",
    "make_current_time_tool",
    "split_into_chunks",
]


OFFLINE_LABEL = "[offline model]"
CURRENT_TIME_TOOL_NAME = "current_time"

# A chunk is one word with the whitespace around it, so joining the chunks
# gives back the text exactly.
_CHUNK = re.compile(r"\s*\S+\s*")


def split_into_chunks(text: str) -> list[str]:
    """Split text into word-sized chunks whose concatenation is exactly ``text``.

    Args:
        text: the text to split.

    Returns:
        The chunks, one per word (with its surrounding whitespace); ``[text]``
        for whitespace-only text and ``[]`` for the empty string.
    """
    chunks = _CHUNK.findall(text)
    return chunks if chunks else ([text] if text else [])


# --------------------------------------------------------------------------- #
# What the stand-in answers, before it is rendered as Responses items
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _Text:
    """An assistant message saying ``text``."""

    text: str


@dataclass(frozen=True)
class _ToolCall:
    """A call of the function tool ``name`` (a fresh call id when ``call_id`` is None)."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    call_id: str | None = None


@dataclass(frozen=True)
class _Reasoning:
    """A reasoning item with this summary."""

    summary: str


_Output: TypeAlias = _Text | _ToolCall | _Reasoning


@dataclass(frozen=True)
class _Step:
    """The output items of one model call, in order."""

    outputs: tuple[_Output, ...] = ()


# --------------------------------------------------------------------------- #
# Rendering steps as Responses items and stream events
# --------------------------------------------------------------------------- #


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _render_item(output: _Output) -> ResponseOutputItem:
    """Build the Responses output item for one scripted output (fresh ids)."""
    if isinstance(output, _Text):
        return ResponseOutputMessage(
            id=_new_id("msg"),
            type="message",
            role="assistant",
            status="completed",
            content=[ResponseOutputText(type="output_text", text=output.text, annotations=[])],
        )
    if isinstance(output, _ToolCall):
        return ResponseFunctionToolCall(
            id=_new_id("fc"),
            type="function_call",
            call_id=output.call_id or _new_id("call"),
            name=output.name,
            arguments=json.dumps(dict(output.arguments)),
            status="completed",
        )
    return ResponseReasoningItem(
        id=_new_id("rs"),
        type="reasoning",
        summary=[Summary(type="summary_text", text=output.summary)],
        status="completed",
    )


def _estimate_tokens(text: str) -> int:
    # Roughly four characters per token: enough for usage displays to move.
    return (len(text) + 3) // 4


def _build_usage(input: str | list[TResponseInputItem], items: list[ResponseOutputItem]) -> Usage:
    input_tokens = _estimate_tokens(input if isinstance(input, str) else json.dumps(input))
    output_tokens = sum(_estimate_tokens(item.model_dump_json()) for item in items)
    return Usage(
        requests=1,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
    )


def _response_usage(usage: Usage) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.input_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=0),
        output_tokens=usage.output_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
        total_tokens=usage.total_tokens,
    )


def _item_events(
    item: ResponseOutputItem, index: int, seq: Iterator[int]
) -> Iterator[TResponseStreamEvent]:
    """The events that stream one output item, as the Responses API sends them."""
    if isinstance(item, ResponseOutputMessage):
        yield ResponseOutputItemAddedEvent(
            type="response.output_item.added",
            item=item.model_copy(update={"content": [], "status": "in_progress"}),
            output_index=index,
            sequence_number=next(seq),
        )
        for content_index, part in enumerate(item.content):
            if not isinstance(part, ResponseOutputText):
                continue  # only text is scripted; refusals never occur here
            yield ResponseContentPartAddedEvent(
                type="response.content_part.added",
                item_id=item.id,
                output_index=index,
                content_index=content_index,
                part=part.model_copy(update={"text": ""}),
                sequence_number=next(seq),
            )
            for chunk in split_into_chunks(part.text):
                yield ResponseTextDeltaEvent(
                    type="response.output_text.delta",
                    item_id=item.id,
                    output_index=index,
                    content_index=content_index,
                    delta=chunk,
                    logprobs=[],
                    sequence_number=next(seq),
                )
            yield ResponseTextDoneEvent(
                type="response.output_text.done",
                item_id=item.id,
                output_index=index,
                content_index=content_index,
                text=part.text,
                logprobs=[],
                sequence_number=next(seq),
            )
            yield ResponseContentPartDoneEvent(
                type="response.content_part.done",
                item_id=item.id,
                output_index=index,
                content_index=content_index,
                part=part,
                sequence_number=next(seq),
            )
    elif isinstance(item, ResponseFunctionToolCall):
        item_id = item.id or item.call_id
        yield ResponseOutputItemAddedEvent(
            type="response.output_item.added",
            item=item.model_copy(update={"arguments": "", "status": "in_progress"}),
            output_index=index,
            sequence_number=next(seq),
        )
        yield ResponseFunctionCallArgumentsDeltaEvent(
            type="response.function_call_arguments.delta",
            item_id=item_id,
            output_index=index,
            delta=item.arguments,
            sequence_number=next(seq),
        )
        yield ResponseFunctionCallArgumentsDoneEvent(
            type="response.function_call_arguments.done",
            item_id=item_id,
            output_index=index,
            arguments=item.arguments,
            sequence_number=next(seq),
        )
    else:
        yield ResponseOutputItemAddedEvent(
            type="response.output_item.added",
            item=item.model_copy(update={"status": "in_progress"}),
            output_index=index,
            sequence_number=next(seq),
        )
    yield ResponseOutputItemDoneEvent(
        type="response.output_item.done",
        item=item,
        output_index=index,
        sequence_number=next(seq),
    )


def _stream_events(response: Response) -> Iterator[TResponseStreamEvent]:
    """Every event of a streamed response, from ``created`` to ``completed``."""
    seq = itertools.count()
    pending = response.model_copy(update={"output": [], "status": "in_progress", "usage": None})
    yield ResponseCreatedEvent(type="response.created", response=pending, sequence_number=next(seq))
    yield ResponseInProgressEvent(
        type="response.in_progress", response=pending, sequence_number=next(seq)
    )
    for index, item in enumerate(response.output):
        yield from _item_events(item, index, seq)
    # The Runner reads the turn's output from this event alone.
    yield ResponseCompletedEvent(
        type="response.completed", response=response, sequence_number=next(seq)
    )


class _SteppedModel(Model, abc.ABC):
    """A model whose every call is answered by a :class:`_Step`.

    Subclasses decide the step (:meth:`_next_step`); this class turns it into
    a ``ModelResponse`` or a stream of Responses events.

    Args:
        name: the model name reported in responses.
        delay: seconds to wait between two streamed text deltas.
    """

    def __init__(self, *, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay

    @abc.abstractmethod
    def _next_step(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        tools: list[Tool],
        *,
        streamed: bool,
    ) -> _Step:
        """Decide what to answer on this call."""

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        """Answer one call in full (see :meth:`agents.models.interface.Model.get_response`)."""
        step = self._next_step(system_instructions, input, tools, streamed=False)
        items = [_render_item(output) for output in step.outputs]
        return ModelResponse(
            output=items, usage=_build_usage(input, items), response_id=_new_id("resp")
        )

    async def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        """Stream one call (see :meth:`agents.models.interface.Model.stream_response`)."""
        step = self._next_step(system_instructions, input, tools, streamed=True)
        items = [_render_item(output) for output in step.outputs]
        usage = _build_usage(input, items)
        response = Response(
            id=_new_id("resp"),
            object="response",
            created_at=time.time(),
            model=self.name,
            output=items,
            status="completed",
            parallel_tool_calls=True,
            tool_choice="auto",
            tools=[],
            usage=_response_usage(usage),
        )
        first = True
        for event in _stream_events(response):
            if event.type == "response.output_text.delta":
                if not first:
                    # Even with no delay, let consumers run between deltas.
                    await asyncio.sleep(self.delay)
                first = False
            yield event


# --------------------------------------------------------------------------- #
# OfflineModel
# --------------------------------------------------------------------------- #

# "Ada: what time is it?" -> ("Ada", "what time is it?"); a name has no
# sentence punctuation, so "Why? Because: ..." is not taken for a speaker.
_SPEAKER = re.compile(r"^\s*([^\s:?!][^:\n?!]{0,39}):\s+(\S.*)$", re.DOTALL)
_ASKS_TIME = re.compile(r"\b(time|date|clock)\b", re.IGNORECASE)
# An offline summary quotes at most this much of each speaker's last words.
_QUOTE_CHARS = 60


def _field(item: object, name: str) -> Any:
    """Read a field of an input item, whether a dict (usual) or a pydantic object."""
    if isinstance(item, Mapping):
        return item.get(name)
    return getattr(item, name, None)


def _tool_name(tool: object) -> str:
    return str(getattr(tool, "name", type(tool).__name__))


def _content_text(content: Any) -> str:
    """The text of a message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = (_field(part, "text") for part in content)
        return " ".join(text for text in texts if isinstance(text, str))
    return ""


def _is_message(item: object, roles: frozenset[str]) -> bool:
    return _field(item, "role") in roles and _field(item, "type") in (None, "message")


def _output_text(output: Any) -> str:
    """A function call output as text (it may be a string or a list of parts)."""
    if isinstance(output, str):
        return output
    text = _content_text(output)
    return text if text else json.dumps(output, default=str)


def _speaker_and_text(message: str) -> tuple[str | None, str]:
    """rejoin's JSON speaker item, else the older ``"Name: text"``, else plain text."""
    said = _said(message)
    if said is not None:
        return said.name, said.text.strip()
    match = _SPEAKER.match(message)
    if match is None:
        return None, message.strip()
    return match.group(1).strip(), match.group(2).strip()


def _quote(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _QUOTE_CHARS else flat[: _QUOTE_CHARS - 3] + "..."


class OfflineModel(_SteppedModel):
    """The stand-in model used when ``OPENAI_API_KEY`` is unset: no network, deterministic.

    It echoes the latest participant message (read from rejoin's JSON
    speaker items, or ``"<speaker>: <text>"``, or plain text) with a count
    of the messages it was sent, so a local user can see that history
    survives a reconnect (and what a window or a summary leaves in view).
    Asked for the time or date, it calls the ``current_time`` tool when the
    agent has it, then answers with the tool's output. Asked to summarise by
    :class:`rejoin.compaction.ModelSummariser`, it lists who spoke, how
    often, and their last words. Every answer starts with
    :data:`OFFLINE_LABEL`.

    Args:
        delay: seconds between two streamed words, so a page visibly streams.
        name: the model name reported in responses.
    """

    def __init__(self, *, delay: float = 0.02, name: str = "offline-stand-in") -> None:
        super().__init__(name=name, delay=delay)

    def _next_step(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        tools: list[Tool],
        *,
        streamed: bool,
    ) -> _Step:
        items: list[Any] = [{"role": "user", "content": input}] if isinstance(input, str) else input
        summaries = [m for m in items if parse_summary_item(m) is not None]
        user_messages = [
            m
            for m in items
            if _is_message(m, frozenset({"user"})) and parse_summary_item(m) is None
        ]
        if not user_messages:
            return _Step((_Text(f"{OFFLINE_LABEL} Nobody has said anything yet."),))
        latest = _content_text(_field(user_messages[-1], "content"))
        if latest.startswith(TRANSCRIPT_HEADER):
            return _Step((_Text(_offline_summary(latest)),))
        speaker, text = _speaker_and_text(latest)

        time_answer = _answer_to_time_call(items, speaker)
        if time_answer is not None:
            return _Step((_Text(time_answer),))
        has_clock = any(_tool_name(tool) == CURRENT_TIME_TOOL_NAME for tool in tools)
        if has_clock and _ASKS_TIME.search(text):
            return _Step((_ToolCall(CURRENT_TIME_TOOL_NAME, {}),))

        count = len(user_messages) + sum(
            1 for m in items if _is_message(m, frozenset({"assistant"}))
        )
        earlier = sum(s.messages for m in summaries if (s := parse_summary_item(m)) is not None)
        opening = f"{speaker}, you said" if speaker else "You said"
        return _Step(
            (
                _Text(
                    f'{OFFLINE_LABEL} {opening}: "{text}". I am a stand-in that runs without '
                    "an API key; set OPENAI_API_KEY to talk to a real model. This conversation "
                    f"has {count} message{'' if count == 1 else 's'} so far"
                    + (f", after a summary of {earlier} earlier ones." if summaries else ".")
                ),
            )
        )


def _offline_summary(request: str) -> str:
    """A summary of a :class:`~rejoin.compaction.ModelSummariser` transcript, by counting."""
    spoken: dict[str, int] = {}
    last: dict[str, str] = {}
    earlier = ""
    answers = tools = 0
    for line in request.split("\n")[1:]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        speaker = entry.get("speaker")
        if isinstance(speaker, dict) and isinstance(speaker.get("name"), str):
            name = speaker["name"]
            spoken[name] = spoken.get(name, 0) + 1
            last[name] = str(entry.get("text", ""))
        elif "earlier_summary" in entry:
            earlier = str(entry["earlier_summary"]).removeprefix(f"{OFFLINE_LABEL} ")
        elif "agent" in entry:
            answers += 1
        elif "tool_call" in entry:
            tools += 1
    people = "; ".join(
        f'{name} ({count}x, last: "{_quote(last[name])}")' for name, count in spoken.items()
    )
    parts = [f"{OFFLINE_LABEL} Summary."]
    if earlier:
        parts.append(f"Before: {_quote(earlier)}")
    parts.append(f"Then: {people or 'no participant spoke'}.")
    parts.append(f"The agent answered {answers} time(s) and used tools {tools} time(s).")
    return " ".join(parts)


def _answer_to_time_call(items: list[Any], speaker: str | None) -> str | None:
    """The answer when the last input item is the output of a ``current_time`` call."""
    if not items or _field(items[-1], "type") != "function_call_output":
        return None
    call_id = _field(items[-1], "call_id")
    asked_clock = any(
        _field(item, "type") == "function_call"
        and _field(item, "call_id") == call_id
        and _field(item, "name") == CURRENT_TIME_TOOL_NAME
        for item in items
    )
    if not asked_clock:
        return None
    now = _output_text(_field(items[-1], "output"))
    opening = f"{speaker}, the" if speaker else "The"
    return f"{OFFLINE_LABEL} {opening} current_time tool says it is {now} (UTC)."


# --------------------------------------------------------------------------- #
# Tools and the model factory
# --------------------------------------------------------------------------- #


def make_current_time_tool(clock: Callable[[], float] = time.time) -> FunctionTool:
    """Build the ``current_time`` tool on a given clock.

    Args:
        clock: returns the time in seconds since the epoch; injected in tests.

    Returns:
        A function tool, named ``current_time`` and taking no arguments, that
        returns the UTC time in ISO 8601 format.
    """

    def current_time() -> str:
        """Return the current date and time in UTC, in ISO 8601 format."""
        return datetime.fromtimestamp(clock(), tz=UTC).isoformat(timespec="seconds")

    return function_tool(current_time, name_override=CURRENT_TIME_TOOL_NAME)


def current_time_tool() -> FunctionTool:
    """The ``current_time`` tool on the system clock."""
    return make_current_time_tool()


# Warn once per process, not on every turn.
_offline_warning_logged = False


def build_model(
    *,
    api_key: str | None,
    model: str,
    base_url: str | None = None,
    api: str | None = None,
    timeout: float = 60.0,
    max_retries: int = 2,
) -> Model:
    """The model the turn worker runs. Makes no network call.

    Args:
        api_key: the OpenAI (or compatible) API key; None or empty selects
            the :class:`OfflineModel`.
        model: the model name, e.g. ``"gpt-4.1-mini"``.
        base_url: an OpenAI-compatible server (``OPENAI_BASE_URL``).
        api: ``"responses"`` or ``"chat_completions"``; by default Responses
            for OpenAI and Chat Completions with a ``base_url`` (what most
            compatible servers speak).
        timeout: seconds the client waits for an answer (per request).
        max_retries: how often the client retries a 429, a 5xx or a timeout
            by itself (honouring ``retry-after``), before the turn fails.

    Returns:
        An :class:`OfflineModel`, an ``OpenAIChatCompletionsModel`` or an
        ``OpenAIResponsesModel``.

    Raises:
        ValueError: ``api`` is not one of the two.
    """
    global _offline_warning_logged
    if not api_key:
        if not _offline_warning_logged:
            logger.warning("OPENAI_API_KEY is not set: using the offline stand-in model")
            _offline_warning_logged = True
        return OfflineModel()
    chosen = api or ("chat_completions" if base_url is not None else "responses")
    if chosen not in ("responses", "chat_completions"):
        raise ValueError(f"api must be 'responses' or 'chat_completions', not {api!r}")
    client = AsyncOpenAI(
        api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries
    )
    if chosen == "chat_completions":
        return OpenAIChatCompletionsModel(model=model, openai_client=client)
    return OpenAIResponsesModel(model=model, openai_client=client)
