"""The whole rejoin stack in one process: ``python -m rejoin_local`` (``make dev``).

What runs:

- the Upstash-compatible REST endpoint (``rejoin_local.upstash_rest``) on
  port 8079, over an embedded store, or over a real Redis when ``REDIS_URL``
  is set, in a child process of its own (as Upstash is another machine on
  AWS, its work does not share this interpreter's GIL; see
  ``rejoin_local.upstash_process``: stopped with the stack, never orphaned),
  or in this process with ``--upstash-in-process``;
- on port 8080: the WebSocket gateway (``/ws``, API Gateway's semantics,
  calling the real ``functions/connect|message|disconnect`` handlers), its
  management API (``/@connections/{id}``), the HTTP API (``functions/api``
  mounted at ``/api``) and the chat page (``/``, ``/join?session=..``);
- the turn worker: an in-process per-session FIFO queue in front of the real
  ``functions/turn`` handler, one batch at a time per session, failed turns
  retried with a short backoff (3 attempts, then dead-lettered in the log);
- the cleanup (``functions/cleanup``) every 60 s.

With no ``OPENAI_API_KEY`` the turn handler uses the offline stand-in model;
the page and the startup log say so.

Safety (who can do what)
------------------------

Three local secrets: the token-signing key (``REJOIN_TOKEN_SECRET``), the
local admin key (``REJOIN_ADMIN_KEY``) and the Upstash endpoint's token
(``REJOIN_LOCAL_UPSTASH_TOKEN``). Their defaults are documented, so they
protect nothing by themselves; what protects the stack by default is where it
listens:

- It binds 127.0.0.1 (and the Upstash endpoint too) unless ``--host`` (or
  ``REJOIN_HOST``) says otherwise. Then it prints a warning, and every secret
  still at its documented default is replaced by a random one for this run
  (the banner shows the ones a user on this machine needs): an attacker on the
  same network who knows the defaults gets nothing from them.
- ``POST /local/token`` (the page's token minting) and the management API
  (``/@connections/{id}``) require a credential: the admin key as
  ``Authorization: Bearer <key>``; the management API also takes an AWS
  Signature V4 made with the admin key as the secret access key (what boto3
  sends when a function runs under ``sam local invoke``), as API Gateway
  takes IAM. Without it: 401/403, nothing minted or posted.
- One click for the page: the banner prints the page's URL with the admin
  key in the URL fragment (``/#key=...``). A fragment never leaves the
  browser (not in requests, logs or ``Referer``); the page moves it into
  ``localStorage`` and removes it from the address bar.
- Invite links (``/join?session=S#invite=...``) carry an invite: an HMAC of
  the session id and an expiry made with the admin key. It lets its holder
  mint tokens for that one session only, never another, and never choose a
  user id: the id is derived from a secret the holder's browser keeps
  (``u-<name>-<HMAC of session, name and secret>``), so the same person in the
  same browser is the same participant in every tab and after reloads, and
  nobody can take over another participant's id by knowing it.
- Loopback only: requests whose ``Host`` is not a loopback name are refused
  (403), so a web page that rebinds its DNS name to 127.0.0.1 cannot use the
  stack. Always: a WebSocket handshake whose ``Origin`` is another site is
  refused (403), so a web page cannot open sockets on the user's behalf
  (browsers send ``Origin``; other clients do not, and are unaffected).
- The WebSocket itself needs a participant token, as on AWS; the gateway
  answers handshakes over 8 KB with 431 and deeply nested frames with the
  handlers' ``bad_json``, never hanging.

What an attacker on the same network can do when the stack listens there:
load the page's static files, and try handshakes (refused without a token
signed by the per-run key). With a leaked invite link: join that one session
under a name of their choosing (a new participant id, shown as such), no more.

Environment (each also a command-line option, see ``--help``):
``REJOIN_HOST``, ``REJOIN_PORT`` (8080), ``REJOIN_UPSTASH_PORT`` (8079),
``REDIS_URL``, ``REJOIN_UPSTASH_IN_PROCESS`` (``1``: the endpoint in this
process), ``REJOIN_GRACE_SECONDS`` (120),
``REJOIN_CLEANUP_INTERVAL_SECONDS`` (60), ``REJOIN_IDLE_TIMEOUT_SECONDS``
(600), ``REJOIN_MAX_CONNECTION_SECONDS`` (7200), ``REJOIN_TOKEN_SECRET``,
``REJOIN_ADMIN_KEY``, ``REJOIN_LOCAL_UPSTASH_TOKEN``, ``OPENAI_API_KEY``,
``OPENAI_BASE_URL``, ``REJOIN_MODEL``, and every other ``REJOIN_*`` setting
the handlers read.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import secrets
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from .handlers import LocalLambdaContext, ensure_shared_on_path, load_api_app, load_handler

ensure_shared_on_path()

from rejoin.config import Settings  # noqa: E402
from rejoin.errors import InvalidSessionId, RejoinError, StoreError  # noqa: E402
from rejoin.queue import InMemoryTurnQueue, TurnRequest, sqs_event  # noqa: E402
from rejoin.runtime import Runtime, set_runtime  # noqa: E402
from rejoin.sender import InMemorySender  # noqa: E402

from .gateway import (  # noqa: E402
    Gateway,
    GatewayConfig,
    RunningServer,
    bind,
    client_address,
    uvicorn_config,
)
from .gateway import serve as serve_gateway  # noqa: E402

__all__ = [
    "DEFAULT_ADMIN_KEY",
    "DEFAULT_SIGNING_KEY",
    "DEFAULT_UPSTASH_TOKEN",
    "INVITE_TTL",
    "LocalSender",
    "Stack",
    "StackConfig",
    "StackUrls",
    "TurnWorker",
    "main",
]

log = logging.getLogger("rejoin_local.stack")
turn_log = logging.getLogger("rejoin_local.turns")
cleanup_log = logging.getLogger("rejoin_local.cleanup")

DEFAULT_SIGNING_KEY = "local-dev-signing-key-change-me-0123456789"
"""The local token-signing key (never use it anywhere but this machine)."""
DEFAULT_UPSTASH_TOKEN = "local-dev-token"
"""The local Upstash endpoint's bearer token."""
DEFAULT_ADMIN_KEY = "local-dev-admin-key"
"""The HTTP API's admin credential in the local stack, unless REJOIN_ADMIN_KEY is set."""
LOCAL_TOKEN_TTL = 12 * 3600
INVITE_TTL = 24 * 3600
"""How long an invite link (``/join?session=..#invite=..``) can mint tokens."""
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
DEFAULT_WS_URL = "ws://127.0.0.1:8080/ws"
"""The terminal client's default URL (``make dev`` with no options)."""

STATIC_DIR = Path(__file__).resolve().parent / "static"


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a number, not {raw!r}") from None
    if value <= 0:
        raise SystemExit(f"{name} must be positive")
    return value


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, not {raw!r}") from None


@dataclass
class StackConfig:
    """How the stack runs.

    Attributes:
        host: the interface both servers bind.
        port: the gateway + page + HTTP API port (0: a free one).
        upstash_port: the Upstash-compatible endpoint's port (0: a free one).
        redis_url: a real Redis behind the endpoint; None: the embedded store.
        upstash_url: use this running Upstash-compatible endpoint instead of
            starting one (tests pass the session's endpoint).
        upstash_token: the endpoint's bearer token.
        upstash_in_process: serve the endpoint in this process (a thread)
            instead of a child process of its own.
        signing_key: the HS256 token-signing key.
        admin_key: the local admin key: the HTTP API's admin credential, and
            what ``/local/token`` and ``@connections`` require.
        grace_seconds: the reconnect grace; None: ``REJOIN_GRACE_SECONDS`` or 120.
        cleanup_interval: seconds between cleanup runs.
        idle_timeout: the gateway's idle timeout, seconds.
        max_duration: the gateway's longest connection, seconds.
        turn_attempts: tries per turn before it is dead-lettered.
        turn_backoff: seconds before the first retry of a failed turn (doubles).
        ws_handler_threads: threads for the WebSocket routes' handlers
            (``$connect``, messages, ``$disconnect``); turns and the cleanup
            have their own pool.
        env: the environment the handlers' settings are read from.
        local_tokens: serve ``POST /local/token`` (the page's own minting).
    """

    host: str = "127.0.0.1"
    port: int = 8080
    upstash_port: int = 8079
    redis_url: str | None = None
    upstash_url: str | None = None
    upstash_token: str = DEFAULT_UPSTASH_TOKEN
    upstash_in_process: bool = False
    signing_key: str = DEFAULT_SIGNING_KEY
    admin_key: str = DEFAULT_ADMIN_KEY
    grace_seconds: int | None = None
    cleanup_interval: float = 60.0
    idle_timeout: float = 600.0
    max_duration: float = 7200.0
    turn_attempts: int = 3
    turn_backoff: float = 0.5
    ws_handler_threads: int = 8
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    local_tokens: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StackConfig:
        """Read the configuration from the environment (see the module doc)."""
        env = dict(os.environ if env is None else env)
        return cls(
            host=env.get("REJOIN_HOST", "127.0.0.1"),
            port=_env_int(env, "REJOIN_PORT", 8080),
            upstash_port=_env_int(env, "REJOIN_UPSTASH_PORT", 8079),
            redis_url=env.get("REDIS_URL") or None,
            upstash_token=env.get("REJOIN_LOCAL_UPSTASH_TOKEN") or DEFAULT_UPSTASH_TOKEN,
            upstash_in_process=env.get("REJOIN_UPSTASH_IN_PROCESS", "") in ("1", "true", "yes"),
            signing_key=env.get("REJOIN_TOKEN_SECRET") or DEFAULT_SIGNING_KEY,
            admin_key=env.get("REJOIN_ADMIN_KEY") or DEFAULT_ADMIN_KEY,
            grace_seconds=None,  # the handlers' settings read REJOIN_GRACE_SECONDS
            cleanup_interval=_env_float(env, "REJOIN_CLEANUP_INTERVAL_SECONDS", 60.0),
            idle_timeout=_env_float(env, "REJOIN_IDLE_TIMEOUT_SECONDS", 600.0),
            max_duration=_env_float(env, "REJOIN_MAX_CONNECTION_SECONDS", 7200.0),
            env=env,
        )

    def settings(self, upstash_url: str) -> Settings:
        """The handlers' settings: the environment, pointed at the local services."""
        env = dict(self.env)
        for name in (
            "REJOIN_UPSTASH_SECRET",
            "REJOIN_TOKEN_SECRET_NAME",
            "REJOIN_OPENAI_SECRET_NAME",
            "REJOIN_ADMIN_SECRET_NAME",
        ):
            if env.pop(name, None):
                log.warning("%s is ignored by the local stack (no Secrets Manager here)", name)
        env["UPSTASH_REDIS_REST_URL"] = upstash_url
        env["UPSTASH_REDIS_REST_TOKEN"] = self.upstash_token
        env["REJOIN_TOKEN_SECRET"] = self.signing_key
        env["REJOIN_ADMIN_KEY"] = self.admin_key
        # The API docs (/api/docs) are on locally; deployments keep them off by default.
        env.setdefault("REJOIN_API_DOCS", "1")
        if self.grace_seconds is not None:
            env["REJOIN_GRACE_SECONDS"] = str(self.grace_seconds)
        env["REJOIN_IDLE_TIMEOUT_SECONDS"] = str(max(1, math.ceil(self.idle_timeout)))
        # The gateway and the queue are injected: no AWS endpoints.
        env.pop("REJOIN_TURN_QUEUE_URL", None)
        env.pop("REJOIN_WS_ENDPOINT", None)
        return Settings.from_env(env)

    @property
    def loopback(self) -> bool:
        """Whether the stack listens on this machine only."""
        return _is_loopback(self.host)

    def hardened(self) -> tuple[StackConfig, list[str]]:
        """This configuration, safe to expose: documented default secrets made random.

        On loopback nothing changes. Elsewhere each secret still at its
        documented default gets a random value for this run.

        Returns:
            The configuration to run, and the environment names of the
            secrets that were generated.
        """
        if self.loopback:
            return self, []
        changes: dict[str, Any] = {}
        generated: list[str] = []
        for attr, default, name in (
            ("signing_key", DEFAULT_SIGNING_KEY, "REJOIN_TOKEN_SECRET"),
            ("admin_key", DEFAULT_ADMIN_KEY, "REJOIN_ADMIN_KEY"),
            ("upstash_token", DEFAULT_UPSTASH_TOKEN, "REJOIN_LOCAL_UPSTASH_TOKEN"),
        ):
            if getattr(self, attr) == default and not self.env.get(name):
                changes[attr] = secrets.token_urlsafe(32)
                generated.append(name)
        return replace(self, **changes), generated


def _is_loopback(host: str) -> bool:
    if host.strip("[]") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class StackUrls:
    """Where a running stack answers.

    Attributes:
        http: the page, HTTP API and management API base, ``http://host:port``.
        ws: the WebSocket URL, ``ws://host:port/ws``.
        upstash: the Upstash-compatible endpoint.
    """

    http: str
    ws: str
    upstash: str

    @property
    def api(self) -> str:
        """The HTTP API's base URL."""
        return f"{self.http}/api"

    def page(self, key: str) -> str:
        """The chat page, with the local admin key in the fragment (it never leaves the browser)."""
        return f"{self.http}/#key={key}"

    def join(
        self,
        session: str,
        name: str | None = None,
        *,
        invite: str | None = None,
        key: str | None = None,
    ) -> str:
        """A link that joins ``session`` (the page asks for a name when none is given).

        Args:
            session: the session id.
            name: the display name to join as.
            invite: an invite for this session (what a second person gets).
            key: the local admin key (only for the person running the stack).
        """
        from urllib.parse import urlencode

        query = {"session": session} | ({"name": name} if name else {})
        fragment = f"#invite={invite}" if invite else f"#key={key}" if key else ""
        return f"{self.http}/join?{urlencode(query)}{fragment}"


# ---------------------------------------------------------------------------
# Sender and turn worker
# ---------------------------------------------------------------------------


class LocalSender(InMemorySender):
    """The in-memory sender, wired to the gateway's real sockets.

    Frames are delivered by the gateway (``on_deliver``); ``close``
    (DeleteConnection, e.g. when a session is ended) also closes the socket.
    """

    def __init__(self) -> None:
        # Delivered frames go to the sockets; keeping copies would only grow.
        super().__init__(record=False)
        self.gateway: Gateway | None = None

    def attach(self, gateway: Gateway) -> None:
        """Deliver through ``gateway`` from now on."""
        self.gateway = gateway
        self.on_deliver = gateway.post  # queues the frame and returns: no future per frame

    async def close(self, connection_id: str) -> None:
        """DeleteConnection: forget it here and close its socket (``$disconnect`` runs)."""
        await super().close(connection_id)
        gateway = self.gateway
        if gateway is None or gateway.loop is None:
            return
        future = gateway.close_connection(connection_id, 1000, "")
        if isinstance(future, asyncio.Future):
            return  # on the gateway's own loop: it runs on its own
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(future)


class TurnWorker:
    """Runs the turn handler for queued turns: per session in order, one batch at a time.

    Like an SQS FIFO event source: a session's turns are taken in batches of
    up to 10 and handed to the handler as an SQS event; records it reports
    in ``batchItemFailures`` (or the whole batch, if it raises) go back to the
    front of that session's line and are retried with a growing backoff,
    before any later turn; after ``max_attempts`` tries they are logged as
    dead-lettered and dropped. Different sessions run in parallel.

    Args:
        queue: the in-memory queue the message handler fills.
        invoke: runs the turn handler in a worker thread: ``invoke(event)``.
        max_attempts: tries per turn.
        backoff: seconds before the first retry; doubled for each further one.
    """

    def __init__(
        self,
        queue: InMemoryTurnQueue,
        invoke: Callable[[dict[str, Any]], Any],
        *,
        max_attempts: int = 3,
        backoff: float = 0.5,
        batch_size: int = 10,
    ) -> None:
        self.queue = queue
        self._invoke = invoke
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.batch_size = batch_size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self.dead_letters: list[TurnRequest] = []
        self.processed = 0

    def notify(self, turn: TurnRequest) -> None:
        """``on_enqueue`` hook: called from a handler thread after a turn is queued."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._kick, turn.session_id)

    def start(self) -> None:
        """Start on the running loop; turns queued before now are picked up."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        for session_id in self.queue.sessions():
            self._kick(session_id)

    def _kick(self, session_id: str) -> None:
        if self._stopping or session_id in self._tasks:
            return  # the session's drain loop takes the new turn after its batch
        task = asyncio.get_running_loop().create_task(
            self._drain(session_id), name=f"rejoin-turns-{session_id}"
        )
        self._tasks[session_id] = task

    async def _drain(self, session_id: str) -> None:
        try:
            while not self._stopping:
                batch = self.queue.take(session_id, self.batch_size)
                if not batch:
                    break
                await self._run_batch(session_id, batch)
        finally:
            # No await between the last take() and this: a turn queued now
            # finds no task and starts a new one.
            self._tasks.pop(session_id, None)

    async def _run_batch(self, session_id: str, batch: list[TurnRequest]) -> None:
        remaining = batch
        attempt = 1
        while remaining:
            event = sqs_event(remaining, receive_count=attempt)
            by_id = {
                rec["messageId"]: t for rec, t in zip(event["Records"], remaining, strict=True)
            }
            turns = ",".join(t.turn_id for t in remaining)
            turn_log.info("turn start session=%s turns=%s attempt=%d", session_id, turns, attempt)
            started = time.monotonic()
            try:
                result = await self._invoke(event)
                failures = (result or {}).get("batchItemFailures") or []
                failed_ids = {f.get("itemIdentifier") for f in failures}
                failed = [t for mid, t in by_id.items() if mid in failed_ids]
            except asyncio.CancelledError:
                raise
            except Exception:
                turn_log.exception("turn handler raised (session=%s)", session_id)
                failed = list(remaining)
            elapsed = time.monotonic() - started
            done = len(remaining) - len(failed)
            self.processed += done
            turn_log.info(
                "turn end session=%s ok=%d failed=%d (%.2f s)",
                session_id,
                done,
                len(failed),
                elapsed,
            )
            if not failed:
                return
            if attempt >= self.max_attempts:
                for turn in failed:
                    self.dead_letters.append(turn)
                    turn_log.error(
                        "turn dead-lettered session=%s turn=%s after %d attempts",
                        session_id,
                        turn.turn_id,
                        attempt,
                    )
                return
            # Back at the front of the session's line: retried before later turns.
            remaining = failed
            delay = self.backoff * 2 ** (attempt - 1)
            attempt += 1
            await asyncio.sleep(delay)

    async def stop(self, drain_seconds: float = 10.0) -> None:
        """Let running batches finish (up to ``drain_seconds``), then cancel; report leftovers."""
        self._stopping = True
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=drain_seconds)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        left = self.queue.pending()
        if left:
            turn_log.warning("%d queued turn(s) not run (the stack stopped)", len(left))


def scheduled_event(now: float | None = None) -> dict[str, Any]:
    """An EventBridge scheduled event, as the cleanup's schedule sends it."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:000000000000:rule/rejoin-local-cleanup"],
        "detail": {},
    }


# ---------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------

_USER_SLUG = re.compile(r"[^a-z0-9]+")
_SECRET = re.compile(r"[A-Za-z0-9_-]{16,128}")


class LocalGuard:
    """ASGI middleware: the Host and Origin checks of the module doc.

    Args:
        app: the stack's app.
        loopback_only: refuse requests whose ``Host`` is not a loopback name.
    """

    def __init__(self, app: ASGIApp, *, loopback_only: bool) -> None:
        self.app = app
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        why = None
        if self.loopback_only and _host_name(host) not in LOOPBACK_NAMES:
            why = f"this stack answers only to 127.0.0.1 or localhost, not {host!r}"
        elif scope["type"] == "websocket" and "origin" in headers:
            origin = headers["origin"]
            if origin.partition("://")[2].rstrip("/") != host:
                why = f"WebSocket from another site ({origin}) refused"
        if why is None:
            await self.app(scope, receive, send)
            return
        log.warning("refused %s %s: %s", scope["type"], scope.get("path"), why)
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.http.response.start", "status": 403, "headers": []})
            await send({"type": "websocket.http.response.body", "body": why.encode()})
            return
        response = Response(why + "\n", status_code=403, media_type="text/plain")
        await response(scope, receive, send)


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Stack:
    """Everything of :mod:`rejoin_local` wired together.

    Use :meth:`serve_in_thread` (tests) or :meth:`run` (the command line).
    """

    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        # Turns (seconds of model calls each) and the cleanup: many at once.
        self.executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="rejoin-handler")
        # The WebSocket routes' handlers: short (one store request each), so a
        # few threads keep up; more only contend for the GIL with the gateway's
        # loop (bench/README.md, "Local stack under load").
        self.ws_executor = ThreadPoolExecutor(
            max_workers=self.config.ws_handler_threads, thread_name_prefix="rejoin-handler-ws"
        )
        self.sender = LocalSender()
        self.queue = InMemoryTurnQueue()
        self.gateway: Gateway | None = None
        self.worker: TurnWorker | None = None
        self.runtime: Runtime | None = None
        self.settings: Settings | None = None
        self.upstash_url: str | None = None
        self.upstash_backend = ""
        self.api_loaded = False
        self._cleanup_task: asyncio.Task[None] | None = None
        self.cleanup_runs = 0
        self.on_started: Callable[[], None] | None = None
        self.generated: list[str] = []
        """Environment names of the secrets generated for this run (see the module doc)."""
        self.exit_status = 0
        """What :meth:`run` returns: 1 once the Upstash endpoint's process died."""
        self._foreground = False

    # -------------------------------------------------------------- handlers

    async def _call(self, name: str, event: dict[str, Any], budget: float) -> Any:
        handler = load_handler(name)
        context = LocalLambdaContext(f"rejoin-{name}", timeout_seconds=budget)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(handler, event, context))

    async def run_cleanup_once(self) -> Any:
        """Run the cleanup handler now (also what the timer does)."""
        result = await self._call("cleanup", scheduled_event(), 60.0)
        self.cleanup_runs += 1
        if isinstance(result, dict):
            expired = result.get("expired") or []
            stale = result.get("stale_connections") or []
            if expired or stale:
                cleanup_log.info(
                    "cleanup: %d expired session(s) deleted, %d stale connection(s) dropped",
                    len(expired),
                    len(stale),
                )
            else:
                cleanup_log.debug("cleanup: nothing to do")
        return result

    async def _cleanup_loop(self) -> None:
        interval = self.config.cleanup_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.run_cleanup_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                cleanup_log.exception("the cleanup failed (it runs again in %.0f s)", interval)

    # ------------------------------------------------------------------ app

    # ------------------------------------------------------- local tokens

    def invite(self, session: str, now: float | None = None) -> str:
        """An invite for ``session``: lets its holder mint tokens for that session only.

        ``v1.<expiry>.<HMAC-SHA256 of the session and expiry with the admin key>``.
        """
        expires = int((time.time() if now is None else now) + INVITE_TTL)
        return f"v1.{expires}.{self._invite_mac(session, expires)}"

    def _invite_mac(self, session: str, expires: int) -> str:
        message = f"rejoin-local-invite|{session}|{expires}".encode()
        mac = hmac.new(self.config.admin_key.encode(), message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def _invite_ok(self, invite: str, session: str, now: float) -> bool:
        version, _, rest = invite.partition(".")
        raw_expiry, _, mac = rest.partition(".")
        if version != "v1" or not raw_expiry.isdigit() or len(raw_expiry) > 12:
            return False
        expires = int(raw_expiry)
        expected = self._invite_mac(session, expires)
        return hmac.compare_digest(expected.encode(), mac.encode()) and now < expires

    def _user_for(self, session: str, name: str, secret: str) -> str:
        # The same browser (its secret), session and name give the same id;
        # nobody without the secret can produce it.
        slug = _USER_SLUG.sub("-", name.lower()).strip("-")[:24] or "user"
        message = f"rejoin-local-user|{session}|{name.strip().casefold()}|{secret}".encode()
        digest = hmac.new(self.config.signing_key.encode(), message, hashlib.sha256).hexdigest()
        return f"u-{slug}-{digest[:12]}"

    def _user_id(self, session: str, name: str, user: str | None, secret: str | None) -> str:
        """The user id asked for, else the browser's own (from its secret), else a fresh one."""
        if user:
            return user
        if secret:
            return self._user_for(session, name, secret)
        slug = _USER_SLUG.sub("-", name.lower()).strip("-")[:24] or "user"
        return f"u-{slug}-{secrets.token_hex(3)}"

    def _mint(self, session: str, name: str, user: str, now: float | None = None) -> dict[str, Any]:
        from rejoin.tokens import mint_token

        token = mint_token(
            secret=self.config.signing_key,
            session_id=session,
            user_id=user,
            name=name,
            ttl_seconds=LOCAL_TOKEN_TTL,
            now=now,
        )
        return {
            "token": token,
            "session": session,
            "user": user,
            "name": name.strip(),
            "expires_in": LOCAL_TOKEN_TTL,
            "invite": self.invite(session),
        }

    async def _issue_time(self, session: str, user: str) -> int:
        """The token's ``iat``: now, or the next second after a revocation in this one."""
        now = time.time()
        if self.runtime is None:
            return math.floor(now)
        try:
            return await self.runtime.rooms().issue_time(session, user, now)
        except InvalidSessionId:
            raise
        except StoreError:
            log.warning("could not check revocations before minting (store unavailable)")
            return math.floor(now)

    def _local_credential(self, request: Request, session: str) -> str | None:
        """``"admin"`` or ``"invite"`` for a valid credential for ``session``, else None."""
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        value = value.strip()
        if scheme == "Bearer" and hmac.compare_digest(
            value.encode(), self.config.admin_key.encode()
        ):
            return "admin"
        if scheme == "Invite" and self._invite_ok(value, session, time.time()):
            return "invite"
        return None

    async def _local_token(self, request: Request) -> Response:
        usage = "send JSON {session, name, secret}"
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"detail": usage}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"detail": usage}, status_code=400)
        session, name = body.get("session"), body.get("name")
        user, secret = body.get("user"), body.get("secret")
        if (
            not isinstance(session, str)
            or not isinstance(name, str)
            or (user is not None and not isinstance(user, str))
            or (secret is not None and not isinstance(secret, str))
        ):
            return JSONResponse(
                {"detail": "session, name, user and secret must be strings"}, status_code=400
            )
        if secret is not None and not _SECRET.fullmatch(secret):
            return JSONResponse(
                {"detail": "secret must be 16-128 characters of A-Za-z0-9_-"}, status_code=400
            )
        credential = self._local_credential(request, session)
        if credential is None:
            detail = (
                "this needs the local admin key (open the page link `make dev` printed) "
                "or an invite link for this session"
            )
            if not request.headers.get("authorization"):
                return JSONResponse(
                    {"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
            return JSONResponse(
                {
                    "detail": "the key or invite is not valid for this session (or has expired); "
                    + detail
                },
                status_code=403,
            )
        if credential == "invite" and user is not None:
            return JSONResponse(
                {"detail": "an invite cannot choose a user id; send a secret instead"},
                status_code=403,
            )
        try:
            user_id = self._user_id(session, name, user, secret)
            grant = self._mint(session, name, user_id, now=await self._issue_time(session, user_id))
        except (RejoinError, ValueError) as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        log.info(
            "minted a local token for session=%s user=%s (%s)", session, grant["user"], credential
        )
        return JSONResponse(grant, headers={"Cache-Control": "no-store"})

    async def _index(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    def _api_app(self) -> Any:
        try:
            app = load_api_app()
            self.api_loaded = True
            return app
        except FileNotFoundError:
            log.warning("functions/api/app.py is missing: /api answers 503")

            async def missing(request: Request) -> Response:
                return JSONResponse(
                    {"detail": "the HTTP API (functions/api) is not there yet"}, status_code=503
                )

            return Starlette(
                routes=[
                    Route(
                        "/{path:path}", missing, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]
                    )
                ]
            )

    def build_app(self) -> ASGIApp:
        """The gateway, the management API, the page and the HTTP API, as one ASGI app."""
        assert self.gateway is not None and self.worker is not None
        gateway, worker = self.gateway, self.worker

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            await gateway.start()
            worker.start()
            self._cleanup_task = asyncio.create_task(self._cleanup_loop(), name="rejoin-cleanup")
            if self.on_started is not None:
                self.on_started()  # the socket is bound already: connections queue until served
            try:
                yield
            finally:
                self._cleanup_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._cleanup_task
                await gateway.stop()
                await worker.stop()
                await asyncio.to_thread(self.executor.shutdown, wait=True, cancel_futures=True)
                await asyncio.to_thread(self.ws_executor.shutdown, wait=True, cancel_futures=True)

        routes: list[BaseRoute] = [
            *gateway.routes(),
            Route("/", self._index, methods=["GET"]),
            Route("/join", self._index, methods=["GET"]),
        ]
        if self.config.local_tokens:
            routes.append(Route("/local/token", self._local_token, methods=["POST"]))
        routes += [
            Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
            Mount("/api", app=self._api_app()),
        ]
        app = Starlette(routes=routes, lifespan=lifespan)
        return LocalGuard(app, loopback_only=self.config.loopback)

    # -------------------------------------------------------------- wiring

    @contextlib.contextmanager
    def prepared(self) -> Iterator[ASGIApp]:
        """Start the Upstash endpoint, install the runtime, load the handlers, build the app."""
        cfg = self.config
        with contextlib.ExitStack() as stack:
            if cfg.upstash_url:
                self.upstash_url = cfg.upstash_url
                self.upstash_backend = "given"
            else:
                backend = "embedded store"
                if cfg.redis_url:
                    backend = f"Redis at {_redact(cfg.redis_url)}"
                if cfg.upstash_in_process:
                    self.upstash_url = self._upstash_in_process(stack)
                    self.upstash_backend = f"{backend}, in this process"
                else:
                    self.upstash_url, pid = self._upstash_child(stack)
                    self.upstash_backend = f"{backend}, own process pid {pid}"
            self.settings = cfg.settings(self.upstash_url)
            self.runtime = Runtime(self.settings, sender=self.sender, queue=self.queue)
            set_runtime(self.runtime)
            stack.callback(set_runtime, None)

            for name in ("connect", "message", "disconnect", "turn", "cleanup"):
                try:
                    load_handler(name)
                except FileNotFoundError:
                    raise SystemExit(
                        f"functions/{name}/app.py is missing: the stack needs every handler"
                    ) from None

            gateway = Gateway(
                authorize=load_handler("authorize"),
                connect=load_handler("connect"),
                message=load_handler("message"),
                disconnect=load_handler("disconnect"),
                config=GatewayConfig(
                    idle_timeout=cfg.idle_timeout,
                    max_duration=cfg.max_duration,
                    management_key=cfg.admin_key,
                ),
                executor=self.ws_executor,
                on_open=self.sender.open,
                on_close=self.sender.close_socket,
            )
            self.gateway = gateway
            self.sender.attach(gateway)

            async def invoke_turn(event: dict[str, Any]) -> Any:
                return await self._call("turn", event, 900.0)

            self.worker = TurnWorker(
                self.queue, invoke_turn, max_attempts=cfg.turn_attempts, backoff=cfg.turn_backoff
            )
            self.queue.on_enqueue = self.worker.notify
            yield self.build_app()

    def _upstash_in_process(self, stack: contextlib.ExitStack) -> str:
        """Serve the endpoint on a thread of this process; its URL."""
        from .upstash_rest import create_app as create_upstash
        from .upstash_rest import serve as serve_upstash

        cfg = self.config
        upstash_app = create_upstash(redis_url=cfg.redis_url, token=cfg.upstash_token)
        try:
            running = stack.enter_context(serve_upstash(upstash_app, cfg.host, cfg.upstash_port))
        except OSError as exc:
            raise SystemExit(
                f"cannot listen on {cfg.host}:{cfg.upstash_port} for the Upstash "
                f"endpoint ({exc.strerror}): pick another with --upstash-port"
            ) from None
        return running.url

    def _upstash_child(self, stack: contextlib.ExitStack) -> tuple[str, int]:
        """Start the endpoint in a child process (stopped with the stack); its URL and pid."""
        from .upstash_process import EndpointStartError, endpoint_process

        cfg = self.config
        try:
            running = stack.enter_context(
                endpoint_process(
                    cfg.host,
                    cfg.upstash_port,
                    redis_url=cfg.redis_url,
                    token=cfg.upstash_token,
                    on_exit=self._upstash_exited,
                )
            )
        except EndpointStartError as exc:
            raise SystemExit(
                f"{exc}\n(if port {cfg.upstash_port} is taken, pick another with --upstash-port)"
            ) from None
        return running.url, running.pid

    def _upstash_exited(self, status: int) -> None:
        """The endpoint's process died under the stack: say so, and stop (nothing works)."""
        log.error(
            "the Upstash endpoint's process exited (status %d): the handlers have no store; "
            "stopping the stack",
            status,
        )
        self.exit_status = 1
        if self._foreground:
            os.kill(os.getpid(), signal.SIGTERM)  # run() stops as on Ctrl-C

    @contextlib.contextmanager
    def serve_in_thread(self) -> Iterator[StackUrls]:
        """Run the stack in background threads (tests); stops when the block exits."""
        with (
            self.prepared() as app,
            serve_gateway(app, self.gateway, self.config.host, self.config.port) as running,
        ):
            yield self._urls(running)

    def _urls(self, running: RunningServer) -> StackUrls:
        assert self.upstash_url is not None
        return StackUrls(http=running.url, ws=f"{running.ws_url}/ws", upstash=self.upstash_url)

    def describe(self, urls: StackUrls) -> str:
        """The startup banner: where everything is, and how it is configured."""
        s = self.settings
        cfg = self.config
        assert s is not None
        if not s.openai_api_key:
            model = "offline stand-in model (OPENAI_API_KEY is not set)"
        elif s.openai_base_url:
            model = f"{s.model} at {s.openai_base_url}"
        else:
            model = f"{s.model} (OpenAI)"

        def origin(value: str, default: str, name: str) -> str:
            if name in self.generated:
                return "generated for this run"
            return "the documented local default" if value == default else f"from {name}"

        client = "bash scripts/dev.sh client"
        if urls.ws != DEFAULT_WS_URL:
            client += f" --url {urls.ws}"
        if "REJOIN_TOKEN_SECRET" in self.generated:
            client = f"REJOIN_TOKEN_SECRET={cfg.signing_key} {client}"
        lines = [
            "rejoin local stack is up",
            f"  chat page       {urls.page(cfg.admin_key)}",
            "                  (open this link: it carries the local admin key, kept by the page)",
            f"  invite link     {urls.join('demo', invite=self.invite('demo'))}",
            "                  (for a second person: joins session 'demo' only)",
            f"  WebSocket       {urls.ws}?session=<id>&token=<jwt>",
            f"  HTTP API        {urls.api}/   (docs: {urls.api}/docs)"
            + ("" if self.api_loaded else "   [functions/api missing: 503]"),
            f"  @connections    {urls.http}/@connections/{{id}}   (signed with the admin key)",
            f"  Upstash REST    {urls.upstash}   ({self.upstash_backend}, "
            f"token {cfg.upstash_token})",
            f"  model           {model}",
            f"  grace {s.grace_seconds} s, cleanup every {cfg.cleanup_interval:g} s, "
            f"idle timeout {cfg.idle_timeout:g} s, reply mode {s.reply_mode}",
            "  token key       "
            + origin(cfg.signing_key, DEFAULT_SIGNING_KEY, "REJOIN_TOKEN_SECRET"),
            f"  admin key       {cfg.admin_key} ("
            + origin(cfg.admin_key, DEFAULT_ADMIN_KEY, "REJOIN_ADMIN_KEY")
            + ")",
            f"  terminal client {client} --session demo --name Ada",
            "Press Ctrl-C to stop.",
        ]
        if not cfg.loopback:
            warning = [
                f"  WARNING: listening on {cfg.host}, not only on this machine: anyone who can",
                "  reach it can load the page and try to connect. Share invite links, never the",
                "  page link (it carries the admin key). From another machine use this machine's",
                f"  address instead of {urls.http.split('//')[1].rsplit(':', 1)[0]}.",
            ]
            if self.generated:
                warning.append(
                    "  Documented default keys are not used when exposed; generated for this run: "
                    + ", ".join(self.generated)
                    + " (set them to keep them across runs)."
                )
            lines[1:1] = warning
        return "\n".join(lines)

    def run(self) -> int:
        """Serve in the foreground until Ctrl-C (or SIGTERM); stop cleanly.

        Listening beyond loopback, documented default secrets are replaced by
        random ones first (:meth:`StackConfig.hardened`).
        """
        self.config, self.generated = self.config.hardened()
        cfg = self.config
        try:
            sock = bind(cfg.host, cfg.port)
        except OSError as exc:
            print(
                f"cannot listen on {cfg.host}:{cfg.port} ({exc.strerror}): "
                "pick another port with --port",
                file=sys.stderr,
            )
            return 1
        try:
            with self.prepared() as app:
                host, port = client_address(sock)
                shown = f"[{host}]" if ":" in host else host
                urls = StackUrls(
                    http=f"http://{shown}:{port}",
                    ws=f"ws://{shown}:{port}/ws",
                    upstash=self.upstash_url or "",
                )
                server = uvicorn.Server(uvicorn_config(app, self.gateway))
                self.on_started = lambda: print(self.describe(urls), flush=True)
                # uvicorn shuts down gracefully on Ctrl-C (or SIGTERM), then re-raises
                # the signal: handled here as a KeyboardInterrupt, so the rest stops too.
                previous = signal.signal(signal.SIGTERM, _interrupt)
                self._foreground = True
                try:
                    with contextlib.suppress(KeyboardInterrupt):
                        server.run(sockets=[sock])
                finally:
                    self._foreground = False
                    signal.signal(signal.SIGTERM, previous)
                log.info("stopping: sockets closed, worker and cleanup stopped")
        except KeyboardInterrupt:
            pass
        finally:
            sock.close()
        log.info("stopped")
        return self.exit_status


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _redact(url: str | None) -> str:
    if not url:
        return ""
    return re.sub(r"//([^:/@]*):([^@]*)@", r"//\1:***@", url)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rejoin_local",
        description="Run the whole rejoin stack on this machine: Upstash-compatible endpoint, "
        "WebSocket gateway, HTTP API, turn worker, cleanup and the chat page.",
    )
    p.add_argument(
        "--host",
        help="interface to bind (env REJOIN_HOST, default 127.0.0.1: this machine only); "
        "any other exposes the stack: a warning is printed and default keys are replaced "
        "by random ones for the run",
    )
    p.add_argument("--port", type=int, help="gateway/page/API port (env REJOIN_PORT, default 8080)")
    p.add_argument(
        "--upstash-port",
        type=int,
        help="Upstash-compatible endpoint port (env REJOIN_UPSTASH_PORT, default 8079)",
    )
    p.add_argument(
        "--redis-url", help="front a real Redis (env REDIS_URL; default: embedded store)"
    )
    p.add_argument(
        "--upstash-in-process",
        action="store_true",
        help="serve the Upstash-compatible endpoint on a thread of this process (env "
        "REJOIN_UPSTASH_IN_PROCESS=1; default: a child process of its own, stopped with the "
        "stack, as Upstash is another machine on AWS)",
    )
    p.add_argument(
        "--grace",
        type=int,
        metavar="SECONDS",
        help="reconnect grace period (env REJOIN_GRACE_SECONDS, default 120)",
    )
    p.add_argument(
        "--cleanup-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between cleanups (env REJOIN_CLEANUP_INTERVAL_SECONDS, default 60)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="gateway idle timeout (env REJOIN_IDLE_TIMEOUT_SECONDS, default 600)",
    )
    p.add_argument(
        "--verbose", "-v", action="store_true", help="also show the handlers' own JSON logs (INFO)"
    )
    return p


def _raise_open_file_limit() -> None:
    """Soft open-file limit up to the hard one: each WebSocket is a file (1,024 is few)."""
    import resource

    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rejoin_local``."""
    args = _parser().parse_args(argv)
    _raise_open_file_limit()
    # Handlers read these at import: quiet JSON logs and no EMF metric blobs on stdout.
    os.environ.setdefault("POWERTOOLS_SERVICE_NAME", "rejoin-local")
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "INFO" if args.verbose else "WARNING")
    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "httpcore", "openai", "openai.agents"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = StackConfig.from_env()
    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.upstash_port is not None:
        overrides["upstash_port"] = args.upstash_port
    if args.redis_url:
        overrides["redis_url"] = args.redis_url
    if args.upstash_in_process:
        overrides["upstash_in_process"] = True
    if args.grace is not None:
        overrides["grace_seconds"] = args.grace
    if args.cleanup_interval is not None:
        overrides["cleanup_interval"] = args.cleanup_interval
    if args.idle_timeout is not None:
        overrides["idle_timeout"] = args.idle_timeout
    config = replace(config, **overrides)
    try:
        return Stack(config).run()
    except KeyboardInterrupt:
        return 0
