"""The safe history window: never a call without its output, an output without its call,
or a reasoning item cut from what follows it.

Property tests over random histories (every pair type the SDK knows), with
the pairs known from how each history was built (not re-derived by the code
under test); then the real Runner against the OpenAI stub, where the SDK's
own ``session_settings.limit`` slicing gets a request refused and the safe
window does not.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from agents import Agent, Runner, function_tool, set_tracing_disabled
from agents.models.openai_responses import OpenAIResponsesModel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI
from openai.types.responses import ResponseFunctionToolCall

from rejoin import UpstashSession
from rejoin.history import WindowedSession, estimate_tokens, safe_start, safe_window
from rejoin_local.openai_stub import OpenAIStub, Reply, RunningStub

# --------------------------------------------------------------------------- #
# Random histories, with the pairs they were built with
# --------------------------------------------------------------------------- #

PAIRS = {
    "function_call": "function_call_output",
    "custom_tool_call": "custom_tool_call_output",
    "computer_call": "computer_call_output",
    "shell_call": "shell_call_output",
    "local_shell_call": "local_shell_call_output",
    "apply_patch_call": "apply_patch_call_output",
    "tool_search_call": "tool_search_output",
}


@dataclass
class History:
    """Items, and ``needs``: (i, j) when item j may only be sent with item i."""

    items: list[dict[str, Any]] = field(default_factory=list)
    needs: list[tuple[int, int]] = field(default_factory=list)
    counter: int = 0

    def add(self, item: dict[str, Any]) -> int:
        self.items.append(item)
        return len(self.items) - 1

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_{self.counter}"


def user(h: History, text: str) -> int:
    said = {"speaker": {"user": "u-x", "name": "X"}, "seq": h.counter, "text": text}
    h.counter += 1
    return h.add({"role": "user", "content": json.dumps(said)})


def with_reasoning(h: History, count: int, item: dict[str, Any]) -> int:
    reasoning = [
        h.add({"type": "reasoning", "id": h.fresh("rs"), "summary": []}) for _ in range(count)
    ]
    index = h.add(item)
    h.needs.extend((r, index) for r in reasoning)
    return index


def call_item(h: History, kind: str, anonymous: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    call_id = h.fresh("call")
    call: dict[str, Any] = {"type": kind, "id": h.fresh("it"), "call_id": call_id}
    output: dict[str, Any] = {"type": PAIRS[kind], "call_id": call_id, "output": "x" * 10}
    if kind == "local_shell_call":
        del output["call_id"]
        output["id"] = call_id  # the API names the call by `id` in this output
    if anonymous:
        call["call_id"] = output["call_id"] = None
    return call, output


@st.composite
def histories(draw: st.DrawFn) -> History:
    h = History()
    anonymous_open = False  # anonymous tool searches pair in order: keep one open at a time
    for _ in range(draw(st.integers(0, 14))):
        block = draw(
            st.sampled_from(["user", "answer", "tools", "hosted", "mcp", "program", "user"])
        )
        text = "w" * draw(st.integers(0, 300))
        reasoning = draw(st.integers(0, 2))
        if block == "user":
            user(h, text)
        elif block == "answer":
            with_reasoning(
                h,
                reasoning,
                {"type": "message", "role": "assistant", "id": h.fresh("msg"), "content": text},
            )
        elif block == "hosted":
            with_reasoning(h, reasoning, {"type": "web_search_call", "id": h.fresh("ws")})
        elif block == "tools":
            kinds = draw(st.lists(st.sampled_from(sorted(PAIRS)), min_size=1, max_size=3))
            pairs = []
            for n, kind in enumerate(kinds):
                anonymous = (
                    kind == "tool_search_call" and not anonymous_open and draw(st.booleans())
                )
                anonymous_open = anonymous_open or anonymous
                call, output = call_item(h, kind, anonymous)
                index = with_reasoning(h, reasoning if n == 0 else 0, call)
                pairs.append((index, output))
            if draw(st.booleans()):
                user(h, "meanwhile")  # a message landing between calls and outputs
            order = draw(st.permutations(range(len(pairs))))
            anonymous_order = [i for i in range(len(pairs)) if pairs[i][1].get("call_id") is None]
            order = [i for i in order if i not in anonymous_order] + anonymous_order
            for i in order:
                call_index, output = pairs[i]
                h.needs.append((call_index, h.add(output)))
            anonymous_open = False
        elif block == "mcp":
            request = h.add({"type": "mcp_approval_request", "id": h.fresh("mcpr")})
            user(h, "approve?")
            response = h.add(
                {
                    "type": "mcp_approval_response",
                    "approval_request_id": h.items[request]["id"],
                    "approve": True,
                }
            )
            h.needs.append((request, response))
        else:  # a program with a tool call it issued
            program_id = h.fresh("prog")
            program = h.add({"type": "program", "id": h.fresh("p"), "call_id": program_id})
            caller = {"type": "program", "caller_id": program_id}
            call_id = h.fresh("call")
            call = h.add(
                {"type": "function_call", "call_id": call_id, "name": "f", "caller": caller}
            )
            output = h.add(
                {"type": "function_call_output", "call_id": call_id, "output": "", "caller": caller}
            )
            done = h.add({"type": "program_output", "id": h.fresh("po"), "call_id": program_id})
            h.needs += [(program, call), (call, output), (program, output), (program, done)]
    return h


def valid_start(h: History, c: int) -> bool:
    """The oracle: starting at c keeps no item without what it needs."""
    return not any(i < c <= j for i, j in h.needs)


def within(items: list[Any], limit: int | None, max_tokens: int | None) -> bool:
    if limit is not None and len(items) > limit:
        return False
    return max_tokens is None or sum(estimate_tokens(i) for i in items) <= max_tokens


limits = st.one_of(st.none(), st.integers(0, 40))
budgets = st.one_of(st.none(), st.integers(0, 1500))
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- #
# Properties
# --------------------------------------------------------------------------- #


@PROPERTY
@given(histories(), limits, budgets)
def test_the_window_is_the_longest_safe_suffix_within_the_limits(
    h: History, limit: int | None, max_tokens: int | None
) -> None:
    # WHEN the window is taken, dropping an oversized newest group
    start = safe_start(h.items, limit=limit, max_tokens=max_tokens, keep_newest=False)
    window = safe_window(h.items, limit=limit, max_tokens=max_tokens, keep_newest=False)
    n = len(h.items)
    # THEN it is the suffix from that start, safe, and within both limits
    assert window == h.items[start:]
    assert valid_start(h, start)
    assert within(window, limit, max_tokens)
    # AND no longer safe suffix would fit (fewer items only when a pair forced it)
    assert not any(
        valid_start(h, c) and within(h.items[c:], limit, max_tokens) for c in range(start)
    ), f"a longer safe window existed (start {start} of {n})"


@PROPERTY
@given(histories(), limits, budgets)
def test_keep_newest_keeps_the_newest_group_whole_when_nothing_fits(
    h: History, limit: int | None, max_tokens: int | None
) -> None:
    dropped = safe_start(h.items, limit=limit, max_tokens=max_tokens, keep_newest=False)
    kept = safe_start(h.items, limit=limit, max_tokens=max_tokens)
    n = len(h.items)
    assert valid_start(h, kept)
    if limit == 0 or max_tokens == 0 or dropped < n:
        # something fits (or nothing was asked for): the same window
        assert kept == dropped
    else:
        # nothing fits: the newest group alone (the latest safe start before the end)
        safe_before_end = [c for c in range(n) if valid_start(h, c)]
        assert kept == (max(safe_before_end) if safe_before_end else n)


@PROPERTY
@given(histories(), st.integers(0, 60), limits, budgets)
def test_a_window_of_the_latest_n_items_never_holds_an_orphan(
    h: History, n: int, limit: int | None, max_tokens: int | None
) -> None:
    # GIVEN only the latest n items (as a store returns get_items(n)): pairs may be cut
    offset = max(0, len(h.items) - n)
    fetched = h.items[offset:]
    # WHEN the window is taken over them, saying whether they are the whole history
    complete = offset == 0
    start = offset + safe_start(fetched, limit=limit, max_tokens=max_tokens, complete=complete)
    # THEN it is safe against the whole history, not just against what was fetched
    assert valid_start(h, start)


# --------------------------------------------------------------------------- #
# Examples
# --------------------------------------------------------------------------- #

U = {"role": "user", "content": "hi"}
FC = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
FCO = {"type": "function_call_output", "call_id": "c1", "output": "ok"}
RS = {"type": "reasoning", "id": "rs_1", "summary": []}
MSG = {"type": "message", "role": "assistant", "id": "msg_1", "content": "done"}


def test_a_limit_inside_a_pair_starts_the_window_after_it() -> None:
    # GIVEN the SDK's example: a user message, a call, its output, an answer
    items = [U, FC, FCO, MSG]
    # WHEN the latest 2 are asked for, THEN the output is not kept without its call
    assert safe_window(items, limit=2) == [MSG]
    assert safe_window(items, limit=3) == [FC, FCO, MSG]


def test_reasoning_stays_with_the_item_it_precedes() -> None:
    items = [U, RS, FC, FCO, RS | {"id": "rs_2"}, MSG]
    assert safe_window(items, limit=1) == [RS | {"id": "rs_2"}, MSG]  # newest group kept
    assert safe_window(items, limit=1, keep_newest=False) == []
    assert safe_window(items, limit=4) == [RS | {"id": "rs_2"}, MSG]
    assert safe_window(items, limit=5) == items[1:]


def test_the_token_budget_counts_text_and_the_estimate_is_documented() -> None:
    long = {"role": "user", "content": "x" * 400}  # 100 tokens of text + 4
    assert estimate_tokens(long) == 104
    assert estimate_tokens({"type": "function_call_output", "call_id": "c" * 50, "output": ""})
    assert safe_window([long, long, U], max_tokens=104 + estimate_tokens(U)) == [long, U]


def test_pydantic_items_are_read_too() -> None:
    call = ResponseFunctionToolCall(type="function_call", call_id="c1", name="f", arguments="{}")
    # the newest group is the call and its output: kept whole, or dropped
    assert safe_window([U, call, FCO], limit=1) == [call, FCO]
    assert safe_window([U, call, FCO], limit=1, keep_newest=False) == []


def test_a_partial_list_never_starts_at_its_first_item() -> None:
    # GIVEN the latest two items of [U, RS, MSG]: MSG's reasoning is the first one read
    assert safe_window([RS, MSG], complete=False) == []
    assert safe_window([RS, MSG]) == [RS, MSG]
    # AND with one more item read, the window can start at RS
    assert safe_window([U, RS, MSG], limit=2, complete=False) == [RS, MSG]


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="limit"):
        safe_window([U], limit=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        safe_window([U], max_tokens=-5)
    assert safe_window([U, U], limit=0) == [] == safe_window([U], max_tokens=0)


# --------------------------------------------------------------------------- #
# The real Runner, the real store, the OpenAI stub
# --------------------------------------------------------------------------- #


@pytest.fixture(autouse=True)
def _no_tracing() -> None:
    set_tracing_disabled(True)


@function_tool
def lookup(city: str) -> str:
    """Look up the weather of a city."""
    return f"sunny in {city}"


async def stored_conversation(
    openai_server: RunningStub, openai_stub: OpenAIStub, redis: Any
) -> tuple[Agent[Any], str, list[Any]]:
    """A session holding: user, reasoning, call, output, reasoning, answer (from a real run)."""
    client = AsyncOpenAI(api_key="x", base_url=openai_server.base_url, max_retries=0)
    agent = Agent(name="a", model=OpenAIResponsesModel(model="m", openai_client=client))
    agent.tools = [lookup]
    session_id = f"hist-{uuid.uuid4().hex[:8]}"
    openai_stub.queue(
        Reply.tool_call("lookup", {"city": "Oslo"}, reasoning="I need the weather."),
        Reply.message("Sunny in Oslo.", reasoning="Now answer."),
    )
    await Runner.run(agent, "Weather in Oslo?", session=UpstashSession(session_id, redis=redis))
    items = await UpstashSession(session_id, redis=redis).get_items()
    kinds = [i.get("type", "message") for i in items]
    assert kinds == [
        "message",
        "reasoning",
        "function_call",
        "function_call_output",
        "reasoning",
        "message",
    ]
    return agent, session_id, items


@pytest.mark.parametrize(
    ("limit", "window"),
    [(1, []), (4, ["reasoning", "message"])],
    ids=["limit 1: the answer without its reasoning", "limit 4: the call without its reasoning"],
)
async def test_the_sdk_limit_cuts_reasoning_off_and_the_api_refuses_the_safe_window_does_not(
    openai_server: RunningStub,
    openai_stub: OpenAIStub,
    upstash_async: Any,
    limit: int,
    window: list[str],
) -> None:
    # GIVEN a stored conversation with reasoning before a tool call and before the answer
    agent, session_id, _ = await stored_conversation(openai_server, openai_stub, upstash_async)
    limited = UpstashSession(session_id, redis=upstash_async, session_settings={"limit": limit})
    # WHEN the SDK's own session limit cuts between a reasoning item and its item
    # THEN the model API refuses the request (the stub answers as the real API does)
    with pytest.raises(openai.BadRequestError, match="without its required 'reasoning' item"):
        await Runner.run(agent, "And tomorrow?", session=limited)
    await UpstashSession(session_id, redis=upstash_async).pop_item()  # the SDK stored the input
    # WHEN the same limit goes through the safe window instead
    openai_stub.queue("Probably sunny too.")
    windowed = WindowedSession(UpstashSession(session_id, redis=upstash_async), limit=limit)
    result = await Runner.run(agent, "And tomorrow?", session=windowed)
    # THEN the run succeeds: the model saw whole groups only (fewer items), writes went through
    assert result.final_output == "Probably sunny too."
    sent = openai_stub.model_requests()[-1]
    assert sent.status == 200
    assert [i.get("type", "message") for i in sent.items] == [*window, "message"]
    assert len(await UpstashSession(session_id, redis=upstash_async).get_items()) == 8


async def test_history_passed_as_input_needs_the_safe_window(
    openai_server: RunningStub, openai_stub: OpenAIStub, upstash_async: Any
) -> None:
    # GIVEN the stored conversation, read whole (as a turn does at its start)
    agent, _, items = await stored_conversation(openai_server, openai_stub, upstash_async)
    question = {"role": "user", "content": "And tomorrow?"}
    # WHEN the latest three items are sent as the input, the output's call is cut off
    # THEN the API refuses it
    with pytest.raises(openai.BadRequestError, match="No tool call found for function call"):
        await Runner.run(agent, [*items[-3:], question])
    # AND the safe window of three does not break the pair
    openai_stub.queue("Yes.")
    result = await Runner.run(agent, [*safe_window(items, limit=3), question])
    assert result.final_output == "Yes."
    assert openai_stub.model_requests()[-1].items[:2] == safe_window(items, limit=3)


async def test_windowed_session_combines_its_limit_with_the_runners(upstash_async: Any) -> None:
    # GIVEN a stored history with a pair near the end
    inner = UpstashSession(f"win-{uuid.uuid4().hex[:8]}", redis=upstash_async)
    await inner.add_items([U, U, FC, FCO, MSG])
    windowed = WindowedSession(inner, limit=3)
    # THEN reads are safe windows, the smaller limit wins, writes reach the store
    assert await windowed.get_items() == [FC, FCO, MSG]
    assert await windowed.get_items(limit=2) == [MSG]
    assert await windowed.get_items(limit=0) == []
    await windowed.add_items([U])
    assert await windowed.pop_item() == U
    assert await windowed._atomic_replace_items([MSG])
    assert await inner.get_items() == [MSG]
    await windowed.clear_session()
    assert await inner.get_items() == []
