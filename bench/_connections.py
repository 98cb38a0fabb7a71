"""A stand-in of API Gateway's ``@connections`` management API, over real HTTP/1.1.

It answers what API Gateway answers, on the wire, so the real
:class:`rejoin.sender.ApiGatewaySender` (or boto3's client) runs unchanged
against it:

- ``POST {stage}/@connections/{id}`` (PostToConnection): 200 and an empty body
  for an open connection; ``GET`` (GetConnection): 200 and the connection's
  JSON; ``DELETE`` (DeleteConnection): 204.
- An unknown or closed connection: 410 with ``x-amzn-ErrorType:
  GoneException`` (the body ``{"message":null}``, or empty: SDKs have seen
  both). Throttled: 429 ``LimitExceededException``. Over the payload limit:
  413 ``PayloadTooLargeException``.
- With credentials configured, every request's SigV4 signature is
  recomputed with **botocore's own signer** (``botocore.auth.SigV4Auth``) for
  the bytes received: a missing signature gets 403
  ``MissingAuthenticationTokenException``, an unknown access key or session
  token 403 ``UnrecognizedClientException``, a wrong signature 403
  ``InvalidSignatureException`` whose message quotes the canonical request
  (session token included, as API Gateway's does).
- ``latency`` seconds pass before each answer (a timer, not a thread), and a
  connection can be made to hang (never answered).

Run it in a thread of the caller (:class:`ConnectionsApi`, a context
manager: tests) or in its own process (``python -m bench._connections``,
control over ``/_standin/...``: the broadcast benchmark, so the sender's CPU
time is measured alone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

__all__ = ["ConnectionsApi", "Received", "StandInCredentials", "botocore_authorization"]

_REASONS = {
    200: "OK",
    204: "No Content",
    403: "Forbidden",
    404: "Not Found",
    410: "Gone",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
}
_MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class StandInCredentials:
    """Credentials the stand-in accepts (it signs nothing; it checks)."""

    access_key: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Received:
    """One request as it arrived.

    Attributes:
        method: the HTTP method.
        path: the request path exactly as sent (percent-encoded).
        connection_id: the id decoded from the path (None for other paths).
        headers: lower-case names.
        body: the body.
        signature: "ok", "bad" or None (not checked).
    """

    method: str
    path: str
    connection_id: str | None
    headers: dict[str, str]
    body: bytes
    signature: str | None


def botocore_authorization(
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    credentials: StandInCredentials,
    region: str,
    service: str = "execute-api",
) -> str:
    """The ``Authorization`` header botocore's SigV4 signer computes for this request.

    The request is rebuilt from what arrived: its path as sent, its
    ``host`` and ``x-amz-date``, the session token of ``credentials`` (botocore
    adds and signs it whenever there is one), and any other header the
    request says it signed.
    """
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    signed = _signed_headers(headers.get("authorization", ""))
    names = {"host", "x-amz-date"} | {n for n in signed if n != "x-amz-security-token"}
    rebuilt = {name: headers[name] for name in names if name in headers}
    if credentials.token:
        rebuilt["x-amz-security-token"] = credentials.token
    request = AWSRequest(
        method=method, url=f"http://{headers.get('host', '')}{path}", data=body, headers=rebuilt
    )
    request.context["timestamp"] = headers.get("x-amz-date", "")
    auth = SigV4Auth(
        Credentials(credentials.access_key, credentials.secret_key, credentials.token),
        service,
        region,
    )
    canonical = auth.canonical_request(request)
    signature = auth.signature(auth.string_to_sign(request, canonical), request)
    signed_names = auth.signed_headers(auth.headers_to_sign(request))
    return (
        f"AWS4-HMAC-SHA256 Credential={auth.scope(request)}, "
        f"SignedHeaders={signed_names}, Signature={signature}"
    )


def _signed_headers(authorization: str) -> list[str]:
    for part in authorization.split(","):
        name, _, value = part.strip().partition("=")
        if name.endswith("SignedHeaders"):
            return value.split(";")
    return []


def _credential_key(authorization: str) -> str | None:
    marker = "Credential="
    start = authorization.find(marker)
    if start < 0:
        return None
    return authorization[start + len(marker) :].split("/", 1)[0]


class ConnectionsApi:
    """The stand-in server; state changes are safe from any thread.

    Args:
        latency: seconds before each answer.
        stage: the endpoint's base path (``/prod``).
        region: the region signatures are checked for.
        credentials: accept only requests signed with one of these (none:
            signatures are not checked).
        open_all: every connection id is open (benchmarks).
        max_payload: PostToConnection bodies above this get 413 (API
            Gateway's limit is 128 KB).
        gone_body: the body of a 410 answer.
        record: keep every request (for :meth:`received`); a long benchmark
            turns it off so memory does not grow.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        stage: str = "/prod",
        region: str = "us-east-1",
        credentials: tuple[StandInCredentials, ...] = (),
        open_all: bool = False,
        max_payload: int = 128 * 1024,
        gone_body: bytes = b'{"message":null}',
        record: bool = True,
    ) -> None:
        self.latency = latency
        self.stage = stage.rstrip("/")
        self.region = region
        self.open_all = open_all
        self.max_payload = max_payload
        self.gone_body = gone_body
        self._lock = threading.Lock()
        self._credentials = credentials
        self._open: set[str] = set()
        self._throttles: dict[str, int] = {}
        self._hangs: set[str] = set()
        self._failures: dict[str, tuple[int, str, str]] = {}
        self._delivered: dict[str, list[bytes]] = {}
        self._received: list[Received] = []
        self._record = record
        self._counts = {
            "requests": 0,
            "bad_signatures": 0,
            "verified": 0,
            "connections": 0,
            "peak_in_flight": 0,
        }
        self._in_flight = 0
        self._protocols: set[_Protocol] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- scripting (any thread) --

    def open(self, *connection_ids: str) -> None:
        """Open connections (clients connected)."""
        with self._lock:
            self._open.update(connection_ids)

    def close_socket(self, connection_id: str) -> None:
        """The client went away: later requests for it get 410."""
        with self._lock:
            self._open.discard(connection_id)

    def throttle(self, connection_id: str, times: int) -> None:
        """The next ``times`` requests for the connection get 429."""
        with self._lock:
            self._throttles[connection_id] = self._throttles.get(connection_id, 0) + times

    def hang(self, connection_id: str) -> None:
        """Requests for the connection are never answered."""
        with self._lock:
            self._hangs.add(connection_id)

    def fail(self, connection_id: str, status: int, error_type: str, message: str) -> None:
        """Requests for the connection get this error answer."""
        with self._lock:
            self._failures[connection_id] = (status, error_type, message)

    def accept(self, *credentials: StandInCredentials) -> None:
        """Check signatures against these credentials (none: do not check)."""
        with self._lock:
            self._credentials = tuple(credentials)

    def delivered(self, connection_id: str) -> list[bytes]:
        """Bodies posted to the connection and accepted, in order."""
        with self._lock:
            return list(self._delivered.get(connection_id, ()))

    def received(self) -> list[Received]:
        """Every request so far (control requests excluded)."""
        with self._lock:
            return list(self._received)

    def drop_idle(self) -> int:
        """Close every keep-alive connection that waits for a request, as a server
        does after its idle timeout; returns how many were closed."""
        loop = self._loop
        if loop is None:
            return 0
        done = threading.Event()
        closed = [0]

        def drop() -> None:
            for protocol in list(self._protocols):
                if protocol.close_if_idle():
                    closed[0] += 1
            done.set()

        loop.call_soon_threadsafe(drop)
        done.wait(10)
        return closed[0]

    def stats(self) -> dict[str, int]:
        """Requests, signatures checked (ok / bad), TCP connections accepted, and
        the most requests waiting for their answer at once."""
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        """Forget requests, deliveries and counts."""
        with self._lock:
            self._received.clear()
            self._delivered.clear()
            self._counts = dict.fromkeys(self._counts, 0)

    # -- serving --

    def __enter__(self) -> ConnectionsApi:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        """Serve on a thread of its own; returns the endpoint URL (with the stage).

        Args:
            host: the address to listen on (loopback).
            port: the port (0: a free one).
            ssl_context: serve HTTPS with this server context.
        """
        started = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            self._server = loop.run_until_complete(self._listen(host, port, ssl_context))
            started.set()
            loop.run_forever()
            self._server.close()
            # Drop the clients' keep-alive connections, or wait_closed waits for them.
            for protocol in list(self._protocols):
                protocol.abort()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name="connections-api", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the @connections stand-in did not start")
        return self.url

    async def _listen(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None
    ) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Protocol(self), host, port, backlog=1024, ssl=ssl_context
        )
        bound = server.sockets[0].getsockname()
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://{bound[0]}:{bound[1]}{self.stage}"
        return server

    def stop(self) -> None:
        """Stop serving (connections still open are dropped)."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        self._loop = self._thread = None

    # -- answering (the server's loop) --

    def _connection_made(self, protocol: _Protocol) -> None:
        self._protocols.add(protocol)
        with self._lock:
            self._counts["connections"] += 1

    def _connection_lost(self, protocol: _Protocol) -> None:
        self._protocols.discard(protocol)

    def _started(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._counts["peak_in_flight"] = max(self._counts["peak_in_flight"], self._in_flight)

    def _answered(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes] | None:
        """The answer (status, headers, body), or None to hang."""
        if path.startswith("/_standin/"):
            return self._control(method, path, body)
        prefix = f"{self.stage}/@connections/"
        raw_id = path[len(prefix) :] if path.startswith(prefix) else None
        connection_id = unquote(raw_id) if raw_id and "/" not in raw_id else None
        with self._lock:
            self._counts["requests"] += 1
            signature, refusal = self._check_signature(method, path, headers, body)
            if self._record:
                self._received.append(
                    Received(method, path, connection_id, headers, body, signature)
                )
            if refusal is not None:
                return refusal
            if connection_id is None:
                return _error(404, "NotFoundException", "Not Found")
            if connection_id in self._hangs:
                return None
            if connection_id in self._failures:
                return _error(*self._failures[connection_id])
            pending = self._throttles.get(connection_id, 0)
            if pending > 0:
                self._throttles[connection_id] = pending - 1
                return _error(429, "LimitExceededException", "Rate exceeded")
            is_open = self.open_all or connection_id in self._open
            if not is_open:
                return 410, {"x-amzn-ErrorType": "GoneException"}, self.gone_body
            if method == "POST":
                if len(body) > self.max_payload:
                    return _error(413, "PayloadTooLargeException", "Message too long")
                if not self.open_all:
                    self._delivered.setdefault(connection_id, []).append(body)
                return 200, {}, b""
            if method == "GET":
                info = {
                    "ConnectedAt": "2026-01-01T00:00:00.000Z",
                    "Identity": {"SourceIp": "127.0.0.1", "UserAgent": "stand-in"},
                    "LastActiveAt": "2026-01-01T00:00:01.000Z",
                }
                return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()
            if method == "DELETE":
                self._open.discard(connection_id)
                return 204, {}, b""
            return _error(404, "NotFoundException", "Not Found")

    def _check_signature(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[str | None, tuple[int, dict[str, str], bytes] | None]:
        accepted = self._credentials
        if not accepted:
            return None, None
        authorization = headers.get("authorization")
        if not authorization:
            self._counts["bad_signatures"] += 1
            return "bad", _error(403, "MissingAuthenticationTokenException", "Forbidden")
        key = _credential_key(authorization)
        match = next((c for c in accepted if c.access_key == key), None)
        if match is None or headers.get("x-amz-security-token") != match.token:
            self._counts["bad_signatures"] += 1
            return "bad", _error(
                403,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        expected = botocore_authorization(method, path, headers, body, match, self.region)
        if expected != authorization:
            self._counts["bad_signatures"] += 1
            token_line = f"x-amz-security-token:{match.token}\n" if match.token else ""
            message = (
                "The request signature we calculated does not match the signature you "
                "provided. Check your AWS Secret Access Key and signing method. Consult the "
                "service documentation for details.\n\nThe Canonical String for this request "
                f"should have been\n'{method}\n{path}\n\nhost:{headers.get('host')}\n"
                f"x-amz-date:{headers.get('x-amz-date')}\n{token_line}'"
            )
            return "bad", _error(403, "InvalidSignatureException", message)
        self._counts["verified"] += 1
        return "ok", None

    def _control(
        self, method: str, path: str, body: bytes
    ) -> tuple[int, dict[str, str], bytes] | None:
        if path == "/_standin/stats":
            return 200, {"Content-Type": "application/json"}, json.dumps(self.stats()).encode()
        if path == "/_standin/reset" and method == "POST":
            self.reset()
            return 204, {}, b""
        if path == "/_standin/credentials" and method == "POST":
            sets = json.loads(body or b"[]")
            self.accept(*(StandInCredentials(**s) for s in sets))
            return 204, {}, b""
        if path == "/_standin/record" and method == "POST":
            with self._lock:
                self._record = bool(json.loads(body or b"false"))
            return 204, {}, b""
        return _error(404, "NotFoundException", "Not Found")


def _error(status: int, error_type: str, message: str) -> tuple[int, dict[str, str], bytes]:
    headers = {"x-amzn-ErrorType": error_type, "Content-Type": "application/json"}
    return status, headers, json.dumps({"message": message}).encode()


class _Protocol(asyncio.Protocol):
    """One client connection: HTTP/1.1, keep-alive, requests answered in order."""

    def __init__(self, api: ConnectionsApi) -> None:
        self._api = api
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._busy = False  # one request at a time, as clients without pipelining send

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._api._connection_made(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._api._connection_lost(self)

    def abort(self) -> None:
        """Drop the connection now."""
        if self._transport is not None:
            self._transport.abort()

    def close_if_idle(self) -> bool:
        """Close the connection if no request is waiting for its answer."""
        transport = self._transport
        if transport is None or self._busy or self._buf:
            return False
        transport.close()
        return True

    def _next(self) -> None:
        transport = self._transport
        if self._busy or transport is None:
            return
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > _MAX_HEAD:
                transport.close()
            return
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if len(self._buf) < end + 4 + length:
            return
        body = bytes(self._buf[end + 4 : end + 4 + length])
        del self._buf[: end + 4 + length]
        method, path = [*lines[0].split(" "), "", ""][:2]
        control = path.startswith("/_standin/")
        answer = self._api._handle(method, path, headers, body)
        self._busy = True
        if not control:
            self._api._started()
        if answer is None:  # hang: keep the connection, never answer
            return
        close = headers.get("connection", "").lower() == "close"
        latency = 0.0 if control else self._api.latency
        if latency > 0:
            asyncio.get_running_loop().call_later(latency, self._answer, *answer, close, control)
        else:
            self._answer(*answer, close, control)

    def _answer(
        self, status: int, headers: dict[str, str], body: bytes, close: bool, control: bool
    ) -> None:
        transport = self._transport
        self._busy = False
        if not control:
            self._api._answered()
        if transport is None:
            return
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        head.append("x-amzn-RequestId: 00000000-0000-0000-0000-000000000000")
        if status != 204:
            head.append(f"Content-Length: {len(body)}")
        if close:
            head.append("Connection: close")
        transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        if close:
            transport.close()
        elif self._buf:
            self._next()


# -- its own process ------------------------------------------------------------


@contextlib.contextmanager
def _serve_forever(api: ConnectionsApi, host: str, port: int) -> Iterator[str]:
    url = api.start(host, port)
    try:
        yield url
    finally:
        api.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m bench._connections [--latency S] [--open-all]``: prints ``URL=...``,
    serves until stdin closes."""
    parser = argparse.ArgumentParser(prog="python -m bench._connections")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--stage", default="/prod")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--open-all", action="store_true")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("the stand-in listens on loopback only")
    api = ConnectionsApi(
        latency=args.latency,
        stage=args.stage,
        region=args.region,
        open_all=args.open_all,
        record=False,
    )
    with _serve_forever(api, args.host, args.port) as url:
        print(f"URL={url}", flush=True)
        # The parent holds our stdin: when it goes (or closes it), we stop.
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
