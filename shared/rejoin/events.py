"""Lambda event models: Powertools' parser models, completed where they fall short."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.parser.models import (
    APIGatewayWebSocketConnectEventModel,
    APIGatewayWebSocketDisconnectEventModel,
    APIGatewayWebSocketMessageEventModel,
)
from pydantic import Field

__all__ = ["ConnectEvent", "DisconnectEvent", "MessageEvent"]


class ConnectEvent(APIGatewayWebSocketConnectEventModel):
    """``$connect``; Powertools' model leaves out the query string."""

    query_string_parameters: dict[str, str] | None = Field(None, alias="queryStringParameters")


class MessageEvent(APIGatewayWebSocketMessageEventModel):
    """A message route; the body may be absent or not JSON (checked later)."""

    body: Any = None


DisconnectEvent = APIGatewayWebSocketDisconnectEventModel
