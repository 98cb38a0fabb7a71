"""What the HTTP API's routes do to a session, over a :class:`~rejoin.rooms.RoomStore`.

The routes (:mod:`rejoin.api.routes`) are thin: they check credentials and
bodies, then call these.
"""

from __future__ import annotations

import asyncio
import secrets

from ..fanout import publish
from ..frames import ended_frame
from ..observability import count, logger
from ..rooms import Kicked, RoomStore
from ..sender import ConnectionSender, broadcast
from .problems import ApiProblem
from .schemas import (
    EVENT_TYPES,
    ParticipantState,
    SessionCreated,
    SessionStatus,
    Transcript,
)

__all__ = [
    "create_session",
    "end_session",
    "new_session_id",
    "remove_participant",
    "session_status",
    "transcript",
]


def new_session_id() -> str:
    """A random session id (16 characters of ``A-Za-z0-9_-``)."""
    return secrets.token_urlsafe(12)


async def create_session(rooms: RoomStore, session_id: str, *, mode: str) -> SessionCreated:
    """Create a session before anyone joins; a live one is left unchanged.

    Raises:
        ApiProblem: 409 ``session_ended`` when it was ended between creating and
            reading it back.
        StoreError: Upstash failed.
    """
    epoch, created = await rooms.create(session_id, mode=mode)
    state = await rooms.status(session_id)
    if state is None or state["epoch"] != epoch:
        raise ApiProblem(
            409, "session_ended", f"session {session_id!r} was ended meanwhile; try again"
        )
    return SessionCreated(
        session_id=session_id,
        epoch=epoch,
        created=created,
        mode=state["mode"],
        grace_deadline_ms=state["grace_deadline_ms"],
    )


async def session_status(rooms: RoomStore, session_id: str) -> SessionStatus | None:
    """The session's state, or ``None`` if it does not exist or has expired."""
    state = await rooms.status(session_id)
    if state is None:
        return None
    return SessionStatus(
        session_id=session_id,
        epoch=state["epoch"],
        state=state["state"],
        mode=state["mode"],
        seq=state["seq"],
        connections=state["connections"],
        participants=[ParticipantState(**p) for p in state["participants"]],
        grace_deadline_ms=state["grace_deadline_ms"],
        created_ms=state["created_ms"],
    )


async def transcript(rooms: RoomStore, session_id: str) -> Transcript | None:
    """The logged events of the current epoch, or ``None`` if there is no live session."""
    state = await rooms.status(session_id, with_events=True)
    if state is None:
        return None
    events = [e for e in state["events"] if e.get("type") in EVENT_TYPES]
    return Transcript.model_validate(
        {
            "session_id": session_id,
            "epoch": state["epoch"],
            "seq": state["seq"],
            "truncated": bool(events) and events[0]["seq"] > 1,
            "events": events,
        }
    )


async def end_session(
    rooms: RoomStore, sender: ConnectionSender, session_id: str
) -> list[str] | None:
    """End a session now: delete it, tell its connections, close them.

    The deletion comes first: it is atomic and returns the connections the
    session had at that instant, so every one of them is told; nothing can
    join the old session afterwards (a connect starts a fresh one). Failing
    to reach a connection is logged, not raised: the session is gone anyway.

    Returns:
        The connection ids the session had, or ``None`` if it did not exist.

    Raises:
        StoreError: Upstash failed (nothing was deleted, or all of it was).
    """
    connection_ids = await rooms.end(session_id)
    if connection_ids is None:
        return None
    if connection_ids:
        told = await broadcast(sender, connection_ids, ended_frame("ended_by_api"))
        closed = await asyncio.gather(
            *(sender.close(c) for c in connection_ids), return_exceptions=True
        )
        failed = [
            c for c, r in zip(connection_ids, closed, strict=True) if isinstance(r, Exception)
        ]
        if told.failed or failed:
            logger.warning(
                "some connections of an ended session could not be reached",
                extra={"not_told": len(told.failed), "not_closed": len(failed)},
            )
    count("SessionsEndedByApi")
    logger.info("session ended by the API", extra={"connections": len(connection_ids)})
    return connection_ids


async def remove_participant(
    rooms: RoomStore, sender: ConnectionSender, session_id: str, user_id: str
) -> Kicked | None:
    """Remove a participant now: revoke their tokens, close their connections.

    Every token of theirs issued until now is refused from here on (at
    ``$connect`` and on any frame); their connections get ``ended`` (reason
    ``removed``) and are closed; the others see them as ``removed``.

    Returns:
        What was done, or ``None`` if the session does not exist.

    Raises:
        StoreError: the store failed (nothing was changed, or all of it was).
    """
    kicked = await rooms.kick(session_id, user_id)
    if kicked is None:
        return None
    if kicked.connections:
        await broadcast(sender, kicked.connections, ended_frame("removed"))
        await asyncio.gather(*(sender.close(c) for c in kicked.connections), return_exceptions=True)
    await publish(rooms, sender, session_id, kicked.recipients, kicked.event)
    count("ParticipantsRemovedByApi")
    logger.info("participant removed by the API", extra={"connections": len(kicked.connections)})
    return kicked
