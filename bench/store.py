"""The session store benchmark (issue 2, item 5).

Against a private ``redis-server`` behind the local Upstash-compatible
endpoint, with the real ``upstash_redis.asyncio.Redis`` client:

1. Upstash requests and commands per ``UpstashSession`` method, counted at the
   endpoint, warm (script cached) and cold (after ``SCRIPT FLUSH``: an
   EVALSHA miss, then EVAL), plus the commands each script runs inside Redis.
2. ``get_items(limit=20)`` against one raw ``LRANGE key -20 -1``, and
   ``add_items`` (2 items, as the Runner writes) against one raw ``RPUSH`` of
   the same values, through the same client and endpoint (goal: <= 1.2).
3. ``get_items(limit=20)`` with 100,000 items stored against 20 (goal: <= 1.3).
4. For reference, the SDK's own ``RedisSession`` (TCP, redis.asyncio) on the
   same Redis: latency, TCP round trips and Redis commands per call.
5. Both of rejoin's transports on the same Redis: ``UpstashSession`` over
   Upstash REST and ``rejoin.RedisSession`` over TCP (redis.asyncio): requests
   (round trips) per method, warm and cold, and each method's latency against
   a raw ``GET`` on the same transport, all interleaved in one run.
6. The HTTP client under ``upstash_redis.asyncio.Redis``: CPU time of this
   process per request with upstash-redis' own httpx client against the lean
   one rejoin installs (``rejoin._upstash_http``), interleaved, one request
   in flight and 32 at once (the endpoint runs in another process).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from ._measure import Report, interleave, print_table, ratio, summarize
from ._stack import CommandStats, Endpoint

__all__ = ["run"]

ROUNDS, WARMUP = 2000, 100
QUICK_ROUNDS, QUICK_WARMUP = 30, 5
BIG, QUICK_BIG = 100_000, 5_000


def runner_items(n: int, start: int = 0) -> list[dict[str, Any]]:
    """Items shaped like what the Runner stores (a few hundred bytes each)."""
    out: list[dict[str, Any]] = []
    for i in range(start, start + n):
        kind = i % 4
        if kind == 0:
            out.append({"role": "user", "content": f"Ada: could you summarise point {i} again?"})
        elif kind == 1:
            out.append(
                {
                    "id": f"msg_{i:08d}",
                    "type": "message",
                    "role": "assistant",
                    "status": "completed",
                    "content": [
                        {
                            "type": "output_text",
                            "text": f"Sure, Ada. Point {i}: the store keeps the session "
                            "itself, so any Lambda restores it from the id alone.",
                            "annotations": [],
                            "logprobs": [],
                        }
                    ],
                }
            )
        elif kind == 2:
            out.append(
                {
                    "type": "function_call",
                    "id": f"fc_{i:08d}",
                    "call_id": f"call_{i:08d}",
                    "name": "current_time",
                    "arguments": "{}",
                    "status": "completed",
                }
            )
        else:
            out.append(
                {
                    "type": "function_call_output",
                    "call_id": f"call_{i - 1:08d}",
                    "output": "2026-11-25T20:00:00+00:00",
                }
            )
    return out


def _dumps(item: dict[str, Any]) -> str:
    return json.dumps(item, separators=(",", ":"))


class _CountingConnection(aioredis.Connection):
    """A redis.asyncio connection that counts what it sends (one write per round trip)."""

    sends = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sends += 1
        await super().send_packed_command(command, check_health)


async def _fill(raw: Any, key: str, n: int) -> None:
    # Setup only, straight over TCP: not measured.
    await raw.delete(key)
    chunk = 1000
    for start in range(0, n, chunk):
        values = [_dumps(i) for i in runner_items(min(chunk, n - start), start)]
        await raw.rpush(key, *values)


async def _counts(
    endpoint: Endpoint,
    cmdstats: CommandStats,
    call: Callable[[], Awaitable[Any]],
    *,
    cold: bool = False,
    tcp: type[_CountingConnection] | None = None,
) -> dict[str, Any]:
    if cold:
        cmdstats.script_flush()
    before = cmdstats.snapshot()
    sends_before = tcp.sends if tcp else 0
    endpoint.reset()
    await call()
    stats = endpoint.stats()
    inside = CommandStats.delta(before, cmdstats.snapshot())
    return {
        "requests": stats["total_requests"],
        "commands": stats["total_commands"],
        "command_names": stats["commands"],
        "redis_commands": sum(inside.values()),
        "redis_command_names": inside,
        "round_trips": (tcp.sends - sends_before) if tcp else None,
    }


async def _server_usec(
    cmdstats: CommandStats, call: Callable[[], Awaitable[Any]], command: str, n: int
) -> float:
    """Microseconds Redis itself spends per ``command`` (EVALSHA: the whole script)."""
    before = cmdstats.usec().get(command, (0, 0))
    for _ in range(n):
        await call()
    after = cmdstats.usec().get(command, (0, 0))
    calls = after[0] - before[0]
    return (after[1] - before[1]) / calls if calls else float("nan")


async def _run(endpoint: Endpoint, cmdstats: CommandStats, quick: bool) -> Report:
    from agents.extensions.memory import RedisSession

    from rejoin import UpstashSession, upstash_client

    report = Report("store")
    rounds, warmup = (QUICK_ROUNDS, QUICK_WARMUP) if quick else (ROUNDS, WARMUP)
    big = QUICK_BIG if quick else BIG
    client = upstash_client(endpoint.url, endpoint.token, timeout=10.0)
    raw_tcp = aioredis.Redis.from_url(endpoint.redis_url)
    pool = aioredis.ConnectionPool.from_url(
        endpoint.redis_url, connection_class=_CountingConnection
    )
    ref_client = aioredis.Redis(connection_pool=pool)
    batch = runner_items(2, start=1)  # an assistant message and a function call
    batch_raw = [_dumps(i) for i in batch]
    try:
        # ---------------------------------------------------------------- 1
        s = UpstashSession("bench-count", redis=client)
        await s.clear_session()
        await s.add_items(runner_items(20))
        methods: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("add_items (2 items)", lambda: s.add_items(batch)),
            ("get_items()", lambda: s.get_items()),
            ("get_items(limit=20)", lambda: s.get_items(limit=20)),
            ("pop_item", lambda: s.pop_item()),
            ("_atomic_replace_items (20 items)", lambda: s._atomic_replace_items(runner_items(20))),
            ("clear_session", lambda: s.clear_session()),
        ]
        ref = RedisSession("bench-count", redis_client=ref_client)
        await ref.clear_session()
        await ref.add_items(runner_items(20))
        ref_methods: dict[str, Callable[[], Awaitable[Any]]] = {
            "add_items (2 items)": lambda: ref.add_items(batch),
            "get_items()": lambda: ref.get_items(),
            "get_items(limit=20)": lambda: ref.get_items(limit=20),
            "pop_item": lambda: ref.pop_item(),
            "_atomic_replace_items (20 items)": lambda: ref._atomic_replace_items(runner_items(20)),
            "clear_session": lambda: ref.clear_session(),
        }
        rows, per_method = [], {}
        for name, call in methods:
            await call()  # scripts cached
            await s.add_items(runner_items(20))
            warm = await _counts(endpoint, cmdstats, call)
            await s.add_items(runner_items(20))
            cold = await _counts(endpoint, cmdstats, call, cold=True)
            await ref.add_items(runner_items(20))
            await ref_methods[name]()  # its connection is open
            await ref.add_items(runner_items(20))
            tcp = await _counts(endpoint, cmdstats, ref_methods[name], tcp=_CountingConnection)
            per_method[name] = {"warm": warm, "cold": cold, "redis_session": tcp}
            rows.append(
                [
                    name,
                    warm["requests"],
                    warm["commands"],
                    cold["requests"],
                    "+".join(f"{k}" for k in cold["command_names"]) or "-",
                    warm["redis_commands"],
                    tcp["round_trips"],
                    tcp["redis_commands"],
                ]
            )
        print_table(
            "Upstash requests per UpstashSession method (counted at the endpoint)",
            [
                "method",
                "requests (warm)",
                "commands (warm)",
                "requests (cold)",
                "cold commands",
                "Redis cmds run by the script",
                "RedisSession TCP round trips",
                "RedisSession Redis cmds",
            ],
            rows,
        )
        report.data["per_method"] = per_method
        worst = max(m["warm"]["requests"] for m in per_method.values())
        report.goal("Upstash requests per method, warm (worst method)", worst, 1)

        # ---------------------------------------------------------------- 2
        s20 = UpstashSession("bench-20", redis=client)
        await s20.clear_session()
        await s20.add_items(runner_items(20))
        key20 = s20.keys.items

        async def lrange_decode() -> list[Any]:
            return [json.loads(x) for x in await client.lrange(key20, -20, -1)]

        get = await interleave(
            {
                "UpstashSession.get_items(limit=20)": lambda: s20.get_items(limit=20),
                "raw LRANGE key -20 -1": lambda: client.lrange(key20, -20, -1),
                "raw LRANGE + json.loads (info)": lrange_decode,
            },
            rounds=rounds,
            warmup=warmup,
        )
        s_add = UpstashSession("bench-add", redis=client)
        await s_add.clear_session()
        add_key = "bench:raw-rpush"
        await client.delete(add_key)
        add = await interleave(
            {
                "UpstashSession.add_items (2 items)": lambda: s_add.add_items(batch),
                "raw RPUSH key v1 v2": lambda: client.rpush(add_key, *batch_raw),
            },
            rounds=rounds,
            warmup=warmup,
        )
        # Inside Redis only (no HTTP): what the script costs against the bare command.
        n_server = rounds // 4
        server = {
            "UpstashSession.get_items(limit=20)": await _server_usec(
                cmdstats, lambda: s20.get_items(limit=20), "evalsha", n_server
            ),
            "raw LRANGE key -20 -1": await _server_usec(
                cmdstats, lambda: client.lrange(key20, -20, -1), "lrange", n_server
            ),
            "UpstashSession.add_items (2 items)": await _server_usec(
                cmdstats, lambda: s_add.add_items(batch), "evalsha", n_server
            ),
            "raw RPUSH key v1 v2": await _server_usec(
                cmdstats, lambda: client.rpush(add_key, *batch_raw), "rpush", n_server
            ),
        }
        rows = []
        for samples in (get, add):
            base = list(samples.values())[1]
            for name, values in samples.items():
                sm = summarize(values)
                inside = server.get(name)
                rows.append(
                    [
                        name,
                        sm.median,
                        sm.p90,
                        ratio(values, base),
                        "-" if inside is None else inside,
                    ]
                )
        print_table(
            f"Latency through the endpoint, same client ({rounds} interleaved rounds; ms)",
            [
                "call",
                "median ms",
                "p90 ms",
                "ratio to raw (medians)",
                "time inside Redis, us/call",
            ],
            rows,
        )
        report.data["server_usec"] = server
        get_ratio = ratio(get["UpstashSession.get_items(limit=20)"], get["raw LRANGE key -20 -1"])
        add_ratio = ratio(add["UpstashSession.add_items (2 items)"], add["raw RPUSH key v1 v2"])
        report.data["latency_raw"] = {
            name: summarize(v).__dict__ for name, v in (get | add).items()
        }
        report.goal("get_items(limit=20) / raw LRANGE", get_ratio, 1.2)
        report.goal("add_items(2 items) / raw RPUSH", add_ratio, 1.2)

        # --------------------------------------------------------------- 2b
        # The same comparison with bigger items (long answers, tool outputs):
        # the script checks every returned item with cjson inside Redis.
        rows = []
        sizes = (2_000, 10_000) if quick else (2_000, 10_000, 50_000)
        by_size = {}
        for size in sizes:
            sized = UpstashSession(f"bench-size-{size}", redis=client)
            await sized.clear_session()
            await sized.add_items([{"role": "assistant", "content": "x" * size}] * 20)
            key = sized.keys.items
            n = max(5, rounds // 10 if size < 50_000 else rounds // 20)
            samples = await interleave(
                {
                    "get": lambda sized=sized: sized.get_items(limit=20),
                    "raw": lambda key=key: client.lrange(key, -20, -1),
                },
                rounds=n,
                warmup=max(2, warmup // 10),
            )
            inside_get = await _server_usec(
                cmdstats, lambda sized=sized: sized.get_items(limit=20), "evalsha", max(5, n // 4)
            )
            inside_raw = await _server_usec(
                cmdstats, lambda key=key: client.lrange(key, -20, -1), "lrange", max(5, n // 4)
            )
            r = ratio(samples["get"], samples["raw"])
            by_size[size] = {
                "ratio": r,
                "inside_script_us": inside_get,
                "inside_lrange_us": inside_raw,
            }
            rows.append(
                [
                    f"{size:,} B",
                    n,
                    summarize(samples["get"]).median,
                    summarize(samples["raw"]).median,
                    r,
                    inside_get,
                    inside_raw,
                    "over 1.2" if r > 1.2 else "ok",
                ]
            )
            await sized.clear_session()
        print_table(
            "get_items(limit=20) / raw LRANGE by item size (20 items stored; info, no goal)",
            [
                "item size",
                "rounds",
                "get_items median ms",
                "LRANGE median ms",
                "ratio",
                "script inside Redis, us",
                "LRANGE inside Redis, us",
                "vs 1.2",
            ],
            rows,
        )
        report.data["by_item_size"] = by_size

        # ---------------------------------------------------------------- 3
        s_big = UpstashSession("bench-big", redis=client)
        await _fill(raw_tcp, s_big.keys.items, big)
        stored = await raw_tcp.llen(s_big.keys.items)
        scale = await interleave(
            {
                "get_items(limit=20), 20 stored": lambda: s20.get_items(limit=20),
                f"get_items(limit=20), {stored:,} stored": lambda: s_big.get_items(limit=20),
            },
            rounds=rounds,
            warmup=warmup,
        )
        base = next(iter(scale.values()))
        rows = [
            [name, summarize(v).median, summarize(v).p90, ratio(v, base)]
            for name, v in scale.items()
        ]
        print_table(
            "get_items(limit=20) against history length (ms)",
            ["call", "median ms", "p90 ms", "ratio to 20 stored"],
            rows,
        )
        report.data["scale"] = {name: summarize(v).__dict__ for name, v in scale.items()}
        small, large = scale.values()
        report.goal(f"get_items(limit=20): {stored:,} stored / 20 stored", ratio(large, small), 1.3)
        await raw_tcp.delete(s_big.keys.items)

        # ---------------------------------------------------------------- 4
        ref20 = RedisSession("bench-20", redis_client=ref_client)
        await ref20.clear_session()
        await ref20.add_items(runner_items(20))
        ref_add = RedisSession("bench-add", redis_client=ref_client)
        await ref_add.clear_session()
        vs_get = await interleave(
            {
                "UpstashSession.get_items(limit=20) (HTTP)": lambda: s20.get_items(limit=20),
                "RedisSession.get_items(limit=20) (TCP)": lambda: ref20.get_items(limit=20),
            },
            rounds=rounds,
            warmup=warmup,
        )
        vs_add = await interleave(
            {
                "UpstashSession.add_items (2 items) (HTTP)": lambda: s_add.add_items(batch),
                "RedisSession.add_items (2 items) (TCP)": lambda: ref_add.add_items(batch),
            },
            rounds=rounds,
            warmup=warmup,
        )
        rows = []
        for samples, method in ((vs_get, "get_items(limit=20)"), (vs_add, "add_items (2 items)")):
            up, tcp = samples.values()
            counts = per_method[method]
            rows.append(
                [
                    method,
                    summarize(up).median,
                    summarize(tcp).median,
                    ratio(up, tcp),
                    counts["warm"]["requests"],
                    counts["redis_session"]["round_trips"],
                    counts["redis_session"]["redis_commands"],
                ]
            )
        print_table(
            "Reference: the SDK's RedisSession over TCP on the same Redis (local loopback; ms)",
            [
                "method",
                "UpstashSession median ms",
                "RedisSession median ms",
                "Upstash / RedisSession",
                "Upstash HTTP requests",
                "RedisSession TCP round trips",
                "RedisSession Redis cmds",
            ],
            rows,
        )
        report.data["reference"] = {
            name: summarize(v).__dict__ for name, v in (vs_get | vs_add).items()
        }
        # ---------------------------------------------------------------- 5
        await _transports(endpoint, cmdstats, client, report, rounds, warmup)
        # ---------------------------------------------------------------- 6
        await _http_clients(endpoint, report, quick)

        for sess in (s, s20, s_add):
            await sess.clear_session()
        for r in (ref, ref20, ref_add):
            await r.clear_session()
        await client.delete(add_key)
    finally:
        await client.close()
        await raw_tcp.aclose()
        await ref_client.aclose()
        await pool.aclose()
    return report


async def _transports(
    endpoint: Endpoint,
    cmdstats: CommandStats,
    upstash: Any,
    report: Report,
    rounds: int,
    warmup: int,
) -> None:
    """Section 5: UpstashSession (REST) and rejoin.RedisSession (TCP), side by side."""
    from rejoin import RedisSession, UpstashSession, redis_client

    tcp = redis_client(endpoint.redis_url, timeout=10.0, connection_class=_CountingConnection)
    raw_key = "bench:raw-get"
    await tcp.client.set(raw_key, "x" * 16)
    batch = runner_items(2, start=1)
    transports: dict[str, dict[str, Any]] = {
        "Upstash REST": {
            "make": lambda sid: UpstashSession(sid, redis=upstash),
            "get": lambda: upstash.get(raw_key),
            "lrange": lambda key: upstash.lrange(key, -20, -1),
        },
        "TCP (redis.asyncio)": {
            "make": lambda sid: RedisSession(sid, redis_client=tcp),
            "get": lambda: tcp.client.get(raw_key),
            "lrange": lambda key: tcp.client.lrange(key, -20, -1),
        },
    }
    counts_rows: list[list[Any]] = []
    latency_rows: list[list[Any]] = []
    data: dict[str, Any] = {}
    try:
        for transport, spec in transports.items():
            tag = "rest" if transport.startswith("Upstash") else "tcp"
            make = spec["make"]
            s20, s_add, s_pop, s_rep, s_clear = (
                make(f"bench-t-{tag}-{n}") for n in ("20", "add", "pop", "rep", "clear")
            )
            for sess in (s20, s_add, s_pop, s_rep, s_clear):
                await sess.clear_session()
            await s20.add_items(runner_items(20))
            # Enough for every pop of the run to find an item.
            await _fill(tcp.client, s_pop.keys.items, rounds + warmup + 10)
            methods: dict[str, Callable[[], Awaitable[Any]]] = {
                "get_items(limit=20)": lambda s20=s20: s20.get_items(limit=20),
                "get_items() (20 stored)": lambda s20=s20: s20.get_items(),
                "add_items (2 items)": lambda s_add=s_add: s_add.add_items(batch),
                "pop_item": lambda s_pop=s_pop: s_pop.pop_item(),
                "_atomic_replace_items (2 items)": lambda s_rep=s_rep: s_rep._atomic_replace_items(
                    batch
                ),
                "clear_session": lambda s_clear=s_clear: s_clear.clear_session(),
            }

            async def requests(call: Callable[[], Awaitable[Any]], tag: str = tag) -> int:
                if tag == "rest":
                    endpoint.reset()
                    await call()
                    return int(endpoint.stats()["total_requests"])
                before = _CountingConnection.sends
                await call()
                return _CountingConnection.sends - before

            per: dict[str, Any] = {}
            for name, call in methods.items():
                await call()  # the script is cached, the connection open
                warm = await requests(call)
                cmdstats.script_flush()
                cold = await requests(call)
                per[name] = {"warm": warm, "cold": cold}
            key20 = s20.keys.items
            raws: dict[str, Callable[[], Awaitable[Any]]] = {
                # What get_items(limit=20) does without the script and json.loads (info).
                "raw LRANGE key -20 -1": lambda key20=key20, spec=spec: spec["lrange"](key20),
                "raw GET": spec["get"],
            }
            for name, call in raws.items():
                per[name] = {"warm": await requests(call), "cold": None}
            samples = await interleave({**methods, **raws}, rounds=rounds, warmup=warmup)
            base = samples["raw GET"]
            for name, values in samples.items():
                sm = summarize(values)
                per[name]["median_ms"] = sm.median
                per[name]["ratio_to_get"] = ratio(values, base)
                latency_rows.append([transport, name, sm.median, sm.p90, ratio(values, base)])
                counts = per[name]
                counts_rows.append(
                    [
                        transport,
                        name,
                        counts["warm"],
                        "-" if counts["cold"] is None else counts["cold"],
                    ]
                )
            data[transport] = per
            for sess in (s20, s_add, s_pop, s_rep, s_clear):
                await sess.clear_session()
        print_table(
            "Requests (round trips) per method on each transport "
            "(REST: HTTP requests at the endpoint; TCP: commands written on the connection)",
            ["transport", "call", "requests (warm)", "requests (cold: after SCRIPT FLUSH)"],
            counts_rows,
        )
        print_table(
            f"Each method against a raw GET on the same transport "
            f"({rounds} interleaved rounds; ms)",
            ["transport", "call", "median ms", "p90 ms", "ratio to raw GET (medians)"],
            latency_rows,
        )
        report.data["transports"] = data
        for transport, per in data.items():
            worst = max(v["warm"] for k, v in per.items() if not k.startswith("raw "))
            report.goal(f"{transport}: requests per method, warm (worst method)", worst, 1)
    finally:
        await tcp.client.delete(raw_key)
        await tcp.close()


async def _http_clients(endpoint: Endpoint, report: Report, quick: bool) -> None:
    """Section 6: CPU per request of upstash-redis with httpx and with the lean client."""
    import httpx
    from upstash_redis.asyncio import Redis

    from rejoin import UpstashSession, upstash_client
    from rejoin._upstash_http import UpstashHttp

    lean_client = upstash_client(endpoint.url, endpoint.token, timeout=10.0).client
    if not isinstance(lean_client._http._client, UpstashHttp):
        raise RuntimeError("a proxy in the environment keeps httpx: unset it to compare")
    # What upstash_client built before the lean client: httpx with the timeout set.
    httpx_client = Redis(endpoint.url, endpoint.token, allow_telemetry=False)
    httpx_client._http._client.timeout = httpx.Timeout(10.0)
    clients = {
        "httpx (upstash-redis' own)": httpx_client,
        "lean (rejoin._upstash_http)": lean_client,
    }
    key = "bench:http-get"
    await lean_client.set(key, "x" * 16)
    sessions = {name: UpstashSession("bench-http", redis=c) for name, c in clients.items()}
    first = next(iter(sessions.values()))
    await first.clear_session()
    await first.add_items(runner_items(20))
    rounds, batch = (4, 20) if quick else (20, 100)
    in_flight = 32
    calls: dict[str, Callable[[Any, Any], Awaitable[Any]]] = {
        "GET (16 B)": lambda c, s: c.get(key),
        "get_items(limit=20)": lambda c, s: s.get_items(limit=20),
    }
    rows: list[list[Any]] = []
    data: dict[str, Any] = {}
    try:
        for call_name, call in calls.items():
            for parallel in (1, in_flight):
                bursts = max(1, batch // parallel)
                n = bursts * parallel

                async def burst(
                    name: str, call: Any = call, parallel: int = parallel, bursts: int = bursts
                ) -> None:
                    c, s = clients[name], sessions[name]
                    for _ in range(bursts):
                        if parallel == 1:
                            await call(c, s)
                        else:
                            await asyncio.gather(*(call(c, s) for _ in range(parallel)))

                names = list(clients)
                for name in names:  # warm: connections open, scripts cached
                    await burst(name)
                cpu: dict[str, list[float]] = {name: [] for name in names}
                wall: dict[str, list[float]] = {name: [] for name in names}
                for i in range(rounds):
                    for name in names if i % 2 == 0 else names[::-1]:
                        c0, w0 = time.process_time_ns(), time.perf_counter_ns()
                        await burst(name)
                        cpu[name].append((time.process_time_ns() - c0) / 1e3 / n)
                        wall[name].append((time.perf_counter_ns() - w0) / 1e3 / n)
                base = cpu[names[0]]
                for name in names:
                    rows.append(
                        [
                            call_name,
                            parallel,
                            name,
                            summarize(cpu[name]).median,
                            summarize(wall[name]).median,
                            ratio(cpu[name], base),
                        ]
                    )
                    data[f"{call_name}, {parallel} in flight, {name}"] = {
                        "cpu_us": summarize(cpu[name]).median,
                        "wall_us": summarize(wall[name]).median,
                        "cpu_ratio_to_httpx": ratio(cpu[name], base),
                    }
        print_table(
            f"CPU of this process per request, upstash-redis over httpx vs the lean client "
            f"({rounds} interleaved rounds of {batch} requests; us; endpoint in another process)",
            ["call", "in flight", "HTTP client", "CPU us/request", "wall us/request", "CPU ratio"],
            rows,
        )
        report.data["http_clients"] = data
    finally:
        await first.clear_session()
        await lean_client.delete(key)
        for c in clients.values():
            await c.close()


def run(endpoint: Endpoint, *, quick: bool) -> Report:
    """Run the store benchmark; prints its tables and goals."""
    print("\n## Store benchmark (UpstashSession)\n")
    cmdstats = CommandStats(endpoint.redis_url)
    try:
        return asyncio.run(_run(endpoint, cmdstats, quick))
    finally:
        cmdstats.close()
