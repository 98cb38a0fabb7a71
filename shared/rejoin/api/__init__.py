"""The HTTP API: create sessions, mint tokens, read status and transcripts, end sessions.

:func:`create_app` builds the FastAPI app that ``functions/api/app.py`` serves
through Mangum (and the local stack mounts at ``/api``). The routes are thin;
what they do to a session is in the functions they call (:func:`create_session`,
:func:`session_status`, :func:`transcript`, :func:`end_session`), over a
:class:`~rejoin.rooms.RoomStore`.

Credentials: ``Authorization: Bearer <admin key>`` (``settings.admin_key``,
compared in constant time) for the admin routes; a participant token (the JWT
a client connects with) reads the status and transcript of the one session it
grants. With no admin key configured the admin routes answer 503; they are
never open.

Request bodies are strict: exact JSON types (no ``true`` for an integer, no
``"600"`` for a number) and no unknown fields. Every error is an RFC 9457
problem (``application/problem+json``) with a stable ``code``; FastAPI's own
validation errors become 400 ``invalid_request`` problems, and unexpected
errors a 500 ``internal`` problem with nothing of the exception in it (it is
logged). The docs page and the OpenAPI schema are off unless
``REJOIN_API_DOCS`` turns them on, and then served from packaged assets.

The runtime is read per request (:func:`rejoin.runtime.get_runtime`), so tests
and the local stack install their own; its clients are per event loop.

The package's modules: :mod:`~rejoin.api.app` (the app), ``routes``,
``schemas`` (bodies), ``problems`` (errors), ``auth`` (credentials),
``sessions`` (what the routes do), ``docs`` (the docs page). This package
imports FastAPI: only the HTTP API function (whose requirements include it)
imports it.
"""

from .app import create_app
from .problems import PROBLEM_JSON, ApiProblem, Problem
from .sessions import create_session, end_session, new_session_id, session_status, transcript

__all__ = [
    "PROBLEM_JSON",
    "ApiProblem",
    "Problem",
    "create_app",
    "create_session",
    "end_session",
    "new_session_id",
    "session_status",
    "transcript",
]
