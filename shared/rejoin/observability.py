"""Structured logs and metrics (Powertools), shared by every handler.

Logs are JSON (Powertools Logger) with ``service`` on every line, and the
session, connection and user ids on every line of an invocation once
:func:`bind` has seen them. Message text and secrets are never logged at INFO:
log ids, counts and outcomes, never what people said or a token.

Metrics are CloudWatch EMF counts (:data:`METRICS` lists every name), flushed
by :func:`lambda_handler` after each invocation, as are the flush hooks that
other modules register (the OTLP trace exporter, :mod:`rejoin.tracing`).

This module imports only Powertools: every handler loads it, so it must stay
cheap (no Agents SDK, no boto3).
"""

from __future__ import annotations

import functools
import logging
import os
import traceback
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TypeVar

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

__all__ = [
    "BOUND_KEYS",
    "METRICS",
    "SERVICE",
    "bind",
    "bound",
    "count",
    "lambda_handler",
    "log_failure",
    "logger",
    "metrics",
    "register_flush",
    "unbind",
]

T = TypeVar("T")

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME") or "rejoin"

# Every metric rejoin emits (unit: Count), with what one count means.
# docs/observability.md lists the same; tests check that both agree with the code.
METRICS: dict[str, str] = {
    "Connects": "a $connect accepted (token valid for the session)",
    "RefusedConnects": "a $connect refused: missing, expired, forged, revoked or "
    "wrong-session token",
    "Joins": "an accepted $connect into an existing session (same epoch, history kept): "
    "a second participant, another tab, or a return",
    "Resumes": "an accepted $connect that brought a session back from its grace period",
    "RecoveredReplays": "a resume frame answered with exactly the events the client missed",
    "Messages": "a say frame accepted (stored, broadcast, and queued for a turn if it asks one)",
    "RateLimitedFrames": "a frame (of any kind) refused by the per-connection or "
    "per-participant rate limit",
    "TurnsNotQueued": "a say stored and broadcast whose agent turn could not be queued "
    "(the client is told; resending the same say queues it)",
    "Turns": "an agent turn committed (reply stored and broadcast)",
    "TurnsStopped": "an agent turn stopped by a participant (partial answer kept)",
    "StopRequests": "a stop frame accepted",
    "Compactions": "a long history's older part replaced by a summary (after a turn)",
    "TurnFailures": "an agent turn that failed; it wrote nothing (SQS retries it)",
    "TurnsDropped": "a turn discarded because its session was gone (expired or replaced)",
    "TurnsBusy": "a turn delivered while another turn of its session held the lease "
    "(SQS redelivers it later)",
    "GoneConnections": "a connection found dead (410 on post, or a lost $disconnect "
    "detected by the cleanup) and treated as disconnected",
    "Expirations": "a session deleted by the cleanup after its grace period",
    "SessionsCreatedByApi": "a session created through the HTTP API",
    "SessionsEndedByApi": "a session ended at once through the HTTP API",
    "ParticipantsRemovedByApi": "a participant removed through the HTTP API",
    "TokensMinted": "a participant token minted by the HTTP API",
}

# The ids bind() knows; each is a top-level key of every JSON log line.
BOUND_KEYS = ("session_id", "connection_id", "user_id")

logger = Logger(service=SERVICE)
metrics = Metrics(
    namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE") or "Rejoin", service=SERVICE
)

# The ids of the current invocation: a dict in a context variable. The handler
# wrapper puts a fresh dict in place at the start of each invocation, and the
# asyncio tasks it runs share that same dict (a task copies the context, not
# the dict), so an id bound deep inside a coroutine labels every later line of
# the invocation, including the wrapper's own. Threads and concurrent requests
# (the local gateway runs handlers on several threads at once; an ASGI server
# runs each request in its own task) each get their own dict once they call
# unbind(), so one invocation's ids never label another's lines.
_bound: ContextVar[dict[str, Any] | None] = ContextVar("rejoin_log_ids", default=None)
_flush_hooks: list[Callable[[], None]] = []
_cold_start = True


def _ids() -> dict[str, Any]:
    ids = _bound.get()
    if ids is None:
        ids = {}
        _bound.set(ids)
    return ids


class _BoundIds(logging.Filter):
    """Adds the invocation's bound ids to every record the Powertools handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_bound.get() or {}).items():
            if not hasattr(record, key):  # an explicit ``extra=`` wins
                setattr(record, key, value)
        return True


if not any(isinstance(f, _BoundIds) for f in logger.registered_handler.filters):
    logger.registered_handler.addFilter(_BoundIds())


def bind(
    *,
    session_id: str | None = None,
    connection_id: str | None = None,
    user_id: str | None = None,
) -> None:
    """Add ids to every following log line of this invocation."""
    ids = _ids()
    for key, value in (
        ("session_id", session_id),
        ("connection_id", connection_id),
        ("user_id", user_id),
    ):
        if value is not None:
            ids[key] = value


def bound() -> dict[str, Any]:
    """The ids bound in this invocation (a copy)."""
    return dict(_ids())


def unbind() -> None:
    """Start a fresh set of ids for this invocation (or request), in this context.

    :func:`lambda_handler` does it before every invocation; an ASGI
    middleware does it per request.
    """
    _bound.set({})


def count(name: str, value: float = 1) -> None:
    """Add to a count metric; ``name`` is one of :data:`METRICS`."""
    if name not in METRICS:
        logger.warning("unknown metric name", extra={"metric": name})
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def register_flush(hook: Callable[[], None]) -> None:
    """Run ``hook`` after every invocation, before the handler returns.

    Lambda freezes the container once the handler returns, so anything
    buffered in the background (trace spans) must be sent by then. A hook
    that raises is logged and ignored. Registering the same hook twice keeps
    one.
    """
    if hook not in _flush_hooks:
        _flush_hooks.append(hook)


def _flush() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no metrics to publish" is fine
        try:
            metrics.flush_metrics()
        except Exception as exc:
            logger.warning("metrics flush failed", extra={"error": type(exc).__name__})
    for hook in list(_flush_hooks):
        try:
            hook()
        except Exception as exc:
            logger.warning("flush hook failed", extra={"error": type(exc).__name__})


def lambda_handler(fn: Callable[[Any, Any], T]) -> Callable[[Any, Any], T]:
    """Wrap a handler: fresh log keys per invocation, metrics and hooks flushed after it.

    Every line carries ``function_request_id``, ``function_name`` and
    ``cold_start`` when Lambda passes a context. Unlike Powertools'
    ``inject_lambda_context`` it accepts ``context=None``, which is what the
    local gateway and ``sam local``-style tests pass. An exception escaping
    the handler is logged (with the bound ids) and re-raised.
    """

    @functools.wraps(fn)
    def wrapper(event: Any, context: Any) -> T:
        global _cold_start
        logger.clear_state()
        unbind()
        cold_start, _cold_start = _cold_start, False
        request_id = getattr(context, "aws_request_id", None)
        if request_id:
            # With the ids, not in the logger's process-wide keys: per invocation.
            invocation: dict[str, Any] = {
                "function_request_id": request_id,
                "function_name": getattr(context, "function_name", None),
                "cold_start": cold_start,
            }
            _ids().update({k: v for k, v in invocation.items() if v is not None})
        try:
            return fn(event, context)
        except Exception as exc:
            log_failure("handler failed", exc)
            raise
        finally:
            _flush()

    return wrapper


def log_failure(message: str, exc: BaseException, **extra: Any) -> None:
    """Log a failure by its type and place, not ``str(exc)``, which may quote input."""
    logger.error(
        message,
        extra={"error": type(exc).__name__, "where": _where(exc), **extra},
        exc_info=_level_debug(),
    )


def _where(exc: BaseException) -> str | None:
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None


def _level_debug() -> bool:
    # The traceback (which can quote data) only when debugging; Lambda's own
    # error report still carries it.
    return logger.log_level <= logging.DEBUG
