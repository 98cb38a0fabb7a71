"""The rooms benchmark (issue 3, "Benchmark").

A whole deployment in this process (``tests/harness.py``: the real handlers
with API Gateway-shaped events, an in-memory sender and turn queue, an
injected clock), its store behind the local Upstash-compatible endpoint:

1. Upstash requests (and commands) per route operation, counted at the
   endpoint with its counters reset around each one, and API Gateway posts
   per operation, for a two-participant session; the rate limiter's request
   counted on its own; a turn with a model that answers at once; the cleanup
   per expired session.
2. One event broadcast to 100 connections against one post, with a sender
   that takes a fixed 20 ms per post (goal: at most 3x).
3. Cold import time of each handler against ``import boto3`` (see
   :mod:`bench.imports`).
4. A sample conversation replayed end to end, and what it costs
   (see :mod:`bench.cost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rejoin.sender import InMemorySender

from ._measure import Report, interleave, print_table, ratio, summarize
from ._stack import CommandStats, Endpoint

__all__ = ["Meter", "MeteredSender", "build_stack", "run"]

CLEANUP_SESSIONS, QUICK_CLEANUP_SESSIONS = 300, 10
BROADCAST_ROUNDS, QUICK_BROADCAST_ROUNDS = 40, 3
FANOUT = 100
POST_LATENCY = 0.02


class MeteredSender(InMemorySender):
    """An ``InMemorySender`` that also records the size of every post."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sizes: list[int] = []

    async def post(self, connection_id: str, data: bytes) -> None:
        self.sizes.append(len(data))
        await super().post(connection_id, data)


_prefixes = iter(range(1, 1_000_000))


def build_stack(endpoint: Endpoint, agent: Any = None, **overrides: Any) -> Any:
    """A harness Stack on the endpoint, with its own key prefix (so the global
    grace and activity indexes of one scenario never see another's sessions)."""
    from harness import make_stack

    return make_stack(
        endpoint,
        agent,
        sender=MeteredSender(),
        key_prefix=f"bench{next(_prefixes)}",
        **overrides,
    )


@contextlib.contextmanager
def trace_scripts() -> Iterator[list[str]]:
    """Record the name of every rejoin Lua script called (to attribute requests)."""
    from rejoin._lua import Script

    calls: list[str] = []
    original = Script.__call__

    async def traced(self: Script, redis: Any, keys: Any, args: Any) -> Any:
        calls.append(self.name)
        return await original(self, redis, keys, args)

    Script.__call__ = traced  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        Script.__call__ = original  # type: ignore[method-assign]


@dataclass
class Counts:
    """What one operation cost."""

    requests: int = 0
    commands: int = 0
    command_names: dict[str, int] = field(default_factory=dict)
    redis_commands: int = 0
    posts: int = 0
    post_bytes: list[int] = field(default_factory=list)
    scripts: list[str] = field(default_factory=list)

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.commands += other.commands
        for k, v in other.command_names.items():
            self.command_names[k] = self.command_names.get(k, 0) + v
        self.redis_commands += other.redis_commands
        self.posts += other.posts
        self.post_bytes += other.post_bytes
        self.scripts += other.scripts

    def attribution(self) -> str:
        """``say, lookup`` plus ``EVAL`` for the rate limiter's own script."""
        names: dict[str, int] = {}
        for s in self.scripts:
            names[s] = names.get(s, 0) + 1
        parts = [f"{n}{f' x{c}' if c > 1 else ''}" for n, c in names.items()]
        ours = len(self.scripts)
        if self.requests > ours:
            # Requests no rejoin script made: upstash-ratelimit's EVAL, or cold EVALs.
            parts.append(f"+{self.requests - ours} other ({_others(self.command_names)})")
        return ", ".join(parts) or "-"


def _others(names: dict[str, int]) -> str:
    evals = names.get("EVAL", 0)
    return f"EVAL x{evals}" if evals else ",".join(names)


class Meter:
    """Counts Upstash requests/commands, Redis commands and posts around a call."""

    def __init__(self, endpoint: Endpoint, cmdstats: CommandStats) -> None:
        self.endpoint = endpoint
        self.cmdstats = cmdstats

    def measure(self, stack: Any, call: Callable[[], Any]) -> tuple[Any, Counts]:
        sender = stack.sender
        posts, sized = sender.posts, len(sender.sizes)
        before = self.cmdstats.snapshot()
        self.endpoint.reset()
        with trace_scripts() as scripts:
            result = call()
        stats = self.endpoint.stats()
        inside = CommandStats.delta(before, self.cmdstats.snapshot())
        return result, Counts(
            requests=stats["total_requests"],
            commands=stats["total_commands"],
            command_names=dict(stats["commands"]),
            redis_commands=sum(inside.values()),
            posts=sender.posts - posts,
            post_bytes=sender.sizes[sized:],
            scripts=list(scripts),
        )


# --------------------------------------------------------------------------
# 1. per operation
# --------------------------------------------------------------------------


def _ops_scenario(
    endpoint: Endpoint, meter: Meter, measured: dict[str, Counts] | None
) -> dict[str, Any]:
    """Two participants through a session's life; each step measured."""
    from harness import offline_agent

    stack = build_stack(endpoint, offline_agent())

    def step(name: str, call: Callable[[], Any]) -> Any:
        result, counts = meter.measure(stack, call)
        if measured is not None:
            measured[name] = counts
        return result

    sid = "ops"
    _, ada = step("connect (new session)", lambda: stack.connect(sid, "ada"))
    welcome = step("resume frame (welcome)", lambda: stack.resume(ada))
    _, bob = step("connect (joins a live session)", lambda: stack.connect(sid, "bob"))
    step("resume frame (2nd participant)", lambda: stack.resume(bob))
    step("say", lambda: stack.say(ada, "hello bob"))
    step("turn (model answers at once)", stack.run_turns)
    stack.say(bob, "agent, what time is it?")
    step("turn with one tool call", stack.run_turns)
    step("ping", lambda: stack.send(ada, {"action": "ping"}))
    stack.say(ada, "did you see that?", "m-dup")
    step("say again, same id (a retry)", lambda: stack.say(ada, "did you see that?", "m-dup"))
    stack.run_turns()
    last_seq = max(f["seq"] for f in stack.logged(bob))
    step("disconnect (others remain)", lambda: stack.drop(bob))
    step("disconnect (last one: grace starts)", lambda: stack.drop(ada))
    stack.clock.advance(60)
    _, bob2 = step("connect (back within grace)", lambda: stack.connect(sid, "bob"))
    step(
        "resume frame (replays missed events)",
        lambda: stack.resume(bob2, epoch=welcome["epoch"], last_seq=last_seq),
    )
    stack.drop(bob2)
    return {"stack": stack}


def _rate_limited_say(endpoint: Endpoint, meter: Meter) -> Counts:
    stack = build_stack(endpoint, None, rate_limit=20, rate_window_seconds=10)
    cid, _ = stack.join("rl", "ada")
    other, _ = stack.join("rl", "bob")
    stack.say(cid, "warm-up")  # the limiter's script is cached from here on
    _, counts = meter.measure(stack, lambda: stack.say(cid, "limited"))
    stack.drop(other)
    stack.drop(cid)
    return counts


def _streaming_turn(endpoint: Endpoint, meter: Meter) -> Counts:
    import agents

    from rejoin.models import OfflineModel, make_current_time_tool

    agent = agents.Agent(
        name="agent",
        instructions="bench",
        model=OfflineModel(delay=0.02),  # the local stand-in's default pace
        tools=[make_current_time_tool()],
    )
    stack = build_stack(endpoint, agent)
    ada, _ = stack.join("stream", "ada")
    stack.join("stream", "bob")
    stack.say(ada, "warm-up")
    stack.run_turns()
    stack.say(ada, "tell me something")
    _, counts = meter.measure(stack, stack.run_turns)
    return counts


def _cleanup(endpoint: Endpoint, meter: Meter, n: int) -> dict[str, Any]:
    stack = build_stack(endpoint, None)
    # Warm the scripts, then the fixed cost of a run with nothing to do.
    cid, _ = stack.join("warm", "ada")
    stack.drop(cid)
    stack.clock.advance(stack.settings.grace_seconds + 3)
    stack.cleanup()
    _, idle = meter.measure(stack, stack.cleanup)
    for i in range(n):
        cid, _ = stack.join(f"expire-{i}", f"user{i}")
        stack.say(cid, "bye")
        stack.drop(cid)
    stack.clock.advance(stack.settings.grace_seconds + 3)
    report, full = meter.measure(stack, stack.cleanup)
    return {
        "sessions": n,
        "expired": len(report["expired"]),
        "fixed": idle,
        "total": full,
        "per_session_requests": (full.requests - idle.requests) / n,
        "per_session_commands": (full.commands - idle.commands) / n,
        "per_session_redis_commands": (full.redis_commands - idle.redis_commands) / n,
    }


def _ops(endpoint: Endpoint, cmdstats: CommandStats, report: Report, quick: bool) -> None:
    meter = Meter(endpoint, cmdstats)
    _ops_scenario(endpoint, meter, None)  # warm-up: every script cached
    measured: dict[str, Counts] = {}
    _ops_scenario(endpoint, meter, measured)
    limited = _rate_limited_say(endpoint, meter)
    streaming = _streaming_turn(endpoint, meter)
    cleanup = _cleanup(endpoint, meter, QUICK_CLEANUP_SESSIONS if quick else CLEANUP_SESSIONS)

    say = measured["say"]
    rows = []
    order = list(measured)
    order.insert(order.index("say") + 1, "say, rate limiting on")
    order.insert(order.index("turn with one tool call") + 1, "turn, model streaming 20 ms/word")
    all_counts = measured | {
        "say, rate limiting on": limited,
        "turn, model streaming 20 ms/word": streaming,
    }
    for name in order:
        c = all_counts[name]
        rows.append([name, c.requests, c.commands, c.redis_commands, c.posts, c.attribution()])
    per = cleanup
    rows.append(
        [
            f"cleanup, per expired session ({per['sessions']} swept)",
            per["per_session_requests"],
            per["per_session_commands"],
            per["per_session_redis_commands"],
            0,
            "sweep (+ due every 100 sessions)",
        ]
    )
    fixed: Counts = per["fixed"]
    rows.append(
        [
            "cleanup run with nothing to do (every minute)",
            fixed.requests,
            fixed.commands,
            fixed.redis_commands,
            fixed.posts,
            fixed.attribution(),
        ]
    )
    print_table(
        "Per operation, two participants (Upstash counted at the endpoint; posts = API Gateway "
        "PostToConnection calls)",
        [
            "operation",
            "Upstash requests",
            "Upstash commands",
            "Redis cmds inside scripts",
            "posts",
            "what made the requests",
        ],
        rows,
    )
    limiter = limited.requests - say.requests
    print(
        f"rate limiting adds {limiter} request(s) per say "
        f"({limited.requests} with it, {say.requests} without)."
    )
    report.data["ops"] = {
        name: {
            "requests": c.requests,
            "commands": c.commands,
            "redis_commands": c.redis_commands,
            "posts": c.posts,
            "scripts": c.scripts,
        }
        for name, c in all_counts.items()
    }
    report.data["cleanup"] = {
        k: v if not isinstance(v, Counts) else {"requests": v.requests, "commands": v.commands}
        for k, v in cleanup.items()
    }
    report.check(
        f"cleanup expired all {per['sessions']} sessions", per["expired"] == per["sessions"]
    )


# --------------------------------------------------------------------------
# 2. broadcast
# --------------------------------------------------------------------------


async def _broadcast(report: Report, quick: bool) -> None:
    # The real ApiGatewaySender over HTTP is measured by bench/broadcast.py.
    from rejoin.sender import broadcast

    sender = InMemorySender(latency=POST_LATENCY)
    ids = [f"conn-{i:03d}=" for i in range(FANOUT)]
    for cid in ids:
        sender.open(cid)
    frame = {"type": "message", "seq": 1, "user": "ada", "name": "Ada", "text": "hello " * 20}
    rounds = QUICK_BROADCAST_ROUNDS if quick else BROADCAST_ROUNDS
    subjects = {
        "one post": lambda: broadcast(sender, ids[:1], frame),
        f"broadcast to {FANOUT} (default max_parallel=100)": lambda: broadcast(sender, ids, frame),
        f"broadcast to {FANOUT}, max_parallel=50": lambda: broadcast(
            sender, ids, frame, max_parallel=50
        ),
        f"broadcast to {FANOUT}, max_parallel=100": lambda: broadcast(
            sender, ids, frame, max_parallel=100
        ),
    }
    samples = await interleave(subjects, rounds=rounds, warmup=1)
    one = samples["one post"]
    rows = []
    for name, values in samples.items():
        sm = summarize(values)
        rows.append([name, sm.median, sm.p90, ratio(values, one)])
    print_table(
        f"Broadcast, {POST_LATENCY * 1000:.0f} ms per post ({rounds} interleaved rounds; ms)",
        ["call", "median ms", "p90 ms", "ratio to one post"],
        rows,
    )
    report.data["broadcast"] = {name: summarize(v).__dict__ for name, v in samples.items()}
    main = samples[f"broadcast to {FANOUT} (default max_parallel=100)"]
    report.goal(f"broadcast to {FANOUT} / one post (InMemorySender, 20 ms)", ratio(main, one), 3)


# --------------------------------------------------------------------------


def run(endpoint: Endpoint, *, quick: bool) -> Report:
    """Run the rooms benchmark; prints its tables and goals."""
    from rejoin.runtime import set_runtime

    from . import cost
    from .imports import run_imports

    print("\n## Rooms benchmark (handlers, broadcast, imports)\n")
    report = Report("rooms")
    cmdstats = CommandStats(endpoint.redis_url)
    try:
        for part in (
            lambda: _ops(endpoint, cmdstats, report, quick),
            lambda: asyncio.run(_broadcast(report, quick)),
            lambda: run_imports(report, quick=quick),
            lambda: cost.run(endpoint, Meter(endpoint, cmdstats), report, quick=quick),
        ):
            started = time.monotonic()
            part()
            print(f"({time.monotonic() - started:.1f} s)")
    finally:
        set_runtime(None)
        cmdstats.close()
    return report
