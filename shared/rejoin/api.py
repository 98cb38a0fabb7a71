"""The HTTP API: create sessions, mint tokens, read status and transcripts, end sessions.

:func:`create_app` builds the FastAPI app that ``functions/api/app.py`` serves
through Mangum (and the local stack mounts at ``/api``). The routes are thin;
what they do to a session is in the functions below them (:func:`create_session`,
:func:`session_status`, :func:`transcript`, :func:`end_session`), over a
:class:`~rejoin.rooms.RoomStore`.

Credentials: ``Authorization: Bearer <admin key>`` (``settings.admin_key``,
compared in constant time) for the admin routes; a participant token (the JWT
a client connects with) reads the status and transcript of the one session it
grants. With no admin key configured the admin routes answer 503; they are
never open.

Every error is an RFC 9457 problem (``application/problem+json``) with a
stable ``code``; FastAPI's own validation errors become 400 ``invalid_request``
problems, and unexpected errors a 500 ``internal`` problem with nothing of
the exception in it (it is logged).

The runtime is read per request (:func:`rejoin.runtime.get_runtime`), so tests
and the local stack install their own; its clients are per event loop.

This module imports FastAPI: only the HTTP API function (whose requirements
include it) imports it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import secrets
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, Path, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from ._lua import Script
from .errors import (
    AuthError,
    ConfigError,
    InvalidParticipant,
    InvalidSessionId,
    SessionGone,
    StoreError,
    TokenWrongSession,
)
from .frames import ended_frame
from .observability import bind, count, logger, unbind
from .rooms import RoomStore
from .runtime import Runtime, get_runtime
from .sender import ConnectionSender, broadcast
from .tokens import mint_token

__all__ = [
    "MAX_TOKEN_TTL_SECONDS",
    "PROBLEM_JSON",
    "ApiProblem",
    "Problem",
    "create_app",
    "create_session",
    "end_session",
    "new_session_id",
    "session_status",
    "transcript",
]

PROBLEM_JSON = "application/problem+json"
MAX_TOKEN_TTL_SECONDS = 24 * 3600
API_VERSION = "0.1.0"

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
USER_ID_PATTERN = r"^[A-Za-z0-9_.@:-]{1,128}$"

# --- problems -------------------------------------------------------------------------

# Every problem code the API answers with, and its title (stable, like the code).
PROBLEM_TITLES: dict[str, str] = {
    "invalid_request": "Invalid request",
    "invalid_session_id": "Invalid session id",
    "unauthorized": "Unauthorized",
    "forbidden": "Forbidden",
    "session_not_found": "Session not found",
    "session_ended": "Session ended meanwhile",
    "tokens_not_minted_here": "Tokens are not minted here",
    "admin_not_configured": "Admin credential not configured",
    "not_configured": "Not configured",
    "auth_unavailable": "Token keys unavailable",
    "store_unavailable": "Store unavailable",
    "not_found": "Not found",
    "method_not_allowed": "Method not allowed",
    "internal": "Internal error",
}

_WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="rejoin"'}


class FieldError(BaseModel):
    """One invalid field of a request."""

    field: str = Field(description="Where: `body.ttl_seconds`, `path.session_id`, ...")
    message: str = Field(description="What is wrong with it.")
    type: str = Field(description="A machine-readable error type (pydantic's).")


class Problem(BaseModel):
    """An RFC 9457 problem; ``code`` is stable and meant for programs."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "urn:rejoin:problem:session_not_found",
                    "title": "Session not found",
                    "status": 404,
                    "detail": "session 'standup-42' does not exist or has expired",
                    "code": "session_not_found",
                }
            ]
        }
    )

    type: str = Field(description="`urn:rejoin:problem:<code>`.")
    title: str = Field(description="A short summary of the problem type.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What went wrong with this request (safe to show).")
    code: str = Field(description="Stable machine-readable code: " + ", ".join(PROBLEM_TITLES))
    errors: list[FieldError] | None = Field(
        default=None, description="The invalid fields (`invalid_request` only)."
    )


class ApiProblem(Exception):
    """Raised by the API to answer with a problem.

    Args:
        status: the HTTP status.
        code: a code of :data:`PROBLEM_TITLES`.
        detail: what went wrong, safe to show to the caller.
        headers: extra response headers.
        errors: the invalid fields, for ``invalid_request``.
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        errors: list[FieldError] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
        self.errors = errors


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    errors: list[FieldError] | None = None,
) -> JSONResponse:
    """A problem+json response."""
    problem = Problem(
        type=f"urn:rejoin:problem:{code}",
        title=PROBLEM_TITLES.get(code, HTTPStatus(status).phrase),
        status=status,
        detail=detail,
        code=code,
        errors=errors,
    )
    return JSONResponse(
        problem.model_dump(exclude_none=True),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def _unauthorized(detail: str) -> ApiProblem:
    return ApiProblem(401, "unauthorized", detail, headers=_WWW_AUTHENTICATE)


def _not_found(session_id: str) -> ApiProblem:
    return ApiProblem(
        404, "session_not_found", f"session {session_id!r} does not exist or has expired"
    )


# --- models ---------------------------------------------------------------------------

ReplyMode = Literal["every", "addressed"]
SessionId = Annotated[str, StringConstraints(pattern=SESSION_ID_PATTERN)]


class Health(BaseModel):
    """The function is up."""

    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    """The function is up and the store answers."""

    status: Literal["ready"] = "ready"


class CreateSessionRequest(BaseModel):
    """What session to create."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"session_id": "standup-42", "mode": "addressed"}]},
    )

    session_id: SessionId | None = Field(
        default=None,
        description="1-128 of `A-Za-z0-9_-`; a random id is generated when missing.",
    )
    mode: ReplyMode | None = Field(
        default=None,
        description="`every`: the agent answers every message; `addressed`: only messages "
        "that address it. Default: the deployment's `REJOIN_REPLY_MODE`.",
    )


class SessionCreated(BaseModel):
    """The session, created now or found live."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "standup-42",
                    "epoch": "k3f9x2a1Qw7Z",
                    "created": True,
                    "mode": "addressed",
                    "grace_deadline_ms": 1764100120000,
                }
            ]
        }
    )

    session_id: str
    epoch: str = Field(description="The session's epoch (changes when the id is reused).")
    created: bool = Field(description="False: the session already existed and is unchanged.")
    mode: ReplyMode = Field(description="The session's reply mode (a live one keeps its own).")
    grace_deadline_ms: int | None = Field(
        description="Milliseconds since the epoch until which the session waits for a "
        "connection; null while someone is connected."
    )


class TokenRequest(BaseModel):
    """Who the token is for."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"user_id": "u-ada", "name": "Ada Lovelace", "ttl_seconds": 3600}]
        },
    )

    user_id: Annotated[str, StringConstraints(pattern=USER_ID_PATTERN)] = Field(
        description="The participant's user id (the JWT's `sub`): 1-128 of `A-Za-z0-9_.@:-`."
    )
    name: Annotated[str, StringConstraints(min_length=1, max_length=80)] = Field(
        description="The display name: 1-80 printable characters, surrounding spaces "
        "stripped (no control, format or unassigned characters).",
        # JSON Schema cannot say "printable": a format names the rule for tools.
        json_schema_extra={"format": "display-name"},
    )
    ttl_seconds: int = Field(
        default=3600,
        ge=1,
        le=MAX_TOKEN_TTL_SECONDS,
        description="Seconds until the token expires (at most 24 h).",
    )


class TokenIssued(BaseModel):
    """A participant token for one session."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "token": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOi...",
                    "expires_at": 1764103600,
                    "connect_url_hint": "wss://a1b2c3d4e5.execute-api.us-east-1.amazonaws.com"
                    "/dev?session=standup-42&token=eyJhbGciOi...",
                }
            ]
        }
    )

    token: str = Field(description="The JWT (HS256): `sub`, `name`, `sid`, `iat`, `exp`, `aud`.")
    expires_at: int = Field(description="When it expires, in seconds since the epoch (`exp`).")
    connect_url_hint: str = Field(
        description="The WebSocket URL to connect with it; only its query "
        "(`?session=..&token=..`) when this function does not know the WebSocket endpoint."
    )


class ParticipantState(BaseModel):
    """A participant and their presence."""

    user: str
    name: str
    status: Literal["active", "away", "left"] = Field(
        description="`active`: connected; `away`: dropped, may come back; `left`: sent `leave`."
    )


class SessionStatus(BaseModel):
    """A live session's state."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "standup-42",
                    "epoch": "k3f9x2a1Qw7Z",
                    "state": "active",
                    "mode": "every",
                    "seq": 44,
                    "connections": 1,
                    "participants": [
                        {"user": "u-ada", "name": "Ada", "status": "active"},
                        {"user": "u-bob", "name": "Bob", "status": "away"},
                    ],
                    "grace_deadline_ms": None,
                    "created_ms": 1764100000000,
                }
            ]
        }
    )

    session_id: str
    epoch: str
    state: Literal["active", "grace"] = Field(
        description="`active`: someone is connected; `grace`: nobody is, and the session "
        "is deleted at `grace_deadline_ms` unless someone connects before."
    )
    mode: ReplyMode
    seq: int = Field(description="The latest event's sequence number.")
    connections: int = Field(description="Open connections.")
    participants: list[ParticipantState]
    grace_deadline_ms: int | None
    created_ms: int


class MessageEvent(BaseModel):
    """A participant's message."""

    type: Literal["message"]
    seq: int
    id: str = Field(description="The sender's message id (unique per sender).")
    user: str
    name: str
    text: str
    ts: int = Field(description="Milliseconds since the epoch.")


class PresenceEvent(BaseModel):
    """A participant became active, away, left, or was removed."""

    type: Literal["presence"]
    seq: int
    user: str
    name: str
    status: Literal["active", "away", "left", "removed"]
    ts: int


class AgentMessageEvent(BaseModel):
    """The agent's reply to the message whose seq is ``reply_to``."""

    type: Literal["agent_message"]
    seq: int
    turn: str = Field(description="The turn's id, unique in the epoch.")
    reply_to: int = Field(description="The seq of the message answered.")
    text: str
    stopped: bool = Field(
        default=False, description="A participant stopped the agent; `text` is partial."
    )
    ts: int


TranscriptEvent = Annotated[
    MessageEvent | PresenceEvent | AgentMessageEvent, Field(discriminator="type")
]
_EVENT_TYPES = frozenset({"message", "presence", "agent_message"})


class Transcript(BaseModel):
    """The logged events of the session's current epoch, oldest first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "standup-42",
                    "epoch": "k3f9x2a1Qw7Z",
                    "seq": 3,
                    "truncated": False,
                    "events": [
                        {
                            "type": "presence",
                            "seq": 1,
                            "user": "u-ada",
                            "name": "Ada",
                            "status": "active",
                            "ts": 1764100000000,
                        },
                        {
                            "type": "message",
                            "seq": 2,
                            "id": "c-1",
                            "user": "u-ada",
                            "name": "Ada",
                            "text": "@agent what did we decide?",
                            "ts": 1764100003000,
                        },
                        {
                            "type": "agent_message",
                            "seq": 3,
                            "turn": "c-1",
                            "text": "To ship on Friday.",
                            "ts": 1764100009000,
                        },
                    ],
                }
            ]
        }
    )

    session_id: str
    epoch: str
    seq: int
    truncated: bool = Field(
        description="True when the oldest events were dropped by the event log's cap "
        "(`REJOIN_EVENT_LOG_SIZE`): `events` does not start at seq 1."
    )
    events: list[TranscriptEvent]


# --- the store, per event loop ----------------------------------------------------------

_PING = Script("ping", "return 1")


# --- what the routes do -----------------------------------------------------------------


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
    events = [e for e in state["events"] if e.get("type") in _EVENT_TYPES]
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


# --- credentials ------------------------------------------------------------------------

_admin_scheme = HTTPBearer(
    scheme_name="AdminKey",
    description="`Authorization: Bearer <admin key>`: the deployment's admin key "
    "(Secrets Manager, named by `REJOIN_ADMIN_SECRET_NAME`; `REJOIN_ADMIN_KEY` locally).",
    auto_error=False,
)
_participant_scheme = HTTPBearer(
    scheme_name="ParticipantToken",
    bearerFormat="JWT",
    description="`Authorization: Bearer <participant token>`: the JWT a participant "
    "connects with; it grants exactly one session.",
    auto_error=False,
)

Credentials = HTTPAuthorizationCredentials | None


def _same_secret(given: str, expected: str) -> bool:
    # Digests first: compare_digest is constant-time for equal lengths only.
    a = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
    b = hashlib.sha256(expected.encode("utf-8", "surrogatepass")).digest()
    return hmac.compare_digest(a, b)


def _runtime() -> Runtime:
    return get_runtime()


RuntimeDep = Annotated[Runtime, Depends(_runtime)]
SessionIdPath = Annotated[
    str,
    Path(
        pattern=SESSION_ID_PATTERN,
        min_length=1,
        max_length=128,
        description="The session id: 1-128 of `A-Za-z0-9_-`.",
        examples=["standup-42"],
    ),
]


def _admin_key(rt: Runtime) -> str:
    key = rt.settings.admin_key
    if not key:
        raise ApiProblem(
            503,
            "admin_not_configured",
            "no admin key is configured (REJOIN_ADMIN_SECRET_NAME or REJOIN_ADMIN_KEY); "
            "admin routes stay closed",
        )
    return key


async def require_admin(
    rt: RuntimeDep, credentials: Annotated[Credentials, Security(_admin_scheme)]
) -> None:
    """Let the request through only with the admin key.

    Raises:
        ApiProblem: 503 ``admin_not_configured``; 401 ``unauthorized``.
    """
    key = _admin_key(rt)
    if credentials is None:
        raise _unauthorized("send the admin key: Authorization: Bearer <admin key>")
    if not _same_secret(credentials.credentials, key):
        raise _unauthorized("the credential is not the admin key")


@dataclass(frozen=True)
class Reader:
    """Who reads a session: the admin, or a participant of that session."""

    admin: bool
    user_id: str | None = None


async def require_reader(
    session_id: SessionIdPath,
    rt: RuntimeDep,
    admin: Annotated[Credentials, Security(_admin_scheme)],
    participant: Annotated[Credentials, Security(_participant_scheme)],
) -> Reader:
    """Let the admin, or a participant token granting this session, through.

    Raises:
        ApiProblem: 401 ``unauthorized`` (no credential, or not a valid one);
            403 ``forbidden`` (a valid token for another session); 503 when
            tokens cannot be checked here.
    """
    credentials = admin or participant
    if credentials is None:
        raise _unauthorized(
            "send a participant token of this session (or the admin key): "
            "Authorization: Bearer <token>"
        )
    given = credentials.credentials
    key = rt.settings.admin_key
    if key and _same_secret(given, key):
        return Reader(admin=True)
    verifier = rt.verifier()  # ConfigError -> 503 not_configured
    try:
        if rt.settings.jwks_url:  # fetching the keys is blocking network I/O
            grant = await asyncio.to_thread(verifier.verify, given, session_id=session_id)
        else:
            grant = verifier.verify(given, session_id=session_id)
    except TokenWrongSession:
        raise ApiProblem(403, "forbidden", "this token grants another session") from None
    except InvalidSessionId:
        raise  # answered as 400 invalid_session_id
    except AuthError as exc:
        if type(exc) is AuthError:  # the JWKS keys could not be fetched
            raise ApiProblem(503, "auth_unavailable", str(exc)) from None
        raise _unauthorized(str(exc)) from None
    bind(user_id=grant.participant.user_id)
    return Reader(admin=False, user_id=grant.participant.user_id)


ReaderDep = Annotated[Reader, Depends(require_reader)]

# --- routes -----------------------------------------------------------------------------


Responses = dict[int | str, dict[str, Any]]


def _problem_doc(description: str, code: str, status: int, detail: str) -> dict[str, Any]:
    return {
        "model": Problem,
        "description": description,
        "content": {
            "application/json": {
                "example": {
                    "type": f"urn:rejoin:problem:{code}",
                    "title": PROBLEM_TITLES[code],
                    "status": status,
                    "detail": detail,
                    "code": code,
                }
            }
        },
    }


_BAD_REQUEST: Responses = {
    400: _problem_doc(
        "`invalid_request` (with `errors`) or `invalid_session_id`.",
        "invalid_session_id",
        400,
        "path.session_id: String should match pattern '^[A-Za-z0-9_-]{1,128}$'",
    )
}
_ADMIN_ERRORS: Responses = {
    401: _problem_doc(
        "`unauthorized`: no admin key, or a wrong one.",
        "unauthorized",
        401,
        "the credential is not the admin key",
    ),
    503: _problem_doc(
        "`admin_not_configured`, `not_configured` or `store_unavailable`.",
        "admin_not_configured",
        503,
        "no admin key is configured (REJOIN_ADMIN_SECRET_NAME or REJOIN_ADMIN_KEY); "
        "admin routes stay closed",
    ),
}
_READER_ERRORS: Responses = {
    401: _problem_doc(
        "`unauthorized`: no credential, or neither the admin key nor a valid token.",
        "unauthorized",
        401,
        "token has expired",
    ),
    403: _problem_doc(
        "`forbidden`: a valid participant token, for another session.",
        "forbidden",
        403,
        "this token grants another session",
    ),
    503: _problem_doc(
        "`not_configured`, `auth_unavailable` or `store_unavailable`.",
        "store_unavailable",
        503,
        "the session store is unavailable; retry",
    ),
}
_NOT_FOUND: Responses = {
    404: _problem_doc(
        "`session_not_found`: no live session with this id (never created, ended or expired).",
        "session_not_found",
        404,
        "session 'standup-42' does not exist or has expired",
    )
}
_INTERNAL: Responses = {
    500: _problem_doc(
        "`internal`: an unexpected error (logged; nothing of it is shown).",
        "internal",
        500,
        "an unexpected error occurred; it was logged",
    )
}

router = APIRouter()


@router.get(
    "/health",
    tags=["health"],
    summary="Liveness: the function answers",
    description="No authentication, no store call.",
    responses={**_INTERNAL},
)
async def get_health() -> Health:
    """Liveness."""
    return Health()


@router.get(
    "/ready",
    tags=["health"],
    summary="Readiness: the store answers",
    description="Runs one trivial script on Upstash. No authentication.",
    responses={
        503: _problem_doc(
            "`store_unavailable`: Upstash did not answer, or is not configured.",
            "store_unavailable",
            503,
            "the session store did not answer",
        ),
        **_INTERNAL,
    },
)
async def get_ready(rt: RuntimeDep) -> Ready:
    """Readiness: one cheap script on the store."""
    try:
        await _PING(rt.redis(), (), ())
    except (StoreError, ConfigError) as exc:
        logger.warning("store not ready", extra={"reason": type(exc).__name__})
        raise ApiProblem(503, "store_unavailable", "the session store did not answer") from None
    return Ready()


@router.post(
    "/sessions",
    status_code=201,
    tags=["sessions"],
    summary="Create a session before anyone joins",
    description="Creates the session with a fresh epoch; it then waits one grace period for "
    "its first connection. A session that is already live is left as it is and answered "
    "with 200 and `created: false`. The body may be omitted (random id, default mode). "
    "Admin only.",
    dependencies=[Depends(require_admin)],
    responses={
        200: {"model": SessionCreated, "description": "The session already existed (unchanged)."},
        201: {"description": "The session was created."},
        **_BAD_REQUEST,
        **_ADMIN_ERRORS,
        409: _problem_doc(
            "`session_ended`: the session was ended while being created; retry.",
            "session_ended",
            409,
            "session 'standup-42' was ended meanwhile; try again",
        ),
        **_INTERNAL,
    },
)
async def post_session(
    rt: RuntimeDep, response: Response, body: CreateSessionRequest | None = None
) -> SessionCreated:
    """Create a session."""
    spec = body or CreateSessionRequest()
    session_id = spec.session_id or new_session_id()
    bind(session_id=session_id)
    created = await create_session(rt.rooms(), session_id, mode=spec.mode or rt.settings.reply_mode)
    if created.created:
        count("SessionsCreatedByApi")
        logger.info("session created", extra={"epoch": created.epoch})
    else:
        response.status_code = 200
    return created


@router.post(
    "/sessions/{session_id}/tokens",
    tags=["tokens"],
    summary="Mint a participant token",
    description="Signs a JWT (HS256, the deployment's token signing secret) that lets "
    "`user_id` connect to this session as `name`. The session need not exist yet: the "
    "first connection creates it. Admin only. Deployments that verify tokens from a JWKS "
    "URL mint them with their identity provider instead (409).",
    dependencies=[Depends(require_admin)],
    responses={
        **_BAD_REQUEST,
        **_ADMIN_ERRORS,
        409: _problem_doc(
            "`tokens_not_minted_here`: tokens are verified from a JWKS URL.",
            "tokens_not_minted_here",
            409,
            "this deployment verifies tokens from a JWKS URL; mint them with your "
            "identity provider",
        ),
        **_INTERNAL,
    },
)
async def post_token(session_id: SessionIdPath, body: TokenRequest, rt: RuntimeDep) -> TokenIssued:
    """Mint a participant token."""
    bind(session_id=session_id, user_id=body.user_id)
    s = rt.settings
    if s.jwks_url:
        raise ApiProblem(
            409,
            "tokens_not_minted_here",
            "this deployment verifies tokens from a JWKS URL (REJOIN_JWKS_URL); mint them "
            "with your identity provider",
        )
    if not s.token_secret:
        raise ApiProblem(
            503,
            "not_configured",
            "no token signing secret is configured (REJOIN_TOKEN_SECRET_NAME)",
        )
    issued = math.floor(rt.clock())  # the clock the verifier checks expiry with
    try:
        token = mint_token(
            secret=s.token_secret,
            session_id=session_id,
            user_id=body.user_id,
            name=body.name,
            ttl_seconds=body.ttl_seconds,
            now=issued,
            audience=s.token_audience,
            issuer=s.token_issuer,
        )
    except InvalidParticipant as exc:
        raise ApiProblem(400, "invalid_request", str(exc)) from None
    count("TokensMinted")
    logger.info("token minted", extra={"ttl_seconds": body.ttl_seconds})
    hint_base = ""
    if s.ws_endpoint:
        hint_base = "ws" + s.ws_endpoint.removeprefix("http")  # https -> wss, http -> ws
    query = urlencode({"session": session_id, "token": token})
    return TokenIssued(
        token=token,
        expires_at=issued + body.ttl_seconds,
        connect_url_hint=f"{hint_base}?{query}",
    )


@router.get(
    "/sessions/{session_id}",
    tags=["sessions"],
    summary="A session's status",
    description="State (active or grace), participants and their presence, open "
    "connections, the grace deadline, epoch, reply mode and latest seq. For the admin, or "
    "a participant token granting this session.",
    responses={**_BAD_REQUEST, **_READER_ERRORS, **_NOT_FOUND, **_INTERNAL},
)
async def get_session(
    session_id: SessionIdPath, reader: ReaderDep, rt: RuntimeDep
) -> SessionStatus:
    """A session's status."""
    bind(session_id=session_id)
    status = await session_status(rt.rooms(), session_id)
    if status is None:
        raise _not_found(session_id)
    return status


@router.get(
    "/sessions/{session_id}/transcript",
    tags=["sessions"],
    summary="A session's transcript",
    description="The logged events of the session's current epoch, oldest first: messages, "
    "agent messages and presence changes (at most the event log's cap, "
    "`REJOIN_EVENT_LOG_SIZE`). For a participant token granting this session; the admin "
    "key is accepted too. A token for another session is refused (403).",
    responses={**_BAD_REQUEST, **_READER_ERRORS, **_NOT_FOUND, **_INTERNAL},
)
async def get_transcript(
    session_id: SessionIdPath, reader: ReaderDep, rt: RuntimeDep
) -> Transcript:
    """A session's transcript."""
    bind(session_id=session_id)
    found = await transcript(rt.rooms(), session_id)
    if found is None:
        raise _not_found(session_id)
    return found


@router.delete(
    "/sessions/{session_id}",
    status_code=204,
    response_class=Response,
    tags=["sessions"],
    summary="End a session now",
    description="Deletes everything of the session (history, events, presence), sends its "
    "connections an `ended` frame (`reason: ended_by_api`) and closes them. A connect with "
    "the same id afterwards starts a fresh session. Admin only.",
    dependencies=[Depends(require_admin)],
    responses={
        204: {"description": "Ended."},
        **_BAD_REQUEST,
        **_ADMIN_ERRORS,
        **_NOT_FOUND,
        **_INTERNAL,
    },
)
async def delete_session(session_id: SessionIdPath, rt: RuntimeDep) -> Response:
    """End a session."""
    bind(session_id=session_id)
    sender = rt.sender()  # before deleting: unconfigured, nobody would be told
    if await end_session(rt.rooms(), sender, session_id) is None:
        raise _not_found(session_id)
    return Response(status_code=204)


# --- the app ----------------------------------------------------------------------------

_DESCRIPTION = """
Sessions of rejoin: create one before anyone joins, mint participant tokens, read a
session's status and transcript, end it now.

**Credentials** (`Authorization: Bearer ...`):

* the **admin key** (Secrets Manager, named by `REJOIN_ADMIN_SECRET_NAME`;
  `REJOIN_ADMIN_KEY` locally) for every route, compared in constant time. With no
  admin key configured the admin routes answer 503 `admin_not_configured`.
* a **participant token** (the JWT a client connects with) reads the status and the
  transcript of the one session it grants; another session's token gets 403.

**Errors** are RFC 9457 problems (`application/problem+json`) with a stable `code`.
""".strip()


def _on_api_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiProblem)
    return problem_response(
        exc.status, exc.code, exc.detail, headers=exc.headers, errors=exc.errors
    )


def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors: list[FieldError] = []
    for e in exc.errors():
        error = FieldError(
            field=".".join(str(part) for part in e.get("loc", ())),
            message=str(e.get("msg", "invalid")),
            type=str(e.get("type", "invalid")),
        )
        if error not in errors:  # a path parameter a dependency shares is checked twice
            errors.append(error)
    session_fields = {"path.session_id", "body.session_id"}
    if errors and all(e.field in session_fields for e in errors):
        code = "invalid_session_id"
    else:
        code = "invalid_request"
    first = errors[0] if errors else None
    detail = f"{first.field}: {first.message}" if first else "the request is invalid"
    return problem_response(400, code, detail, errors=errors)


def _on_invalid_session_id(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(400, "invalid_session_id", str(exc))


def _on_session_gone(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(404, "session_not_found", "the session ended or expired")


def _on_store_error(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("store failed", extra={"reason": type(exc).__name__})
    return problem_response(
        503,
        "store_unavailable",
        "the session store is unavailable; retry",
        headers={"Retry-After": "1"},
    )


def _on_config_error(request: Request, exc: Exception) -> JSONResponse:
    # ConfigError messages name what is missing, never a secret's value.
    logger.error("not configured", extra={"reason": str(exc)})
    return problem_response(503, "not_configured", str(exc))


_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
}


def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _HTTP_CODES.get(status, "invalid_request" if status < 500 else "internal")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    headers = dict(exc.headers or {})
    if status == 404:
        detail = f"no route {request.url.path!r}"
    elif status == 405:
        # Starlette names the methods of the first route of the path only.
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return problem_response(status, code, detail, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    # The path within the app (the local stack mounts it at /api).
    path = request.url.path.removeprefix(request.scope.get("root_path", ""))
    methods: set[str] = set()
    for route in router.routes:  # this module's routes, included without a prefix
        if isinstance(route, APIRoute) and route.path_regex.match(path):
            methods |= route.methods or set()
    return sorted(methods)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# Innermost frames logged for an unexpected error (file, line, function; no values).
_STACK_FRAMES = 8


class _RequestScope:
    """Per request: fresh log ids, ``no-store`` caching, a problem for a crash.

    An unexpected exception becomes a 500 ``internal`` problem and is not
    re-raised (Mangum and uvicorn would log it again). It is logged with its
    type and stack frames, not its message: a message can quote its input.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        unbind()
        started = False

        async def send_no_store(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"cache-control" for k, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_no_store)
        except Exception as exc:
            logger.error(
                "unexpected error",
                extra={
                    "error": type(exc).__name__,
                    "path": scope.get("path"),
                    "stack": [
                        f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"
                        for frame in traceback.extract_tb(exc.__traceback__)[-_STACK_FRAMES:]
                    ],
                },
            )
            if started:
                raise  # the answer is on its way: nothing else can be sent
            response = problem_response(
                500, "internal", "an unexpected error occurred; it was logged"
            )
            await response(scope, receive, send_no_store)


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        # Errors are problem+json, and FastAPI's 422 never happens (it is a 400 here).
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                responses.pop("422", None)
                for status, answer in responses.items():
                    content = answer.get("content", {})
                    if int(status) >= 400 and "application/json" in content:
                        content[PROBLEM_JSON] = content.pop("application/json")
        components = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    return build


def create_app() -> FastAPI:
    """Build the HTTP API's FastAPI app.

    Serve it with Mangum on Lambda (``lifespan="off"``) or mount it (the local
    stack mounts it at ``/api``). The runtime is read per request.
    """
    app = FastAPI(
        title="rejoin HTTP API",
        version=API_VERSION,
        description=_DESCRIPTION,
        openapi_tags=[
            {"name": "health", "description": "Liveness and readiness."},
            {"name": "sessions", "description": "Create, inspect and end sessions."},
            {"name": "tokens", "description": "Participant tokens for the WebSocket."},
        ],
        redirect_slashes=False,
    )
    app.include_router(router)
    app.add_exception_handler(ApiProblem, _on_api_problem)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(InvalidSessionId, _on_invalid_session_id)
    app.add_exception_handler(SessionGone, _on_session_gone)
    app.add_exception_handler(StoreError, _on_store_error)
    app.add_exception_handler(ConfigError, _on_config_error)
    app.add_middleware(_RequestScope)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app
