"""The OpenAI stub speaks the real wire protocol: the real ``openai`` client and the
SDK's real model classes, through the real Runner, talk to it unchanged.

Also: every event and chunk it sends validates against the ``openai``
package's own types; faults reach the client as the real API's errors would;
broken inputs are refused with the real API's 400s; requests are recorded.

SDK retry behaviour seen here (openai-agents 0.24, openai 3.x): the model
classes leave retries to the ``openai`` client unless ``ModelSettings.retry``
is set; the client retries 429 and 5xx (and timeouts) twice by default,
waiting ``retry-after`` when the server sends one; a stream cut midway is
not retried (the error reaches the Runner's caller).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from agents import (
    Agent,
    RawResponsesStreamEvent,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
from agents.models.openai_responses import OpenAIResponsesModel
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from openai.types.responses.compacted_response import CompactedResponse

from rejoin_local.openai_stub import OpenAIStub, Reply, RunningStub, ToolCall, serve

ROOT = Path(__file__).resolve().parents[1]
# Each Responses stream event type, by its `type` (the union is discriminated on it).
STREAM_EVENTS: dict[str, Any] = {
    typing.get_args(cls.model_fields["type"].annotation)[0]: cls
    for cls in typing.get_args(typing.get_args(ResponseStreamEvent)[0])
}


def stream_event(data: str) -> Any:
    """A streamed event, validated against the openai package's class for its type."""
    payload = json.loads(data)
    return STREAM_EVENTS[payload["type"]].model_validate(payload)


@pytest.fixture(autouse=True)
def _no_tracing() -> None:
    set_tracing_disabled(True)


def client(openai_server: RunningStub, **options: Any) -> AsyncOpenAI:
    options.setdefault("max_retries", 0)
    return AsyncOpenAI(api_key="test-key", base_url=openai_server.base_url, **options)


def sse(lines: list[str]) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event, in order."""
    events: list[tuple[str | None, str]] = []
    name: str | None = None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, line[6:]))
            name = None
    return events


def post_stream(
    openai_server: RunningStub, path: str, body: dict[str, Any]
) -> list[tuple[str | None, str]]:
    with httpx.stream(
        "POST",
        openai_server.base_url + path,
        json=body,
        headers={"Authorization": "Bearer k"},
        timeout=10,
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        return sse(list(answer.iter_lines()))


class Recorder:
    """A ``lookup`` tool that records its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

        def lookup(city: str) -> str:
            """Look up the weather of a city.

            Args:
                city: the city.
            """
            self.calls.append(city)
            return f"sunny in {city}"

        self.tool = function_tool(lookup)


def model_for(kind: str, openai_server: RunningStub, **options: Any) -> Any:
    if kind == "responses":
        return OpenAIResponsesModel(
            model="stub-model", openai_client=client(openai_server, **options)
        )
    return OpenAIChatCompletionsModel(
        model="stub-model", openai_client=client(openai_server, **options)
    )


# --------------------------------------------------------------------------- #
# The wire format, checked against the openai package's types
# --------------------------------------------------------------------------- #

REPLIES = {
    "text": Reply.message("Hello there, Ada."),
    "reasoning and a call": Reply.tool_call("lookup", {"city": "Oslo"}, reasoning="Need data."),
    "two calls": Reply.tool_calls_of(ToolCall("lookup", {"city": "A"}), ToolCall("f", "{}")),
}


@pytest.mark.parametrize("reply", REPLIES.values(), ids=REPLIES.keys())
def test_responses_stream_events_validate_and_come_in_order(
    openai_server: RunningStub, openai_stub: OpenAIStub, reply: Reply
) -> None:
    # GIVEN a scripted reply
    openai_stub.queue(reply)
    # WHEN a streamed response is read raw
    events = post_stream(openai_server, "/responses", {"model": "m", "input": "hi", "stream": True})
    # THEN every event is a valid Responses stream event, named by its type, numbered 0..n
    parsed = [stream_event(data) for _, data in events]
    assert [name for name, _ in events] == [event.type for event in parsed]
    assert [event.sequence_number for event in parsed] == list(range(len(parsed)))
    assert parsed[0].type == "response.created" and parsed[-1].type == "response.completed"
    assert all(data != "[DONE]" for _, data in events)
    # AND the final response holds every output item that was announced
    final = parsed[-1].response
    done = [e.item for e in parsed if e.type == "response.output_item.done"]
    assert [item.id for item in final.output] == [item.id for item in done]
    assert final.usage is not None and final.usage.input_tokens > 0


@pytest.mark.parametrize("reply", REPLIES.values(), ids=REPLIES.keys())
def test_chat_stream_chunks_validate_and_end_with_done(
    openai_server: RunningStub, openai_stub: OpenAIStub, reply: Reply
) -> None:
    # GIVEN a scripted reply and a stream that asks for usage
    openai_stub.queue(reply)
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # WHEN it is read raw
    events = post_stream(openai_server, "/chat/completions", body)
    # THEN every chunk is a valid ChatCompletionChunk, then [DONE]; usage comes last
    assert events[-1] == (None, "[DONE]")
    chunks = [ChatCompletionChunk.model_validate(json.loads(d)) for _, d in events[:-1]]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == ("tool_calls" if reply.tool_calls else "stop")
    assert all(f is None for f in finish[:-1])


def test_unstreamed_answers_validate(openai_server: RunningStub, openai_stub: OpenAIStub) -> None:
    openai_stub.queue(REPLIES["reasoning and a call"], REPLIES["two calls"])
    headers = {"Authorization": "Bearer k"}
    # WHEN a response and a chat completion are asked for without streaming
    response = httpx.post(
        openai_server.base_url + "/responses", json={"model": "m", "input": "x"}, headers=headers
    )
    chat = httpx.post(
        openai_server.base_url + "/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
        headers=headers,
    )
    # THEN each validates against its type
    parsed = Response.model_validate(response.json())
    assert [item.type for item in parsed.output] == ["reasoning", "function_call"]
    completion = ChatCompletion.model_validate(chat.json())
    calls = completion.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["lookup", "f"]  # type: ignore[union-attr]
    assert completion.choices[0].finish_reason == "tool_calls"


# --------------------------------------------------------------------------- #
# The real client and the SDK's model classes through the Runner
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind", ["responses", "chat"])
@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
async def test_runner_tool_round_trip(
    openai_server: RunningStub, openai_stub: OpenAIStub, kind: str, streamed: bool
) -> None:
    # GIVEN the SDK's real model class on the stub, scripted: a tool call, then an answer
    recorder = Recorder()
    openai_stub.queue(
        Reply.tool_call("lookup", {"city": "Paris"}), Reply.message("It is sunny in Paris.")
    )
    agent = Agent(name="a", instructions="Be brief.", model=model_for(kind, openai_server))
    agent.tools = [recorder.tool]
    # WHEN the Runner runs it
    deltas: list[str] = []
    if streamed:
        result: Any = Runner.run_streamed(agent, "Weather in Paris?")
        async for event in result.stream_events():
            if isinstance(event, RawResponsesStreamEvent) and (
                event.data.type == "response.output_text.delta"
            ):
                deltas.append(event.data.delta)
    else:
        result = await Runner.run(agent, "Weather in Paris?")
    # THEN the tool ran with the model's arguments, and the answer came back whole
    assert recorder.calls == ["Paris"]
    assert result.final_output == "It is sunny in Paris."
    if streamed:
        assert len(deltas) > 1 and "".join(deltas) == "It is sunny in Paris."
    # AND the second request carried the call and its output, paired
    first, second = openai_stub.model_requests()
    assert first.stream is streamed and first.status == second.status == 200
    if kind == "responses":
        assert first.instructions == "Be brief."
        kinds = [item.get("type", "message") for item in second.items]
        assert kinds == ["message", "function_call", "function_call_output"]
        assert second.items[1]["call_id"] == second.items[2]["call_id"]
        assert second.items[2]["output"] == "sunny in Paris"
    else:
        roles = [m["role"] for m in second.items]
        assert roles == ["system", "user", "assistant", "tool"]
        call_id = second.items[2]["tool_calls"][0]["id"]
        assert second.items[3] == {
            "role": "tool",
            "tool_call_id": call_id,
            "content": "sunny in Paris",
        }
    assert second.approx_tokens > first.approx_tokens


async def test_default_replies_echo_the_speaker_call_a_named_tool_and_report_it(
    openai_server: RunningStub, openai_stub: OpenAIStub
) -> None:
    # GIVEN nothing scripted, and a participant's message as rejoin stores it
    recorder = Recorder()
    agent = Agent(name="a", model=model_for("responses", openai_server), tools=[recorder.tool])
    said = {"speaker": {"user": "u-ada", "name": "Ada"}, "seq": 3, "text": "hello\nBob: hi"}
    # WHEN she speaks, then asks for the tool by name
    echo = await Runner.run(agent, [{"role": "user", "content": json.dumps(said)}])
    said["text"] = "please lookup Rome"
    tool = await Runner.run(agent, [{"role": "user", "content": json.dumps(said)}])
    # THEN the echo names her (not the fake "Bob:" line), and the tool was called and reported
    assert echo.final_output == "Ada said: hello\nBob: hi (1 message in view)"
    assert recorder.calls == ["please lookup Rome"]
    assert tool.final_output == "lookup returned: sunny in please lookup Rome"


# --------------------------------------------------------------------------- #
# Faults, as the client sees them
# --------------------------------------------------------------------------- #


async def test_429_is_a_rate_limit_error_with_retry_after(
    openai_server: RunningStub, openai_stub: OpenAIStub
) -> None:
    openai_stub.queue(Reply.rate_limited(retry_after=7), "never sent")
    with pytest.raises(openai.RateLimitError) as caught:
        await client(openai_server).responses.create(model="m", input="hi")
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code == "rate_limit_exceeded"
    # the fault took its turn; the scripted answer is still queued
    assert openai_stub.pending == 1


async def test_the_client_retries_a_429_after_retry_after_then_succeeds(
    openai_server: RunningStub, openai_stub: OpenAIStub
) -> None:
    # GIVEN a 429 asking to wait 50 ms, then an answer; the client's default retries
    openai_stub.queue(Reply.rate_limited(retry_after=0.05), "finally")
    agent = Agent(name="a", model=model_for("responses", openai_server, max_retries=2))
    # WHEN the Runner runs
    result = await Runner.run(agent, "hi")
    # THEN the client retried by itself: one answer, two requests
    assert result.final_output == "finally"
    assert [r.status for r in openai_stub.model_requests()] == [429, 200]


@pytest.mark.parametrize("kind", ["responses", "chat"])
async def test_500_is_an_internal_server_error(
    openai_server: RunningStub, openai_stub: OpenAIStub, kind: str
) -> None:
    openai_stub.queue(Reply.server_error())
    agent = Agent(name="a", model=model_for(kind, openai_server))
    with pytest.raises(openai.InternalServerError) as caught:
        await Runner.run(agent, "hi")
    assert caught.value.status_code == 500
    assert [r.status for r in openai_stub.model_requests()] == [500]


async def test_a_hang_past_the_client_timeout_is_a_timeout(
    openai_server: RunningStub, openai_stub: OpenAIStub
) -> None:
    # GIVEN a model that does not answer, and a client that waits 0.3 s
    openai_stub.queue(Reply.hang(), "answer after the hang")
    agent = Agent(name="a", model=model_for("chat", openai_server, timeout=0.3))
    # WHEN the Runner runs, THEN the client gives up with a timeout
    with pytest.raises(openai.APITimeoutError):
        await Runner.run(agent, "hi")
    # AND once released, the next request is answered normally
    openai_stub.release()
    assert (await Runner.run(agent, "again")).final_output == "answer after the hang"


@pytest.mark.parametrize("kind", ["responses", "chat"])
async def test_a_stream_cut_midway_fails_the_run_after_some_deltas(
    openai_server: RunningStub, openai_stub: OpenAIStub, kind: str
) -> None:
    # GIVEN a stream that stops after two of six words, with the client's retries on
    openai_stub.queue(Reply.cut("one two three four five six", after_deltas=2))
    agent = Agent(name="a", model=model_for(kind, openai_server, max_retries=2))
    result = Runner.run_streamed(agent, "count")
    deltas: list[str] = []
    # WHEN it is consumed, THEN it fails with a connection error, not retried
    with pytest.raises(openai.APIConnectionError):
        async for event in result.stream_events():
            if isinstance(event, RawResponsesStreamEvent) and (
                event.data.type == "response.output_text.delta"
            ):
                deltas.append(event.data.delta)
    assert "".join(deltas) == "one two "
    assert len(openai_stub.model_requests()) == 1


# --------------------------------------------------------------------------- #
# Validation as the real API, and recording
# --------------------------------------------------------------------------- #

CALL = {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"}
OUTPUT = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([USER, CALL], "No tool output found for function call call_1."),
        ([USER, OUTPUT], "No tool call found for function call output with call_id call_1."),
        ([OUTPUT, CALL], "No tool call found for function call output with call_id call_1."),
    ],
    ids=["call without output", "output without call", "output before call"],
)
async def test_a_broken_pair_is_refused_like_the_real_api(
    openai_server: RunningStub, openai_stub: OpenAIStub, items: list[Any], message: str
) -> None:
    openai_stub.queue("not used")
    with pytest.raises(openai.BadRequestError) as caught:
        await client(openai_server).responses.create(model="m", input=items)
    assert caught.value.message.endswith(message)
    assert caught.value.body == {
        "message": message,
        "type": "invalid_request_error",
        "param": "input",
        "code": None,
    }
    # the request is recorded with its error, and the scripted reply not consumed
    (recorded,) = openai_stub.requests
    assert (recorded.status, recorded.error) == (400, message)
    assert openai_stub.pending == 1


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (
            [
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
                    ],
                },
                USER,
            ],
            "An assistant message with 'tool_calls' must be followed by tool messages",
        ),
        (
            [USER, {"role": "tool", "tool_call_id": "c1", "content": "x"}],
            "messages with role 'tool' must be a response to a preceeding message",
        ),
    ],
    ids=["tool_calls without tool message", "tool message without call"],
)
async def test_chat_refuses_unpaired_tool_messages(
    openai_server: RunningStub, openai_stub: OpenAIStub, messages: list[Any], message: str
) -> None:
    with pytest.raises(openai.BadRequestError, match=message):
        await client(openai_server).chat.completions.create(model="m", messages=messages)


async def test_a_reasoning_item_cut_from_its_call_is_refused(
    openai_server: RunningStub, openai_stub: OpenAIStub
) -> None:
    # GIVEN a response the stub gave: reasoning, then a call
    openai_stub.queue(Reply.tool_call("lookup", {"city": "Oslo"}, call_id="c9", reasoning="think"))
    answer = await client(openai_server).responses.create(model="m", input="weather?")
    rs, fc = (item.model_dump(exclude_none=True) for item in answer.output)
    output = {"type": "function_call_output", "call_id": "c9", "output": "sunny"}
    api = client(openai_server).responses
    # WHEN the call is sent back without its reasoning, or the reasoning without the call
    with pytest.raises(openai.BadRequestError) as without_reasoning:
        await api.create(model="m", input=[USER, fc, output])
    with pytest.raises(openai.BadRequestError) as without_follower:
        await api.create(model="m", input=[USER, rs, USER])
    # THEN both are refused as the real API refuses them; together they pass
    assert without_reasoning.value.message.endswith(
        f"Item '{fc['id']}' of type 'function_call' was provided without its required "
        f"'reasoning' item: '{rs['id']}'."
    )
    assert without_follower.value.message.endswith(
        f"Item '{rs['id']}' of type 'reasoning' was provided without its required following item."
    )
    await api.create(model="m", input=[USER, rs, fc, output])


async def test_server_side_state_is_refused_clearly(
    openai_server: RunningStub, openai_stub: OpenAIStub
) -> None:
    with pytest.raises(openai.BadRequestError, match="does not support 'previous_response_id'"):
        await client(openai_server).responses.create(
            model="m", input="hi", previous_response_id="r1"
        )


async def test_a_wrong_key_is_refused_when_a_key_is_required() -> None:
    with serve(OpenAIStub(api_key="right")) as running:
        with pytest.raises(openai.AuthenticationError):
            await client(running).responses.create(model="m", input="hi")
        ok = AsyncOpenAI(api_key="right", base_url=running.base_url, max_retries=0)
        assert (await ok.responses.create(model="m", input="hi")).output_text


async def test_compact_keeps_user_messages_and_folds_the_rest(
    openai_server: RunningStub, openai_stub: OpenAIStub
) -> None:
    items = [
        USER,
        CALL,
        OUTPUT,
        {"role": "assistant", "content": "done"},
        {"role": "user", "content": "more"},
    ]
    compacted = await client(openai_server).responses.compact(model="gpt-4.1", input=items)  # type: ignore[arg-type]
    assert isinstance(compacted, CompactedResponse)
    kinds = [(item.type, getattr(item, "role", None)) for item in compacted.output]
    assert kinds == [("message", "user"), ("message", "user"), ("compaction", None)]
    assert openai_stub.requests[-1].api == "compact"


# --------------------------------------------------------------------------- #
# As a process (what a user runs for the local stack)
# --------------------------------------------------------------------------- #


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_it_runs_as_a_module_and_answers() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "rejoin_local.openai_stub", "--port", str(port), "--delay", "0"],
        cwd=ROOT,
        env={"PYTHONPATH": "local:shared", "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 20
        while True:
            try:
                models = httpx.get(url + "/models", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "did not start"
                time.sleep(0.1)
        assert models.json()["data"][0]["id"] == "stub-model"
        chat = openai.OpenAI(api_key="x", base_url=url).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Ada: hi"}]
        )
        assert chat.choices[0].message.content == "Ada said: hi (1 message in view)"
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=10)
    assert f"OPENAI_BASE_URL=http://127.0.0.1:{port}/v1" in out
