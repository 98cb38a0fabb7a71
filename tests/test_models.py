"""The scripted and offline models drive the real Agents SDK Runner, with no network."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from agents import (
    Agent,
    FunctionTool,
    ModelSettings,
    RawResponsesStreamEvent,
    Runner,
    RunResultStreaming,
    function_tool,
    set_tracing_disabled,
)
from agents.models.interface import ModelTracing
from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
from agents.models.openai_responses import OpenAIResponsesModel

from rejoin import models
from rejoin.models import (
    OFFLINE_LABEL,
    OfflineModel,
    ScriptedModel,
    ScriptExhaustedError,
    build_model,
    make_current_time_tool,
    split_into_chunks,
)

# 2024-05-06T07:08:09Z
FIXED_NOW = 1714979289.0
FIXED_NOW_ISO = "2024-05-06T07:08:09+00:00"


@pytest.fixture(autouse=True)
def _no_tracing() -> Iterator[None]:
    # Nothing may try to export traces from a test.
    set_tracing_disabled(True)
    yield


class Recorder:
    """A ``lookup`` function tool that records the arguments it was called with."""

    def __init__(self) -> None:
        self.calls: list[str] = []

        def lookup(city: str) -> str:
            """Look up the weather of a city.

            Args:
                city: the city.
            """
            self.calls.append(city)
            return f"sunny in {city}"

        self.tool: FunctionTool = function_tool(lookup)


def _items_of_type(model_input: Any, item_type: str) -> list[dict[str, Any]]:
    assert isinstance(model_input, list)
    return [item for item in model_input if item.get("type") == item_type]


async def _collect_stream(result: RunResultStreaming) -> list[str]:
    """Consume a streamed run; return its text deltas in order."""
    deltas: list[str] = []
    async for event in result.stream_events():
        if isinstance(event, RawResponsesStreamEvent) and (
            event.data.type == "response.output_text.delta"
        ):
            deltas.append(event.data.delta)
    return deltas


def test_split_into_chunks_gives_words_that_join_back_to_the_text() -> None:
    # GIVEN text with irregular whitespace
    text = "  Hello,  world!\nHow are you? "
    # WHEN it is split
    chunks = split_into_chunks(text)
    # THEN there is one chunk per word and nothing is lost
    assert len(chunks) == 5
    assert "".join(chunks) == text
    assert split_into_chunks("") == []
    assert split_into_chunks("   ") == ["   "]


# --------------------------------------------------------------------------- #
# ScriptedModel
# --------------------------------------------------------------------------- #


async def test_run_executes_the_scripted_tool_call_then_answers() -> None:
    # GIVEN a script: a tool call, then a text answer
    recorder = Recorder()
    model = ScriptedModel(
        [
            ScriptedModel.tool_call("lookup", {"city": "Paris"}, call_id="call_paris"),
            ScriptedModel.text("It is sunny in Paris."),
        ]
    )
    agent = Agent(name="weather", instructions="Be brief.", model=model, tools=[recorder.tool])

    # WHEN the Runner runs it
    result = await Runner.run(agent, "Weather in Paris?")

    # THEN the SDK ran the tool with the scripted arguments between the two calls
    assert result.final_output == "It is sunny in Paris."
    assert recorder.calls == ["Paris"]
    assert len(model.calls) == 2
    assert model.remaining == 0
    first, second = model.calls
    assert first.system_instructions == "Be brief."
    assert first.tool_names == ("lookup",)
    assert first.streamed is False
    # AND the second call saw the tool's output for the scripted call id
    outputs = _items_of_type(second.input, "function_call_output")
    assert [(o["call_id"], o["output"]) for o in outputs] == [("call_paris", "sunny in Paris")]


async def test_calls_record_a_deep_copy_of_the_input() -> None:
    # GIVEN a model called directly with a list input
    model = ScriptedModel([ScriptedModel.text("ok")])
    message: dict[str, Any] = {"role": "user", "content": "before"}
    sent: list[Any] = [message]
    await model.get_response(
        "instructions",
        sent,
        ModelSettings(),
        [],
        None,
        [],
        ModelTracing.DISABLED,
        previous_response_id=None,
        conversation_id=None,
        prompt=None,
    )

    # WHEN the caller changes the list and the item afterwards
    message["content"] = "after"
    sent.append({"role": "user", "content": "later"})

    # THEN the recorded call still shows what the model was sent
    assert model.calls[0].input == [{"role": "user", "content": "before"}]
    assert model.calls[0].system_instructions == "instructions"


async def test_one_step_may_hold_reasoning_and_several_tool_calls() -> None:
    # GIVEN a step with a reasoning item and two tool calls
    recorder = Recorder()
    model = ScriptedModel(
        [
            ScriptedModel.step(
                ScriptedModel.reasoning("Two cities, two lookups."),
                ScriptedModel.tool_call("lookup", {"city": "Rome"}),
                ScriptedModel.tool_call("lookup", {"city": "Lima"}),
            ),
            ScriptedModel.text("Both sunny."),
        ]
    )
    agent = Agent(name="a", model=model, tools=[recorder.tool])

    # WHEN it runs
    result = await Runner.run(agent, "Rome and Lima?")

    # THEN both tools ran, with distinct generated call ids, and the run finished
    assert sorted(recorder.calls) == ["Lima", "Rome"]
    outputs = _items_of_type(model.calls[1].input, "function_call_output")
    assert len({o["call_id"] for o in outputs}) == 2
    assert _items_of_type(model.calls[1].input, "reasoning")
    assert result.final_output == "Both sunny."


async def test_streamed_run_yields_several_deltas_that_join_to_the_final_output() -> None:
    # GIVEN a tool call then a multi-word answer, streamed
    recorder = Recorder()
    text = "It is sunny in Paris today, enjoy it."
    model = ScriptedModel([ScriptedModel.tool_call("lookup", {"city": "Paris"}), text])
    agent = Agent(name="a", model=model, tools=[recorder.tool])

    # WHEN the streamed run is consumed
    result = Runner.run_streamed(agent, "Weather?")
    deltas = await _collect_stream(result)

    # THEN the text arrived in many deltas that add up to the final output
    assert len(deltas) > 1
    assert "".join(deltas) == result.final_output == text
    assert recorder.calls == ["Paris"]
    assert [call.streamed for call in model.calls] == [True, True]


async def test_streamed_events_follow_the_responses_api_order() -> None:
    # GIVEN a one-message script
    model = ScriptedModel([ScriptedModel.text("one two three")])
    agent = Agent(name="a", model=model)

    # WHEN streamed
    result = Runner.run_streamed(agent, "hi")
    types = [
        event.data.type
        async for event in result.stream_events()
        if isinstance(event, RawResponsesStreamEvent)
    ]

    # THEN the events come in the order the real API sends them
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]


def test_run_sync_works_from_plain_sync_code() -> None:
    # GIVEN a one-step script
    model = ScriptedModel([ScriptedModel.text("hello")])
    agent = Agent(name="a", model=model)
    # WHEN run synchronously
    result = Runner.run_sync(agent, "hi")
    # THEN it answers and recorded the input
    assert result.final_output == "hello"
    assert model.calls[0].input == [{"role": "user", "content": "hi"}]


async def test_fail_raises_through_the_runner() -> None:
    # GIVEN a script whose first step fails
    model = ScriptedModel([ScriptedModel.fail(ConnectionError("model is down"))])
    agent = Agent(name="a", model=model)
    # WHEN / THEN the error reaches the caller
    with pytest.raises(ConnectionError, match="model is down"):
        await Runner.run(agent, "hi")
    assert len(model.calls) == 1


async def test_fail_after_deltas_raises_midway_through_a_streamed_run() -> None:
    # GIVEN a step that streams three words of six then fails
    boom = TimeoutError("connection lost halfway")
    model = ScriptedModel(
        [ScriptedModel.fail_after_deltas("one two three four five six", boom, deltas=3)]
    )
    agent = Agent(name="a", model=model)
    result = Runner.run_streamed(agent, "count")
    deltas: list[str] = []

    # WHEN the stream is consumed
    with pytest.raises(TimeoutError, match="halfway"):
        async for event in result.stream_events():
            if isinstance(event, RawResponsesStreamEvent):
                assert event.data.type != "response.completed"
                if event.data.type == "response.output_text.delta":
                    deltas.append(event.data.delta)

    # THEN exactly the first three words were seen before the failure
    assert "".join(deltas) == "one two three "


async def test_fail_after_deltas_defaults_to_half_the_words_and_fails_unstreamed_too() -> None:
    # GIVEN a failing step with the default delta count
    step = ScriptedModel.fail_after_deltas("a b c d", RuntimeError("cut"))
    # THEN it fails after half the words
    assert step.deltas_before_error == 2
    # AND run (not streamed) raises without any answer
    with pytest.raises(RuntimeError, match="cut"):
        await Runner.run(Agent(name="a", model=ScriptedModel([step])), "hi")


async def test_an_exhausted_script_raises_a_clear_error() -> None:
    # GIVEN a script with one step
    model = ScriptedModel([ScriptedModel.text("only once")])
    agent = Agent(name="a", model=model)
    await Runner.run(agent, "first")
    # WHEN it is called a second time
    # THEN the error says so
    with pytest.raises(ScriptExhaustedError, match=r"call 2 .* only 1 step"):
        await Runner.run(agent, "second")


# --------------------------------------------------------------------------- #
# OfflineModel and the current_time tool
# --------------------------------------------------------------------------- #


async def test_offline_model_echoes_the_speaker_and_counts_the_messages() -> None:
    # GIVEN a conversation with history and a new message from Ada
    history: list[Any] = [
        {"role": "user", "content": "Bob: hello"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hi Bob", "annotations": []}],
        },
        {"role": "user", "content": [{"type": "input_text", "text": "Ada: is anyone here?"}]},
    ]
    agent = Agent(name="a", model=OfflineModel(delay=0))

    # WHEN the offline model answers
    result = await Runner.run(agent, history)

    # THEN the answer is labelled, names the speaker, quotes her text and counts 3 messages
    answer = result.final_output
    assert answer.startswith(OFFLINE_LABEL)
    assert 'Ada, you said: "is anyone here?"' in answer
    assert "OPENAI_API_KEY" in answer
    assert "This conversation has 3 messages so far." in answer


async def test_offline_model_without_a_speaker_prefix_still_answers() -> None:
    # GIVEN a plain string input
    agent = Agent(name="a", model=OfflineModel(delay=0))
    # WHEN it answers
    result = await Runner.run(agent, "just text")
    # THEN it quotes the text and counts one message
    assert result.final_output.startswith(f'{OFFLINE_LABEL} You said: "just text".')
    assert "1 message so far." in result.final_output


async def test_offline_model_asks_the_clock_and_answers_with_its_output() -> None:
    # GIVEN the offline model with the current_time tool on a fixed clock
    clock_reads: list[float] = []

    def clock() -> float:
        clock_reads.append(FIXED_NOW)
        return FIXED_NOW

    agent = Agent(name="a", model=OfflineModel(delay=0), tools=[make_current_time_tool(clock)])

    # WHEN Ada asks for the time
    result = await Runner.run(agent, [{"role": "user", "content": "Ada: what time is it?"}])

    # THEN the tool ran once and the answer gives its output to Ada
    assert clock_reads == [FIXED_NOW]
    calls = [item for item in result.to_input_list() if item.get("type") == "function_call"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("current_time", {})]
    assert result.final_output == (
        f"{OFFLINE_LABEL} Ada, the current_time tool says it is {FIXED_NOW_ISO} (UTC)."
    )


async def test_offline_model_does_not_call_a_tool_the_agent_lacks() -> None:
    # GIVEN an agent without the current_time tool
    agent = Agent(name="a", model=OfflineModel(delay=0))
    # WHEN asked for the date
    result = await Runner.run(agent, "Ada: what is the date?")
    # THEN it answers directly, with no tool call
    assert not [i for i in result.to_input_list() if i.get("type") == "function_call"]
    assert 'Ada, you said: "what is the date?"' in result.final_output


async def test_offline_model_streams_word_by_word_with_a_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN the offline model with a delay, and sleeps recorded instead of waited
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float) -> None:
        if seconds > 0:  # the SDK sleeps too, for 0 s
            sleeps.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(models.asyncio, "sleep", fake_sleep)
    agent = Agent(name="a", model=OfflineModel(delay=0.05))

    # WHEN a streamed run is consumed
    result = Runner.run_streamed(agent, "Ada: hello there")
    deltas = await _collect_stream(result)

    # THEN the answer came in many deltas, with the delay between each two
    assert len(deltas) > 5
    assert "".join(deltas) == result.final_output
    assert sleeps == [0.05] * (len(deltas) - 1)


def test_current_time_tool_is_named_current_time_and_takes_no_arguments() -> None:
    tool = models.current_time_tool()
    assert tool.name == "current_time"
    assert tool.params_json_schema.get("properties", {}) == {}


# --------------------------------------------------------------------------- #
# build_model
# --------------------------------------------------------------------------- #


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("build_model opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.usefixtures("no_network")
def test_build_model_without_a_key_is_the_offline_model_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # GIVEN a process that has not warned yet
    monkeypatch.setattr(models, "_offline_warning_logged", False)
    caplog.set_level(logging.WARNING, logger="rejoin")
    # WHEN a model is built twice without a key (None, then empty)
    first = build_model(api_key=None, model="gpt-4.1-mini")
    second = build_model(api_key="", model="gpt-4.1-mini")
    # THEN both are offline, and the warning was logged once
    assert isinstance(first, OfflineModel)
    assert isinstance(second, OfflineModel)
    warnings = [r.getMessage() for r in caplog.records if r.name == "rejoin"]
    assert warnings == ["OPENAI_API_KEY is not set: using the offline stand-in model"]


@pytest.mark.usefixtures("no_network")
def test_build_model_with_a_key_is_the_responses_model() -> None:
    # WHEN a model is built with a key
    model = build_model(api_key="sk-test", model="gpt-4.1-mini")
    # THEN it is the Responses model for that name, built without any connection
    assert isinstance(model, OpenAIResponsesModel)
    assert model.model == "gpt-4.1-mini"


@pytest.mark.usefixtures("no_network")
def test_build_model_with_a_base_url_speaks_chat_completions() -> None:
    # WHEN a model is built for an OpenAI-compatible server
    model = build_model(api_key="key", model="llama3", base_url="http://localhost:11434/v1")
    # THEN it is the Chat Completions model pointed at that server
    assert isinstance(model, OpenAIChatCompletionsModel)
    assert model.model == "llama3"
    assert str(model._client.base_url).startswith("http://localhost:11434/v1")


def test_a_script_rejects_what_is_not_a_step() -> None:
    # GIVEN / WHEN a script holds something that is not a step
    # THEN it fails at construction, naming the culprit
    with pytest.raises(TypeError, match="not a script step: 42"):
        ScriptedModel([ScriptedModel.text("ok"), 42])  # type: ignore[list-item]
