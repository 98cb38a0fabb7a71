"""The scale model: 1,000, 10,000 and 100,000 concurrent sessions.

``python -m bench.scale`` (or ``.venv/bin/python -m bench --only scale``)
prints the model's tables; ``--write docs/scale.md`` puts them into the
document between its ``<!-- BEGIN scale:NAME -->`` / ``<!-- END scale:NAME -->``
markers, ``--check docs/scale.md`` fails if the document is out of date.

Nothing here is measured: the per-operation counts come from
``bench/counts.json``, which the rooms benchmark writes
(``.venv/bin/python -m bench --only rooms``); the quotas and prices come from
:data:`QUOTAS` and :data:`PRICES` below, each with the page it was read from;
what is assumed (a real model's time, the round trip of a post) is in
:class:`Assumptions`. Every rate is linear in the number of sessions, so each
quota is reached at one session count, whatever the size looked at.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PRICES",
    "QUOTAS",
    "Assumptions",
    "Demand",
    "blocks",
    "demand",
    "load_counts",
    "main",
    "render",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
COUNTS_PATH = REPO_ROOT / "bench" / "counts.json"
DOC_PATH = REPO_ROOT / "docs" / "scale.md"
TEMPLATE_PATH = REPO_ROOT / "template.yaml"
HOURS_PER_MONTH = 730


@dataclass(frozen=True)
class Source:
    """Where a figure was read."""

    url: str
    note: str = ""


WS_LIMITS = Source(
    "https://docs.aws.amazon.com/apigateway/latest/developerguide/"
    "apigateway-execution-service-websocket-limits-table.html"
)
APIGW_LIMITS = Source("https://docs.aws.amazon.com/apigateway/latest/developerguide/limits.html")
LAMBDA_LIMITS = Source("https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html")
LAMBDA_SCALING = Source("https://docs.aws.amazon.com/lambda/latest/dg/scaling-behavior.html")
SQS_QUOTAS = Source(
    "https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/"
    "quotas-messages.html"
)
UPSTASH_BILLING = Source("https://upstash.com/docs/redis/overall/billing")
ELASTICACHE_PRICING = Source("https://aws.amazon.com/elasticache/pricing/")
ELASTICACHE_SERVERLESS_BLOG = Source(
    "https://aws.amazon.com/blogs/database/"
    "unlock-on-demand-cost-optimized-performance-with-amazon-elasticache-serverless/"
)
ELASTICACHE_FAQ = Source("https://aws.amazon.com/elasticache/faqs/")
ELASTICACHE_LIMITS = Source(
    "https://docs.aws.amazon.com/cdk/api/v2/docs/"
    "@aws-cdk_aws-elasticache-alpha.CacheUsageLimitsProperty.html"
)
APIGW_PRICING = Source("https://aws.amazon.com/api-gateway/pricing/")
LAMBDA_PRICING = Source("https://aws.amazon.com/lambda/pricing/")
SQS_PRICING = Source("https://aws.amazon.com/sqs/pricing/")
TEMPLATE = Source("template.yaml")
CLEANUP = Source("shared/rejoin/cleanup.py")


@dataclass(frozen=True)
class Quota:
    """A published limit, what counts against it, and what to do before it."""

    key: str
    what: str
    limit: float
    unit: str
    source: Source
    change: str


def _stage_throttle() -> float:
    # The template's own default, so the model follows the template.
    text = TEMPLATE_PATH.read_text()
    pattern = r"ApiThrottlingRateLimit:\s*\n\s*Type:\s*Number\s*\n\s*Default:\s*(\d+)"
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 100.0


QUOTAS: tuple[Quota, ...] = (
    Quota(
        "stage_rps",
        "the API stage's throttle (template parameter `ApiThrottlingRateLimit`): "
        "messages in and connects",
        _stage_throttle(),
        "requests/s",
        TEMPLATE,
        "raise `ApiThrottlingRateLimit` (`make deploy ARGS='--parameter-overrides "
        "ApiThrottlingRateLimit=...'`); it cannot "
        "exceed the account quota below",
    ),
    Quota(
        "apigw_rps",
        "API Gateway requests per account and Region: WebSocket messages in, @connections "
        "calls out (PostToConnection, GetConnection, DeleteConnection), HTTP API calls",
        10_000,
        "requests/s",
        APIGW_LIMITS,
        "ask for more (Service Quotas, L-8A5B8E43); send fewer `agent_delta` frames "
        "(`rejoin.turns.DELTA_INTERVAL`): they are most of the calls",
    ),
    Quota(
        "ws_connects",
        "WebSocket new connections per account and Region",
        500,
        "connections/s",
        WS_LIMITS,
        "ask for more (Service Quotas); stagger the start of meetings",
    ),
    Quota(
        "lambda_concurrency",
        "Lambda concurrent executions per account and Region (all functions)",
        1_000,
        "executions",
        LAMBDA_LIMITS,
        "ask for more (up to tens of thousands); the turn worker holds most of it while it "
        "waits on the model",
    ),
    Quota(
        "upstash_cps",
        "Upstash commands per second per database (Free, pay as you go, Fixed up to 50 GB; "
        "16,000 on Fixed 100 GB and 500 GB)",
        10_000,
        "commands/s",
        UPSTASH_BILLING,
        "spread sessions over several databases (every key is per session, the schedule "
        "per database), or move to ElastiCache",
    ),
    Quota(
        "upstash_data",
        "Upstash data size, pay as you go (Fixed plans up to 500 GB)",
        100e9,
        "bytes",
        UPSTASH_BILLING,
        "a Fixed plan or several databases; keep `REJOIN_HISTORY_MAX_ITEMS` and the event log cap",
    ),
    Quota(
        "sqs_queue",
        "SQS FIFO high-throughput mode, per API action per queue (us-east-1, us-west-2, "
        "eu-west-1; other Regions less): SendMessage of turns",
        70_000,
        "requests/s",
        SQS_QUOTAS,
        "a second turn queue (sessions hashed over the queues)",
    ),
    Quota(
        "cleanup_visits",
        "sessions one cleanup run can visit (`MAX_BATCHES` x `BATCH` in rejoin.cleanup), "
        "per minute",
        10_000,
        "visits/min",
        CLEANUP,
        "raise `MAX_BATCHES` (a run visits 50 at once and has 55 s) or run the cleanup more often",
    ),
)


@dataclass(frozen=True)
class Plan:
    """A fixed-price store plan: price per month, data size, commands per second,
    bandwidth per month."""

    name: str
    usd_month: float
    data_bytes: float
    commands_per_s: float
    bandwidth_month: float


PRICES: dict[str, Any] = {
    "apigw_message": (1.00 / 1e6, APIGW_PRICING, "WebSocket messages, per 32 KB, first 1B/month"),
    "apigw_connection_minute": (0.25 / 1e6, APIGW_PRICING, "WebSocket connection minutes"),
    "lambda_request": (0.20 / 1e6, LAMBDA_PRICING, "requests"),
    "lambda_gb_second": (0.0000133334, LAMBDA_PRICING, "Arm, first 7.5B GB-s/month"),
    "sqs_fifo_request": (0.50 / 1e6, SQS_PRICING, "FIFO requests, per 64 KB"),
    "upstash_command": (0.20 / 1e5, UPSTASH_BILLING, "pay as you go, per command"),
    "upstash_gb_month": (0.25, UPSTASH_BILLING, "pay as you go storage, first 1 GB free"),
    "upstash_database": (0.50 / HOURS_PER_MONTH, UPSTASH_BILLING, "per database beyond 10"),
    "upstash_gb_transfer": (0.03, UPSTASH_BILLING, "pay as you go bandwidth beyond 200 GB/month"),
    "valkey_ecpu": (
        0.0034 / 1e6 * (1 - 0.33),
        ELASTICACHE_FAQ,
        "ElastiCache Serverless for Valkey: Redis OSS's $0.0034 per million ECPUs "
        "(AWS blog) less 33% (FAQ)",
    ),
    "valkey_gb_hour": (
        0.125 * (1 - 0.33),
        ELASTICACHE_FAQ,
        "Serverless Valkey storage: Redis OSS's $0.125 per GB-hour less 33%, metered from 100 MB",
    ),
    "valkey_node_hour": (
        0.219 * (1 - 0.20),
        ELASTICACHE_PRICING,
        "cache.r7g.large (13.07 GiB), on-demand: Redis OSS $0.219/h less 20% for Valkey "
        "(FAQ: up to 20%); the hourly price is the pricing page's, not checked here",
    ),
}
UPSTASH_PLANS: tuple[Plan, ...] = (
    Plan("Fixed 250 MB", 10, 250e6, 10_000, 50e9),
    Plan("Fixed 1 GB", 20, 1e9, 10_000, 100e9),
    Plan("Fixed 5 GB", 100, 5e9, 10_000, 500e9),
    Plan("Fixed 10 GB", 200, 10e9, 10_000, 1e12),
    Plan("Fixed 50 GB", 400, 50e9, 10_000, 5e12),
    Plan("Fixed 100 GB", 800, 100e9, 16_000, 10e12),
    Plan("Fixed 500 GB", 1_500, 500e9, 16_000, 20e12),
)
PAYG_FREE_BANDWIDTH_MONTH = 200e9  # per database; then PRICES["upstash_gb_transfer"]
PAYG_COMMANDS_PER_S = 10_000
SQS_GROUP_TPS = 300  # per partition and API action; a message group lives in one (SQS_QUOTAS)
VALKEY_MIN_GB = 0.1
NODE_MEMORY_GB = 13.07 * 1.073741824
NODE_USABLE = 0.75  # ElastiCache reserves 25% of a node's memory by default
ECPU_LIMIT = (15_000_000, ELASTICACHE_LIMITS)  # per serverless cache, per second


@dataclass(frozen=True)
class Assumptions:
    """What the model assumes (everything else is measured or published).

    Attributes:
        sizes: concurrent sessions to look at.
        model_seconds: a real model's time per turn: the tool decision and the
            streamed answer (the worker's Lambda waits, and is billed, for it).
        stream_seconds: how long the answer streams; rejoin sends one
            ``agent_delta`` per ``DELTA_INTERVAL`` to each participant meanwhile.
        post_wave_ms: one wave of ``PostToConnection`` calls (a broadcast sends
            up to 100 at once); added to each invocation that posts, twice for
            a message (the broadcast, then the ack).
        node_cpu_target: an ElastiCache node's main thread is kept this busy at most.
        delta_interval: seconds between two ``agent_delta`` frames (None: rejoin's
            ``DELTA_INTERVAL``, as measured).
    """

    sizes: tuple[int, ...] = (1_000, 10_000, 100_000)
    model_seconds: float = 6.0
    stream_seconds: float = 4.0
    post_wave_ms: float = 20.0
    node_cpu_target: float = 0.5
    delta_interval: float | None = None


@dataclass
class Demand:
    """What one session of the measured shape causes in one hour (and the fixed parts)."""

    shape: dict[str, Any]
    turns: float
    inbound_messages: float
    connects: float
    posts: float
    deltas: float
    post_messages: float
    callback_calls: float
    connection_minutes: float
    store_requests: float
    store_commands: float
    store_inner_commands: float
    store_bytes: float
    ecpus: float
    redis_cpu_us: float
    sqs_sends: float
    sqs_requests: float
    cleanup_visits: float
    session_bytes: float
    lambda_invocations: dict[str, float] = field(default_factory=dict)
    lambda_seconds: dict[str, float] = field(default_factory=dict)
    lambda_memory_gb: dict[str, float] = field(default_factory=dict)
    polls_per_turn: int = 0

    def concurrency(self) -> float:
        """Lambda executions one session keeps busy on average."""
        return (
            sum(
                self.lambda_invocations[f] * self.lambda_seconds[f] for f in self.lambda_invocations
            )
            / 3600
        )

    def gb_seconds(self) -> float:
        return sum(
            self.lambda_invocations[f] * self.lambda_seconds[f] * self.lambda_memory_gb[f]
            for f in self.lambda_invocations
        )

    def per_second(self, key: str) -> float:
        """One session's share of a quota's measure, in the quota's unit."""
        per_hour: dict[str, float] = {
            "stage_rps": self.inbound_messages + self.connects,
            "apigw_rps": self.inbound_messages + self.connects + self.callback_calls,
            "ws_connects": self.connects,
            "upstash_cps": self.store_commands,
            "sqs_queue": self.sqs_sends,
        }
        if key == "lambda_concurrency":
            return self.concurrency()
        if key == "upstash_data":
            return self.session_bytes
        if key == "cleanup_visits":
            return self.cleanup_visits / 60  # the runs are a minute apart
        return per_hour[key] / 3600


def load_counts(path: Path = COUNTS_PATH) -> dict[str, Any]:
    """The counts the rooms benchmark wrote."""
    counts: dict[str, Any] = json.loads(path.read_text())
    return counts


def polls(seconds: float, first: float, every: float) -> int:
    """How often the turn worker reads the session while a turn runs ``seconds``."""
    if seconds <= first:
        return 0
    return int((seconds - first) // every) + 1


def demand(counts: dict[str, Any], a: Assumptions) -> Demand:
    """Per session-hour demand from the measured meeting, with a real model's timing."""
    m = counts["meeting"]
    c = counts["constants"]
    per_kind = m["per_kind"]
    total = m["total"]
    turns = float(m["turns"])
    participants = int(m["shape"]["participants"])
    scale_to_hour = 60 / m["shape"]["minutes"]

    measured_polls = per_kind.get("turn", {}).get("scripts", {}).get("turn_status", 0)
    per_turn = polls(a.model_seconds, c["poll_first_s"], c["poll_every_s"])
    requests = m["meeting_requests"] + turns * per_turn - measured_polls
    commands = m["meeting_commands"] + turns * per_turn - measured_polls
    share = requests / max(1, total["requests"])

    deltas = total["post_types"].get("agent_delta", 0)
    interval = a.delta_interval or c["delta_interval_s"]
    real_deltas = turns * participants * (a.stream_seconds / interval)
    posts = total["posts"] - deltas + real_deltas
    units_per_post = m["post_units"] / max(1, total["posts"])

    invocations: dict[str, float] = {}
    seconds: dict[str, float] = {}
    memory: dict[str, float] = {}
    # The worker's own time for a turn with a tool round (the scripted model answers at once).
    own = counts["per_operation"]["its turn (1 tool rounds)"]["invocations_ms"]["turn"]
    turn_own_ms = _median(own)
    for fn, v in m["invocations"].items():
        if fn == "cleanup":
            continue  # a run a minute per deployment, not per session
        invocations[fn] = v["count"]
        ms = v["median_ms"]
        if fn == "turn":
            ms = turn_own_ms + a.model_seconds * 1000 + a.post_wave_ms
        elif fn == "message":
            ms += 2 * a.post_wave_ms
        elif fn in ("connect", "disconnect"):
            ms += a.post_wave_ms
        seconds[fn] = ms / 1000
        memory[fn] = 1.0 if fn == "turn" else 0.5
    visits = per_kind.get("cleanup, scheduled runs", {}).get("scripts", {}).get("visit", 0)
    d = Demand(
        shape=m["shape"],
        turns=turns,
        inbound_messages=m["inbound_units"],
        connects=float(m["invocations"].get("connect", {}).get("count", participants)),
        posts=posts,
        deltas=real_deltas,
        post_messages=posts * units_per_post,
        callback_calls=posts + total["get_connection"] + total["delete_connection"],
        connection_minutes=m["connection_minutes"],
        store_requests=requests,
        store_commands=commands,
        store_inner_commands=total["redis_commands"] * share,
        store_bytes=total["script_bytes"] * share,
        ecpus=total["ecpu_estimate"] * share,
        redis_cpu_us=(
            total["redis_usec"] + total["requests"] * counts["redis_baseline"]["io_overhead_us"]
        )
        * share,
        sqs_sends=turns,
        sqs_requests=turns * 3,
        cleanup_visits=visits,
        session_bytes=m["session_bytes_at_end"],
        lambda_invocations=invocations,
        lambda_seconds=seconds,
        lambda_memory_gb=memory,
        polls_per_turn=per_turn,
    )
    if scale_to_hour != 1:
        for name in (
            "turns",
            "inbound_messages",
            "connects",
            "posts",
            "deltas",
            "post_messages",
            "callback_calls",
            "connection_minutes",
            "store_requests",
            "store_commands",
            "store_inner_commands",
            "store_bytes",
            "ecpus",
            "redis_cpu_us",
            "sqs_sends",
            "sqs_requests",
            "cleanup_visits",
        ):
            setattr(d, name, getattr(d, name) * scale_to_hour)
        d.lambda_invocations = {k: v * scale_to_hour for k, v in invocations.items()}
    return d


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


# --------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------


def _price(key: str) -> float:
    value: float = PRICES[key][0]
    return value


def aws_cost_per_hour(d: Demand, n: int) -> dict[str, float]:
    """API Gateway, Lambda and SQS per hour for ``n`` sessions (the store apart)."""
    messages = d.inbound_messages + d.post_messages
    return {
        "API Gateway messages": n * messages * _price("apigw_message"),
        "API Gateway connection minutes": (
            n * d.connection_minutes * _price("apigw_connection_minute")
        ),
        "Lambda requests": n * sum(d.lambda_invocations.values()) * _price("lambda_request"),
        "Lambda GB-s": n * d.gb_seconds() * _price("lambda_gb_second"),
        "SQS FIFO": n * d.sqs_requests * _price("sqs_fifo_request"),
    }


def store_costs(d: Demand, n: int, a: Assumptions) -> dict[str, tuple[float, str]]:
    """Cost per hour of each store for ``n`` sessions, and how it is sized."""
    commands_per_s = n * d.store_commands / 3600
    data = n * d.session_bytes
    gb = data / 1e9
    transfer_month = n * d.store_bytes * HOURS_PER_MONTH
    out: dict[str, tuple[float, str]] = {}

    dbs, _ = _fit({"commands/s": commands_per_s / PAYG_COMMANDS_PER_S, "data": data / 100e9})
    payg = n * d.store_commands * _price("upstash_command")
    payg += max(0.0, gb - dbs) * _price("upstash_gb_month") / HOURS_PER_MONTH
    payg += max(0, dbs - 10) * _price("upstash_database")
    extra_gb = max(0.0, transfer_month - dbs * PAYG_FREE_BANDWIDTH_MONTH) / 1e9
    payg += extra_gb * _price("upstash_gb_transfer") / HOURS_PER_MONTH
    out["Upstash pay as you go"] = (payg, f"{dbs} database{'s' if dbs > 1 else ''}")

    best: tuple[float, str] | None = None
    for plan in UPSTASH_PLANS:
        count, why = _fit(
            {
                "commands/s": commands_per_s / plan.commands_per_s,
                "data": data / plan.data_bytes,
                "bandwidth": transfer_month / plan.bandwidth_month,
            }
        )
        cost = count * plan.usd_month / HOURS_PER_MONTH
        if best is None or cost < best[0]:
            best = (cost, f"{count} x {plan.name}, for {why}")
    assert best is not None
    out["Upstash Fixed"] = best

    ecpus = n * d.ecpus
    serverless = ecpus * _price("valkey_ecpu") + max(VALKEY_MIN_GB, gb) * _price("valkey_gb_hour")
    out["ElastiCache Serverless (Valkey)"] = (serverless, f"{ecpus / 3600:,.0f} ECPU/s")

    cpu = n * d.redis_cpu_us / 1e6 / 3600  # main-thread seconds per second
    shards, why = _fit(
        {"CPU": cpu / a.node_cpu_target, "memory": gb / (NODE_MEMORY_GB * NODE_USABLE)}
    )
    out["ElastiCache nodes (Valkey, r7g.large)"] = (
        2 * shards * _price("valkey_node_hour"),
        f"{shards} shard{'s' if shards > 1 else ''} x 2 nodes, for {why}",
    )
    return out


def _fit(needs: dict[str, float]) -> tuple[int, str]:
    """How many units cover every need (each a multiple of one unit), and which need decides."""
    why = max(needs, key=lambda k: needs[k])
    return max(1, math.ceil(needs[why])), why


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if float(x).is_integer() and abs(x) < 1e6:
        return f"{int(x):,}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _usd(x: float) -> str:
    if x >= 100:
        return f"${x:,.0f}"
    if x >= 1:
        return f"${x:,.2f}"
    return f"${x:.3g}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    out = [line(headers), "| " + " | ".join("-" * w for w in widths) + " |"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _bytes(x: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= size:
            return f"{x / size:,.1f} {unit}"
    return f"{x:.0f} B"


def _block_shape(counts: dict[str, Any], d: Demand, a: Assumptions) -> str:
    s = d.shape
    rows = [
        [
            "participants per session",
            f"{s['participants']} ({s['speakers']} speak, the others listen)",
            "shape",
        ],
        [
            "messages",
            f"one every {s['message_every_s']} s ({60 / s['message_every_s']:g} a minute)",
            "shape",
        ],
        [
            "addressed to the agent",
            f"{s['addressed_share']:.0%} ({d.turns:.0f} turns an hour)",
            "shape",
        ],
        ["tool rounds per turn", str(s["tool_rounds"]), "shape"],
        ["session length", "1 hour, then everyone leaves", "shape"],
        [
            "keep-alive",
            f"`ping` after {s['keepalive_s'] // 60} min without sending",
            "the browser client",
        ],
        [
            "a real model's time per turn",
            f"{a.model_seconds:g} s, of which the answer streams {a.stream_seconds:g} s",
            "assumed",
        ],
        ["one wave of posts (PostToConnection)", f"{a.post_wave_ms:g} ms", "assumed"],
        ["counts", f"{counts['date']}, `{counts['command']}`", "measured"],
    ]
    return _table(["", "value", "source"], rows)


def _block_demand(counts: dict[str, Any], d: Demand, a: Assumptions) -> str:
    c = counts["constants"]
    deltas = a.stream_seconds / c["delta_interval_s"]
    conc = d.concurrency()
    turn_s = d.lambda_seconds.get("turn", 0)
    rows = [
        ["WebSocket messages in (32 KB units)", _fmt(d.inbound_messages), "measured"],
        ["connects (authorizer + `$connect`)", _fmt(d.connects), "measured"],
        [
            "PostToConnection calls",
            _fmt(d.posts),
            f"measured, deltas recounted: {d.turns:.0f} turns x {d.shape['participants']} x "
            f"{_fmt(deltas)} deltas",
        ],
        [
            "all @connections calls (posts, GetConnection, DeleteConnection)",
            _fmt(d.callback_calls),
            "measured",
        ],
        [
            "Upstash requests (= commands: one script each)",
            _fmt(d.store_requests),
            f"measured, + {d.polls_per_turn} polls per turn",
        ],
        ["Redis commands run inside the scripts", _fmt(d.store_inner_commands), "measured"],
        [
            "bytes to and from the store (keys, arguments, answers)",
            _bytes(d.store_bytes),
            "measured (HTTP and encoding overhead not counted)",
        ],
        [
            "ECPUs (ElastiCache Serverless)",
            _fmt(d.ecpus),
            "estimated from Redis time measured here",
        ],
        ["Redis CPU time", f"{d.redis_cpu_us / 1000:,.1f} ms", "measured here (x86, not Graviton)"],
        [
            "SQS messages (turns queued)",
            _fmt(d.sqs_sends),
            f"measured; {d.sqs_sends / 3600:.3g}/s per message group (a session) against "
            f"{SQS_GROUP_TPS} per partition; 3 requests each with receive and delete",
        ],
        ["cleanup visits", _fmt(d.cleanup_visits), "measured"],
        ["session size at the end", _bytes(d.session_bytes), "measured (`MEMORY USAGE`)"],
        [
            "Lambda invocations",
            ", ".join(f"{f} {_fmt(v)}" for f, v in sorted(d.lambda_invocations.items())),
            "measured",
        ],
        [
            "Lambda seconds per invocation",
            ", ".join(f"{f} {_fmt(s)}" for f, s in sorted(d.lambda_seconds.items())),
            f"measured here + assumed waits (the turn: {turn_s:.1f} s, mostly the model)",
        ],
        ["Lambda executions busy on average", _fmt(conc), "derived"],
        ["Lambda GB-s", _fmt(d.gb_seconds()), "derived (512 MB; the turn worker 1 GB)"],
    ]
    return _table(["per session and hour", "count", "source"], rows)


_ASSUMED = Assumptions()


def _block_limits(d: Demand, a: Assumptions) -> str:
    rows = []
    for q in sorted(QUOTAS, key=lambda q: q.limit / max(1e-12, d.per_second(q.key))):
        per = d.per_second(q.key)
        reached = q.limit / per if per else math.inf
        cells = [q.what, f"{_fmt(q.limit)} {q.unit}", _fmt_reached(reached)]
        for n in a.sizes:
            cells.append(f"{n * per / q.limit:.0%}")
        cells.append(q.change)
        rows.append(cells)
    headers = [
        "limit",
        "quota",
        "reached at sessions",
        *[f"use at {n:,}" for n in a.sizes],
        "what to raise or change",
    ]
    return _table(headers, rows)


def _fmt_reached(n: float) -> str:
    if math.isinf(n):
        return "never"
    if n >= 1e6:
        return f"{n / 1e6:,.1f} million"
    return f"{n:,.0f}"


def _block_first(d: Demand, a: Assumptions) -> str:
    ordered = sorted(QUOTAS, key=lambda q: q.limit / max(1e-12, d.per_second(q.key)))
    rows = []
    for n in a.sizes:
        over = [q for q in ordered if n * d.per_second(q.key) > q.limit]
        if over:
            first = over[0]
            what = f"{_short(first)} ({n * d.per_second(first.key) / first.limit:.0%})"
            also = ", ".join(_short(q) for q in over[1:]) or "-"
            change = first.change
        else:
            top = ordered[0]
            use = n * d.per_second(top.key) / top.limit
            what = f"none; the nearest is {_short(top)} ({use:.0%})"
            also = "-"
            change = "nothing yet"
        rows.append([f"{n:,}", what, also, change])
    headers = ["sessions", "first limit reached", "also over", "what to raise or change first"]
    return _table(headers, rows)


_SHORT = {
    "stage_rps": "stage throttle",
    "apigw_rps": "API Gateway account requests/s",
    "ws_connects": "new WebSocket connections/s",
    "lambda_concurrency": "Lambda concurrency",
    "upstash_cps": "Upstash commands/s per database",
    "upstash_data": "Upstash data size",
    "sqs_queue": "SQS FIFO per queue",
    "cleanup_visits": "cleanup visits per run",
}


def _short(q: Quota) -> str:
    return _SHORT[q.key]


def _block_cost(d: Demand, a: Assumptions) -> str:
    rows = []
    for n in a.sizes:
        aws = aws_cost_per_hour(d, n)
        stores = store_costs(d, n, a)
        row = [f"{n:,}", _usd(sum(aws.values()))]
        for name in stores:
            cost, sizing = stores[name]
            row.append(f"{_usd(cost)} ({sizing})")
        rows.append(row)
    names = list(store_costs(d, a.sizes[0], a))
    return _table(["sessions", "AWS without the store", *names], rows)


def _block_aws(d: Demand, a: Assumptions) -> str:
    rows = []
    for n in a.sizes:
        aws = aws_cost_per_hour(d, n)
        rows.append([f"{n:,}", *[_usd(v) for v in aws.values()], _usd(sum(aws.values()))])
    names = list(aws_cost_per_hour(d, a.sizes[0]))
    return _table(["sessions", *names, "total"], rows)


def _block_burst(d: Demand, a: Assumptions) -> str:
    connects = next(q for q in QUOTAS if q.key == "ws_connects")
    rows = []
    for n in a.sizes:
        people = n * d.shape["participants"]
        admit = people / connects.limit
        turn_conc = n * d.lambda_invocations.get("turn", 0) * d.lambda_seconds.get("turn", 0) / 3600
        ramp = turn_conc / 1000 * 10
        rows.append(
            [f"{n:,}", f"{people:,}", f"{admit:,.0f} s", f"{turn_conc:,.0f}", f"{ramp:,.0f} s"]
        )
    return _table(
        [
            "sessions starting together",
            "connections",
            "to admit them at 500/s",
            "turn worker executions",
            "to scale to them (1,000 per 10 s)",
        ],
        rows,
    )


def _block_sources() -> str:
    rows = [[q.what, f"{_fmt(q.limit)} {q.unit}", _link(q.source)] for q in QUOTAS]
    rows.append(
        [
            "Lambda scaling rate per function",
            "1,000 executions per 10 s",
            _link(LAMBDA_SCALING),
        ]
    )
    rows.append(
        [
            "WebSocket connection duration / idle timeout",
            "2 hours / 10 minutes",
            _link(WS_LIMITS),
        ]
    )
    rows.append(
        [
            "SQS FIFO per partition (a message group lives in one), per API action",
            f"{SQS_GROUP_TPS} requests/s",
            _link(SQS_QUOTAS),
        ]
    )
    rows.append(
        [
            "ElastiCache Serverless ECPUs per cache",
            f"{ECPU_LIMIT[0]:,} ECPU/s",
            _link(ECPU_LIMIT[1]),
        ]
    )
    quotas = _table(["quota", "value", "source"], rows)
    price_rows = []
    for key, (value, source, note) in PRICES.items():
        price_rows.append([key, f"{value:.4g}", note, _link(source)])
    for plan in UPSTASH_PLANS:
        price_rows.append(
            [
                f"upstash {plan.name}",
                f"${plan.usd_month:,.0f}/month",
                f"{_bytes(plan.data_bytes)}, {plan.commands_per_s:,.0f} commands/s, "
                f"{_bytes(plan.bandwidth_month)} bandwidth a month",
                _link(UPSTASH_BILLING),
            ]
        )
    prices = _table(["price", "USD per unit", "what", "source"], price_rows)
    return quotas + "\n\n" + prices


def _link(s: Source) -> str:
    return f"[{s.url}]({s.url})" if s.url.startswith("http") else f"`{s.url}`"


def _block_findings(counts: dict[str, Any], d: Demand, a: Assumptions) -> str:
    apigw = next(q for q in QUOTAS if q.key == "apigw_rps")
    calls = d.per_second("apigw_rps") * 3600
    interval = counts["constants"]["delta_interval_s"]
    slower = dataclasses.replace(a, delta_interval=0.5)
    d_slow = demand(counts, slower)
    model_gb_s = d.lambda_invocations.get("turn", 0) * a.model_seconds * 1.0
    n = a.sizes[-1]
    stores = store_costs(d, n, a)
    cheapest = min(stores, key=lambda k: stores[k][0])
    payg, aws = stores["Upstash pay as you go"][0], sum(aws_cost_per_hour(d, n).values())
    lines = [
        f"- `agent_delta` frames are {d.deltas / calls:.0%} of the API Gateway requests a "
        f"session makes ({_fmt(d.deltas)} of {_fmt(calls)} an hour), and so of its API Gateway "
        f"bill and of the account quota: one frame per participant every {interval:g} s while "
        "the agent streams. Sent every 0.5 s instead, the account's "
        f"{_fmt(apigw.limit)} requests/s would last to "
        f"{apigw.limit / d_slow.per_second('apigw_rps'):,.0f} sessions instead of "
        f"{apigw.limit / d.per_second('apigw_rps'):,.0f}.",
        f"- Waiting for the model is {model_gb_s / d.gb_seconds():.0%} of the Lambda GB-seconds "
        f"(the assumed {a.model_seconds:g} s a turn); rejoin's own work is the rest.",
        f"- At {n:,} sessions the store costs {_usd(payg)} an hour on Upstash pay as you go, "
        f"{'less' if payg < aws else 'more'} than API Gateway, Lambda and SQS together "
        f"({_usd(aws)}); the cheapest store in the model is {cheapest} "
        f"({_usd(stores[cheapest][0])}).",
    ]
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[dict[str, Any], Demand, Assumptions], str]] = {
    "shape": _block_shape,
    "demand": _block_demand,
    "limits": lambda c, d, a: _block_limits(d, a),
    "first": lambda c, d, a: _block_first(d, a),
    "cost": lambda c, d, a: _block_cost(d, a),
    "aws": lambda c, d, a: _block_aws(d, a),
    "burst": lambda c, d, a: _block_burst(d, a),
    "findings": _block_findings,
    "sources": lambda c, d, a: _block_sources(),
}


def blocks(counts: dict[str, Any], a: Assumptions = _ASSUMED) -> dict[str, str]:
    """Every generated table, by block name.

    Raises:
        ValueError: the counts were measured on code whose cleanup visits a
            different number of sessions per run than :data:`QUOTAS` says.
    """
    per_run = counts["constants"].get("cleanup_visits_per_run")
    quota = next(q for q in QUOTAS if q.key == "cleanup_visits")
    if per_run is not None and per_run != quota.limit:
        raise ValueError(
            f"rejoin.cleanup visits {per_run} sessions a run, QUOTAS says {quota.limit:g}: "
            "update QUOTAS in bench/scale.py"
        )
    d = demand(counts, a)
    return {name: make(counts, d, a) for name, make in BLOCKS.items()}


def render(counts: dict[str, Any], a: Assumptions = _ASSUMED) -> str:
    """All the tables, as the script prints them."""
    return "\n\n".join(f"## {name}\n\n{text}" for name, text in blocks(counts, a).items()) + "\n"


_BLOCK = re.compile(r"<!-- BEGIN scale:(\w+) -->\n(.*?)\n?<!-- END scale:\1 -->", re.S)


def doc_blocks(text: str) -> dict[str, str]:
    """The generated blocks found in a document."""
    return {m.group(1): m.group(2) for m in _BLOCK.finditer(text)}


def update_doc(text: str, generated: dict[str, str]) -> str:
    """The document with its blocks replaced by ``generated``."""

    def block(m: re.Match[str]) -> str:
        name = m.group(1)
        return f"<!-- BEGIN scale:{name} -->\n{generated[name]}\n<!-- END scale:{name} -->"

    return _BLOCK.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--counts", type=Path, default=COUNTS_PATH, help="counts written by the rooms bench"
    )
    parser.add_argument("--write", type=Path, metavar="DOC", help="update the tables in DOC")
    parser.add_argument("--check", type=Path, metavar="DOC", help="exit 1 if DOC's tables differ")
    args = parser.parse_args(argv)
    counts = load_counts(args.counts)
    generated = blocks(counts)
    if args.write or args.check:
        doc = args.write or args.check
        text = doc.read_text()
        found = doc_blocks(text)
        missing = sorted(set(generated) - set(found))
        if missing:
            print(f"{doc}: no block for {', '.join(missing)}", file=sys.stderr)
            return 1
        if args.check:
            stale = sorted(k for k in generated if found[k] != generated[k])
            if stale:
                print(f"{doc}: out of date: {', '.join(stale)} (run with --write)", file=sys.stderr)
                return 1
            print(f"{doc}: up to date")
            return 0
        doc.write_text(update_doc(text, generated))
        print(f"{doc}: tables updated")
        return 0
    print(f"# Scale model (counts of {counts['date']}, `{counts['command']}`)\n")
    print(render(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
