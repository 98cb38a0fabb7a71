"""What a conversation costs: a sample meeting replayed end to end, then priced.

The meeting (the counts of things people do are the scenario, i.e. assumptions;
what each thing costs in requests, commands and posts is measured):

- 3 participants; each connects (and sends ``resume``) twice: once at the
  start, once after dropping mid-meeting (a reconnect within the grace);
- 30 messages, round robin, each answered by an agent turn (reply mode
  ``every``), with the rate limiter on (the deployed default);
- 1 ``ping`` per participant (one lull longer than the client's 4-minute
  keep-alive);
- everyone leaves; the session expires; 1 cleanup sweep deletes it.

The agent is the offline stand-in streaming 20 ms per word (its local
default), so delta posts are what a ~1 s streamed reply produces; a real
model streaming longer sends more (one delta frame per 100 ms per recipient,
shown as a sensitivity line).

Prices (public list prices, may change): Upstash pay-as-you-go $0.20 per 100K
commands; API Gateway WebSocket $1.00 per million messages (billed in 32 KB
increments) and $0.25 per million connection minutes (us-east-1); Lambda arm64
$0.0000133334 per GB-second.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from ._measure import Report, print_table
from ._stack import Endpoint

__all__ = ["run"]

PARTICIPANTS = ("ada", "bob", "cy")
MESSAGES, QUICK_MESSAGES = 30, 3
MEETING_MINUTES = 30
PINGS_PER_PARTICIPANT = 1

UPSTASH_PER_COMMAND = 0.20 / 100_000
APIGW_PER_MESSAGE = 1.00 / 1_000_000
APIGW_PER_CONNECTION_MINUTE = 0.25 / 1_000_000
LAMBDA_PER_GB_SECOND = 0.0000133334
MESSAGE_UNIT = 32 * 1024

# Assumed Lambda billed durations (not measured here) and memory (template.yaml).
ASSUMED_SECONDS = {"connect": 0.04, "message": 0.04, "disconnect": 0.04, "turn": 5.0}
MEMORY_GB = {"connect": 0.5, "message": 0.5, "disconnect": 0.5, "turn": 1.0, "cleanup": 0.5}
CLEANUP_RUN_SECONDS = 0.1
DELTA_INTERVAL = 0.1  # rejoin.turns.DELTA_INTERVAL
REAL_REPLY_SECONDS = 5.0


def _units(sizes: list[int]) -> int:
    return sum(max(1, math.ceil(size / MESSAGE_UNIT)) for size in sizes)


def run(endpoint: Endpoint, meter: Any, report: Report, *, quick: bool) -> None:
    """Replay the meeting, print the bill."""
    import agents

    from rejoin.models import OfflineModel, make_current_time_tool

    from .rooms import Counts, build_stack

    n_messages = QUICK_MESSAGES if quick else MESSAGES
    agent = agents.Agent(
        name="agent",
        instructions="bench",
        model=OfflineModel(delay=0 if quick else 0.02),
        tools=[make_current_time_tool()],
    )
    stack = build_stack(endpoint, agent, rate_limit=20, rate_window_seconds=10)
    sid = "meeting"
    total = Counts()
    per_kind: dict[str, Counts] = {}
    invocations: Counter[str] = Counter()
    inbound: list[int] = []
    turn_posts: list[int] = []

    def op(kind: str, call: Any, frame_bytes: int = 0) -> Any:
        result, counts = meter.measure(stack, call)
        total.add(counts)
        per_kind.setdefault(kind, Counts()).add(counts)
        if frame_bytes:
            inbound.append(frame_bytes)
        if kind == "turn":
            turn_posts.append(counts.posts)
        return result

    def join(user: str, **resume: Any) -> tuple[str, dict[str, Any]]:
        status, cid = op("connect", lambda: stack.connect(sid, user))
        assert status == 200, status
        invocations["connect"] += 1
        welcome = op("resume", lambda: stack.resume(cid, **resume), frame_bytes=60)
        invocations["message"] += 1
        return cid, welcome

    def say(cid: str, text: str) -> None:
        op("say", lambda: stack.say(cid, text), frame_bytes=len(text) + 40)
        invocations["message"] += 1
        results = op("turn", stack.run_turns)
        invocations["turn"] += len(results)

    cids: dict[str, str] = {}
    epoch = ""
    for user in PARTICIPANTS:
        cids[user], welcome = join(user)
        epoch = welcome["epoch"]
    _, fixed = meter.measure(stack, stack.cleanup)  # what every scheduled run costs
    lines = [
        "can we go through the launch checklist?",
        "I think the docs are done, the load test is not",
        "agent, please keep a list of open items",
    ]
    for i in range(n_messages):
        user = PARTICIPANTS[i % len(PARTICIPANTS)]
        say(cids[user], f"{lines[i % len(lines)]} ({i + 1})")
        if i == n_messages // 2 - 1 or (quick and i == 0):
            for u in PARTICIPANTS:  # everyone drops once and comes back
                last = max((f["seq"] for f in stack.logged(cids[u])), default=0)
                op("disconnect", lambda u=u: stack.drop(cids[u]))
                invocations["disconnect"] += 1
                cids[u], _ = join(u, epoch=epoch, last_seq=last)
            for u in PARTICIPANTS:
                op("ping", lambda u=u: stack.send(cids[u], {"action": "ping"}), frame_bytes=17)
                invocations["message"] += 1
    for u in PARTICIPANTS:
        op("disconnect", lambda u=u: stack.drop(cids[u]))
        invocations["disconnect"] += 1
    stack.clock.advance(stack.settings.grace_seconds + 3)
    swept = op("cleanup", stack.cleanup)
    assert swept["expired"] == [sid], swept
    # The scheduled run's own cost exists with or without conversations.
    sweep_only = per_kind["cleanup"]
    total.requests -= fixed.requests
    total.commands -= fixed.commands
    total.redis_commands -= fixed.redis_commands

    upstash_cmds = total.commands
    posts_units = _units(total.post_bytes)
    inbound_units = _units(inbound)
    apigw_messages = posts_units + inbound_units
    conn_minutes = len(PARTICIPANTS) * MEETING_MINUTES
    gb_s = sum(invocations[k] * ASSUMED_SECONDS[k] * MEMORY_GB[k] for k in ASSUMED_SECONDS)
    rows_ops = []
    for kind in ("connect", "resume", "say", "turn", "ping", "disconnect", "cleanup"):
        c = per_kind.get(kind, Counts())
        if kind == "cleanup":
            c = Counts(
                requests=sweep_only.requests - fixed.requests,
                commands=sweep_only.commands - fixed.commands,
                redis_commands=sweep_only.redis_commands - fixed.redis_commands,
                posts=sweep_only.posts,
            )
        rows_ops.append([kind, c.requests, c.commands, c.redis_commands, c.posts])
    rows_ops.append(["total", total.requests, total.commands, total.redis_commands, total.posts])
    print_table(
        f"Sample meeting replayed: {len(PARTICIPANTS)} participants, {n_messages} messages, "
        f"{invocations['turn']} turns, {invocations['connect']} connects (measured)",
        ["what", "Upstash requests", "Upstash commands", "Redis cmds inside scripts", "posts"],
        rows_ops,
    )
    deltas_per_turn = (
        sum(turn_posts) / max(1, len(turn_posts)) / len(PARTICIPANTS) - 1  # minus the final
    )
    costs = {
        "upstash": upstash_cmds * UPSTASH_PER_COMMAND,
        "apigw_messages": apigw_messages * APIGW_PER_MESSAGE,
        "apigw_minutes": conn_minutes * APIGW_PER_CONNECTION_MINUTE,
        "lambda": gb_s * LAMBDA_PER_GB_SECOND,
    }
    rows = [
        [
            "Upstash commands",
            f"{upstash_cmds:,} ({total.requests:,} requests)",
            "$0.20 / 100K",
            f"${costs['upstash']:.5f}",
            "measured",
        ],
        [
            "API Gateway messages",
            f"{apigw_messages:,} = {inbound_units} in + {posts_units:,} out",
            "$1.00 / 1M (32 KB units)",
            f"${costs['apigw_messages']:.5f}",
            "measured (frames, posts)",
        ],
        [
            "API Gateway connection minutes",
            f"{conn_minutes} = {len(PARTICIPANTS)} x {MEETING_MINUTES} min",
            "$0.25 / 1M",
            f"${costs['apigw_minutes']:.6f}",
            "assumed (meeting length)",
        ],
        [
            "Lambda GB-seconds",
            f"{gb_s:.1f} ({sum(invocations.values())} invocations)",
            "$0.0000133334 / GB-s",
            f"${costs['lambda']:.5f}",
            "invocations measured, durations assumed",
        ],
        ["total", "", "", f"${sum(costs.values()):.5f}", ""],
    ]
    print_table(
        "What this meeting costs (list prices; model tokens not included)",
        ["item", "count", "unit price", "cost", "source"],
        rows,
    )
    deltas_real = REAL_REPLY_SECONDS / DELTA_INTERVAL
    extra = (deltas_real - deltas_per_turn) * invocations["turn"] * len(PARTICIPANTS)
    print(
        f"Agent deltas: {deltas_per_turn:.1f} delta posts per recipient per turn were measured "
        f"(offline model, 20 ms/word). A real reply streaming for {REAL_REPLY_SECONDS:.0f} s "
        f"sends up to {deltas_real:.0f} per recipient (one per {DELTA_INTERVAL} s): "
        f"+{extra:,.0f} messages, +${extra * APIGW_PER_MESSAGE:.4f}."
    )
    if total.redis_commands:
        print(
            f"Upper bound if Upstash billed the commands scripts run inside Redis: "
            f"{total.redis_commands:,} commands, ${total.redis_commands * UPSTASH_PER_COMMAND:.5f}."
        )
    runs = 60 * 24 * 30
    monthly_cmds = runs * fixed.commands
    monthly_gb_s = runs * CLEANUP_RUN_SECONDS * MEMORY_GB["cleanup"]
    print(
        f"Fixed, per deployment: the cleanup runs every minute ({fixed.requests} requests, "
        f"{fixed.commands} commands when there is nothing to do): {monthly_cmds:,} commands "
        f"= ${monthly_cmds * UPSTASH_PER_COMMAND:.2f}/month, plus {monthly_gb_s:,.0f} GB-s "
        f"(assumed {CLEANUP_RUN_SECONDS * 1000:.0f} ms/run) = "
        f"${monthly_gb_s * LAMBDA_PER_GB_SECOND:.3f}/month."
    )
    report.data["conversation"] = {
        "participants": len(PARTICIPANTS),
        "messages": n_messages,
        "invocations": dict(invocations),
        "upstash_requests": total.requests,
        "upstash_commands": upstash_cmds,
        "redis_commands_inside": total.redis_commands,
        "posts": total.posts,
        "post_units": posts_units,
        "inbound_frames": len(inbound),
        "deltas_per_recipient_per_turn": deltas_per_turn,
        "connection_minutes": conn_minutes,
        "gb_seconds_assumed": gb_s,
        "costs_usd": costs,
        "cleanup_fixed_per_run": {"requests": fixed.requests, "commands": fixed.commands},
    }
