"""The cleanup's cost (issue 10, item 4): at most 0.01 extra store requests per
expired session, with its scripts cached before the burst of visits.

Counted at the Upstash-compatible endpoint, the real cleanup handler, the
real store, an injected clock. The benchmark measures the same at 1,000
sessions (bench/README.md, "The cleanup"); this keeps it true in ``make test``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from harness import make_stack, new_connection_id, offline_agent

from rejoin.runtime import set_runtime

# Two batches of the schedule index (BATCH is 500): the second one is short.
EXPIRED = 600
LIVE = 100
PAST_GRACE = 5


async def _populate(stack: Any, now: float) -> None:
    rooms = stack.rt.rooms()
    limit = asyncio.Semaphore(50)

    async def expired(i: int) -> None:
        async with limit:
            gone = new_connection_id()
            await rooms.connect(f"cc-x{i}", gone, f"u{i}", "U", mode="every", issued_at=now)
            await rooms.disconnect(f"cc-x{i}", gone)

    async def live(i: int) -> None:
        async with limit:
            await rooms.connect(
                f"cc-l{i}", new_connection_id(), f"u{i}", "U", mode="every", issued_at=now
            )

    await asyncio.gather(*(expired(i) for i in range(EXPIRED)), *(live(i) for i in range(LIVE)))


def test_cleanup_costs_at_most_a_hundredth_of_a_request_per_expired_session(
    upstash: Any, redis_server: Any, raw_redis: redis.Redis
) -> None:
    """GIVEN 600 sessions past their grace and 100 live ones, Redis' script cache emptied
    WHEN the cleanup handler runs once
    THEN it deletes the 600 with at most 6 requests beyond one visit each (0.01 per
    expired session), sends at most 2 EVALs (its two scripts, each cached once
    before the parallel visits), and leaves every live session alone; the next
    run, with nothing due, is one request.
    """
    if not redis_server.owned:
        pytest.skip("SCRIPT FLUSH needs a Redis this test session owns")
    stack = make_stack(upstash, agent=offline_agent())
    try:
        stack.rt.run(_populate(stack, stack.clock()))
        stack.clock.advance(stack.settings.grace_seconds + PAST_GRACE)
        raw_redis.script_flush()
        before = upstash.stats.snapshot()

        report = stack.cleanup()

        after = upstash.stats.snapshot()
        requests = int(after["total_requests"]) - int(before["total_requests"])
        evals = after["commands"].get("EVAL", 0) - before["commands"].get("EVAL", 0)  # type: ignore[union-attr]
        assert len(report["expired"]) == EXPIRED
        assert not [s for s in report["expired"] if s.startswith("cc-l")]
        assert requests - EXPIRED <= 0.01 * EXPIRED, requests
        assert evals <= 2, evals

        idle_before = int(upstash.stats.snapshot()["total_requests"])
        stack.cleanup()
        assert int(upstash.stats.snapshot()["total_requests"]) - idle_before == 1
    finally:
        set_runtime(None)
