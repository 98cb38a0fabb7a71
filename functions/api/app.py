"""The HTTP API (FastAPI through Mangum): sessions, tokens, status, transcript, end.

Everything is in :mod:`rejoin.api`; this file only serves it. API Gateway HTTP
API events (payload format 2.0) reach the app through Mangum, without lifespan
events (Lambda has no shutdown hook to run them).
"""

from __future__ import annotations

from mangum import Mangum
from mangum.adapter import DEFAULT_TEXT_MIME_TYPES

from rejoin.api import PROBLEM_JSON, create_app
from rejoin.observability import lambda_handler

app = create_app()
# lambda_handler: fresh log ids per invocation, metrics flushed after it. Problem
# bodies are text too (Mangum would otherwise base64-encode them).
handler = lambda_handler(
    Mangum(app, lifespan="off", text_mime_types=[*DEFAULT_TEXT_MIME_TYPES, PROBLEM_JSON])
)
