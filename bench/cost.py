"""What a one-hour meeting costs: replayed through the handlers, then priced.

The meeting (its shape is the scenario; what each step costs is measured):

- 8 participants connect and send ``resume`` at the start; 6 of them speak,
  in turn, one message every 20 s (180 in the hour); 2 only listen, and
  their clients send ``ping`` after 4 minutes without sending anything (the
  browser client's keep-alive), well inside API Gateway's 10-minute idle
  timeout;
- every 4th message addresses the agent (45 turns), which answers after one
  tool round (``current_time``); reply mode ``addressed``, rate limiting on;
- the cleanup runs every minute, as scheduled;
- at the end everyone sends ``leave`` and disconnects; the session expires
  and the cleanup deletes it.

The agent is the offline stand-in streaming 20 ms per word, so a reply
streams for about a second: the delta posts and the turn's milliseconds are
that stand-in's, not a real model's (the bill shows a real model's wait as a
separate line). Lambda milliseconds are each handler call timed in this
process, against a local endpoint: local figures, not Lambda's billed ones.

Prices (public list prices, us-east-1; they change): see :data:`PRICES`.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Any

from ._measure import Report, print_table
from ._stack import Endpoint

__all__ = ["PRICES", "run"]

PARTICIPANTS = ("ada", "bob", "cy", "dee", "eve", "fay", "gus", "hal")
SPEAKERS = PARTICIPANTS[:6]
MEETING_SECONDS, QUICK_MEETING_SECONDS = 3600, 240
MESSAGE_EVERY = 20
ADDRESSED_EVERY = 4  # a quarter of the messages ask the agent
KEEPALIVE_SECONDS = 240  # the browser client pings after 4 minutes without sending
CLEANUP_EVERY = 60
STAND_IN_DELAY = 0.02  # the offline model's local default, seconds per word
ASSUMED_MODEL_SECONDS = 6.0  # a real model's time per turn (two calls), for the bill only

# Public list prices, us-east-1, Arm Lambda; per unit.
PRICES = {
    "upstash_command": 0.20 / 100_000,  # https://upstash.com/docs/redis/overall/billing
    "apigw_message": 1.00 / 1_000_000,  # https://aws.amazon.com/api-gateway/pricing/
    "apigw_connection_minute": 0.25 / 1_000_000,
    "lambda_request": 0.20 / 1_000_000,  # https://aws.amazon.com/lambda/pricing/
    "lambda_gb_second": 0.0000133334,
    "sqs_fifo_request": 0.50 / 1_000_000,  # https://aws.amazon.com/sqs/pricing/
}
MESSAGE_UNIT = 32 * 1024  # API Gateway bills messages in 32 KB increments
# template.yaml: Globals MemorySize 512, the turn worker 1024.
MEMORY_GB = {"turn": 1.0}
DEFAULT_MEMORY_GB = 0.5
# SQS requests per turn on AWS: SendMessage here, then Lambda's poller receives
# and deletes it (an assumption: batches of one, as turns of a session are apart).
SQS_REQUESTS_PER_TURN = 3

LINES = (
    "can we go through the launch checklist?",
    "I think the docs are done, the load test is not",
    "who owns the rollback plan?",
    "let's keep the numbers in the shared sheet",
)


def _units(sizes: list[int]) -> int:
    return sum(max(1, math.ceil(size / MESSAGE_UNIT)) for size in sizes)


def _session_bytes(cmdstats: Any, prefix: str, sid: str) -> int:
    """Bytes the session's keys take in Redis (``MEMORY USAGE``, exact)."""
    r = cmdstats.client()
    total = 0
    for key in r.scan_iter(match=f"{prefix}:{{{sid}}}:*", count=500):
        total += int(r.memory_usage(key, samples=0) or 0)
    return total


def run(endpoint: Endpoint, meter: Any, report: Report, *, quick: bool) -> None:
    """Replay the meeting, print what it cost and record it in ``report.data["meeting"]``."""
    from .rooms import (
        DEPLOYED,
        PAST_GRACE,
        Counts,
        build_stack,
        ecpu_estimate,
        streaming_agent,
        warm_scripts,
    )

    # Steady state: no script misses Redis' cache (the cleanup bench flushed it).
    warm_scripts(endpoint, meter)
    seconds = QUICK_MEETING_SECONDS if quick else MEETING_SECONDS
    stack = build_stack(endpoint, streaming_agent(0 if quick else STAND_IN_DELAY), **DEPLOYED)
    sid = "meeting"
    per_kind: dict[str, Counts] = {}
    inbound: list[int] = []

    def op(kind: str, call: Any, frame_bytes: int = 0) -> Any:
        result, counts = meter.measure(stack, call)
        per_kind.setdefault(kind, Counts()).add(counts)
        if frame_bytes:
            inbound.append(frame_bytes)
        return result

    cids: dict[str, str] = {}
    last_sent: dict[str, float] = {}
    for user in PARTICIPANTS:
        # Tokens outlive the meeting (the harness' default lives an hour).
        token = stack.token(sid, user, ttl=3 * 3600)
        status, cids[user] = op("$connect", lambda u=user, t=token: stack.connect(sid, u, token=t))
        assert status == 200, status
        op("resume", lambda u=user: stack.resume(cids[u]), frame_bytes=20)
        last_sent[user] = stack.clock()
    start = stack.clock()
    n_messages = seconds // MESSAGE_EVERY
    turns = 0
    for k in range(1, n_messages + 1):
        stack.clock.advance(MESSAGE_EVERY)
        now = stack.clock() - start
        user = SPEAKERS[(k - 1) % len(SPEAKERS)]
        addressed = k % ADDRESSED_EVERY == 0
        line = "@agent what time is it now?" if addressed else LINES[k % len(LINES)]
        text = f"{line} ({k})"
        ack = op("say", lambda u=user, t=text: stack.say(cids[u], t), frame_bytes=len(text) + 40)
        assert ack["type"] == "ack", ack
        last_sent[user] = stack.clock()
        if addressed:
            op("turn", stack.run_turns)
            turns += 1
        for u in PARTICIPANTS:
            if stack.clock() - last_sent[u] >= KEEPALIVE_SECONDS:
                op("ping", lambda u=u: stack.send(cids[u], {"action": "ping"}), frame_bytes=17)
                last_sent[u] = stack.clock()
        if now % CLEANUP_EVERY == 0:
            op("cleanup, scheduled runs", stack.cleanup)
    replies = len(stack.frames(cids[PARTICIPANTS[-1]], "agent_message"))
    session_bytes = _session_bytes(meter.cmdstats, stack.settings.key_prefix, sid)
    for u in PARTICIPANTS:
        op("leave", lambda u=u: stack.send(cids[u], {"action": "leave"}), frame_bytes=18)
        op("$disconnect", lambda u=u: stack.drop(cids[u]))
    stack.clock.advance(stack.settings.grace_seconds + PAST_GRACE)
    swept = op("cleanup, deletes the session", stack.cleanup)
    report.check(f"the meeting's {turns} turns each sent an agent_message", replies == turns)
    report.check("the cleanup deleted the meeting after its grace", swept["expired"] == [sid])

    baseline = report.data["redis_baseline"]
    total = Counts()
    for c in per_kind.values():
        total.add(c)
    scheduled = per_kind.get("cleanup, scheduled runs", Counts())
    runs = sum(1 for i in scheduled.invocations if i.function == "cleanup")
    # Each scheduled run reads the schedule index once: a cost of the deployment,
    # whatever it finds; the rest of the runs' requests are this meeting's visits.
    fixed_reads = Counter(scheduled.scripts).get("due", 0)
    meeting_requests = total.requests - fixed_reads
    meeting_commands = total.commands - fixed_reads

    rows = []
    for kind, c in per_kind.items():
        entry = c.to_json()
        rows.append(
            [
                kind,
                len([i for i in c.invocations if i.function != "authorize"]) or "-",
                c.requests,
                c.commands,
                c.redis_commands,
                ecpu_estimate(entry, baseline),
                c.posts,
                c.deltas,
                c.sqs_messages,
                _invocations(c),
            ]
        )
    entry = total.to_json()
    total_ecpu = sum(ecpu_estimate(c.to_json(), baseline) for c in per_kind.values())
    rows.append(
        [
            "total",
            "",
            total.requests,
            total.commands,
            total.redis_commands,
            total_ecpu,
            total.posts,
            total.deltas,
            total.sqs_messages,
            _invocations(total),
        ]
    )
    minutes = seconds // 60
    print_table(
        f"A {minutes}-minute meeting replayed: {len(PARTICIPANTS)} participants "
        f"({len(SPEAKERS)} speak), a message every {MESSAGE_EVERY} s ({n_messages}), "
        f"{turns} turns with one tool round (measured)",
        [
            "what",
            "times",
            "Upstash requests",
            "Upstash commands",
            "Redis cmds inside scripts",
            "ECPUs (estimate)",
            "posts",
            "of which deltas",
            "SQS messages",
            "Lambda invocations: median ms here",
        ],
        rows,
    )

    invocations = _by_function(total)
    gb_s = sum(
        v["total_ms"] / 1000 * MEMORY_GB.get(fn, DEFAULT_MEMORY_GB) for fn, v in invocations.items()
    )
    n_invocations = sum(v["count"] for v in invocations.values())
    post_units = _units(total.post_bytes)
    inbound_units = _units(inbound)
    conn_minutes = len(PARTICIPANTS) * minutes
    model_gb_s = turns * ASSUMED_MODEL_SECONDS * MEMORY_GB["turn"]
    costs = {
        "upstash": meeting_commands * PRICES["upstash_command"],
        "apigw_messages": (post_units + inbound_units) * PRICES["apigw_message"],
        "apigw_minutes": conn_minutes * PRICES["apigw_connection_minute"],
        "lambda": n_invocations * PRICES["lambda_request"] + gb_s * PRICES["lambda_gb_second"],
        "sqs": turns * SQS_REQUESTS_PER_TURN * PRICES["sqs_fifo_request"],
    }
    model_wait = model_gb_s * PRICES["lambda_gb_second"]
    bill = [
        [
            "Upstash commands (pay as you go)",
            f"{meeting_commands:,} ({meeting_requests:,} requests)",
            "$0.20 / 100K",
            f"${costs['upstash']:.5f}",
            "measured",
        ],
        [
            "API Gateway messages",
            f"{post_units + inbound_units:,} = {inbound_units} in + {post_units:,} out",
            "$1.00 / 1M (32 KB units)",
            f"${costs['apigw_messages']:.5f}",
            "measured (frames, posts)",
        ],
        [
            "API Gateway connection minutes",
            f"{conn_minutes:,} = {len(PARTICIPANTS)} x {minutes}",
            "$0.25 / 1M",
            f"${costs['apigw_minutes']:.6f}",
            "the meeting's length",
        ],
        [
            "Lambda requests + GB-s",
            f"{n_invocations} invocations, {gb_s:.1f} GB-s",
            "$0.20 / 1M + $0.0000133334 / GB-s",
            f"${costs['lambda']:.5f}",
            "invocations measured, ms measured here",
        ],
        [
            "SQS FIFO requests",
            f"{turns * SQS_REQUESTS_PER_TURN} = {turns} turns x {SQS_REQUESTS_PER_TURN}",
            "$0.50 / 1M",
            f"${costs['sqs']:.6f}",
            "turns measured; receive + delete assumed",
        ],
        ["total", "", "", f"${sum(costs.values()):.5f}", "model tokens not included"],
        [
            "(+ a real model's wait)",
            f"{model_gb_s:.0f} GB-s = {turns} turns x {ASSUMED_MODEL_SECONDS:g} s x 1 GB",
            "$0.0000133334 / GB-s",
            f"${model_wait:.5f}",
            "assumed model time",
        ],
    ]
    print_table(
        f"What the {minutes}-minute meeting costs (list prices, us-east-1)",
        ["item", "count", "unit price", "cost", "source"],
        bill,
    )
    print(
        f"The cleanup ran {runs} times ({fixed_reads} index reads: the deployment's, not the "
        f"meeting's); the session's keys held {session_bytes:,} bytes at the end."
    )
    report.data["meeting"] = {
        "shape": {
            "minutes": minutes,
            "participants": len(PARTICIPANTS),
            "speakers": len(SPEAKERS),
            "message_every_s": MESSAGE_EVERY,
            "addressed_share": 1 / ADDRESSED_EVERY,
            "tool_rounds": 1,
            "keepalive_s": KEEPALIVE_SECONDS,
            "stand_in_seconds_per_word": 0 if quick else STAND_IN_DELAY,
        },
        "messages": n_messages,
        "turns": turns,
        "inbound_frames": len(inbound),
        "inbound_units": inbound_units,
        "post_units": post_units,
        "connection_minutes": conn_minutes,
        "session_bytes_at_end": session_bytes,
        "cleanup_runs": runs,
        "cleanup_index_reads": fixed_reads,
        "meeting_requests": meeting_requests,
        "meeting_commands": meeting_commands,
        "per_kind": {
            kind: c.to_json() | {"ecpu_estimate": round(ecpu_estimate(c.to_json(), baseline), 2)}
            for kind, c in per_kind.items()
        },
        # Estimated per kind of operation, then added up.
        "total": entry | {"ecpu_estimate": round(total_ecpu, 2)},
        "invocations": invocations,
        "gb_seconds_measured": gb_s,
        "costs_usd": costs,
    }


def _by_function(c: Any) -> dict[str, dict[str, float]]:
    out: dict[str, list[float]] = {}
    for i in c.invocations:
        out.setdefault(i.function, []).append(i.ms)
    return {
        fn: {
            "count": len(ms),
            "median_ms": statistics.median(ms),
            "total_ms": sum(ms),
        }
        for fn, ms in sorted(out.items())
    }


def _invocations(c: Any) -> str:
    parts = []
    for fn, v in _by_function(c).items():
        parts.append(f"{fn} x{v['count']}: {v['median_ms']:.1f}")
    return ", ".join(parts) or "-"
