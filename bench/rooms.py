"""The rooms benchmark (issue 10, items 4 and 6): what a frame, a turn and the cleanup cost.

A whole deployment runs in this process (``tests/harness.py``): the real
handlers called with API Gateway-shaped events, the Lambda authorizer on
``$connect``, an in-memory sender and turn queue, an injected clock. Its store
is the local Upstash-compatible endpoint, in a child process, in front of a
private Redis. For every operation this counts:

- Upstash requests and commands, at the endpoint (its counters reset around
  the operation), and what Redis ran inside the scripts (``INFO commandstats``);
- API Gateway calls: ``PostToConnection`` (by frame type), ``GetConnection``
  and ``DeleteConnection``;
- SQS messages queued, and Lambda invocations with their milliseconds (each
  handler call timed in this process: local figures, not Lambda's).

Parts:

1. Per frame and per turn, with rate limiting on (20 frames per 10 s, the
   deployed default) and reply mode ``addressed``: turns with 0, 1 and 3 tool
   rounds (the SDK's ``ScriptedModel``) and, in a full run, one whose reply
   streams for about 5 s, so that the worker's polls of the session show.
2. The cleanup with 1,000 expired and 1,000 live sessions, with Redis' script
   cache emptied first (``SCRIPT FLUSH``) and with it warm.
3. Cold imports of the handlers against ``import boto3`` (:mod:`bench.imports`).
4. A one-hour meeting replayed through the handlers and priced (:mod:`bench.cost`).

A full run writes the counts to ``bench/counts.json``, from which
``python -m bench.scale`` builds the scale model (``docs/scale.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rejoin.sender import InMemorySender

from ._measure import Report, print_table
from ._stack import REPO_ROOT, CommandStats, Endpoint

__all__ = [
    "COUNTS_COMMAND",
    "COUNTS_PATH",
    "Counts",
    "HandlerClock",
    "Meter",
    "MeteredSender",
    "build_stack",
    "run",
]

COUNTS_PATH = REPO_ROOT / "bench" / "counts.json"
COUNTS_COMMAND = ".venv/bin/python -m bench --only rooms"

CLEANUP_SESSIONS, QUICK_CLEANUP_SESSIONS = 1_000, 20
TOOL_ROUNDS = (0, 1, 3)
# The offline stand-in's echo is about 35 words: at 0.15 s a word it streams ~5 s.
STREAMING_DELAY = 0.15
# Past the grace deadline and the clock-skew margin the cleanup allows.
PAST_GRACE = 5
# The deployed defaults (template.yaml): RateLimit 20, RateWindowSeconds 10.
DEPLOYED = {"rate_limit": 20, "rate_window_seconds": 10, "reply_mode": "addressed"}

# Operation names, as the tables and counts.json show them.
CONNECT_NEW = "$connect, new session (authorizer + connect)"
RESUME = "resume (welcome)"
CONNECT_JOIN = "$connect, joins a live session"
RESUME_2 = "resume, 2nd participant"
SAY_PLAIN = "say, plain (not addressed)"
SAY_RETRY = "say, same id again (a client's retry)"
PING = "ping"
STOP = "stop (no turn running)"
LEAVE = "leave"
DISCONNECT_AFTER_LEAVE = "$disconnect after leave"
DISCONNECT_LAST = "$disconnect, last one (grace starts)"
CONNECT_BACK = "$connect, back within grace"
RESUME_REPLAY = "resume, replays missed events"
STREAMED = "reply streaming ~5 s"


def say_to_agent(rounds: int) -> str:
    return f"say to the agent ({rounds} tool rounds)"


def turn_of(rounds: int) -> str:
    return f"its turn ({rounds} tool rounds)"


LATER_FRAMES = (RESUME, RESUME_2, PING, STOP, LEAVE, DISCONNECT_AFTER_LEAVE, DISCONNECT_LAST)


# --------------------------------------------------------------------------
# Instruments
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    """One Lambda handler call, timed in this process."""

    function: str
    ms: float


class HandlerClock:
    """Times every handler call the harness makes (``harness.load_handler``)."""

    def __init__(self) -> None:
        self.calls: list[Invocation] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[HandlerClock]:
        import harness

        original = harness.load_handler

        def timed(name: str) -> Callable[[dict[str, Any], Any], Any]:
            handler = original(name)

            def call(event: dict[str, Any], context: Any) -> Any:
                start = time.perf_counter()
                try:
                    return handler(event, context)
                finally:
                    ms = (time.perf_counter() - start) * 1000
                    self.calls.append(Invocation(name, ms))

            return call

        harness.load_handler = timed
        try:
            yield self
        finally:
            harness.load_handler = original


HANDLERS = HandlerClock()


class MeteredSender(InMemorySender):
    """An ``InMemorySender`` that also records each post's size and frame type,
    and counts ``GetConnection`` (``exists``) and ``DeleteConnection`` (``close``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sizes: list[int] = []
        self.types: list[str] = []
        self.checks = 0
        self.closes = 0

    async def post(self, connection_id: str, data: bytes) -> None:
        self.sizes.append(len(data))
        try:
            kind = str(json.loads(data).get("type"))
        except (ValueError, AttributeError):
            kind = "?"
        self.types.append(kind)
        await super().post(connection_id, data)

    async def exists(self, connection_id: str) -> bool:
        self.checks += 1
        return await super().exists(connection_id)

    async def close(self, connection_id: str) -> None:
        self.closes += 1
        await super().close(connection_id)


class QueueCounter:
    """``InMemoryTurnQueue.on_enqueue``: counts the turns queued (SQS SendMessage)."""

    def __init__(self) -> None:
        self.sent = 0

    def __call__(self, turn: Any) -> None:
        self.sent += 1


_prefixes = iter(range(1, 1_000_000))


def build_stack(endpoint: Endpoint, agent: Any = None, **overrides: Any) -> Any:
    """A harness Stack on the endpoint with a metered sender and queue, under its
    own key prefix (so one scenario's schedule index never sees another's sessions)."""
    from harness import make_stack

    stack = make_stack(
        endpoint, agent, sender=MeteredSender(), key_prefix=f"bench{next(_prefixes)}", **overrides
    )
    stack.queue.on_enqueue = QueueCounter()
    return stack


def set_agent(stack: Any, agent: Any) -> None:
    """Use another agent from the next turn on (the runtime caches one per event loop)."""
    stack.agent = agent
    stack.rt.bound().pop("agent", None)


@contextlib.contextmanager
def trace_scripts() -> Iterator[list[tuple[str, int]]]:
    """Record each rejoin Lua script called: (name, bytes of keys, arguments and answer)."""
    from rejoin._lua import Script

    calls: list[tuple[str, int]] = []
    original = Script.__call__

    async def traced(self: Script, *args: Any, **kwargs: Any) -> Any:
        result: Any = None
        try:
            result = await original(self, *args, **kwargs)
            return result
        finally:
            calls.append((self.name, _wire_bytes(args, result)))

    Script.__call__ = traced  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        Script.__call__ = original  # type: ignore[method-assign]


def _wire_bytes(args: Sequence[Any], result: Any) -> int:
    # Script(redis, keys, args): what crosses the wire, about (the sha1 is 40).
    sent = 40 + sum(len(str(x)) for part in args[1:3] for x in (part or ()))
    if isinstance(result, str | bytes):
        got = len(result)
    else:
        got = len(json.dumps(result, default=str)) if result is not None else 0
    return sent + got


@dataclass
class Counts:
    """What one operation (or several, added up) cost."""

    requests: int = 0
    commands: int = 0
    command_names: dict[str, int] = field(default_factory=dict)
    redis_commands: int = 0
    redis_usec: int = 0
    script_bytes: int = 0
    posts: int = 0
    post_bytes: list[int] = field(default_factory=list)
    post_types: dict[str, int] = field(default_factory=dict)
    checks: int = 0
    closes: int = 0
    sqs_messages: int = 0
    invocations: list[Invocation] = field(default_factory=list)
    scripts: list[str] = field(default_factory=list)

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.commands += other.commands
        for k, v in other.command_names.items():
            self.command_names[k] = self.command_names.get(k, 0) + v
        self.redis_commands += other.redis_commands
        self.redis_usec += other.redis_usec
        self.script_bytes += other.script_bytes
        self.posts += other.posts
        self.post_bytes += other.post_bytes
        for k, v in other.post_types.items():
            self.post_types[k] = self.post_types.get(k, 0) + v
        self.checks += other.checks
        self.closes += other.closes
        self.sqs_messages += other.sqs_messages
        self.invocations += other.invocations
        self.scripts += other.scripts

    @property
    def deltas(self) -> int:
        """``agent_delta`` posts (the streamed reply)."""
        return self.post_types.get("agent_delta", 0)

    def lambdas(self) -> str:
        """``message 3.1 ms, turn 12 ms``: the handler calls and their milliseconds."""
        return ", ".join(f"{i.function} {_ms(i.ms)}" for i in self.invocations) or "-"

    def attribution(self) -> str:
        """The rejoin scripts that made the requests, plus any request none made."""
        names = Counter(self.scripts)
        parts = [f"{n}{f' x{c}' if c > 1 else ''}" for n, c in names.items()]
        others = self.requests - len(self.scripts)
        if others > 0:
            parts.append(f"+{others} other")
        return ", ".join(parts) or "-"

    def to_json(self) -> dict[str, Any]:
        by_function: dict[str, list[float]] = {}
        for i in self.invocations:
            by_function.setdefault(i.function, []).append(round(i.ms, 3))
        return {
            "requests": self.requests,
            "commands": self.commands,
            "redis_commands": self.redis_commands,
            "redis_usec": self.redis_usec,
            "script_bytes": self.script_bytes,
            "script_calls": len(self.scripts),
            "posts": self.posts,
            "post_types": dict(sorted(self.post_types.items())),
            "post_bytes": sum(self.post_bytes),
            "get_connection": self.checks,
            "delete_connection": self.closes,
            "sqs_messages": self.sqs_messages,
            "invocations_ms": by_function,
            "scripts": dict(Counter(self.scripts)),
        }


def _ms(ms: float) -> str:
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


_INFO = frozenset({"info"})


class Meter:
    """Counts around a call: Upstash requests and commands, Redis' own work,
    API Gateway calls, SQS messages, Lambda invocations."""

    def __init__(
        self, endpoint: Endpoint, cmdstats: CommandStats, handlers: HandlerClock | None = None
    ) -> None:
        self.endpoint = endpoint
        self.cmdstats = cmdstats
        self.handlers = handlers or HANDLERS

    def measure(self, stack: Any, call: Callable[[], Any]) -> tuple[Any, Counts]:
        sender = stack.sender
        posts, sized = sender.posts, len(sender.sizes)
        checks, closes = sender.checks, sender.closes
        queue = stack.queue.on_enqueue
        queued = queue.sent if isinstance(queue, QueueCounter) else 0
        calls = len(self.handlers.calls)
        before = self.cmdstats.usec()
        self.endpoint.reset()
        with trace_scripts() as scripts:
            result = call()
        stats = self.endpoint.stats()
        after = self.cmdstats.usec()
        ran = {
            name: (calls_ - before.get(name, (0, 0))[0], usec - before.get(name, (0, 0))[1])
            for name, (calls_, usec) in after.items()
            if name not in _INFO
        }
        return result, Counts(
            requests=stats["total_requests"],
            commands=stats["total_commands"],
            command_names=dict(stats["commands"]),
            redis_commands=sum(n for n, _ in ran.values()),
            redis_usec=sum(u for name, (_, u) in ran.items() if name in ("evalsha", "eval")),
            script_bytes=sum(b for _, b in scripts),
            posts=sender.posts - posts,
            post_bytes=sender.sizes[sized:],
            post_types=dict(Counter(sender.types[sized:])),
            checks=sender.checks - checks,
            closes=sender.closes - closes,
            sqs_messages=(queue.sent - queued) if isinstance(queue, QueueCounter) else 0,
            invocations=self.handlers.calls[calls:],
            scripts=[name for name, _ in scripts],
        )


def redis_baseline(cmdstats: CommandStats, n: int = 3_000) -> dict[str, float]:
    """What a plain GET of 100 bytes costs this Redis: its own time per call
    (``commandstats``) and the process CPU per call (``INFO cpu``, I/O included).

    ElastiCache Serverless bills a request of up to 1 KB that needs no extra
    vCPU time as 1 ECPU: these figures turn the scripts' measured Redis time
    into an ECPU estimate (see :func:`ecpu_estimate`).
    """
    r = cmdstats.client()
    key = "bench:ecpu:probe"
    r.set(key, "x" * 100)

    def cpu() -> float:
        info = r.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    try:
        calls0, usec0 = cmdstats.usec().get("get", (0, 0))
        cpu0 = cpu()
        for _ in range(n):
            r.get(key)
        cpu1 = cpu()
        calls1, usec1 = cmdstats.usec().get("get", (0, 0))
    finally:
        r.delete(key)
    calls = max(1, calls1 - calls0)
    get_us = (usec1 - usec0) / calls
    overhead_us = max(0.0, (cpu1 - cpu0) * 1e6 / calls - get_us)
    return {"get_us": get_us, "io_overhead_us": overhead_us, "samples": calls}


def ecpu_estimate(counts: dict[str, Any], baseline: dict[str, float]) -> float:
    """ECPUs an operation would use on ElastiCache Serverless, estimated.

    1 ECPU per KB transferred, or per plain GET's worth of vCPU time, whichever
    is more (and at least 1 per request): the scripts' Redis time plus the
    per-request I/O cost, over a plain GET's (both measured on this Redis).
    """
    calls = int(counts["script_calls"])
    if calls == 0:
        return 0.0
    unit = baseline["get_us"] + baseline["io_overhead_us"]
    cpu = (counts["redis_usec"] + calls * baseline["io_overhead_us"]) / unit
    return float(max(calls, counts["script_bytes"] / 1024, cpu))


# --------------------------------------------------------------------------
# 1. per frame and per turn
# --------------------------------------------------------------------------


def scripted_agent(rounds: int) -> Any:
    """An agent on the SDK's ``ScriptedModel``: ``rounds`` tool calls, then an answer."""
    from agents.testing import assistant_message, function_call
    from harness import scripted_agent as make

    from rejoin.models import CURRENT_TIME_TOOL_NAME, make_current_time_tool

    steps: list[Any] = [
        [function_call(CURRENT_TIME_TOOL_NAME, {}, call_id=f"call-{i}")] for i in range(rounds)
    ]
    steps.append([assistant_message("It is noon, as the clock says.")])
    return make(steps, tools=[make_current_time_tool()])


def streaming_agent(delay: float) -> Any:
    """The offline stand-in, streaming ``delay`` seconds per word."""
    import agents

    from rejoin.models import OfflineModel, make_current_time_tool

    return agents.Agent(
        name="agent",
        instructions="bench",
        model=OfflineModel(delay=delay),
        tools=[make_current_time_tool()],
    )


def _frames(stack: Any, meter: Meter, sid: str, rows: dict[str, Counts] | None) -> list[str]:
    """Two participants through a session's life, every frame and turn measured.

    Returns what went wrong (an empty list when every step did what it should).
    """
    problems: list[str] = []

    def step(name: str, call: Callable[[], Any]) -> Any:
        # A second apart: the rate limiter sees people typing, not a burst.
        stack.clock.advance(1)
        result, counts = meter.measure(stack, call)
        if rows is not None:
            rows[name] = counts
        return result

    _, ada = step(CONNECT_NEW, lambda: stack.connect(sid, "ada"))
    welcome = step(RESUME, lambda: stack.resume(ada))
    _, bob = step(CONNECT_JOIN, lambda: stack.connect(sid, "bob"))
    step(RESUME_2, lambda: stack.resume(bob))
    ack = step(SAY_PLAIN, lambda: stack.say(ada, "hello bob"))
    if ack.get("type") != "ack":
        problems.append(f"plain say answered {ack}")
    stack.say(ada, "did you see that?", f"{sid}-dup")
    step(SAY_RETRY, lambda: stack.say(ada, "did you see that?", f"{sid}-dup"))
    history = stack.rt.rooms().keys(sid).items
    for rounds in TOOL_ROUNDS:
        set_agent(stack, scripted_agent(rounds))
        replies = len(stack.frames(bob, "agent_message"))
        step(say_to_agent(rounds), lambda: stack.say(ada, "@agent what time is it?"))
        items = meter.cmdstats.client().llen(history)
        step(turn_of(rounds), stack.run_turns)
        if len(stack.frames(bob, "agent_message")) != replies + 1:
            problems.append(f"the turn with {rounds} tool rounds sent no agent_message")
        # Each tool round is a call and its output in the history, then the answer.
        added = meter.cmdstats.client().llen(history) - items
        if added != 2 * rounds + 1:
            problems.append(f"the turn with {rounds} tool rounds added {added} history items")
    step(PING, lambda: stack.send(ada, {"action": "ping"}))
    step(STOP, lambda: stack.send(ada, {"action": "stop"}))
    last_seq = max(f["seq"] for f in stack.logged(ada))
    step(LEAVE, lambda: stack.send(bob, {"action": "leave"}))
    if not stack.frames(bob, "left"):
        problems.append("leave was not answered with left")
    step(DISCONNECT_AFTER_LEAVE, lambda: stack.drop(bob))
    step(DISCONNECT_LAST, lambda: stack.drop(ada))
    stack.clock.advance(60)
    _, ada2 = step(CONNECT_BACK, lambda: stack.connect(sid, "ada"))
    again = step(
        RESUME_REPLAY, lambda: stack.resume(ada2, epoch=welcome["epoch"], last_seq=last_seq)
    )
    if not again.get("recovered"):
        problems.append("the resume within grace did not recover the missed events")
    stack.drop(ada2)
    return problems


def warm_scripts(endpoint: Endpoint, meter: Meter) -> None:
    """Run every room script once (frames, turns, a cleanup), so Redis has them cached."""
    stack = build_stack(endpoint, None, **DEPLOYED)
    _frames(stack, meter, "warm", None)
    # The poll of a running turn: any answer will do, the script is cached by then.
    with contextlib.suppress(Exception):
        stack.rt.run(stack.rt.rooms().turn_status("warm", "epoch", "turn", "attempt"))
    stack.clock.advance(stack.settings.grace_seconds + PAST_GRACE)
    stack.cleanup()


def _streamed_turn(stack: Any, meter: Meter, sid: str) -> tuple[Counts, Counts]:
    """A say to the agent whose reply streams for about 5 s (the worker polls)."""
    set_agent(stack, streaming_agent(STREAMING_DELAY))
    ada, _ = stack.join(sid, "ada")
    stack.join(sid, "bob")
    stack.clock.advance(1)
    _, said = meter.measure(stack, lambda: stack.say(ada, "@agent tell me about the plan"))
    _, turn = meter.measure(stack, stack.run_turns)
    return said, turn


def _per_frame(
    endpoint: Endpoint, cmdstats: CommandStats, report: Report, quick: bool
) -> dict[str, Counts]:
    meter = Meter(endpoint, cmdstats)
    warm_scripts(endpoint, meter)  # every script cached from here on
    stack = build_stack(endpoint, None, **DEPLOYED)
    rows: dict[str, Counts] = {}
    for problem in _frames(stack, meter, "frames", rows):
        report.check(problem, False)
    if not quick:
        said, turn = _streamed_turn(stack, meter, "streamed")
        rows[f"say to the agent, {STREAMED}"] = said
        rows[f"its turn, {STREAMED}"] = turn

    table = []
    for name, c in rows.items():
        table.append(
            [
                name,
                c.requests,
                c.commands,
                c.redis_commands,
                c.posts,
                c.deltas,
                c.sqs_messages,
                c.lambdas(),
                c.attribution(),
            ]
        )
    print_table(
        "Per frame and per turn: two participants, rate limiting on (20 frames / 10 s), reply "
        "mode addressed (warm scripts; Upstash counted at the endpoint; handler ms timed in "
        "this process)",
        [
            "operation",
            "Upstash requests",
            "Upstash commands",
            "Redis cmds inside scripts",
            "posts",
            "of which deltas",
            "SQS messages",
            "Lambda invocations (ms here)",
            "scripts",
        ],
        table,
    )
    report.goal(
        "plain say, rate limiting on, reply mode addressed: Upstash requests",
        rows[SAY_PLAIN].requests,
        1,
    )
    for rounds in TOOL_ROUNDS:
        total = rows[say_to_agent(rounds)].requests + rows[turn_of(rounds)].requests
        report.goal(
            f"say to the agent + its whole turn, {rounds} tool rounds: Upstash requests", total, 5
        )
    if not quick:
        said, turn = rows[f"say to the agent, {STREAMED}"], rows[f"its turn, {STREAMED}"]
        total = said.requests + turn.requests
        report.goal(f"say to the agent + its whole turn, {STREAMED}: Upstash requests", total, 5)
    worst = max(LATER_FRAMES, key=lambda n: rows[n].requests)
    report.goal(
        "every later frame (resume, ping, stop, leave, $disconnect), most Upstash requests "
        f"({worst})",
        rows[worst].requests,
        1,
    )
    return rows


# --------------------------------------------------------------------------
# 2. the cleanup
# --------------------------------------------------------------------------


async def _populate(stack: Any, n: int, tag: str) -> None:
    """``n`` sessions in grace (their last connection gone) and ``n`` live ones."""
    from harness import new_connection_id

    rooms = stack.rt.rooms()
    now = stack.clock()
    limit = asyncio.Semaphore(50)

    async def one(i: int) -> None:
        async with limit:
            gone = new_connection_id()
            await rooms.connect(f"{tag}-x{i}", gone, f"u{i}", "U", mode="every", issued_at=now)
            await rooms.disconnect(f"{tag}-x{i}", gone)
            live = new_connection_id()
            await rooms.connect(f"{tag}-l{i}", live, f"u{i}", "U", mode="every", issued_at=now)

    await asyncio.gather(*(one(i) for i in range(n)))


def _cleanup_run(
    endpoint: Endpoint, meter: Meter, cmdstats: CommandStats, n: int, *, cold: bool
) -> dict[str, Any]:
    stack = build_stack(endpoint, None)
    if not cold:
        # One session through a cleanup first: both of its scripts are cached.
        stack.rt.run(_populate(stack, 1, "warmup"))
        stack.clock.advance(stack.settings.grace_seconds + PAST_GRACE)
        stack.cleanup()
    stack.rt.run(_populate(stack, n, "s"))
    stack.clock.advance(stack.settings.grace_seconds + PAST_GRACE)
    if cold:
        cmdstats.script_flush()
    result, c = meter.measure(stack, stack.cleanup)
    _, idle = meter.measure(stack, stack.cleanup)
    expired = len(result["expired"])
    scripts = Counter(c.scripts)
    return {
        "cache": "cold (SCRIPT FLUSH first)" if cold else "warm",
        "expired_sessions": n,
        "live_sessions": n,
        "visited": result["visited"],
        "expired": expired,
        "requests": c.requests,
        "evals": c.command_names.get("EVAL", 0),
        "index_reads": scripts.get("due", 0),
        "visits": scripts.get("visit", 0),
        "extra_per_expired": (c.requests - expired) / max(1, expired),
        "idle_run_requests": idle.requests,
        "ms": c.invocations[0].ms if c.invocations else 0.0,
    }


def _cleanup(
    endpoint: Endpoint, cmdstats: CommandStats, report: Report, quick: bool
) -> list[dict[str, Any]]:
    meter = Meter(endpoint, cmdstats)
    n = QUICK_CLEANUP_SESSIONS if quick else CLEANUP_SESSIONS
    runs = [_cleanup_run(endpoint, meter, cmdstats, n, cold=cold) for cold in (True, False)]
    print_table(
        f"The cleanup: {n:,} sessions past their grace and {n:,} live ones (one run of the "
        "cleanup handler)",
        [
            "script cache",
            "visited",
            "deleted",
            "Upstash requests",
            "of which EVAL (cache misses)",
            "index reads",
            "extra requests per expired session",
            "handler ms (here)",
            "next run, nothing due: requests",
        ],
        [
            [
                r["cache"],
                r["visited"],
                r["expired"],
                r["requests"],
                r["evals"],
                r["index_reads"],
                r["extra_per_expired"],
                r["ms"],
                r["idle_run_requests"],
            ]
            for r in runs
        ],
    )
    for r in runs:
        report.check(
            f"cleanup ({r['cache']}) deleted all {n:,} expired sessions and visited no live one",
            r["expired"] == n and r["visited"] == n,
        )
        report.goal(
            f"cleanup, extra requests per expired session, {r['cache']}",
            r["extra_per_expired"],
            0.01,
        )
    return runs


# --------------------------------------------------------------------------


def _write_counts(report: Report, rows: dict[str, Counts], cleanup: list[dict[str, Any]]) -> Path:
    from rejoin import cleanup as cleanup_module
    from rejoin import turns

    baseline = report.data["redis_baseline"]
    per_op = {}
    for name, c in rows.items():
        entry = c.to_json()
        entry["ecpu_estimate"] = round(ecpu_estimate(entry, baseline), 2)
        per_op[name] = entry
    payload = {
        "about": (
            "Counts measured by the rooms benchmark (bench/rooms.py, bench/cost.py) against the "
            "local Upstash-compatible endpoint; read by bench/scale.py. Regenerate with the "
            "command below; do not edit by hand."
        ),
        "command": COUNTS_COMMAND,
        "date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "machine": _machine(),
        "constants": {
            "delta_interval_s": turns.DELTA_INTERVAL,
            "poll_first_s": turns.POLL_FIRST,
            "poll_every_s": turns.POLL_EVERY,
            "cleanup_visits_per_run": cleanup_module.BATCH * cleanup_module.MAX_BATCHES,
        },
        "redis_baseline": baseline,
        "per_operation": per_op,
        "cleanup": cleanup,
        "meeting": report.data["meeting"],
    }
    COUNTS_PATH.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    return COUNTS_PATH


def _machine() -> str:
    import os
    import platform

    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs (shared), "
        f"Python {platform.python_version()}"
    )


def run(endpoint: Endpoint, *, quick: bool) -> Report:
    """Run the rooms benchmark; prints its tables and goals (a full run writes counts.json)."""
    from rejoin.runtime import set_runtime

    from . import cost
    from .imports import run_imports

    print("\n## Rooms benchmark (frames, turns, cleanup, imports, a meeting)\n")
    report = Report("rooms")
    cmdstats = CommandStats(endpoint.redis_url)
    rows: dict[str, Counts] = {}
    cleanup: list[dict[str, Any]] = []
    try:
        with HANDLERS.installed():
            report.data["redis_baseline"] = redis_baseline(cmdstats)
            for part in (
                lambda: rows.update(_per_frame(endpoint, cmdstats, report, quick)),
                lambda: cleanup.extend(_cleanup(endpoint, cmdstats, report, quick)),
                lambda: run_imports(report, quick=quick),
                lambda: cost.run(endpoint, Meter(endpoint, cmdstats), report, quick=quick),
            ):
                started = time.monotonic()
                part()
                print(f"({time.monotonic() - started:.1f} s)")
    finally:
        set_runtime(None)
        cmdstats.close()
    report.data["per_operation"] = {name: c.to_json() for name, c in rows.items()}
    report.data["cleanup"] = cleanup
    if not quick and not any(not ok for _, ok in report.checks):
        path = _write_counts(report, rows, cleanup)
        print(f"\ncounts written to {path.relative_to(REPO_ROOT)} (read by python -m bench.scale)")
    return report
