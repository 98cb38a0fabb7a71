"""The HTTP API (FastAPI through Mangum): sessions, tokens, status, transcript, end.

Everything is in :mod:`rejoin.api`; this file only serves it. API Gateway HTTP
API events (payload format 2.0) reach the app through Mangum, without lifespan
events (Lambda has no shutdown hook to run them).
"""

from __future__ import annotations

from mangum import Mangum

from rejoin.api import create_app
from rejoin.observability import lambda_handler

app = create_app()
# lambda_handler: fresh log keys and the request id per invocation, metrics flushed.
handler = lambda_handler(Mangum(app, lifespan="off"))
