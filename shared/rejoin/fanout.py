"""Publishing logged events to a session's connections.

A connection that answers 410 (gone) while an event is broadcast is dead: it
is removed from its session as a ``$disconnect`` would (its ``$disconnect``
may never come), and the others are told.
"""

from __future__ import annotations

from typing import Any

from .observability import count
from .rooms import RoomStore
from .sender import ConnectionSender, broadcast

__all__ = ["publish"]


async def publish(
    rooms: RoomStore,
    sender: ConnectionSender,
    session_id: str,
    recipients: list[str],
    event: dict[str, Any] | None,
) -> None:
    """Broadcast a logged event; connections found gone are removed."""
    if event is None or not recipients:
        return
    result = await broadcast(sender, recipients, event)
    for connection_id in result.gone:
        count("GoneConnections")
        departure = await rooms.disconnect(session_id, connection_id)
        if departure and departure.event:
            # Their own dead connections are dealt with next time.
            await broadcast(sender, departure.recipients, departure.event)
