"""A RESP proxy in front of a Redis, counting commands and injecting faults: the TCP
counterpart of the Upstash endpoint's ``/_rejoin`` stats and faults.

Each client connection gets its own upstream connection; commands are relayed
one at a time (request, then its reply), so each one can be counted, delayed,
cut off before it reaches Redis, or applied with its answer thrown away. The
proxy runs its own event loop in a daemon thread, so tests on any loop (or
none) can use it.

Faults are :class:`rejoin_local.upstash_rest.Faults`, with the same meaning
over TCP:

- ``fail(times=n)``: the proxy closes the client's connection without sending
  the command on (the server went away before the request reached it);
- ``lose_response(times=n)``: the command runs in Redis, then the connection
  is closed before the answer (the answer is lost after apply);
- ``hang(seconds, times=n)``: the command waits ``seconds`` before it is sent
  on and answered (``clear()`` ends the wait).

Connection set-up commands (``HELLO``, ``AUTH``, ``CLIENT``, ``SELECT``,
``READONLY``) never take a fault; they are counted under the ``setup`` path of
:class:`~rejoin_local.upstash_rest.Stats` (every other command under
``command``), and :attr:`RespProxy.connections` counts accepted connections.

::

    with RespProxy("127.0.0.1", 6379) as proxy:
        client = redis.Redis.from_url(proxy.url)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from .upstash_rest import Faults, Stats

__all__ = ["RespProxy"]

_SETUP = frozenset({b"HELLO", b"AUTH", b"CLIENT", b"SELECT", b"READONLY"})
_START_TIMEOUT = 10.0


class _Closed(Exception):
    """One side closed its connection."""


async def _line(reader: asyncio.StreamReader, raw: bytearray) -> bytes:
    try:
        line = await reader.readuntil(b"\r\n")
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise _Closed from exc
    raw += line
    return line[:-2]


async def _exact(reader: asyncio.StreamReader, n: int, raw: bytearray) -> bytes:
    try:
        data = await reader.readexactly(n)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise _Closed from exc
    raw += data
    return data


async def _read_command(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One client command: (its upper-case name, its bytes as sent)."""
    raw = bytearray()
    head = await _line(reader, raw)
    if not head.startswith(b"*"):  # an inline command
        return (head.split(b" ", 1)[0].upper(), bytes(raw))
    parts: list[bytes] = []
    for _ in range(int(head[1:])):
        size = await _line(reader, raw)
        parts.append((await _exact(reader, int(size[1:]) + 2, raw))[:-2])
    return (parts[0].upper() if parts else b"", bytes(raw))


async def _read_reply(reader: asyncio.StreamReader, raw: bytearray) -> None:
    """One RESP2 or RESP3 reply from Redis, appended to ``raw`` as received."""
    head = await _line(reader, raw)
    kind, rest = head[:1], head[1:]
    if kind in (b"+", b"-", b":", b"_", b",", b"#", b"("):
        return
    if kind in (b"$", b"=", b"!"):
        if int(rest) >= 0:
            await _exact(reader, int(rest) + 2, raw)
        return
    if kind in (b"*", b"~", b">", b"%", b"|"):
        count = max(0, int(rest)) * (2 if kind in (b"%", b"|") else 1)
        for _ in range(count):
            await _read_reply(reader, raw)
        if kind == b"|":  # attributes precede the reply they describe
            await _read_reply(reader, raw)
        return
    raise _Closed(f"unknown RESP reply type {kind!r}")


class RespProxy:
    """Relay RESP between clients and one Redis, with counts and faults.

    Args:
        host: the Redis host.
        port: the Redis port.

    Attributes:
        faults: the faults to apply to the next commands.
        stats: requests per kind (``command``, ``setup``) and commands per name.
    """

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self.faults = Faults()
        self.stats = Stats()
        self._connections = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The port the proxy listens on (on 127.0.0.1)."""
        if self._port is None:
            raise RuntimeError("the proxy is not running")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def connections(self) -> int:
        """Client connections accepted since start (or :meth:`reset`)."""
        with self._lock:
            return self._connections

    def reset(self) -> None:
        """Zero the stats and the connection count."""
        self.stats.reset()
        with self._lock:
            self._connections = 0

    def start(self) -> str:
        """Listen on a free loopback port; returns :attr:`url`."""
        if self._thread is not None:
            return self.url
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, "127.0.0.1", 0)
                )
                self._port = int(self._server.sockets[0].getsockname()[1])
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="resp-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(_START_TIMEOUT) or failure:
            raise RuntimeError(f"the RESP proxy did not start: {failure}")
        return self.url

    def stop(self) -> None:
        """Close every connection and stop listening (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self.faults.clear()

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(_START_TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_START_TIMEOUT)
        self._loop = self._thread = self._server = None
        self._port = None

    def __enter__(self) -> RespProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self._connections += 1
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            while True:
                name, command = await _read_command(reader)
                setup = name in _SETUP
                self.stats.record_request("setup" if setup else "command")
                if not setup:
                    self.stats.record_commands([name.decode(errors="replace")])
                fault = None if setup else self.faults._take(name.decode(errors="replace"))
                if fault is not None and fault.kind == "fail":
                    return  # closed before Redis saw the command
                if fault is not None and fault.kind == "hang":
                    await self.faults._sleep(fault.seconds)
                up_writer.write(command)
                await up_writer.drain()
                reply = bytearray()
                await _read_reply(up_reader, reply)
                if fault is not None and fault.kind == "lose":
                    return  # applied; the answer never reaches the client
                writer.write(bytes(reply))
                await writer.drain()
        except (_Closed, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()
