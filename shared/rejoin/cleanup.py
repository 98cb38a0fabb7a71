"""The scheduled cleanup: expire sessions past their grace, find lost disconnects.

Runs every minute. Sessions in grace are found through the deadline index in
batches (never a scan of the database); each is deleted by one script that
re-checks, at that instant, that its deadline passed and nobody is connected,
so a session resumed meanwhile is never deleted. Connections idle beyond API
Gateway's idle timeout are checked with GetConnection: gone ones are treated
as disconnected (their ``$disconnect`` was lost), so they cannot keep a session
alive forever. Every step is idempotent.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from typing import Any

from .observability import count, logger
from .routes import publish, rooms_for
from .runtime import Runtime

__all__ = ["CleanupReport", "run_cleanup"]

BATCH = 100
# Per invocation, so one run stays well inside the function timeout.
MAX_BATCHES = 20
# API Gateway closes idle connections after 10 min; allow it a minute to do so.
IDLE_MARGIN_SECONDS = 60


@dataclass
class CleanupReport:
    """What one cleanup run did."""

    expired: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    stale_connections: list[str] = field(default_factory=list)
    live_idle_connections: int = 0

    def to_dict(self) -> dict[str, Any]:
        """As a JSON-friendly dict (the handler's answer)."""
        return asdict(self)


async def run_cleanup(rt: Runtime) -> CleanupReport:
    """One pass: lost disconnects first (they may start a grace), then expiry."""
    rooms = rooms_for(rt)
    report = CleanupReport()
    idle_for = rt.settings.idle_timeout_seconds + IDLE_MARGIN_SECONDS
    for _ in range(MAX_BATCHES):
        idle = await rooms.idle_connections(idle_for, limit=BATCH)
        for connection_id in idle:
            if await rt.sender().exists(connection_id):
                await rooms.mark_alive(connection_id)
                report.live_idle_connections += 1
                continue
            report.stale_connections.append(connection_id)
            found = await rooms.lookup(connection_id)
            if found is None:
                await rooms.forget_connection(connection_id)
                continue
            departure = await rooms.disconnect(found[0], connection_id)
            if departure is not None:
                await publish(rooms, rt.sender(), found[0], departure.recipients, departure.event)
        if len(idle) < BATCH:
            break

    for _ in range(MAX_BATCHES):
        due = await rooms.due_for_expiry(limit=BATCH)
        outcomes = await asyncio.gather(*(rooms.sweep(sid) for sid in due))
        for outcome in outcomes:
            if outcome.deleted:
                report.expired.append(outcome.session_id)
            elif outcome.reason == "resumed":
                report.resumed.append(outcome.session_id)
        if len(due) < BATCH:
            break
    count("Expirations", len(report.expired))
    count("GoneConnections", len(report.stale_connections))
    logger.info(
        "cleanup done",
        extra={
            "expired": len(report.expired),
            "stale_connections": len(report.stale_connections),
            "live_idle_connections": report.live_idle_connections,
        },
    )
    return report
