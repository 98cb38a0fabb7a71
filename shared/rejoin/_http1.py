"""A small HTTP/1.1 client for one origin: keep-alive connections, whole bodies in memory.

Why not httpx: with 100 requests in flight, httpcore's pool re-examines every
connection for every request (and polls each idle socket while doing so), so
a broadcast to 100 connections cost ~5 ms of CPU per post here, more than
boto3 (bench/README.md). This client keeps a LIFO list of idle connections and does nothing per
request beyond writing it and parsing the answer (~0.1 ms of CPU). It serves
the requests rejoin makes to API Gateway's management API (small bodies) and,
with a larger body limit, to Upstash's REST API (:mod:`rejoin._upstash_http`):
``Content-Length`` or chunked answers, no redirects, no proxies.

A :class:`Pool` belongs to the event loop that created it (its transports
do); the caller keeps one per loop.
"""

from __future__ import annotations

import asyncio
import collections
import select
import ssl
import threading
from typing import Literal

from .errors import SendError

__all__ = ["HttpError", "Pool", "Response"]

MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024  # the default limit; a Pool may set its own
# An idle connection older than this is checked for a close from the server
# before it is reused (a Lambda thawed after minutes has stale ones).
_STALE_CHECK_AFTER = 1.0
_CHUNKED, _UNTIL_CLOSE = -1, -2

_ssl_context: ssl.SSLContext | None = None
_ssl_lock = threading.Lock()


ErrorKind = Literal[
    "connect", "connect_timeout", "pool_timeout", "timeout", "closed", "reset", "protocol"
]


class HttpError(SendError):
    """The request failed below HTTP: connect, reset, timeout, malformed answer.

    Attributes:
        before_response: no byte of an answer arrived (the request may be
            retried on a fresh connection if this one was reused).
        written: the request was handed to the connection, so the server may
            have received and applied it even if no answer came.
        kind: what failed: ``connect`` (could not open a connection),
            ``connect_timeout``, ``pool_timeout`` (no free connection before the
            deadline), ``timeout`` (no whole answer in time), ``closed`` (the
            server closed the connection before the whole answer), ``reset``
            (the connection failed with an OS error) or ``protocol`` (a
            malformed or too large answer).
    """

    def __init__(
        self,
        message: str,
        *,
        before_response: bool = False,
        written: bool = True,
        kind: ErrorKind = "protocol",
    ) -> None:
        super().__init__(message)
        self.before_response = before_response
        self.written = written
        self.kind: ErrorKind = kind


class Response:
    """An HTTP answer: status, headers (lower-case names) and the whole body.

    The headers are parsed when first read (only error answers need them).
    """

    __slots__ = ("_head", "_headers", "body", "status")

    def __init__(self, status: int, head: bytes, body: bytes) -> None:
        self.status = status
        self.body = body
        self._head = head
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        """Header names in lower case; a repeated header's values joined with ``, ``."""
        headers = self._headers
        if headers is None:
            headers = {}
            for line in self._head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                name, value = name.strip().lower(), value.strip()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            self._headers = headers
        return headers


def _default_ssl_context() -> ssl.SSLContext:
    # Built once per process (loading the CA bundle takes milliseconds); an
    # SSLContext may be shared by threads. certifi's bundle, as botocore and
    # httpx use, when it is installed (it is, with httpx, in the layer).
    global _ssl_context
    with _ssl_lock:
        if _ssl_context is None:
            try:
                import certifi

                _ssl_context = ssl.create_default_context(cafile=certifi.where())
            except ImportError:  # pragma: no cover - certifi comes with httpx
                _ssl_context = ssl.create_default_context()
        return _ssl_context


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = True
        self.idle_since = 0.0
        self._buf = bytearray()
        self._waiter: asyncio.Future[Response] | None = None
        self._method = "GET"
        self._head: tuple[int, bytes, int, bool] | None = None
        self._chunks: bytearray | None = None  # a chunked body read so far
        self._got_bytes = False

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            # Bytes nobody asked for: the server is closing or confused.
            self.reusable = False
            return
        self._got_bytes = True
        self._buf += data
        try:
            response = self._parse()
        except HttpError as exc:
            self.reusable = False
            waiter.set_exception(exc)
            return
        if response is not None:
            waiter.set_result(response)

    def eof_received(self) -> bool:
        self.reusable = False
        head, waiter = self._head, self._waiter
        if head is not None and head[2] == _UNTIL_CLOSE and waiter and not waiter.done():
            status, raw_head, _, _ = head
            waiter.set_result(Response(status, raw_head, bytes(self._buf)))
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            reason = f" ({type(exc).__name__})" if exc else ""
            waiter.set_exception(
                HttpError(
                    f"the connection closed before the whole answer{reason}",
                    before_response=not self._got_bytes,
                    kind="reset" if exc is not None else "closed",
                )
            )

    # -- use --

    async def exchange(self, method: str, request: bytes) -> Response:
        """Write one request and wait for its answer."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise HttpError(
                "the connection is closed", before_response=True, written=False, kind="closed"
            )
        self._method = method
        self._got_bytes = False
        self._head = None
        self._chunks = None
        self._buf.clear()
        waiter: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            transport.write(request)
            return await waiter
        finally:
            self._waiter = None

    def peer_closed(self) -> bool:
        """Whether the server closed (or wrote to) this idle connection."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return True
        sock = transport.get_extra_info("socket")
        if sock is None:  # pragma: no cover - every socket transport has one
            return False
        # An idle HTTP/1.1 connection has nothing to read: a FIN, a TLS alert
        # or stray bytes all mean it must not carry another request.
        try:
            poller = select.poll()  # not select.select: no limit on fd numbers
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def fail(self, error: HttpError) -> None:
        """End the exchange in progress with ``error`` and drop the connection."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.close()

    def close(self) -> None:
        self.reusable = False
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    # -- parsing --

    def _parse(self) -> Response | None:
        buf = self._buf
        while self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise HttpError("the answer's headers are too large")
                return None
            head = _parse_head(bytes(buf[:end]), self._method, self.max_body)
            del buf[: end + 4]
            if 100 <= head[0] < 200:
                continue  # an interim answer (100 Continue): the real one follows
            self._head = head
        status, raw_head, length, keep_alive = self._head
        if length >= 0:
            if len(buf) < length:
                return None
            body = bytes(buf[:length])
            del buf[:length]
        elif length == _CHUNKED:
            if self._chunks is None:
                self._chunks = bytearray()
            if not _read_chunks(buf, self._chunks, self.max_body):
                return None
            body = bytes(self._chunks)
            self._chunks = None
        else:  # until the server closes: eof_received completes it
            if len(buf) > self.max_body:
                raise HttpError("the answer is too large")
            return None
        if buf:  # bytes past the answer: never reuse a connection out of step
            keep_alive = False
        self._head = None
        self.reusable = keep_alive
        return Response(status, raw_head, body)


def _parse_head(raw: bytes, method: str, max_body: int) -> tuple[int, bytes, int, bool]:
    """Status, the head itself, the body's length (or how it ends) and keep-alive."""
    # Only three headers matter here: find them in a lower-cased copy (C speed)
    # instead of splitting every line; the rest is parsed if an error needs it.
    if raw[:7] != b"HTTP/1." or raw[8:9] != b" " or not raw[9:12].isdigit():
        raise HttpError(f"not an HTTP/1.x answer: {raw[:80]!r}")
    status = int(raw[9:12])
    lower = raw.lower()
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        length = 0
    elif b"chunked" in (_header(lower, b"transfer-encoding") or b""):
        length = _CHUNKED
    else:
        text = _header(lower, b"content-length")
        if text is None:
            length = _UNTIL_CLOSE
        else:
            text = text.split(b",")[0].strip()
            if not text.isdigit():
                raise HttpError("a malformed Content-Length in the answer")
            length = int(text)
            if length > max_body:
                raise HttpError(f"the answer is too large ({length} bytes, at most {max_body})")
    keep_alive = (
        raw[5:8] == b"1.1"
        and b"close" not in (_header(lower, b"connection") or b"")
        and length != _UNTIL_CLOSE
    )
    return status, raw, length, keep_alive


def _header(lower: bytes, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case), in lower case; None if absent."""
    start = lower.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    end = lower.find(b"\r\n", start)
    return lower[start : end if end >= 0 else len(lower)].strip()


def _read_chunks(buf: bytearray, body: bytearray, max_body: int) -> bool:
    """Move the complete chunks at the start of ``buf`` into ``body``; True at the end.

    Consumes what it parsed, so each byte of a large chunked answer is looked
    at once, however many reads it arrives in.
    """
    while True:
        eol = buf.find(b"\r\n")
        if eol < 0:
            if len(buf) > MAX_HEAD:
                raise HttpError("a malformed chunk size in the answer")
            return False
        size_text = bytes(buf[:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpError("a malformed chunk size in the answer") from None
        if size == 0:
            # The last chunk, then trailers (usually none) up to an empty line.
            if buf[eol + 2 : eol + 4] == b"\r\n":
                del buf[: eol + 4]
                return True
            trailers_end = buf.find(b"\r\n\r\n", eol)
            if trailers_end < 0:
                return False
            del buf[: trailers_end + 4]
            return True
        if len(body) + size > max_body:
            raise HttpError(f"the answer is too large (more than {max_body} bytes)")
        start = eol + 2
        if len(buf) < start + size + 2:
            return False
        if buf[start + size : start + size + 2] != b"\r\n":
            raise HttpError("a malformed chunk in the answer")
        body += buf[start : start + size]
        del buf[: start + size + 2]


class Pool:
    """Keep-alive connections to one origin, for the event loop that uses it.

    Args:
        scheme: ``http`` or ``https``.
        host: the host to connect to (and to check the certificate of).
        port: the port.
        max_connections: the most requests in flight at once; more wait.
        connect_timeout: seconds to open a connection (TLS included).
        request_timeout: seconds to wait for the answer once the request is
            written (connecting has ``connect_timeout``). One timer checks every
            request in flight a few times per timeout, so a late answer fails
            up to a fifth of it later (at most 0.5 s).
        idle_timeout: seconds an idle connection is kept.
        max_body: the largest answer body accepted, in bytes (a larger one
            fails with :class:`HttpError`, its connection closed).
        retry_written: whether a request written on a reused connection that
            closed before any answer is sent again on a fresh one. True suits
            API Gateway's posts (the usual cause is a keep-alive connection
            the server closed while idle). False when the server may have
            applied the request before dropping the connection and applying
            it twice must be the caller's decision: then only a request found
            unsendable before any byte was written is retried here.
    """

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        *,
        max_connections: int = 100,
        connect_timeout: float = 2.0,
        request_timeout: float = 5.0,
        idle_timeout: float = 30.0,
        max_body: int = MAX_BODY,
        retry_written: bool = True,
    ) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r}")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if max_body < 0:
            raise ValueError("max_body must not be negative")
        self._max_body = max_body
        self._retry_written = retry_written
        self._tls = scheme == "https"
        self._host = host
        self._port = port
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._idle_timeout = idle_timeout
        self._idle: collections.deque[_Connection] = collections.deque()
        self._slots = asyncio.Semaphore(max_connections)
        self._closed = False
        # One timer for every request in flight (a timer each costs CPU per request).
        self._in_flight: dict[_Connection, float] = {}
        self._tick = max(0.02, min(0.5, request_timeout / 5))
        self._reaper: asyncio.TimerHandle | None = None

    def _reap(self) -> None:
        now = asyncio.get_running_loop().time()
        for conn, deadline in list(self._in_flight.items()):
            if deadline <= now:
                conn.fail(
                    HttpError(f"no answer within {self._request_timeout:g} s", kind="timeout")
                )
        self._reaper = (
            asyncio.get_running_loop().call_later(self._tick, self._reap)
            if self._in_flight
            else None
        )

    async def request(
        self, method: str, request: bytes, *, deadline: float | None = None
    ) -> Response:
        """Send ``request`` (the whole HTTP/1.1 message) and return the answer.

        A reused connection that turns out closed before any answer (the
        server dropped it while idle) is replaced by a fresh one, once (see
        ``retry_written``). Without a deadline, waiting for a free slot
        (``max_connections`` in flight) has no time limit.

        Args:
            method: the request's method (a HEAD answer has no body).
            request: the request line, headers and body, encoded.
            deadline: the event loop's time by which the whole exchange
                (waiting for a slot, connecting, the answer) must be done; the
                pool's own timeouts still apply within it.

        Raises:
            HttpError: no complete answer (a timeout included).
        """
        slots = self._slots
        if deadline is not None and slots.locked():
            try:
                async with asyncio.timeout_at(deadline):
                    await slots.acquire()
            except TimeoutError:
                raise HttpError(
                    "no free connection in time", written=False, kind="pool_timeout"
                ) from None
        else:
            await slots.acquire()
        try:
            return await self._exchange(method, request, deadline)
        finally:
            slots.release()

    async def _exchange(self, method: str, request: bytes, deadline: float | None) -> Response:
        for attempt in range(2):
            # The retry always opens a fresh connection: idle ones a middlebox
            # dropped silently look alive until written to.
            conn = self._take() if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(deadline)
            loop = asyncio.get_running_loop()
            expires = loop.time() + self._request_timeout
            self._in_flight[conn] = expires if deadline is None else min(expires, deadline)
            if self._reaper is None:
                self._reaper = loop.call_later(self._tick, self._reap)
            try:
                response = await conn.exchange(method, request)
            except HttpError as exc:
                conn.close()
                retry = exc.before_response and (self._retry_written or not exc.written)
                if reused and retry and attempt == 0:
                    continue
                raise
            except BaseException:
                # Cancelled mid-exchange: the connection's state is unknown.
                conn.close()
                raise
            finally:
                self._in_flight.pop(conn, None)
            if conn.reusable and not self._closed:
                conn.idle_since = asyncio.get_running_loop().time()
                self._idle.append(conn)
            else:
                conn.close()
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _take(self) -> _Connection | None:
        now = asyncio.get_running_loop().time()
        idle = self._idle
        while idle and now - idle[0].idle_since > self._idle_timeout:
            idle.popleft().close()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be stale
            if not conn.reusable or conn.closed:
                conn.close()
                continue
            if now - conn.idle_since > _STALE_CHECK_AFTER and conn.peer_closed():
                conn.close()
                continue
            return conn
        return None

    async def _connect(self, deadline: float | None = None) -> _Connection:
        loop = asyncio.get_running_loop()
        where = f"{self._host}:{self._port}"
        limit = self._connect_timeout
        if deadline is not None:
            limit = min(limit, deadline - loop.time())

        def protocol() -> _Connection:
            return _Connection(self._max_body)

        try:
            if limit <= 0:
                raise TimeoutError
            async with asyncio.timeout(limit):
                if self._tls:
                    _, conn = await loop.create_connection(
                        protocol,
                        self._host,
                        self._port,
                        ssl=_default_ssl_context(),
                        server_hostname=self._host,
                    )
                else:
                    _, conn = await loop.create_connection(protocol, self._host, self._port)
        except TimeoutError:
            raise HttpError(
                f"could not connect to {where} within {max(limit, 0):g} s",
                before_response=True,
                written=False,
                kind="connect_timeout",
            ) from None
        except OSError as exc:
            detail = exc.strerror or type(exc).__name__
            raise HttpError(
                f"could not connect to {where}: {detail}",
                before_response=True,
                written=False,
                kind="connect",
            ) from exc
        return conn

    def close(self) -> None:
        """Close the idle connections; ones in use close when their request ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
