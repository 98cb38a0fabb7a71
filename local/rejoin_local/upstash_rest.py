"""A local, Upstash-compatible Redis REST endpoint in front of a real Redis.

The real ``upstash_redis`` clients (sync and async) talk to it unchanged, so
the code under test runs the same HTTP requests locally as on Upstash:

- ``POST /`` runs one command, ``POST /pipeline`` several independent ones and
  ``POST /multi-exec`` several as one MULTI/EXEC transaction;
- ``Authorization: Bearer <token>`` is required, ``Upstash-Encoding: base64``
  is honoured, every response carries ``Upstash-Sync-Token``;
- commands Upstash refuses over REST (blocking, pub/sub, WATCH, ...) are
  refused here too, and requests are capped at Upstash's 10 MB;
- a script's ``#!lua flags=allow-key-locking`` first line, which real Redis
  rejects, is stripped, while EVALSHA keeps working with the sha1 of the full
  text that the caller computes.

Redis is reached over RESP2 with the small asyncio client below, either at a
``redis://`` URL or, with ``redis_url=None``, at an embedded fakeredis server
on a loopback port (so both modes share one code path). ``Endpoint.faults``
injects lost responses, failures and hangs for tests, ``Endpoint.stats``
counts requests and commands for benchmarks.

Run it standalone with ``python -m rejoin_local.upstash_rest``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import itertools
import json
import os
import random
import select
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias
from urllib.parse import unquote, urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ._serving import base_url, bind, client_address, serve_uvicorn

if TYPE_CHECKING:
    # fakeredis is a dev dependency, imported only when the embedded store starts.
    from fakeredis import TcpFakeServer as _TcpServer

__all__ = ["EmbeddedRedis", "Endpoint", "Faults", "RunningServer", "Stats", "create_app", "serve"]

MAX_REQUEST_BYTES = 10 * 1024 * 1024
"""Upstash's request size limit."""

DEFAULT_MAX_CONNECTIONS = 64

_LOCKING_FLAG = b"allow-key-locking"
# Past the cap the rest of an oversized body is read and dropped (not kept), so
# the client gets its 400 instead of a reset while it is still sending.
_DRAIN_LIMIT = 256 * 1024 * 1024
# Lines (statuses, errors, lengths) are short; bulk payloads use readexactly.
_READ_LIMIT = 1024 * 1024
_HANG_POLL_SECONDS = 0.02

_ALWAYS_REFUSED = frozenset(
    {
        # Blocking commands: an HTTP request must not park a connection.
        "BLPOP",
        "BRPOP",
        "BRPOPLPUSH",
        "BLMOVE",
        "BLMPOP",
        "BZPOPMIN",
        "BZPOPMAX",
        "BZMPOP",
        "WAIT",
        "WAITAOF",
        # Transactions span requests only through /multi-exec.
        "WATCH",
        "UNWATCH",
        "MULTI",
        "EXEC",
        "DISCARD",
        # Pub/sub and connection state make no sense on a pooled connection.
        "SUBSCRIBE",
        "PSUBSCRIBE",
        "SSUBSCRIBE",
        "UNSUBSCRIBE",
        "PUNSUBSCRIBE",
        "SUNSUBSCRIBE",
        "MONITOR",
        "SELECT",
        "QUIT",
        "RESET",
        "HELLO",
        "AUTH",
        "CLIENT",
        # Server administration.
        "SHUTDOWN",
        "DEBUG",
        "SYNC",
        "PSYNC",
        "REPLICAOF",
        "SLAVEOF",
    }
)


# --------------------------------------------------------------------------
# RESP2 client
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Status:
    """A simple-string (status) reply such as ``+OK``."""

    value: bytes


@dataclass(frozen=True, slots=True)
class _Error:
    """An error reply, kept as a value so errors nested in arrays survive."""

    message: str


Reply: TypeAlias = bytes | _Status | _Error | int | list["Reply"] | None
_Json: TypeAlias = str | int | list["_Json"] | dict[str, "_Json"] | None
_Mode: TypeAlias = Literal["single", "pipeline", "multi"]


class RespProtocolError(ConnectionError):
    """Redis sent something that is not RESP2."""


@dataclass(frozen=True, slots=True)
class _Target:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool


def _parse_redis_url(url: str) -> _Target:
    """Parse ``redis://[[user]:password@]host[:port][/db]`` (or ``rediss://``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} in {url!r}")
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise ValueError(f"bad database number {path!r} in Redis URL") from None
    return _Target(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=parts.scheme == "rediss",
    )


def _encode_commands(commands: Sequence[Sequence[bytes]]) -> list[bytes]:
    """RESP-encode commands as chunks, so big values are not copied into one buffer."""
    chunks: list[bytes] = []
    for args in commands:
        chunks.append(b"*%d\r\n" % len(args))
        for arg in args:
            chunks.append(b"$%d\r\n" % len(arg))
            chunks.append(arg)
            chunks.append(b"\r\n")
    return chunks


class _Connection:
    """One RESP2 connection; not safe for concurrent use (the pool serialises it)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, target: _Target) -> _Connection:
        """Connect, authenticate and select the database."""
        reader, writer = await asyncio.open_connection(
            target.host,
            target.port,
            limit=_READ_LIMIT,
            ssl=ssl.create_default_context() if target.tls else None,
        )
        conn = cls(reader, writer)
        setup: list[list[bytes]] = []
        if target.password is not None:
            auth = [b"AUTH"]
            if target.username:
                auth.append(target.username.encode())
            setup.append([*auth, target.password.encode()])
        if target.db:
            setup.append([b"SELECT", str(target.db).encode()])
        if not setup:
            return conn
        try:
            for reply in await conn.run(setup):
                if isinstance(reply, _Error):
                    raise ConnectionError(f"Redis refused the connection setup: {reply.message}")
        except BaseException:
            conn.close()
            raise
        return conn

    @property
    def usable(self) -> bool:
        """False once Redis closed the connection (e.g. an idle timeout)."""
        return not self._reader.at_eof() and not self._writer.is_closing()

    async def run(self, commands: Sequence[Sequence[bytes]]) -> list[Reply]:
        """Send commands in one write and read one reply per command."""
        self._writer.writelines(_encode_commands(commands))
        await self._writer.drain()
        return [await self._read_reply() for _ in commands]

    async def _read_line(self) -> bytes:
        try:
            return await self._reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            # A line longer than the buffer limit: fakeredis sends any top-level
            # string without CR/LF as a simple string, however big. Take what
            # is certainly not part of the separator and keep looking.
            parts = [await self._reader.readexactly(exc.consumed)]
        while True:
            try:
                parts.append(await self._reader.readuntil(b"\r\n"))
                return b"".join(parts)
            except asyncio.LimitOverrunError as exc:
                parts.append(await self._reader.readexactly(exc.consumed))

    async def _read_reply(self) -> Reply:
        line = await self._read_line()
        kind, body = line[:1], line[1:-2]
        if kind == b"$":
            length = int(body)
            if length < 0:
                return None
            data = await self._reader.readexactly(length)
            await self._reader.readexactly(2)
            return data
        if kind == b"+":
            return _Status(body)
        if kind == b":":
            return int(body)
        if kind == b"-":
            return _Error(body.decode("utf-8", "backslashreplace"))
        if kind == b"*":
            count = int(body)
            if count < 0:
                return None
            return [await self._read_reply() for _ in range(count)]
        raise RespProtocolError(f"unexpected RESP reply line {line[:40]!r}")

    def close(self) -> None:
        """Close without waiting (safe from any state, e.g. mid-reply)."""
        self._writer.close()

    async def aclose(self) -> None:
        """Close and wait until the socket is gone."""
        self._writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await self._writer.wait_closed()


class _Pool:
    """Up to ``max_size`` connections, opened lazily on the loop that created the pool."""

    def __init__(self, target: _Target, max_size: int) -> None:
        self.loop = asyncio.get_running_loop()
        self._target = target
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_size)
        self._closed = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[_Connection]:
        """Borrow a connection; it is dropped, not reused, if the body raises."""
        async with self._slots:
            conn: _Connection | None = None
            while self._idle and conn is None:
                candidate = self._idle.pop()
                if candidate.usable:
                    conn = candidate
                else:
                    candidate.close()
            if conn is None:
                conn = await _Connection.open(self._target)
            try:
                yield conn
            except BaseException:
                # The reply stream may be half read: the connection is unusable.
                conn.close()
                raise
            if self._closed:
                conn.close()
            else:
                self._idle.append(conn)

    async def aclose(self) -> None:
        """Close idle connections; borrowed ones are closed when returned."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()


# --------------------------------------------------------------------------
# Embedded store
# --------------------------------------------------------------------------


class EmbeddedRedis:
    """fakeredis (with Lua) served over RESP on a free loopback port, in a daemon thread.

    The data lives in one ``FakeServer`` that survives ``stop()``/``start()``;
    only the TCP listener (and so the port) is replaced.
    """

    # Addresses served by embedded stores of this process, so that an endpoint
    # given such a URL still applies the fakeredis workarounds.
    _live: ClassVar[set[tuple[str, int]]] = set()
    _live_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def serves(cls, redis_url: str) -> bool:
        """Whether ``redis_url`` points at a running embedded store of this process."""
        target = _parse_redis_url(redis_url)
        with cls._live_lock:
            return (target.host, target.port) in cls._live

    def __init__(self) -> None:
        # Imported here: fakeredis is a dev dependency, needed only in this mode.
        from fakeredis import FakeServer

        self._fake = FakeServer()
        self._lock = threading.Lock()
        self._tcp: _TcpServer | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def _address(tcp: _TcpServer) -> tuple[str, int]:
        host, port = tcp.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str | None:
        """``redis://127.0.0.1:<port>/0`` while running, else None."""
        tcp = self._tcp
        if tcp is None:
            return None
        host, port = self._address(tcp)
        return f"redis://{host}:{port}/0"

    def start(self) -> str:
        """Start listening (idempotent) and return the URL."""
        from fakeredis import TcpFakeServer

        with self._lock:
            if self._tcp is None:
                tcp = TcpFakeServer(("127.0.0.1", 0))
                tcp.fake_server = self._fake
                tcp.RequestHandlerClass = _fakeredis_handler_class()
                # fakeredis makes handler threads non-daemon: a connection left
                # open would then keep the interpreter from exiting.
                tcp.daemon_threads = True
                thread = threading.Thread(
                    target=tcp.serve_forever,
                    kwargs={"poll_interval": 0.05},
                    name="rejoin-embedded-redis",
                    daemon=True,
                )
                thread.start()
                self._tcp, self._thread = tcp, thread
                with self._live_lock:
                    self._live.add(self._address(tcp))
            url = self.url
        assert url is not None
        return url

    def stop(self) -> None:
        """Stop listening; connection threads end within fakeredis' poll interval."""
        with self._lock:
            tcp, thread = self._tcp, self._thread
            self._tcp = self._thread = None
        if tcp is not None:
            with self._live_lock:
                self._live.discard(self._address(tcp))
            tcp.shutdown()
            tcp.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# fakeredis round-trips replies through redis-py's parser, which turns these
# codes into a plain ResponseError; fakeredis would then send "ERR WRONGTYPE ...".
_BARE_ERROR_CODES = frozenset(
    {"WRONGTYPE", "BUSYKEY", "BUSYGROUP", "NOGROUP", "NOTBUSY", "UNBLOCKED"}
)


@functools.cache
def _fakeredis_handler_class() -> type[Any]:
    """fakeredis' TCP handler, fixed to answer error replies like Redis does.

    fakeredis 2.40's handler answers an error reply and then closes the
    connection, which loses the rest of a pipeline or transaction; it also
    adds "ERR" in front of codes such as WRONGTYPE. Errors are handed to its
    reply encoder as values instead of being raised. It also writes replies to
    a non-blocking socket without handling partial writes, which garbles
    replies bigger than the socket buffer; writes here wait until they are done.
    """
    import redis
    from fakeredis._clients._tcp_server import TCPFakeRequestHandler
    from fakeredis._helpers import SimpleError

    def restore(value: Any) -> Any:
        if isinstance(value, list):
            return [restore(item) for item in value]
        if type(value) is redis.ResponseError and value.args:
            message = str(value.args[0])
            if message.split(" ", 1)[0] in _BARE_ERROR_CODES:
                return SimpleError(message)
        return value

    class Handler(TCPFakeRequestHandler):
        def setup(self) -> None:
            super().setup()
            read_response = self.current_client.read_response

            def read_keeping_errors(**kwargs: Any) -> Any:
                try:
                    return restore(read_response(**kwargs))
                except (redis.ResponseError, redis.AuthenticationError) as exc:
                    return restore(exc)

            self.current_client.read_response = read_keeping_errors  # type: ignore[method-assign]
            whole_writes = _WholeWrites(self.connection, self.server._shutdown_event)
            self.writer.writer = whole_writes  # type: ignore[assignment]

    return Handler


class _WholeWrites:
    """Writes all of each reply to a non-blocking socket, waiting while it is full."""

    def __init__(self, sock: socket.socket, stopping: threading.Event) -> None:
        self._sock = sock
        self._stopping = stopping

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            try:
                view = view[self._sock.send(view) :]
            except BlockingIOError:
                if self._stopping.is_set():
                    raise ConnectionAbortedError("embedded Redis is stopping") from None
                select.select([], [self._sock], [], 0.1)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered."""


# --------------------------------------------------------------------------
# Stats and faults
# --------------------------------------------------------------------------


class Stats:
    """Thread-safe counts of HTTP requests per path and of commands per name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._commands: Counter[str] = Counter()

    def record_request(self, path: str) -> None:
        """Count one HTTP request to ``path``."""
        with self._lock:
            self._requests[path] += 1

    def record_commands(self, names: Sequence[str]) -> None:
        """Count commands by upper-case name."""
        with self._lock:
            self._commands.update(names)

    def snapshot(self) -> dict[str, dict[str, int] | int]:
        """A copy of the counters.

        Returns:
            ``{"requests": {path: n}, "commands": {NAME: n},
            "total_requests": n, "total_commands": n}``.
        """
        with self._lock:
            return {
                "requests": dict(self._requests),
                "commands": dict(self._commands),
                "total_requests": sum(self._requests.values()),
                "total_commands": sum(self._commands.values()),
            }

    def reset(self) -> None:
        """Zero all counters."""
        with self._lock:
            self._requests.clear()
            self._commands.clear()


@dataclass(slots=True)
class _Fault:
    kind: str  # "lose", "fail" or "hang"
    times: int
    command: str | None
    status: int = 503
    seconds: float = 0.0
    script: str | None = None  # sha1 of the script (EVALSHA/EVAL) it is for

    def matches(self, command: _Command) -> bool:
        if self.command is not None and self.command != command.name:
            return False
        return self.script is None or command.script_sha == self.script


@dataclass(slots=True)
class _Chaos:
    rate: float
    kinds: tuple[str, ...]
    hang_seconds: float
    rng: random.Random
    injected: Counter[str]


class Faults:
    """Thread-safe fault injection; each fault is used up by the next matching requests.

    A fault matches a request to ``/``, ``/pipeline`` or ``/multi-exec`` whose
    first command is ``command`` (case-insensitive), or any such request when
    ``command`` is None; with ``script`` (a script's sha1), only EVALSHA/EVAL of
    that script. Faults are taken in the order they were added, one per
    request. :meth:`chaos` adds random faults on top, for soak tests.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[_Fault] = []
        self._generation = 0
        self._chaos: _Chaos | None = None
        self._in_flight = 0

    def lose_response(
        self, times: int = 1, command: str | None = None, *, script: str | None = None
    ) -> None:
        """Apply the request, then answer 502 with a non-JSON body (a lost response)."""
        self._add(_Fault("lose", times, command, script=script))

    def fail(
        self,
        status: int = 503,
        times: int = 1,
        command: str | None = None,
        *,
        script: str | None = None,
    ) -> None:
        """Answer ``status`` with a non-JSON body without applying the request."""
        self._add(_Fault("fail", times, command, status=status, script=script))

    def hang(
        self,
        seconds: float,
        times: int = 1,
        command: str | None = None,
        *,
        script: str | None = None,
    ) -> None:
        """Wait ``seconds`` before applying and answering (``clear()`` ends the wait)."""
        self._add(_Fault("hang", times, command, seconds=seconds, script=script))

    def chaos(
        self,
        rate: float,
        *,
        seed: int,
        kinds: tuple[str, ...] = ("lose", "fail", "hang"),
        hang_seconds: float = 1.0,
    ) -> Counter[str]:
        """Fault a ``rate`` share of all requests at random (seeded); returns the tally.

        A random fault comes after any queued one and is of one of ``kinds``
        (a 503 for ``fail``). ``clear()`` ends it.
        """
        if not 0 <= rate <= 1:
            raise ValueError("rate must be between 0 and 1")
        tally: Counter[str] = Counter()
        with self._lock:
            self._chaos = _Chaos(rate, kinds, hang_seconds, random.Random(seed), tally)
        return tally

    def clear(self) -> None:
        """Drop pending faults and release requests that are hanging now."""
        with self._lock:
            self._queue.clear()
            self._chaos = None
            self._generation += 1

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait (blocking) until no request is in flight, hung ones included.

        A request released by :meth:`clear` still applies its command; a test
        that ends while one is hanging calls this, so the late write cannot
        land in the next test's database. Returns False on timeout.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._in_flight == 0:
                    return True
            time.sleep(_HANG_POLL_SECONDS)
        return False

    def _started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def _finished(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def pending(self) -> int:
        """How many more requests the pending faults will affect."""
        with self._lock:
            return sum(f.times for f in self._queue)

    def _add(self, fault: _Fault) -> None:
        if fault.times < 1:
            raise ValueError("times must be at least 1")
        fault.command = fault.command.upper() if fault.command else None
        with self._lock:
            self._queue.append(fault)

    def _take(self, command: _Command | str) -> _Fault | None:
        if isinstance(command, str):  # a caller that knows only the command's name
            command = _Command(command.upper(), [command.encode()])
        with self._lock:
            for i, fault in enumerate(self._queue):
                if fault.matches(command):
                    fault.times -= 1
                    if fault.times == 0:
                        del self._queue[i]
                    return fault
            chaos = self._chaos
            if chaos is not None and chaos.rng.random() < chaos.rate:
                kind = chaos.rng.choice(chaos.kinds)
                chaos.injected[kind] += 1
                return _Fault(kind, 1, None, seconds=chaos.hang_seconds)
        return None

    async def _sleep(self, seconds: float) -> None:
        # Polls rather than waiting on an event: clear() is called from other
        # threads, and this keeps it free of any event loop.
        generation = self._generation
        deadline = time.monotonic() + seconds
        while self._generation == generation:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, _HANG_POLL_SECONDS))


# --------------------------------------------------------------------------
# Lua: the allow-key-locking header
# --------------------------------------------------------------------------


def _sha1_hex(data: bytes) -> bytes:
    return hashlib.sha1(data).hexdigest().encode()


def _strip_locking_flag(script: bytes, *, drop_shebang: bool = False) -> bytes:
    """Remove Upstash's ``allow-key-locking`` flag, which real Redis rejects.

    The first line is emptied rather than removed, so Lua error line numbers
    still match the caller's source. Other shebang flags are kept, unless
    ``drop_shebang`` (fakeredis knows no shebang at all): then any ``#!lua``
    line is emptied.
    """
    first, newline, rest = script.partition(b"\n")
    tokens = first.rstrip(b"\r").split()
    if not tokens or tokens[0] != b"#!lua":
        return script
    if drop_shebang:
        return newline + rest
    kept: list[bytes] = [tokens[0]]
    found = False
    for token in tokens[1:]:
        if token.startswith(b"flags="):
            flags = token[len(b"flags=") :].split(b",")
            found = found or _LOCKING_FLAG in flags
            flags = [f for f in flags if f and f != _LOCKING_FLAG]
            if flags:
                kept.append(b"flags=" + b",".join(flags))
        else:
            kept.append(token)
    if not found:
        return script
    line = b" ".join(kept) if len(kept) > 1 else b""
    return line + newline + rest


class _Scripts:
    """sha1(full text) -> sha1(text Redis saw), for scripts whose header was stripped.

    With ``fakeredis=True`` it also works around what fakeredis lacks: any
    shebang line is dropped, and EVAL_RO/EVALSHA_RO run as EVAL/EVALSHA.
    """

    def __init__(self, *, fakeredis: bool) -> None:
        self.fakeredis = fakeredis
        self._lock = threading.Lock()
        self._real_sha: dict[bytes, bytes] = {}

    def strip(self, script: bytes) -> bytes:
        stripped = _strip_locking_flag(script, drop_shebang=self.fakeredis)
        if stripped is not script:
            with self._lock:
                self._real_sha[_sha1_hex(script)] = _sha1_hex(stripped)
        return stripped

    def translate(self, sha: bytes) -> bytes:
        # An unknown sha passes through: Redis answers NOSCRIPT, the caller
        # falls back to EVAL, and EVAL fills the map.
        with self._lock:
            return self._real_sha.get(sha.lower(), sha)


# --------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------


class _BadRequest(Exception):
    """The request is refused before anything reaches Redis (HTTP 400)."""


@dataclass(slots=True)
class _Command:
    name: str
    args: list[bytes]
    refused: str | None = None
    # SCRIPT LOAD of a stripped script answers the full text's sha1.
    loaded_sha: bytes | None = None
    # EVAL/EVALSHA: the sha1 of the script as the caller knows it (full text).
    script_sha: str | None = None


def _to_arg(value: object) -> bytes:
    # bool is an int subclass, but JSON true/false is not a Redis argument.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _BadRequest(
            f"ERR command arguments must be strings or numbers, got {type(value).__name__}"
        )
    if isinstance(value, str):
        try:
            return value.encode()
        except UnicodeEncodeError:
            raise _BadRequest("ERR command argument is not valid Unicode") from None
    return (str(value) if isinstance(value, int) else repr(value)).encode()


def _refusal(name: str, args: list[bytes]) -> str | None:
    blocked = name in _ALWAYS_REFUSED
    if name in ("XREAD", "XREADGROUP"):
        # BLOCK is an option before STREAMS; for XREADGROUP skip GROUP <g> <c>.
        start = 1 if name == "XREAD" else 4
        for arg in args[start:]:
            upper = arg.upper()
            if upper == b"STREAMS":
                break
            if upper == b"BLOCK":
                blocked = True
                break
    return f"ERR Command is not allowed: {name}" if blocked else None


def _parse_command(raw: object, scripts: _Scripts) -> _Command:
    if not isinstance(raw, list) or not raw:
        raise _BadRequest("ERR a command must be a non-empty JSON array")
    args = [_to_arg(v) for v in raw]
    name = args[0].decode("utf-8", "backslashreplace").upper()
    command = _Command(name, args, _refusal(name, args))
    if command.refused is None:
        _translate_scripts(command, scripts)
    return command


def _translate_scripts(command: _Command, scripts: _Scripts) -> None:
    args = command.args
    if scripts.fakeredis and command.name in ("EVAL_RO", "EVALSHA_RO"):
        args[0] = args[0][: -len(b"_RO")]
    if command.name in ("EVAL", "EVAL_RO") and len(args) > 1:
        command.script_sha = _sha1_hex(args[1]).decode()
        args[1] = scripts.strip(args[1])
    elif command.name in ("EVALSHA", "EVALSHA_RO") and len(args) > 1:
        command.script_sha = args[1].decode(errors="replace").lower()
        args[1] = scripts.translate(args[1])
    elif command.name == "SCRIPT" and len(args) > 2:
        sub = args[1].upper()
        if sub == b"LOAD":
            full = args[2]
            args[2] = scripts.strip(full)
            if args[2] is not full:
                command.loaded_sha = _sha1_hex(full)
        elif sub == b"EXISTS":
            args[2:] = [scripts.translate(sha) for sha in args[2:]]


def _finish(command: _Command, reply: Reply) -> Reply:
    if command.loaded_sha is not None and not isinstance(reply, _Error):
        return command.loaded_sha
    return reply


def _to_json(reply: Reply, b64: bool) -> _Json:
    """Render a reply as Upstash does, with or without ``Upstash-Encoding: base64``."""
    if isinstance(reply, bytes):
        if b64:
            return base64.b64encode(reply).decode("ascii")
        return reply.decode("utf-8", "backslashreplace")
    if isinstance(reply, _Status):
        # The client decodes base64 for every string except a literal "OK".
        if b64 and reply.value != b"OK":
            return base64.b64encode(reply.value).decode("ascii")
        return reply.value.decode("utf-8", "backslashreplace")
    if isinstance(reply, _Error):
        return reply.message
    if isinstance(reply, list):
        return [_to_json(item, b64) for item in reply]
    return reply


def _item(reply: Reply, b64: bool) -> dict[str, _Json]:
    if isinstance(reply, _Error):
        return {"error": reply.message}
    return {"result": _to_json(reply, b64)}


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is larger than ``limit`` (never buffered past it)."""
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if too_large or size > limit:
            too_large = True
            chunks.clear()
            if size > _DRAIN_LIMIT:
                break
            continue
        chunks.append(chunk)
    return None if too_large else b"".join(chunks)


# --------------------------------------------------------------------------
# The endpoint
# --------------------------------------------------------------------------


class Endpoint:
    """The state behind one app: Redis connections, auth, stats, faults, scripts.

    Attributes:
        stats: request and command counters.
        faults: fault injection for tests.
    """

    def __init__(
        self, *, redis_url: str | None, token: str, max_connections: int = DEFAULT_MAX_CONNECTIONS
    ) -> None:
        """Create the endpoint; with ``redis_url=None`` start an embedded store.

        Args:
            redis_url: ``redis://[[user]:password@]host:port/db``, or None for
                an embedded fakeredis server.
            token: the bearer token clients must send.
            max_connections: the size of the Redis connection pool.
        """
        if not token:
            raise ValueError("token must not be empty")
        self.stats = Stats()
        self.faults = Faults()
        self._expected_auth = f"Bearer {token}".encode()
        self._max_connections = max_connections
        self._configured_url = redis_url
        self._embedded = EmbeddedRedis() if redis_url is None else None
        if redis_url is not None:
            _parse_redis_url(redis_url)  # fail fast on a bad URL
        else:
            self._start_embedded()
        self._scripts = _Scripts(fakeredis=redis_url is None or EmbeddedRedis.serves(redis_url))
        self._pool: _Pool | None = None
        self._sync_lock = threading.Lock()
        self._sync_counter = itertools.count(1)

    @property
    def embedded(self) -> bool:
        """True when backed by the embedded fakeredis store."""
        return self._embedded is not None

    @property
    def redis_url(self) -> str | None:
        """The Redis behind the endpoint (None while an embedded store is stopped)."""
        if self._embedded is not None:
            return self._embedded.url
        return self._configured_url

    def _start_embedded(self) -> str:
        assert self._embedded is not None
        return self._embedded.start()

    async def startup(self) -> None:
        """(Re)start the embedded store, if any (the app's lifespan calls this)."""
        if self._embedded is not None:
            self._start_embedded()

    async def aclose(self) -> None:
        """Close Redis connections and stop the embedded store, if any."""
        pool, self._pool = self._pool, None
        if pool is not None and pool.loop is asyncio.get_running_loop():
            await pool.aclose()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)

    def _get_pool(self) -> _Pool:
        loop = asyncio.get_running_loop()
        if self._pool is None or self._pool.loop is not loop:
            # A pool belongs to one loop; a new loop (app served again) gets a new one.
            url = self._start_embedded() if self._embedded is not None else self._configured_url
            assert url is not None
            self._pool = _Pool(_parse_redis_url(url), self._max_connections)
        return self._pool

    def _sync_token(self) -> str:
        with self._sync_lock:
            return str(next(self._sync_counter))

    def _json(self, payload: _Json, status: int = 200) -> Response:
        return JSONResponse(
            payload, status_code=status, headers={"Upstash-Sync-Token": self._sync_token()}
        )

    def _text(self, text: str, status: int) -> Response:
        return PlainTextResponse(
            text, status_code=status, headers={"Upstash-Sync-Token": self._sync_token()}
        )

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization", "").encode("latin-1", "replace")
        return hmac.compare_digest(given, self._expected_auth)

    # -- routes -------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """``GET /``: liveness, no auth."""
        return self._json({"result": "OK"})

    async def stats_route(self, request: Request) -> Response:
        """``GET /_rejoin/stats``: the stats snapshot."""
        if not self._authorized(request):
            return self._json({"error": "Unauthorized"}, 401)
        snapshot: dict[str, _Json] = {}
        for key, value in self.stats.snapshot().items():
            snapshot[key] = dict(value) if isinstance(value, dict) else value
        return self._json(snapshot)

    async def stats_reset_route(self, request: Request) -> Response:
        """``POST /_rejoin/stats/reset``: zero the stats."""
        if not self._authorized(request):
            return self._json({"error": "Unauthorized"}, 401)
        self.stats.reset()
        return self._json({"result": "OK"})

    async def single_route(self, request: Request) -> Response:
        """``POST /``: one command."""
        return await self._handle(request, "single")

    async def pipeline_route(self, request: Request) -> Response:
        """``POST /pipeline``: independent commands, one result or error each."""
        return await self._handle(request, "pipeline")

    async def multi_exec_route(self, request: Request) -> Response:
        """``POST /multi-exec``: commands as one MULTI/EXEC transaction."""
        return await self._handle(request, "multi")

    async def _handle(self, request: Request, mode: _Mode) -> Response:
        self.faults._started()
        try:
            return await self._handle_one(request, mode)
        finally:
            self.faults._finished()

    async def _handle_one(self, request: Request, mode: _Mode) -> Response:
        if not self._authorized(request):
            return self._json({"error": "Unauthorized"}, 401)
        self.stats.record_request(request.url.path)
        body = await _read_body(request, MAX_REQUEST_BYTES)
        if body is None:
            return self._json({"error": "ERR max request size exceeded"}, 400)
        try:
            commands = self._parse(body, mode)
        except _BadRequest as exc:
            return self._json({"error": str(exc)}, 400)
        self.stats.record_commands([c.name for c in commands])

        fault = self.faults._take(commands[0])
        if fault is not None and fault.kind == "fail":
            return self._text(f"injected failure ({fault.status})", fault.status)
        if fault is not None and fault.kind == "hang":
            await self.faults._sleep(fault.seconds)

        b64 = request.headers.get("upstash-encoding", "").lower() == "base64"
        try:
            if mode == "single":
                status, payload = await self._run_single(commands[0], b64)
            elif mode == "pipeline":
                status, payload = await self._run_pipeline(commands, b64)
            else:
                status, payload = await self._run_multi(commands, b64)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            # Redis is unreachable or broke the protocol: say so in JSON, so the
            # client raises instead of retrying blindly.
            return self._json({"error": f"ERR Redis backend failed: {exc!r}"}, 500)

        if fault is not None and fault.kind == "lose":
            return self._text("upstream response lost (injected)", 502)
        return self._json(payload, status)

    def _parse(self, body: bytes, mode: _Mode) -> list[_Command]:
        try:
            payload: object = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _BadRequest(f"ERR malformed JSON request body: {exc}") from None
        if mode == "single":
            return [_parse_command(payload, self._scripts)]
        if not isinstance(payload, list) or not payload:
            raise _BadRequest("ERR the body must be a non-empty JSON array of commands")
        return [_parse_command(raw, self._scripts) for raw in payload]

    async def _run_single(self, command: _Command, b64: bool) -> tuple[int, _Json]:
        if command.refused is not None:
            return 400, {"error": command.refused}
        async with self._get_pool().connection() as conn:
            (reply,) = await conn.run([command.args])
        reply = _finish(command, reply)
        if isinstance(reply, _Error):
            return 400, {"error": reply.message}
        return 200, {"result": _to_json(reply, b64)}

    async def _run_pipeline(self, commands: list[_Command], b64: bool) -> tuple[int, _Json]:
        runnable = [c for c in commands if c.refused is None]
        replies: Iterator[Reply] = iter(())
        if runnable:
            async with self._get_pool().connection() as conn:
                replies = iter(await conn.run([c.args for c in runnable]))
        items: list[_Json] = []
        for command in commands:
            if command.refused is not None:
                items.append({"error": command.refused})
            else:
                items.append(_item(_finish(command, next(replies)), b64))
        return 200, items

    async def _run_multi(self, commands: list[_Command], b64: bool) -> tuple[int, _Json]:
        for command in commands:
            if command.refused is not None:
                return 400, {"error": command.refused}
        batch = [[b"MULTI"], *(c.args for c in commands), [b"EXEC"]]
        async with self._get_pool().connection() as conn:
            replies = await conn.run(batch)
        # A command refused at queue time makes Redis discard the transaction
        # (EXEC answers EXECABORT); report the first cause, which says more.
        for reply in replies:
            if isinstance(reply, _Error):
                return 400, {"error": reply.message}
        results = replies[-1]
        if not isinstance(results, list):
            return 400, {"error": "ERR transaction aborted"}
        return 200, [_item(_finish(c, r), b64) for c, r in zip(commands, results, strict=True)]


def create_app(
    *, redis_url: str | None, token: str, max_connections: int = DEFAULT_MAX_CONNECTIONS
) -> Starlette:
    """Build the Upstash-compatible REST app.

    Args:
        redis_url: the Redis to front (``redis://host:port/db``, optionally with
            a password), or None for an embedded fakeredis store.
        token: the bearer token clients must present.
        max_connections: the size of the Redis connection pool.

    Returns:
        A Starlette app whose ``state.endpoint`` is the :class:`Endpoint`.
    """
    endpoint = Endpoint(redis_url=redis_url, token=token, max_connections=max_connections)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await endpoint.startup()
        try:
            yield
        finally:
            await endpoint.aclose()

    app = Starlette(
        routes=[
            Route("/", endpoint.health, methods=["GET"]),
            Route("/", endpoint.single_route, methods=["POST"]),
            Route("/pipeline", endpoint.pipeline_route, methods=["POST"]),
            Route("/multi-exec", endpoint.multi_exec_route, methods=["POST"]),
            Route("/_rejoin/stats", endpoint.stats_route, methods=["GET"]),
            Route("/_rejoin/stats/reset", endpoint.stats_reset_route, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.endpoint = endpoint
    return app


# --------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunningServer:
    """An app being served by :func:`serve`.

    Attributes:
        url: the base URL, e.g. ``http://127.0.0.1:54321``.
        host: the host clients connect to.
        port: the bound port.
    """

    url: str
    host: str
    port: int


@contextlib.contextmanager
def serve(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> Iterator[RunningServer]:
    """Serve ``app`` with uvicorn in a background thread.

    Args:
        app: the ASGI app (usually from :func:`create_app`).
        host: the interface to bind.
        port: the port, 0 for a free one.

    Yields:
        The running server's address; it stops when the block exits.
    """

    def release_hanging_requests() -> None:
        endpoint = getattr(app.state, "endpoint", None)
        if isinstance(endpoint, Endpoint):
            endpoint.faults.clear()  # releases hanging requests, so shutdown is quick

    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    with serve_uvicorn(
        config,
        host,
        port,
        thread_name="rejoin-upstash-rest",
        description="the Upstash REST endpoint",
        stop_timeout=10,
        before_stop=release_hanging_requests,
    ) as served:
        yield RunningServer(url=served.url(), host=served.host, port=served.port)


def _watch_parent(fd: int, server: uvicorn.Server) -> None:
    """Stop ``server`` once ``fd`` reads end of file (the parent is gone); exit if it hangs."""

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 512):
                pass
        server.should_exit = True
        time.sleep(10)  # a graceful stop takes well under this
        os._exit(1)

    threading.Thread(target=watch, name="rejoin-parent-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the endpoint until Ctrl-C (or until the ``--parent-fd`` pipe closes).

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m rejoin_local.upstash_rest",
        description="Serve an Upstash-compatible Redis REST API on this machine.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8079)
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL") or None,
        help="Redis to front (default: $REDIS_URL, else an embedded in-process store)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("UPSTASH_REDIS_REST_TOKEN") or "local-dev-token",
        help="bearer token (default: $UPSTASH_REDIS_REST_TOKEN, else local-dev-token)",
    )
    parser.add_argument(
        "--parent-fd",
        type=int,
        metavar="FD",
        help="stop when this inherited file descriptor reaches end of file: the read end "
        "of a pipe whose write end only the parent holds, so this process never outlives "
        "it (rejoin_local.upstash_process uses it)",
    )
    args = parser.parse_args(argv)

    app = create_app(redis_url=args.redis_url or None, token=args.token)
    endpoint: Endpoint = app.state.endpoint
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port} ({exc.strerror})", file=sys.stderr)
        return 1
    url = base_url(*client_address(sock))
    backend = "an embedded in-memory store" if endpoint.embedded else endpoint.redis_url
    print(f"Upstash-compatible REST endpoint on {url}, backed by {backend}", flush=True)
    print(f"UPSTASH_REDIS_REST_URL={url} UPSTASH_REDIS_REST_TOKEN={args.token}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    if args.parent_fd is not None:
        _watch_parent(args.parent_fd, server)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully, then re-raises the SIGINT it caught.
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
