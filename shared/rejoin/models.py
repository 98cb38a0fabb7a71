"""Models the turn worker runs: scripted ones for tests, an offline stand-in, the real one.

- :class:`ScriptedModel` plays a fixed script of turns, for tests.
- :class:`OfflineModel` answers without an API key, so the local stack works
  on any machine; every answer starts with ``[offline model]``.
- :func:`build_model` picks the OpenAI model, or the stand-in when no key is set.

Both fake models speak the same protocol as the SDK's OpenAI models:
``get_response`` returns a :class:`~agents.items.ModelResponse`, and
``stream_response`` yields OpenAI Responses stream events, word by word,
ending with ``response.completed`` carrying the full ``Response`` (the Runner
builds the turn's result from that last event only).

This module imports the Agents SDK, which is slow to import: only the turn
worker (and tests) import it.
"""

from __future__ import annotations

import abc
import asyncio
import copy
import itertools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
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
    "ModelCall",
    "OfflineModel",
    "ScriptExhaustedError",
    "ScriptedModel",
    "ScriptedReasoning",
    "ScriptedStep",
    "ScriptedText",
    "ScriptedToolCall",
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
# Script steps
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ScriptedText:
    """An assistant message.

    Attributes:
        text: what the assistant says.
    """

    text: str


@dataclass(frozen=True)
class ScriptedToolCall:
    """A function call.

    Attributes:
        name: the tool's name.
        arguments: the arguments, sent to the tool as JSON.
        call_id: the call id; a fresh one per model call when None.
    """

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    call_id: str | None = None


@dataclass(frozen=True)
class ScriptedReasoning:
    """A reasoning item (its summary text).

    Attributes:
        summary: the reasoning summary.
    """

    summary: str


ScriptedOutput: TypeAlias = ScriptedText | ScriptedToolCall | ScriptedReasoning


@dataclass(frozen=True)
class ScriptedStep:
    """What a model answers on one call.

    Attributes:
        outputs: the output items, in order.
        error: raised on this call instead of answering (or after some deltas).
        deltas_before_error: when streaming, how many text deltas to send
            before raising ``error``; None raises before the first event.
            ``get_response`` always raises before answering.
    """

    outputs: tuple[ScriptedOutput, ...] = ()
    error: Exception | None = None
    deltas_before_error: int | None = None


@dataclass(frozen=True)
class ModelCall:
    """One call a :class:`ScriptedModel` received.

    Attributes:
        system_instructions: the agent's instructions for this call.
        input: a deep copy of the input items (or string) the Runner sent.
        tool_names: the names of the tools offered to the model.
        streamed: True for ``stream_response``, False for ``get_response``.
    """

    system_instructions: str | None
    input: str | list[TResponseInputItem]
    tool_names: tuple[str, ...]
    streamed: bool


class ScriptExhaustedError(RuntimeError):
    """A :class:`ScriptedModel` was called more often than its script has steps."""


# --------------------------------------------------------------------------- #
# Rendering steps as Responses items and stream events
# --------------------------------------------------------------------------- #


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _render_item(output: ScriptedOutput) -> ResponseOutputItem:
    """Build the Responses output item for one scripted output (fresh ids)."""
    if isinstance(output, ScriptedText):
        return ResponseOutputMessage(
            id=_new_id("msg"),
            type="message",
            role="assistant",
            status="completed",
            content=[ResponseOutputText(type="output_text", text=output.text, annotations=[])],
        )
    if isinstance(output, ScriptedToolCall):
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
    """A model whose every call is answered by a :class:`ScriptedStep`.

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
    ) -> ScriptedStep:
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
        if step.error is not None:
            raise step.error
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
        if step.error is not None and step.deltas_before_error is None:
            raise step.error
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
        deltas = 0
        for event in _stream_events(response):
            if event.type == "response.completed" and step.error is not None:
                raise step.error  # fewer deltas than asked for: fail before completing
            if event.type == "response.output_text.delta":
                if deltas:
                    # Even with no delay, let consumers run between deltas.
                    await asyncio.sleep(self.delay)
                deltas += 1
            yield event
            if step.error is not None and deltas == step.deltas_before_error:
                # Yield to the loop first, as a network stream would: the SDK drops
                # queued events once the run fails, so a consumer would see no deltas.
                await asyncio.sleep(self.delay)
                raise step.error


# --------------------------------------------------------------------------- #
# ScriptedModel
# --------------------------------------------------------------------------- #


def _as_step(step: object) -> ScriptedStep:
    if isinstance(step, ScriptedStep):
        return step
    if isinstance(step, str):
        return ScriptedStep((ScriptedText(step),))
    if isinstance(step, ScriptedText | ScriptedToolCall | ScriptedReasoning):
        return ScriptedStep((step,))
    # Caught at construction, not on the call that would reach it.
    raise TypeError(f"not a script step: {step!r}")


class ScriptedModel(_SteppedModel):
    """A deterministic model for tests: plays a script, one step per call, no network.

    Example::

        model = ScriptedModel([
            ScriptedModel.tool_call("lookup", {"q": "ada"}),  # call 1
            ScriptedModel.text("Ada was a mathematician."),  # call 2
        ])
        agent = Agent(name="a", model=model, tools=[lookup])

    Args:
        steps: what to answer on each call, in order; a bare output (from
            :meth:`text`, :meth:`tool_call`, :meth:`reasoning`) is a step
            with that one output, and a bare string is :meth:`text`.
        name: the model name reported in responses.
        delay: seconds to wait between two streamed text deltas.

    Attributes:
        calls: every call received, in order (including failing ones).
    """

    def __init__(
        self,
        steps: Sequence[ScriptedStep | ScriptedOutput | str],
        *,
        name: str = "scripted-model",
        delay: float = 0.0,
    ) -> None:
        super().__init__(name=name, delay=delay)
        self._steps = [_as_step(step) for step in steps]
        self.calls: list[ModelCall] = []

    @staticmethod
    def text(text: str) -> ScriptedText:
        """An assistant message saying ``text``."""
        return ScriptedText(text)

    @staticmethod
    def tool_call(
        name: str, arguments: Mapping[str, Any] | None = None, call_id: str | None = None
    ) -> ScriptedToolCall:
        """A call of the function tool ``name`` with ``arguments`` (a fresh call id if None)."""
        return ScriptedToolCall(name, dict(arguments or {}), call_id)

    @staticmethod
    def reasoning(summary: str) -> ScriptedReasoning:
        """A reasoning item, to put before other outputs with :meth:`step`."""
        return ScriptedReasoning(summary)

    @staticmethod
    def step(*outputs: ScriptedOutput) -> ScriptedStep:
        """One call answered with several output items (e.g. two tool calls)."""
        return ScriptedStep(outputs)

    @staticmethod
    def fail(exc: Exception) -> ScriptedStep:
        """A call that raises ``exc`` before answering anything."""
        return ScriptedStep(error=exc)

    @staticmethod
    def fail_after_deltas(text: str, exc: Exception, *, deltas: int | None = None) -> ScriptedStep:
        """A call that streams part of ``text``, then raises ``exc``.

        Args:
            text: the message being streamed.
            exc: the error to raise.
            deltas: how many text deltas to send first; default: half the
                words (at least one).

        Returns:
            The step. ``get_response`` raises ``exc`` without answering.
        """
        count = deltas if deltas is not None else max(1, len(split_into_chunks(text)) // 2)
        return ScriptedStep((ScriptedText(text),), error=exc, deltas_before_error=count)

    @property
    def remaining(self) -> int:
        """How many steps have not been played yet."""
        return len(self._steps) - len(self.calls)

    def _next_step(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        tools: list[Tool],
        *,
        streamed: bool,
    ) -> ScriptedStep:
        self.calls.append(
            ModelCall(
                system_instructions=system_instructions,
                input=copy.deepcopy(input),
                tool_names=tuple(_tool_name(tool) for tool in tools),
                streamed=streamed,
            )
        )
        number = len(self.calls)
        if number > len(self._steps):
            raise ScriptExhaustedError(
                f"ScriptedModel {self.name!r} got call {number} but its script has only "
                f"{len(self._steps)} step(s)"
            )
        return self._steps[number - 1]


# --------------------------------------------------------------------------- #
# OfflineModel
# --------------------------------------------------------------------------- #

# "Ada: what time is it?" -> ("Ada", "what time is it?"); a name has no
# sentence punctuation, so "Why? Because: ..." is not taken for a speaker.
_SPEAKER = re.compile(r"^\s*([^\s:?!][^:\n?!]{0,39}):\s+(\S.*)$", re.DOTALL)
_ASKS_TIME = re.compile(r"\b(time|date|clock)\b", re.IGNORECASE)


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
    match = _SPEAKER.match(message)
    if match is None:
        return None, message.strip()
    return match.group(1).strip(), match.group(2).strip()


class OfflineModel(_SteppedModel):
    """The stand-in model used when ``OPENAI_API_KEY`` is unset: no network, deterministic.

    It echoes the latest user message (``"<speaker>: <text>"``, as rejoin
    stores it) with a count of the conversation's messages, so a local user
    can see that history survives a reconnect. Asked for the time or date,
    it calls the ``current_time`` tool when the agent has it, then answers
    with the tool's output. Every answer starts with :data:`OFFLINE_LABEL`.

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
    ) -> ScriptedStep:
        items: list[Any] = [{"role": "user", "content": input}] if isinstance(input, str) else input
        user_messages = [m for m in items if _is_message(m, frozenset({"user"}))]
        if not user_messages:
            return ScriptedStep((ScriptedText(f"{OFFLINE_LABEL} Nobody has said anything yet."),))
        speaker, text = _speaker_and_text(_content_text(_field(user_messages[-1], "content")))

        time_answer = _answer_to_time_call(items, speaker)
        if time_answer is not None:
            return ScriptedStep((ScriptedText(time_answer),))
        has_clock = any(_tool_name(tool) == CURRENT_TIME_TOOL_NAME for tool in tools)
        if has_clock and _ASKS_TIME.search(text):
            return ScriptedStep((ScriptedToolCall(CURRENT_TIME_TOOL_NAME, {}),))

        count = sum(1 for m in items if _is_message(m, frozenset({"user", "assistant"})))
        opening = f"{speaker}, you said" if speaker else "You said"
        return ScriptedStep(
            (
                ScriptedText(
                    f'{OFFLINE_LABEL} {opening}: "{text}". I am a stand-in that runs without '
                    "an API key; set OPENAI_API_KEY to talk to a real model. This conversation "
                    f"has {count} message{'' if count == 1 else 's'} so far."
                ),
            )
        )


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


def build_model(*, api_key: str | None, model: str, base_url: str | None = None) -> Model:
    """The model the turn worker runs. Makes no network call.

    Args:
        api_key: the OpenAI (or compatible) API key; None or empty selects
            the :class:`OfflineModel`.
        model: the model name, e.g. ``"gpt-4.1-mini"``.
        base_url: an OpenAI-compatible server. Such servers usually speak
            Chat Completions rather than Responses, so this selects the Chat
            Completions model.

    Returns:
        An :class:`OfflineModel`, an ``OpenAIChatCompletionsModel`` (with
        ``base_url``) or an ``OpenAIResponsesModel``.
    """
    global _offline_warning_logged
    if not api_key:
        if not _offline_warning_logged:
            logger.warning("OPENAI_API_KEY is not set: using the offline stand-in model")
            _offline_warning_logged = True
        return OfflineModel()
    client = AsyncOpenAI(api_key=api_key, base_url=base_url)
    if base_url is not None:
        return OpenAIChatCompletionsModel(model=model, openai_client=client)
    return OpenAIResponsesModel(model=model, openai_client=client)
