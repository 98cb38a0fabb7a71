"""``$connect``: authenticate the token, authorise the session, join it."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from rejoin.events import ConnectEvent
from rejoin.observability import lambda_handler
from rejoin.routes import on_connect
from rejoin.runtime import get_runtime


@lambda_handler
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    try:
        parsed = ConnectEvent.model_validate(event)
    except ValidationError:
        return {"statusCode": 400, "body": "malformed $connect event"}
    rt = get_runtime()
    answer = rt.run(
        on_connect(
            rt,
            connection_id=parsed.request_context.connection_id,
            query=parsed.query_string_parameters,
            authorizer=event["requestContext"].get("authorizer"),
            request_context=event["requestContext"],
        )
    )
    return answer.to_lambda()
