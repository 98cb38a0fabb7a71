"""The real model path, end to end: the real handlers and turn worker, the real
``openai`` client and the SDK's real model classes (Responses and Chat
Completions), speaking the OpenAI wire protocol (SSE streams, tool calls) to a
local OpenAI-compatible server (``rejoin_local.openai_stub``).

Each fault the model API has (429 with ``retry-after``, 500, no answer within
the timeout, a stream cut midway) ends the same way: nothing of the turn is
stored, the participants get one ``turn_failed`` error, and the retry (SQS
redelivers the record) answers once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from harness import Stack, make_stack

from rejoin.runtime import set_runtime
from rejoin.speakers import parse_spoken
from rejoin.turns import build_agent
from rejoin_local.openai_stub import OpenAIStub, Reply, RunningStub

APIS = ["responses", "chat_completions"]


@pytest.fixture(params=APIS)
def stack(
    request: pytest.FixtureRequest, upstash: Any, openai_server: RunningStub, openai_stub: Any
) -> Iterator[Stack]:
    s = make_stack(
        upstash,
        openai_api_key="sk-test",
        openai_base_url=openai_server.base_url,
        model="gpt-test",
        model_api=request.param,
        model_timeout_seconds=1,
        model_max_retries=0,  # each fault reaches the turn (the SDK's own retries: off)
    )
    s.agent = build_agent(s.rt)
    yield s
    set_runtime(None)


def history(raw_redis: redis.Redis, session: str) -> list[dict[str, Any]]:
    return [json.loads(i) for i in raw_redis.lrange(f"rejoin:{{{session}}}:items", 0, -1)]


def kinds(items: list[dict[str, Any]]) -> list[str]:
    return [i.get("type") or f"message:{i.get('role')}" for i in items]


def test_a_streamed_answer_reaches_everyone_as_deltas_then_one_message(
    stack: Stack, openai_stub: OpenAIStub, raw_redis: redis.Redis
) -> None:
    openai_stub.queue(Reply.message("We decided to ship on Friday, after the review."))
    ada, _ = stack.join("rm", "ada")
    bob, _ = stack.join("rm", "bob")
    stack.say(ada, "what did we decide?")
    stack.run_turns()
    for cid in (ada, bob):
        deltas = stack.frames(cid, "agent_delta")
        (final,) = stack.frames(cid, "agent_message")
        assert deltas and "".join(d["text"] for d in deltas) == final["text"]
        assert final["text"] == "We decided to ship on Friday, after the review."
        assert [d["index"] for d in deltas] == list(range(len(deltas)))
    # the model got the message as the speaker's own item, over the real protocol
    (request,) = openai_stub.model_requests()
    assert request.stream is True
    assert kinds(history(raw_redis, "rm")) == ["message:user", "message"]


def test_a_tool_call_round_trip_is_stored_whole(
    stack: Stack, openai_stub: OpenAIStub, raw_redis: redis.Redis
) -> None:
    openai_stub.queue(
        Reply.tool_call("current_time", {}, call_id="call_clock"),
        Reply.message("It is noon."),
    )
    ada, _ = stack.join("rt", "ada")
    stack.say(ada, "what time is it?")
    stack.run_turns()
    assert stack.last(ada, "agent_message")["text"] == "It is noon."
    items = history(raw_redis, "rt")
    assert kinds(items) == ["message:user", "function_call", "function_call_output", "message"]
    assert items[1]["call_id"] == items[2]["call_id"] == "call_clock"
    # the second request carried the call and its output (the server checks the pairing)
    second = openai_stub.model_requests()[1]
    assert second.status == 200


@pytest.mark.parametrize(
    "fault",
    [
        Reply.rate_limited(retry_after=0.1),
        Reply.server_error(500),
        Reply.hang(),
        Reply.cut("We decided to ship on Friday after all", after_deltas=3),
    ],
    ids=["429", "500", "timeout", "stream-cut"],
)
def test_a_failed_model_call_rolls_back_tells_everyone_and_the_retry_answers_once(
    stack: Stack, openai_stub: OpenAIStub, raw_redis: redis.Redis, fault: Reply
) -> None:
    # GIVEN a tool round that succeeds, then the model failing on the answer
    openai_stub.queue(Reply.tool_call("current_time", {}, call_id="call_1"), fault)
    ada, _ = stack.join("rf", "ada")
    bob, _ = stack.join("rf", "bob")
    stack.say(ada, "what time is it?")
    batch = stack.queue.take("rf")
    # WHEN the turn runs
    result = stack.deliver(batch)
    # THEN it failed: the history holds only the message (no call without output)
    assert len(result["batchItemFailures"]) == 1
    assert kinds(history(raw_redis, "rf")) == ["message:user"]
    for cid in (ada, bob):
        (error,) = stack.frames(cid, "error")
        assert error["code"] == "turn_failed" and error["reply_to"] == batch[0].reply_to
        assert stack.frames(cid, "agent_message") == []
    openai_stub.release()
    # WHEN SQS redelivers it and the model answers
    openai_stub.queue(Reply.tool_call("current_time", {}, call_id="call_2"), "It is noon.")
    assert stack.deliver(batch)["batchItemFailures"] == []
    # THEN one answer, one history
    for cid in (ada, bob):
        assert [m["text"] for m in stack.frames(cid, "agent_message")] == ["It is noon."]
    items = history(raw_redis, "rf")
    assert kinds(items) == ["message:user", "function_call", "function_call_output", "message"]
    said = [parse_spoken(i) for i in items]
    assert [s.text for s in said if s] == ["what time is it?"]


def test_the_local_stack_can_point_at_an_openai_compatible_server(
    openai_server: RunningStub,
) -> None:
    # What `OPENAI_API_KEY=x OPENAI_BASE_URL=http://127.0.0.1:N/v1 make dev` builds.
    from rejoin.config import Settings
    from rejoin.runtime import Runtime

    settings = Settings.from_env(
        {
            "OPENAI_API_KEY": "x",
            "OPENAI_BASE_URL": openai_server.base_url,
            "REJOIN_MODEL": "gpt-test",
        }
    )
    agent = build_agent(Runtime(settings))
    assert type(agent.model).__name__ == "OpenAIChatCompletionsModel"
    assert str(agent.model._client.base_url).rstrip("/") == openai_server.base_url  # type: ignore[attr-defined]
    assert isinstance(openai_server.stub, OpenAIStub)
