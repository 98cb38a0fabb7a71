"""A local WebSocket gateway with API Gateway's semantics, calling the real handlers.

What it does, as API Gateway (WebSocket API) does it:

- ``GET /ws?session=..&token=..`` (the WebSocket handshake) builds a
  ``$connect`` event and calls the connect handler; a 2xx ``statusCode``
  accepts the connection, anything else refuses the handshake with that HTTP
  status (a handler that raises or times out gives 500 / 504).
- Each data message is checked for size first: a frame over 32 KB or a
  message over 128 KB closes the socket with code 1009. Then the route is
  selected with ``$request.body.action`` (one of :attr:`GatewayConfig.routes`,
  else ``$default``) and the message handler is called with a MESSAGE event.
  Messages are handled concurrently, as on AWS: a client that needs an order
  must wait for answers. A handler that raises or runs past the integration
  timeout (29 s) gets API Gateway's ``{"message": "Internal server error"}`` /
  ``"Endpoint request timed out"`` frame.
- On close, ``$disconnect`` is called (best effort: :meth:`Gateway.drop` can
  "lose" it, as API Gateway sometimes does).
- Sockets idle for :attr:`GatewayConfig.idle_timeout` seconds (no data
  message from the client) and sockets older than
  :attr:`GatewayConfig.max_duration` are closed with 1001 "Going away".
- Connection ids look like API Gateway's (16 characters of URL-safe base64
  ending in ``=``).
- The management API (``POST``/``GET``/``DELETE /@connections/{id}``, also
  under ``/<stage>/@connections/{id}``) answers as ``apigatewaymanagementapi``
  does, 410 ``GoneException`` for closed sockets, so a boto3 client pointed at
  the gateway's URL works; :meth:`Gateway.post` (and its awaitable form
  :meth:`Gateway.deliver`) is the in-process shortcut used by the local
  stack's sender.

Posting from a handler's thread is cheap, as PostToConnection is: the frame
is checked (size, connection still open: else ``PayloadTooLarge`` /
``ConnectionGone`` at once) and queued; the gateway's loop is woken once per
batch of queued frames (one ``call_soon_threadsafe``, not one future per
frame) and writes each connection's frames in the order they were posted.
A frame posted just before its socket closes is dropped, as on API Gateway.

Handlers are synchronous and run their own event loops, so they are always
called in a thread pool, never on the gateway's loop.

Serve it with :func:`serve` (or :func:`uvicorn_config`): the frame limit needs
the gateway's own uvicorn WebSocket protocol class. Under another server the
128 KB message limit is still enforced, the per-frame limit is not.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketState

from rejoin.errors import ConnectionGone, PayloadTooLarge

from ._serving import bind as bind
from ._serving import client_address as client_address
from ._serving import serve_uvicorn
from ._sigv4 import SignatureProblem
from ._sigv4 import verify as verify_sigv4
from .handlers import LocalLambdaContext

__all__ = [
    "DEFAULT_ROUTES",
    "FRAME_LIMIT",
    "HANDSHAKE_LIMIT",
    "MESSAGE_LIMIT",
    "Gateway",
    "GatewayConfig",
    "LocalConnection",
    "RunningServer",
    "limited_ws_protocol",
    "new_connection_id",
    "serve",
    "uvicorn_config",
]

log = logging.getLogger("rejoin_local.gateway")

FRAME_LIMIT = 32 * 1024
"""API Gateway's WebSocket frame size limit."""
MESSAGE_LIMIT = 128 * 1024
"""API Gateway's WebSocket message size limit (also PostToConnection's)."""
INTEGRATION_TIMEOUT = 29.0
"""API Gateway's integration timeout (not raisable)."""
DEFAULT_ROUTES = ("say", "resume", "ping", "leave")
HANDSHAKE_LIMIT = 8 * 1024
"""The longest handshake request line, and the most header bytes, accepted.

Over it the handshake is answered 431 (Request Header Fields Too Large): a
client is told, never left waiting (the WebSocket parser alone would drop
such a request without a word). API Gateway answers oversized handshakes
too; its documented quota is 4,096 characters of URL, so keep tokens short.
"""
HANDSHAKE_MAX_HEADERS = 128
"""The most header lines a handshake may carry (the WebSocket parser's own limit)."""
_HEAD_BUFFER_LIMIT = 1024 * 1024
"""How much of a request head the HTTP parser buffers before answering 400 itself."""

Handler = Callable[[dict[str, Any], Any], Any]


def new_connection_id() -> str:
    """An id shaped like API Gateway's: 16 characters of URL-safe base64 ending in ``=``."""
    return base64.urlsafe_b64encode(os.urandom(11)).decode("ascii")


def _request_time(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%d/%b/%Y:%H:%M:%S +0000")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


_HEADER_CASE = {
    "sec-websocket-extensions": "Sec-WebSocket-Extensions",
    "sec-websocket-key": "Sec-WebSocket-Key",
    "sec-websocket-version": "Sec-WebSocket-Version",
    "sec-websocket-protocol": "Sec-WebSocket-Protocol",
    "x-amzn-trace-id": "X-Amzn-Trace-Id",
}


def _header_name(name: str) -> str:
    return _HEADER_CASE.get(name) or "-".join(p[:1].upper() + p[1:] for p in name.split("-"))


@dataclass
class GatewayConfig:
    """The gateway's limits and names.

    Attributes:
        path: the WebSocket path.
        stage: the stage name in events (and the optional management prefix).
        api_id: the API id in events.
        routes: route keys selected by ``$request.body.action``; others go to
            ``$default``.
        idle_timeout: seconds without a data message from the client before
            the socket is closed (API Gateway: 600).
        max_duration: seconds a connection may last (API Gateway: 7200).
        frame_limit: largest frame accepted (API Gateway: 32 KB).
        message_limit: largest message accepted or posted (API Gateway: 128 KB).
        integration_timeout: seconds a handler may take (API Gateway: 29).
        sweep_interval: how often idle and old sockets are looked for; default
            ``min(1, idle_timeout / 4)``.
        identity_sources: query parameters the authorizer needs; a handshake
            without one of them is refused with 401 before the authorizer
            runs (API Gateway's ``route.request.querystring.*`` sources).
        handshake_limit: the longest request line, and the most header bytes,
            of a handshake; over it the answer is 431.
        management_key: when set, the management API (``@connections``)
            answers only requests signed with it: AWS Signature V4 with this
            key as the secret access key (what boto3 sends, as API Gateway
            checks IAM), or ``Authorization: Bearer <key>``. Otherwise 403.
            None leaves it open (for tests that embed the gateway).
    """

    path: str = "/ws"
    stage: str = "local"
    api_id: str = "local"
    routes: tuple[str, ...] = DEFAULT_ROUTES
    idle_timeout: float = 600.0
    max_duration: float = 7200.0
    frame_limit: int = FRAME_LIMIT
    message_limit: int = MESSAGE_LIMIT
    integration_timeout: float = INTEGRATION_TIMEOUT
    sweep_interval: float | None = None
    identity_sources: tuple[str, ...] = ("session", "token")
    handshake_limit: int = HANDSHAKE_LIMIT
    management_key: str | None = None


@dataclass
class LocalConnection:
    """One accepted socket.

    Attributes:
        id: the connection id.
        session: the ``session`` query parameter (for logs only).
        source_ip: the client's address.
        user_agent: the client's User-Agent.
        connected_at: seconds since the epoch.
        last_active: seconds since the epoch of the last data message.
    """

    id: str
    websocket: WebSocket
    session: str | None
    source_ip: str
    user_agent: str | None
    connected_at: float
    last_active: float
    opened_monotonic: float
    active_monotonic: float
    authorizer: dict[str, Any] | None = None
    open: bool = True
    lose_disconnect: bool = False
    close_code: int | None = None
    close_reason: str = ""
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    outbox: collections.deque[str | bytes] = field(default_factory=collections.deque)
    """Frames posted and not yet written (see :meth:`Gateway.post`)."""
    writer: asyncio.Task[None] | None = None


class Gateway:
    """API Gateway's WebSocket semantics in front of three handlers.

    Args:
        authorize: the ``$connect`` REQUEST authorizer, or None for none. As on
            API Gateway: it raising ``Unauthorized`` refuses with 401, a Deny
            policy with 403; an Allow policy's ``context`` (and
            ``principalId``) reaches every later event of the connection in
            ``requestContext.authorizer``.
        connect: the ``$connect`` handler, ``handler(event, context)``.
        message: the handler of every message route (``$default`` included).
        disconnect: the ``$disconnect`` handler.
        config: limits and names.
        executor: where handlers run; default a private pool of 16 threads.
        on_open: called with the connection id once the socket is accepted
            (the local stack opens it in its in-memory sender here).
        on_close: called with the connection id once the socket is closed,
            before ``$disconnect`` (posts to it then raise 410).
        clock: seconds since the epoch, for event timestamps.
    """

    def __init__(
        self,
        *,
        connect: Handler,
        message: Handler,
        disconnect: Handler,
        authorize: Handler | None = None,
        config: GatewayConfig | None = None,
        executor: Executor | None = None,
        on_open: Callable[[str], None] | None = None,
        on_close: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or GatewayConfig()
        self._handlers = {"connect": connect, "message": message, "disconnect": disconnect}
        if authorize is not None:
            self._handlers["authorize"] = authorize
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            max_workers=16, thread_name_prefix="rejoin-handler"
        )
        self._on_open = on_open
        self._on_close = on_close
        self._clock = clock
        self.connections: dict[str, LocalConnection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # Frames posted from any thread, waiting for the loop's next flush.
        self._posted: list[tuple[LocalConnection, str | bytes]] = []
        self._posted_lock = threading.Lock()
        self._flush_scheduled = False
        self.stats = {"connects": 0, "refused": 0, "messages": 0, "disconnects": 0}

    # ------------------------------------------------------------------ setup

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the gateway runs on, once started."""
        return self._loop

    def routes(self) -> list[BaseRoute]:
        """The WebSocket route and the management API routes."""
        stage = self.config.stage
        manage = ["GET", "POST", "DELETE"]
        return [
            WebSocketRoute(self.config.path, self._websocket_endpoint),
            Route("/@connections/{connection_id}", self._manage, methods=manage),
            Route(f"/{stage}/@connections/{{connection_id}}", self._manage, methods=manage),
        ]

    async def start(self) -> None:
        """Remember the running loop and start the idle/age sweeper (idempotent)."""
        self._loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="rejoin-gateway-sweeper")

    async def stop(self, *, drain_seconds: float = 5.0) -> None:
        """Close every socket (``$disconnect`` runs), stop the sweeper, drain handlers."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for conn in list(self.connections.values()):
            await self._close(conn, 1001, "Going away")
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=drain_seconds)
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def app(self, *, extra_routes: list[BaseRoute] | None = None) -> Starlette:
        """A Starlette app serving only the gateway (plus ``extra_routes``)."""

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            await self.start()
            try:
                yield
            finally:
                await self.stop()

        return Starlette(routes=[*self.routes(), *(extra_routes or [])], lifespan=lifespan)

    def ws_protocol_class(self) -> type[asyncio.Protocol]:
        """uvicorn's WebSocket protocol with this gateway's frame and message limits."""
        return limited_ws_protocol(self.config.frame_limit, self.config.message_limit)

    # ------------------------------------------------------------ invocation

    async def _invoke(self, name: str, event: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        context = LocalLambdaContext(
            f"rejoin-{name}", timeout_seconds=self.config.integration_timeout
        )
        call = functools.partial(self._handlers[name], event, context)
        return await asyncio.wait_for(
            loop.run_in_executor(self._executor, call), self.config.integration_timeout
        )

    async def _authorize(self, connect: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        """Run the authorizer as API Gateway does; (refusal status, context or None).

        Without an authorizer every handshake goes on, with an empty context.
        """
        if "authorize" not in self._handlers:
            return 200, {}
        query = connect.get("queryStringParameters") or {}
        if any(not query.get(name) for name in self.config.identity_sources):
            return 401, None  # an identity source is missing: no call at all
        context = connect["requestContext"]
        event = {
            "type": "REQUEST",
            "methodArn": (
                f"arn:aws:execute-api:local:000000000000:{self.config.api_id}/"
                f"{self.config.stage}/$connect"
            ),
            "headers": connect["headers"],
            "multiValueHeaders": connect["multiValueHeaders"],
            "queryStringParameters": connect.get("queryStringParameters"),
            "multiValueQueryStringParameters": connect.get("multiValueQueryStringParameters"),
            "stageVariables": {},
            "requestContext": context,
        }
        try:
            policy = await self._invoke("authorize", event)
        except TimeoutError:
            log.error("authorizer timed out")
            return 500, None
        except Exception as exc:
            if str(exc) == "Unauthorized":
                return 401, None
            log.exception("the authorizer raised")
            return 500, None
        try:
            statements = policy["policyDocument"]["Statement"]
            allowed = bool(statements) and all(s.get("Effect") == "Allow" for s in statements)
        except (KeyError, TypeError, AttributeError):
            log.error("the authorizer answered something that is not a policy")
            return 500, None
        if not allowed:
            return 403, None
        # What API Gateway hands on: the context's values, and the principal.
        handed = dict(policy.get("context") or {})
        handed["principalId"] = policy.get("principalId")
        handed["integrationLatency"] = 0
        return 200, handed

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _context(
        self,
        *,
        route_key: str,
        event_type: str,
        connection_id: str,
        connected_at_ms: int,
        domain: str,
        identity: dict[str, str],
    ) -> dict[str, Any]:
        now_ms = int(self._clock() * 1000)
        context: dict[str, Any] = {
            "routeKey": route_key,
            "eventType": event_type,
            "extendedRequestId": new_connection_id(),
            "requestTime": _request_time(now_ms),
            "messageDirection": "IN",
            "stage": self.config.stage,
            "connectedAt": connected_at_ms,
            "requestTimeEpoch": now_ms,
            "identity": identity,
            "requestId": new_connection_id(),
            "domainName": domain,
            "connectionId": connection_id,
            "apiId": self.config.api_id,
        }
        return context

    def connect_event(
        self, websocket: WebSocket, connection_id: str, connected_at_ms: int
    ) -> dict[str, Any]:
        """The ``$connect`` event for a handshake, as API Gateway sends it."""
        headers: dict[str, str] = {}
        multi_headers: dict[str, list[str]] = {}
        for raw_name, raw_value in websocket.scope.get("headers", []):
            name = _header_name(raw_name.decode("latin-1"))
            value = raw_value.decode("latin-1")
            headers[name] = value
            multi_headers.setdefault(name, []).append(value)
        client = websocket.client
        source_ip = client.host if client else "127.0.0.1"
        server = websocket.scope.get("server") or ("127.0.0.1", 80)
        extra = {
            "X-Amzn-Trace-Id": f"Root=1-{int(self._clock()):08x}-{uuid.uuid4().hex[:24]}",
            "X-Forwarded-For": source_ip,
            "X-Forwarded-Port": str(server[1]),
            "X-Forwarded-Proto": "https" if websocket.url.scheme == "wss" else "http",
        }
        for name, value in extra.items():
            headers.setdefault(name, value)
            multi_headers.setdefault(name, [value])
        identity = {"sourceIp": source_ip}
        if headers.get("User-Agent"):
            identity["userAgent"] = headers["User-Agent"]
        event: dict[str, Any] = {
            "headers": headers,
            "multiValueHeaders": multi_headers,
        }
        pairs = parse_qsl(
            websocket.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
        )
        if pairs:
            single: dict[str, str] = {}
            multi: dict[str, list[str]] = {}
            for key, value in pairs:
                single[key] = value  # API Gateway keeps the last value
                multi.setdefault(key, []).append(value)
            event["queryStringParameters"] = single
            event["multiValueQueryStringParameters"] = multi
        event["requestContext"] = self._context(
            route_key="$connect",
            event_type="CONNECT",
            connection_id=connection_id,
            connected_at_ms=connected_at_ms,
            domain=headers.get("Host", f"{server[0]}:{server[1]}"),
            identity=identity,
        )
        event["isBase64Encoded"] = False
        return event

    def select_route(self, body: str | None) -> str:
        """``$request.body.action`` if it names a route, else ``$default``."""
        if body is None:
            return "$default"
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            # Not JSON, or nested too deep for the parser (10,000 arrays fit
            # in 20 KB): API Gateway routes both to $default, where the
            # handler answers bad_json.
            return "$default"
        if isinstance(parsed, dict):
            action = parsed.get("action")
            if isinstance(action, str) and action in self.config.routes:
                return action
        return "$default"

    def _identity(self, conn: LocalConnection) -> dict[str, str]:
        identity = {"sourceIp": conn.source_ip}
        if conn.user_agent:
            identity["userAgent"] = conn.user_agent
        return identity

    def _domain(self, conn: LocalConnection) -> str:
        return conn.websocket.headers.get("host", "127.0.0.1")

    def message_event(
        self, conn: LocalConnection, body: str, *, is_base64: bool = False
    ) -> dict[str, Any]:
        """A MESSAGE event for one data message, with its selected route."""
        route = "$default" if is_base64 else self.select_route(body)
        context = self._context(
            route_key=route,
            event_type="MESSAGE",
            connection_id=conn.id,
            connected_at_ms=int(conn.connected_at * 1000),
            domain=self._domain(conn),
            identity={"sourceIp": conn.source_ip},
        )
        context["messageId"] = new_connection_id()
        if conn.authorizer:
            context["authorizer"] = conn.authorizer
        return {"requestContext": context, "body": body, "isBase64Encoded": is_base64}

    def disconnect_event(self, conn: LocalConnection, code: int, reason: str) -> dict[str, Any]:
        """The ``$disconnect`` event, as API Gateway sends it."""
        host = self._domain(conn)
        headers = {"Host": host, "x-api-key": "", "X-Forwarded-For": "", "x-restapi": ""}
        context = self._context(
            route_key="$disconnect",
            event_type="DISCONNECT",
            connection_id=conn.id,
            connected_at_ms=int(conn.connected_at * 1000),
            domain=host,
            identity=self._identity(conn),
        )
        context["disconnectStatusCode"] = code
        context["disconnectReason"] = reason
        if conn.authorizer:
            context["authorizer"] = conn.authorizer
        return {
            "headers": headers,
            "multiValueHeaders": {k: [v] for k, v in headers.items()},
            "requestContext": context,
            "isBase64Encoded": False,
        }

    # ---------------------------------------------------------------- sockets

    async def _websocket_endpoint(self, websocket: WebSocket) -> None:
        if self._loop is None:
            await self.start()
        connection_id = new_connection_id()
        connected_at = self._clock()
        session = websocket.query_params.get("session")
        event = self.connect_event(websocket, connection_id, int(connected_at * 1000))
        started = time.monotonic()
        status: int = 500
        headers: dict[str, str] = {}
        status, authorizer = await self._authorize(event)
        if authorizer is not None:
            event["requestContext"]["authorizer"] = authorizer
            status = 500  # unless the handler answers
            try:
                result = await self._invoke("connect", event)
                status, headers = _status_of(result)
            except TimeoutError:
                status = 504
                log.error("connect %s: the handler timed out", connection_id)
            except Exception:
                log.exception("connect %s: the handler raised", connection_id)
        elapsed = (time.monotonic() - started) * 1000
        if not 200 <= status < 300:
            self.stats["refused"] += 1
            log.info(
                "connect %s session=%s refused %d (%.0f ms)",
                connection_id,
                session,
                status,
                elapsed,
            )
            await websocket.send_denial_response(Response(status_code=status))
            return
        subprotocol = headers.get("Sec-WebSocket-Protocol") or headers.get("sec-websocket-protocol")
        await websocket.accept(subprotocol=subprotocol)
        now_m = time.monotonic()
        conn = LocalConnection(
            id=connection_id,
            websocket=websocket,
            session=session,
            source_ip=event["requestContext"]["identity"]["sourceIp"],
            user_agent=event["requestContext"]["identity"].get("userAgent"),
            connected_at=connected_at,
            last_active=connected_at,
            opened_monotonic=now_m,
            active_monotonic=now_m,
            authorizer=authorizer or None,
        )
        self.connections[connection_id] = conn
        self.stats["connects"] += 1
        log.info("connect %s session=%s accepted (%.0f ms)", connection_id, session, elapsed)
        if self._on_open is not None:
            self._on_open(connection_id)
        code, reason = 1005, ""
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    code = int(message.get("code") or 1005)
                    reason = str(message.get("reason") or "")
                    break
                if message["type"] != "websocket.receive":
                    continue
                text, data = message.get("text"), message.get("bytes")
                size = len(text.encode()) if text is not None else len(data or b"")
                if size > self.config.message_limit:  # without the limited protocol
                    await self._close(conn, 1009, "Message too big", wait=False)
                    continue
                conn.last_active = self._clock()
                conn.active_monotonic = time.monotonic()
                if text is not None:
                    self._spawn(self._handle_message(conn, text, False))
                elif data is not None:
                    self._spawn(self._handle_message(conn, base64.b64encode(data).decode(), True))
        except Exception:  # the socket broke under us
            code, reason = 1006, "Connection closed abnormally"
        finally:
            await self._closed(conn, code, reason)

    async def _closed(self, conn: LocalConnection, client_code: int, client_reason: str) -> None:
        if not conn.open and conn.closed.is_set():
            return
        conn.open = False
        self.connections.pop(conn.id, None)
        if self._on_close is not None:
            try:
                self._on_close(conn.id)
            except Exception:
                log.exception("on_close hook failed for %s", conn.id)
        code = conn.close_code if conn.close_code is not None else client_code
        reason = conn.close_reason if conn.close_code is not None else client_reason
        if not reason:
            reason = _DEFAULT_REASONS.get(code, "")
        conn.closed.set()
        if conn.lose_disconnect:
            log.info(
                "disconnect %s session=%s code=%d ($disconnect lost on purpose)",
                conn.id,
                conn.session,
                code,
            )
            return
        self.stats["disconnects"] += 1
        log.info("disconnect %s session=%s code=%d %s", conn.id, conn.session, code, reason)
        try:
            await self._invoke("disconnect", self.disconnect_event(conn, code, reason))
        except Exception:
            log.exception("disconnect %s: the handler failed", conn.id)

    async def _handle_message(self, conn: LocalConnection, body: str, is_base64: bool) -> None:
        event = self.message_event(conn, body, is_base64=is_base64)
        route = event["requestContext"]["routeKey"]
        self.stats["messages"] += 1
        started = time.monotonic()
        answer: str | None = None
        try:
            result = await self._invoke("message", event)
            status, _ = _status_of(result)
            if status >= 500:
                log.warning("message %s route=%s answered %d", conn.id, route, status)
        except TimeoutError:
            log.error("message %s route=%s: the handler timed out", conn.id, route)
            answer = "Endpoint request timed out"
        except Exception:
            log.exception("message %s route=%s: the handler raised", conn.id, route)
            answer = "Internal server error"
        log.debug(
            "message %s route=%s %d bytes (%.0f ms)",
            conn.id,
            route,
            len(body),
            (time.monotonic() - started) * 1000,
        )
        if answer is not None:
            frame = {
                "message": answer,
                "connectionId": conn.id,
                "requestId": event["requestContext"]["requestId"],
            }
            with contextlib.suppress(ConnectionGone):
                await self._send(conn, json.dumps(frame))

    async def _send(self, conn: LocalConnection, data: str | bytes) -> None:
        if not conn.open:
            raise ConnectionGone(f"connection {conn.id} is gone")
        async with conn.send_lock:
            if not conn.open or conn.websocket.application_state != WebSocketState.CONNECTED:
                raise ConnectionGone(f"connection {conn.id} is gone")
            try:
                if isinstance(data, str):
                    await conn.websocket.send_text(data)
                else:
                    await conn.websocket.send_bytes(data)
            except Exception as exc:  # closed meanwhile (RuntimeError, ClientDisconnected, ...)
                raise ConnectionGone(f"connection {conn.id} is gone") from exc

    async def _close(
        self, conn: LocalConnection, code: int, reason: str, *, wait: bool = True
    ) -> None:
        if not conn.open:
            return
        if conn.close_code is None:
            conn.close_code, conn.close_reason = code, reason
        async with conn.send_lock:
            with contextlib.suppress(Exception):
                if conn.websocket.application_state == WebSocketState.CONNECTED:
                    await conn.websocket.close(code, reason)
        if not wait:
            return
        # The endpoint's receive loop sees the disconnect and runs _closed; wait for it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(conn.closed.wait(), 5)

    async def _sweep(self) -> None:
        cfg = self.config
        interval = cfg.sweep_interval or min(1.0, cfg.idle_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self.connections.values()):
                if now - conn.opened_monotonic >= cfg.max_duration:
                    log.info("connection %s reached the maximum duration", conn.id)
                    self._spawn(self._close(conn, 1001, "Going away"))
                elif now - conn.active_monotonic >= cfg.idle_timeout:
                    log.info("connection %s idle for %.0f s: closing", conn.id, cfg.idle_timeout)
                    self._spawn(self._close(conn, 1001, "Going away"))

    # ------------------------------------------------------- from any thread

    async def deliver(self, connection_id: str, data: bytes | str) -> None:
        """:meth:`post`, awaitable (the sender's ``on_deliver`` hook may be either)."""
        self.post(connection_id, data)

    def post(self, connection_id: str, data: bytes | str) -> None:
        """PostToConnection from any thread: ``data`` is queued for the socket; returns at once.

        Frames to one connection are written in the order they were posted.

        Raises:
            ConnectionGone: the socket is closed (or never existed).
            PayloadTooLarge: ``data`` is over the message limit.
        """
        if len(data) > self.config.message_limit:
            raise PayloadTooLarge(
                f"{len(data)} bytes is over the {self.config.message_limit} limit"
            )
        if isinstance(data, bytes):
            with contextlib.suppress(UnicodeDecodeError):
                data = data.decode("utf-8")
        conn = self.connections.get(connection_id)
        loop = self._loop
        if conn is None or not conn.open or loop is None:
            raise ConnectionGone(f"connection {connection_id} is gone")
        with self._posted_lock:
            self._posted.append((conn, data))
            if self._flush_scheduled:
                return  # the wakeup already asked for takes this frame too
            self._flush_scheduled = True
        try:
            loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the gateway's loop is closed: the server stopped
            raise ConnectionGone(f"connection {connection_id} is gone") from None

    def _flush(self) -> None:
        """On the loop: hand every posted frame to its connection's writer."""
        with self._posted_lock:
            batch, self._posted = self._posted, []
            self._flush_scheduled = False
        for conn, data in batch:
            if not conn.open:
                continue  # closed since it was posted: dropped, as on API Gateway
            conn.outbox.append(data)
            if conn.writer is None:
                conn.writer = asyncio.get_running_loop().create_task(self._write(conn))

    async def _write(self, conn: LocalConnection) -> None:
        """Write ``conn``'s queued frames in order (one task per connection with frames)."""
        try:
            while conn.outbox:
                try:
                    await self._send(conn, conn.outbox.popleft())
                except ConnectionGone:
                    conn.outbox.clear()
        finally:
            conn.writer = None

    def _submit(self, coro: Any) -> Any:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the gateway is not running")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return asyncio.ensure_future(coro)
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close_connection(self, connection_id: str, code: int = 1000, reason: str = "") -> Any:
        """Close a socket from any thread (``$disconnect`` runs).

        Returns:
            A future (concurrent or asyncio, depending on the calling thread).
        """
        return self._submit(self._close_by_id(connection_id, code, reason))

    def drop(self, connection_id: str, *, lose_disconnect: bool = True) -> Any:
        """Close a socket as a network failure would; by default ``$disconnect`` is lost.

        Returns:
            A future (concurrent or asyncio, depending on the calling thread).
        """
        return self._submit(
            self._close_by_id(
                connection_id, 1006, "Connection lost", lose_disconnect=lose_disconnect
            )
        )

    async def _close_by_id(
        self, connection_id: str, code: int, reason: str, *, lose_disconnect: bool = False
    ) -> bool:
        conn = self.connections.get(connection_id)
        if conn is None:
            return False
        conn.lose_disconnect = conn.lose_disconnect or lose_disconnect
        # 1006 cannot be sent in a close frame: send 1001, report 1006.
        wire = 1001 if code in (1005, 1006) else code
        conn.close_code, conn.close_reason = code, reason
        await self._close(conn, wire, reason)
        return True

    # ------------------------------------------------------- management API

    async def _authorized(self, request: Request, body: bytes) -> Response | None:
        """None when the request carries the management key, else the 403 to answer."""
        key = self.config.management_key
        if key is None:
            return None
        auth = request.headers.get("authorization", "")
        if auth.startswith("Bearer "):
            if hmac.compare_digest(auth[7:].strip().encode(), key.encode()):
                return None
            return _aws_error(403, "ForbiddenException", "Forbidden")
        if not auth:
            return _aws_error(
                403, "MissingAuthenticationTokenException", "Missing Authentication Token"
            )
        scope = request.scope
        raw_path = scope.get("raw_path") or request.url.path.encode()
        query = scope.get("query_string", b"")
        url = f"http://{request.headers.get('host', 'localhost')}{raw_path.decode('latin-1')}"
        if query:
            url += "?" + query.decode("latin-1")
        try:
            verify_sigv4(
                method=request.method,
                url=url,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                secret_key=key,
                now=self._clock(),
            )
        except SignatureProblem as exc:
            log.info("management API: refused a request (%s)", exc)
            return _aws_error(403, "InvalidSignatureException", str(exc))
        return None

    async def _manage(self, request: Request) -> Response:
        connection_id = request.path_params["connection_id"]
        body = await request.body()
        refused = await self._authorized(request, body)
        if refused is not None:
            return refused
        conn = self.connections.get(connection_id)
        if conn is None or not conn.open:
            return _aws_error(410, "GoneException")
        if request.method == "POST":
            data = body
            if len(data) > self.config.message_limit:
                return _aws_error(413, "PayloadTooLargeException", "Payload too large")
            try:
                text: str | bytes = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data
            try:
                await self._send(conn, text)
            except ConnectionGone:
                return _aws_error(410, "GoneException")
            return Response(status_code=200)
        if request.method == "GET":
            # The wire names of GetConnectionResponse (boto3 shows them capitalised).
            info: dict[str, Any] = {
                "connectedAt": _iso(conn.connected_at),
                "identity": {"sourceIp": conn.source_ip, "userAgent": conn.user_agent or ""},
                "lastActiveAt": _iso(conn.last_active),
            }
            return JSONResponse(info)
        await self._close(conn, 1001, "Going away")  # DELETE
        return Response(status_code=204)


_DEFAULT_REASONS = {
    1000: "",
    1001: "Going away",
    1005: "Client-side close frame status not set",
    1006: "Connection closed abnormally",
    1009: "Message too big",
    1012: "Service restart",
}


def _status_of(result: Any) -> tuple[int, dict[str, str]]:
    if isinstance(result, dict):
        try:
            status = int(result.get("statusCode", 200))
        except (TypeError, ValueError):
            status = 502
        headers = result.get("headers") or {}
        return status, {str(k): str(v) for k, v in headers.items()}
    return 200, {}


def _aws_error(status: int, error_type: str, message: str | None = None) -> Response:
    return JSONResponse(
        {"message": message},
        status_code=status,
        headers={"x-amzn-ErrorType": error_type, "x-amzn-RequestId": str(uuid.uuid4())},
    )


# ---------------------------------------------------------------------------
# uvicorn glue
# ---------------------------------------------------------------------------


def _oversized_head(head: bytes, limit: int) -> str | None:
    """Why a handshake's request head is refused with 431, or None when it fits."""
    lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    if len(lines[0]) > limit:
        return f"the request line is over {limit} bytes"
    if sum(len(line) + 2 for line in lines[1:]) > limit:
        return f"the headers are over {limit} bytes"
    if len(lines) - 1 > HANDSHAKE_MAX_HEADERS:
        return f"more than {HANDSHAKE_MAX_HEADERS} headers"
    return None


_STATUS_TEXT = {400: "Bad Request", 431: "Request Header Fields Too Large"}


@functools.cache
def limited_ws_protocol(
    frame_limit: int, message_limit: int, handshake_limit: int = HANDSHAKE_LIMIT
) -> type[asyncio.Protocol]:
    """uvicorn's websockets (sans-I/O) protocol, closing with 1009 over the limits.

    A frame over ``frame_limit`` or a (possibly fragmented) message over
    ``message_limit`` fails the connection with 1009 before its payload is
    read, exactly like the ``websockets`` library's own ``max_size``. A
    handshake whose request line or headers are over ``handshake_limit``
    bytes is answered 431, and one the WebSocket parser cannot read 400 (it
    would otherwise leave the client waiting for an answer that never comes).
    """
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from websockets.exceptions import SecurityError

    class LimitedWebSocketProtocol(WebSocketsSansIOProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            conn: Any = self.conn
            if hasattr(conn, "max_fragment_size"):
                conn.max_message_size = message_limit
                conn.max_fragment_size = frame_limit
            else:  # older websockets: one limit, checked per frame and per message
                conn.max_size = message_limit
            self._message_bytes = 0
            self._head_checked = False

        def data_received(self, data: bytes) -> None:
            if not self._head_checked:
                # uvicorn's HTTP protocol hands the whole parsed head over in one call.
                self._head_checked = True
                why = _oversized_head(data, handshake_limit)
                if why is not None:
                    self._refuse(431, why)
                    return
            super().data_received(data)
            failed = getattr(self.conn, "handshake_exc", None)
            if not self.handshake_initiated and failed is not None and not self.close_sent:
                too_big = isinstance(failed.__cause__, SecurityError)
                self._refuse(431 if too_big else 400, str(failed.__cause__ or failed))

        def _refuse(self, status: int, why: str) -> None:
            log.info("handshake refused %d: %s", status, why)
            body = f"{_STATUS_TEXT[status]}: {why}\n".encode()
            head = (
                f"HTTP/1.1 {status} {_STATUS_TEXT[status]}\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            self.handshake_complete = True
            self.close_sent = True
            self.transport.write(head.encode() + body)
            self.transport.close()

        def _over(self, event: Any, first: bool) -> bool:
            size = len(event.data)
            self._message_bytes = size if first else self._message_bytes + size
            if size > frame_limit or self._message_bytes > message_limit:
                self.conn.fail(1009, "Message too big")
                self.handle_parser_exception()
                return True
            return False

        def handle_text(self, event: Any) -> None:
            if not self._over(event, True):
                super().handle_text(event)

        def handle_bytes(self, event: Any) -> None:
            if not self._over(event, True):
                super().handle_bytes(event)

        def handle_cont(self, event: Any) -> None:
            if not self._over(event, False):
                super().handle_cont(event)

        async def send(self, message: Any) -> None:
            await super().send(message)
            if message["type"] == "websocket.http.response.body" and not message.get(
                "more_body", False
            ):
                # A refused handshake is complete once its response is written
                # (uvicorn would otherwise log "returned without completing handshake").
                self.handshake_complete = True

    return LimitedWebSocketProtocol


def uvicorn_config(app: Any, gateway: Gateway | None = None, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn config for an app holding the gateway: its limits, no compression.

    API Gateway does not negotiate permessage-deflate, so neither does this.
    """
    cfg = gateway.config if gateway is not None else GatewayConfig()
    options: dict[str, Any] = {
        "log_level": "warning",
        "lifespan": "on",
        "http": "h11",
        # A head split over many packets is buffered up to this, so an
        # oversized handshake reaches the 431 check whole.
        "h11_max_incomplete_event_size": _HEAD_BUFFER_LIMIT,
        "ws": limited_ws_protocol(cfg.frame_limit, cfg.message_limit, cfg.handshake_limit),
        "ws_max_size": cfg.message_limit,
        "ws_per_message_deflate": False,
        "timeout_graceful_shutdown": 5,
    }
    options.update(kwargs)
    return uvicorn.Config(app, **options)


@dataclass(frozen=True)
class RunningServer:
    """A server started by :func:`serve`.

    Attributes:
        url: ``http://host:port``.
        ws_url: ``ws://host:port``.
        host: the host clients connect to.
        port: the bound port.
    """

    url: str
    ws_url: str
    host: str
    port: int
    server: uvicorn.Server


@contextlib.contextmanager
def serve(
    app: Any,
    gateway: Gateway | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    **uvicorn_kwargs: Any,
) -> Iterator[RunningServer]:
    """Serve ``app`` (holding ``gateway``) with uvicorn in a background thread.

    Yields:
        The running server; it stops (sockets closed, ``$disconnect`` run) when
        the block exits.
    """
    with serve_uvicorn(
        uvicorn_config(app, gateway, **uvicorn_kwargs),
        host,
        port,
        thread_name="rejoin-gateway",
        description="the gateway",
        stop_timeout=15,
    ) as served:
        yield RunningServer(
            url=served.url(),
            ws_url=served.url("ws"),
            host=served.host,
            port=served.port,
            server=served.server,
        )
