"""The HTTP API's FastAPI app: routes, problem handlers, per-request scope, docs.

:func:`create_app` is what ``functions/api/app.py`` serves through Mangum
(and the local stack mounts at ``/api``).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ..observability import logger, unbind
from .docs import ASGIApp, DocsMiddleware, Message, Receive, Scope, Send
from .problems import PROBLEM_JSON, install_problem_handlers, problem_response
from .routes import router

__all__ = ["API_VERSION", "create_app"]

API_VERSION = "0.1.0"

_DESCRIPTION = """
Sessions of rejoin: create one before anyone joins, mint participant tokens, read a
session's status and transcript, end it now.

**Credentials** (`Authorization: Bearer ...`):

* the **admin key** (Secrets Manager, named by `REJOIN_ADMIN_SECRET_NAME`;
  `REJOIN_ADMIN_KEY` locally) for every route, compared in constant time. With no
  admin key configured the admin routes answer 503 `admin_not_configured`.
* a **participant token** (the JWT a client connects with) reads the status and the
  transcript of the one session it grants; another session's token gets 403.

**Errors** are RFC 9457 problems (`application/problem+json`) with a stable `code`.

**These docs** are served only where the deployment turns them on (`ApiDocs=true`,
`REJOIN_API_DOCS=1`), from files packaged with the function (no CDN).
""".strip()


# Innermost frames logged for an unexpected error (file, line, function; no values).
_STACK_FRAMES = 8


class _RequestScope:
    """Per request: fresh log ids, ``no-store`` caching, a problem for a crash.

    An unexpected exception becomes a 500 ``internal`` problem and is not
    re-raised (Mangum and uvicorn would log it again). It is logged with its
    type and stack frames, not its message: a message can quote its input.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        unbind()
        started = False

        async def send_no_store(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"cache-control" for k, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_no_store)
        except Exception as exc:
            logger.error(
                "unexpected error",
                extra={
                    "error": type(exc).__name__,
                    "path": scope.get("path"),
                    "stack": [
                        f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"
                        for frame in traceback.extract_tb(exc.__traceback__)[-_STACK_FRAMES:]
                    ],
                },
            )
            if started:
                raise  # the answer is on its way: nothing else can be sent
            response = problem_response(
                500, "internal", "an unexpected error occurred; it was logged"
            )
            await response(scope, receive, send_no_store)


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        # Errors are problem+json, and FastAPI's 422 never happens (it is a 400 here).
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                responses.pop("422", None)
                for status, answer in responses.items():
                    content = answer.get("content", {})
                    if int(status) >= 400 and "application/json" in content:
                        content[PROBLEM_JSON] = content.pop("application/json")
        components = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    return build


def create_app() -> FastAPI:
    """Build the HTTP API's FastAPI app.

    Serve it with Mangum on Lambda (``lifespan="off"``) or mount it (the local
    stack mounts it at ``/api``). The runtime is read per request.
    """
    app = FastAPI(
        title="rejoin HTTP API",
        version=API_VERSION,
        description=_DESCRIPTION,
        openapi_tags=[
            {"name": "health", "description": "Liveness and readiness."},
            {"name": "sessions", "description": "Create, inspect and end sessions."},
            {"name": "tokens", "description": "Participant tokens for the WebSocket."},
        ],
        redirect_slashes=False,
        # FastAPI's own /docs, /redoc and /openapi.json are always on and load
        # their scripts from a CDN: DocsMiddleware serves /docs and /openapi.json
        # instead (off by default).
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.include_router(router)
    install_problem_handlers(app, router.routes)
    # The last added is the outermost: the request scope wraps the docs too.
    app.add_middleware(DocsMiddleware)
    app.add_middleware(_RequestScope)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app
