"""The cleanup racing reconnects, over thousands of random interleavings.

Each trial: a session with history enters grace; then a reconnect and the
cleanup's sweep run concurrently, each with its own clock a few milliseconds
either side of the deadline (two Lambdas, two clocks), in random order. The
invariants: a reconnect before the deadline resumes (same epoch, history
intact) and is never deleted; a reconnect from the deadline on starts fresh
(new epoch, no history); either way the session ends up live.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from harness import ManualClock

from rejoin import UpstashSession, upstash_client
from rejoin.rooms import RoomStore

TRIALS = 2000
CONCURRENCY = 100
SKEW = 0.5  # max clock error of one Lambda; RoomStore's margin is 2 s


async def trial(client: Any, n: int, rng: random.Random) -> tuple[bool, bool]:
    sid = f"race-{n}"
    start = ManualClock(1_764_000_000 + n)
    rooms = RoomStore(client, grace_seconds=120, clock=start)
    joined = await rooms.connect(sid, f"a{n}", "ada", "Ada", mode="every", issued_at=start())
    await UpstashSession(sid, redis=client, epoch=joined.epoch).add_items(
        [{"role": "user", "content": f"history {n}"}]
    )
    departure = await rooms.disconnect(sid, f"a{n}")
    assert departure is not None and departure.grace_deadline is not None
    deadline = departure.grace_deadline / 1000

    # True time near the deadline; each Lambda's clock is off by up to 0.5 s.
    true_time = deadline + rng.choice([-1, -0.1, 0, 0.1, 1, 2, 4]) * rng.random() * 2
    connect_at = true_time + rng.uniform(-SKEW, SKEW)
    sweep_at = true_time + rng.uniform(-SKEW, SKEW)
    reconnect = RoomStore(client, grace_seconds=120, clock=ManualClock(connect_at))
    cleanup = RoomStore(client, grace_seconds=120, clock=ManualClock(sweep_at))

    async def do_connect() -> Any:
        await asyncio.sleep(rng.random() / 500)
        return await reconnect.connect(sid, f"b{n}", "bob", "Bob", mode="every", issued_at=start())

    async def do_sweep() -> Any:
        await asyncio.sleep(rng.random() / 500)
        return await cleanup.visit(sid)

    back, swept = await asyncio.gather(do_connect(), do_sweep())
    before_deadline = connect_at < deadline
    items = await UpstashSession(sid, redis=client).get_items()
    status = await reconnect.status(sid)
    assert status is not None, f"trial {n}: live session deleted"
    assert status["connections"] == 1, n
    if before_deadline:
        assert back.epoch == joined.epoch, (
            f"trial {n}: resumed session lost its epoch "
            f"({connect_at - deadline:.3f} {sweep_at - deadline:.3f} {swept})"
        )
        assert items == [{"role": "user", "content": f"history {n}"}], n
    else:
        assert back.epoch != joined.epoch, f"trial {n}: expired session was resumed"
        assert items == [], n
    # a later visit never deletes it: it has a live connection
    later = RoomStore(client, grace_seconds=120, clock=ManualClock(deadline + 600))
    assert (await later.visit(sid)).state == "active"
    return before_deadline, swept.state == "deleted"


async def test_cleanup_racing_reconnects(upstash, raw_redis):
    rng = random.Random(20261125)
    client = upstash_client(upstash.url, upstash.token, timeout=10, retry_interval=0.01)
    sem = asyncio.Semaphore(CONCURRENCY)

    async def bounded(n: int) -> tuple[bool, bool]:
        async with sem:
            return await trial(client, n, random.Random(rng.random()))

    outcomes = await asyncio.gather(*(bounded(n) for n in range(TRIALS)))
    resumed = sum(1 for before, _ in outcomes if before)
    # the sweep won the race and deleted the expired session in some trials
    assert sum(1 for _, deleted in outcomes if deleted) > 10
    # both sides of the deadline were exercised, many times
    assert resumed > TRIALS // 5 and TRIALS - resumed > TRIALS // 5
    # every live session is still in the cleanup's schedule (none is lost to it)
    assert raw_redis.zcard("rejoin:schedule") == TRIALS
    await client.close()


async def test_visit_never_deletes_a_session_resumed_after_indexing(upstash, raw_redis):
    # GIVEN a session indexed for expiry, then resumed just before its deadline
    client = upstash_client(upstash.url, upstash.token, timeout=5)
    clock = ManualClock()
    rooms = RoomStore(client, grace_seconds=120, clock=clock)
    await rooms.connect("idx", "c1", "ada", "Ada", mode="every", issued_at=clock())
    await rooms.disconnect("idx", "c1")
    clock.advance(119.999)
    await rooms.connect("idx", "c2", "ada", "Ada", mode="every", issued_at=clock())
    # WHEN the cleanup runs long after (it lists what is due, then visits)
    clock.advance(1000)
    assert await rooms.due() == ["idx"]  # due for a look at its quiet connection
    outcome = await rooms.visit("idx")
    # THEN nothing is deleted; the quiet connection is named for a liveness check
    assert outcome.state == "active" and outcome.idle == ["c2"]
    meta = raw_redis.hgetall("rejoin:{idx}:meta")
    assert meta and json.loads(raw_redis.hget("rejoin:{idx}:users", "ada"))["status"] == "active"
    await client.close()
