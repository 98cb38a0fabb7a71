"""The HTTP API's routes and their OpenAPI documentation.

Each route checks credentials (:mod:`rejoin.api.auth`) and its body
(:mod:`rejoin.api.schemas`), then calls what it does to the session
(:mod:`rejoin.api.sessions`). Errors are problems (:mod:`rejoin.api.problems`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Response

from .._lua import Script
from ..errors import ConfigError, InvalidParticipant, StoreError
from ..observability import bind, count, logger
from ..tokens import mint_token
from .auth import ReaderDep, RuntimeDep, require_admin
from .problems import PROBLEM_TITLES, ApiProblem, FieldError, Problem, session_not_found
from .schemas import (
    DEFAULT_TOKEN_TTL_SECONDS,
    CreateSessionRequest,
    Health,
    Ready,
    SessionCreated,
    SessionIdPath,
    SessionStatus,
    TokenIssued,
    TokenRequest,
    Transcript,
    UserIdPath,
)
from .sessions import (
    create_session,
    end_session,
    new_session_id,
    remove_participant,
    session_status,
    transcript,
)

__all__ = ["router"]

# Readiness: one trivial script on the store.
_PING = Script("ping", "return 1")

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
    "first connection creates it. The token lives `ttl_seconds` (default 1 hour), at most "
    "the deployment's maximum token lifetime (`REJOIN_TOKEN_MAX_TTL_SECONDS`, 12 h unless "
    "changed; a longer `ttl_seconds` is a 400). Admin only. Deployments that verify tokens "
    "from a JWKS URL mint them with their identity provider instead (409).",
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
    ttl = _token_ttl(body, s.token_max_ttl_seconds)
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
    # The clock the verifier checks expiry with; never a token born revoked.
    issued = await rt.rooms().issue_time(session_id, body.user_id, rt.clock())
    try:
        token = mint_token(
            secret=s.token_secret,
            session_id=session_id,
            user_id=body.user_id,
            name=body.name,
            ttl_seconds=ttl,
            now=issued,
            audience=s.token_audience,
            issuer=s.token_issuer,
            max_ttl_seconds=s.token_max_ttl_seconds,
        )
    except InvalidParticipant as exc:
        raise ApiProblem(400, "invalid_request", str(exc)) from None
    count("TokensMinted")
    logger.info("token minted", extra={"ttl_seconds": ttl})
    hint_base = ""
    if s.ws_endpoint:
        hint_base = "ws" + s.ws_endpoint.removeprefix("http")  # https -> wss, http -> ws
    query = urlencode({"session": session_id, "token": token})
    return TokenIssued(
        token=token,
        expires_at=issued + ttl,
        connect_url_hint=f"{hint_base}?{query}",
    )


def _token_ttl(body: TokenRequest, max_ttl: int) -> int:
    """The lifetime asked for, or the default; a 400 when over the maximum lifetime."""
    if "ttl_seconds" not in body.model_fields_set:
        return min(DEFAULT_TOKEN_TTL_SECONDS, max_ttl)
    if body.ttl_seconds > max_ttl:
        message = (
            f"Input should be less than or equal to {max_ttl} "
            "(the maximum token lifetime, REJOIN_TOKEN_MAX_TTL_SECONDS)"
        )
        raise ApiProblem(
            400,
            "invalid_request",
            f"body.ttl_seconds: {message}",
            errors=[FieldError(field="body.ttl_seconds", message=message, type="less_than_equal")],
        )
    return body.ttl_seconds


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
        raise session_not_found(session_id)
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
        raise session_not_found(session_id)
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
        raise session_not_found(session_id)
    return Response(status_code=204)


@router.delete(
    "/sessions/{session_id}/participants/{user_id}",
    status_code=204,
    response_class=Response,
    tags=["sessions"],
    summary="Remove a participant",
    description="Revokes every token of `user_id` for this session issued until now, sends "
    "their connections an `ended` frame (`reason: removed`) and closes them; the others "
    "see them as `removed`. A token minted for them afterwards works again. Admin only.",
    dependencies=[Depends(require_admin)],
    responses={
        204: {"description": "Removed (or was not there: their tokens are revoked anyway)."},
        **_BAD_REQUEST,
        **_ADMIN_ERRORS,
        **_NOT_FOUND,
        **_INTERNAL,
    },
)
async def delete_participant(
    session_id: SessionIdPath, user_id: UserIdPath, rt: RuntimeDep
) -> Response:
    """Remove a participant."""
    bind(session_id=session_id, user_id=user_id)
    if await remove_participant(rt.rooms(), rt.sender(), session_id, user_id) is None:
        raise session_not_found(session_id)
    return Response(status_code=204)
