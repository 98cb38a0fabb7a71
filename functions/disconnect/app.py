"""``$disconnect`` (best effort: API Gateway may never send it; the cleanup covers that)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from rejoin.events import DisconnectEvent
from rejoin.observability import lambda_handler
from rejoin.routes import on_disconnect
from rejoin.runtime import get_runtime


@lambda_handler
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    try:
        parsed = DisconnectEvent.model_validate(event)
    except ValidationError:
        return {"statusCode": 400, "body": "malformed $disconnect event"}
    rt = get_runtime()
    answer = rt.run(
        on_disconnect(
            rt,
            connection_id=parsed.request_context.connection_id,
            authorizer=event["requestContext"].get("authorizer"),
            request_context=event["requestContext"],
        )
    )
    return answer.to_lambda()
