"""What happens on each WebSocket route: ``$connect``, messages, ``$disconnect``.

The Lambda handlers parse the event and call these; everything here is
independent of Lambda, so the local gateway and the tests call the same code
through the same handlers. Nothing here imports the Agents SDK.

Who a connection is comes from the Lambda REQUEST authorizer on ``$connect``
(:mod:`rejoin.authorizer`): API Gateway hands its context (session, user,
name, token times) to every later event of the connection in
``requestContext.authorizer``, so each frame is one transition script, with
no lookup first.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

from .authorizer import Identity, identity_from_context
from .errors import (
    AuthError,
    FrameError,
    NotInSession,
    NotJoined,
    RateLimited,
    RejoinError,
    SendError,
    SessionGone,
    StoreError,
    StoreTimeout,
    TokenExpired,
    TokenRevoked,
)
from .fanout import publish
from .frames import (
    Leave,
    Ping,
    Resume,
    Say,
    Stop,
    ack_frame,
    encode_frame,
    error_frame,
    left_frame,
    parse_frame,
    pong_frame,
    replay_frame,
    stopping_frame,
)
from .observability import bind, count, logger
from .queue import TurnRequest
from .rooms import RoomStore, Said
from .runtime import Runtime
from .sender import ConnectionSender, send

__all__ = ["Answer", "addresses_agent", "on_connect", "on_disconnect", "on_message"]

# A welcome (or replay page) stays under this many bytes: API Gateway takes
# messages of up to 128 KB, and the envelope of a page needs some room.
PAGE_BYTES = 100 * 1024


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


def addresses_agent(text: str, agent_name: str) -> bool:
    """Whether a message addresses the agent (meeting mode): ``@agent`` or its name."""
    names = {"agent", agent_name.lower()}
    pattern = r"(?<![\w@])@?(" + "|".join(re.escape(n) for n in names) + r")\b"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


async def on_connect(
    rt: Runtime,
    *,
    connection_id: str,
    query: dict[str, str] | None,
    authorizer: dict[str, Any] | None = None,
    request_context: dict[str, Any] | None = None,
) -> Answer:
    """Add an authorised connection to its session.

    The authorizer has checked the token; without one (a handler invoked on
    its own, as ``sam local invoke`` does) the token is checked here. A
    revoked token is refused here, against the store. Refusals store nothing.
    Posting to the new connection is impossible during ``$connect``, so the
    welcome waits for ``resume``.
    """
    try:
        who = identity_from_context(authorizer) if authorizer else _verify(rt, query)
    except AuthError as exc:
        logger.info("connect refused", extra={"reason": type(exc).__name__})
        count("RefusedConnects")
        return Answer(exc.status, str(exc))
    except RejoinError as exc:  # InvalidSessionId
        logger.info("connect refused", extra={"reason": type(exc).__name__})
        count("RefusedConnects")
        return Answer(400, str(exc))
    bind(session_id=who.session_id, connection_id=connection_id, user_id=who.user_id)
    rooms = rt.rooms()
    try:
        joined = await rooms.connect(
            who.session_id,
            connection_id,
            who.user_id,
            who.name,
            mode=rt.settings.reply_mode,
            issued_at=who.issued_at,
            expires_at=who.expires_at,
        )
    except TokenRevoked as exc:
        logger.info("connect refused", extra={"reason": "TokenRevoked"})
        count("RefusedConnects")
        return Answer(exc.status, str(exc))
    count("Connects")
    if joined.resumed:
        count("Joins")
    if joined.from_grace:
        count("Resumes")
    logger.info("connected", extra={"epoch": joined.epoch, "resumed": joined.resumed})
    sender = rt.sender(request_context)
    await publish(rooms, sender, who.session_id, joined.recipients, joined.event)
    return Answer(200)


def _verify(rt: Runtime, query: dict[str, str] | None) -> Identity:
    query = query or {}
    from .keys import validate_session_id

    session_id = validate_session_id(query.get("session"))
    grant = rt.verifier().verify(query.get("token"), session_id=session_id)
    return Identity.from_grant(grant)


async def on_disconnect(
    rt: Runtime,
    *,
    connection_id: str,
    authorizer: dict[str, Any] | None = None,
    request_context: dict[str, Any] | None = None,
) -> Answer:
    """Remove a connection; the others see the participant as away."""
    bind(connection_id=connection_id)
    try:
        who = identity_from_context(authorizer)
    except RejoinError:
        # No identity: the connection was never admitted (or the event is not
        # API Gateway's); the cleanup finds anything left behind.
        logger.info("disconnect without an authorizer context")
        return Answer(200)
    bind(session_id=who.session_id, user_id=who.user_id)
    rooms = rt.rooms()
    departure = await rooms.disconnect(who.session_id, connection_id)
    if departure is not None:
        logger.info("disconnected", extra={"grace_deadline_ms": departure.grace_deadline})
        await publish(
            rooms,
            rt.sender(request_context),
            who.session_id,
            departure.recipients,
            departure.event,
        )
    return Answer(200)


async def on_message(
    rt: Runtime,
    *,
    connection_id: str,
    body: str | bytes | None,
    authorizer: dict[str, Any] | None = None,
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
        who = identity_from_context(authorizer)
    except RejoinError:
        await _tell(sender, connection_id, _gone(None))
        return Answer(200)
    bind(session_id=who.session_id, user_id=who.user_id)
    rooms = rt.rooms()
    session_id = who.session_id
    try:
        try:
            frame = parse_frame(body, max_text=rt.settings.max_text)
        except FrameError:
            # A refused frame costs budget too: over it, say so instead.
            await rooms.ping(session_id, connection_id)
            raise
        client_id = frame.id if isinstance(frame, Say) else None
        if isinstance(frame, Resume):
            await _resume(rt, rooms, sender, session_id, connection_id, frame)
        elif isinstance(frame, Say):
            await _say(rt, rooms, sender, who, connection_id, frame)
        elif isinstance(frame, Ping):
            now_ms = await rooms.ping(session_id, connection_id)
            await send(sender, connection_id, pong_frame(now_ms))
        elif isinstance(frame, Leave):
            departure = await rooms.leave(session_id, connection_id)
            await publish(rooms, sender, session_id, departure.recipients, departure.event)
            seq = departure.event["seq"] if departure.event else None
            await _tell(sender, connection_id, left_frame(seq))
            with contextlib.suppress(SendError):
                await sender.close(connection_id)
        elif isinstance(frame, Stop):
            stopping = await rooms.stop(session_id, connection_id, frame.turn)
            count("StopRequests")
            await send(sender, connection_id, stopping_frame(stopping["turn"], stopping["running"]))
    except FrameError as exc:
        client_id = client_id or exc.client_id
        if isinstance(exc, RateLimited):
            count("RateLimitedFrames")
        extra = {"retry_after": exc.retry_after} if isinstance(exc, RateLimited) else {}
        await _tell(
            sender, connection_id, error_frame(exc.code, exc.message, client_id=client_id, **extra)
        )
    except (NotInSession, SessionGone, TokenRevoked, TokenExpired) as exc:
        await _tell(sender, connection_id, _gone(client_id, exc))
    except NotJoined as exc:
        await _tell(sender, connection_id, error_frame("not_joined", str(exc), client_id=client_id))
    except StoreError as exc:
        logger.exception("store failed")
        # A request that timed out may still be applied later: say so, never "not applied".
        message = (
            "the store did not answer in time: the frame may have been applied; "
            "send it again (a say with the same id is stored once)"
            if isinstance(exc, StoreTimeout)
            else "the frame was not applied; retry"
        )
        await _tell(sender, connection_id, error_frame("internal", message, client_id=client_id))
    return Answer(200)


def _gone(client_id: str | None, exc: Exception | None = None) -> dict[str, Any]:
    if isinstance(exc, TokenExpired):
        return error_frame(
            "token_expired",
            "this connection's token has expired; reconnect with a new one",
            client_id=client_id,
        )
    if isinstance(exc, TokenRevoked):
        return error_frame("revoked", "this connection's token was revoked", client_id=client_id)
    return error_frame(
        "session_gone",
        "this connection is not in a live session; reconnect to start again",
        client_id=client_id,
    )


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
    welcome["limits"] = {
        "max_text": rt.settings.max_text,
        "rate_limit": rt.settings.rate_limit,
        "rate_window_seconds": rt.settings.rate_window_seconds,
    }
    if welcome["recovered"] and frame.epoch:
        count("RecoveredReplays")
    pages = page_welcome(welcome)
    logger.info(
        "welcome",
        extra={
            "recovered": welcome["recovered"],
            "replayed": len(welcome["events"] or welcome["transcript"] or []),
            "pages": len(pages),
        },
    )
    for page in pages:
        await send(sender, connection_id, page)


def page_welcome(welcome: dict[str, Any], limit: int = PAGE_BYTES) -> list[dict[str, Any]]:
    """Split a welcome's backlog into the welcome and ``replay`` frames under ``limit``.

    The backlog is ``events`` when recovered, else ``transcript``. Every event
    is kept, in order; ``more`` says whether another page follows.
    """
    field = "events" if welcome["recovered"] else "transcript"
    backlog: list[dict[str, Any]] = list(welcome[field] or [])
    head = dict(welcome, **{field: []}, more=False)
    frames: list[dict[str, Any]] = [head]
    page: list[dict[str, Any]] = head[field]
    size = len(encode_frame(head))
    for event in backlog:
        cost = len(encode_frame(event)) + 1
        if page and size + cost > limit:
            frames[-1]["more"] = True
            nxt = replay_frame([], more=False)
            frames.append(nxt)
            page = nxt["events"]
            size = len(encode_frame(nxt))
        page.append(event)
        size += cost
    return frames


async def _say(
    rt: Runtime,
    rooms: RoomStore,
    sender: ConnectionSender,
    who: Identity,
    connection_id: str,
    frame: Say,
) -> None:
    session_id = who.session_id
    said = await rooms.say(
        who.session_id,
        connection_id,
        frame.id,
        frame.text,
        speaker=(who.user_id, who.name),
        addressed=addresses_agent(frame.text, rt.settings.agent_name),
    )
    if not said.duplicate:
        await publish(rooms, sender, session_id, said.recipients, said.event)
        count("Messages")
    await _tell(sender, connection_id, ack_frame(frame.id, said.seq, said.duplicate))
    if said.turn:
        # Queued again for a duplicate too: if the first enqueue failed, the
        # client's resend completes it; the queue's dedup makes a second copy
        # a no-op.
        await _enqueue(rt, sender, session_id, connection_id, frame.id, said)


async def _enqueue(
    rt: Runtime,
    sender: ConnectionSender,
    session_id: str,
    connection_id: str,
    client_id: str,
    said: Said,
) -> None:
    turn = TurnRequest(
        session_id=session_id, epoch=said.epoch, turn_id=said.turn, reply_to=said.seq
    )
    try:
        await rt.queue().enqueue(turn)
    except Exception:
        # The message is stored and was delivered; only the agent's turn is
        # missing. The client can resend the same say to queue it again.
        logger.exception("could not queue the agent's turn")
        count("TurnsNotQueued")
        await _tell(
            sender,
            connection_id,
            error_frame(
                "turn_not_queued",
                "the message was delivered, but the agent could not be asked to answer; "
                "send it again (same id) to retry",
                client_id=client_id,
                seq=said.seq,
            ),
        )
