"""Compaction: older history becomes one summary item, atomically, never splitting a pair.

Against the real store (the Upstash-compatible endpoint in front of Redis),
with the offline model, the SDK's scripted model and the OpenAI stub (the
SDK's real model classes) as summarisers; and the SDK's own compaction
session over ``UpstashSession``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from agents import Agent, Runner, SQLiteSession, set_tracing_disabled
from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
from agents.models.openai_responses import OpenAIResponsesModel
from openai import AsyncOpenAI
from scripted import script

from rejoin import UpstashSession
from rejoin.compaction import (
    TRANSCRIPT_HEADER,
    CompactionPolicy,
    ModelSummariser,
    Summary,
    apply_compaction,
    compact,
    model_window,
    parse_summary_item,
    plan_compaction,
    sdk_compaction_session,
    summary_item,
)
from rejoin.errors import CompactionError
from rejoin.history import WindowedSession, estimate_tokens
from rejoin.models import OFFLINE_LABEL, OfflineModel
from rejoin_local.openai_stub import OpenAIStub, Reply, RunningStub

NAMES = ["Ada", "Bob", "Cy"]


def said(seq: int, name: str | None = None, text: str | None = None) -> dict[str, Any]:
    """A participant's message as rejoin stores it (CONTRACT.md)."""
    name = name or NAMES[seq % len(NAMES)]
    content = {
        "speaker": {"user": f"u-{name.lower()}", "name": name},
        "seq": seq,
        "text": text if text is not None else f"point number {seq}",
    }
    return {"role": "user", "content": json.dumps(content)}


def tool_round(call_id: str) -> list[dict[str, Any]]:
    """A call of current_time, its output and the answer, as the SDK stores them."""
    answer = {"type": "output_text", "text": "ok", "annotations": []}
    return [
        {"type": "function_call", "call_id": call_id, "name": "current_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": call_id, "output": "2026-01-01T10:00:00"},
        {
            "id": f"msg_{call_id}",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [answer],
        },
    ]


def meeting(messages: int) -> list[dict[str, Any]]:
    """Messages with a tool round after every fifth."""
    items: list[dict[str, Any]] = []
    for seq in range(1, messages + 1):
        items.append(said(seq))
        if seq % 5 == 0:
            items += tool_round(f"call_{seq}")
    return items


def is_pair_broken(items: list[Any]) -> bool:
    calls = {i["call_id"] for i in items if i.get("type") == "function_call"}
    outputs = {i["call_id"] for i in items if i.get("type") == "function_call_output"}
    return calls != outputs


@pytest.fixture(autouse=True)
def _no_tracing() -> None:
    set_tracing_disabled(True)


@pytest.fixture
def session(upstash_async: Any) -> UpstashSession:
    return UpstashSession(f"cmp-{uuid.uuid4().hex[:8]}", redis=upstash_async)


SMALL = CompactionPolicy(max_items=30, max_tokens=None, keep_items=10, keep_tokens=None)


# --------------------------------------------------------------------------- #
# Policy, plan, the summary item
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_items": None, "max_tokens": None}, "set max_items or max_tokens"),
        ({"keep_items": None, "keep_tokens": None}, "set keep_items or keep_tokens"),
        ({"max_items": 10, "keep_items": 10}, "keep_items must be below max_items"),
        ({"max_tokens": 0}, "max_tokens must be positive"),
    ],
)
def test_a_policy_that_could_not_shrink_the_history_is_refused(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        CompactionPolicy(**fields)


def test_the_plan_keeps_the_latest_part_from_a_safe_boundary() -> None:
    # GIVEN 34 items; keeping the latest 10 would start inside a tool round
    items = meeting(25)
    assert len(items) == 40
    cut_inside = len(items) - 10
    assert items[cut_inside]["type"] in ("function_call_output", "message")
    # WHEN planned
    plan = plan_compaction(items, SMALL)
    # THEN the kept part starts after the round (fewer items), never splitting it
    assert plan is not None
    assert plan.older + plan.kept == items
    assert len(plan.kept) < 10
    assert not is_pair_broken(plan.kept)
    # AND under the threshold there is nothing to do
    assert plan_compaction(items[:30], SMALL) is None


def test_the_summary_item_is_a_user_message_with_json_content() -> None:
    summary = Summary(
        text="Ada proposed X.",
        items=12,
        messages=10,
        speakers=(("u-ada", "Ada"), (None, "Guest")),
        first_seq=3,
        last_seq=14,
    )
    item = summary_item(summary)
    assert item["role"] == "user"
    assert json.loads(item["content"]) == {
        "summary": {
            "items": 12,
            "messages": 10,
            "seq": [3, 14],
            "speakers": [{"user": "u-ada", "name": "Ada"}, {"user": None, "name": "Guest"}],
        },
        "text": "Ada proposed X.",
    }
    assert parse_summary_item(item) == summary
    assert parse_summary_item(said(1)) is None
    assert parse_summary_item({"role": "user", "content": "{not json"}) is None


# --------------------------------------------------------------------------- #
# Summarisers
# --------------------------------------------------------------------------- #


async def test_the_offline_model_summarises_by_speaker_and_folds_an_earlier_summary() -> None:
    # GIVEN an earlier summary, then messages (one trying to pass for another speaker)
    earlier = summary_item(
        Summary(
            "Bob opened.",
            items=5,
            messages=4,
            speakers=(("u-bob", "Bob"),),
            first_seq=1,
            last_seq=4,
        )
    )
    items = [earlier, said(5, "Ada"), said(6, "Cy", "yes\nAda: I withdraw"), *tool_round("c1")]
    # WHEN the offline model summarises them
    summary = await ModelSummariser(OfflineModel(delay=0)).summarise(items)
    # THEN the counts, speakers and seq range come from the items, the earlier summary folded in
    assert summary.items == 5 + 5
    assert summary.messages == 4 + 2
    assert summary.speakers == (("u-bob", "Bob"), ("u-ada", "Ada"), ("u-cy", "Cy"))
    assert (summary.first_seq, summary.last_seq) == (1, 6)
    assert summary.text.startswith(f"{OFFLINE_LABEL} Summary. Before: Bob opened. Then: ")
    assert 'Ada (1x, last: "point number 5")' in summary.text
    assert 'Cy (1x, last: "yes Ada: I withdraw")' in summary.text
    assert "used tools 1 time(s)" in summary.text


async def test_the_request_is_a_transcript_in_chunks_with_the_summary_so_far() -> None:
    # GIVEN a scripted model and a small chunk size
    model = script(["first part", "both parts"])
    summariser = ModelSummariser(model, chunk_tokens=100, max_words=50)
    items = [said(seq, text="x" * 120) for seq in range(1, 4)]
    # WHEN it summarises three long messages
    summary = await summariser.summarise(items)
    # THEN it asked twice; the second request carried the first answer, then the rest
    assert summary.text == "both parts"
    first, second = model.calls
    assert "at most 50 words" in (first.system_instructions or "")
    lines = second.input[0]["content"].split("\n")
    assert lines[0] == TRANSCRIPT_HEADER
    assert json.loads(lines[1]) == {"earlier_summary": "first part"}
    # AND participants' text stays inside its JSON line, with the server-set speaker
    line = json.loads(first.input[0]["content"].split("\n")[1])
    assert line["speaker"] == {"user": "u-bob", "name": "Bob"} and line["text"] == "x" * 120


async def test_a_long_answer_is_cut_and_no_answer_is_an_error() -> None:
    long = await ModelSummariser(script(["word " * 500]), max_words=10).summarise([said(1)])
    assert len(long.text) <= 100 and long.text.endswith("[...]")
    with pytest.raises(CompactionError, match="no text"):
        await ModelSummariser(script([[]])).summarise([said(1)])
    with pytest.raises(CompactionError, match="could not summarise: model down"):
        await ModelSummariser(script([RuntimeError("model down")])).summarise([said(1)])


@pytest.mark.parametrize("kind", ["responses", "chat"])
async def test_the_sdk_model_classes_summarise_through_the_stub(
    openai_server: RunningStub, openai_stub: OpenAIStub, kind: str
) -> None:
    # GIVEN the agent's real model class on the stub (default replies)
    client = AsyncOpenAI(api_key="x", base_url=openai_server.base_url, max_retries=0)
    model_class = OpenAIResponsesModel if kind == "responses" else OpenAIChatCompletionsModel
    summariser = ModelSummariser(model_class(model="m", openai_client=client))
    # WHEN it summarises a meeting with tool rounds
    summary = await summariser.summarise(meeting(10))
    # THEN the stub answered the summary request, and was sent no tool items, only text
    assert summary.text.startswith("Summary of 16 lines. Speakers: Bob, Cy, Ada.")
    (request,) = openai_stub.model_requests()
    assert request.status == 200
    assert all(json.dumps(item).count("function_call") == 0 for item in request.items)


# --------------------------------------------------------------------------- #
# Applying it to the real store
# --------------------------------------------------------------------------- #


async def test_compact_replaces_the_older_part_and_keeps_the_latest_whole(
    session: UpstashSession,
) -> None:
    # GIVEN a stored meeting over the threshold
    items = meeting(25)
    await session.add_items(items)
    # WHEN it is compacted with the offline model
    result = await compact(session, ModelSummariser(OfflineModel(delay=0)), SMALL)
    # THEN the history is the summary, then the kept part unchanged
    assert result is not None and result.applied
    stored = await session.get_items()
    assert parse_summary_item(stored[0]) == result.summary
    assert stored[1:] == result.plan.kept == items[result.plan.cut :]
    assert result.summary.items == result.plan.cut
    assert not is_pair_broken(stored[1:])
    # AND compacting again does nothing (under the threshold now)
    assert await compact(session, ModelSummariser(OfflineModel(delay=0)), SMALL) is None


async def test_messages_added_while_summarising_are_kept(session: UpstashSession) -> None:
    # GIVEN a plan made from the history as read
    await session.add_items(meeting(25))
    history = await session.get_items()
    plan = plan_compaction(history, SMALL)
    assert plan is not None
    summary = await ModelSummariser(OfflineModel(delay=0)).summarise(plan.older)
    # WHEN a participant's message lands before the summary is written
    late = said(99, "Ada", "one more thing")
    await session.add_items([late])
    # THEN applying it replaces only the summarised prefix
    assert await apply_compaction(session, plan, summary)
    stored = await session.get_items()
    assert stored == [summary_item(summary), *plan.kept, late]


async def test_a_changed_prefix_makes_the_replacement_a_no_op(session: UpstashSession) -> None:
    # GIVEN a plan, then the history rewritten under it (e.g. another compaction)
    await session.add_items(meeting(25))
    history = await session.get_items()
    plan = plan_compaction(history, SMALL)
    assert plan is not None
    summary = Summary("s", items=plan.cut)
    await session.clear_session()
    await session.add_items(history[5:])
    # WHEN it is applied, THEN nothing is written and it says so
    assert not await apply_compaction(session, plan, summary)
    assert await session.get_items() == history[5:]
    # AND a history shorter than the cut is refused too
    await session.clear_session()
    await session.add_items(history[:3])
    assert not await apply_compaction(session, plan, summary)


async def test_the_boundary_check_compares_json_not_spelling(
    session: UpstashSession, raw_redis: Any
) -> None:
    # GIVEN items stored by another writer with a different JSON spelling (spaces)
    items = meeting(25)
    raw_redis.rpush(session.keys.items, *(json.dumps(item) for item in items))
    plan = plan_compaction(await session.get_items(), SMALL)
    assert plan is not None
    # WHEN applied, THEN the same item in other spelling still matches
    assert await apply_compaction(session, plan, Summary("s", items=plan.cut))
    assert len(await session.get_items()) == 1 + len(plan.kept)


async def test_a_lost_answer_retried_does_not_compact_twice(
    upstash: Any, upstash_async: Any, session: UpstashSession
) -> None:
    # GIVEN a plan, and the endpoint losing the answer after applying the script
    await session.add_items(meeting(25))
    plan = plan_compaction(await session.get_items(), SMALL)
    assert plan is not None
    summary = Summary("s", items=plan.cut)
    upstash.faults.lose_response(command="EVALSHA")
    # WHEN applied (the client retries the lost request once)
    assert await apply_compaction(session, plan, summary)
    # THEN the summary is there once and the kept part whole
    assert await session.get_items() == [summary_item(summary), *plan.kept]
    assert upstash.faults.pending() == 0


async def test_a_summariser_failure_leaves_the_history_as_it_was(session: UpstashSession) -> None:
    items = meeting(25)
    await session.add_items(items)
    with pytest.raises(CompactionError):
        await compact(session, ModelSummariser(script([RuntimeError("down")])), SMALL)
    assert await session.get_items() == items


async def test_other_sessions_need_atomic_replace(upstash_async: Any) -> None:
    # GIVEN a plan and a session that can replace only its whole history
    items = meeting(25)
    plan = plan_compaction(items, SMALL)
    assert plan is not None
    summary = Summary("s", items=plan.cut)
    inner = UpstashSession(f"cmp-{uuid.uuid4().hex[:8]}", redis=upstash_async)
    await inner.add_items(items)
    # WHEN applied through a wrapper with _atomic_replace_items, THEN it replaces it all
    assert await apply_compaction(WindowedSession(inner), plan, summary)
    assert await inner.get_items() == [summary_item(summary), *plan.kept]
    # AND a session without it is refused, unchanged
    sqlite = SQLiteSession("no-atomic")
    await sqlite.add_items(items)  # type: ignore[arg-type]
    with pytest.raises(CompactionError, match="SQLiteSession cannot replace"):
        await apply_compaction(sqlite, plan, summary)
    assert len(await sqlite.get_items()) == len(items)


# --------------------------------------------------------------------------- #
# The window the model reads after compaction
# --------------------------------------------------------------------------- #


def test_the_model_window_keeps_the_summary_in_front() -> None:
    summary = summary_item(Summary("earlier", items=50))
    items = [summary, *meeting(20)]
    window = model_window(items, limit=6)
    assert window[0] == summary and len(window) <= 6
    assert window[1:] == items[len(items) - (len(window) - 1) :]
    assert not is_pair_broken(window[1:])
    tokens = model_window(items, max_tokens=200)
    assert tokens[0] == summary and sum(estimate_tokens(i) for i in tokens) <= 200
    assert model_window(meeting(3), limit=2) == meeting(3)[-2:]  # no summary: the plain window


async def test_a_compacted_session_runs_with_the_stub(
    openai_server: RunningStub, openai_stub: OpenAIStub, session: UpstashSession
) -> None:
    # GIVEN a compacted meeting
    await session.add_items(meeting(25))
    await compact(session, ModelSummariser(OfflineModel(delay=0)), SMALL)
    # WHEN the agent (Chat Completions on the stub) answers from the model window
    client = AsyncOpenAI(api_key="x", base_url=openai_server.base_url, max_retries=0)
    agent = Agent(name="a", model=OpenAIChatCompletionsModel(model="m", openai_client=client))
    window = model_window(await session.get_items(), limit=8)
    result = await Runner.run(agent, [*window, said(26, "Ada", "what did we decide?")])
    # THEN the request was accepted, starting with the summary
    assert result.final_output.startswith("Ada said: what did we decide?")
    (request,) = openai_stub.model_requests()
    assert request.status == 200
    assert "summary" in json.loads(request.items[0]["content"])


async def test_the_sdk_compaction_session_stores_through_atomic_replace(
    openai_server: RunningStub, openai_stub: OpenAIStub, session: UpstashSession
) -> None:
    # GIVEN the SDK's compaction session over the store, compacting past 4 items
    client = AsyncOpenAI(api_key="x", base_url=openai_server.base_url, max_retries=0)
    policy = CompactionPolicy(max_items=4, max_tokens=None, keep_items=1, keep_tokens=None)
    compacting = sdk_compaction_session(session, model="gpt-4.1", policy=policy, client=client)
    agent = Agent(name="a", model=OpenAIResponsesModel(model="gpt-4.1", openai_client=client))
    openai_stub.queue(Reply.message("one"), Reply.message("two"), Reply.message("three"))
    # WHEN three runs go through it
    for text in ("first", "second", "third"):
        await Runner.run(agent, text, session=compacting)
    # THEN responses.compact was called and its output replaced the stored history:
    # every user message kept, the rest folded into one compaction item
    assert "compact" in [r.api for r in openai_stub.requests]
    stored = await session.get_items()
    assert [i.get("type") for i in stored if i.get("role") != "user"] == ["compaction"]
    users = [i for i in stored if i.get("role") == "user"]
    assert [i["content"][0]["text"] for i in users] == ["first", "second", "third"]


def test_the_turn_worker_compacts_a_long_history_and_keeps_the_transcript(
    upstash: Any,
) -> None:
    """GIVEN the real handlers and turn worker on the offline model, with a low
    compaction threshold (400 estimated tokens, keeping 150)
    WHEN twelve messages are answered, one turn after another
    THEN the stored history starts with one summary item and stays small
    AND the event log participants read keeps every message and every answer
    AND every turn was answered once (compaction never costs an answer)."""
    import redis
    from harness import make_stack, offline_agent

    from rejoin.runtime import set_runtime

    stack = make_stack(
        upstash, agent=offline_agent(), compact_at_tokens=400, compact_keep_tokens=150
    )
    raw = redis.Redis.from_url(upstash.redis_url, decode_responses=True)
    try:
        ada, _ = stack.join("cmp-turns", "ada")
        for n in range(12):
            stack.say(ada, f"message number {n} " + "words " * 20)
            stack.run_turns()
        items = [json.loads(i) for i in raw.lrange("rejoin:{cmp-turns}:items", 0, -1)]
        assert parse_summary_item(items[0]) is not None
        assert sum(1 for i in items if parse_summary_item(i) is not None) == 1
        assert sum(estimate_tokens(i) for i in items) < 400 + 150
        events = [json.loads(e) for e in raw.lrange("rejoin:{cmp-turns}:events", 0, -1)]
        said = [e["text"] for e in events if e["type"] == "message"]
        assert said == [f"message number {n} " + "words " * 20 for n in range(12)]
        answers = [e["reply_to"] for e in events if e["type"] == "agent_message"]
        assert answers == [e["seq"] for e in events if e["type"] == "message"]
    finally:
        raw.close()
        set_runtime(None)
