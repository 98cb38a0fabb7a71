"""``$connect``'s Lambda REQUEST authorizer: verify the token, name the connection.

Its context reaches every later event of the connection (see
:mod:`rejoin.authorizer`). Raising ``Unauthorized`` refuses the handshake with
401; a Deny policy with 403.
"""

from __future__ import annotations

from typing import Any

from rejoin.authorizer import Unauthorized, authorize
from rejoin.observability import bind, count, lambda_handler, logger
from rejoin.runtime import get_runtime


@lambda_handler
def _decide(event: dict[str, Any], context: Any) -> dict[str, Any] | None:
    bind(connection_id=(event.get("requestContext") or {}).get("connectionId"))
    try:
        answer = authorize(get_runtime().verifier().verify, event)
    except Unauthorized:
        logger.info("connect refused", extra={"reason": "Unauthorized"})
        count("RefusedConnects")
        return None
    if answer["policyDocument"]["Statement"][0]["Effect"] != "Allow":
        logger.info("connect refused", extra={"reason": "Forbidden"})
        count("RefusedConnects")
    return answer


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    answer = _decide(event, context)
    if answer is None:
        raise Unauthorized()  # outside the wrapper: a refusal, not a failure to log
    return answer
