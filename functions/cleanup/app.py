"""Scheduled every minute: delete expired sessions, detect lost disconnects."""

from __future__ import annotations

from typing import Any

from rejoin.cleanup import run_cleanup
from rejoin.observability import lambda_handler
from rejoin.runtime import get_runtime


@lambda_handler
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    rt = get_runtime()
    return rt.run(run_cleanup(rt)).to_dict()
