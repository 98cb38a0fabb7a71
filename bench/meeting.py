"""A two-hour meeting through the Runner: input tokens sent per turn, with and without bounds.

The meeting (the scenario's counts are assumptions; the tokens are measured):

- 12 speakers, a message every 6 s for two hours (1,200 messages, 20-240
  characters each, from a fixed seed), each stored as a speaker item
  (CONTRACT.md's JSON) in an ``UpstashSession`` on the bench's
  Upstash-compatible endpoint;
- every 10th message addresses the agent (120 turns); every third of those
  names its ``current_time`` tool, so the turn has a tool round (two model
  requests);
- a turn reads the whole history once, chooses what the model reads, runs the
  real ``agents.Runner`` with the SDK's real ``OpenAIChatCompletionsModel``
  on the real ``openai`` client against the OpenAI stub
  (:mod:`rejoin_local.openai_stub`, deterministic replies), and stores what
  the turn added.

Tokens are counted by the stub on each request it received (its ~4
characters per token estimate over the instructions, messages and tools),
i.e. at the model's end of the wire. Three ways to choose what the model
reads:

- ``full``: the whole history (what a session without a limit sends);
- ``window``: :func:`rejoin.history.safe_window` with ``limit=200`` items
  and ``max_tokens=8000``;
- ``compaction``: after each turn, :func:`rejoin.compaction.compact` with
  :class:`~rejoin.compaction.ModelSummariser` on the same model (compact
  past 12,000 estimated tokens, keep the latest 4,000), the model reading
  :func:`rejoin.compaction.model_window` (``max_tokens=16000``): older
  messages reach the model as one summary instead of being dropped.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._measure import Report, print_table
from ._stack import Endpoint

__all__ = ["run"]

SPEAKERS = 12
SECONDS_PER_MESSAGE = 6
MINUTES, QUICK_MINUTES = 120, 8
ADDRESS_EVERY = 10
TOOL_EVERY = 3
MARKS = (15, 30, 60, 90, 120)
QUICK_MARKS = (2, 4, 8)


@dataclass(frozen=True)
class Bounds:
    """The window and compaction settings (the quick run scales them to its length)."""

    window_items: int
    window_tokens: int
    compact_at: int
    compact_keep: int
    compact_window: int


FULL = Bounds(200, 8_000, 12_000, 4_000, 16_000)
QUICK = Bounds(40, 1_000, 1_800, 600, 2_400)
WORDS = [
    *("agenda", "budget", "launch", "risk", "owner", "deadline", "design", "review"),
    *("metric", "customer", "pricing", "roadmap", "hiring", "incident", "release"),
    *("beta", "feedback", "scope", "estimate"),
]


@dataclass
class Turn:
    """One agent turn: when, and the tokens of each model request it made."""

    minute: float
    requests: list[int]
    summary_requests: list[int] = field(default_factory=list)


def _messages(minutes: int, seed: int = 7) -> list[tuple[float, str, str, bool]]:
    """(minute, speaker, text, addressed) for the whole meeting, from a fixed seed."""
    rng = random.Random(seed)
    names = [f"Speaker{i:02d}" for i in range(1, SPEAKERS + 1)]
    out = []
    for n in range(1, minutes * 60 // SECONDS_PER_MESSAGE + 1):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 35))]
        addressed = n % ADDRESS_EVERY == 0
        if addressed:
            ask = (
                "agent, please check current_time"
                if (n // ADDRESS_EVERY) % TOOL_EVERY == 0
                else "agent, what do you think"
            )
            words = [ask, *words[:8]]
        out.append((n * SECONDS_PER_MESSAGE / 60, rng.choice(names), " ".join(words), addressed))
    return out


async def _meeting(
    endpoint: Endpoint, base_url: str, stub: Any, mode: str, minutes: int, bounds: Bounds
) -> list[Turn]:
    import agents
    from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
    from openai import AsyncOpenAI

    from rejoin import UpstashSession, upstash_client
    from rejoin.compaction import CompactionPolicy, ModelSummariser, compact, model_window
    from rejoin.history import safe_window
    from rejoin.models import make_current_time_tool

    client = AsyncOpenAI(api_key="bench", base_url=base_url, max_retries=0)
    model = OpenAIChatCompletionsModel(model="stub-model", openai_client=client)
    agent = agents.Agent(
        name="agent",
        instructions="You take part in a meeting. Messages are JSON with the speaker and text.",
        model=model,
        tools=[make_current_time_tool(clock=lambda: 1_764_000_000.0)],
    )
    summariser = ModelSummariser(model)
    policy = CompactionPolicy(
        max_items=None,
        max_tokens=bounds.compact_at,
        keep_items=None,
        keep_tokens=bounds.compact_keep,
    )
    choose: Callable[[list[Any]], list[Any]] = {
        "full": lambda items: items,
        "window": lambda items: safe_window(
            items, limit=bounds.window_items, max_tokens=bounds.window_tokens
        ),
        "compaction": lambda items: model_window(items, max_tokens=bounds.compact_window),
    }[mode]
    redis = upstash_client(endpoint.url, endpoint.token, timeout=10.0)
    session = UpstashSession(f"bench-meeting-{mode}-{uuid.uuid4().hex[:6]}", redis=redis)
    turns: list[Turn] = []
    try:
        for seq, (minute, name, text, addressed) in enumerate(_messages(minutes), start=1):
            content = {"speaker": {"user": name.lower(), "name": name}, "seq": seq, "text": text}
            await session.add_items([{"role": "user", "content": json.dumps(content)}])
            if not addressed:
                continue
            history = await session.get_items()
            window = choose(history)
            before = len(stub.requests)
            result = await agents.Runner.run(agent, window)
            added = result.to_input_list()[len(window) :]
            await session.add_items(added)
            turn = Turn(minute, [r.approx_tokens for r in stub.requests[before:]])
            if mode == "compaction":
                before = len(stub.requests)
                await compact(session, summariser, policy, items=[*history, *added])
                turn.summary_requests = [r.approx_tokens for r in stub.requests[before:]]
            turns.append(turn)
        return turns
    finally:
        await session.clear_session()
        await redis.close()
        await client.close()


def _at(turns: list[Turn], minute: float) -> int:
    """Input tokens of the first request of the last turn at or before ``minute``."""
    return [t for t in turns if t.minute <= minute][-1].requests[0]


def _peak(turns: list[Turn], start: float, end: float) -> int:
    """The most input tokens of any model request of the turns in ``(start, end]``."""
    return max(r for t in turns if start < t.minute <= end for r in t.requests)


def run(endpoint: Endpoint, *, quick: bool) -> Report:
    """Run the meeting three ways; print the tokens per turn over time and the goals."""
    import agents

    from rejoin_local.openai_stub import serve

    print("\n## Meeting benchmark (tokens per turn over a long meeting)\n")
    agents.set_tracing_disabled(True)
    report = Report("meeting")
    minutes = QUICK_MINUTES if quick else MINUTES
    marks = QUICK_MARKS if quick else MARKS
    bounds = QUICK if quick else FULL
    messages = minutes * 60 // SECONDS_PER_MESSAGE
    print(
        f"{SPEAKERS} speakers, {messages:,} messages over {minutes} min, "
        f"{messages // ADDRESS_EVERY} agent turns (a third with a tool round); "
        "tokens counted by the OpenAI stub on each request (~4 chars/token). "
        f"window: limit={bounds.window_items}, max_tokens={bounds.window_tokens:,}; "
        f"compaction: past {bounds.compact_at:,} tokens keep {bounds.compact_keep:,}, "
        f"model_window max_tokens={bounds.compact_window:,}."
    )
    results: dict[str, list[Turn]] = {}
    with serve() as server:
        for mode in ("full", "window", "compaction"):
            server.stub.reset()
            results[mode] = asyncio.run(
                _meeting(endpoint, server.base_url, server.stub, mode, minutes, bounds)
            )
    rows = []
    for mode, turns in results.items():
        every = [tokens for t in turns for tokens in t.requests]
        summaries = [tokens for t in turns for tokens in t.summary_requests]
        rows.append(
            [
                mode,
                *(_at(turns, m) for m in marks),
                _peak(turns, 0, minutes / 2),
                _peak(turns, minutes / 2, minutes),
                sum(every),
                f"{len(summaries)} ({sum(summaries):,} tokens)" if summaries else "-",
            ]
        )
        report.data[mode] = {
            "peak_first_half": _peak(turns, 0, minutes / 2),
            "peak_second_half": _peak(turns, minutes / 2, minutes),
            "first_request_tokens": [[t.minute, t.requests[0]] for t in turns],
            "requests": len(every),
            "total_tokens": sum(every),
            "summary_requests": summaries,
        }
    print_table(
        "Input tokens of a turn's first model request, by meeting minute",
        [
            "what the model reads",
            *(f"min {m}" for m in marks),
            "max, 1st half",
            "max, 2nd half",
            "all turns",
            "summaries",
        ],
        rows,
    )
    half = minutes / 2
    for mode in ("window", "compaction"):
        turns = results[mode]
        report.goal(
            f"{mode}: most tokens per request, 2nd half / 1st half of the meeting",
            _peak(turns, half, minutes) / _peak(turns, 0, half),
            1.25,
            "x",
        )
    full = results["full"]
    report.check(
        "full history grows: most tokens per request, 2nd half >= 1.8x 1st half",
        _peak(full, half, minutes) >= 1.8 * _peak(full, 0, half),
    )
    bounded = max(t for turn in results["window"] for t in turn.requests)
    report.check(
        f"window: every request within its {bounds.window_tokens:,}-token budget (+10%)",
        bounded <= bounds.window_tokens * 1.1,
    )
    return report
