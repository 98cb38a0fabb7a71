"""The ``$connect`` authorizer: who a connection is, decided once.

API Gateway runs a Lambda REQUEST authorizer on ``$connect`` (the only route
that can have one). It verifies the participant token and answers with an
IAM policy and a context; API Gateway then hands that context to every later
event of the same connection (messages and ``$disconnect``) in
``requestContext.authorizer`` (see the API Gateway developer guide, "Control
access to WebSocket APIs with AWS Lambda REQUEST authorizers", and
``$context.authorizer.<key>`` in its WebSocket context-variable reference).
So a frame names its session and sender without a store lookup, and the
transition script checks the connection record in the same request.

Refusals follow API Gateway's rules: an authorizer that raises
``Unauthorized`` makes the handshake fail with 401, a ``Deny`` policy with
403. A token revoked since it was issued is refused by the ``$connect``
handler (403), which asks the store; the authorizer stays store-free so it
is fast and cannot be slowed by the store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import AuthError, InvalidSessionId, RejoinError
from .keys import validate_session_id
from .observability import bind
from .participants import Participant

if TYPE_CHECKING:
    from .tokens import Grant

__all__ = ["Identity", "Unauthorized", "authorize", "identity_from_context"]


class Unauthorized(Exception):
    """Raised by the authorizer to refuse with 401 (API Gateway matches the text)."""

    def __init__(self) -> None:
        super().__init__("Unauthorized")


@dataclass(frozen=True)
class Identity:
    """Who a connection is: the authorizer's context, typed.

    Attributes:
        session_id: the one session the connection may use.
        user_id: the participant's user id.
        name: the participant's display name.
        issued_at: the token's ``iat`` (seconds).
        expires_at: the token's ``exp`` (seconds).
    """

    session_id: str
    user_id: str
    name: str
    issued_at: float
    expires_at: float

    @classmethod
    def from_grant(cls, grant: Grant) -> Identity:
        """The identity a verified token grants."""
        return cls(
            session_id=grant.session_id,
            user_id=grant.participant.user_id,
            name=grant.participant.name,
            issued_at=grant.issued_at,
            expires_at=grant.expires_at,
        )

    def to_context(self) -> dict[str, str | int]:
        """The authorizer context (API Gateway allows only flat scalar values)."""
        return {
            "session": self.session_id,
            "user": self.user_id,
            "name": self.name,
            "iat": math.floor(self.issued_at),
            "exp": math.floor(self.expires_at),
        }


def identity_from_context(context: dict[str, Any] | None) -> Identity:
    """Read the identity API Gateway passed on from the authorizer.

    Raises:
        RejoinError: the context is missing or malformed (no authorizer ran).
    """
    if not context:
        raise RejoinError("no authorizer context in the event")
    try:
        # API Gateway may stringify context values: accept both forms.
        session_id = validate_session_id(context["session"])
        participant = Participant(str(context["user"]), str(context["name"]))
        issued_at = float(context["iat"])
        expires_at = float(context["exp"])
    except (KeyError, TypeError, ValueError, InvalidSessionId, AuthError) as exc:
        raise RejoinError(f"malformed authorizer context ({type(exc).__name__})") from None
    return Identity(session_id, participant.user_id, participant.name, issued_at, expires_at)


def authorize(verify: Any, event: dict[str, Any]) -> dict[str, Any]:
    """Answer a ``$connect`` REQUEST authorizer event.

    Args:
        verify: ``TokenVerifier.verify`` (token, session_id=...) -> Grant.
        event: the authorizer event (``queryStringParameters``, ``methodArn``).

    Returns:
        An Allow policy for the event's ``methodArn`` with the identity as
        context, or a Deny policy (403: malformed session id, token for
        another session).

    Raises:
        Unauthorized: no token, or a malformed, forged or expired one (401).
    """
    query = event.get("queryStringParameters") or {}
    method_arn = str(event.get("methodArn") or "*")
    try:
        session_id = validate_session_id(query.get("session"))
    except InvalidSessionId:
        return _policy("anonymous", "Deny", method_arn, None)
    bind(session_id=session_id)
    try:
        grant = verify(query.get("token"), session_id=session_id)
    except AuthError as exc:
        if exc.status == 403:
            return _policy("anonymous", "Deny", method_arn, None)
        raise Unauthorized() from None
    who = Identity.from_grant(grant)
    return _policy(who.user_id, "Allow", method_arn, who.to_context())


def _policy(
    principal: str, effect: str, resource: str, context: dict[str, str | int] | None
) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "principalId": principal,
        "policyDocument": {
            "Version": "2012-10-17",
            "Statement": [{"Action": "execute-api:Invoke", "Effect": effect, "Resource": resource}],
        },
    }
    if context is not None:
        answer["context"] = context
    return answer
