"""Structured logs and metrics (Powertools), shared by every handler.

Logs are JSON with the session, connection and user ids on every line (set
with :func:`bind`); message text and secrets are never logged at INFO.
Metrics are CloudWatch EMF, flushed by the handler's ``log_metrics``
decorator. Both names below are module singletons, as Powertools intends.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

__all__ = ["bind", "count", "lambda_handler", "logger", "metrics"]

T = TypeVar("T")

logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME", "rejoin"))
metrics = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "Rejoin"))


def bind(
    *,
    session_id: str | None = None,
    connection_id: str | None = None,
    user_id: str | None = None,
) -> None:
    """Add ids to every following log line of this invocation."""
    keys = {"session_id": session_id, "connection_id": connection_id, "user_id": user_id}
    logger.append_keys(**{k: v for k, v in keys.items() if v is not None})


def count(name: str, value: float = 1) -> None:
    """Add to a count metric (Turns, TurnFailures, Resumes, ...)."""
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def lambda_handler(fn: Callable[[Any, Any], T]) -> Callable[[Any, Any], T]:
    """Wrap a handler: fresh log keys per invocation, metrics flushed after it.

    Unlike Powertools' ``inject_lambda_context`` it accepts ``context=None``,
    which is what the local gateway and ``sam local``-style tests pass.
    """

    @functools.wraps(fn)
    def wrapper(event: Any, context: Any) -> T:
        logger.clear_state()
        request_id = getattr(context, "aws_request_id", None)
        if request_id:
            logger.append_keys(function_request_id=request_id)
        try:
            return fn(event, context)
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no metrics to publish" is fine
                metrics.flush_metrics()

    return wrapper
