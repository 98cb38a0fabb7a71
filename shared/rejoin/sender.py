"""Posting frames to WebSocket connections.

A :class:`ConnectionSender` is the one seam between rejoin and API Gateway's
``@connections`` API, injectable the way an httpx transport is:
:class:`ApiGatewaySender` talks to AWS, :class:`InMemorySender` records frames
for tests and feeds the local stack's gateway.

A sender makes one attempt per call. The retry policy (exponential backoff
with full jitter on HTTP 429) lives in :func:`send` and :func:`broadcast`, so
it is the same for every sender and testable with a fake clock. Both split
frames over API Gateway's 32 KB frame limit into ``part`` frames
(:func:`split_frame`, see ``docs/protocol.md``).

:class:`ApiGatewaySender` signs its requests itself (SigV4, ``rejoin._sigv4``)
and sends them over its own keep-alive HTTP/1.1 connections
(``rejoin._http1``): boto3 spent ~1 ms of CPU per post, serialised on the
GIL, which made a broadcast to 100 connections take several times one post.
Both modules import only the standard library, and only when an
:class:`ApiGatewaySender` is built; botocore is imported only when the
environment holds no credentials (see :class:`rejoin._sigv4.CredentialSource`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import json
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urlsplit

from .errors import ConfigError, ConnectionGone, PayloadTooLarge, SendError, SenderThrottled
from .frames import encode_frame

if TYPE_CHECKING:
    from ._http1 import Pool, Response
    from ._sigv4 import Signer

__all__ = [
    "ApiGatewaySender",
    "BroadcastResult",
    "ConnectionSender",
    "InMemorySender",
    "broadcast",
    "send",
    "split_frame",
]

FRAME_LIMIT = 32 * 1024
MESSAGE_LIMIT = 128 * 1024

DeliverHook = Callable[[str, bytes], Awaitable[None] | None]


class ConnectionSender(Protocol):
    """Posts to, checks and closes WebSocket connections. One attempt per call."""

    async def post(self, connection_id: str, data: bytes) -> None:
        """Send ``data`` (one encoded frame) to the connection.

        Raises:
            ConnectionGone: the connection is closed (HTTP 410).
            SenderThrottled: the request was throttled (HTTP 429).
            PayloadTooLarge: ``data`` is larger than the gateway accepts.
            SendError: any other failure.
        """
        ...

    async def exists(self, connection_id: str) -> bool:
        """Return whether the connection is open (False when it is gone).

        Raises:
            SenderThrottled: the request was throttled (HTTP 429).
            SendError: any other failure.
        """
        ...

    async def close(self, connection_id: str) -> None:
        """Close the connection; a connection already gone is not an error.

        Raises:
            SenderThrottled: the request was throttled (HTTP 429).
            SendError: any other failure.
        """
        ...


# --- API Gateway -------------------------------------------------------------

_THROTTLED_CODES = frozenset(
    {"LimitExceededException", "TooManyRequestsException", "ThrottlingException"}
)
_REGION_IN_HOST = re.compile(r"\.execute-api\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?$")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_MESSAGE_CHARS = 200
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class ApiGatewaySender:
    """Posts through API Gateway's management API (``@connections``).

    Each request is signed here with SigV4 (service ``execute-api``) using the
    credentials Lambda gives the function (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, read again at most once
    a second; without them botocore's credential chain, e.g. SnapStart's
    container credentials, refreshed before they expire), and sent over
    keep-alive HTTP/1.1 connections: ``POST``, ``GET`` and ``DELETE``
    ``{endpoint}/@connections/{id}``, the id percent-encoded as boto3 does.
    A post costs ~0.15 ms of CPU, so a broadcast to 100 connections takes
    little longer than one post (``bench/README.md``).

    Build one per endpoint and keep it (e.g. at module scope): it keeps a
    pool of connections for each event loop that uses it (a pool belongs to
    its loop and is never used from another).

    Args:
        endpoint_url: ``https://{api-id}.execute-api.{region}.amazonaws.com/{stage}``
            (or a custom domain with its base path).
        region: the region to sign for; by default read from an
            ``execute-api`` host name, else ``AWS_REGION``.
        timeout: seconds to wait for API Gateway's answer once a request is
            sent; then it fails with :class:`~rejoin.errors.SendError` (up to
            a fifth of ``timeout`` later, at most 0.5 s: one timer checks every
            request in flight).
        connect_timeout: seconds to open a connection.
        max_connections: requests in flight at once per event loop (the
            default matches :func:`broadcast`'s ``max_parallel``).
        clock: the signing time in seconds since the epoch (injected in tests).

    Raises:
        ConfigError: the endpoint is not an http(s) URL.
    """

    def __init__(
        self,
        endpoint_url: str,
        *,
        region: str | None = None,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        max_connections: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Imported here, not with this module: handlers that never post skip them.
        from ._http1 import HttpError
        from ._sigv4 import CredentialSource, canonical_path

        parts = urlsplit(endpoint_url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or not endpoint_url.isascii():
            raise ConfigError("the API Gateway endpoint must be an https:// URL")
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._endpoint_url = endpoint_url.rstrip("/")
        self._scheme = parts.scheme
        self._hostname = parts.hostname
        self._port = parts.port or _DEFAULT_PORTS[parts.scheme]
        shown = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        # The Host header (and what is signed): the port only when not the default.
        default_port = _DEFAULT_PORTS[parts.scheme]
        self._host = shown if parts.port in (None, default_port) else f"{shown}:{parts.port}"
        self._base_path = parts.path.rstrip("/")
        match = _REGION_IN_HOST.search(parts.hostname)
        self._region = region or (match.group(1) if match else None) or _env_region()
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._clock = clock
        self._http_error = HttpError
        self._credentials = CredentialSource(clock=clock)
        self._canonical_prefix = canonical_path(f"{self._base_path}/@connections/")
        self._signer: Signer | None = None
        self._pools: dict[asyncio.AbstractEventLoop, Pool] = {}
        self._pools_lock = threading.Lock()
        # The body's hash, kept for the next post of the same bytes (a broadcast).
        self._last_payload: tuple[bytes, str] | None = None

    @property
    def endpoint_url(self) -> str:
        """The management API endpoint."""
        return self._endpoint_url

    async def post(self, connection_id: str, data: bytes) -> None:
        """Send ``data`` to the connection (PostToConnection). See :class:`ConnectionSender`."""
        await self._call("PostToConnection", "POST", connection_id, bytes(data))

    async def exists(self, connection_id: str) -> bool:
        """Return whether the connection is open (GetConnection)."""
        try:
            await self._call("GetConnection", "GET", connection_id, b"")
        except ConnectionGone:
            return False
        return True

    async def close(self, connection_id: str) -> None:
        """Close the connection (DeleteConnection); ignore one already gone."""
        with contextlib.suppress(ConnectionGone):
            await self._call("DeleteConnection", "DELETE", connection_id, b"")

    async def aclose(self) -> None:
        """Close the running event loop's idle connections (a later call opens new ones)."""
        with self._pools_lock:
            pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            pool.close()

    async def _call(self, operation: str, method: str, connection_id: str, body: bytes) -> None:
        if not connection_id:
            raise SendError(f"{operation}: the connection id is empty")
        segment, canonical_segment = _id_segment(connection_id)
        path = f"{self._base_path}/@connections/{segment}"
        credentials = await self._credentials.get()
        headers = self._get_signer().sign(
            method,
            self._host,
            path,
            self._payload_sha256(body),
            credentials,
            self._clock(),
            canonical_uri=None
            if canonical_segment is None
            else self._canonical_prefix + canonical_segment,
        )
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        lines.append("User-Agent: rejoin")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body
        try:
            response = await self._pool().request(method, request)
        except self._http_error as exc:
            raise SendError(f"{operation} for {connection_id} failed: {exc}") from exc
        if 200 <= response.status < 300:
            return
        hidden = (credentials.secret_key, credentials.token)
        raise _map_error(operation, connection_id, response, hidden, self._region)

    def _get_signer(self) -> Signer:
        signer = self._signer
        if signer is None:
            from ._sigv4 import Signer

            region = self._region or _env_region()
            if not region:
                raise ConfigError("no AWS region for the API Gateway endpoint: set AWS_REGION")
            signer = self._signer = Signer(region, "execute-api")
        return signer

    def _payload_sha256(self, body: bytes) -> str:
        if not body:
            return _EMPTY_SHA256
        last = self._last_payload
        if last is not None and last[0] is body:
            return last[1]
        digest = hashlib.sha256(body).hexdigest()
        self._last_payload = (body, digest)
        return digest

    def _pool(self) -> Pool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            from ._http1 import Pool

            with self._pools_lock:
                # A closed loop's connections died with it: forget them.
                for old in [other for other in self._pools if other.is_closed()]:
                    del self._pools[old]
                pool = self._pools.get(loop)
                if pool is None:
                    pool = self._pools[loop] = Pool(
                        self._scheme,
                        self._hostname,
                        self._port,
                        max_connections=self._max_connections,
                        connect_timeout=self._connect_timeout,
                        request_timeout=self._timeout,
                    )
        return pool


@functools.lru_cache(maxsize=4096)
def _id_segment(connection_id: str) -> tuple[str, str | None]:
    """The id as a path segment, encoded as boto3 does, and its SigV4 canonical form.

    The canonical form encodes the segment once more (only ``%`` can change:
    the rest is unreserved). None for ``.`` and ``..``, which only the whole
    path's normalisation can handle.
    """
    segment = quote(connection_id, safe="")
    return segment, None if connection_id in (".", "..") else segment.replace("%", "%25")


def _env_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def _map_error(
    operation: str,
    connection_id: str,
    response: Response,
    hidden: tuple[str | None, ...],
    region: str | None,
) -> SendError:
    status = response.status
    # "GoneException" or "GoneException:http://internal.amazon.com/...".
    code = response.headers.get("x-amzn-errortype", "").split(":")[0].strip()
    message = ""
    try:
        parsed = json.loads(response.body) if response.body else None
    except ValueError:  # API Gateway sometimes answers 410 with a body that is not JSON
        parsed = None
    if isinstance(parsed, dict):
        code = code or str(parsed.get("__type") or "").split("#")[-1]
        text = parsed.get("message") or parsed.get("Message")
        message = _clean_message(text, hidden) if isinstance(text, str) else ""
    if status == 410 or code == "GoneException":
        return ConnectionGone(f"connection {connection_id} is gone")
    if status == 429 or code in _THROTTLED_CODES:
        return SenderThrottled(f"{operation} for {connection_id} was throttled ({code or status})")
    if status == 413 or code == "PayloadTooLargeException":
        return PayloadTooLarge(f"{operation} for {connection_id}: the frame is too large")
    detail = f"{code or 'error'} (HTTP {status})" + (f": {message}" if message else "")
    if status == 403:
        return SendError(
            f"{operation} for {connection_id} was refused: {detail}. Check that the "
            f"function may execute-api:ManageConnections on this API and signs for its "
            f"region ({region})"
        )
    return SendError(f"{operation} for {connection_id} failed: {detail}")


def _clean_message(text: str, hidden: tuple[str | None, ...]) -> str:
    # API Gateway's signature errors quote the canonical request, session token
    # included: keep the first line only, short, and blank any secret anyway.
    line = text.strip().splitlines()[0] if text.strip() else ""
    for secret in hidden:
        if secret:
            line = line.replace(secret, "***")
    return line[:_MESSAGE_CHARS] + ("..." if len(line) > _MESSAGE_CHARS else "")


# --- in memory ---------------------------------------------------------------


class InMemorySender:
    """Records what is posted, per connection; for tests and the local stack.

    Safe to call from event loops in several threads: state is guarded by a
    lock that is never held across an ``await``.

    Args:
        latency: seconds each ``post`` waits before delivering (benchmarks).
        on_deliver: called with the connection id and the bytes after each
            delivery (may be a coroutine function), e.g. to push the frame to
            a real socket. Its exceptions propagate to the poster; it should
            raise :class:`~rejoin.errors.ConnectionGone` when its socket is closed.
        max_frame_bytes: posts larger than this raise PayloadTooLarge, as a
            gateway would (None: no limit). Defaults to the 32 KB frame
            limit, so code that bypasses :func:`split_frame` is caught.
        record: keep what is delivered (for :meth:`frames`); a long-running
            local stack turns it off so memory does not grow.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        on_deliver: DeliverHook | None = None,
        max_frame_bytes: int | None = FRAME_LIMIT,
        record: bool = True,
    ) -> None:
        self.latency = latency
        self.on_deliver = on_deliver
        self.record = record
        self.max_frame_bytes = max_frame_bytes
        self._lock = threading.Lock()
        self._open: set[str] = set()
        self._delivered: dict[str, list[bytes]] = {}
        self._throttles: dict[str, int] = {}
        self._posts = 0

    def open(self, connection_id: str) -> None:
        """Open a connection (a client connected)."""
        with self._lock:
            self._open.add(connection_id)
            self._delivered.setdefault(connection_id, [])

    def close_socket(self, connection_id: str) -> None:
        """Simulate the client going away: later posts raise ConnectionGone."""
        with self._lock:
            self._open.discard(connection_id)

    def throttle(self, connection_id: str, times: int) -> None:
        """Make the next ``times`` posts to the connection raise SenderThrottled."""
        with self._lock:
            self._throttles[connection_id] = self._throttles.get(connection_id, 0) + times

    def raw(self, connection_id: str) -> list[bytes]:
        """Everything delivered to the connection, in order, as posted."""
        with self._lock:
            return list(self._delivered.get(connection_id, ()))

    def frames(self, connection_id: str) -> list[dict[str, Any]]:
        """Everything delivered to the connection, in order, decoded from JSON."""
        return [json.loads(data) for data in self.raw(connection_id)]

    @property
    def posts(self) -> int:
        """How many times ``post`` was called, whatever the outcome."""
        with self._lock:
            return self._posts

    async def post(self, connection_id: str, data: bytes) -> None:
        """Deliver ``data`` to the connection. See :class:`ConnectionSender`."""
        with self._lock:
            self._posts += 1
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        limit = self.max_frame_bytes
        if limit is not None and len(data) > limit:
            raise PayloadTooLarge(f"a frame of {len(data)} bytes is over {limit} bytes")
        gone, pending = False, 0
        with self._lock:
            # Checked after the latency: the socket may have closed meanwhile.
            if connection_id not in self._open:
                gone = True
            else:
                pending = self._throttles.get(connection_id, 0)
                if pending > 0:
                    self._throttles[connection_id] = pending - 1
                elif self.record:
                    self._delivered[connection_id].append(bytes(data))
        if gone:
            raise ConnectionGone(f"connection {connection_id} is gone")
        if pending > 0:
            raise SenderThrottled(f"posting to {connection_id} was throttled")
        hook = self.on_deliver
        if hook is not None:
            result = hook(connection_id, bytes(data))
            if inspect.isawaitable(result):
                await result

    async def exists(self, connection_id: str) -> bool:
        """Return whether the connection is open."""
        with self._lock:
            return connection_id in self._open

    async def close(self, connection_id: str) -> None:
        """Close the connection (as DeleteConnection); closing twice is fine."""
        self.close_socket(connection_id)


# --- splitting ----------------------------------------------------------------


def split_frame(
    frame: Mapping[str, Any],
    *,
    frame_limit: int = FRAME_LIMIT,
    message_limit: int = MESSAGE_LIMIT,
) -> list[bytes]:
    """Encode ``frame``, as ``part`` frames when it is over ``frame_limit`` bytes.

    Each part is ``{"type": "part", "id", "index", "count", "data"}``; the
    ``data`` of parts ``0..count-1`` concatenated is the frame's JSON, exactly.
    Every part's own encoding (envelope and escaping included) is at most
    ``frame_limit`` bytes.

    Returns:
        The encoded frames to post, in order (one when no split is needed).

    Raises:
        PayloadTooLarge: the frame's encoding is over ``message_limit`` bytes.
        ValueError: ``frame_limit`` is too small to carry any data.
    """
    data = encode_frame(frame)
    if len(data) > message_limit:
        raise PayloadTooLarge(
            f"a {frame.get('type', 'server')!s:.32} frame of {len(data)} bytes is over "
            f"the {message_limit}-byte message limit"
        )
    if len(data) <= frame_limit:
        return [data]
    text = data.decode("utf-8")
    part_id = "p-" + secrets.token_hex(6)
    # Each part carries at least one byte, so len(data) bounds index and count:
    # sizing the envelope with it is conservative for every part.
    envelope = _part(part_id, len(data), len(data), "")
    budget = frame_limit - len(encode_frame(envelope))
    if budget < 6:  # the largest escape of one character, \u001f
        raise ValueError(f"frame_limit {frame_limit} is too small to split into parts")
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end = _chunk_end(text, start, budget)
        chunks.append(text[start:end])
        start = end
    parts = [encode_frame(_part(part_id, i, len(chunks), c)) for i, c in enumerate(chunks)]
    if any(len(part) > frame_limit for part in parts):  # pragma: no cover - by construction
        raise PayloadTooLarge("a part exceeds the frame limit")
    return parts


def _part(part_id: str, index: int, count: int, data: str) -> dict[str, Any]:
    return {"type": "part", "id": part_id, "index": index, "count": count, "data": data}


def _escaped_size(text: str) -> int:
    """Bytes ``text`` takes inside a JSON string as encode_frame writes it."""
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8")) - 2


def _chunk_end(text: str, start: int, budget: int) -> int:
    """The largest ``end`` such that ``text[start:end]`` fits ``budget`` escaped bytes."""
    # Every character takes at least one byte, so at most `budget` of them fit.
    hi = min(len(text), start + budget)
    if _escaped_size(text[start:hi]) <= budget:
        return hi
    lo = start + 1  # one character always fits (budget >= 6)
    while lo < hi - 1:
        mid = (lo + hi) // 2
        if _escaped_size(text[start:mid]) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


# --- sending with retries -----------------------------------------------------


@dataclass
class BroadcastResult:
    """What happened to each connection of a broadcast.

    Attributes:
        delivered: connections that got the whole frame (every part).
        gone: connections that are closed; the caller removes them from the room.
        failed: connection id to why it failed (throttled past the retries,
            or another send error).
    """

    delivered: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Retry:
    max_attempts: int
    base_delay: float
    max_delay: float
    sleep: Callable[[float], Awaitable[Any]]
    rand: Callable[[], float]

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must not be negative")

    async def post(self, sender: ConnectionSender, connection_id: str, data: bytes) -> None:
        for attempt in range(self.max_attempts):
            try:
                await sender.post(connection_id, data)
                return
            except SenderThrottled:
                if attempt + 1 >= self.max_attempts:
                    break
            # Full jitter: spreads the retries of many throttled posts apart.
            ceiling = min(self.max_delay, self.base_delay * 2**attempt)
            await self.sleep(self.rand() * ceiling)
        raise SenderThrottled(
            f"posting to {connection_id} was throttled {self.max_attempts} times; gave up"
        )

    async def post_all(
        self, sender: ConnectionSender, connection_id: str, parts: list[bytes]
    ) -> None:
        for data in parts:
            await self.post(sender, connection_id, data)


async def send(
    sender: ConnectionSender,
    connection_id: str,
    frame: Mapping[str, Any],
    *,
    max_attempts: int = 5,
    base_delay: float = 0.05,
    max_delay: float = 2.0,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> None:
    """Send one frame to one connection, split if needed, retrying throttling.

    Args:
        sender: where to post.
        connection_id: the connection.
        frame: the server frame (a dict).
        max_attempts: tries per encoded frame, the first included.
        base_delay: the backoff ceiling of the first retry, in seconds;
            doubled for each further retry.
        max_delay: the largest backoff ceiling, in seconds.
        sleep: awaited with each backoff delay (inject a fake in tests).
        rand: returns a float in [0, 1) scaling each delay (full jitter).

    Raises:
        ConnectionGone: the connection is closed.
        SenderThrottled: still throttled after ``max_attempts`` tries.
        PayloadTooLarge: the frame is over 128 KB.
        SendError: any other failure.
    """
    retry = _Retry(max_attempts, base_delay, max_delay, sleep, rand)
    await retry.post_all(sender, connection_id, split_frame(frame))


async def broadcast(
    sender: ConnectionSender,
    connection_ids: Iterable[str],
    frame: Mapping[str, Any],
    *,
    max_parallel: int = 100,
    max_attempts: int = 5,
    base_delay: float = 0.05,
    max_delay: float = 2.0,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> BroadcastResult:
    """Send one frame to many connections in parallel.

    The frame is encoded (and split) once. Each connection is tried on its
    own: one that is gone or failing never affects the others. A connection
    listed twice is posted to once.

    Args:
        sender: where to post.
        connection_ids: the connections.
        frame: the server frame (a dict).
        max_parallel: the most connections posted to at once.
        max_attempts: see :func:`send`.
        base_delay: see :func:`send`.
        max_delay: see :func:`send`.
        sleep: see :func:`send`.
        rand: see :func:`send`.

    Returns:
        The connections delivered, gone and failed, each in the order given.

    Raises:
        PayloadTooLarge: the frame is over 128 KB (nothing was sent).
    """
    if max_parallel < 1:
        raise ValueError("max_parallel must be at least 1")
    retry = _Retry(max_attempts, base_delay, max_delay, sleep, rand)
    parts = split_frame(frame)
    ids = list(dict.fromkeys(connection_ids))
    gone: set[str] = set()
    failed: dict[str, str] = {}
    queue = iter(ids)

    async def worker() -> None:
        # Workers share one iterator: asyncio runs them on one thread, so
        # each id is taken exactly once.
        for connection_id in queue:
            try:
                await retry.post_all(sender, connection_id, parts)
            except ConnectionGone:
                gone.add(connection_id)
            except SendError as exc:
                failed[connection_id] = str(exc)

    tasks = [asyncio.ensure_future(worker()) for _ in range(min(max_parallel, len(ids)))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # An unexpected error (a bug in a sender) or cancellation: stop the rest.
        for task in tasks:
            task.cancel()
        raise
    return BroadcastResult(
        delivered=[c for c in ids if c not in gone and c not in failed],
        gone=[c for c in ids if c in gone],
        failed={c: failed[c] for c in ids if c in failed},
    )
