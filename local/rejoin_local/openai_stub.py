"""An OpenAI-compatible HTTP server for tests and the local stack: no network, no key.

It speaks enough of the OpenAI wire protocol that the real ``openai`` client
and the Agents SDK's real model classes (``OpenAIResponsesModel``,
``OpenAIChatCompletionsModel``) talk to it unchanged:

- ``POST /v1/responses``: the Responses API, streamed (server-sent events
  ``response.created`` ... ``response.completed``, each with its
  ``sequence_number``, no ``[DONE]``) or not; text, reasoning and function
  calls;
- ``POST /v1/chat/completions``: Chat Completions, streamed (``data:`` chunks
  ending with ``data: [DONE]``, a usage chunk when
  ``stream_options.include_usage``) or not; text and tool calls;
- ``POST /v1/responses/compact``: what the SDK's compaction session calls
  (all user messages kept, the rest folded into one ``compaction`` item);
- ``GET /v1/models``.

Its answers are scripted by the test (:meth:`OpenAIStub.queue`: a FIFO of
:class:`Reply`, one per model request) or, when the queue is empty,
deterministic (:func:`default_reply`): it echoes who said what (reading
rejoin's JSON speaker items, ``"Name: text"`` or plain text), calls an
offered tool when the latest message names it, reports a tool's output, and
answers a summarisation request (instructions that ask to summarise) with a
short summary.

Faults on purpose, as a reply in the queue: :meth:`Reply.rate_limited` (429
with ``retry-after``), :meth:`Reply.server_error` (500),
:meth:`Reply.hang` (no answer until the client gives up or
:meth:`OpenAIStub.release` is called), :meth:`Reply.cut` (the stream stops
midway: the connection is closed without ending the body).

It validates what the real API refuses where it matters for rejoin: a call
without its output, or an output without its call, in the input (``400``
``"No tool output found for function call <id>."`` /
``"No tool call found for function call output with call_id <id>."``; for
Chat Completions, an assistant ``tool_calls`` message not followed by its
tool messages, or a tool message with no call), and, for items it produced
itself, a reasoning item cut from the item that followed it. It keeps no
conversation state: ``previous_response_id`` and ``conversation`` are
refused (400), send the whole input instead (as rejoin does). Every request is
recorded (:attr:`OpenAIStub.requests`: the body, the input items and an
approximate token count, ~4 characters per token), so tests can see what the
model was sent.

Run it standalone::

    python -m rejoin_local.openai_stub --port 8765

and point the local stack at it as a user points it at any OpenAI-compatible
server (``OPENAI_BASE_URL`` selects Chat Completions)::

    OPENAI_API_KEY=x OPENAI_BASE_URL=http://127.0.0.1:8765/v1 make dev

From a test, :func:`serve` starts it in a thread (see :mod:`rejoin_local._serving`)::

    with serve() as server:
        server.stub.queue(Reply.tool_call("lookup", {"q": "x"}), Reply.message("done"))
        client = AsyncOpenAI(api_key="x", base_url=server.base_url)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import logging
import math
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ._serving import base_url, serve_uvicorn

__all__ = [
    "OpenAIStub",
    "RecordedRequest",
    "Reply",
    "RunningStub",
    "ToolCall",
    "approx_tokens",
    "create_app",
    "default_reply",
    "serve",
]

DEFAULT_MODEL = "stub-model"
# A hang ends by itself after this long, so a forgotten one cannot hold a
# test run (or the server's shutdown) forever.
DEFAULT_HANG_LIMIT = 30.0
_SUMMARY_ASK = re.compile(r"\bsummar(?:ise|ize|y)\b", re.IGNORECASE)
_SPEAKER_LINE = re.compile(r"^\s*([^\s:?!][^:\n?!]{0,39}):\s+(\S.*)$", re.DOTALL)
_WORD = re.compile(r"\s*\S+\s*")
_log = logging.getLogger("rejoin_local.openai_stub")

# call type -> (output type, the error the real API gives for each side).
_PAIRS: dict[str, tuple[str, str, str]] = {
    "function_call": (
        "function_call_output",
        "No tool output found for function call {id}.",
        "No tool call found for function call output with call_id {id}.",
    ),
    "custom_tool_call": (
        "custom_tool_call_output",
        "No tool output found for custom tool call {id}.",
        "No tool call found for custom tool call output with call_id {id}.",
    ),
    "computer_call": (
        "computer_call_output",
        "No tool output found for computer call {id}.",
        "No tool call found for computer call output with call_id {id}.",
    ),
    "shell_call": (
        "shell_call_output",
        "No tool output found for shell call {id}.",
        "No tool call found for shell call output with call_id {id}.",
    ),
    "apply_patch_call": (
        "apply_patch_call_output",
        "No tool output found for apply patch call {id}.",
        "No tool call found for apply patch call output with call_id {id}.",
    ),
}
_OUTPUT_TO_CALL = {output: call for call, (output, _, _) in _PAIRS.items()}


def approx_tokens(value: Any) -> int:
    """An approximate token count: the characters of every string in ``value`` / 4.

    Args:
        value: a JSON-like value (a request's input, messages, instructions).

    Returns:
        ``ceil(chars / 4)`` where ``chars`` counts the string values (not the
        keys, nor ids, types and statuses), the usual rule of thumb for
        English text.
    """
    return math.ceil(_chars(value) / 4)


# Fields the model does not read as text: ids, and the item's bookkeeping.
_NOT_TEXT = frozenset({"id", "call_id", "role", "status", "type", "annotations", "logprobs"})


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_chars(v) for k, v in value.items() if k not in _NOT_TEXT)
    if isinstance(value, list | tuple):
        return sum(_chars(v) for v in value)
    return 0


def _words(text: str) -> list[str]:
    return _WORD.findall(text) or ([text] if text else [])


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


# --------------------------------------------------------------------------- #
# Replies
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ToolCall:
    """A function call the model makes.

    Attributes:
        name: the tool's name.
        arguments: the arguments (a mapping, sent as JSON, or a JSON string).
        call_id: the call id; a fresh one when None.
    """

    name: str
    arguments: Mapping[str, Any] | str = field(default_factory=dict)
    call_id: str | None = None

    def arguments_json(self) -> str:
        """The arguments as the JSON string the wire carries."""
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(dict(self.arguments), separators=(",", ":"))


FaultKind = Literal["rate_limited", "server_error", "hang", "cut"]


@dataclass(frozen=True)
class Reply:
    """One answer of the model (or a fault), for one request.

    Build them with the class methods. Output order: reasoning, tool calls,
    then the text message.

    Attributes:
        text: the assistant message, if any.
        tool_calls: the function calls, if any.
        reasoning: a reasoning summary, if any (Responses API only).
        input_tokens: the usage reported for the input; None: the estimate.
        output_tokens: the usage reported for the output; None: the estimate.
        fault: None, or what goes wrong instead of (or while) answering.
        retry_after: for ``rate_limited``: the ``retry-after`` header, seconds.
        status: for ``server_error``: the HTTP status.
        after_deltas: for ``cut``: text deltas sent before the stream stops.
    """

    text: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    fault: FaultKind | None = None
    retry_after: float = 1.0
    status: int = 500
    after_deltas: int = 1

    @classmethod
    def message(cls, text: str, *, reasoning: str | None = None) -> Reply:
        """The model says ``text`` (after a reasoning item, if given)."""
        return cls(text=text, reasoning=reasoning)

    @classmethod
    def tool_call(
        cls,
        name: str,
        arguments: Mapping[str, Any] | str | None = None,
        *,
        call_id: str | None = None,
        reasoning: str | None = None,
    ) -> Reply:
        """The model calls one function tool."""
        return cls(tool_calls=(ToolCall(name, arguments or {}, call_id),), reasoning=reasoning)

    @classmethod
    def tool_calls_of(cls, *calls: ToolCall, reasoning: str | None = None) -> Reply:
        """The model calls several tools in one answer."""
        return cls(tool_calls=calls, reasoning=reasoning)

    @classmethod
    def rate_limited(cls, retry_after: float = 1.0) -> Reply:
        """A 429 ``rate_limit_exceeded`` with ``retry-after: <seconds>``."""
        return cls(fault="rate_limited", retry_after=retry_after)

    @classmethod
    def server_error(cls, status: int = 500) -> Reply:
        """A 5xx ``server_error``."""
        return cls(fault="server_error", status=status)

    @classmethod
    def hang(cls) -> Reply:
        """No answer at all until the client gives up (or :meth:`OpenAIStub.release`)."""
        return cls(fault="hang")

    @classmethod
    def cut(cls, text: str, *, after_deltas: int = 1) -> Reply:
        """Stream ``after_deltas`` words of ``text``, then drop the connection.

        Unstreamed, the connection is dropped before any answer.
        """
        return cls(text=text, fault="cut", after_deltas=after_deltas)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the stub received.

    Attributes:
        api: ``responses``, ``chat`` or ``compact``.
        body: the JSON body as sent.
        items: the input items (``input`` as a list) or chat ``messages``.
        instructions: the Responses ``instructions`` (None for chat).
        stream: whether a stream was asked for.
        approx_tokens: :func:`approx_tokens` of the instructions, items and tools.
        status: the HTTP status answered.
        error: the error message answered, if any.
    """

    api: str
    body: dict[str, Any]
    items: list[Any]
    instructions: str | None
    stream: bool
    approx_tokens: int
    status: int
    error: str | None = None


class _Refused(Exception):
    """A request the real API would refuse with this status and error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self.headers = dict(headers or {})


class _StreamCut(Exception):
    """Raised inside a streaming body to drop the connection midway (on purpose)."""


class _DropStreamCutTraceback(logging.Filter):
    # uvicorn logs an exception that ends a started response; ours are on purpose.
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None:
            if isinstance(exc, _StreamCut):
                return False
            exc = exc.__cause__ or exc.__context__
            if isinstance(exc, BaseExceptionGroup):
                exc = next(iter(exc.exceptions), None)
        return True


# --------------------------------------------------------------------------- #
# A neutral view of the conversation (Responses items or chat messages)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _Entry:
    kind: Literal["message", "call", "output"]
    role: str = ""
    text: str = ""
    name: str = ""
    call_id: str = ""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping):
                text = part.get("text", part.get("refusal"))
                if isinstance(text, str):
                    parts.append(text)
            elif isinstance(part, str):
                parts.append(part)
        return " ".join(parts)
    return ""


def _responses_entries(items: list[Any]) -> list[_Entry]:
    entries: list[_Entry] = []
    names: dict[str, str] = {}
    for item in items:
        if not isinstance(item, Mapping):
            continue
        kind = item.get("type")
        if kind in (None, "message") and "role" in item:
            entries.append(_Entry("message", str(item["role"]), _text_of(item.get("content"))))
        elif kind == "function_call":
            call_id = str(item.get("call_id", ""))
            names[call_id] = str(item.get("name", ""))
            entries.append(_Entry("call", name=names[call_id], call_id=call_id))
        elif kind == "function_call_output":
            call_id = str(item.get("call_id", ""))
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output)
            entries.append(
                _Entry("output", text=text, name=names.get(call_id, ""), call_id=call_id)
            )
        elif kind == "compaction":
            entries.append(_Entry("message", "user", _decode_compaction(item)))
    return entries


def _chat_entries(messages: list[Any]) -> list[_Entry]:
    entries: list[_Entry] = []
    names: dict[str, str] = {}
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        role = str(message.get("role", ""))
        if role == "tool":
            call_id = str(message.get("tool_call_id", ""))
            entries.append(
                _Entry(
                    "output",
                    text=_text_of(message.get("content")),
                    name=names.get(call_id, ""),
                    call_id=call_id,
                )
            )
            continue
        text = _text_of(message.get("content"))
        if text or not message.get("tool_calls"):
            entries.append(_Entry("message", role, text))
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            call_id = str(call.get("id", ""))
            names[call_id] = str(function.get("name", ""))
            entries.append(_Entry("call", name=names[call_id], call_id=call_id))
    return entries


def _speaker_and_text(text: str) -> tuple[str | None, str]:
    """rejoin's JSON speaker item, else ``"Name: text"``, else plain text."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except ValueError:
            data = None
        if isinstance(data, dict):
            speaker = data.get("speaker")
            name = speaker.get("name") if isinstance(speaker, dict) else None
            said = data.get("text")
            return (
                name if isinstance(name, str) and name else None,
                said.strip() if isinstance(said, str) else stripped,
            )
    match = _SPEAKER_LINE.match(text)
    if match is None:
        return None, stripped
    return match.group(1).strip(), match.group(2).strip()


@dataclass(frozen=True)
class _Tool:
    name: str
    parameters: Mapping[str, Any]


def _tools(body: Mapping[str, Any]) -> list[_Tool]:
    found: list[_Tool] = []
    for tool in body.get("tools") or []:
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            continue
        function = tool.get("function")
        spec: Mapping[str, Any] = function if isinstance(function, Mapping) else tool
        name = spec.get("name")
        if isinstance(name, str):
            found.append(_Tool(name, spec.get("parameters") or {}))
    return found


def _arguments_for(tool: _Tool, text: str) -> dict[str, Any]:
    """Arguments that satisfy the tool's schema: strings get the asking text."""
    properties = tool.parameters.get("properties") or {}
    defaults: dict[Any, Any] = {
        "string": text,
        "integer": 1,
        "number": 1,
        "boolean": True,
        "array": [],
    }
    return {
        name: defaults.get(spec.get("type") if isinstance(spec, Mapping) else None)
        for name, spec in properties.items()
    }


def default_reply(
    body: Mapping[str, Any], *, instructions: str | None = None, chat: bool = False
) -> Reply:
    """The deterministic answer to a request body when no reply is scripted.

    - a summarisation request (``instructions`` or the system message asks to
      summarise): ``"Summary of N lines. Speakers: A, B. Last: ..."``;
    - the last input is a tool's output: ``"<tool> returned: <output>"``;
    - the latest user message names an offered function tool: a call of it
      (string arguments get the message text);
    - otherwise an echo: ``"<Name> said: <text>"`` (``"You said: ..."``
      without a speaker), with the count of messages the model was sent.

    Args:
        body: the request body (Responses or Chat Completions).
        instructions: the Responses ``instructions``.
        chat: True for a Chat Completions body.

    Returns:
        The reply.
    """
    if chat:
        entries = _chat_entries(list(body.get("messages") or []))
        system = " ".join(e.text for e in entries if e.role in ("system", "developer"))
    else:
        raw = body.get("input")
        items = [{"role": "user", "content": raw}] if isinstance(raw, str) else list(raw or [])
        entries = _responses_entries(items)
        system = instructions or ""
        system += " ".join(e.text for e in entries if e.role in ("system", "developer"))
    if _SUMMARY_ASK.search(system):
        return Reply.message(_summary_of(entries))
    if entries and entries[-1].kind == "output":
        last = entries[-1]
        return Reply.message(f"{last.name or 'the tool'} returned: {last.text}")
    users = [e for e in entries if e.kind == "message" and e.role == "user"]
    if not users:
        return Reply.message("Nobody has said anything yet.")
    speaker, text = _speaker_and_text(users[-1].text)
    for tool in _tools(body):
        if re.search(rf"\b{re.escape(tool.name)}\b", text, re.IGNORECASE):
            return Reply.tool_call(tool.name, _arguments_for(tool, text))
    count = sum(1 for e in entries if e.kind == "message" and e.role in ("user", "assistant"))
    who = f"{speaker} said" if speaker else "You said"
    return Reply.message(f"{who}: {text} ({count} message{'' if count == 1 else 's'} in view)")


def _summary_of(entries: list[_Entry]) -> str:
    lines = [
        line
        for e in entries
        if e.kind == "message" and e.role == "user"
        for line in e.text.split("\n")
        if line.strip()
    ]
    # A transcript of JSON lines under a header: count the lines, not the header.
    json_lines = [line for line in lines if line.lstrip().startswith("{")]
    lines = json_lines or lines
    speakers: list[str] = []
    for line in lines:
        name, _ = _speaker_and_text(line)
        if name and name not in speakers:
            speakers.append(name)
    last = lines[-1].strip() if lines else ""
    last = last if len(last) <= 80 else last[:77] + "..."
    shown = ", ".join(speakers[:12]) + (" and others" if len(speakers) > 12 else "")
    return f"Summary of {len(lines)} lines. Speakers: {shown or 'none'}. Last: {last}"


def _decode_compaction(item: Mapping[str, Any]) -> str:
    try:
        return base64.b64decode(str(item.get("encrypted_content", ""))).decode()
    except ValueError:
        return ""


# --------------------------------------------------------------------------- #
# Validation, as the real API refuses broken inputs
# --------------------------------------------------------------------------- #


def _check_responses_input(items: list[Any], follower_of: Mapping[str, str]) -> None:
    calls: dict[tuple[str, str], int] = {}
    outputs: set[tuple[str, str]] = set()
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise _Refused(400, f"Invalid type for 'input[{index}]'.", param=f"input[{index}]")
        kind = item.get("type")
        call_id = item.get("call_id")
        if kind in _PAIRS and isinstance(call_id, str):
            calls.setdefault((kind, call_id), index)
        elif kind in _OUTPUT_TO_CALL and isinstance(call_id, str):
            call_kind = _OUTPUT_TO_CALL[kind]
            if (call_kind, call_id) not in calls:
                raise _Refused(400, _PAIRS[call_kind][2].format(id=call_id), param="input")
            outputs.add((call_kind, call_id))
    for kind, call_id in calls:
        if (kind, call_id) not in outputs:
            raise _Refused(400, _PAIRS[kind][1].format(id=call_id), param="input")
    _check_reasoning(items, follower_of)


def _check_reasoning(items: list[Any], follower_of: Mapping[str, str]) -> None:
    """Reasoning items this stub produced must come with the item that followed them."""
    ids = [item.get("id") if isinstance(item, Mapping) else None for item in items]
    present = {i for i in ids if isinstance(i, str)}
    required = {follower: rs for rs, follower in follower_of.items()}
    for index, item_id in enumerate(ids):
        if not isinstance(item_id, str):
            continue
        follower = follower_of.get(item_id)
        if follower is not None:
            after = next(
                (i for i in ids[index + 1 :] if not (isinstance(i, str) and i in follower_of)),
                None,
            )
            if after != follower:
                raise _Refused(
                    400,
                    f"Item '{item_id}' of type 'reasoning' was provided without its "
                    "required following item.",
                    param="input",
                )
        reasoning = required.get(item_id)
        if reasoning is not None and reasoning not in present:
            kind = items[index].get("type", "message")
            raise _Refused(
                400,
                f"Item '{item_id}' of type '{kind}' was provided without its required "
                f"'reasoning' item: '{reasoning}'.",
                param="input",
            )


def _check_chat_messages(messages: list[Any]) -> None:
    pending: dict[str, int] = {}
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise _Refused(
                400, f"Missing required parameter: 'messages[{index}].role'.", param="messages"
            )
        role = message["role"]
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in pending:
                raise _Refused(
                    400,
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    param=f"messages.[{index}].role",
                )
            del pending[str(call_id)]
            continue
        if pending:
            break
        for call in message.get("tool_calls") or []:
            pending[str(call.get("id"))] = index
    if pending:
        first = min(pending.values())
        raise _Refused(
            400,
            "An assistant message with 'tool_calls' must be followed by tool messages "
            "responding to each 'tool_call_id'. The following tool_call_ids did not have "
            f"response messages: {', '.join(pending)}",
            param=f"messages.[{first}].role",
        )


# --------------------------------------------------------------------------- #
# Rendering replies on the wire
# --------------------------------------------------------------------------- #


@dataclass
class _Rendered:
    """A reply with ids, as Responses output items."""

    reply: Reply
    output: list[dict[str, Any]]
    usage: dict[str, Any]


def _render_responses(reply: Reply, input_tokens: int) -> _Rendered:
    output: list[dict[str, Any]] = []
    if reply.reasoning is not None:
        output.append(
            {
                "id": _new_id("rs"),
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": reply.reasoning}],
                "status": "completed",
            }
        )
    for call in reply.tool_calls:
        call_id = call.call_id or _new_id("call")
        output.append(
            {
                "id": _new_id("fc"),
                "type": "function_call",
                "call_id": call_id,
                "name": call.name,
                "arguments": call.arguments_json(),
                "status": "completed",
            }
        )
    if reply.text is not None:
        output.append(
            {
                "id": _new_id("msg"),
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [
                    {"type": "output_text", "text": reply.text, "annotations": [], "logprobs": []}
                ],
            }
        )
    said = [reply.text or "", reply.reasoning or ""]
    said += [f"{c.name}{c.arguments_json()}" for c in reply.tool_calls]
    out_tokens = reply.output_tokens if reply.output_tokens is not None else approx_tokens(said)
    in_tokens = reply.input_tokens if reply.input_tokens is not None else input_tokens
    reasoning_tokens = approx_tokens(reply.reasoning or "")
    usage = {
        "input_tokens": in_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": out_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": in_tokens + out_tokens,
    }
    return _Rendered(reply, output, usage)


def _response_object(
    response_id: str,
    body: Mapping[str, Any],
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    created_at: int,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body.get("model", DEFAULT_MODEL),
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": body.get("metadata") or {},
    }


def _responses_events(
    rendered: _Rendered, response_id: str, body: Mapping[str, Any], created_at: int
) -> Iterator[dict[str, Any]]:
    """Every event of a streamed response, in the order the Responses API sends them."""
    seq = itertools.count()

    def event(kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "sequence_number": next(seq), **fields}

    pending = _response_object(
        response_id, body, status="in_progress", output=[], usage=None, created_at=created_at
    )
    yield event("response.created", response=pending)
    yield event("response.in_progress", response=pending)
    for index, item in enumerate(rendered.output):
        kind = item["type"]
        if kind == "reasoning":
            yield event(
                "response.output_item.added",
                output_index=index,
                item={**item, "summary": [], "status": "in_progress"},
            )
            for summary_index, part in enumerate(item["summary"]):
                common = {"item_id": item["id"], "output_index": index}
                yield event(
                    "response.reasoning_summary_part.added",
                    **common,
                    summary_index=summary_index,
                    part={"type": "summary_text", "text": ""},
                )
                for chunk in _words(part["text"]):
                    yield event(
                        "response.reasoning_summary_text.delta",
                        **common,
                        summary_index=summary_index,
                        delta=chunk,
                    )
                yield event(
                    "response.reasoning_summary_text.done",
                    **common,
                    summary_index=summary_index,
                    text=part["text"],
                )
                yield event(
                    "response.reasoning_summary_part.done",
                    **common,
                    summary_index=summary_index,
                    part=part,
                )
        elif kind == "function_call":
            yield event(
                "response.output_item.added",
                output_index=index,
                item={**item, "arguments": "", "status": "in_progress"},
            )
            yield event(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=index,
                delta=item["arguments"],
            )
            yield event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            )
        else:
            yield event(
                "response.output_item.added",
                output_index=index,
                item={**item, "content": [], "status": "in_progress"},
            )
            for content_index, part in enumerate(item["content"]):
                common = {"item_id": item["id"], "output_index": index}
                yield event(
                    "response.content_part.added",
                    **common,
                    content_index=content_index,
                    part={**part, "text": ""},
                )
                for chunk in _words(part["text"]):
                    yield event(
                        "response.output_text.delta",
                        **common,
                        content_index=content_index,
                        delta=chunk,
                        logprobs=[],
                    )
                yield event(
                    "response.output_text.done",
                    **common,
                    content_index=content_index,
                    text=part["text"],
                    logprobs=[],
                )
                yield event(
                    "response.content_part.done", **common, content_index=content_index, part=part
                )
        yield event("response.output_item.done", output_index=index, item=item)
    done = _response_object(
        response_id,
        body,
        status="completed",
        output=rendered.output,
        usage=rendered.usage,
        created_at=created_at,
    )
    yield event("response.completed", response=done)


def _chat_usage(rendered: _Rendered) -> dict[str, Any]:
    usage = rendered.usage
    return {
        "prompt_tokens": usage["input_tokens"],
        "completion_tokens": usage["output_tokens"],
        "total_tokens": usage["total_tokens"],
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _chat_tool_calls(rendered: _Rendered) -> list[dict[str, Any]]:
    return [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in rendered.output
        if item["type"] == "function_call"
    ]


def _chat_completion(
    rendered: _Rendered, completion_id: str, model: str, created: int
) -> dict[str, Any]:
    calls = _chat_tool_calls(rendered)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": rendered.reply.text,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if calls else "stop",
                "logprobs": None,
            }
        ],
        "usage": _chat_usage(rendered),
    }


def _chat_chunks(
    rendered: _Rendered, completion_id: str, model: str, created: int, include_usage: bool
) -> Iterator[dict[str, Any]]:
    """Every chunk of a streamed chat completion (``[DONE]`` is added by the caller)."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    yield chunk({"role": "assistant", "content": "", "refusal": None})
    for word in _words(rendered.reply.text or ""):
        yield chunk({"content": word})
    calls = _chat_tool_calls(rendered)
    for index, call in enumerate(calls):
        yield chunk(
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": call["function"]["name"], "arguments": ""},
                    }
                ]
            }
        )
        yield chunk(
            {
                "tool_calls": [
                    {"index": index, "function": {"arguments": call["function"]["arguments"]}}
                ]
            }
        )
    yield chunk({}, "tool_calls" if calls else "stop")
    if include_usage:
        yield {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": _chat_usage(rendered),
        }


def _sse(data: Mapping[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# --------------------------------------------------------------------------- #
# The stub
# --------------------------------------------------------------------------- #


class OpenAIStub:
    """The server's state: scripted replies, recorded requests, fault control.

    Thread-safe: the server runs in its own thread, the test drives it from
    another.

    Args:
        api_key: when set, requests must carry ``Authorization: Bearer
            <api_key>`` (401 ``invalid_api_key`` otherwise); when None any
            non-empty key is accepted.
        delta_delay: seconds between two streamed deltas (0 in tests; a
            little, e.g. 0.02, makes a page visibly stream).
        hang_limit: a hang ends by itself after this many seconds.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        delta_delay: float = 0.0,
        hang_limit: float = DEFAULT_HANG_LIMIT,
    ) -> None:
        self.api_key = api_key
        self.delta_delay = delta_delay
        self.hang_limit = hang_limit
        self._lock = threading.Lock()
        self._replies: deque[Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self._released = threading.Event()
        # Reasoning item id -> the id of the item that followed it (for its checks).
        self._follower_of: dict[str, str] = {}

    # --- what tests call --------------------------------------------------

    def queue(self, *replies: Reply | str) -> None:
        """Script the next answers, in order (a bare string is :meth:`Reply.message`)."""
        with self._lock:
            self._replies.extend(Reply.message(r) if isinstance(r, str) else r for r in replies)

    @property
    def pending(self) -> int:
        """How many scripted replies are still queued."""
        with self._lock:
            return len(self._replies)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def model_requests(self) -> list[RecordedRequest]:
        """The Responses and Chat Completions requests (not compaction), oldest first."""
        return [r for r in self.requests if r.api in ("responses", "chat")]

    def release(self) -> None:
        """End every hang now (and any later one at once)."""
        self._released.set()

    def reset(self) -> None:
        """Forget queued replies and recorded requests; hangs hang again."""
        with self._lock:
            self._replies.clear()
            self._requests.clear()
            self._follower_of.clear()
        self._released.clear()

    # --- serving ------------------------------------------------------------

    def app(self) -> Starlette:
        """The ASGI app serving this stub under ``/v1``."""
        return Starlette(
            routes=[
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/responses/compact", self._compact, methods=["POST"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(record)

    def _take_fault(self) -> Reply | None:
        with self._lock:
            if self._replies and self._replies[0].fault in ("rate_limited", "server_error", "hang"):
                return self._replies.popleft()
        return None

    def _take_reply(self) -> Reply | None:
        with self._lock:
            return self._replies.popleft() if self._replies else None

    def _authorise(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not key:
            raise _Refused(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        if self.api_key is not None and key != self.api_key:
            raise _Refused(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _body(self, request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise _Refused(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly.)",
            ) from None
        if not isinstance(body, dict):
            raise _Refused(400, "The request body must be a JSON object.")
        if not body.get("model"):
            raise _Refused(400, "Missing required parameter: 'model'.", param="model")
        return body

    async def _fault(self, fault: Reply) -> Response:
        if fault.fault == "rate_limited":
            raise _Refused(
                429,
                f"Rate limit reached for requests. Please try again in {fault.retry_after:g}s.",
                type_="requests",
                code="rate_limit_exceeded",
                headers={
                    "retry-after": f"{fault.retry_after:g}",
                    "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": f"{fault.retry_after:g}s",
                },
            )
        if fault.fault == "server_error":
            raise _Refused(
                fault.status,
                "The server had an error while processing your request. Sorry about that!",
                type_="server_error",
            )
        # A hang: hold the request until released or the limit passes. The
        # event is set from the test's thread, hence a threading.Event waited
        # on in a worker thread.
        await asyncio.to_thread(self._released.wait, self.hang_limit)
        raise _Refused(
            504, "The stub held this request (a hang) and let it go.", type_="server_error"
        )

    @staticmethod
    def _error(refused: _Refused) -> Response:
        headers = {"x-request-id": _new_id("req"), **refused.headers}
        return JSONResponse(refused.body, status_code=refused.status, headers=headers)

    async def _handle(
        self, request: Request, api: Literal["responses", "chat", "compact"]
    ) -> Response:
        record: dict[str, Any] = {
            "api": api,
            "body": {},
            "items": [],
            "instructions": None,
            "stream": False,
            "approx_tokens": 0,
        }
        try:
            self._authorise(request)
            body = await self._body(request)
            items, instructions = _request_items(api, body)
            record.update(
                body=body,
                items=items,
                instructions=instructions,
                stream=bool(body.get("stream")),
                approx_tokens=approx_tokens([instructions or "", items, body.get("tools") or []]),
            )
            if api != "compact":
                fault = self._take_fault()
                if fault is not None:
                    return await self._fault(fault)
            if api == "chat":
                _check_chat_messages(items)
            else:
                with self._lock:
                    follower_of = dict(self._follower_of)
                _check_responses_input(items, follower_of)
            response = self._answer(api, body, items, instructions, record["approx_tokens"])
        except _Refused as refused:
            self._record(RecordedRequest(**record, status=refused.status, error=refused.message))
            return self._error(refused)
        self._record(RecordedRequest(**record, status=200))
        return response

    def _answer(
        self,
        api: str,
        body: dict[str, Any],
        items: list[Any],
        instructions: str | None,
        tokens: int,
    ) -> Response:
        created = int(time.time())
        if api == "compact":
            return JSONResponse(_compacted(body, items, tokens, created))
        reply = self._take_reply() or default_reply(
            body, instructions=instructions, chat=api == "chat"
        )
        rendered = _render_responses(reply, tokens)
        self._remember_reasoning(rendered.output)
        headers = {"x-request-id": _new_id("req")}
        model = str(body.get("model", DEFAULT_MODEL))
        stream = bool(body.get("stream"))
        if reply.fault == "cut" and not stream:
            raise_cut: Response = StreamingResponse(
                self._cut_body(), media_type="application/json", headers=headers
            )
            return raise_cut
        if api == "responses":
            response_id = _new_id("resp")
            if not stream:
                obj = _response_object(
                    response_id,
                    body,
                    status="completed",
                    output=rendered.output,
                    usage=rendered.usage,
                    created_at=created,
                )
                return JSONResponse(obj, headers=headers)
            events = _responses_events(rendered, response_id, body, created)
            delta = b"event: response.output_text.delta\n"
            return self._stream(
                (_sse(e, e["type"]) for e in events),
                reply,
                headers,
                is_delta=lambda f: f.startswith(delta),
            )
        completion_id = _new_id("chatcmpl")
        if not stream:
            return JSONResponse(
                _chat_completion(rendered, completion_id, model, created), headers=headers
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = _chat_chunks(rendered, completion_id, model, created, include_usage)
        return self._stream(
            itertools.chain((_sse(c) for c in chunks), [b"data: [DONE]\n\n"]),
            reply,
            headers,
            is_delta=lambda f: b'"delta":{"content":' in f,
        )

    def _remember_reasoning(self, output: list[dict[str, Any]]) -> None:
        with self._lock:
            for before, after in itertools.pairwise(output):
                if before["type"] == "reasoning":
                    self._follower_of[before["id"]] = after["id"]

    def _stream(
        self,
        frames: Iterator[bytes],
        reply: Reply,
        headers: dict[str, str],
        *,
        is_delta: Callable[[bytes], bool],
    ) -> Response:
        delay = self.delta_delay

        async def body() -> AsyncIterator[bytes]:
            deltas = 0
            for frame in frames:
                if is_delta(frame):
                    if reply.fault == "cut" and deltas >= reply.after_deltas:
                        raise _StreamCut("the stub cut this stream on purpose")
                    if deltas and delay:
                        await asyncio.sleep(delay)
                    deltas += 1
                yield frame
            if reply.fault == "cut":
                raise _StreamCut("the stub cut this stream on purpose")

        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    @staticmethod
    async def _cut_body() -> AsyncIterator[bytes]:
        yield b'{"id":'
        raise _StreamCut("the stub cut this answer on purpose")

    async def _responses(self, request: Request) -> Response:
        return await self._handle(request, "responses")

    async def _chat(self, request: Request) -> Response:
        return await self._handle(request, "chat")

    async def _compact(self, request: Request) -> Response:
        return await self._handle(request, "compact")

    async def _models(self, request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "rejoin"}
                ],
            }
        )


def _request_items(api: str, body: Mapping[str, Any]) -> tuple[list[Any], str | None]:
    if api == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Refused(400, "Missing required parameter: 'messages'.", param="messages")
        return messages, None
    for stateful in ("previous_response_id", "conversation"):
        if body.get(stateful):
            # The stub keeps no responses: say so rather than answer out of context.
            raise _Refused(400, f"The OpenAI stub does not support '{stateful}'.", param=stateful)
    raw = body.get("input")
    if raw is None:
        raise _Refused(400, "Missing required parameter: 'input'.", param="input")
    items = [{"role": "user", "content": raw}] if isinstance(raw, str) else list(raw or [])
    instructions = body.get("instructions")
    return items, instructions if isinstance(instructions, str) else None


def _compacted(
    body: Mapping[str, Any], items: list[Any], tokens: int, created: int
) -> dict[str, Any]:
    """``responses.compact``: every user message kept, the rest in one compaction item."""
    kept: list[dict[str, Any]] = []
    folded: list[str] = []
    for item in items:
        if not isinstance(item, Mapping):
            continue
        is_user = item.get("role") == "user" and item.get("type") in (None, "message")
        if is_user:
            content = item.get("content")
            parts = (
                [{"type": "input_text", "text": content}] if isinstance(content, str) else content
            )
            kept.append(
                {
                    "id": _new_id("msg"),
                    "type": "message",
                    "role": "user",
                    "status": "completed",
                    "content": parts,
                }
            )
        else:
            folded.append(json.dumps(item, separators=(",", ":"))[:200])
    summary = f"compacted {len(folded)} items: " + " | ".join(folded)[-400:]
    compaction = {
        "id": _new_id("cmp"),
        "type": "compaction",
        "encrypted_content": base64.b64encode(summary.encode()).decode(),
    }
    output = [*kept, compaction]
    out_tokens = approx_tokens(output)
    return {
        "id": _new_id("resp"),
        "object": "response.compaction",
        "created_at": created,
        "output": output,
        "usage": {
            "input_tokens": tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": out_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": tokens + out_tokens,
        },
    }


# --------------------------------------------------------------------------- #
# Serving
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class RunningStub:
    """A stub being served.

    Attributes:
        stub: its state (queue replies, read requests).
        host: the host clients connect to.
        port: the bound port.
    """

    stub: OpenAIStub
    host: str
    port: int

    @property
    def base_url(self) -> str:
        """What ``OPENAI_BASE_URL`` (or ``AsyncOpenAI(base_url=...)``) takes: ``.../v1``."""
        return base_url(self.host, self.port) + "/v1"


def create_app(stub: OpenAIStub | None = None) -> Starlette:
    """The ASGI app for ``stub`` (a fresh one if None); the stub is ``app.state.stub``."""
    stub = stub or OpenAIStub()
    app = stub.app()
    app.state.stub = stub
    return app


@contextlib.contextmanager
def serve(
    stub: OpenAIStub | None = None, host: str = "127.0.0.1", port: int = 0
) -> Iterator[RunningStub]:
    """Serve a stub with uvicorn in a background thread until the block exits.

    Args:
        stub: the stub (a fresh one if None).
        host: the interface to bind.
        port: the port, 0 for a free one.

    Yields:
        Where it listens, once it accepts connections.
    """
    stub = stub or OpenAIStub()
    logging.getLogger("uvicorn.error").addFilter(_DropStreamCutTraceback())
    config = uvicorn.Config(
        create_app(stub),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    with serve_uvicorn(
        config,
        host,
        port,
        thread_name="rejoin-openai-stub",
        description="the OpenAI stub",
        stop_timeout=5,
        before_stop=stub.release,
    ) as served:
        yield RunningStub(stub=stub, host=served.host, port=served.port)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m rejoin_local.openai_stub [--host H] [--port N] [--delay S]``."""
    parser = argparse.ArgumentParser(
        prog="python -m rejoin_local.openai_stub", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    parser.add_argument(
        "--delay", type=float, default=0.02, help="seconds between streamed words (default 0.02)"
    )
    parser.add_argument("--api-key", help="require this key (default: accept any)")
    args = parser.parse_args(argv)
    stub = OpenAIStub(api_key=args.api_key, delta_delay=args.delay)
    logging.getLogger("uvicorn.error").addFilter(_DropStreamCutTraceback())
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(args.host, args.host)
    url = base_url(shown, args.port) + "/v1"
    print(f"OpenAI stub at {url}", flush=True)
    print(f"  OPENAI_API_KEY=x OPENAI_BASE_URL={url} make dev", flush=True)
    uvicorn.run(create_app(stub), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
