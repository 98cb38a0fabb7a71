"""Credentials of the HTTP API: the admin key, or a participant token.

``Authorization: Bearer <admin key>`` (``settings.admin_key``, compared in
constant time) opens every route; a participant token (the JWT a client
connects with) reads the status and transcript of the one session it grants.
With no admin key configured the admin routes answer 503; they are never open.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..errors import AuthError, InvalidSessionId, TokenWrongSession
from ..observability import bind
from ..runtime import Runtime, get_runtime
from .problems import ApiProblem, unauthorized
from .schemas import SessionIdPath

__all__ = ["Reader", "ReaderDep", "RuntimeDep", "require_admin", "require_reader"]

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
        raise unauthorized("send the admin key: Authorization: Bearer <admin key>")
    if not _same_secret(credentials.credentials, key):
        raise unauthorized("the credential is not the admin key")


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
            403 ``forbidden`` (a valid token for another session, or a revoked
            one); 503 when tokens cannot be checked here.
    """
    credentials = admin or participant
    if credentials is None:
        raise unauthorized(
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
        raise unauthorized(str(exc)) from None
    bind(user_id=grant.participant.user_id)
    if await rt.rooms().revoked(session_id, grant.participant.user_id, grant.issued_at):
        raise ApiProblem(
            403, "forbidden", "this token was revoked (session ended or participant removed)"
        )
    return Reader(admin=False, user_id=grant.participant.user_id)


ReaderDep = Annotated[Reader, Depends(require_reader)]
