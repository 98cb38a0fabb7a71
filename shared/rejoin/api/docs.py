"""The API's documentation page, off unless the deployment turns it on.

``/docs`` (Swagger UI) and ``/openapi.json`` answer only when
``settings.api_docs`` is true (``REJOIN_API_DOCS=1``; the template's
``ApiDocs`` parameter, ``false`` by default; the local stack turns them on).
Otherwise every method on those paths gets the same 404 ``not_found`` problem
as any path the API does not serve: a deployment does not show its schema to
anyone who asks.

Where they are on, every script, style sheet and icon comes from this
function itself (``/docs/assets/...``): the Swagger UI bundle that the
``fastapi-offline`` package ships (pinned in
``functions/api/requirements.txt``), never a CDN. The page works offline, and
no third-party script runs next to the admin-key form. A Content Security
Policy (``script-src 'self'``, ``connect-src 'self'``) holds the browser to
that even if the bundle tried to load something else; Swagger UI's validator
badge (which would send the schema's URL to a third party) is switched off.
All URLs in the page are relative, so they work where the app is mounted
(the local stack serves it at ``/api``). FastAPI's ReDoc page is not offered:
ReDoc's bundle always loads its logo from Redocly's CDN.
"""

from __future__ import annotations

import copy
import functools
import html
import importlib.util
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.responses import JSONResponse, Response

from ..config import Settings
from ..errors import ConfigError
from ..runtime import get_runtime
from .problems import problem_response

__all__ = ["ASSETS_PACKAGE", "DOCS_PATHS", "DocsMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The PyPI package whose static files are the docs' assets.
ASSETS_PACKAGE = "fastapi_offline"
ASSET_PREFIX = "/docs/assets/"
DOCS_PATHS = ("/docs", "/openapi.json")

_CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
}
# Packaged files served as they are (name: file in the package's static/).
_PACKAGED = {
    "swagger-ui-bundle.js": "swagger-ui-bundle.js",
    "swagger-ui.css": "swagger-ui.css",
    "favicon.png": "favicon.png",
}

# Swagger UI's start-up, as a file rather than an inline script, so the page's
# policy can forbid inline scripts. validatorUrl null: no badge fetched from
# validator.swagger.io. persistAuthorization stays off: the admin key typed
# into "Authorize" is not kept in localStorage.
_SWAGGER_INIT = """\
window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-openapi-url"),
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    validatorUrl: null,
    persistAuthorization: false,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  });
});
"""
_GENERATED = {"swagger-init.js": _SWAGGER_INIT.encode()}

# The page: only this origin's scripts (no inline ones), styles may be inline
# (Swagger UI sets styles at run time), images and fonts from here or data:
# URLs, requests to this origin only.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": _PAGE_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# Assets are the pinned package's files: cacheable for a day.
_ASSET_HEADERS = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}


def _swagger_page(title: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} - Swagger UI</title>
<link rel="icon" type="image/png" href="docs/assets/favicon.png">
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui" data-openapi-url="openapi.json"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script src="docs/assets/swagger-init.js"></script>
</body>
</html>
"""


def _served_schema(app: FastAPI, settings: Settings, root: str) -> dict[str, Any]:
    """The app's schema as this deployment serves it (a copy: the app's is shared)."""
    schema = copy.deepcopy(app.openapi())
    if root:  # "Try it out" must call the app where it is mounted
        schema["servers"] = [{"url": root}]
    # The token lifetime's bound is the deployment's setting, not the default.
    ttl = schema["components"]["schemas"]["TokenRequest"]["properties"]["ttl_seconds"]
    ttl["maximum"] = settings.token_max_ttl_seconds
    return schema


@functools.cache
def _assets_dir() -> Path:
    # find_spec locates the package without importing it (its module pulls in
    # StaticFiles, which this function does not need).
    spec = importlib.util.find_spec(ASSETS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the API docs are on (REJOIN_API_DOCS) but their assets are not installed: "
            f"add {ASSETS_PACKAGE.replace('_', '-')} to functions/api/requirements.txt"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def _asset(name: str) -> bytes | None:
    if name in _GENERATED:
        return _GENERATED[name]
    file = _PACKAGED.get(name)
    # Known names only reach the cache: any other path must not grow it.
    return None if file is None else _packaged(file)


@functools.cache
def _packaged(file: str) -> bytes:
    path = _assets_dir() / file
    if not path.is_file():
        raise ConfigError(f"the API docs asset {file!r} is missing from {ASSETS_PACKAGE}")
    return path.read_bytes()


class DocsMiddleware:
    """Serves the docs page, the schema and their assets when the settings say so.

    Only ``GET`` and ``HEAD`` of the docs paths are answered here; everything
    else (and everything while the docs are off) goes on to the app, which
    has no such routes and answers 404.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        root = scope.get("root_path", "")
        path: str = scope["path"]
        if root and path.startswith(root):
            path = path[len(root) :]  # the path within the app (mounted at /api locally)
        if path not in DOCS_PATHS and not path.startswith(ASSET_PREFIX):
            await self.app(scope, receive, send)
            return
        try:
            settings = get_runtime().settings
            response = _answer(scope["app"], settings, path, root) if settings.api_docs else None
        except ConfigError as exc:
            response = problem_response(503, "not_configured", str(exc))
        if response is None:
            await self.app(scope, receive, send)  # off, or no such asset: the app's 404
            return
        await response(scope, receive, send)


def _answer(app: FastAPI, settings: Settings, path: str, root: str) -> Response | None:
    if path == "/docs":
        return Response(_swagger_page(app.title), media_type="text/html", headers=_PAGE_HEADERS)
    if path == "/openapi.json":
        return JSONResponse(
            _served_schema(app, settings, root), headers={"X-Content-Type-Options": "nosniff"}
        )
    name = path.removeprefix(ASSET_PREFIX)
    body = _asset(name)
    if body is None:
        return None
    return Response(body, media_type=_CONTENT_TYPES[Path(name).suffix], headers=_ASSET_HEADERS)
