"""Every exception rejoin raises, one base class, one sub-base per feature.

Catch :class:`RejoinError` for anything rejoin raises; catch a feature's base
(:class:`StoreError`, :class:`AuthError`, :class:`FrameError`,
:class:`RoomError`, :class:`SendError`, :class:`ConfigError`,
:class:`CompactionError`) to handle one
feature's failures. Messages never contain secrets (tokens, keys): they are
safe to log and to show.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "CompactionError",
    "ConfigError",
    "ConnectionGone",
    "FrameError",
    "InvalidParticipant",
    "InvalidSessionId",
    "NotInSession",
    "NotJoined",
    "PayloadTooLarge",
    "RateLimited",
    "RejoinError",
    "RoomError",
    "SendError",
    "SenderThrottled",
    "SessionGone",
    "StoreError",
    "StoreEventLoopError",
    "StoreResponseError",
    "StoreTimeout",
    "StoreUnavailable",
    "TokenExpired",
    "TokenInvalid",
    "TokenMissing",
    "TokenRevoked",
    "TokenWrongSession",
    "TurnBusy",
]


class RejoinError(Exception):
    """Base class of every rejoin error."""


# --- the session store ------------------------------------------------------


class StoreError(RejoinError):
    """The Upstash store failed or refused an operation."""


class InvalidSessionId(StoreError, ValueError):
    """A session id is not 1-128 characters of ``A-Za-z0-9_-``."""


class StoreUnavailable(StoreError):
    """Upstash could not be reached or answered with a server error.

    A write that raised this was either applied whole or not at all (every
    write is one atomic script); retrying it is safe because writes are
    idempotent.
    """


class StoreTimeout(StoreUnavailable):
    """Upstash did not answer within the configured timeout."""


class StoreEventLoopError(StoreError):
    """A store client was used from an event loop, or a thread, it does not belong to.

    Nothing was sent. Clients built by :func:`rejoin.upstash_client` or
    :func:`rejoin.store_client` keep one connection pool per event loop and
    never raise this; a client built directly can be used on its first loop only.
    """


class StoreResponseError(StoreError):
    """Upstash (or Redis behind it) answered a request with an error."""


class SessionGone(StoreError):
    """The session was deleted or replaced by a fresh one (new epoch).

    Raised instead of writing, so nothing that happens after deletion (a late
    turn, a retried write) brings a deleted session back.
    """


# --- authentication ---------------------------------------------------------


class AuthError(RejoinError):
    """A connection could not be authenticated or authorised.

    Attributes:
        status: the HTTP status to refuse the connection with.
    """

    status = 401


class InvalidParticipant(AuthError, ValueError):
    """A user id or display name breaks its rules (see :mod:`rejoin.tokens`)."""


class TokenMissing(AuthError):
    """No token was given."""


class TokenExpired(AuthError):
    """The token's ``exp`` has passed."""


class TokenInvalid(AuthError):
    """The token is malformed, forged or lacks a required claim."""


class TokenWrongSession(AuthError):
    """The token is valid but grants another session."""

    status = 403


class TokenRevoked(AuthError):
    """The token was revoked: its session was ended, or its participant removed."""

    status = 403


# --- client frames ----------------------------------------------------------


class FrameError(RejoinError):
    """A client frame was refused.

    Attributes:
        code: a stable machine-readable code, sent to the client in the
            ``error`` event.
        client_id: the client's message id (``say``'s ``id``) when the frame
            carried a valid one, so the error can name the message it answers.
    """

    def __init__(self, code: str, message: str, *, client_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.client_id = client_id


class RateLimited(FrameError):
    """The connection or participant sent more frames than the rate limit allows."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("rate_limited", f"too many frames; retry in {retry_after:.1f} s")
        self.retry_after = retry_after


# --- rooms ------------------------------------------------------------------


class RoomError(RejoinError):
    """A room-state transition was refused."""


class NotInSession(RoomError):
    """The connection is not (or no longer) part of any live session."""


class NotJoined(RoomError):
    """The connection sent ``say`` before ``resume``."""


class TurnBusy(RoomError):
    """Another agent turn of the same session holds the turn lease."""


# --- sending to connections -------------------------------------------------


class SendError(RejoinError):
    """A frame could not be posted to a connection."""


class ConnectionGone(SendError):
    """The connection is closed (API Gateway GoneException, HTTP 410)."""


class SenderThrottled(SendError):
    """Posting was throttled (HTTP 429) and retries ran out."""


class PayloadTooLarge(SendError):
    """A frame is larger than API Gateway accepts, even when split."""


# --- configuration ----------------------------------------------------------


class ConfigError(RejoinError):
    """Configuration or a secret is missing or malformed."""


# --- compaction -------------------------------------------------------------


class CompactionError(RejoinError):
    """A history could not be compacted; it was left as it was."""
