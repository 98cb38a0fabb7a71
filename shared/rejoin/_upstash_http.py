"""A lean HTTP client for upstash-redis: its httpx client's surface over :mod:`rejoin._http1`.

``upstash_redis.http.AsyncHttpClient`` uses its ``httpx.AsyncClient`` for
one thing: ``await post(url, headers=..., json=command)``, then
``answer.headers.get("Upstash-Sync-Token")`` and ``answer.json()``; and
``aclose()``. httpx/httpcore spend far more CPU per request than that needs
(its pool re-examines every connection per request); :class:`UpstashHttp`
does the same over :class:`rejoin._http1.Pool` and is installed in its place
by :func:`rejoin.upstash_client`. Everything else of upstash-redis stays:
command formatting, base64 decoding, its retry loop, ``UpstashError``.

Failures are raised as the httpx exceptions httpx would raise, so
:func:`rejoin._lua._store_error` and every caller that catches httpx errors
behave as before: a timeout is an ``httpx.TimeoutException``
(``ConnectTimeout``, ``PoolTimeout``, ``ReadTimeout``), any other transport
failure an ``httpx.TransportError`` (``ConnectError``, ``ReadError``,
``RemoteProtocolError``), and a non-JSON body makes ``json()`` raise
``json.JSONDecodeError``.

No proxies: :func:`rejoin.upstash_client` keeps the httpx client when the
environment names one (see :func:`proxy_configured`).
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import urllib.request
import zlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from ._http1 import HttpError, Pool, Response

__all__ = ["MAX_ANSWER_BYTES", "UpstashHttp", "proxy_configured"]

# Upstash refuses requests over 10 MB (Free and Pay-as-you-go) but documents
# no limit on answers: a record may hold 100 MB, and an LRANGE of a long
# session's history returns all of it, base64-encoded (4/3 larger). This only
# guards memory against a runaway answer; httpx has no limit at all.
MAX_ANSWER_BYTES = 64 * 1024 * 1024

_DEFAULT_PORTS = {"http": 80, "https": 443}

_ERRORS: dict[str, type[httpx.TransportError]] = {
    "connect": httpx.ConnectError,
    "connect_timeout": httpx.ConnectTimeout,
    "pool_timeout": httpx.PoolTimeout,
    "timeout": httpx.ReadTimeout,
    "closed": httpx.RemoteProtocolError,
    "reset": httpx.ReadError,
    "protocol": httpx.RemoteProtocolError,
}


def proxy_configured() -> bool:
    """Whether the environment names a proxy httpx would use (``HTTPS_PROXY`` etc.).

    httpx honours ``HTTP_PROXY``, ``HTTPS_PROXY`` and ``ALL_PROXY`` (in either
    case); :mod:`rejoin._http1` does not do proxies, so then the httpx client
    stays (``NO_PROXY`` is left to httpx).
    """
    proxies = urllib.request.getproxies_environment()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


class _Answer:
    """What upstash-redis reads of an answer: ``status_code``, ``headers.get``, ``json()``."""

    __slots__ = ("_response", "status_code")

    def __init__(self, response: Response) -> None:
        self._response = response
        self.status_code = response.status

    @property
    def headers(self) -> _Answer:
        """Itself: ``get`` is the only header access upstash-redis makes."""
        return self

    @property
    def content(self) -> bytes:
        """The body, decoded if the server compressed it although not asked to."""
        body = self._response.body
        coding = self._response.headers.get("content-encoding")
        if coding and coding != "identity":
            body = _decompress(body, coding)
        return body

    def get(self, name: str, default: str | None = None) -> str | None:
        """A header's value by case-insensitive name (repeated ones joined with ``, ``)."""
        return self._response.headers.get(name.lower(), default)

    def json(self) -> Any:
        """The body parsed as JSON, as ``httpx.Response.json()`` does.

        Raises:
            json.JSONDecodeError: the body is not JSON (e.g. a proxy's 5xx page).
        """
        return jsonlib.loads(self.content)


def _decompress(body: bytes, coding: str) -> bytes:
    # Asked for identity, a server should not compress; if one does, read it
    # as httpx would rather than fail every command.
    if coding in ("gzip", "x-gzip"):
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif coding == "deflate":
        decoder = zlib.decompressobj()
    else:
        raise httpx.DecodingError(f"unsupported Content-Encoding {coding!r}")
    try:
        out = decoder.decompress(body, MAX_ANSWER_BYTES)
    except zlib.error as exc:
        raise httpx.DecodingError(f"malformed {coding} body: {exc}") from None
    if decoder.unconsumed_tail:
        raise httpx.DecodingError("the decompressed answer is too large")
    return out


class UpstashHttp:
    """The ``post``/``aclose`` surface of ``httpx.AsyncClient`` that upstash-redis uses.

    It belongs to the event loop of its first request (its connections do),
    as the httpx client did; :class:`rejoin.UpstashClient` keeps one
    upstash-redis client, so one of these, per loop. Requests use HTTP/1.1
    keep-alive connections to the one origin of ``url``; https with the
    default certificate checks (certifi's bundle).

    Each request is bounded by ``timeout`` as a whole: waiting for a free
    connection, connecting (TLS included), writing and the whole answer
    (checked by one timer a few times per timeout, so a late answer fails up
    to a fifth of it later, at most 0.5 s). A request that timed out closes
    its connection, so its late answer can never be read as another's.

    A request is sent again on a fresh connection only when it was never
    written (the reused connection was found closed). Once written, a lost
    connection is an error even before any answer: Upstash may have applied
    the command, so whether to send it again is upstash-redis' retry loop's
    decision (rejoin's scripts are idempotent through their operation ids).

    Args:
        url: the database's REST URL; every request must go to its origin.
        timeout: seconds each request may take in all.
        max_connections: requests in flight at once (more wait, within
            their timeout), as httpx's default pool limit.
        idle_timeout: seconds an idle connection is kept for reuse.
        max_answer_bytes: the largest answer body accepted.

    Raises:
        ValueError: the URL is not http(s) with a host, or a limit is not positive.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        max_connections: int = 100,
        idle_timeout: float = 30.0,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError("the Upstash URL must be http(s)://host[:port]")
        if timeout <= 0 or max_answer_bytes <= 0:
            raise ValueError("timeout and max_answer_bytes must be positive")
        self._scheme = parts.scheme
        self._hostname = parts.hostname
        self._port = parts.port or _DEFAULT_PORTS[parts.scheme]
        shown = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        default = parts.port in (None, _DEFAULT_PORTS[parts.scheme])
        self._host = shown if default else f"{shown}:{parts.port}"
        self._timeout = timeout
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._max_answer_bytes = max_answer_bytes
        self._pool: Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # The request line and fixed headers, per URL (upstash-redis uses two or three).
        self._starts: dict[str, str] = {}

    def _start(self, url: str) -> str:
        start = self._starts.get(url)
        if start is None:
            parts = urlsplit(url)
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
            if (parts.scheme, parts.hostname, port) != (self._scheme, self._hostname, self._port):
                raise httpx.UnsupportedProtocol(f"{url!r} is not on this client's origin")
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            start = self._starts[url] = (
                f"POST {target} HTTP/1.1\r\nHost: {self._host}\r\n"
                "Content-Type: application/json\r\nAccept-Encoding: identity\r\n"
            )
        return start

    def _pool_for(self, loop: asyncio.AbstractEventLoop) -> Pool:
        pool = self._pool
        if pool is None:
            pool = self._pool = Pool(
                self._scheme,
                self._hostname,
                self._port,
                max_connections=self._max_connections,
                connect_timeout=self._timeout,
                request_timeout=self._timeout,
                idle_timeout=self._idle_timeout,
                max_body=self._max_answer_bytes,
                retry_written=False,
            )
            self._loop = loop
        elif self._loop is not loop:
            # The message is the one rejoin._lua maps to StoreEventLoopError.
            raise RuntimeError(
                "this Upstash HTTP client is attached to a different loop (its connections "
                "belong to the event loop of its first request)"
            )
        return pool

    async def post(self, url: str, *, headers: Mapping[str, str], json: Any) -> _Answer:
        """POST ``json`` to ``url`` and return the whole answer.

        Raises:
            httpx.TimeoutException: no whole answer within the timeout.
            httpx.TransportError: could not connect, or the connection failed
                or the answer was malformed or too large.
            RuntimeError: the client was closed, or belongs to another event loop.
        """
        if self._closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        loop = asyncio.get_running_loop()
        pool = self._pool_for(loop)
        body = jsonlib.dumps(json, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        data = body.encode()
        lines = [self._start(url), f"Content-Length: {len(data)}\r\n"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise httpx.LocalProtocolError(f"a line break in the header {name!r}")
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        try:
            message = "".join(lines).encode("ascii") + data
        except UnicodeEncodeError:
            raise httpx.LocalProtocolError("a header is not ASCII") from None
        try:
            response = await pool.request("POST", message, deadline=loop.time() + self._timeout)
        except HttpError as exc:
            raise _ERRORS[exc.kind](str(exc), request=httpx.Request("POST", url)) from exc
        return _Answer(response)

    async def aclose(self) -> None:
        """Close the idle connections; a request in flight closes its own when it ends."""
        self._closed = True
        loop = self._loop
        if self._pool is not None and loop is not None and not loop.is_closed():
            self._pool.close()  # a closed loop's connections closed with it

    def __repr__(self) -> str:
        return f"UpstashHttp({self._scheme}://{self._host}, timeout={self._timeout:g})"
