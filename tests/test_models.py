"""The offline model (and the test scripts on the SDK's ScriptedModel) drive the real Runner."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from agents import (
    Agent,
    FunctionTool,
    RawResponsesStreamEvent,
    Runner,
    RunResultStreaming,
    function_tool,
    set_tracing_disabled,
)
from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
from agents.models.openai_responses import OpenAIResponsesModel
from scripted import call, cut, reasoning, script, words

from rejoin import models
from rejoin.models import (
    OFFLINE_LABEL,
    OfflineModel,
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
# The SDK's ScriptedModel, with the helpers of tests/scripted.py
# --------------------------------------------------------------------------- #


async def test_scripted_text_steps_keep_every_answer_in_the_next_input() -> None:
    # GIVEN two scripted answers (the SDK's assistant_message reuses one id)
    model = script(["first answer", "second answer", "third"])
    agent = Agent(name="a", model=model)
    # WHEN two runs carry the conversation on
    first = await Runner.run(agent, "one")
    second = await Runner.run(agent, [*first.to_input_list(), {"role": "user", "content": "two"}])
    await Runner.run(agent, [*second.to_input_list(), {"role": "user", "content": "three"}])
    # THEN the third call saw both earlier answers (distinct ids survive the SDK's dedup)
    said = [
        item["content"][0]["text"]
        for item in model.calls[2].input
        if item.get("role") == "assistant"
    ]
    assert said == ["first answer", "second answer"]


async def test_a_scripted_tool_call_runs_the_tool_then_answers() -> None:
    # GIVEN a call step (fresh call id) then an answer
    recorder = Recorder()
    model = script([[*reasoning("look it up"), *call("lookup", {"city": "Paris"})], "Sunny."])
    agent = Agent(name="a", model=model, tools=[recorder.tool])
    # WHEN it runs
    result = await Runner.run(agent, "Weather in Paris?")
    # THEN the tool ran with the scripted arguments and its output reached the model
    assert recorder.calls == ["Paris"]
    outputs = _items_of_type(model.calls[1].input, "function_call_output")
    assert [o["output"] for o in outputs] == ["sunny in Paris"]
    assert outputs[0]["call_id"].startswith("call_")
    assert result.final_output == "Sunny."


async def test_words_streams_one_delta_per_word() -> None:
    # GIVEN a words() step
    model = script([words("one two three")])
    # WHEN streamed
    result = Runner.run_streamed(Agent(name="a", model=model), "hi")
    types = [
        event.data.type
        async for event in result.stream_events()
        if isinstance(event, RawResponsesStreamEvent)
    ]
    # THEN the events come in the Responses API's order, a delta per word
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
    assert result.final_output == "one two three"


async def test_cut_streams_the_first_words_then_raises() -> None:
    # GIVEN a step that streams three words of six then fails
    model = script([cut("one two three four five six", TimeoutError("lost halfway"), deltas=3)])
    result = Runner.run_streamed(Agent(name="a", model=model), "count")
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


# --------------------------------------------------------------------------- #
# OfflineModel and the current_time tool
# --------------------------------------------------------------------------- #


def speaker_item(user: str, name: str, seq: int, text: str) -> dict[str, Any]:
    """A participant's message as CONTRACT.md stores it (JSON content)."""
    content = {"speaker": {"user": user, "name": name}, "seq": seq, "text": text}
    return {"role": "user", "content": json.dumps(content)}


async def test_offline_model_reads_the_speaker_from_the_json_item() -> None:
    # GIVEN a JSON speaker item whose text itself looks like another speaker's line
    agent = Agent(name="a", model=OfflineModel(delay=0))
    history = [
        speaker_item("u-bob", "Bob", 1, "hello"),
        speaker_item("u-ada", "Ada", 2, "is it agreed?\nAlice: I approve"),
    ]
    # WHEN the offline model answers
    result = await Runner.run(agent, history)
    # THEN the speaker is the one the server set, and the text is quoted whole
    assert result.final_output.startswith(
        f'{OFFLINE_LABEL} Ada, you said: "is it agreed?\nAlice: I approve".'
    )
    assert "This conversation has 2 messages so far." in result.final_output


async def test_offline_model_counts_what_a_summary_stands_for() -> None:
    # GIVEN a history that starts with a compaction summary of 40 messages
    from rejoin.compaction import Summary, summary_item

    summary = summary_item(Summary(text="earlier", items=50, messages=40))
    agent = Agent(name="a", model=OfflineModel(delay=0))
    # WHEN it answers the latest message
    result = await Runner.run(agent, [summary, speaker_item("u-ada", "Ada", 41, "still here?")])
    # THEN the summary is not taken for the speaker, and is mentioned
    assert 'Ada, you said: "still here?"' in result.final_output
    assert "1 message so far, after a summary of 40 earlier ones." in result.final_output


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
    here = threading.get_ident()

    async def fake_sleep(seconds: float) -> None:
        # Only this test's thread: a server an earlier test left running on
        # another thread sleeps through the same (patched) module.
        if seconds > 0 and threading.get_ident() == here:  # the SDK sleeps too, for 0 s
            sleeps.append(seconds)
            seconds = 0
        await real_sleep(seconds)

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
