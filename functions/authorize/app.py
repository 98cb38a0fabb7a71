"""``$connect``'s Lambda REQUEST authorizer: verify the token, name the connection.

Its context reaches every later event of the connection (see
:mod:`rejoin.authorizer`). Raising ``Unauthorized`` refuses the handshake with
401; a Deny policy with 403.
"""

from __future__ import annotations

from typing import Any

from rejoin.authorizer import Unauthorized, authorize
from rejoin.observability import count, lambda_handler, logger
from rejoin.runtime import get_runtime


@lambda_handler
def _decide(event: dict[str, Any], context: Any) -> dict[str, Any] | None:
    try:
        return authorize(get_runtime().verifier().verify, event)
    except Unauthorized:
        logger.info("connect refused by the authorizer")
        count("RefusedConnects")
        return None


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    answer = _decide(event, context)
    if answer is None:
        raise Unauthorized()  # outside the wrapper: a refusal, not a failure to log
    return answer
