"""The scheduled cleanup: expire sessions past their grace, find lost disconnects.

Runs every minute. The sessions to look at come from the schedule index in
batches (never a scan of the database), each scored by when it is due: its
grace deadline (plus the clock-skew margin), or when one of its connections
could have been quiet past API Gateway's idle timeout. Each is visited by one
script that re-checks, at that instant, what is true: a session whose grace
is over and that nobody rejoined is deleted; a session someone rejoined is
never deleted. Quiet connections are checked with GetConnection: gone ones
are treated as disconnected (their ``$disconnect`` was lost), so they cannot
keep a session alive forever. Every step is idempotent.

Cost: one request per due session, plus one index read per batch of 500.
The first visit of a run goes alone, so the script is cached before the rest
go in parallel (a burst of cache misses would cost two requests each).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from typing import Any

from .fanout import publish
from .observability import count, logger
from .rooms import RoomStore, Visit
from .runtime import Runtime
from .sender import ConnectionSender

__all__ = ["CleanupReport", "run_cleanup"]

BATCH = 500
# Per invocation, so one run stays well inside the function timeout.
MAX_BATCHES = 20
# Visits in flight at once.
PARALLEL = 50


@dataclass
class CleanupReport:
    """What one cleanup run did."""

    expired: list[str] = field(default_factory=list)
    already_gone: list[str] = field(default_factory=list)
    stale_connections: list[str] = field(default_factory=list)
    live_idle_connections: int = 0
    visited: int = 0

    def to_dict(self) -> dict[str, Any]:
        """As a JSON-friendly dict (the handler's answer)."""
        return asdict(self)


async def run_cleanup(rt: Runtime) -> CleanupReport:
    """One pass over every session that is due."""
    rooms = rt.rooms()
    sender = rt.sender()
    report = CleanupReport()
    limit = asyncio.Semaphore(PARALLEL)

    async def one(session_id: str) -> None:
        async with limit:
            visit = await rooms.visit(session_id)
            await _settle(rooms, sender, visit, report)

    for _ in range(MAX_BATCHES):
        due = await rooms.due(limit=BATCH)
        if not due:
            break
        await one(due[0])
        await asyncio.gather(*(one(sid) for sid in due[1:]))
        report.visited += len(due)
        if len(due) < BATCH:
            break
    count("Expirations", len(report.expired))
    count("GoneConnections", len(report.stale_connections))
    logger.info(
        "cleanup done",
        extra={
            "visited": report.visited,
            "expired": len(report.expired),
            "stale_connections": len(report.stale_connections),
            "live_idle_connections": report.live_idle_connections,
        },
    )
    return report


async def _settle(
    rooms: RoomStore, sender: ConnectionSender, visit: Visit, report: CleanupReport
) -> None:
    if visit.state == "deleted":
        report.expired.append(visit.session_id)
    elif visit.state == "missing":
        report.already_gone.append(visit.session_id)
    for connection_id in visit.idle:
        if await sender.exists(connection_id):
            await rooms.mark_alive(visit.session_id, connection_id)
            report.live_idle_connections += 1
            continue
        report.stale_connections.append(connection_id)
        departure = await rooms.disconnect(visit.session_id, connection_id)
        if departure is not None:
            await publish(rooms, sender, visit.session_id, departure.recipients, departure.event)
