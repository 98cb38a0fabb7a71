"""What happens on each WebSocket route: ``$connect``, messages, ``$disconnect``.

The Lambda handlers parse the event and call these; everything here is
independent of Lambda, so the local gateway and the tests call the same code
through the same handlers. Nothing here imports the Agents SDK.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

from .errors import (
    AuthError,
    FrameError,
    InvalidSessionId,
    NotInSession,
    NotJoined,
    RateLimited,
    SendError,
    SessionGone,
    StoreError,
)
from .frames import (
    Leave,
    Ping,
    Resume,
    Say,
    ack_frame,
    encode_frame,
    error_frame,
    parse_frame,
    pong_frame,
)
from .keys import validate_session_id
from .observability import bind, count, logger
from .queue import TurnInput, TurnRequest
from .rooms import RoomStore
from .runtime import Runtime
from .sender import ConnectionSender, broadcast, send

__all__ = ["Answer", "addresses_agent", "on_connect", "on_disconnect", "on_message", "rooms_for"]


@dataclass(frozen=True)
class Answer:
    """What a route handler returns to API Gateway."""

    status: int = 200
    body: str = ""

    def to_lambda(self) -> dict[str, Any]:
        """The Lambda proxy response."""
        out: dict[str, Any] = {"statusCode": self.status}
        if self.body:
            out["body"] = self.body
        return out


def rooms_for(rt: Runtime) -> RoomStore:
    """The room store configured by the runtime."""
    s = rt.settings
    return RoomStore(
        rt.redis(),
        key_prefix=s.key_prefix,
        grace_seconds=s.grace_seconds,
        event_log_size=s.event_log_size,
        clock=rt.clock,
    )


def addresses_agent(text: str, agent_name: str) -> bool:
    """Whether a message addresses the agent (meeting mode): ``@agent`` or its name."""
    names = {"agent", agent_name.lower()}
    pattern = r"(?<![\w@])@?(" + "|".join(re.escape(n) for n in names) + r")\b"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


async def _drop_gone(
    rooms: RoomStore, sender: ConnectionSender, session_id: str, gone: list[str]
) -> None:
    # A connection that answered 410 is dead: treat it as disconnected, and
    # tell the others. Their own dead connections are dealt with next time.
    for connection_id in gone:
        count("GoneConnections")
        departure = await rooms.disconnect(session_id, connection_id)
        if departure and departure.event:
            await broadcast(sender, departure.recipients, departure.event)


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
    if result.gone:
        await _drop_gone(rooms, sender, session_id, result.gone)


async def on_connect(
    rt: Runtime,
    *,
    connection_id: str,
    query: dict[str, str] | None,
    request_context: dict[str, Any] | None = None,
) -> Answer:
    """Authenticate, authorise and add a connection to its session.

    Refusals (400, 401, 403) store nothing. Posting to the new connection is
    impossible during ``$connect``, so the welcome waits for ``resume``.
    """
    query = query or {}
    try:
        session_id = validate_session_id(query.get("session"))
    except InvalidSessionId as exc:
        logger.info("connect refused", extra={"reason": "InvalidSessionId"})
        count("RefusedConnects")
        return Answer(400, str(exc))
    bind(session_id=session_id, connection_id=connection_id)
    try:
        grant = rt.verifier().verify(query.get("token"), session_id=session_id)
    except AuthError as exc:
        logger.info("connect refused", extra={"reason": type(exc).__name__})
        count("RefusedConnects")
        return Answer(exc.status, str(exc))
    user = grant.participant
    bind(user_id=user.user_id)
    rooms = rooms_for(rt)
    joined = await rooms.connect(
        session_id, connection_id, user.user_id, user.name, mode=rt.settings.reply_mode
    )
    if joined.stale_session:
        # The id was still recorded in another session (a lost $disconnect).
        stale = await rooms.disconnect(joined.stale_session, connection_id)
        if stale is not None:
            await publish(
                rooms,
                rt.sender(request_context),
                joined.stale_session,
                stale.recipients,
                stale.event,
            )
    count("Connects")
    if joined.resumed:
        count("Joins")
    if joined.from_grace:
        count("Resumes")
    logger.info("connected", extra={"epoch": joined.epoch, "resumed": joined.resumed})
    await publish(rooms, rt.sender(request_context), session_id, joined.recipients, joined.event)
    return Answer(200)


async def on_disconnect(
    rt: Runtime, *, connection_id: str, request_context: dict[str, Any] | None = None
) -> Answer:
    """Remove a connection; the others see the participant as away."""
    bind(connection_id=connection_id)
    rooms = rooms_for(rt)
    found = await rooms.lookup(connection_id)
    if found is None:
        return Answer(200)  # never joined, or already removed (a repeated event)
    session_id, user_id = found
    bind(session_id=session_id, user_id=user_id)
    departure = await rooms.disconnect(session_id, connection_id)
    if departure is not None:
        bind(user_id=departure.user)
        logger.info("disconnected", extra={"grace_deadline_ms": departure.grace_deadline})
        await publish(
            rooms,
            rt.sender(request_context),
            session_id,
            departure.recipients,
            departure.event,
        )
    return Answer(200)


async def on_message(
    rt: Runtime,
    *,
    connection_id: str,
    body: str | bytes | None,
    request_context: dict[str, Any] | None = None,
) -> Answer:
    """Handle one client frame; every failure becomes an ``error`` frame.

    The answer to API Gateway is always 200: errors reach the client as
    frames, and the connection stays usable.
    """
    bind(connection_id=connection_id)
    sender = rt.sender(request_context)
    client_id: str | None = None
    try:
        frame = parse_frame(body, max_text=rt.settings.max_text)
        client_id = frame.id if isinstance(frame, Say) else None
        rooms = rooms_for(rt)
        found = await rooms.lookup(connection_id)
        if found is None:
            raise NotInSession("this connection is not part of any session")
        session_id, user_id = found
        bind(session_id=session_id, user_id=user_id)
        if isinstance(frame, Resume):
            await _resume(rt, rooms, sender, session_id, connection_id, frame)
        elif isinstance(frame, Say):
            await _say(rt, rooms, sender, session_id, connection_id, user_id, frame)
        elif isinstance(frame, Ping):
            await rooms.touch(session_id, connection_id)
            await send(sender, connection_id, pong_frame(rooms.now_ms()))
        elif isinstance(frame, Leave):
            departure = await rooms.disconnect(session_id, connection_id, left=True)
            if departure is not None:
                await publish(rooms, sender, session_id, departure.recipients, departure.event)
            await sender.close(connection_id)
    except FrameError as exc:
        client_id = client_id or exc.client_id
        if isinstance(exc, RateLimited):
            count("RateLimitedFrames")
        extra = {"retry_after": exc.retry_after} if isinstance(exc, RateLimited) else {}
        await _tell(
            sender, connection_id, error_frame(exc.code, exc.message, client_id=client_id, **extra)
        )
    except (NotInSession, SessionGone):
        await _tell(
            sender,
            connection_id,
            error_frame(
                "session_gone",
                "this connection is not in a live session; reconnect to start again",
                client_id=client_id,
            ),
        )
    except NotJoined as exc:
        await _tell(sender, connection_id, error_frame("not_joined", str(exc), client_id=client_id))
    except StoreError:
        logger.exception("store failed")
        await _tell(
            sender,
            connection_id,
            error_frame("internal", "the message was not applied; retry", client_id=client_id),
        )
    return Answer(200)


async def _tell(sender: ConnectionSender, connection_id: str, frame: dict[str, Any]) -> None:
    # If the client is gone, nobody is left to tell.
    with contextlib.suppress(SendError):
        await send(sender, connection_id, frame)


async def _resume(
    rt: Runtime,
    rooms: RoomStore,
    sender: ConnectionSender,
    session_id: str,
    connection_id: str,
    frame: Resume,
) -> None:
    welcome = await rooms.resume(session_id, connection_id, frame.epoch, frame.last_seq)
    welcome["agent"] = {
        "name": rt.settings.agent_name,
        "model": rt.settings.model,
        "offline": not rt.settings.openai_api_key,
    }
    if welcome["recovered"] and frame.epoch:
        count("RecoveredReplays")
    logger.info(
        "welcome",
        extra={"recovered": welcome["recovered"], "replayed": len(welcome["events"])},
    )
    await send(sender, connection_id, _fit_welcome(welcome))


def _fit_welcome(welcome: dict[str, Any], limit: int = 120 * 1024) -> dict[str, Any]:
    # A message may be 128 KB: drop the oldest transcript events until it fits
    # (the client still rebuilds the latest part of the conversation).
    transcript = welcome.get("transcript")
    while transcript and len(encode_frame(welcome)) > limit:
        del transcript[: max(1, len(transcript) // 4)]
    return welcome


async def _say(
    rt: Runtime,
    rooms: RoomStore,
    sender: ConnectionSender,
    session_id: str,
    connection_id: str,
    user_id: str,
    frame: Say,
) -> None:
    await _rate_limit(rt, f"{session_id}:{user_id}")
    said = await rooms.say(session_id, connection_id, frame.id, frame.text)
    bind(user_id=said.user)
    if not said.duplicate:
        await publish(rooms, sender, session_id, said.recipients, said.event)
    await _tell(sender, connection_id, ack_frame(frame.id, said.seq, said.duplicate))
    respond = said.mode == "every" or addresses_agent(frame.text, rt.settings.agent_name)
    # Queued again for a duplicate too: if the first enqueue failed, the
    # client's retry completes it; SQS FIFO dedup makes a second copy a no-op.
    await rt.queue().enqueue(
        TurnRequest(
            session_id=session_id,
            epoch=said.epoch,
            turn_id=frame.id,
            respond=respond,
            input=(TurnInput(said.user, said.name, frame.text, said.seq, frame.id),),
        )
    )
    count("Messages")


async def _rate_limit(rt: Runtime, identifier: str) -> None:
    limiter = rt.rate_limiter()
    if limiter is None:
        return
    allowed, retry_after = await limiter(identifier)
    if not allowed:
        raise RateLimited(retry_after)
