"""Load the Lambda handlers of ``functions/`` into this process, as Lambda would.

Every function's entry point is ``functions/<name>/app.py``, so the modules
cannot be imported by name: each is loaded from its path under a unique module
name (``rejoin_fn_<name>``). ``shared/`` (the layer, ``/opt/python`` on AWS)
is put on ``sys.path`` first, and the function's own folder is on ``sys.path``
while it is imported, as Lambda's task root is.

Handlers are synchronous and run their own event loop
(:meth:`rejoin.runtime.Runtime.run`): call them from worker threads, never from
a running event loop.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "FUNCTIONS_DIR",
    "HANDLER_NAMES",
    "REPO_ROOT",
    "SHARED_DIR",
    "LocalLambdaContext",
    "available_handlers",
    "ensure_shared_on_path",
    "load_api_app",
    "load_handler",
    "load_module",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS_DIR = REPO_ROOT / "functions"
SHARED_DIR = REPO_ROOT / "shared"

HANDLER_NAMES = ("authorize", "connect", "message", "disconnect", "turn", "cleanup")

Handler = Callable[[dict[str, Any], Any], Any]

_lock = threading.RLock()
_modules: dict[str, ModuleType] = {}
_counter = itertools.count(1)


def ensure_shared_on_path() -> None:
    """Put ``shared/`` (the layer) on ``sys.path`` once."""
    shared = str(SHARED_DIR)
    if shared not in sys.path:
        sys.path.insert(0, shared)


def available_handlers(functions_dir: Path = FUNCTIONS_DIR) -> list[str]:
    """Names of the functions whose ``app.py`` exists."""
    if not functions_dir.is_dir():
        return []
    return sorted(p.parent.name for p in functions_dir.glob("*/app.py"))


def load_module(
    name: str, *, functions_dir: Path = FUNCTIONS_DIR, reload: bool = False
) -> ModuleType:
    """Import ``functions/<name>/app.py`` as ``rejoin_fn_<name>`` (cached).

    Raises:
        FileNotFoundError: the function has no ``app.py`` (yet).
    """
    path = functions_dir / name / "app.py"
    with _lock:
        if not reload and name in _modules:
            return _modules[name]
        if not path.is_file():
            raise FileNotFoundError(f"no handler at {path}")
        ensure_shared_on_path()
        module_name = f"rejoin_fn_{name.replace('-', '_')}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        task_root = str(path.parent)
        sys.path.insert(0, task_root)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        finally:
            with contextlib.suppress(ValueError):
                sys.path.remove(task_root)
        _modules[name] = module
        return module


def load_handler(name: str, *, functions_dir: Path = FUNCTIONS_DIR) -> Handler:
    """The ``handler(event, context)`` of ``functions/<name>/app.py``.

    Raises:
        FileNotFoundError: the function has no ``app.py``.
        AttributeError: the module has no callable ``handler``.
    """
    module = load_module(name, functions_dir=functions_dir)
    handler = getattr(module, "handler", None)
    if not callable(handler):
        raise AttributeError(f"functions/{name}/app.py has no callable 'handler'")
    return handler  # type: ignore[no-any-return]


def load_api_app(*, functions_dir: Path = FUNCTIONS_DIR) -> Any:
    """The HTTP API's ASGI app (``app`` of ``functions/api/app.py``)."""
    module = load_module("api", functions_dir=functions_dir)
    app = getattr(module, "app", None)
    if app is None:
        raise AttributeError("functions/api/app.py has no 'app'")
    return app


class LocalLambdaContext:
    """What Lambda passes as ``context``, enough for Powertools' ``inject_lambda_context``.

    Args:
        function_name: e.g. ``rejoin-message``.
        timeout_seconds: the function's timeout, for ``get_remaining_time_in_millis``.
        memory_mb: the configured memory.
    """

    def __init__(self, function_name: str, *, timeout_seconds: float = 30.0, memory_mb: int = 512):
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = (
            f"arn:aws:lambda:us-east-1:000000000000:function:{function_name}"
        )
        self.memory_limit_in_mb = memory_mb
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = f"local/{next(_counter)}"
        self.identity = None
        self.client_context = None
        self._deadline = time.monotonic() + timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds until the function's timeout (never negative)."""
        return max(0, int((self._deadline - time.monotonic()) * 1000))
