"""Every message route (``say``, ``resume``, ``ping``, ``leave``, ``$default``)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from rejoin.events import MessageEvent
from rejoin.observability import lambda_handler
from rejoin.routes import on_message
from rejoin.runtime import get_runtime


@lambda_handler
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    try:
        parsed = MessageEvent.model_validate(event)
    except ValidationError:
        # Not logged or echoed: the error's text would quote the event.
        return {"statusCode": 400, "body": "malformed message event"}
    rt = get_runtime()
    answer = rt.run(
        on_message(
            rt,
            connection_id=parsed.request_context.connection_id,
            body=parsed.body,
            authorizer=event["requestContext"].get("authorizer"),
            request_context=event["requestContext"],
        )
    )
    return answer.to_lambda()
