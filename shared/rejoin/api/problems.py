"""RFC 9457 problem responses: the one shape every error of the HTTP API takes.

Every problem has a stable ``code`` (:data:`PROBLEM_TITLES`) meant for
programs, a ``detail`` safe to show, and for ``invalid_request`` the invalid
fields. :func:`install_problem_handlers` turns FastAPI's and rejoin's
exceptions into problems.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute

from ..errors import ConfigError, InvalidSessionId, SessionGone, StoreError
from ..observability import logger

__all__ = [
    "PROBLEM_JSON",
    "PROBLEM_TITLES",
    "ApiProblem",
    "FieldError",
    "Problem",
    "install_problem_handlers",
    "no_route",
    "problem_response",
    "session_not_found",
    "unauthorized",
]

PROBLEM_JSON = "application/problem+json"

# Every problem code the API answers with, and its title (stable, like the code).
PROBLEM_TITLES: dict[str, str] = {
    "invalid_request": "Invalid request",
    "invalid_session_id": "Invalid session id",
    "unauthorized": "Unauthorized",
    "forbidden": "Forbidden",
    "session_not_found": "Session not found",
    "session_ended": "Session ended meanwhile",
    "tokens_not_minted_here": "Tokens are not minted here",
    "admin_not_configured": "Admin credential not configured",
    "not_configured": "Not configured",
    "auth_unavailable": "Token keys unavailable",
    "store_unavailable": "Store unavailable",
    "not_found": "Not found",
    "method_not_allowed": "Method not allowed",
    "internal": "Internal error",
}

_WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="rejoin"'}


class FieldError(BaseModel):
    """One invalid field of a request."""

    field: str = Field(description="Where: `body.ttl_seconds`, `path.session_id`, ...")
    message: str = Field(description="What is wrong with it.")
    type: str = Field(description="A machine-readable error type (pydantic's).")


class Problem(BaseModel):
    """An RFC 9457 problem; ``code`` is stable and meant for programs."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "urn:rejoin:problem:session_not_found",
                    "title": "Session not found",
                    "status": 404,
                    "detail": "session 'standup-42' does not exist or has expired",
                    "code": "session_not_found",
                }
            ]
        }
    )

    type: str = Field(description="`urn:rejoin:problem:<code>`.")
    title: str = Field(description="A short summary of the problem type.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What went wrong with this request (safe to show).")
    code: str = Field(description="Stable machine-readable code: " + ", ".join(PROBLEM_TITLES))
    errors: list[FieldError] | None = Field(
        default=None, description="The invalid fields (`invalid_request` only)."
    )


class ApiProblem(Exception):
    """Raised by the API to answer with a problem.

    Args:
        status: the HTTP status.
        code: a code of :data:`PROBLEM_TITLES`.
        detail: what went wrong, safe to show to the caller.
        headers: extra response headers.
        errors: the invalid fields, for ``invalid_request``.
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        errors: list[FieldError] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
        self.errors = errors


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    errors: list[FieldError] | None = None,
) -> JSONResponse:
    """A problem+json response."""
    problem = Problem(
        type=f"urn:rejoin:problem:{code}",
        title=PROBLEM_TITLES.get(code, HTTPStatus(status).phrase),
        status=status,
        detail=detail,
        code=code,
        errors=errors,
    )
    return JSONResponse(
        problem.model_dump(exclude_none=True),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def unauthorized(detail: str) -> ApiProblem:
    """A 401 ``unauthorized`` problem asking for a bearer credential."""
    return ApiProblem(401, "unauthorized", detail, headers=_WWW_AUTHENTICATE)


def session_not_found(session_id: str) -> ApiProblem:
    """A 404 ``session_not_found`` problem."""
    return ApiProblem(
        404, "session_not_found", f"session {session_id!r} does not exist or has expired"
    )


def no_route(path: str) -> JSONResponse:
    """The 404 ``not_found`` answer for a path the API does not serve."""
    return problem_response(404, "not_found", f"no route {path!r}")


# --- exception handlers -----------------------------------------------------------------


def _on_api_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiProblem)
    return problem_response(
        exc.status, exc.code, exc.detail, headers=exc.headers, errors=exc.errors
    )


def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors: list[FieldError] = []
    for e in exc.errors():
        error = FieldError(
            field=".".join(str(part) for part in e.get("loc", ())),
            message=str(e.get("msg", "invalid")),
            type=str(e.get("type", "invalid")),
        )
        if error not in errors:  # a path parameter a dependency shares is checked twice
            errors.append(error)
    session_fields = {"path.session_id", "body.session_id"}
    if errors and all(e.field in session_fields for e in errors):
        code = "invalid_session_id"
    else:
        code = "invalid_request"
    first = errors[0] if errors else None
    detail = f"{first.field}: {first.message}" if first else "the request is invalid"
    return problem_response(400, code, detail, errors=errors)


def _on_invalid_session_id(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(400, "invalid_session_id", str(exc))


def _on_session_gone(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(404, "session_not_found", "the session ended or expired")


def _on_store_error(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("store failed", extra={"reason": type(exc).__name__})
    return problem_response(
        503,
        "store_unavailable",
        "the session store is unavailable; retry",
        headers={"Retry-After": "1"},
    )


def _on_config_error(request: Request, exc: Exception) -> JSONResponse:
    # ConfigError messages name what is missing, never a secret's value.
    logger.error("not configured", extra={"reason": str(exc)})
    return problem_response(503, "not_configured", str(exc))


_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
}


def _http_exception_handler(
    routes: Sequence[BaseRoute],
) -> Callable[[Request, Exception], JSONResponse]:
    def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        if status == 404:
            return no_route(request.url.path)
        code = _HTTP_CODES.get(status, "invalid_request" if status < 500 else "internal")
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
        headers = dict(exc.headers or {})
        if status == 405:
            # Starlette names the methods of the first route of the path only.
            headers["Allow"] = ", ".join(_allowed_methods(request, routes))
        return problem_response(status, code, detail, headers=headers)

    return on_http_exception


def _allowed_methods(request: Request, routes: Sequence[BaseRoute]) -> list[str]:
    # The path within the app (the local stack mounts it at /api).
    path = request.url.path.removeprefix(request.scope.get("root_path", ""))
    methods: set[str] = set()
    for route in routes:
        if isinstance(route, APIRoute) and route.path_regex.match(path):
            methods |= route.methods or set()
    return sorted(methods)


def install_problem_handlers(app: FastAPI, routes: Sequence[BaseRoute]) -> None:
    """Answer every error the app can meet with a problem.

    Args:
        app: the app.
        routes: the API's routes, to name the allowed methods in a 405's ``Allow``.
    """
    app.add_exception_handler(ApiProblem, _on_api_problem)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler(routes))
    app.add_exception_handler(InvalidSessionId, _on_invalid_session_id)
    app.add_exception_handler(SessionGone, _on_session_gone)
    app.add_exception_handler(StoreError, _on_store_error)
    app.add_exception_handler(ConfigError, _on_config_error)
